"""The HTTP front's other processes (--tokenizer-worker-num N): N - 1 more processes serving the same app on the
same port, so that streaming is not bound by one process's core.

One front process handles every event of the streams it serves (engine message, detokenizing, SSE framing, socket
write: ~50-75 us per event on an H200 host), so one process streams at most ~15-20 thousand events a second, which
a batch-64 FP8 decode on one H200 already exceeds. Each process listens on --port with SO_REUSEPORT (the kernel
spreads new connections over them), runs its own tokenizer and detokenizers, and holds its own pipe pair to each
engine leader (pd.dist.launch.RankProcesses.spawn(fronts=N)); the engine sends each request's outputs to the
process that sent it. The first process owns the ranks: a worker that exits stops the server, the first process's
shutdown stops the workers (SIGTERM: each drains its own requests) before the engine. Every front process answers
health checks with 503 until all of them listen: the kernel spreads only the connections made after that, so a load
balancer that sends traffic on the first 200 would otherwise put every early connection on the first process.
"""

from __future__ import annotations

import logging
import multiprocessing as mp
import os
import socket
import sys
import threading
import time
from collections.abc import Callable
from multiprocessing.connection import Connection, wait
from typing import Any

from pd.dist.launch import LeaderLink, die_with_parent, name_process, signals_held
from pd.engine.spec import EngineSpec
from pd.server_args import ServerArgs

logger = logging.getLogger(__name__)

LOG_FORMAT = "%(asctime)s %(processName)s %(levelname)s %(name)s: %(message)s"
# How long a worker may take to take over its pipe ends (its interpreter starting and unpickling its arguments).
START_TIMEOUT_S = 120.0
# A worker's exit status when the engine failed to start: the first front process reports why and exits itself.
ENGINE_FAILED_EXIT = 3


def listen_socket(host: str, port: int) -> socket.socket:
    """A listening TCP socket on host:port that other front processes can bind too (SO_REUSEPORT)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind((host, port))
    sock.listen(2048)
    sock.set_inheritable(False)
    return sock


class SharedFlag:
    """A flag the first front process sets and every front process reads (each front's health): a shared byte
    rather than a multiprocessing Event, so reading it takes no lock that a dying process could leave held. Passed
    to a worker when it is spawned."""

    def __init__(self, ctx: Any) -> None:
        self._byte = ctx.RawValue("b", 0)

    def set(self) -> None:
        self._byte.value = 1

    def is_set(self) -> bool:
        return self._byte.value == 1


class FrontWorkers:
    """The first front process's handle on the others: started with the ranks, watched, stopped."""

    def __init__(self, procs: list[Any], links: list[list[LeaderLink]], all_listening: SharedFlag) -> None:
        self.procs, self._links = procs, links
        self._stopping = False
        self.listening = threading.Event()  # set once every worker listens on the port
        self.all_listening: SharedFlag = all_listening  # set by the first process once it listens too

    @classmethod
    def start(cls, args: ServerArgs, spec: EngineSpec, links: list[list[LeaderLink]],
              on_exit: Callable[[str], None]) -> FrontWorkers:  # fmt: skip
        """Starts a process per entry of ``links`` (its pipes to the leaders); ``on_exit(reason)`` runs on a watcher
        thread when one exits before ``terminate``."""
        ctx = mp.get_context("spawn")
        procs, started = [], []
        all_listening = SharedFlag(ctx)
        for k, front_links in enumerate(links, start=1):
            ready_r, ready_w = ctx.Pipe(duplex=False)
            proc = ctx.Process(target=_worker_main, args=(os.getpid(), args, spec, front_links, k, ready_w,
                                                          all_listening), name=f"pd-front{k}", daemon=True)  # fmt: skip
            with signals_held():  # a stop in the middle of the start would leave the child a half-written start
                proc.start()
            ready_w.close()
            procs.append(proc)
            started.append(ready_r)
        workers = cls(procs, links, all_listening)
        threading.Thread(target=workers._watch, args=(started, on_exit), name="pd-front-watch", daemon=True).start()
        return workers

    def _watch(self, started: list[Connection], on_exit: Callable[[str], None]) -> None:
        # Pipe ends travel to a spawned process through this process (it hands each over when the child asks), so
        # ours close only once the worker holds its own; a leader sees a front gone only when every copy of its
        # pipe's end is closed.
        for k, ready in enumerate(started):
            if ready.poll(START_TIMEOUT_S):
                try:
                    ready.recv_bytes()
                except EOFError:
                    pass
            for link in self._links[k]:
                link.inbox.close()
                link.outbox.close()
        sentinels = {p.sentinel: p for p in self.procs}
        # Each worker says once more when it listens (after the engine is ready: no timeout, a load may take long);
        # a worker that exits first ends the wait (the exit is handled below).
        pending = list(started)
        while pending:
            woken = wait(pending + list(sentinels))
            if any(w in sentinels for w in woken):
                break
            for ready in woken:
                try:
                    ready.recv_bytes()
                except (EOFError, OSError):
                    pass
                pending.remove(ready)
        else:
            self.listening.set()
        for ready in started:
            ready.close()
        gone = sentinels[wait(list(sentinels))[0]]  # type: ignore[index]
        gone.join(1)
        if not self._stopping and gone.exitcode != ENGINE_FAILED_EXIT:
            on_exit(f"front process {gone.name} (pid {gone.pid}) exited with code {gone.exitcode}")

    def terminate(self) -> None:
        """SIGTERM to every worker: each stops taking connections and drains its requests, as the first does."""
        self._stopping = True
        for p in self.procs:
            if p.is_alive():
                p.terminate()

    def join(self, timeout: float) -> None:
        """Waits up to ``timeout`` seconds for the workers to exit (after ``terminate``); kills stragglers."""
        self.terminate()
        deadline = time.monotonic() + timeout
        for p in self.procs:
            p.join(max(0.0, deadline - time.monotonic()))
            if p.is_alive():
                logger.warning("front process %s did not stop within %.0f s; killing it", p.name, timeout)
                p.kill()
                p.join(5)


def _worker_main(parent: int, args: ServerArgs, spec: EngineSpec, links: list[LeaderLink], index: int,
                 ready: Connection, all_listening: SharedFlag) -> None:  # fmt: skip
    die_with_parent(parent)
    ready.send_bytes(b"started")  # its pipe ends are unpickled: the first process may close its copies
    name_process(f"pd-front{index}")
    logging.basicConfig(level=args.log_level.upper(), format=LOG_FORMAT, force=True)
    from pd.server.app import run_front_worker

    try:
        run_front_worker(args, spec, links, index, lambda: _say_listening(ready), all_listening.is_set)
    except RuntimeError as e:
        if not str(e).startswith("engine failed to start"):
            raise
        sys.exit(ENGINE_FAILED_EXIT)  # the first front process says why


def _say_listening(ready: Connection) -> None:
    try:
        ready.send_bytes(b"listening")
    except OSError:  # the first process is gone: this worker is about to follow it
        pass
    ready.close()
