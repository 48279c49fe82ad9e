"""Prometheus metrics of one load balancer, in a registry owned by its app (no module-level collectors).

Per-instance gauges are rebuilt from the worker registry at scrape time, so removed instances drop out of the
output instead of lingering with their last value.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from pd.lb.workers import WorkerRegistry

PREFIX = "pd_lb"
_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 80.0, 160.0, 320.0)


class LBMetrics:
    """All collectors of one balancer; `render(workers)` returns the Prometheus text format."""

    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        p = PREFIX
        self.requests = Counter(
            f"{p}:requests", "Requests answered, by route and HTTP status", ["route", "status"], registry=r
        )
        self.retries = Counter(
            f"{p}:retries", "Requests retried on another pair after a refused connection", registry=r
        )
        self.latency = Histogram(
            f"{p}:request_latency_seconds",
            "Arrival to the end of the answer (last byte of a stream)",
            ["route"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.outstanding = Gauge(
            f"{p}:outstanding_requests",
            "Requests sent to an instance and not yet answered",
            ["role", "worker"],
            registry=r,
        )
        self.healthy = Gauge(f"{p}:worker_healthy", "1 if the instance is in rotation", ["role", "worker"], registry=r)
        self._children: dict[tuple[str, int], tuple[Counter, Histogram]] = {}

    def observe(self, route: str, status: int, seconds: float) -> None:
        children = self._children.get((route, status))
        if children is None:  # labels() takes a lock and builds a key: look each pair up once
            children = self._children[route, status] = (self.requests.labels(route, str(status)),
                                                        self.latency.labels(route))  # fmt: skip
        children[0].inc()
        children[1].observe(seconds)

    def render(self, workers: WorkerRegistry) -> bytes:
        self.outstanding.clear()
        self.healthy.clear()
        for w in workers.all():
            self.outstanding.labels(w.role, w.url).set(w.outstanding)
            self.healthy.labels(w.role, w.url).set(1 if w.healthy else 0)
        return generate_latest(self.registry)
