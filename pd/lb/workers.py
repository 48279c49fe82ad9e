"""The load balancer's view of its instances: who they are, how busy, and whether they are up.

`WorkerRegistry` holds the prefill and decode instances, or in regular mode the non-disaggregated ones (added and
removed at run time), with their outstanding request counts and health; `HealthChecker` polls every instance's
GET /health and takes an instance out after `failure_threshold` failed checks in a row, putting it back on the first
good one. A refused connection on a request path takes the instance out at once (`mark_down`). New instances start
out of rotation until their first good check, so a balancer started before its instances reports unhealthy instead
of failing requests. Everything runs on the one event loop of the app, so no locks are needed.
"""

from __future__ import annotations

import asyncio
import logging
import time
import urllib.parse
from dataclasses import dataclass, field
from typing import Any, Literal

from pd.lb.args import LBArgs
from pd.lb.upstream import UpstreamError, UpstreamPool

logger = logging.getLogger(__name__)

Role = Literal["prefill", "decode", "regular"]
PD_ROLES: tuple[Role, ...] = ("prefill", "decode")
REGULAR_ROLES: tuple[Role, ...] = ("regular",)
ROLES: tuple[Role, ...] = (*PD_ROLES, *REGULAR_ROLES)


class WorkerError(ValueError):
    """A bad add/remove: unknown or duplicate URL. `status` is the HTTP status to answer with."""

    def __init__(self, message: str, status: int) -> None:
        super().__init__(message)
        self.status = status


@dataclass(eq=False)
class Worker:
    """One instance. `outstanding` counts requests sent to it and not yet answered in full."""

    url: str
    role: Role
    bootstrap_port: int | None = None
    healthy: bool = False
    outstanding: int = 0
    consecutive_failures: int = 0
    last_error: str | None = None
    bootstrap_host: str = field(init=False)

    def __post_init__(self) -> None:
        # The host decode reaches the prefill bootstrap server on: the prefill URL's host, IPv6 in brackets as
        # SGLang expects it in "host:port".
        host = urllib.parse.urlsplit(self.url).hostname or ""
        self.bootstrap_host = f"[{host}]" if ":" in host else host

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"url": self.url, "role": self.role}
        if self.role == "prefill":
            out["bootstrap_port"] = self.bootstrap_port
        out.update(healthy=self.healthy, outstanding=self.outstanding, last_error=self.last_error)
        return out


class WorkerRegistry:
    """The instances of each role of the balancer's mode, in the order they were added. `roles`: prefill and decode
    (PD mode) or regular; `answering`: the role whose answer the client gets."""

    def __init__(self, args: LBArgs) -> None:
        self.failure_threshold = args.health_failure_threshold
        self.roles = PD_ROLES if args.pd_mode else REGULAR_ROLES
        self.answering: Role = "decode" if args.pd_mode else "regular"
        self._workers: dict[Role, dict[str, Worker]] = {role: {} for role in self.roles}
        for p in args.prefill:
            self.add(p.url, "prefill", p.bootstrap_port)
        for url in args.decode:
            self.add(url, "decode")
        for url in args.worker_urls:
            self.add(url, "regular")

    def workers(self, role: Role) -> list[Worker]:
        return list(self._workers.get(role, {}).values())

    def all(self) -> list[Worker]:
        return [w for role in self.roles for w in self._workers[role].values()]

    def healthy(self, role: Role) -> list[Worker]:
        return [w for w in self._workers.get(role, {}).values() if w.healthy]

    def find(self, url: str) -> Worker | None:
        return next((ws[url] for ws in self._workers.values() if url in ws), None)

    def add(self, url: str, role: Role, bootstrap_port: int | None = None) -> Worker:
        """Register an instance (out of rotation until its first good health check). Raises WorkerError: 400 for a
        role of the other mode, 409 if the URL is already registered in any role."""
        if role not in self.roles:
            mode = "PD mode (prefill and decode)" if self.roles == PD_ROLES else "regular mode (--worker-urls)"
            raise WorkerError(f"this balancer runs in {mode}; it takes no {role} instance", 400)
        if self.find(url) is not None:
            raise WorkerError(f"worker {url} is already registered; remove it first to change it", 409)
        worker = Worker(url, role, bootstrap_port if role == "prefill" else None)
        self._workers[role][url] = worker
        logger.info(
            "added %s worker %s%s", role, url, f" (bootstrap port {bootstrap_port})" if role == "prefill" else ""
        )
        return worker

    def remove(self, url: str) -> Worker:
        """Take an instance out for good; requests already sent to it run to their end. Raises WorkerError (404)."""
        for role in self.roles:
            worker = self._workers[role].pop(url, None)
            if worker is not None:
                worker.healthy = False
                logger.info("removed %s worker %s", role, url)
                return worker
        raise WorkerError(f"no worker {url} is registered", 404)

    def mark_down(self, worker: Worker, reason: str) -> None:
        """Out of rotation now (a request could not connect); the health checker puts it back when it answers."""
        worker.consecutive_failures = max(worker.consecutive_failures, self.failure_threshold)
        worker.last_error = reason
        if worker.healthy:
            worker.healthy = False
            logger.warning("%s worker %s is down: %s", worker.role, worker.url, reason)

    def record_check(self, worker: Worker, error: str | None) -> None:
        """Apply one health-check result (error None: it answered 200)."""
        if error is None:
            worker.consecutive_failures = 0
            worker.last_error = None
            if not worker.healthy:
                worker.healthy = True
                logger.info("%s worker %s is healthy", worker.role, worker.url)
            return
        worker.consecutive_failures += 1
        worker.last_error = error
        if worker.healthy and worker.consecutive_failures >= self.failure_threshold:
            worker.healthy = False
            logger.warning(
                "%s worker %s failed %d health checks in a row, taking it out: %s",
                worker.role, worker.url, worker.consecutive_failures, error,
            )  # fmt: skip


class HealthChecker:
    """Polls GET /health of every registered instance every `interval` seconds (`headers`: header lines to send,
    each ending in CRLF)."""

    def __init__(self, registry: WorkerRegistry, pool: UpstreamPool, args: LBArgs, headers: bytes) -> None:
        self.registry = registry
        self.pool = pool
        self.interval = args.health_check_interval
        self.timeout = args.health_check_timeout
        self.headers = headers
        self.last_round: float | None = None

    async def check(self, worker: Worker) -> bool:
        """One check of one instance, applied to the registry; returns the instance's health after it."""
        try:
            resp = await self.pool.request(worker.url, "GET", "/health", self.headers, timeout=self.timeout)
            await resp.read()
            error = None if resp.status == 200 else f"GET /health answered {resp.status}"
        except UpstreamError as e:
            error = f"GET /health failed: {type(e).__name__}: {e}".rstrip(": ")
        # A worker removed while its check was in flight stays removed.
        if self.registry.find(worker.url) is worker:
            self.registry.record_check(worker, error)
        return worker.healthy

    async def check_all(self) -> None:
        """One round over every instance, concurrently."""
        await asyncio.gather(*(self.check(w) for w in self.registry.all()))
        self.last_round = time.time()

    async def run(self) -> None:
        """Check every `interval` seconds until cancelled (the app runs the first round itself, before serving)."""
        while True:
            await asyncio.sleep(self.interval)
            try:
                await self.check_all()
            except Exception:  # a bug here must not stop health checking for good
                logger.exception("health-check round failed")
