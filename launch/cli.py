"""The `pd` command line: one subcommand per way of starting something.

Heavy modules (the server, the default-model builder) are imported inside the subcommand that needs them,
so `pd --help` and flag errors answer without loading torch or the model code.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable, Sequence

from pd.server_args import ServerArgs, ServerArgsError

LOG_FORMAT = "%(asctime)s %(processName)s %(levelname)s %(name)s: %(message)s"

Handler = Callable[[argparse.Namespace, argparse.ArgumentParser], int]

# Subcommands that exist in the interface but not yet in this build.
_NOT_YET = {
    "up": "start a local prefill + decode + load-balancer cluster",
    "lb": "run the prefill/decode load balancer",
    "bench": "benchmark a running server",
}


def setup_logging(level: str) -> None:
    """Configure root logging once per process; `level` is a name such as "info" (case-insensitive)."""
    logging.basicConfig(level=level.upper(), format=LOG_FORMAT, force=True)


def _serve(ns: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    try:
        server_args = ServerArgs.from_namespace(ns)
    except ServerArgsError as e:
        parser.error(str(e))  # exits with status 2, argparse-style
    setup_logging(server_args.log_level)
    from pd.server.app import run_server

    run_server(server_args)
    return 0


def _build_default_model(ns: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    setup_logging("info")
    from pd.default_model import build_default_model

    print(build_default_model(cache_dir=None, force=ns.force))
    return 0


def _not_yet(ns: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    print(f"pd {ns.command} is not implemented yet", file=sys.stderr)
    return 2


def build_parser() -> argparse.ArgumentParser:
    """The full `pd` parser; each subparser stores its handler as `handler` and itself as `subparser`."""
    parser = argparse.ArgumentParser(prog="pd", description="Prefill/decode disaggregated serving for MoE LLMs.")
    sub = parser.add_subparsers(dest="command", metavar="<command>", required=True)

    def add(name: str, help: str, handler: Handler, usage: str | None = None) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help, description=help, usage=usage, allow_abbrev=False)
        p.set_defaults(handler=handler, subparser=p)
        return p

    # The serve flags are many; errors show a short usage line and `pd serve --help` lists them all.
    serve = add("serve", "run one server instance (unified, prefill or decode)", _serve, "%(prog)s [options]")
    ServerArgs.add_cli_args(serve)
    for name, help in _NOT_YET.items():
        add(name, help, _not_yet)
    p = add("build-default-model", "build the built-in tiny MoE checkpoint and print its path", _build_default_model)
    p.add_argument("--force", action="store_true", help="rebuild even if a cached copy exists")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of `pd`, `python -m pd` and `python -m launch`; returns the process exit status."""
    parser = build_parser()
    # Placeholder subcommands take any arguments, so scripts written for their future flags get the clear
    # "not implemented" answer rather than a usage error.
    ns, extra = parser.parse_known_args(argv)
    if extra and ns.handler is not _not_yet:
        ns.subparser.error(f"unrecognized arguments: {' '.join(extra)}")
    return ns.handler(ns, ns.subparser)
