"""Decode scheduler: requests arrive with their prompt already being prefilled elsewhere.

Each request first takes KV pages for its prompt and every token it may generate (the preallocation queue
waits while the pool is short), registers the prompt's pages with its prefill peer (KVReceiver.init), and
waits in the transfer list. The registration names every rank of the attention group (the followers' endpoints
came at start-up, pd.engine.disagg.follower_targets): prefill writes each rank's pages into that rank's own memory, at
the page ids the leader chose, and the status comes here once all of them have landed. On Success its first token
(sampled by prefill) is reported and the request joins the running batch as if it had prefilled here; on Failed
or timeout it ends with the reason and its pages are freed (followers hold no pool: the leader's is the only one).

With --disaggregation-decode-enable-radix-cache, decode keeps a prefix cache like a unified instance's: a request
starts from the longest cached whole-page prefix of its prompt (locked pages of finished requests: their prompt,
received, and their output, computed here), registers the number of tokens it covers, and prefill writes only the
pages after them; when it ends its pages go into the cache. Pages of a transfer that may still land are
quarantined, the cached prefix's never (prefill does not write them): those are unlocked at once.
"""

from __future__ import annotations

import logging
import os
import time
from collections import deque

from kvtransfer import get_kv_backend
from kvtransfer.base import KVPoll, KVReceiver, prompt_fingerprint
from pd.engine.disagg import DisaggConfig, follower_targets, kv_args
from pd.engine.io import GenerateRequest, TokenOutput
from pd.engine.model_runner import ModelRunner
from pd.engine.request import Req, ReqState
from pd.engine.scheduler import Scheduler, SchedulerConfig

logger = logging.getLogger(__name__)

# Longer than any single transfer call on the prefill side may still run after decode gave up on it. The test suite
# shortens it (its transfers are loopback copies of a few pages) through PD_KV_QUARANTINE_S.
QUARANTINE_S = float(os.environ.get("PD_KV_QUARANTINE_S") or 15.0)


class DecodeScheduler(Scheduler):
    def __init__(self, cfg: SchedulerConfig, runner: ModelRunner, disagg: DisaggConfig) -> None:
        # cfg.radix_cache: --disaggregation-decode-enable-radix-cache (pd.engine.spec.scheduler_config)
        super().__init__(cfg, runner)
        backend = get_kv_backend(disagg.backend)
        self.kv_manager = backend.start_decode_manager(kv_args(runner), disagg, peers=follower_targets(runner))
        self._receiver_cls = backend.KVReceiver
        self.receivers: dict[str, KVReceiver] = {}
        self.prealloc: deque[Req] = deque()
        self.transferring: list[Req] = []
        # Pages of requests that ended while prefill may still be writing into them: freed after a grace period
        # (a transfer call already in flight on the prefill side cannot be recalled).
        self.quarantine: deque[tuple[float, list[int]]] = deque()

    def warm_up(self) -> None:
        pass  # decode batches run from CUDA graphs, captured (and so compiled) at start-up; no prompt runs here

    @property
    def has_work(self) -> bool:
        return super().has_work or bool(self.prealloc or self.transferring or self.quarantine)

    @property
    def needs_compute(self) -> bool:
        return bool(self.running or self.in_flight)

    def live_requests(self) -> list[Req]:
        return super().live_requests() + list(self.prealloc) + self.transferring

    def _enqueue(self, req: Req, msg: GenerateRequest) -> TokenOutput | None:
        assert msg.bootstrap_host is not None and msg.bootstrap_port is not None and msg.bootstrap_room is not None
        receiver = self._receiver_cls(self.kv_manager, msg.bootstrap_host, msg.bootstrap_port, msg.bootstrap_room,
                                      prompt_fingerprint(req.prompt_ids))
        if receiver.poll() == KVPoll.Failed:  # e.g. the room is taken by a request still in flight: refuse at once
            return TokenOutput(req.rid, [], req.prompt_len, 0, "error",
                               error=f"bootstrap_room refused: {receiver.failure_reason}", status=409)
        self.receivers[req.rid] = receiver
        req.state = ReqState.TRANSFERRING  # queued for pages; _release looks in prealloc first
        self.prealloc.append(req)
        return None

    def poll_transfers(self) -> list[TokenOutput]:
        now = time.monotonic()
        while self.quarantine and self.quarantine[0][0] <= now:
            self.pool.free(self.quarantine.popleft()[1])
        self._preallocate()
        outputs = []
        for req in list(self.transferring):
            receiver = self.receivers[req.rid]
            state = receiver.poll()
            if state == KVPoll.Success:
                first = receiver.result()  # every rank's pages have landed
                self.transferring.remove(req)
                self.receivers.pop(req.rid)
                req.num_computed = req.prompt_len
                req.state = ReqState.RUNNING
                self.running.append(req)
                self.prompt_tokens_total += req.prompt_len
                self.cached_tokens_total += req.cached_tokens
                self.generated_tokens_total += 1
                out = super()._on_sampled(req, first.token_id)
                if out is not None:
                    outputs.append(out)
            elif state == KVPoll.Failed:
                logger.warning("request %s: KV transfer failed: %s", req.rid, receiver.failure_reason)
                req.finish_reason = "error"
                out = self._output(req)
                self._release(req)
                outputs.append(TokenOutput(out.rid, [], out.prompt_tokens, 0, "error",
                                           error=f"KV transfer from prefill failed: {receiver.failure_reason}"))
        return outputs

    def _preallocate(self) -> None:
        """Takes pages (a cached prefix and fresh ones) and a slot row for queued requests, oldest first, and
        registers them with prefill."""
        while self.prealloc and self.slots.num_free_rows > 0:
            req = self.prealloc[0]
            if not self._take_pages(req):
                return
            row = self.slots.alloc_row()
            assert row is not None
            self.prealloc.popleft()
            req.row, req.state = row, ReqState.TRANSFERRING
            self.slots.assign_pages(row, 0, req.pages)
            prompt_pages = req.pages[: self._pages_for(req.prompt_len)]
            self.receivers[req.rid].init(prompt_pages, req.prompt_len, req.cached_tokens)
            self.transferring.append(req)

    def _release(self, req: Req) -> None:
        if req.state is ReqState.TRANSFERRING:
            if req in self.prealloc:
                self.prealloc.remove(req)
            else:
                self.transferring.remove(req)
                if req.pages:  # registered with prefill, not known complete: its writes may still land
                    cached = req.cached_tokens // self.page_size  # pages prefill never writes: unlocked below
                    self.quarantine.append((time.monotonic() + QUARANTINE_S, req.pages[cached:]))
                    req.pages = req.pages[:cached]
        receiver = self.receivers.pop(req.rid, None)
        if receiver is not None:
            receiver.abort()
        super()._release(req)

