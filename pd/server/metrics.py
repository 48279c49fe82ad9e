"""Prometheus metrics of one HTTP front, in a registry owned by the app (no module-level collectors).

Names follow SGLang's (`sglang:num_running_reqs` -> `pd:num_running_reqs`, ...) so existing dashboards need
only the prefix changed. Engine-side gauges are read from the engine's latest stats when /metrics is scraped;
latencies are measured in the front, where the client sees them.

A front of several processes (--tokenizer-worker-num) keeps its values in files that every process's /metrics
sums (prometheus_client's multiprocess mode, `share_across_processes`): a scrape answered by any of them covers
the requests of all.
"""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile
import time
from collections import deque

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest, values
from prometheus_client.multiprocess import MultiProcessCollector

from pd.engine.io import EngineStats

PREFIX = "pd"
# Window of the generation-throughput gauge.
THROUGHPUT_WINDOW_S = 10.0

_LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 80.0, 160.0, 320.0, 640.0)
_ITL_BUCKETS = (0.002, 0.005, 0.01, 0.015, 0.02, 0.025, 0.03, 0.04, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 1.0, 2.5)


MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"


def share_across_processes() -> str:
    """Puts this process's metrics created from now on, and those of processes it starts afterwards (they inherit
    the environment), in files under one directory that each one's /metrics sums. The directory is
    $PROMETHEUS_MULTIPROC_DIR when set, else a fresh one removed when this process exits. Returns it."""
    directory = os.environ.get(MULTIPROC_ENV)
    if not directory:
        directory = tempfile.mkdtemp(prefix="pd-metrics-")
        atexit.register(shutil.rmtree, directory, True)
        os.environ[MULTIPROC_ENV] = directory
    values.ValueClass = values.get_value_class()  # chosen when prometheus_client was imported, before the variable
    return directory


class ServerMetrics:
    """All collectors of one app. `render(stats)` refreshes the engine gauges and returns the text format."""

    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        p = PREFIX
        self.shared = bool(os.environ.get(MULTIPROC_ENV))

        def engine_gauge(name: str, doc: str) -> Gauge:  # several front processes: the last one set counts
            return Gauge(name, doc, registry=r, multiprocess_mode="mostrecent")

        self.num_running = engine_gauge(f"{p}:num_running_reqs", "Requests in the engine's running batch")
        self.num_queue = engine_gauge(f"{p}:num_queue_reqs", "Requests waiting in the engine's queue")
        self.kv_pages_used = engine_gauge(f"{p}:kv_pages_used", "KV cache pages in use")
        self.kv_pages_free = engine_gauge(f"{p}:kv_pages_free", "KV cache pages free")
        self.token_usage = engine_gauge(f"{p}:token_usage", "Fraction of KV cache pages in use")
        self.kv_pages_cached = engine_gauge(
            f"{p}:kv_pages_cached", "Free KV cache pages holding a cached prefix (evicted when needed)"
        )
        self.cache_hit_rate = engine_gauge(
            f"{p}:cache_hit_rate", "Prompt tokens served from the prefix cache / prompt tokens admitted"
        )
        self.kv_pages_sent = engine_gauge(
            f"{p}:kv_pages_sent_total", "Prefill: KV pages written to decode instances since start (not the pages of "
            "a prefix the decode had cached)"
        )
        self.gen_throughput = Gauge(  # each front process's own tokens: summed over them
            f"{p}:gen_throughput", f"Generated tokens per second over the last {THROUGHPUT_WINDOW_S:g} s", registry=r,
            multiprocess_mode="livesum",
        )
        self.prompt_tokens = Counter(f"{p}:prompt_tokens", "Prompt tokens of finished requests", registry=r)
        self.generation_tokens = Counter(f"{p}:generation_tokens", "Generated tokens", registry=r)
        self.num_requests = Counter(
            f"{p}:num_requests", "Finished requests by finish reason", ["finish_reason"], registry=r
        )
        self.ttft = Histogram(
            f"{p}:time_to_first_token_seconds", "Arrival to first token", buckets=_LATENCY_BUCKETS, registry=r
        )
        self.itl = Histogram(
            f"{p}:inter_token_latency_seconds", "Time between output tokens", buckets=_ITL_BUCKETS, registry=r
        )
        self.e2e = Histogram(
            f"{p}:e2e_request_latency_seconds", "Arrival to last token", buckets=_LATENCY_BUCKETS, registry=r
        )
        self.queue_time = Histogram(
            f"{p}:queue_time_seconds",
            "Time queued in the engine before the first forward",
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.eplb_rebalances = engine_gauge(f"{p}:eplb_rebalances", "EPLB rebalances since start")
        self.eplb_balancedness = engine_gauge(
            f"{p}:eplb_balancedness",
            "Mean / max GPU expert load measured before the last EPLB rebalance (1.0 = even)",
        )
        # (time, tokens) of recent outputs, for the throughput gauge.
        self._recent: deque[tuple[float, int]] = deque()

    def record_tokens(self, n: int, now: float) -> None:
        self.generation_tokens.inc(n)
        self._recent.append((now, n))
        self._drop_old(now)

    def render(self, stats: EngineStats) -> bytes:
        """Prometheus text exposition of every collector, engine gauges taken from `stats`."""
        self.num_running.set(stats.num_running)
        self.num_queue.set(stats.num_waiting)
        used = stats.kv_pages_total - stats.kv_pages_free
        self.kv_pages_used.set(used)
        self.kv_pages_free.set(stats.kv_pages_free)
        self.token_usage.set(used / stats.kv_pages_total if stats.kv_pages_total else 0.0)
        self.kv_pages_cached.set(stats.kv_pages_cached)
        prompt = stats.prompt_tokens_total
        self.cache_hit_rate.set(stats.cached_tokens_total / prompt if prompt else 0.0)
        self.kv_pages_sent.set(stats.kv_pages_sent_total)
        self.eplb_rebalances.set(stats.eplb_rebalances)
        self.eplb_balancedness.set(stats.eplb_balancedness)
        now = time.perf_counter()
        self._drop_old(now)
        self.gen_throughput.set(sum(n for _, n in self._recent) / THROUGHPUT_WINDOW_S)
        if not self.shared:
            return generate_latest(self.registry)
        # Every front process's values: engine gauges the most recently set (each holds the same engine stats),
        # counters, histograms and the throughput summed.
        merged = CollectorRegistry()
        MultiProcessCollector(merged)
        return generate_latest(merged)

    def _drop_old(self, now: float) -> None:
        while self._recent and self._recent[0][0] < now - THROUGHPUT_WINDOW_S:
            self._recent.popleft()


class RequestTimer:
    """Latency bookkeeping of one request: TTFT on its first output, ITL per token after that, e2e at the end.

    Times are `time.perf_counter()` values; `arrival` is when the HTTP request came in.
    """

    def __init__(self, metrics: ServerMetrics, arrival: float) -> None:
        self._m = metrics
        self.arrival = arrival
        self._last: float | None = None

    def on_output(self, num_tokens: int, queue_time: float) -> None:
        now = time.perf_counter()
        if num_tokens == 0:
            return
        if self._last is None:
            self._m.ttft.observe(now - self.arrival)
            self._m.queue_time.observe(queue_time)
        else:
            # Several tokens in one message arrived together: spread the gap over them.
            self._m.itl.observe((now - self._last) / num_tokens)
        self._last = now
        self._m.record_tokens(num_tokens, now)

    def on_finish(self, finish_reason: str, prompt_tokens: int) -> float:
        """Records the finished request; returns its e2e latency in seconds."""
        latency = time.perf_counter() - self.arrival
        self._m.e2e.observe(latency)
        self._m.prompt_tokens.inc(prompt_tokens)
        self._m.num_requests.labels(finish_reason=finish_reason).inc()
        return latency
