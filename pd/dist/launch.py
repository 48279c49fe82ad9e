"""Spawning the rank processes of an instance on this node, and noticing when one of them dies.

Node 0 runs the HTTP front, which spawns its local ranks and holds a pipe pair to each leader (one, or one per
DP-attention group). Other nodes (``--node-rank > 0``) run no front: they spawn their ranks and exit when any of
them exits. Their ranks follow a leader, except under DP attention, where a group that lives on another node has
its leader there; it reaches the front over TCP (pd.dist.leader_link).

What a rank runs is given from outside (pd.engine.engine_process.run_engine with the instance's EngineSpec): this
module owns processes only. A rank dies with the process that spawned it however that one dies, SIGKILL included
(Linux's parent-death signal): a rank stuck in a step or a collective would otherwise outlive its front.
"""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import fcntl
import logging
import multiprocessing as mp
import os
import shutil
import signal
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from multiprocessing.connection import Connection, wait
from typing import Any

from pd.dist.topology import InstanceLayout

logger = logging.getLogger(__name__)


def usable_cores() -> int:
    """Cores this process may run on (a container's CPU set), not the host's count: thread pools sized past it make
    every parallel region of a torch CPU op spin for milliseconds."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


@dataclass
class LeaderLink:
    inbox: Connection  # front -> leader
    outbox: Connection  # leader -> front



# A rank's main: target(payload, rank, init_method, inbox, outbox). ``payload`` is what every rank of the instance
# runs with (an EngineSpec); ``inbox`` / ``outbox`` are a leader's pipes from / to the front (lists of them, one per
# front process, with several), None for a follower and for a leader on a node without the front.
RankTarget = Callable[[Any, int, str | None, Any, Any], None]

_PR_SET_PDEATHSIG = 1
_PR_SET_NAME = 15


def init_method(layout: InstanceLayout) -> str:
    """Where the ranks rendezvous: rank 0's TCP store on --dist-init-addr across nodes; on one node a file store in a
    fresh private directory, so that no rendezvous port listens at all (torch's TCP store binds every address,
    whatever host its URL names)."""
    if layout.nnodes > 1:
        return f"tcp://{layout.init_addr}"
    return "file://" + os.path.join(tempfile.mkdtemp(prefix="pd-rendezvous-"), "store")


# How rank processes start: "spawn" (a fresh interpreter that imports torch and the engine itself), or, once
# start_rank_launcher() ran, "forkserver": forked from one process that imported them while the front started.
_start_method = "spawn"
# What the fork server imports once for every rank (the rank's target; torch with it).
RANK_PRELOAD = ["pd.engine.engine_process"]


def start_rank_launcher() -> None:
    """Starts, in the background, the process this process's ranks will be forked from, importing torch and the
    engine there while the caller goes on starting up: each rank then starts in milliseconds instead of importing
    them again (seconds each, and contended on a small machine). For `pd serve` (and its worker nodes), whose
    environment does not change after this call: ranks see the environment of this moment. Linux only; elsewhere
    ranks are spawned."""
    global _start_method
    if not sys.platform.startswith("linux") or _start_method == "forkserver":
        return
    from multiprocessing import forkserver

    mp.set_forkserver_preload(RANK_PRELOAD)
    forkserver.ensure_running()
    _start_method = "forkserver"


def die_with_parent(parent: int) -> None:
    """Makes the kernel SIGKILL this process when its parent exits (Linux; elsewhere only the check below): the
    spawning thread of the front, or the fork server, which exits when the front does. Exits at once when
    ``parent`` (the front's pid) is already gone, having died before the signal was set."""
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(_PR_SET_PDEATHSIG, int(signal.SIGKILL)) != 0:
            raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG) failed")
    if not _alive(parent):
        os._exit(1)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)  # signal 0: only whether the process exists (PermissionError: it does, someone else's)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    return True


# Bytes a front-to-engine or engine-to-front pipe holds (Linux's default is 64 KiB). A burst of 16 prompts of 1024 ids
# is ~130 KiB of messages: through the default pipe the writer blocks until the other process's reader thread has
# taken the first 64 KiB, and that thread waits for its process's GIL (up to the 5 ms switch interval while the engine
# builds a batch), so the front's event loop stalled in the write. With room for the whole burst the write returns
# at once and the reader takes it in one read.
PIPE_BYTES = 1 << 20


def widen_pipe(conn: Connection) -> int:
    """Grows the pipe under ``conn`` to PIPE_BYTES (or the system's cap, /proc/sys/fs/pipe-max-size, if lower) and
    returns its size in bytes; 0 where pipes cannot be resized (not Linux, not a pipe): writes then block as before."""
    setsize = getattr(fcntl, "F_SETPIPE_SZ", None)
    if setsize is None:
        return 0
    want = PIPE_BYTES
    try:
        with open("/proc/sys/fs/pipe-max-size") as f:
            want = min(want, int(f.read()))
    except (OSError, ValueError):
        pass
    try:
        return fcntl.fcntl(conn.fileno(), setsize, want)
    except OSError:
        return 0


# The GIL switch interval of an instance's processes (ranks and fronts). Each reads its pipes on a thread that needs
# the GIL between reads; while the main thread runs Python (an engine admitting or building a batch, a front's event
# loop) a waiting reader gets it only at the switch interval, and a message costs two such waits: with Python's 5 ms a
# burst reached a busy stand-in engine 10.5 ms after its write, with 1 ms 2.4 ms (benchmarks/bench_pipe_burst.py). The
# main thread hands the GIL over only when a reader waits: a front streaming 256 requests received as many tokens or
# more with it (benchmarks/bench_front.py, 77k against 73k tok/s, two runs each, CPU per token unchanged).
SWITCH_INTERVAL_S = 0.001


def _rank_main(parent: int, target: RankTarget, *args: Any) -> None:
    die_with_parent(parent)
    sys.setswitchinterval(SWITCH_INTERVAL_S)
    _release_fork_server()
    name_process(f"pd-rank{args[1]}")
    target(*args)


def _release_fork_server() -> None:
    """A process forked from the fork server holds a copy of the pipe end whose closing tells the server that its
    client is gone, so the server outlives the front while any rank lives, and with it a rank stuck (stopped, in a
    collective) would outlive the front. The rank drops its copy: the server exits with the front, and its exit
    kills the ranks through the parent-death signal. (A spawned rank holds none.)"""
    from multiprocessing import forkserver

    server = forkserver._forkserver  # type: ignore[attr-defined]
    fd = getattr(server, "_forkserver_alive_fd", None)
    if fd is not None:
        os.close(fd)
        server._forkserver_alive_fd = None


@contextlib.contextmanager
def signals_held() -> Iterator[None]:
    """SIGINT and SIGTERM that arrive inside the block take effect when it ends, as they would have (the handler in
    place before it runs, or the default action). Around a child process's start, which is a handshake: a rank forked
    from the fork server is asked for over a socket, and a front stopped in the middle of that (`pd up` stopping an
    instance that is still starting) left the server to die on a half-sent message, printing its traceback into the
    instance's output; a spawned process (the other front processes) reads its start from a pipe the same way. Only
    on the main thread (the only one Python runs signal handlers on); a signal whose handler is not Python's (set by
    C code) is left alone."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    arrived: list[int] = []
    held = [sig for sig in (signal.SIGINT, signal.SIGTERM) if signal.getsignal(sig) is not None]
    previous = {sig: signal.signal(sig, lambda signum, frame: arrived.append(signum)) for sig in held}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        for sig in dict.fromkeys(arrived):  # each signal once, in the order they came
            signal.raise_signal(sig)


def name_process(name: str) -> None:
    """The name `ps -o comm`, `top` and /proc/PID/comm show for this process (Linux; 15 characters)."""
    if sys.platform.startswith("linux"):
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_NAME, name.encode()[:15], 0, 0, 0)


class RankProcesses:
    """This node's ranks: ``procs[i]`` is global rank ``first_rank + i``; ``leaders`` the pipes to its leaders."""

    def __init__(self, procs: list[Any], first_rank: int, leaders: list[LeaderLink], store_dir: str | None = None,
                 worker_leaders: list[list[LeaderLink]] | None = None) -> None:  # fmt: skip
        self.procs, self.first_rank, self.leaders = procs, first_rank, leaders
        self.store_dir = store_dir  # a file store's directory, removed once the ranks are gone
        # The pipes of the other front processes (--tokenizer-worker-num): worker_leaders[k][i] is front k + 1's link
        # to leader i. This process hands them over and closes its copies (pd.server.front_workers).
        self.worker_leaders = worker_leaders or []

    @classmethod
    def spawn(cls, layout: InstanceLayout, target: RankTarget, payload: Any, with_front: bool = True,
              fronts: int = 1) -> RankProcesses:  # fmt: skip
        """Starts this node's ranks, each running ``target(payload, rank, init_method, inbox, outbox)`` (both
        pickled into the new process); with_front: this process is the front, holding a pipe pair to each local
        leader. With ``fronts`` > 1 each leader gets a pipe pair per front process (lists, this process's first;
        the others' in ``worker_leaders``). The ranks die with the calling thread: call this from one that lives as
        long as they should (a main thread, the front's event-loop thread)."""
        ctx = mp.get_context(_start_method)
        method = init_method(layout) if layout.tp > 1 else None
        procs: list[Any] = []
        links: list[list[LeaderLink]] = [[] for _ in range(fronts)]  # links[k][i]: front k to local leader i
        for rank in layout.local_ranks:
            rank_ends: list[Connection] = []
            inbox_arg: Connection | list[Connection] | None = None
            outbox_arg: Connection | list[Connection] | None = None
            if with_front and layout.rank(rank).is_leader:
                inboxes, outboxes = [], []
                for k in range(fronts):
                    inbox_r, inbox_w = ctx.Pipe(duplex=False)
                    outbox_r, outbox_w = ctx.Pipe(duplex=False)
                    widen_pipe(inbox_w)
                    widen_pipe(outbox_w)
                    links[k].append(LeaderLink(inbox_w, outbox_r))
                    inboxes.append(inbox_r)
                    outboxes.append(outbox_w)
                rank_ends = inboxes + outboxes
                inbox_arg, outbox_arg = (inboxes, outboxes) if fronts > 1 else (inboxes[0], outboxes[0])
            proc = ctx.Process(
                target=_rank_main,
                args=(os.getpid(), target, payload, rank, method, inbox_arg, outbox_arg),
                name=f"pd-rank{rank}",
                daemon=True,
            )
            with signals_held():
                proc.start()
            for end in rank_ends:
                end.close()
            procs.append(proc)
        leaders = links[0]
        store_dir = os.path.dirname(method.removeprefix("file://")) if method and method.startswith("file://") else None
        if store_dir is not None:  # also when this process exits without stopping its ranks itself
            atexit.register(shutil.rmtree, store_dir, True)
        return cls(procs, layout.local_ranks[0], leaders, store_dir, links[1:])

    def add_remote_leaders(self, conns: dict[int, Connection]) -> None:
        """The other nodes' DP leaders (global rank -> connection), after this node's: leaders[i] is DP group i."""
        self.leaders += [LeaderLink(conns[rank], conns[rank]) for rank in sorted(conns)]

    def all_alive(self) -> bool:
        return all(p.is_alive() for p in self.procs)

    def wait_any_exit(self) -> tuple[int, int | None]:
        """Blocks until a rank process exits -> (its global rank, exit code)."""
        sentinels = {p.sentinel: i for i, p in enumerate(self.procs)}
        ready = wait(list(sentinels))
        i = sentinels[ready[0]]  # type: ignore[index]
        self.procs[i].join(1)
        return self.first_rank + i, self.procs[i].exitcode

    def stop(self, timeout: float) -> None:
        """Closing the pipes makes each leader stop its followers and return; stragglers are killed."""
        for link in self.leaders:
            link.inbox.close()
        deadline = time.monotonic() + timeout
        for p in self.procs:
            p.join(max(0.0, deadline - time.monotonic()))
        self.kill()

    def kill(self) -> None:
        for p in self.procs:
            if p.is_alive():
                p.kill()
        for p in self.procs:
            p.join(5)
        if self.store_dir is not None:
            shutil.rmtree(self.store_dir, ignore_errors=True)


def run_worker_node(layout: InstanceLayout, target: RankTarget, payload: Any) -> int:
    """``pd serve --node-rank N`` (N > 0): this node's ranks, no HTTP front. Returns when a rank exits (or on
    SIGINT/SIGTERM, after stopping them); the exit status is the first exiting rank's."""
    assert layout.node_rank > 0
    ranks = RankProcesses.spawn(layout, target, payload, with_front=False)
    logger.info("node %d of %d: ranks %d..%d started; joining %s", layout.node_rank, layout.nnodes, ranks.first_rank,
                ranks.first_rank + len(ranks.procs) - 1, layout.init_addr)
    stop = {"signal": 0}

    def on_signal(signum: int, frame: object) -> None:
        stop["signal"] = signum
        ranks.kill()

    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, on_signal)
    rank, code = ranks.wait_any_exit()
    if stop["signal"]:
        return 0
    level = logging.INFO if code == 0 else logging.ERROR
    logger.log(level, "rank %d exited with code %s; stopping this node's other ranks", rank, code)
    ranks.kill()
    return 0 if code == 0 else 1
