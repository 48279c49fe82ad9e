"""A rank process: owns its model shard; a leader also runs the scheduler loop and talks to the HTTP front over
two pipes, a follower runs the forwards its leader broadcasts (pd.dist.step_sync).

Messages are msgpack dicts (pd.engine.io). Front -> engine: GenerateRequest, AbortRequest, FlushCacheRequest,
ProfileRequest. Engine -> front: first {"ready": info} or {"fatal": reason}, then {"outputs": [rows], "stats": {...}}
after each step that finished something (stats alone when they changed: at most every STATS_INTERVAL_S while work goes
on, at once when idle); the answer to a ProfileRequest carries "replies": [[rid, ok, message]] besides.

With several front processes (--tokenizer-worker-num) a leader holds a pipe pair to each: a request's outputs go
to the front that sent it, the stats to all of them. The first front's closing stops the engine; another's aborts
the requests it had sent. The engine writes to the other fronts from a thread per front (FrontSender), so one that
stops reading (hung, not dead) cannot block the engine: once its outputs have waited FRONT_STALL_S it is given up
like a closed one.
"""

from __future__ import annotations

import collections
import collections.abc
import logging
import os
import signal
import threading
import time
import traceback
from dataclasses import replace
from multiprocessing.connection import Connection, wait
from typing import Any

import msgpack
import torch

from pd.dist.dp_gate import DPGate
from pd.dist.launch import usable_cores
from pd.dist.leader_link import connect_to_front
from pd.engine.io import (
    AbortRequest,
    FlushCacheRequest,
    GenerateRequest,
    ProfileRequest,
    TokenOutput,
    output_to_row,
    to_dict,
    unpack_messages,
)
from pd.engine.profiler import StepProfiler
from pd.engine.rank import follow, start_rank
from pd.engine.scheduler import Scheduler
from pd.engine.spec import EngineSpec, SchedulerFactory, default_scheduler
from pd.gc_pause import freeze_startup_objects

# SchedulerFactory and default_scheduler are pd.engine.spec's, named here too for the front (pd.server.app).
__all__ = ["EngineLoop", "SchedulerFactory", "default_scheduler", "run_engine"]

logger = logging.getLogger("pd.engine")

# How often an idle DP-attention leader checks whether another leader needs it for a forward.
DP_IDLE_POLL_S = 0.002
# Steps that finish nothing report the engine's stats at most this often (each message wakes the front).
STATS_INTERVAL_S = 0.05
# An idle engine that got a request waits for more of its burst while they come at most this far apart (and for
# --prefill-wait-ms in all: EngineLoop._gather_burst); also what a lone request waits. Above a front's time per
# request with room for a pause (~0.7 ms for a 1024-token prompt on an H100 host): at 1 ms, 6 of 9 bursts of 16
# concurrent prompts split in two forwards there; on the CPU stand-in (benchmarks/bench_served_prefill.py), with
# the fronts writing as they go (EngineClient._send), 7 of 42 bursts split at 1 ms and 3 of 42 at 2 ms.
BURST_GAP_S = 0.002
# How often an idle leader checks that its followers are still there.
HEARTBEAT_S = 1.0
# A front process (other than the first) whose outputs have waited this long in its pipe is given up: its requests
# are aborted. A healthy front reads its pipe all the time; one that stopped holds batch slots and KV pages.
FRONT_STALL_S = 30.0
# After a step that ended requests, the loop waits at most this long for its outputs to be written to the front
# processes beyond the first before returning the requests' pages (Scheduler.tidy, ~0.7 ms of the loop's thread for
# 16 ended 1024-token prompts on an H100 host): the sender threads need the GIL to write (a stalled front costs each
# such step this much until it is given up).
OUTPUTS_FIRST_S = 0.005


def _send(conn: Connection, payload: dict[str, Any]) -> None:
    conn.send_bytes(msgpack.packb(payload, use_bin_type=True))


def run_engine(
    spec: EngineSpec,
    rank: int = 0,
    init_method: str | None = None,
    inbox: Connection | list[Connection] | None = None,
    outbox: Connection | list[Connection] | None = None,
) -> None:
    """Process entry point of one rank (a pd.dist.launch.RankTarget). A leader (pipes given: one pair, or one pair per
    front process as lists) runs the scheduler and returns when the first front closes its pipe; a follower (no
    pipes) runs what its leader broadcasts until told to stop."""
    # The front stops this process by closing the pipe, after aborting its requests; a terminal's Ctrl-C reaches
    # the whole process group and must not kill the engine under the front's graceful shutdown.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    logging.basicConfig(level=spec.log_level.upper(),
                        format=f"%(asctime)s rank{rank} %(levelname)s %(name)s: %(message)s")
    # OMP_NUM_THREADS wins: instances sharing a host (pd up) that each take every core starve one another, and
    # so do the ranks of one instance.
    default_threads = max(1, usable_cores() // len(spec.layout.local_ranks))
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS") or 0) or default_threads)
    multi_rank = spec.layout.tp > 1
    try:
        rt = start_rank(spec, rank, init_method)
        torch.set_num_threads(serving_threads(rt.runner.device.type, os.environ, torch.get_num_threads()))
        if outbox is None and rt.info.is_leader:  # a DP group's leader on another node than the front's
            inbox = outbox = connect_to_front(spec.layout, rank)
        disagg = None if spec.disagg is None else replace(spec.disagg, dp_rank=rt.info.dp_rank)
        if outbox is None:  # a follower
            assert rt.sync is not None, "a rank without pipes follows its attention group's leader"
            freeze_startup_objects(f"rank {rank}")
            follow(rt.runner, rt.sync, spec.scheduler.max_running_requests, disagg,
                   StepProfiler(rt.runner.device, _rank_tag(rt.info, spec), rt.sync))
            _exit_now()
        scheduler: Scheduler = spec.make_scheduler(spec.scheduler, rt.runner, disagg)
    except Exception as e:  # report why loading failed instead of dying silently
        logger.error("rank %d failed: %s", rank, traceback.format_exc())
        for conn in _as_list(outbox):
            _send(conn, {"fatal": f"{type(e).__name__}: {e}"})
        raise SystemExit(1) from None
    runner = rt.runner
    assert inbox is not None
    freeze_startup_objects(f"rank {rank}")  # the model, its warm-up and CUDA graphs are in place
    ready = {"ready": {"context_length": runner.context_length, "stats": to_dict(scheduler.stats()),
                       "model_config": runner.model_config.raw}}  # fmt: skip
    try:
        for conn in _as_list(outbox):
            _send(conn, ready)
    except (BrokenPipeError, EOFError, ConnectionResetError):
        # The front went away while this rank loaded (Ctrl-C during start-up): nothing to report to.
        logger.info("rank %d: the front closed before start-up finished; exiting", rank)
        raise SystemExit(0) from None
    loop = EngineLoop(scheduler, inbox, outbox, rt.dp_gate, multi_rank=multi_rank,
                      prefill_wait_s=spec.scheduler.prefill_wait_s,
                      profiler=StepProfiler(runner.device, _rank_tag(rt.info, spec), rt.sync))  # fmt: skip
    try:
        loop.run()
    except Exception:
        # Peers are mid-collective with us: the instance cannot go on. Exit loudly; the front sees the pipe close.
        logger.error("rank %d: step failed in a multi-rank instance; stopping: %s", rank, traceback.format_exc())
        raise SystemExit(1) from None
    if loop.profiler.active:  # a profile still running when the server stops is written, not lost
        ok, message = loop.profiler.stop()
        if not ok:
            logger.warning("the profile running at shutdown was not written: %s", message)
    runner.stop_followers()
    if multi_rank:
        _exit_now()


def serving_threads(device_type: str, env: collections.abc.Mapping[str, str], loading_threads: int) -> int:
    """Torch's CPU threads for a rank once its model is loaded. On an accelerator the host only schedules: its
    torch CPU ops are small (a batch's pinned buffer, page-table rows), and an OpenMP pool as wide as the machine
    stalls in each parallel region for a scheduler tick whenever one of its threads loses its core to the HTTP
    fronts or a client on the same host (an 82K-element torch.zeros: up to 4.6 ms with two threads beside one busy
    process, at most 50 us with one). One thread then, as vLLM's GPU workers do; OMP_NUM_THREADS still wins, and a
    CPU rank keeps its pool for the model's own compute."""
    if device_type == "cpu" or env.get("OMP_NUM_THREADS"):
        return loading_threads
    return 1


def _rank_tag(info: Any, spec: EngineSpec) -> str:
    """A rank's name in its profile trace's file name: its rank in its attention group and the group's (DP) index,
    after the instance's role when disaggregated (a prefill and a decode instance may share a trace folder)."""
    role = "" if spec.disagg is None else f"{spec.disagg.mode}-"
    return f"{role}TP-{info.attn_tp_rank}-DP-{info.dp_rank}"


def _as_list(conn: Connection | list[Connection] | None) -> list[Connection]:
    return [] if conn is None else conn if isinstance(conn, list) else [conn]


def _exit_now() -> None:
    """Leave without running the process groups' destructors: once the peers are gone (the leader exits right
    after its stop message), gloo's teardown can abort the process, which would read as a crash."""
    logging.shutdown()
    os._exit(0)


class FrontSender:
    """Writes one front process's messages from a thread of its own, in order. A front that does not read blocks
    this thread only (a pipe write cannot be given up halfway); the engine asks how long outputs have waited."""

    def __init__(self, conn: Connection, front: int) -> None:
        self.conn = conn
        self._queue: collections.deque[tuple[bytes, float | None]] = collections.deque()  # (message, rows since)
        self._sending: float | None = None  # when the message being written was queued, if it carries outputs
        self._busy = False
        self.failed = False  # the pipe broke: the front is gone
        self._cond = threading.Condition()
        threading.Thread(target=self._run, name=f"front-{front}-sender", daemon=True).start()

    def send(self, payload: dict[str, Any], rows: bool) -> None:
        data = msgpack.packb(payload, use_bin_type=True)
        with self._cond:
            self._queue.append((data, time.monotonic() if rows else None))
            self._cond.notify()

    def idle(self) -> bool:
        """Nothing queued or being written (a stats-only message can wait for the next one instead)."""
        with self._cond:
            return not self._queue and not self._busy

    def outputs_waiting_s(self, now: float) -> float:
        """How long the oldest unwritten message with outputs has waited (0 without one)."""
        with self._cond:
            since = [t for t in [self._sending, *(t for _, t in self._queue)] if t is not None]
        return now - min(since) if since else 0.0

    def wait_outputs_written(self, timeout: float) -> None:
        """Waits, at most `timeout` s, until no message carrying outputs is left to write (releasing the GIL, which
        this thread needs for the write)."""
        with self._cond:
            self._cond.wait_for(lambda: self._sending is None and all(t is None for _, t in self._queue), timeout)

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._queue:
                    self._cond.wait()
                data, self._sending = self._queue.popleft()
                self._busy = True
            try:
                self.conn.send_bytes(data)
            except (OSError, ValueError):  # a broken or closed pipe: the front is gone
                self.failed = True
                return
            finally:
                with self._cond:
                    self._busy, self._sending = False, None
                    self._cond.notify_all()  # wait_outputs_written


class FrontInbox:
    """Reads every front process's pipe from a thread of its own, so that a front's write never waits on the engine
    loop: a pipe holds 64 KiB, and a front that writes more (a long prompt, a batch of them) while the loop is in a
    long step (a prompt forward takes seconds on a large model) would block its whole event loop until the loop
    read again (health checks, other requests' streams and new requests all stalled; measured: /health 2.5 s behind
    a 3 s forward). The loop takes what arrived with ``take`` and waits for more with ``wait``. What a front sends
    is held here until then: as much as the front's own in-flight bound lets it send."""

    def __init__(self, conns: list[Connection]) -> None:
        self._conns = conns
        self._arrived: collections.deque[tuple[int, bytes | None]] = collections.deque()  # (front, write or EOF)
        self._cond = threading.Condition()
        threading.Thread(target=self._run, name="front-inbox-reader", daemon=True).start()

    def wait(self, timeout: float | None) -> bool:
        """Whether anything (a write, or a pipe's closing) has arrived, waiting up to `timeout` s (None: forever)."""
        with self._cond:
            return self._cond.wait_for(lambda: bool(self._arrived), timeout)

    def take(self) -> list[tuple[int, bytes | None]]:
        """What arrived since the last call, in order per front: (front, one write), or (front, None) once its pipe
        has closed."""
        with self._cond:
            arrived = list(self._arrived)
            self._arrived.clear()
        return arrived

    def _run(self) -> None:
        open_conns = dict(enumerate(self._conns))
        while open_conns:
            for conn in wait(list(open_conns.values())):
                front = next(i for i, c in open_conns.items() if c is conn)
                try:
                    data: bytes | None = conn.recv_bytes()
                except Exception as e:  # closed (the front left or died), or a broken stream: heard no more
                    if not isinstance(e, (EOFError, OSError)):
                        logger.exception("reading front %d's pipe failed; treating it as closed", front)
                    data = None
                    del open_conns[front]
                with self._cond:
                    self._arrived.append((front, data))
                    self._cond.notify()


class EngineLoop:
    def __init__(
        self,
        scheduler: Scheduler,
        inbox: Connection | list[Connection],
        outbox: Connection | list[Connection],
        dp_gate: DPGate | None = None,
        multi_rank: bool = False,
        prefill_wait_s: float = 0.0,
        profiler: StepProfiler | None = None,
    ) -> None:
        """inbox / outbox: the pipes from / to the front, or to each front process (lists, front 0 first).
        prefill_wait_s: --prefill-wait-ms in seconds (see _gather_burst). profiler: /start_profile's (one without
        followers, on the CPU, by default)."""
        self.scheduler = scheduler
        self.inboxes, self.outboxes = _as_list(inbox), _as_list(outbox)
        assert len(self.inboxes) == len(self.outboxes) >= 1
        self.open_fronts = list(range(len(self.inboxes)))  # fronts whose pipes are still open
        self.owner: dict[str, int] = {}  # rid -> the front that sent it (with several fronts)
        self.senders = {i: FrontSender(conn, i) for i, conn in enumerate(self.outboxes) if i > 0}  # (see _send_to)
        self.inbox = FrontInbox(self.inboxes)
        self.front_stall_s = FRONT_STALL_S
        self.dp_gate, self.multi_rank = dp_gate, multi_rank
        self.prefill_wait_s = prefill_wait_s
        self.last_report = 0.0
        self.last_stats = scheduler.stats()  # what the fronts already have (the ready message carried it)
        self.profiler = profiler or StepProfiler(torch.device("cpu"), "TP-0-DP-0")

    def run(self) -> None:
        while True:
            sched = self.scheduler
            # Block while idle; while only waiting on peers (KV transfers), wake every 2 ms to poll them. Under DP
            # attention never block for long: the other leaders may have work that needs this rank's experts.
            idle = self.dp_gate is None and not sched.has_work
            if self.dp_gate is not None:
                timeout: float | None = 0.0 if sched.needs_compute else DP_IDLE_POLL_S
            elif idle:
                timeout = HEARTBEAT_S if self.multi_rank else None
            else:
                timeout = 0.0 if sched.needs_compute else 0.002
            try:
                outputs = self._drain_inbox(timeout)
                if idle:
                    outputs += self._gather_burst()
            except EOFError:
                logger.info("front closed the pipe; engine exiting")
                if self.dp_gate is not None:
                    self.dp_gate.agree(False, False, stopping=True)  # the other leaders leave with this one
                return
            if self.dp_gate is not None:
                step = self._dp_step()
                if step is None:
                    logger.info("another DP leader is stopping; engine exiting")
                    return
                outputs += step
            elif sched.has_work:
                outputs += self._step()
            elif self.multi_rank and not outputs:
                sched.runner.heartbeat()  # raises if a follower is gone, rather than finding out mid-request
            self._report(outputs)
            if sched.untidy:  # after the outputs left: the pages of ended requests, then the stats that shows
                if outputs:  # a sender thread needs this thread's GIL to write them, and tidy() would hold it
                    for sender in self.senders.values():
                        sender.wait_outputs_written(OUTPUTS_FIRST_S)
                if sched.tidy():
                    self._report([])

    def _gather_burst(self) -> list[TokenOutput]:
        """An engine that was idle and just got requests takes in more of their burst before its first forward:
        while that forward has room (Scheduler.prompt_room) and requests keep coming, each within BURST_GAP_S of the
        last, for at most --prefill-wait-ms in all. A burst then runs as full forwards rather than a small first one
        and the rest (an MoE forward reads every expert's weights whatever its size); a lone request waits one gap.
        Not under DP attention (the leaders agree on every forward) and not on decode instances (their requests
        wait for KV, not for a forward)."""
        if self.prefill_wait_s <= 0:
            return []
        sched = self.scheduler
        deadline = time.monotonic() + self.prefill_wait_s
        outputs: list[TokenOutput] = []
        while sched.prompt_room():
            left = deadline - time.monotonic()
            if left <= 0 or not self.inbox.wait(min(BURST_GAP_S, left)):
                break
            outputs += self._drain_inbox(0.0)
        return outputs

    def _report(self, outputs: list[TokenOutput]) -> None:
        """Sends the outputs with the engine's stats; without outputs, only stats that changed, and while work
        goes on at most every STATS_INTERVAL_S (each message wakes the front)."""
        stats, now = self.scheduler.stats(), time.monotonic()
        if not outputs and (stats == self.last_stats
                            or (self.scheduler.has_work and now - self.last_report < STATS_INTERVAL_S)):
            return
        self.last_stats, self.last_report = stats, now
        if len(self.outboxes) == 1:
            _send(self.outboxes[0], {"outputs": [output_to_row(o) for o in outputs], "stats": to_dict(stats)})
            return
        rows: dict[int, list[Any]] = {i: [] for i in self.open_fronts}
        for o in outputs:
            front = self.owner.pop(o.rid, None) if o.finish_reason is not None else self.owner.get(o.rid)
            if front in rows:
                rows[front].append(output_to_row(o))
        stats_dict = to_dict(stats)
        for i, front_rows in rows.items():  # every front gets the stats, each its own requests' outputs
            sender = self.senders.get(i)
            waited = sender.outputs_waiting_s(now) if sender is not None else 0.0
            if sender is not None and sender.failed:  # gone before its pipe to us showed it
                self._front_closed(i, "closed its pipe")
            elif waited > self.front_stall_s:
                logger.error("front process %d has not read its outputs for %.0f s (hung?): giving it up; it gets "
                             "nothing more from this engine", i, waited)  # fmt: skip
                self._front_closed(i, "was given up")
            elif front_rows or sender is None or sender.idle():
                # A front that reads nothing (still starting: seconds to import and load its tokenizer) misses
                # stats-only messages while one waits; it gets fresh stats with the next.
                self._send_to(i, {"outputs": front_rows, "stats": stats_dict}, rows=bool(front_rows))

    def _send_to(self, front: int, payload: dict[str, Any], rows: bool) -> None:
        """The first front (the server's main process, whose closing stops the engine) is written to directly,
        the others through their sender threads."""
        if front == 0:
            _send(self.outboxes[0], payload)
        else:
            self.senders[front].send(payload, rows)

    def _dp_step(self) -> list[TokenOutput] | None:
        """One turn under DP attention; None when a leader stops (the instance is shutting down)."""
        assert self.dp_gate is not None
        sched, runner = self.scheduler, self.scheduler.runner
        # Transfers first: one that lands (decode) puts a request into the batch, which must be known before the
        # leaders agree, or this leader would run a forward the others do not join.
        outputs = sched.poll_transfers()
        go, prefill, stop = self.dp_gate.agree(sched.needs_compute, sched.has_prefill_work)
        if stop:
            return None
        if not go:
            return outputs
        runner.forced_mode = "normal" if prefill else "low_latency"
        before = runner.num_forwards
        with self.profiler.step_range():
            outputs += sched.compute()
            if runner.num_forwards == before:
                runner.idle_forward()
        self.profiler.after_step()
        return outputs

    def _drain_inbox(self, timeout: float | None) -> list[TokenOutput]:
        """Takes in every message the fronts have sent (waiting up to `timeout` for the first); raises EOFError when
        the first front has closed its pipe."""
        if timeout != 0.0:
            self.inbox.wait(timeout)
        several = len(self.inboxes) > 1
        outputs: list[TokenOutput] = []
        for front, data in self.inbox.take():
            if data is None:
                if front == 0:
                    raise EOFError("the first front closed its pipe")
                self._front_closed(front, "closed its pipe")
            elif front in self.open_fronts:  # a front given up (stalled) is not heard any more
                for msg in unpack_messages(data):  # pd.engine.client sends what a turn of its loop queued as one write
                    outputs += self._take(front, msg, several)
        return outputs

    def _take(self, front: int, msg: Any, several: bool) -> list[TokenOutput]:
        """Acts on one message from a front: queues a request (or refuses it alone), aborts, flushes the cache.
        Returns the outputs to report at once (a refusal, aborted requests' ends)."""
        out = None
        if isinstance(msg, GenerateRequest):
            if several and msg.rid in self.owner:  # each front checks its own requests; this spans them
                error = f"request id {msg.rid!r} is already in flight; use a unique rid"
                row = output_to_row(TokenOutput(msg.rid, [], len(msg.input_ids), 0, "error", error=error, status=409))
                self._send_to(front, {"outputs": [row], "stats": to_dict(self.last_stats)}, rows=True)
                return []
            try:
                out = self.scheduler.add(msg)
            except Exception as e:  # this request's own problem: refuse it alone, keep serving the others
                logger.error("could not queue request %s: %s", msg.rid, traceback.format_exc())
                out = TokenOutput(msg.rid, [], len(msg.input_ids), 0, "error",
                                  error=f"the engine could not queue the request: {type(e).__name__}: {e}")
            if several:
                self.owner[msg.rid] = front
        elif isinstance(msg, AbortRequest) and msg.every_request:
            return [o for req in self.scheduler.live_requests() if (o := self.scheduler.abort(req.rid))]
        elif isinstance(msg, AbortRequest):
            out = self.scheduler.abort(msg.rid)
        elif isinstance(msg, FlushCacheRequest):
            self.scheduler.flush_cache()
        elif isinstance(msg, ProfileRequest):
            ok, message = self.profiler.start(msg) if msg.action == "start" else self.profiler.stop()
            reply = {"outputs": [], "stats": to_dict(self.last_stats), "replies": [[msg.rid, ok, message]]}
            self._send_to(front, reply, rows=True)
        return [out] if out is not None else []

    def _front_closed(self, front: int, why: str) -> None:
        """A front process other than the first is gone (or given up): its requests are aborted (their pages
        freed); nobody is left to read their outputs."""
        if front not in self.open_fronts:
            return
        self.open_fronts.remove(front)
        gone = [rid for rid, owner in self.owner.items() if owner == front]
        for rid in gone:
            self.scheduler.abort(rid)
            del self.owner[rid]
        logger.log(logging.WARNING if gone else logging.INFO, "front process %d %s; aborted its %d requests in "
                   "flight", front, why, len(gone))  # fmt: skip

    def _step(self) -> list[TokenOutput]:
        try:
            with self.profiler.step_range():
                outputs = self.scheduler.step(tidy=False)  # run() tidies once the outputs are sent
        except Exception as e:
            if self.multi_rank:
                raise
            # A bug in a forward must not take the server down: fail the requests in flight, keep serving.
            logger.error("step failed; ending the running requests: %s", traceback.format_exc())
            outputs = []
            for req in self.scheduler.live_requests():
                out = self.scheduler.abort(req.rid)
                if out is not None:
                    outputs.append(TokenOutput(out.rid, out.new_token_ids, out.prompt_tokens, out.completion_tokens,
                                               "error", error=f"internal error: {type(e).__name__}: {e}"))
            return outputs
        self.profiler.after_step()
        return outputs
