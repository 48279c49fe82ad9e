"""Load-balancer arguments (`pd lb`): parsed once from the command line into one frozen dataclass.

The worker flags follow `sglang_router.launch_router`. PD mode (the default): `--prefill URL [BOOTSTRAP_PORT]`
(repeatable; BOOTSTRAP_PORT is a number or `none`) and `--decode URL` (repeatable). Regular mode, chosen by
giving `--worker-urls URL ...`: every request goes to one non-disaggregated instance. sglang-router's longer
flag names (`--health-check-interval-secs`, `--request-timeout-secs`, `--eviction-interval`) are accepted as
aliases, and `--pd-disaggregation` is accepted and ignored (the worker flags decide the mode), so a launch line
written for sglang-router runs unchanged. The cache_aware parameters (`--cache-threshold`,
`--balance-abs-threshold`, `--balance-rel-threshold`, `--eviction-interval-secs`, `--max-tree-size`) have
sglang-router's names and defaults. Every bad value or combination fails with an `LBArgsError` that names the
flag.
"""

from __future__ import annotations

import argparse
import urllib.parse
from collections.abc import Sequence
from dataclasses import dataclass

from pd.lb.cache_aware import CacheAwareConfig
from pd.lb.policies import POLICY_NAMES
from pd.server_args import API_KEY_ENV, LOG_LEVELS, ServerArgsError, resolve_api_key

# The prefill instances' bootstrap port when --prefill gives none (pd serve's and SGLang's default
# --disaggregation-bootstrap-port). sglang-router 0.3.2 sends null instead and lets the worker use its own
# default; an explicit `none` keeps that behaviour.
DEFAULT_BOOTSTRAP_PORT = 8998


# The cache_aware parameters: CacheAwareConfig field -> flag.
CACHE_AWARE_FLAGS = {
    "cache_threshold": "--cache-threshold",
    "balance_abs_threshold": "--balance-abs-threshold",
    "balance_rel_threshold": "--balance-rel-threshold",
    "eviction_interval_secs": "--eviction-interval-secs",
    "max_tree_size": "--max-tree-size",
}


class LBArgsError(ValueError):
    """A bad load-balancer flag; the message names the flag and says what to change."""


@dataclass(frozen=True)
class PrefillSpec:
    """One prefill instance: its HTTP base URL and the port of its KV bootstrap server (None: send null)."""

    url: str
    bootstrap_port: int | None = DEFAULT_BOOTSTRAP_PORT


@dataclass(frozen=True)
class LBArgs:
    """Everything `pd lb` is started with. In PD mode the per-side policies are resolved (never None); in regular
    mode (`worker_urls` given) they stay None and `policy` is the one policy."""

    prefill: tuple[PrefillSpec, ...] = ()
    decode: tuple[str, ...] = ()
    worker_urls: tuple[str, ...] = ()
    host: str = "127.0.0.1"
    port: int = 30000
    policy: str = "power_of_two"
    prefill_policy: str | None = None
    decode_policy: str | None = None
    cache_aware: CacheAwareConfig = CacheAwareConfig()
    health_check_interval: float = 5.0
    health_check_timeout: float = 5.0
    health_failure_threshold: int = 3
    request_timeout: float = 1800.0
    api_key: str | None = None
    log_level: str = "info"

    def __post_init__(self) -> None:
        # Frozen: the per-side policies are resolved through object.__setattr__ (idempotent, so
        # dataclasses.replace stays consistent).
        if self.pd_mode:
            object.__setattr__(self, "prefill_policy", self.prefill_policy or self.policy)
            object.__setattr__(self, "decode_policy", self.decode_policy or self.policy)
        _validate(self)

    @property
    def pd_mode(self) -> bool:
        """PD mode (prefill and decode instances) unless regular instances were given."""
        return not self.worker_urls

    @property
    def role_policies(self) -> dict[str, str]:
        """The policy of each kind of instance: prefill and decode in PD mode, regular otherwise."""
        if not self.pd_mode:
            return {"regular": self.policy}
        assert self.prefill_policy is not None and self.decode_policy is not None
        return {"prefill": self.prefill_policy, "decode": self.decode_policy}

    @property
    def uses_cache_aware(self) -> bool:
        return "cache_aware" in self.role_policies.values()

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
        parser.add_argument(
            "--worker-urls", nargs="+", action="extend", default=[], metavar="URL",
            help="regular mode: non-disaggregated instances (pd serve without --disaggregation-mode); each request"
            " goes to one of them. Not with --prefill/--decode",
        )  # fmt: skip
        parser.add_argument("--host", default="127.0.0.1", help="listen address (default: 127.0.0.1)")
        parser.add_argument("--port", type=int, default=30000, help="HTTP port (default: 30000)")
        parser.add_argument(
            "--policy",
            choices=policies,
            default="power_of_two",
            help="instance choice: both sides in PD mode, the instances in regular mode (default: %(default)s)",
        )
        parser.add_argument("--prefill-policy", choices=policies, help="override --policy for prefill instances")
        parser.add_argument("--decode-policy", choices=policies, help="override --policy for decode instances")
        # None: not given (the default applies), so a cache_aware flag without a cache_aware policy is an error.
        d = CacheAwareConfig()
        parser.add_argument(
            "--cache-threshold", type=float,
            help=f"cache_aware: route by prefix match when the best instance's match covers more than this fraction"
            f" of the request text, else to the instance with the smallest tree (0-1; default: {d.cache_threshold})",
        )  # fmt: skip
        parser.add_argument(
            "--balance-abs-threshold", type=int,
            help="cache_aware: load is imbalanced, and the least-loaded instance is chosen, when max - min requests in"
            f" flight exceeds this and max > --balance-rel-threshold * min (default: {d.balance_abs_threshold})",
        )  # fmt: skip
        parser.add_argument(
            "--balance-rel-threshold", type=float,
            help=f"cache_aware: see --balance-abs-threshold (>= 1; default: {d.balance_rel_threshold})",
        )  # fmt: skip
        parser.add_argument(
            "--eviction-interval-secs", "--eviction-interval", type=float,
            help=f"cache_aware: seconds between trims of each instance's tree to --max-tree-size"
            f" (default: {d.eviction_interval_secs:g})",
        )  # fmt: skip
        parser.add_argument(
            "--max-tree-size", type=int,
            help=f"cache_aware: characters of request text kept per instance, least recently used dropped first"
            f" (default: 2**26 = {d.max_tree_size})",
        )  # fmt: skip
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
        given = {name: getattr(ns, name) for name in CACHE_AWARE_FLAGS if getattr(ns, name, None) is not None}
        args = cls(
            prefill=tuple(parse_prefill(item) for item in ns.prefill),
            decode=tuple(normalize_url(u, "--decode") for u in ns.decode),
            worker_urls=tuple(normalize_url(u, "--worker-urls") for u in getattr(ns, "worker_urls", [])),
            host=ns.host,
            port=ns.port,
            policy=ns.policy,
            prefill_policy=ns.prefill_policy,
            decode_policy=ns.decode_policy,
            cache_aware=CacheAwareConfig(**given),
            health_check_interval=ns.health_check_interval,
            health_check_timeout=ns.health_check_timeout,
            health_failure_threshold=ns.health_failure_threshold,
            request_timeout=ns.request_timeout,
            api_key=api_key,
            log_level=ns.log_level,
        )
        if given and not args.uses_cache_aware:
            flags = ", ".join(CACHE_AWARE_FLAGS[name] for name in given)
            raise LBArgsError(f"{flags} only apply to the cache_aware policy; add --policy cache_aware (or"
                              " --prefill-policy/--decode-policy cache_aware in PD mode), or drop them")  # fmt: skip
        return args

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

    if not a.pd_mode:
        need(not a.prefill and not a.decode, "--worker-urls (regular mode) cannot be combined with --prefill/--decode"
             " (PD mode); start one balancer per mode")  # fmt: skip
        need(a.prefill_policy is None and a.decode_policy is None,
             "--prefill-policy/--decode-policy apply to PD mode; with --worker-urls give --policy")  # fmt: skip
    for name, flag in (
        ("policy", "--policy"),
        ("prefill_policy", "--prefill-policy"),
        ("decode_policy", "--decode-policy"),
    ):
        value = getattr(a, name)
        need(value is None or value in POLICY_NAMES, f"{flag} must be one of {sorted(POLICY_NAMES)}, got {value!r}")
    c = a.cache_aware
    need(0.0 <= c.cache_threshold <= 1.0, f"--cache-threshold must be in [0, 1], got {c.cache_threshold}")
    need(c.balance_abs_threshold >= 0, f"--balance-abs-threshold must be >= 0 requests, got {c.balance_abs_threshold}")
    need(c.balance_rel_threshold >= 1.0, f"--balance-rel-threshold must be >= 1.0, got {c.balance_rel_threshold}")
    need(c.eviction_interval_secs > 0, f"--eviction-interval-secs must be > 0 seconds, got {c.eviction_interval_secs}")
    need(c.max_tree_size >= 1, f"--max-tree-size must be >= 1 characters, got {c.max_tree_size}")
    urls = [p.url for p in a.prefill] + list(a.decode) + list(a.worker_urls)
    dup = sorted({u for u in urls if urls.count(u) > 1})
    need(not dup, f"worker URL(s) given more than once: {', '.join(dup)}; each instance is one --prefill, --decode"
         " or --worker-urls entry")  # fmt: skip
    need(0 < a.port < 65536, f"--port must be 1-65535, got {a.port}")
    need(a.health_check_interval > 0, f"--health-check-interval must be > 0 seconds, got {a.health_check_interval}")
    need(a.health_check_timeout > 0, f"--health-check-timeout must be > 0 seconds, got {a.health_check_timeout}")
    need(a.health_failure_threshold >= 1, f"--health-failure-threshold must be >= 1, got {a.health_failure_threshold}")
    need(a.request_timeout > 0, f"--request-timeout must be > 0 seconds, got {a.request_timeout}")
    need(a.api_key is None or a.api_key != "", "--api-key must not be empty")
    need(a.log_level in LOG_LEVELS, f"--log-level must be one of {list(LOG_LEVELS)}, got {a.log_level!r}")
