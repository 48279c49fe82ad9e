"""Goodput: the rate of requests that met every latency SLO (vLLM's `--goodput ttft:X tpot:Y e2el:Z`, in ms).

Kept free of numpy and httpx: args.py parses the flag with it while the `pd` parser is built.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from pd.bench.client import RequestOutput

# ttft: time to first token; tpot: time per output token after the first; e2el: end-to-end latency.
SLO_NAMES = ("ttft", "tpot", "e2el")


def parse_goodput(items: list[str]) -> tuple[tuple[str, float], ...]:
    """["ttft:500", "e2el:2000"] -> (("ttft", 500.0), ("e2el", 2000.0)); raises ValueError saying what is wrong."""
    slos: dict[str, float] = {}
    for item in items:
        name, sep, value = item.partition(":")
        if not sep or name not in SLO_NAMES:
            raise ValueError(f"--goodput takes NAME:MS with NAME one of {', '.join(SLO_NAMES)}, got {item!r}")
        try:
            ms = float(value)
        except ValueError:
            raise ValueError(f"--goodput {name}: needs a number of milliseconds, got {value!r}") from None
        if not ms > 0 or ms == float("inf"):
            raise ValueError(f"--goodput {name}: must be a positive number of milliseconds, got {value!r}")
        if name in slos:
            raise ValueError(f"--goodput names {name} twice")
        slos[name] = ms
    return tuple(slos.items())


def tpot_s(out: RequestOutput) -> float:
    """Time per output token after the first, seconds; 0.0 for a one-token output (it has no such time)."""
    return (out.latency - out.ttft) / (out.output_tokens - 1) if out.output_tokens > 1 else 0.0


def meets_slos(out: RequestOutput, slos: tuple[tuple[str, float], ...]) -> bool:
    """A successful request whose every named latency is at most its SLO (ms; equal counts as met)."""
    if not out.success:
        return False
    measured_s = {"ttft": out.ttft, "tpot": tpot_s(out), "e2el": out.latency}
    return all(measured_s[name] * 1000.0 <= ms for name, ms in slos)
