"""Spawning the rank processes of an instance on this node, and noticing when one of them dies.

Node 0 runs the HTTP front, which spawns its local ranks and holds a pipe pair to each leader (one, or one per
DP-attention group). Other nodes (``--node-rank > 0``) run no front: they spawn their ranks and exit when any of
them exits. Their ranks follow a leader, except under DP attention, where a group that lives on another node has
its leader there; it reaches the front over TCP (pd.dist.leader_link).
"""

from __future__ import annotations

import logging
import multiprocessing as mp
import signal
import socket
import time
from dataclasses import dataclass
from multiprocessing.connection import Connection, wait
from typing import Any

from pd.dist.rank import rank_info
from pd.engine.engine_process import SchedulerFactory, run_engine
from pd.engine.model_runner import RunnerConfig
from pd.engine.scheduler import SchedulerConfig
from pd.server_args import ServerArgs

logger = logging.getLogger(__name__)


@dataclass
class LeaderLink:
    inbox: Connection  # front -> leader
    outbox: Connection  # leader -> front


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def init_method(args: ServerArgs) -> str:
    """Where rank 0's rendezvous store listens: --dist-init-addr across nodes, a free loopback port otherwise."""
    return f"tcp://{args.dist_init_addr}" if args.nnodes > 1 else f"tcp://127.0.0.1:{_free_port()}"


class RankProcesses:
    """This node's ranks: ``procs[i]`` is global rank ``first_rank + i``; ``leaders`` the pipes to its leaders."""

    def __init__(self, procs: list[Any], first_rank: int, leaders: list[LeaderLink]) -> None:
        self.procs, self.first_rank, self.leaders = procs, first_rank, leaders

    @classmethod
    def spawn(
        cls,
        args: ServerArgs,
        runner_cfg: RunnerConfig,
        sched_cfg: SchedulerConfig,
        make_scheduler: SchedulerFactory,
        with_front: bool = True,
    ) -> RankProcesses:
        ctx = mp.get_context("spawn")
        layout = rank_info(args, 0)
        per_node = layout.ranks_per_node
        first = args.node_rank * per_node
        method = init_method(args) if args.tp_size > 1 else None
        procs, leaders = [], []
        for rank in range(first, first + per_node):
            inbox_r = outbox_w = None
            if with_front and layout.of(rank).is_leader:
                inbox_r, inbox_w = ctx.Pipe(duplex=False)
                outbox_r, outbox_w = ctx.Pipe(duplex=False)
                leaders.append(LeaderLink(inbox_w, outbox_r))
            proc = ctx.Process(
                target=run_engine,
                args=(runner_cfg, sched_cfg, args, inbox_r, outbox_w, make_scheduler, rank, method),
                name=f"pd-rank{rank}",
                daemon=True,
            )
            proc.start()
            for end in (inbox_r, outbox_w):
                if end is not None:
                    end.close()
            procs.append(proc)
        return cls(procs, first, leaders)

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


def remote_leader_ranks(args: ServerArgs) -> list[int]:
    """Global ranks of the DP-attention leaders on nodes other than 0 (they connect to the front over TCP)."""
    layout = rank_info(args, 0)
    return [r for r in range(args.tp_size) if layout.of(r).is_leader and layout.of(r).node_rank != 0]


def run_worker_node(args: ServerArgs, make_scheduler: SchedulerFactory) -> int:
    """``pd serve --node-rank N`` (N > 0): this node's ranks, no HTTP front. Returns when a rank exits (or on
    SIGINT/SIGTERM, after stopping them); the exit status is the first exiting rank's."""
    from pd.engine.client import runner_config, scheduler_config

    assert args.model_path is not None and args.node_rank > 0
    ranks = RankProcesses.spawn(args, runner_config(args, args.model_path), scheduler_config(args), make_scheduler,
                                with_front=False)
    logger.info("node %d of %d: ranks %d..%d started; joining %s", args.node_rank, args.nnodes, ranks.first_rank,
                ranks.first_rank + len(ranks.procs) - 1, args.dist_init_addr)
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
