"""The HTTP front's handle on the engine process: start it, stream tokens per request, abort, read stats."""

from __future__ import annotations

import asyncio
import logging
import multiprocessing as mp
import threading
from collections.abc import AsyncIterator
from typing import Any

import msgpack

from pd.engine.engine_process import SchedulerFactory, default_scheduler, run_engine
from pd.engine.io import AbortRequest, EngineStats, GenerateRequest, TokenOutput, from_dict, to_dict
from pd.engine.model_runner import RunnerConfig
from pd.engine.scheduler import SchedulerConfig
from pd.server_args import ServerArgs

logger = logging.getLogger(__name__)


class EngineFullError(RuntimeError):
    """Too many requests in flight (running + queued); the front answers 503."""


class EngineDeadError(RuntimeError):
    """The engine process is gone; the front answers 503 and /health fails."""


def runner_config(args: ServerArgs, model_path: str) -> RunnerConfig:
    return RunnerConfig(
        model_path=model_path,
        device=args.device,
        dtype=args.torch_dtype,
        page_size=args.page_size,
        context_length=args.context_length,
        max_total_tokens=args.max_total_tokens,
        mem_fraction_static=args.mem_fraction_static,
        random_seed=args.random_seed,
        moe_runner=args.moe_runner_backend,
    )


def scheduler_config(args: ServerArgs) -> SchedulerConfig:
    return SchedulerConfig(args.max_running_requests, args.chunked_prefill_size)


class EngineClient:
    def __init__(
        self, server_args: ServerArgs, model_path: str, make_scheduler: SchedulerFactory = default_scheduler
    ) -> None:
        self.args = server_args
        self.make_scheduler = make_scheduler
        self.model_path = model_path
        self.model_config: dict[str, Any] = {}
        self.max_context_length = 0
        self._stats: EngineStats | None = None
        self._queues: dict[str, asyncio.Queue[TokenOutput]] = {}
        self._dead: str | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._proc: Any = None
        self._closing = False

    @property
    def is_alive(self) -> bool:
        return self._dead is None and self._proc is not None and self._proc.is_alive()

    async def start(self) -> None:
        """Spawns the engine process and returns once its model is loaded (raises with its reason otherwise)."""
        self._loop = asyncio.get_running_loop()
        ctx = mp.get_context("spawn")
        inbox_r, self._inbox = ctx.Pipe(duplex=False)
        self._outbox, outbox_w = ctx.Pipe(duplex=False)
        self._proc = ctx.Process(
            target=run_engine,
            args=(
                runner_config(self.args, self.model_path),
                scheduler_config(self.args),
                self.args,
                inbox_r,
                outbox_w,
                self.make_scheduler,
            ),
            name="pd-engine",
            daemon=True,
        )
        self._proc.start()
        inbox_r.close()
        outbox_w.close()
        first = await self._loop.run_in_executor(None, self._recv)
        if first is None or "fatal" in first:
            reason = first["fatal"] if first else "the engine process exited during start-up"
            raise RuntimeError(f"engine failed to start: {reason}")
        ready = first["ready"]
        self.max_context_length = int(ready["context_length"])
        self.model_config = ready["model_config"]
        self._stats = from_dict(ready["stats"])
        threading.Thread(target=self._reader, name="pd-engine-reader", daemon=True).start()

    def _recv(self) -> dict[str, Any] | None:
        try:
            return msgpack.unpackb(self._outbox.recv_bytes(), raw=False)
        except (EOFError, OSError):
            return None

    def _reader(self) -> None:
        assert self._loop is not None
        while (msg := self._recv()) is not None:
            self._loop.call_soon_threadsafe(self._deliver, msg)
        self._loop.call_soon_threadsafe(self._engine_died)

    def _deliver(self, msg: dict[str, Any]) -> None:
        self._stats = from_dict(msg["stats"])
        for raw in msg["outputs"]:
            out: TokenOutput = from_dict(raw)
            queue = self._queues.get(out.rid)
            if queue is not None:
                queue.put_nowait(out)

    def _engine_died(self) -> None:
        code = self._proc.exitcode if self._proc is not None else None
        self._dead = f"the engine process exited (exit code {code})"
        if self._proc is not None and not self._closing:
            logger.error("%s; failing %d requests in flight", self._dead, len(self._queues))
        for rid, queue in self._queues.items():
            queue.put_nowait(TokenOutput(rid, [], 0, 0, "error", error=self._dead))

    def stats(self) -> EngineStats:
        assert self._stats is not None, "engine not started"
        return self._stats

    @property
    def num_in_flight(self) -> int:
        return len(self._queues)

    def _send(self, msg: GenerateRequest | AbortRequest) -> None:
        if self._closing:
            return  # late aborts from requests unwinding after close(); the engine is gone
        self._inbox.send_bytes(msgpack.packb(to_dict(msg), use_bin_type=True))

    async def generate(self, req: GenerateRequest) -> AsyncIterator[TokenOutput]:
        """Yields the request's outputs until one has finish_reason set. Closing the iterator early (client
        gone) aborts the request in the engine, which frees its pages."""
        if self._dead is not None:
            raise EngineDeadError(self._dead)
        if len(self._queues) >= self.args.max_running_requests + self.args.max_queued_requests:
            raise EngineFullError(f"{len(self._queues)} requests in flight; the queue is full")
        if req.rid in self._queues:
            raise ValueError(f"request id {req.rid!r} is already in flight")
        queue: asyncio.Queue[TokenOutput] = asyncio.Queue()
        self._queues[req.rid] = queue
        finished = False
        try:
            self._send(req)
            while True:
                out = await queue.get()
                finished = out.finish_reason is not None
                yield out
                if finished:
                    return
        finally:
            self._queues.pop(req.rid, None)
            if not finished and self._dead is None:
                self._send(AbortRequest(req.rid))

    async def abort(self, rid: str) -> None:
        if rid in self._queues and self._dead is None:
            self._send(AbortRequest(rid))

    async def close(self) -> None:
        self._closing = True
        if self._proc is None:
            return
        self._inbox.close()
        await asyncio.get_running_loop().run_in_executor(None, self._proc.join, 10)
        if self._proc.is_alive():
            self._proc.kill()
