"""`pd bench` settings: one frozen dataclass, its flags, and every check done once at parse time.

Kept free of heavy imports (httpx, numpy, tqdm) so that building the `pd` parser stays cheap.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
from dataclasses import dataclass
from typing import Any

BACKENDS = ("native", "openai")
DATASETS = ("random-ids", "random-text")


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


@dataclass(frozen=True)
class BenchArgs:
    """One benchmark run. request_rate: requests/s with Poisson arrivals, math.inf for all at once.
    max_concurrency: at most this many requests in flight (None: no limit). Length ranges are closed."""

    base_url: str
    num_prompts: int = 100
    request_rate: float = math.inf
    max_concurrency: int | None = None
    input_len_range: tuple[int, int] = (128, 512)
    output_len_range: tuple[int, int] = (32, 128)
    seed: int = 0
    backend: str = "native"
    dataset: str = "random-ids"
    vocab_size: int | None = None
    model: str | None = None
    api_key: str | None = None
    warmup_requests: int = 1
    output_json: str | None = None
    disable_progress: bool = False
    timeout_s: float = 3600.0

    def __post_init__(self) -> None:
        if not self.base_url.startswith(("http://", "https://")):
            raise BenchArgsError(f"--base-url must start with http:// or https://, got {self.base_url!r}")
        if self.num_prompts < 1:
            raise BenchArgsError(f"--num-prompts must be >= 1, got {self.num_prompts}")
        if math.isnan(self.request_rate) or self.request_rate <= 0:
            raise BenchArgsError(f"--request-rate must be a positive number or 'inf', got {self.request_rate}")
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
        if self.vocab_size is not None and self.vocab_size < 1:
            raise BenchArgsError(f"--vocab-size must be >= 1, got {self.vocab_size}")
        if self.warmup_requests < 0:
            raise BenchArgsError(f"--warmup-requests must be >= 0, got {self.warmup_requests}")
        if self.timeout_s <= 0:
            raise BenchArgsError(f"--timeout must be > 0 seconds, got {self.timeout_s}")

    @staticmethod
    def add_cli_args(parser: argparse.ArgumentParser) -> None:
        """Add the `pd bench` flags to `parser` (values are checked by from_namespace)."""
        d = BenchArgs.__dataclass_fields__
        add = parser.add_argument
        add("--base-url", required=True, help="server, load balancer or router to benchmark, e.g. http://host:port")
        add("--num-prompts", type=int, default=d["num_prompts"].default, help="requests in the timed run")
        add("--request-rate", default="inf", help="requests/s with Poisson arrivals, or inf (default: all at once)")
        add("--max-concurrency", type=int, default=None, help="at most this many requests in flight (default: none)")
        add("--input-len-range", type=int, nargs=2, metavar=("A", "B"), default=list(d["input_len_range"].default),
            help="prompt length in tokens, uniform over [A, B]")  # fmt: skip
        add("--output-len-range", type=int, nargs=2, metavar=("A", "B"), default=list(d["output_len_range"].default),
            help="output length (max_new_tokens, with ignore_eos), uniform over [A, B]")  # fmt: skip
        add("--seed", type=int, default=0, help="seeds the prompts, lengths and arrival times")
        add("--backend", choices=BACKENDS, default="native", help="native: /generate; openai: /v1/completions")
        add("--dataset", choices=DATASETS, default="random-ids",
            help="random-ids: token ids; random-text: random words (lengths in words)")  # fmt: skip
        add("--vocab-size", type=int, default=None,
            help="token id bound for random-ids (default: the server's /model_info vocab_size)")  # fmt: skip
        add("--model", default=None, help="`model` field of OpenAI requests (default: not sent)")
        add("--api-key", default=None, help="sent as 'Authorization: Bearer KEY'")
        add("--warmup-requests", type=int, default=1, help="untimed requests sent before the run")
        add("--output-json", default=None, metavar="FILE", help="write the full report as JSON to FILE")
        add("--disable-progress", action="store_true", help="no progress bar")
        add("--timeout", type=float, default=d["timeout_s"].default, help="per-request timeout in seconds")

    @classmethod
    def from_namespace(cls, ns: argparse.Namespace) -> BenchArgs:
        """Build from parsed flags; raises BenchArgsError with the flag to fix."""
        return cls(
            base_url=ns.base_url,
            num_prompts=ns.num_prompts,
            request_rate=parse_rate(ns.request_rate),
            max_concurrency=ns.max_concurrency,
            input_len_range=(ns.input_len_range[0], ns.input_len_range[1]),
            output_len_range=(ns.output_len_range[0], ns.output_len_range[1]),
            seed=ns.seed,
            backend=ns.backend,
            dataset=ns.dataset,
            vocab_size=ns.vocab_size,
            model=ns.model,
            api_key=ns.api_key,
            warmup_requests=ns.warmup_requests,
            output_json=ns.output_json,
            disable_progress=ns.disable_progress,
            timeout_s=ns.timeout,
        )

    def to_config(self, **resolved: Any) -> dict[str, Any]:
        """The settings for the report, without the API key; `resolved` adds values found at run time."""
        config = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "api_key"}
        config["input_len_range"] = list(self.input_len_range)
        config["output_len_range"] = list(self.output_len_range)
        return {**config, **resolved}
