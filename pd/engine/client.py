"""The HTTP front's handle on the engine process: start it, stream tokens per request, abort, read stats."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import signal
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any

import msgpack

from pd.dist.launch import LeaderLink, RankProcesses
from pd.dist.leader_link import RemoteLeaderListener
from pd.engine.engine_process import BURST_GAP_S, run_engine
from pd.engine.io import (
    AbortRequest,
    EngineStats,
    FlushCacheRequest,
    GenerateRequest,
    ProfileRequest,
    TokenOutput,
    from_dict,
    output_from_row,
    pack_message,
)
from pd.engine.spec import EngineSpec
from pd.server_args import ServerArgs

logger = logging.getLogger(__name__)


# How long the front waits for the DP leaders of other nodes (they connect once their model is loaded).
REMOTE_LEADERS_TIMEOUT_S = 900.0


class EngineFullError(RuntimeError):
    """Too many requests in flight (running + queued); the front answers 503."""


class EngineDeadError(RuntimeError):
    """The engine process is gone; the front answers 503 and /health fails."""


class EngineClient:
    """Starts the instance's local rank processes and talks to their leaders: one leader, or one per DP-attention
    group. A request then goes to the leader with the fewest requests in flight, and stays there; a PD request
    (with a bootstrap room) goes to leader room % groups, the group both its prefill and decode peers expect."""

    def __init__(self, server_args: ServerArgs, spec: EngineSpec, links: list[LeaderLink] | None = None) -> None:
        """The client of the instance ``spec`` describes (built once by the launcher from ``server_args``, whose
        queue bounds the front applies); nothing starts before ``start``. With --tokenizer-worker-num N the first
        front process's client starts the ranks with a pipe pair per front (``worker_links``: the others'), and
        each other front process attaches to its own pairs (``links``, one per leader); the queue bound is split
        between the N."""
        self.spec = spec
        self.fronts = server_args.tokenizer_worker_num
        self.max_in_flight = -(-(server_args.max_running_requests + server_args.max_queued_requests) // self.fronts)
        self._attached = links  # a front worker's pipes (the first front process owns the ranks)
        self._leaders: list[LeaderLink] = []
        self.model_config: dict[str, Any] = {}
        self.max_context_length = 0
        self._stats: list[EngineStats] = []
        self._queues: dict[str, asyncio.Queue[TokenOutput]] = {}
        self._owner: dict[str, int] = {}  # rid -> leader index
        self._dead: str | None = None
        # With --prefill-wait-ms the engine gathers a burst while writes come less than BURST_GAP_S apart: then no
        # message waits for the end of a long loop turn once the last write is this old (see _send).
        gathers = spec is not None and spec.scheduler.prefill_wait_s > 0
        self._flush_after = BURST_GAP_S / 4 if gathers else None
        self._last_write: dict[int, float] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._ranks: RankProcesses | None = None
        self._closing = False
        self._outgoing: dict[int, list[bytes]] = {}  # leader -> messages packed this turn of the loop (_send)
        self._replies: dict[str, asyncio.Future[tuple[bool, str]]] = {}  # rid -> a leader's answer to a request

    @property
    def is_alive(self) -> bool:
        if self._dead is not None or not self._leaders:
            return False
        return self._ranks is None or self._ranks.all_alive()  # attached: a gone engine shows as its pipes closing

    @property
    def worker_links(self) -> list[list[LeaderLink]]:
        """The other front processes' pipes to the leaders (worker_links[k][i]: front k + 1 to leader i)."""
        return self._ranks.worker_leaders if self._ranks is not None else []

    async def start(self, on_spawned: Callable[[list[list[LeaderLink]]], None] | None = None) -> None:
        """Spawns the rank processes and returns once every leader's model is loaded (raises with the reason
        otherwise). ``on_spawned(worker_links)`` runs as soon as the ranks are started, with the other front
        processes' pipes, so that those start while the model loads."""
        self._loop = asyncio.get_running_loop()
        if self._attached is not None:
            self._leaders = self._attached
            await self._await_ready()
            return
        remote = self.spec.layout.remote_leaders
        # Listening before any rank starts.
        listener = RemoteLeaderListener(self.spec.layout, remote) if remote else None
        try:
            self._ranks = RankProcesses.spawn(self.spec.layout, run_engine, self.spec, fronts=self.fronts)
        except BaseException:
            if listener is not None:
                listener.close()
            raise
        if on_spawned is not None:
            on_spawned(self._ranks.worker_leaders)
        if listener is not None:
            try:
                conns = await self._loop.run_in_executor(None, listener.accept_all, REMOTE_LEADERS_TIMEOUT_S,
                                                         self._ranks.all_alive)  # fmt: skip
            except (TimeoutError, RuntimeError) as e:
                self._ranks.kill()
                raise RuntimeError(f"engine failed to start: {e}") from None
            self._ranks.add_remote_leaders(conns)
        self._leaders = self._ranks.leaders
        try:
            await self._await_ready()
        except RuntimeError:
            self._ranks.kill()
            raise
        if self.spec.layout.tp > 1:  # ranks elsewhere (other nodes) wait on these ones: one exiting ends the instance
            threading.Thread(target=self._watch_ranks, name="pd-rank-watch", daemon=True).start()

    async def _await_ready(self) -> None:
        """Each leader's first message (its model loaded, or why not); then a reader thread per leader."""
        assert self._loop is not None
        firsts = await asyncio.gather(
            *(self._loop.run_in_executor(None, self._recv, i) for i in range(len(self._leaders)))
        )
        for first in firsts:
            if first is None or "fatal" in first:
                reason = first["fatal"] if first else "an engine process exited during start-up"
                raise RuntimeError(f"engine failed to start: {reason}")
        ready = firsts[0]["ready"]
        self.max_context_length = int(ready["context_length"])
        self.model_config = ready["model_config"]
        self._stats = [from_dict(f["ready"]["stats"]) for f in firsts]
        for i in range(len(self._leaders)):
            threading.Thread(target=self._reader, args=(i,), name=f"pd-engine-reader-{i}", daemon=True).start()

    def _recv(self, leader: int) -> dict[str, Any] | None:
        try:
            return msgpack.unpackb(self._leaders[leader].outbox.recv_bytes(), raw=False)
        except (EOFError, OSError):
            return None

    def _reader(self, leader: int) -> None:
        assert self._loop is not None
        try:
            while (msg := self._recv(leader)) is not None:
                self._loop.call_soon_threadsafe(self._deliver, leader, msg)
            self._loop.call_soon_threadsafe(self._engine_died, f"the engine process of leader {leader} exited")
        except RuntimeError:  # the front's event loop is closed (it is gone): nobody is left to tell
            pass

    def _watch_ranks(self) -> None:
        """A rank that exits takes the whole instance down (its peers would wait on it in the next collective)."""
        assert self._ranks is not None and self._loop is not None
        rank, code = self._ranks.wait_any_exit()
        if self._closing:
            return
        logger.error("rank %d (pid %d) exited with code %s; stopping this instance's other ranks and the server",
                     rank, self._ranks.procs[rank].pid, code)
        self._ranks.kill()
        self._loop.call_soon_threadsafe(self._engine_died, f"rank {rank} exited (exit code {code})")
        # The front serves nothing without its ranks: stop it the way Ctrl-C would, so the process manager sees.
        os.kill(os.getpid(), signal.SIGTERM)

    def _deliver(self, leader: int, msg: dict[str, Any]) -> None:
        self._stats[leader] = from_dict(msg["stats"])
        for rid, ok, message in msg.get("replies", ()):
            reply = self._replies.pop(rid, None)
            if reply is not None and not reply.done():
                reply.set_result((ok, message))
        for row in msg["outputs"]:
            out = output_from_row(row)
            queue = self._queues.get(out.rid)
            if queue is not None:
                queue.put_nowait(out)

    def _engine_died(self, reason: str) -> None:
        if self._dead is not None:
            return
        self._dead = reason
        if not self._closing:
            logger.error("%s; failing %d requests in flight", self._dead, len(self._queues))
        for rid, queue in self._queues.items():
            queue.put_nowait(TokenOutput(rid, [], 0, 0, "error", error=self._dead))
        for reply in self._replies.values():
            if not reply.done():
                reply.set_exception(EngineDeadError(self._dead))
        self._replies.clear()
        if self._attached is not None and not self._closing:
            # A front worker without its engine serves nothing: stop it as Ctrl-C would (the first front process,
            # which owns the ranks, is going down too).
            os.kill(os.getpid(), signal.SIGTERM)

    def stats(self) -> EngineStats:
        """The instance's state: summed over DP-attention leaders."""
        assert self._stats, "engine not started"
        if len(self._stats) == 1:
            return self._stats[0]
        total = {f.name: sum(getattr(s, f.name) for s in self._stats) for f in dataclasses.fields(EngineStats)}
        # One value for the whole instance:
        for same in ("page_size", "eplb_rebalances", "eplb_balancedness", "kv_heads_per_rank", "kv_bytes_per_rank"):
            total[same] = getattr(self._stats[0], same)
        return EngineStats(**total)

    @property
    def num_in_flight(self) -> int:
        return len(self._queues)

    def _send(self, leader: int, msg: GenerateRequest | AbortRequest | FlushCacheRequest | ProfileRequest) -> None:
        """Queues `msg` for `leader`. What this turn of the event loop queues for a leader goes out as one pipe write
        (``_flush``, scheduled by the first): a batch request's prompts, each sent by its own task, then reach the
        engine together, and its first forward takes them all rather than the first prompt alone (the engine starts
        a forward with whatever it has; a second one pays a forward's fixed cost again: on an MoE model, reading
        every expert's weights). The price: a message waits for the rest of the loop's current turn (nothing when
        the front is idle; under load, at most that turn's work). Except with --prefill-wait-ms, where the engine
        waits for the rest of a burst only while writes keep coming: there a turn that runs many requests' handlers
        (concurrent requests whose bodies all arrived) writes whenever its last write is _flush_after old, or the
        engine took the first request alone and ran it as a forward of its own (measured: 15 of 16 concurrent
        prompts held 6 ms behind the first). Packed here, so a message that cannot be packed fails its own
        request."""
        if self._closing or not self._leaders:
            return  # late aborts from requests unwinding after close(); the engine is gone
        packed = pack_message(msg)
        queued = self._outgoing.setdefault(leader, [])
        if not queued:
            assert self._loop is not None, "engine not started"
            self._loop.call_soon(self._flush, leader)
        queued.append(packed)
        if self._flush_after is not None and time.monotonic() - self._last_write.get(leader, 0.0) >= self._flush_after:
            self._flush(leader)

    def _flush(self, leader: int) -> None:
        """Writes `leader`'s queued messages, concatenated (the engine reads a write as a stream of messages)."""
        queued = self._outgoing.pop(leader, None)
        if not queued or not self._leaders:
            return
        try:
            self._leaders[leader].inbox.send_bytes(b"".join(queued))
            if self._flush_after is not None:
                self._last_write[leader] = time.monotonic()
        except OSError as e:  # the pipe is gone, and so is the engine
            if not self._closing:
                self._engine_died(f"sending to the engine (leader {leader}) failed: {type(e).__name__}: {e}")

    def _pick_leader(self, req: GenerateRequest) -> int:
        if len(self._leaders) == 1:
            return 0
        if self.spec.disagg is not None and req.bootstrap_room is not None:
            return req.bootstrap_room % len(self._leaders)
        load = [0] * len(self._leaders)
        for leader in self._owner.values():
            load[leader] += 1
        return load.index(min(load))

    async def generate(self, req: GenerateRequest) -> AsyncIterator[TokenOutput]:
        """Yields the request's outputs until one has finish_reason set. Closing the iterator early (client
        gone) aborts the request in the engine, which frees its pages."""
        if self._dead is not None:
            raise EngineDeadError(self._dead)
        if len(self._queues) >= self.max_in_flight:
            raise EngineFullError(f"{len(self._queues)} requests in flight; the queue is full")
        if req.rid in self._queues:
            raise ValueError(f"request id {req.rid!r} is already in flight")
        queue: asyncio.Queue[TokenOutput] = asyncio.Queue()
        self._queues[req.rid] = queue
        leader = self._owner[req.rid] = self._pick_leader(req)
        finished = False
        try:
            self._send(leader, req)
            while True:
                out = _coalesce(await queue.get(), queue)
                finished = out.finish_reason is not None
                if finished:  # the engine is done with it: its rid is free again before the answer goes out
                    self._forget(req.rid, queue)
                yield out
                if finished:
                    return
        finally:
            self._forget(req.rid, queue)
            if not finished and self._dead is None:
                self._send(leader, AbortRequest(req.rid))

    def _forget(self, rid: str, queue: asyncio.Queue[TokenOutput]) -> None:
        """Drops a request's entries, unless its rid already belongs to a newer request."""
        if self._queues.get(rid) is queue:
            del self._queues[rid]
            self._owner.pop(rid, None)

    async def abort(self, rid: str) -> None:
        """Aborts `rid` if in flight: this front's own request, or, with several front processes, another's (every
        leader is asked; the engine ignores rids it does not hold)."""
        if self._dead is not None:
            return
        if rid in self._queues:
            self._send(self._owner[rid], AbortRequest(rid))
        elif self.fronts > 1:
            for leader in range(len(self._leaders)):
                self._send(leader, AbortRequest(rid))

    async def abort_all(self) -> None:
        """Aborts every request in flight: this front's, and with several front processes every other's too."""
        if self._dead is not None:
            return
        if self.fronts == 1:
            for rid in list(self._queues):
                self._send(self._owner[rid], AbortRequest(rid))
            return
        for leader in range(len(self._leaders)):  # this front's requests among them
            self._send(leader, AbortRequest("", every_request=True))

    async def flush_cache(self) -> None:
        """Asks every leader to drop its unreferenced cached prefix pages (the stats show it once done)."""
        if self._dead is None:
            for leader in range(len(self._leaders)):
                self._send(leader, FlushCacheRequest())

    async def profile(self, action: str, **settings: Any) -> list[tuple[bool, str]]:
        """Starts (``action`` "start", with pd.engine.io.ProfileRequest's settings) or stops ("stop") the profiler
        of every leader's group; each leader's (ok, message), once it has acted (a stop: once the traces are
        written, which takes seconds for a long profile).

        Raises:
            EngineDeadError: the engine is gone, or went while the leaders acted.
        """
        if self._dead is not None:
            raise EngineDeadError(self._dead)
        assert self._loop is not None, "engine not started"
        rids = [f"profile-{uuid.uuid4().hex}" for _ in self._leaders]
        replies = []
        for leader, rid in enumerate(rids):
            self._replies[rid] = reply = self._loop.create_future()
            replies.append(reply)
            self._send(leader, ProfileRequest(rid, action, **settings))
        try:
            return list(await asyncio.gather(*replies))
        finally:  # answered, or the caller gave up (its client left): nothing waits on these any more
            for rid in rids:
                self._replies.pop(rid, None)

    async def close(self) -> None:
        for leader in list(self._outgoing):  # what was queued before closing still goes out
            self._flush(leader)
        self._closing = True
        if self._attached is not None:  # a front worker: closing its pipes tells the engine (its requests end)
            for link in self._attached:
                link.inbox.close()
            return
        if self._ranks is None:
            return
        await asyncio.get_running_loop().run_in_executor(None, self._ranks.stop, 10.0)


def _coalesce(out: TokenOutput, queue: asyncio.Queue[TokenOutput]) -> TokenOutput:
    """`out` merged with the messages of its request already waiting behind it: a consumer that fell behind (a
    front streaming to hundreds of clients) catches up with one event for several tokens instead of falling
    further behind; a consumer that keeps up sees every message as it came."""
    while not queue.empty() and out.finish_reason is None:
        nxt = queue.get_nowait()
        out = dataclasses.replace(nxt, new_token_ids=[*out.new_token_ids, *nxt.new_token_ids],
                                  queue_time=out.queue_time)  # fmt: skip
    return out
