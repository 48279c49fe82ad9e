"""Benchmark results: latency percentiles, throughput, goodput, error counts; a printed table and a JSON document.

Latencies are reported in milliseconds. TTFT, E2E and TPOT are one value per successful request; ITL pools
every inter-token latency of every successful request (so long outputs weigh more, as in SGLang's report).
Throughputs divide by the benchmark's wall time (first send to last completion, warm-up excluded).
"""

from __future__ import annotations

import json
import math
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict
from typing import Any

import numpy as np

from pd.bench.args import BASE_PERCENTILES, percentile_key
from pd.bench.client import RequestOutput
from pd.bench.goodput import meets_slos, tpot_s

PERCENTILES = BASE_PERCENTILES
JSON_SCHEMA_VERSION = 1
# Per-request fields left out of the JSON: the ITL list and the answer would dwarf the rest, and start_time is
# a perf_counter reading, meaningless outside the run (sent_at_s replaces it).
_NOT_IN_JSON = ("itl", "start_time", "generated_text")


def latency_stats(values_s: list[float], percentiles: Sequence[float] = PERCENTILES) -> dict[str, float | None]:
    """mean, std and each percentile (keys "p50", "p99.9", ...) in milliseconds of `values_s` (seconds); all
    None for an empty list."""
    keys = ["mean", "std", *(percentile_key(p) for p in percentiles)]
    if not values_s:
        return dict.fromkeys(keys, None)
    ms = np.asarray(values_s, dtype=np.float64) * 1000.0
    stats = {"mean": float(ms.mean()), "std": float(ms.std())}
    values = np.percentile(ms, percentiles)
    stats.update({percentile_key(p): float(v) for p, v in zip(percentiles, values, strict=True)})
    return stats


def compute_metrics(
    outputs: list[RequestOutput],
    duration_s: float,
    percentiles: Sequence[float] = PERCENTILES,
    slos: tuple[tuple[str, float], ...] = (),
) -> dict[str, Any]:
    """Aggregate metrics of one run.

    outputs: one per request (failed ones included, counted in `failed`). duration_s: the run's wall time, > 0.
    slos: (name, ms) pairs of goodput.SLO_NAMES; request_goodput is None without any.
    """
    assert duration_s > 0, "a run takes time"
    ok = [o for o in outputs if o.success]
    in_tokens = sum(o.prompt_len for o in ok)
    out_tokens = sum(o.output_tokens for o in ok)
    cached_tokens = sum(o.cached_tokens for o in ok)
    return {
        "completed": len(ok),
        "failed": len(outputs) - len(ok),
        "duration_s": duration_s,
        "total_input_tokens": in_tokens,
        "total_output_tokens": out_tokens,
        # Prompt tokens the servers' prefix caches served, as they report them, and their share of the prompts.
        "total_cached_tokens": cached_tokens,
        "cache_hit_rate": cached_tokens / in_tokens if in_tokens else 0.0,
        "request_throughput": len(ok) / duration_s,
        "input_token_throughput": in_tokens / duration_s,
        "output_token_throughput": out_tokens / duration_s,
        "total_token_throughput": (in_tokens + out_tokens) / duration_s,
        # Requests per second that met every SLO (vLLM's goodput).
        "request_goodput": sum(meets_slos(o, slos) for o in ok) / duration_s if slos else None,
        # Average number of requests in flight (Little's law over successful requests).
        "mean_concurrency": sum(o.latency for o in ok) / duration_s,
        "ttft_ms": latency_stats([o.ttft for o in ok], percentiles),
        "itl_ms": latency_stats([x for o in ok for x in o.itl], percentiles),
        # TPOT is undefined for one-token outputs.
        "tpot_ms": latency_stats([tpot_s(o) for o in ok if o.output_tokens > 1], percentiles),
        "e2e_ms": latency_stats([o.latency for o in ok], percentiles),
    }


def error_counts(outputs: list[RequestOutput]) -> dict[str, int]:
    """How often each distinct error message occurred, most frequent first."""
    return dict(Counter(o.error for o in outputs if not o.success).most_common())


def build_report(
    config: dict[str, Any],
    outputs: list[RequestOutput],
    duration_s: float,
    start_time: float | None = None,
    percentiles: Sequence[float] = PERCENTILES,
    slos: tuple[tuple[str, float], ...] = (),
) -> dict[str, Any]:
    """The JSON document: {schema_version, config, metrics, errors, requests}.

    config: the run's settings (an infinite request rate is written as the string "inf"; JSON has no inf).
    requests: one entry per request in dataset order, without its ITL list; with the run's perf_counter
    start_time, each also has sent_at_s, when it was sent (seconds after the start).
    """
    clean = {k: ("inf" if isinstance(v, float) and math.isinf(v) else v) for k, v in config.items()}
    per_request = []
    for o in outputs:
        entry = {k: v for k, v in asdict(o).items() if k not in _NOT_IN_JSON}
        if start_time is not None:
            entry["sent_at_s"] = o.start_time - start_time if o.start_time else None  # None: never sent
        per_request.append(entry)
    return {
        "schema_version": JSON_SCHEMA_VERSION,
        "config": clean,
        "metrics": compute_metrics(outputs, duration_s, percentiles, slos),
        "errors": error_counts(outputs),
        "requests": per_request,
    }


def write_json(report: dict[str, Any], path: str) -> None:
    with open(path, "w") as f:
        json.dump(report, f, indent=2)
        f.write("\n")


def _fmt(v: float | int | str | None) -> str:
    if v is None:
        return "n/a"
    if isinstance(v, str):
        return v
    return f"{v:.2f}" if isinstance(v, float) else str(v)


def format_table(report: dict[str, Any]) -> str:
    """A fixed-width, human-readable summary of `report` (as returned by build_report): the percentiles its
    config asked for (all in the report without one)."""
    m, cfg = report["metrics"], report["config"]
    rows: list[tuple[str, Any]] = [
        ("Backend", cfg.get("backend")),
        ("Request rate (req/s)", cfg.get("request_rate")),
        ("Max concurrency", cfg.get("max_concurrency") or "none"),
        ("Successful requests", m["completed"]),
        ("Failed requests", m["failed"]),
        ("Duration (s)", m["duration_s"]),
        ("Total input tokens", m["total_input_tokens"]),
        ("Total output tokens", m["total_output_tokens"]),
        ("Cached prompt tokens", m.get("total_cached_tokens")),
        ("Prefix cache hit rate", m.get("cache_hit_rate")),
        ("Request throughput (req/s)", m["request_throughput"]),
        ("Output token throughput (tok/s)", m["output_token_throughput"]),
        ("Total token throughput (tok/s)", m["total_token_throughput"]),
        ("Mean concurrency", m["mean_concurrency"]),
    ]
    if m.get("request_goodput") is not None:
        slos = " ".join(f"{name}:{ms:g}" for name, ms in cfg.get("goodput", {}).items())
        rows += [("Goodput SLOs (ms)", slos), ("Request goodput (req/s)", m["request_goodput"])]
    wanted = cfg.get("percentiles")
    keys = [percentile_key(p) for p in wanted] if wanted else [k for k in m["ttft_ms"] if k.startswith("p")]
    for key, title in (("ttft_ms", "TTFT"), ("itl_ms", "ITL"), ("tpot_ms", "TPOT"), ("e2e_ms", "E2E latency")):
        rows += [(f"{title} {stat} (ms)", m[key].get(stat)) for stat in ("mean", *keys)]
    width = 50
    lines = ["{:=^{w}}".format(" Serving Benchmark Result ", w=width)]
    lines += [f"{name:<34}{_fmt(value):>16}" for name, value in rows]
    for message, count in list(report["errors"].items())[:5]:
        lines.append(f"error x{count}: {message[:120]}")
    lines.append("=" * width)
    return "\n".join(lines)
