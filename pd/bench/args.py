"""`pd bench` settings: one frozen dataclass, its flags, and every check done once at parse time.

Kept free of heavy imports (httpx, numpy, tqdm, matplotlib) so that building the `pd` parser stays cheap.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
from dataclasses import dataclass
from typing import Any

from pd.bench.goodput import SLO_NAMES, parse_goodput

BACKENDS = ("native", "openai", "chat")
DATASETS = ("random-ids", "random-text", "python-docs", "multi-turn")
# Datasets of text, which a chat message can carry (random-ids is token ids).
TEXT_DATASETS = ("random-text", "python-docs", "multi-turn")
# Always in the JSON, whatever --percentiles asks for: the fields earlier reports had.
BASE_PERCENTILES = (50.0, 90.0, 99.0)


class BenchArgsError(ValueError):
    """A bad `pd bench` flag or combination; the message says what to change."""


def parse_rate(text: str) -> float:
    """A request rate in requests/s: a positive number or "inf" (send everything at once)."""
    try:
        rate = float(text)
    except ValueError:
        raise BenchArgsError(f"--request-rate must be a positive number or 'inf', got {text!r}") from None
    if math.isnan(rate) or rate <= 0:
        raise BenchArgsError(f"--request-rate must be a positive number or 'inf', got {text!r}")
    return rate


def parse_percentiles(text: str) -> tuple[float, ...]:
    """ "50,90,95,99" -> (50.0, 90.0, 95.0, 99.0)."""
    try:
        return tuple(float(p) for p in text.split(","))
    except ValueError:
        raise BenchArgsError(f"--percentiles takes comma-separated numbers such as 50,90,99, got {text!r}") from None


def percentile_key(p: float) -> str:
    """The report's name of percentile p: 95.0 -> "p95", 99.9 -> "p99.9"."""
    return f"p{p:g}"


@dataclass(frozen=True)
class BenchArgs:
    """One benchmark run. request_rate: requests/s (conversations/s for multi-turn), math.inf for all at once;
    arrival gaps are gamma-distributed with shape `burstiness` (1.0: Poisson). max_concurrency: at most this many
    requests in flight (None: no limit). Length ranges are closed. percentiles: reported on top of
    BASE_PERCENTILES. goodput: (SLO name, milliseconds) pairs, empty for none."""

    base_url: str = "http://127.0.0.1:30000"
    num_prompts: int = 100
    request_rate: float = math.inf
    burstiness: float = 1.0
    max_concurrency: int | None = None
    input_len_range: tuple[int, int] = (128, 512)
    output_len_range: tuple[int, int] = (32, 128)
    seed: int = 0
    backend: str = "native"
    dataset: str = "random-ids"
    num_turns: int = 3
    vocab_size: int | None = None
    model: str | None = None
    api_key: str | None = None
    disable_stream: bool = False
    disable_ignore_eos: bool = False
    warmup_requests: int = 1
    percentiles: tuple[float, ...] = (50.0, 90.0, 95.0, 99.0)
    goodput: tuple[tuple[str, float], ...] = ()
    output_json: str | None = None
    plot_dir: str | None = None
    disable_progress: bool = False
    timeout_s: float = 3600.0
    profile: bool = False
    profile_output_dir: str | None = None

    def __post_init__(self) -> None:
        if not self.base_url.startswith(("http://", "https://")):
            raise BenchArgsError(f"--base-url must start with http:// or https://, got {self.base_url!r}")
        if self.num_prompts < 1:
            raise BenchArgsError(f"--num-prompts must be >= 1, got {self.num_prompts}")
        if math.isnan(self.request_rate) or self.request_rate <= 0:
            raise BenchArgsError(f"--request-rate must be a positive number or 'inf', got {self.request_rate}")
        if not 0 < self.burstiness < math.inf:
            raise BenchArgsError(f"--burstiness must be a positive number (1.0: Poisson), got {self.burstiness}")
        if self.max_concurrency is not None and self.max_concurrency < 1:
            raise BenchArgsError(f"--max-concurrency must be >= 1, got {self.max_concurrency}")
        for flag, (lo, hi) in (("--input-len-range", self.input_len_range),
                               ("--output-len-range", self.output_len_range)):  # fmt: skip
            if not 1 <= lo <= hi:
                raise BenchArgsError(f"{flag} A B needs 1 <= A <= B, got {lo} {hi}")
        if self.backend not in BACKENDS:
            raise BenchArgsError(f"--backend must be one of {', '.join(BACKENDS)}, got {self.backend!r}")
        if self.dataset not in DATASETS:
            raise BenchArgsError(f"--dataset must be one of {', '.join(DATASETS)}, got {self.dataset!r}")
        if self.backend == "chat" and self.dataset not in TEXT_DATASETS:
            raise BenchArgsError(f"--backend chat sends text; use --dataset {' or '.join(TEXT_DATASETS)}")
        if self.dataset == "multi-turn" and self.backend != "chat":
            raise BenchArgsError("--dataset multi-turn sends conversations; use it with --backend chat")
        if self.num_turns < 1:
            raise BenchArgsError(f"--num-turns must be >= 1, got {self.num_turns}")
        if self.vocab_size is not None and self.vocab_size < 1:
            raise BenchArgsError(f"--vocab-size must be >= 1, got {self.vocab_size}")
        if self.warmup_requests < 0:
            raise BenchArgsError(f"--warmup-requests must be >= 0, got {self.warmup_requests}")
        if not self.percentiles or not all(0 <= p <= 100 for p in self.percentiles):
            raise BenchArgsError(f"--percentiles must be numbers in [0, 100], got {list(self.percentiles)}")
        if not all(name in SLO_NAMES and ms > 0 for name, ms in self.goodput):
            raise BenchArgsError(f"--goodput takes NAME:MS with NAME in {', '.join(SLO_NAMES)}, got {self.goodput}")
        if self.timeout_s <= 0:
            raise BenchArgsError(f"--timeout must be > 0 seconds, got {self.timeout_s}")

    @property
    def report_percentiles(self) -> tuple[float, ...]:
        """The percentiles in the JSON: BASE_PERCENTILES and the requested ones, ascending, once each."""
        return tuple(sorted({*BASE_PERCENTILES, *self.percentiles}))

    @staticmethod
    def add_cli_args(parser: argparse.ArgumentParser) -> None:
        """Add the `pd bench` flags to `parser` (values are checked by from_namespace)."""
        d = {f.name: f.default for f in dataclasses.fields(BenchArgs)}
        add = parser.add_argument
        add(
            "--base-url",
            default=d["base_url"],
            help="server, load balancer or router to benchmark (default: %(default)s, where pd up listens)",
        )
        add(
            "--num-prompts",
            type=int,
            default=d["num_prompts"],
            help="requests in the timed run; conversations for multi-turn (default: %(default)s)",
        )
        add(
            "--request-rate",
            default="inf",
            help="requests/s (conversations/s for multi-turn), or inf: all at once (default: %(default)s)",
        )
        add(
            "--burstiness",
            type=float,
            default=d["burstiness"],
            help="shape of the gamma-distributed gaps between arrivals: 1 is Poisson, smaller is burstier, "
            "larger is more regular; the mean rate stays --request-rate (default: %(default)s)",
        )
        add(
            "--max-concurrency", type=int, default=None, help="at most this many requests in flight (default: no limit)"
        )
        add(
            "--input-len-range",
            type=int,
            nargs=2,
            metavar=("A", "B"),
            default=list(d["input_len_range"]),
            help="prompt length, uniform over [A, B]: tokens for random-ids, words for the text datasets, "
            "words per user turn for multi-turn (default: %(default)s)",
        )
        add(
            "--output-len-range",
            type=int,
            nargs=2,
            metavar=("A", "B"),
            default=list(d["output_len_range"]),
            help="output length (max_new_tokens), uniform over [A, B] (default: %(default)s)",
        )
        add(
            "--seed",
            type=int,
            default=d["seed"],
            help="seeds the prompts, lengths and arrival times (default: %(default)s)",
        )
        add(
            "--backend",
            choices=BACKENDS,
            default=d["backend"],
            help="native: /generate; openai: /v1/completions; chat: /v1/chat/completions (default: %(default)s)",
        )
        add(
            "--dataset",
            choices=DATASETS,
            default=d["dataset"],
            help="random-ids: token ids; random-text: random common words; python-docs: passages of the Python "
            "documentation that ships with the interpreter; multi-turn: conversations of python-docs "
            "passages, each turn sent with the earlier turns and answers (needs --backend chat) "
            "(default: %(default)s)",
        )
        add(
            "--num-turns",
            type=int,
            default=d["num_turns"],
            help="user turns per conversation of the multi-turn dataset (default: %(default)s)",
        )
        add(
            "--vocab-size",
            type=int,
            default=None,
            help="token id bound for random-ids (default: the server's /model_info vocab_size)",
        )
        add("--model", default=None, help="`model` field of OpenAI requests (default: not sent)")
        add("--api-key", default=None, help="sent as 'Authorization: Bearer KEY' (default: none)")
        add(
            "--disable-stream",
            action="store_true",
            help="ask for whole responses: TTFT then equals E2E latency, and ITL/TPOT mean nothing",
        )
        add(
            "--disable-ignore-eos",
            action="store_true",
            help="do not send ignore_eos: outputs may stop before their length at EOS",
        )
        add(
            "--warmup-requests",
            type=int,
            default=d["warmup_requests"],
            help="untimed requests sent before the run (default: %(default)s)",
        )
        add(
            "--percentiles",
            default=",".join(f"{p:g}" for p in d["percentiles"]),
            help="latency percentiles to report, comma-separated; the JSON always has "
            f"{', '.join(percentile_key(p) for p in BASE_PERCENTILES)} (default: %(default)s)",
        )
        add(
            "--goodput",
            nargs="+",
            default=[],
            metavar="NAME:MS",
            help=f"latency SLOs in ms, NAME one of {', '.join(SLO_NAMES)} (e.g. ttft:500 tpot:50); reports the "
            "requests/s that met all of them (default: not reported)",
        )
        add(
            "--output-json",
            default=None,
            metavar="FILE",
            help="write the full report as JSON to FILE (default: not written)",
        )
        add(
            "--plot",
            dest="plot_dir",
            default=None,
            metavar="DIR",
            help="write latency CDFs and throughput over time as PNG files, and the JSON report, into DIR "
            "(needs matplotlib; default: no plots)",
        )
        add("--disable-progress", action="store_true", help="no progress bar")
        add(
            "--timeout",
            type=float,
            default=d["timeout_s"],
            help="per-request timeout in seconds (default: %(default)s)",
        )
        add(
            "--profile",
            action="store_true",
            help="profile the server over the timed run (its /start_profile and /stop_profile, as SGLang's "
            "bench_serving --profile); the traces' paths are printed and in the JSON",
        )
        add(
            "--profile-output-dir",
            default=None,
            metavar="DIR",
            help="where the server writes the traces (default: the server's, $SGLANG_TORCH_PROFILER_DIR or /tmp)",
        )

    @classmethod
    def from_namespace(cls, ns: argparse.Namespace) -> BenchArgs:
        """Build from parsed flags; raises BenchArgsError with the flag to fix."""
        try:
            goodput = parse_goodput(ns.goodput)
        except ValueError as e:
            raise BenchArgsError(str(e)) from None
        return cls(
            base_url=ns.base_url,
            num_prompts=ns.num_prompts,
            request_rate=parse_rate(ns.request_rate),
            burstiness=ns.burstiness,
            max_concurrency=ns.max_concurrency,
            input_len_range=(ns.input_len_range[0], ns.input_len_range[1]),
            output_len_range=(ns.output_len_range[0], ns.output_len_range[1]),
            seed=ns.seed,
            backend=ns.backend,
            dataset=ns.dataset,
            num_turns=ns.num_turns,
            vocab_size=ns.vocab_size,
            model=ns.model,
            api_key=ns.api_key,
            disable_stream=ns.disable_stream,
            disable_ignore_eos=ns.disable_ignore_eos,
            warmup_requests=ns.warmup_requests,
            percentiles=parse_percentiles(ns.percentiles),
            goodput=goodput,
            output_json=ns.output_json,
            plot_dir=ns.plot_dir,
            disable_progress=ns.disable_progress,
            timeout_s=ns.timeout,
            profile=ns.profile,
            profile_output_dir=ns.profile_output_dir,
        )

    def to_config(self, **resolved: Any) -> dict[str, Any]:
        """The settings for the report, without the API key; `resolved` adds values found at run time."""
        config = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "api_key"}
        config["input_len_range"] = list(self.input_len_range)
        config["output_len_range"] = list(self.output_len_range)
        config["percentiles"] = list(self.percentiles)
        config["goodput"] = dict(self.goodput)
        return {**config, **resolved}
