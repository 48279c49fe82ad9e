"""The engine process: owns the model, runs the scheduler loop, talks to the HTTP front over two pipes.

Messages are msgpack dicts (pd.engine.io). Front -> engine: GenerateRequest, AbortRequest. Engine -> front:
first {"ready": info} or {"fatal": reason}, then after every step {"outputs": [...], "stats": {...}}.
"""

from __future__ import annotations

import logging
import os
import signal
import traceback
from collections.abc import Callable
from multiprocessing.connection import Connection
from typing import Any

import msgpack
import torch

from pd.engine.io import AbortRequest, GenerateRequest, TokenOutput, from_dict, to_dict
from pd.engine.model_runner import ModelRunner, RunnerConfig
from pd.engine.scheduler import Scheduler, SchedulerConfig
from pd.server_args import ServerArgs

logger = logging.getLogger("pd.engine")


def _send(conn: Connection, payload: dict[str, Any]) -> None:
    conn.send_bytes(msgpack.packb(payload, use_bin_type=True))


# Builds the scheduler of an instance's role; prefill and decode instances pass their own (pd/ cannot import
# them), called in the engine process with the loaded runner and the instance's server arguments.
SchedulerFactory = Callable[[SchedulerConfig, ModelRunner, ServerArgs], Scheduler]


def default_scheduler(cfg: SchedulerConfig, runner: ModelRunner, server_args: ServerArgs) -> Scheduler:
    return Scheduler(cfg, runner)


def run_engine(
    runner_cfg: RunnerConfig,
    sched_cfg: SchedulerConfig,
    server_args: ServerArgs,
    inbox: Connection,
    outbox: Connection,
    make_scheduler: SchedulerFactory = default_scheduler,
) -> None:
    """Process entry point. Returns when the front closes its pipe."""
    # The front stops this process by closing the pipe, after aborting its requests; a terminal's Ctrl-C reaches
    # the whole process group and must not kill the engine under the front's graceful shutdown.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    logging.basicConfig(level=server_args.log_level.upper(),
                        format="%(asctime)s %(processName)s %(levelname)s %(name)s: %(message)s")
    # OMP_NUM_THREADS wins: instances sharing a host (pd up) that each take every core starve one another.
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS") or 0) or os.cpu_count() or 1)
    try:
        runner = ModelRunner(runner_cfg)
        scheduler = make_scheduler(sched_cfg, runner, server_args)
    except Exception as e:  # report why loading failed instead of dying silently
        logger.error("engine failed to start: %s", traceback.format_exc())
        _send(outbox, {"fatal": f"{type(e).__name__}: {e}"})
        return
    _send(outbox, {"ready": {"context_length": runner.context_length, "stats": to_dict(scheduler.stats()),
                             "model_config": runner.model_config.raw}})
    EngineLoop(scheduler, inbox, outbox).run()


class EngineLoop:
    def __init__(self, scheduler: Scheduler, inbox: Connection, outbox: Connection) -> None:
        self.scheduler, self.inbox, self.outbox = scheduler, inbox, outbox

    def run(self) -> None:
        while True:
            # Block while idle; while only waiting on peers (KV transfers), wake every 2 ms to poll them.
            if not self.scheduler.has_work:
                timeout: float | None = None
            else:
                timeout = 0.0 if self.scheduler.needs_compute else 0.002
            try:
                outputs = self._drain_inbox(timeout)
            except EOFError:
                logger.info("front closed the pipe; engine exiting")
                return
            if self.scheduler.has_work:
                outputs += self._step()
            _send(self.outbox, {"outputs": [to_dict(o) for o in outputs], "stats": to_dict(self.scheduler.stats())})

    def _drain_inbox(self, timeout: float | None) -> list[TokenOutput]:
        outputs: list[TokenOutput] = []
        if timeout != 0.0:
            self.inbox.poll(timeout)
        while self.inbox.poll(0):
            msg = from_dict(msgpack.unpackb(self.inbox.recv_bytes(), raw=False))
            out = None
            if isinstance(msg, GenerateRequest):
                out = self.scheduler.add(msg)
            elif isinstance(msg, AbortRequest):
                out = self.scheduler.abort(msg.rid)
            if out is not None:
                outputs.append(out)
        return outputs

    def _step(self) -> list[TokenOutput]:
        try:
            return self.scheduler.step()
        except Exception as e:
            # A bug in a forward must not take the server down: fail the requests in flight, keep serving.
            logger.error("step failed; ending the running requests: %s", traceback.format_exc())
            outputs = []
            for req in self.scheduler.live_requests():
                out = self.scheduler.abort(req.rid)
                if out is not None:
                    outputs.append(TokenOutput(out.rid, out.new_token_ids, out.prompt_tokens, out.completion_tokens,
                                               "error", error=f"internal error: {type(e).__name__}: {e}"))
            return outputs
