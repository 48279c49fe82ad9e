"""`pd bench --plot DIR`: latency CDFs and throughput over time, as PNG files.

matplotlib is optional (the project's `bench` extra) and imported only here, when plots are asked for. Figures
are drawn on their own Agg canvas, without pyplot: no display is needed and no process-wide backend is switched.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np

from pd.bench.client import RequestOutput
from pd.bench.goodput import tpot_s

LATENCY_FILE = "latency_cdf.png"
THROUGHPUT_FILE = "throughput.png"
TIME_BINS = 50


class PlotsUnavailableError(RuntimeError):
    """matplotlib is not installed."""


def require_matplotlib() -> None:
    """Raises PlotsUnavailableError, saying what to install, when matplotlib cannot be imported."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise PlotsUnavailableError(
            "--plot needs matplotlib: pip install matplotlib (or the bench extra: pip install 'pd-serve[bench]')"
        ) from None


def _figure(width_in: float, height_in: float) -> Any:
    require_matplotlib()
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width_in, height_in), layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def token_times(outputs: list[RequestOutput], start_time: float) -> np.ndarray:
    """When each output token of each successful request arrived, float64 [tokens], seconds after start_time.

    Tokens beyond the timed ones (a non-streamed answer, or tokens that came with the first event) are placed
    at the last timed arrival of their request.
    """
    times = []
    for o in outputs:
        if not o.success:
            continue
        timed = o.start_time - start_time + o.ttft + np.concatenate(([0.0], np.cumsum(o.itl)))
        times += [timed, np.full(max(o.output_tokens - len(timed), 0), timed[-1])]
    return np.concatenate(times) if times else np.zeros(0)


def _cdf(ax: Any, values_ms: list[float], title: str) -> None:
    ax.set_title(title)
    ax.set_xlabel("ms")
    ax.set_ylabel("fraction of values <= x")
    if not values_ms:
        ax.text(0.5, 0.5, "no data", ha="center", va="center", transform=ax.transAxes)
        return
    xs = np.sort(values_ms)
    ax.step(xs, np.arange(1, len(xs) + 1) / len(xs), where="post")
    for p in (50, 99):
        ax.axvline(np.percentile(xs, p), linestyle=":", color="gray")
    ax.set_ylim(0, 1.02)
    ax.grid(alpha=0.3)


def write_latency_cdfs(outputs: list[RequestOutput], path: str) -> None:
    """One panel per latency (TTFT, ITL, TPOT, E2E) of the successful requests: its empirical CDF, with p50 and
    p99 marked."""
    ok = [o for o in outputs if o.success]
    fig = _figure(10, 7)
    axes = fig.subplots(2, 2).ravel()
    _cdf(axes[0], [o.ttft * 1e3 for o in ok], "TTFT")
    _cdf(axes[1], [x * 1e3 for o in ok for x in o.itl], "ITL")
    _cdf(axes[2], [tpot_s(o) * 1e3 for o in ok if o.output_tokens > 1], "TPOT")
    _cdf(axes[3], [o.latency * 1e3 for o in ok], "E2E latency")
    fig.savefig(path, dpi=100)


def write_throughput(outputs: list[RequestOutput], start_time: float, duration_s: float, path: str) -> None:
    """Output tokens/s in TIME_BINS equal slices of the run, and the requests in flight over time."""
    fig = _figure(10, 6)
    top, bottom = fig.subplots(2, 1, sharex=True)
    edges = np.linspace(0.0, duration_s, TIME_BINS + 1)
    counts, _ = np.histogram(token_times(outputs, start_time), bins=edges)
    top.stairs(counts / (duration_s / TIME_BINS), edges, fill=True, alpha=0.6)
    top.set_ylabel("output tokens/s")
    top.set_title("Throughput over time")
    top.grid(alpha=0.3)
    sent = [o.start_time - start_time for o in outputs if o.start_time]
    done = [o.start_time - start_time + o.latency for o in outputs if o.start_time]
    # +1 at each send, -1 at each end, in time order.
    times = np.concatenate(([0.0], sent, done))
    steps = np.concatenate(([0], np.ones(len(sent)), -np.ones(len(done))))
    order = np.argsort(times, kind="stable")
    bottom.step(times[order], np.cumsum(steps[order]), where="post")
    bottom.set_ylabel("requests in flight")
    bottom.set_xlabel("seconds since the start")
    bottom.grid(alpha=0.3)
    fig.savefig(path, dpi=100)


def write_plots(outputs: list[RequestOutput], start_time: float, duration_s: float, out_dir: str) -> list[str]:
    """Write LATENCY_FILE and THROUGHPUT_FILE into `out_dir` (which must exist); returns their paths.

    start_time: the run's perf_counter start; duration_s: its wall time (> 0).
    """
    latency_path, throughput_path = os.path.join(out_dir, LATENCY_FILE), os.path.join(out_dir, THROUGHPUT_FILE)
    write_latency_cdfs(outputs, latency_path)
    write_throughput(outputs, start_time, duration_s, throughput_path)
    return [latency_path, throughput_path]
