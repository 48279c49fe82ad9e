"""Load-balancer arguments (`pd lb`): parsed once from the command line into one frozen dataclass.

The worker flags follow `sglang_router.launch_router --pd-disaggregation`: `--prefill URL [BOOTSTRAP_PORT]`
(repeatable; BOOTSTRAP_PORT is a number or `none`) and `--decode URL` (repeatable). sglang-router's longer
flag names (`--health-check-interval-secs`, `--request-timeout-secs`) are accepted as aliases, and
`--pd-disaggregation` is accepted and ignored (this balancer is always in PD mode), so a launch line written for
sglang-router runs unchanged. Every bad value fails with an `LBArgsError` that names the flag.
"""

from __future__ import annotations

import argparse
import urllib.parse
from collections.abc import Sequence
from dataclasses import dataclass

from pd.lb.policies import POLICY_NAMES
from pd.server_args import API_KEY_ENV, LOG_LEVELS, ServerArgsError, resolve_api_key

# The prefill instances' bootstrap port when --prefill gives none (pd serve's and SGLang's default
# --disaggregation-bootstrap-port). sglang-router 0.3.2 sends null instead and lets the worker use its own
# default; an explicit `none` keeps that behaviour.
DEFAULT_BOOTSTRAP_PORT = 8998


class LBArgsError(ValueError):
    """A bad load-balancer flag; the message names the flag and says what to change."""


@dataclass(frozen=True)
class PrefillSpec:
    """One prefill instance: its HTTP base URL and the port of its KV bootstrap server (None: send null)."""

    url: str
    bootstrap_port: int | None = DEFAULT_BOOTSTRAP_PORT


@dataclass(frozen=True)
class LBArgs:
    """Everything `pd lb` is started with. Policies are resolved: `prefill_policy`/`decode_policy` are never None."""

    prefill: tuple[PrefillSpec, ...] = ()
    decode: tuple[str, ...] = ()
    host: str = "127.0.0.1"
    port: int = 30000
    policy: str = "power_of_two"
    prefill_policy: str | None = None
    decode_policy: str | None = None
    health_check_interval: float = 5.0
    health_check_timeout: float = 5.0
    health_failure_threshold: int = 3
    request_timeout: float = 1800.0
    api_key: str | None = None
    log_level: str = "info"

    def __post_init__(self) -> None:
        # Frozen: the per-side policies are resolved through object.__setattr__ (idempotent, so
        # dataclasses.replace stays consistent).
        object.__setattr__(self, "prefill_policy", self.prefill_policy or self.policy)
        object.__setattr__(self, "decode_policy", self.decode_policy or self.policy)
        _validate(self)

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    @staticmethod
    def add_cli_args(parser: argparse.ArgumentParser) -> None:
        """Add the `pd lb` flags to `parser`."""
        policies = sorted(POLICY_NAMES)
        parser.add_argument(
            "--prefill", nargs="+", action="append", default=[], metavar=("URL", "BOOTSTRAP_PORT"),
            help=f"a prefill instance and its bootstrap port (a number or 'none'; default {DEFAULT_BOOTSTRAP_PORT});"
            " repeat for more",
        )  # fmt: skip
        parser.add_argument("--decode", action="append", default=[], metavar="URL", help="a decode instance; repeat")
        parser.add_argument("--host", default="127.0.0.1", help="listen address (default: 127.0.0.1)")
        parser.add_argument("--port", type=int, default=30000, help="HTTP port (default: 30000)")
        parser.add_argument(
            "--policy",
            choices=policies,
            default="power_of_two",
            help="pair choice on both sides (default: %(default)s)",
        )
        parser.add_argument("--prefill-policy", choices=policies, help="override --policy for prefill instances")
        parser.add_argument("--decode-policy", choices=policies, help="override --policy for decode instances")
        parser.add_argument(
            "--health-check-interval", "--health-check-interval-secs", type=float, default=5.0,
            help="seconds between health checks of every instance (default: %(default)s)",
        )  # fmt: skip
        parser.add_argument(
            "--health-check-timeout", "--health-check-timeout-secs", type=float, default=5.0,
            help="seconds a health check may take (default: %(default)s)",
        )  # fmt: skip
        parser.add_argument(
            "--health-failure-threshold", type=int, default=3,
            help="failed health checks in a row that take an instance out (default: %(default)s); a refused"
            " connection on a request takes it out at once",
        )  # fmt: skip
        parser.add_argument(
            "--request-timeout", "--request-timeout-secs", type=float, default=1800.0,
            help="seconds to wait for a non-streamed answer, or between two chunks of a stream (default: %(default)s)",
        )  # fmt: skip
        parser.add_argument(
            "--api-key",
            help=f"require 'Authorization: Bearer <key>' and forward it to the instances (or set {API_KEY_ENV})",
        )
        parser.add_argument("--api-key-file", help="read --api-key from this file, keeping it out of `ps`")
        parser.add_argument("--log-level", choices=LOG_LEVELS, default="info", help="logging level (default: info)")
        parser.add_argument("--pd-disaggregation", action="store_true", help="accepted for sglang-router compatibility")

    @classmethod
    def from_namespace(cls, ns: argparse.Namespace) -> LBArgs:
        """Build from flags parsed by a parser that `add_cli_args` filled. Raises LBArgsError."""
        try:
            api_key = resolve_api_key(ns.api_key, getattr(ns, "api_key_file", None))
        except ServerArgsError as e:
            raise LBArgsError(str(e)) from None
        return cls(
            prefill=tuple(parse_prefill(item) for item in ns.prefill),
            decode=tuple(normalize_url(u, "--decode") for u in ns.decode),
            host=ns.host,
            port=ns.port,
            policy=ns.policy,
            prefill_policy=ns.prefill_policy,
            decode_policy=ns.decode_policy,
            health_check_interval=ns.health_check_interval,
            health_check_timeout=ns.health_check_timeout,
            health_failure_threshold=ns.health_failure_threshold,
            request_timeout=ns.request_timeout,
            api_key=api_key,
            log_level=ns.log_level,
        )

    @classmethod
    def from_cli(cls, argv: Sequence[str] | None = None, prog: str = "pd lb") -> LBArgs:
        """Parse `argv` (default: sys.argv[1:]); errors exit with status 2 and an argparse-style message."""
        parser = argparse.ArgumentParser(prog=prog, allow_abbrev=False)
        cls.add_cli_args(parser)
        ns = parser.parse_args(argv)
        try:
            return cls.from_namespace(ns)
        except LBArgsError as e:
            parser.error(str(e))


def normalize_url(url: str, flag: str) -> str:
    """`http(s)://host[:port]` without a trailing slash. Raises LBArgsError naming `flag` otherwise."""
    parsed = urllib.parse.urlsplit(url)
    try:
        port_ok = parsed.port is None or 0 < parsed.port < 65536
    except ValueError:
        port_ok = False
    if parsed.scheme not in ("http", "https") or not parsed.hostname or not port_ok:
        raise LBArgsError(f"{flag}: {url!r} is not a worker URL; give http://HOST:PORT")
    if parsed.path.strip("/") or parsed.query or parsed.fragment:
        raise LBArgsError(f"{flag}: {url!r} has a path; give the instance's base URL http://HOST:PORT")
    return f"{parsed.scheme}://{parsed.netloc}"


def parse_bootstrap_port(value: object, flag: str) -> int | None:
    """A port number (int or numeric string), or None / 'none' for null. Raises LBArgsError."""
    if value is None or (isinstance(value, str) and value.lower() == "none"):
        return None
    if isinstance(value, str) and value.strip().isdigit():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or not 0 < value < 65536:
        raise LBArgsError(f"{flag}: bootstrap port {value!r} must be a port number 1-65535 or 'none'")
    return value


def parse_prefill(item: Sequence[str]) -> PrefillSpec:
    """One `--prefill URL [BOOTSTRAP_PORT]` occurrence."""
    if len(item) > 2:
        raise LBArgsError(
            f"--prefill takes URL [BOOTSTRAP_PORT], got {' '.join(item)!r}; repeat --prefill per instance"
        )
    url = normalize_url(item[0], "--prefill")
    port = parse_bootstrap_port(item[1], "--prefill") if len(item) == 2 else DEFAULT_BOOTSTRAP_PORT
    return PrefillSpec(url, port)


def _validate(a: LBArgs) -> None:
    def need(ok: bool, msg: str) -> None:
        if not ok:
            raise LBArgsError(msg)

    for name, flag in (
        ("policy", "--policy"),
        ("prefill_policy", "--prefill-policy"),
        ("decode_policy", "--decode-policy"),
    ):
        need(
            getattr(a, name) in POLICY_NAMES, f"{flag} must be one of {sorted(POLICY_NAMES)}, got {getattr(a, name)!r}"
        )
    urls = [p.url for p in a.prefill] + list(a.decode)
    dup = sorted({u for u in urls if urls.count(u) > 1})
    need(not dup, f"worker URL(s) given more than once: {', '.join(dup)}; each instance is one --prefill or --decode")
    need(0 < a.port < 65536, f"--port must be 1-65535, got {a.port}")
    need(a.health_check_interval > 0, f"--health-check-interval must be > 0 seconds, got {a.health_check_interval}")
    need(a.health_check_timeout > 0, f"--health-check-timeout must be > 0 seconds, got {a.health_check_timeout}")
    need(a.health_failure_threshold >= 1, f"--health-failure-threshold must be >= 1, got {a.health_failure_threshold}")
    need(a.request_timeout > 0, f"--request-timeout must be > 0 seconds, got {a.request_timeout}")
    need(a.api_key is None or a.api_key != "", "--api-key must not be empty")
    need(a.log_level in LOG_LEVELS, f"--log-level must be one of {list(LOG_LEVELS)}, got {a.log_level!r}")
