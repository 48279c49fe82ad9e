"""The `pd` command line: one subcommand per way of starting something.

Heavy modules (the server, the default-model builder) are imported inside the subcommand that needs them,
so `pd --help` and flag errors answer without loading torch or the model code.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

from launch.preflight import PreflightError, check_ports, check_serve
from pd.bench.args import BenchArgs, BenchArgsError
from pd.lb.args import LBArgs, LBArgsError
from pd.server_args import DEFAULT_CHUNKED_PREFILL_SIZE, ServerArgs, ServerArgsError

if TYPE_CHECKING:
    from pd.engine.spec import SchedulerFactory

LOG_FORMAT = "%(asctime)s %(processName)s %(levelname)s %(name)s: %(message)s"

Handler = Callable[[argparse.Namespace, argparse.ArgumentParser], int]


def setup_logging(level: str) -> None:
    """Configure root logging once per process; `level` is a name such as "info" (case-insensitive)."""
    logging.basicConfig(level=level.upper(), format=LOG_FORMAT, force=True)


def _fail(parser: argparse.ArgumentParser, e: PreflightError) -> int:
    """A start-up check failed: its one line on stderr (no usage, no traceback), and argparse's exit status."""
    print(f"{parser.prog}: error: {e}", file=sys.stderr)
    return 2


def _serve(ns: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    try:
        server_args = ServerArgs.from_namespace(ns)
    except ServerArgsError as e:
        parser.error(str(e))  # exits with status 2, argparse-style
    try:
        check_serve(server_args)
    except PreflightError as e:
        return _fail(parser, e)
    setup_logging(server_args.log_level)
    from pd.dist.launch import start_rank_launcher

    start_rank_launcher()  # the ranks' imports run beside the front's start-up
    from pd.default_model import with_default_model
    from pd.engine.spec import EngineSpec

    server_args = with_default_model(server_args)  # builds it on first use when no --model-path is given
    try:
        # The instance's whole configuration, once: every rank gets it as data.
        spec = EngineSpec.from_server_args(server_args, role_scheduler(server_args.disaggregation_mode))
    except ValueError as e:  # inconsistent DEEPEP_NORMAL_LONG_SEQ_* variables
        return _fail(parser, PreflightError(str(e)))
    if server_args.node_rank > 0:  # ranks only: the HTTP front runs on node 0
        from pd.dist.launch import run_worker_node
        from pd.engine.engine_process import run_engine

        return run_worker_node(spec.layout, run_engine, spec)
    from pd.server.app import run_server

    run_server(server_args, spec)
    return 0


def role_scheduler(mode: str) -> SchedulerFactory:
    """The scheduler of an instance's role: prefill, decode, or the unified one."""
    if mode == "prefill":
        from prefill.scheduler import PrefillScheduler

        return PrefillScheduler
    if mode == "decode":
        from decode.scheduler import DecodeScheduler

        return DecodeScheduler
    from pd.engine.spec import default_scheduler

    return default_scheduler


def _bench(ns: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    try:
        bench_args = BenchArgs.from_namespace(ns)
    except BenchArgsError as e:
        parser.error(str(e))
    from pd.bench.runner import main as run_bench

    return run_bench(bench_args)


def _lb(ns: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    try:
        lb_args = LBArgs.from_namespace(ns)
    except LBArgsError as e:
        parser.error(str(e))  # exits with status 2, argparse-style
    try:
        check_ports(lb_args.host, [("--port", lb_args.port)])
    except PreflightError as e:
        return _fail(parser, e)
    setup_logging(lb_args.log_level)
    from pd.lb.app import run_lb

    run_lb(lb_args)
    return 0


def _up(ns: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    setup_logging("info")
    from launch.up import run_up

    return run_up(ns, ns.serve_argv)


def _hccl_buffsize(ns: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    """Prints the HCCL_BUFFSIZE that normal-mode dispatch needs under the current DEEPEP_NORMAL_LONG_SEQ_*
    variables; exit status 1 when the configured value (or HCCL's default) is too small or the batch does not fit
    the rounds, so deployment scripts can check before they start an instance."""
    from pd.models.config import ModelConfig, ModelConfigError
    from pd.moe.long_seq import (
        check_hccl_buffsize,
        check_tokens_per_rank,
        hccl_buffsize_report,
        long_seq_config_from_env,
    )

    try:
        config = long_seq_config_from_env()
    except ValueError as e:
        parser.error(str(e))
    hidden_size, top_k = ns.hidden_size, ns.top_k
    if ns.model_path is not None:
        try:
            model = ModelConfig.from_path(ns.model_path)
        except ModelConfigError as e:
            parser.error(str(e))
        hidden_size = hidden_size or model.get("hidden_size")
        top_k = top_k or model.get("num_experts_per_tok")
    if not hidden_size or not top_k:
        parser.error("give --model-path (an MoE checkpoint), or --hidden-size and --top-k")
    print(hccl_buffsize_report(config, hidden_size, top_k, ns.max_tokens_per_rank))
    try:
        check_tokens_per_rank(config, ns.max_tokens_per_rank)
        check_hccl_buffsize(config, hidden_size, top_k, ns.max_tokens_per_rank)
    except ValueError:
        return 1
    return 0


def _eplb_plan(ns: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    """Plans an expert placement offline from a recorded load (an --expert-distribution-dir file): prints each MoE
    layer's balancedness (mean / max GPU load) with experts placed contiguously and no replicas, and with the plan;
    --out writes the plan for --init-expert-location."""
    from pd.models.config import ModelConfig, ModelConfigError
    from pd.moe.eplb.algorithm import rebalance_experts
    from pd.moe.eplb.location import ExpertLocationError, read_load, write_map
    from pd.moe.eplb.manager import balancedness, expected_gpu_load

    try:
        load_LE = read_load(ns.load)
    except ExpertLocationError as e:
        parser.error(str(e))
    layers, experts = load_LE.shape
    groups = ns.num_groups
    if groups is None and ns.model_path is not None:
        try:
            groups = ModelConfig.from_path(ns.model_path).get("n_group")
        except ModelConfigError as e:
            parser.error(str(e))
    slots = experts + ns.redundant
    if ns.ep < 1 or experts % ns.ep or slots % ns.ep or ns.ep % ns.nnodes:
        parser.error(f"{experts} experts and {slots} slots must split evenly over --ep {ns.ep}, and --ep over "
                     f"--nnodes {ns.nnodes}")  # fmt: skip
    phy2log_LP, _, count_LE = rebalance_experts(load_LE, slots, groups or 1, ns.nnodes, ns.ep)
    before_LG = load_LE.view(layers, ns.ep, -1).sum(-1)
    after_LG = expected_gpu_load(load_LE, phy2log_LP, count_LE, ns.ep)
    print(f"{layers} MoE layers, {experts} experts, {slots} slots on {ns.ep} GPUs ({ns.nnodes} nodes), "
          f"{groups or 1} expert groups; balancedness = mean / max GPU load")  # fmt: skip
    print(f"{'layer':>6} {'contiguous':>11} {'planned':>8}")
    for layer in range(layers):
        one = slice(layer, layer + 1)
        print(f"{layer:>6} {balancedness(before_LG[one]):>11.3f} {balancedness(after_LG[one]):>8.3f}")
    print(f"{'mean':>6} {balancedness(before_LG):>11.3f} {balancedness(after_LG):>8.3f}")
    if ns.out:
        write_map(ns.out, phy2log_LP)
        print(f"plan written to {ns.out} (pd serve --init-expert-location {ns.out} --ep-num-redundant-experts "
              f"{ns.redundant})")  # fmt: skip
    return 0


def _build_default_model(ns: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    setup_logging("info")
    from pd.default_model import build_default_model

    print(build_default_model(cache_dir=None, force=ns.force))
    return 0


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
    bench = add("bench", "benchmark a running server, load balancer or router", _bench, "%(prog)s --base-url URL ...")
    BenchArgs.add_cli_args(bench)
    lb_usage = "%(prog)s (--prefill URL [BOOTSTRAP_PORT] ... --decode URL ... | --worker-urls URL ...) [options]"
    lb = add("lb", "run the load balancer: prefill/decode pairs (sglang-router --pd-disaggregation flags) or unified "
             "instances (--worker-urls)", _lb, lb_usage)
    LBArgs.add_cli_args(lb)
    up = add("up", "run prefill, decode and the load balancer on this machine (other flags go to each pd serve)",
             _up, "%(prog)s [--num-prefill N] [--num-decode M] [--port P] [pd serve flags]")
    from launch.up import add_cli_args as add_up_args

    add_up_args(up)
    p = add("hccl-buffsize", "the HCCL_BUFFSIZE normal-mode dispatch needs (Ascend), for the DEEPEP_NORMAL_LONG_SEQ_* "
            "variables set now", _hccl_buffsize)
    p.add_argument("--model-path", default=None, help="read hidden_size and num_experts_per_tok from its config.json")
    p.add_argument("--hidden-size", type=int, default=None)
    p.add_argument("--top-k", type=int, default=None, help="experts per token")
    p.add_argument("--max-tokens-per-rank", type=int, default=DEFAULT_CHUNKED_PREFILL_SIZE,
                   help="the most tokens one rank dispatches at once (default: --chunked-prefill-size's default "
                        "off CUDA)")
    p = add("eplb-plan", "plan an expert placement from a recorded load file and show what it balances", _eplb_plan)
    p.add_argument("--load", required=True, help="a JSON/.pt file with logical_count [..., MoE layers, experts]")
    p.add_argument("--ep", type=int, required=True, help="expert-parallel ranks (GPUs)")
    p.add_argument("--redundant", type=int, default=0, help="redundant expert slots per layer")
    p.add_argument("--nnodes", type=int, default=1, help="nodes the GPUs span")
    p.add_argument("--num-groups", type=int, default=None, help="router expert groups (default: n_group of "
                   "--model-path, else 1)")  # fmt: skip
    p.add_argument("--model-path", default=None)
    p.add_argument("--out", default=None, help="write the plan here (physical_to_logical_map)")
    p = add("build-default-model", "build the built-in tiny MoE checkpoint and print its path", _build_default_model)
    p.add_argument("--force", action="store_true", help="rebuild even if a cached copy exists")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of `pd`, `python -m pd` and `python -m launch`; returns the process exit status."""
    parser = build_parser()
    ns, extra = parser.parse_known_args(argv)
    if ns.handler is _up:
        ns.serve_argv, extra = extra, []  # the instance flags, validated by pd up itself
    if extra:
        ns.subparser.error(f"unrecognized arguments: {' '.join(extra)}")
    return ns.handler(ns, ns.subparser)
