"""Prefill scheduler: the base continuous-batching scheduler, except that a request ends after its prompt.

A request keeps only its prompt's KV pages. When the prompt's last chunk has run and the first token is sampled,
the request leaves the batch and waits for its KV sender: once the decode peer has registered its destination
pages (WaitingForInput) the pages and the first token are sent (not the pages of a prefix the decode holds in
its own prefix cache, whatever this instance's cache held); on Success or Failed the pages are freed (or cached)
and the request finishes (the load balancer consumes this answer; the client's comes from decode). With tensor
parallelism each rank caches its share of the KV heads: the followers' shares of a room go to them over the step
broadcast as soon as it is sent, and Success waits for every share.
"""

from __future__ import annotations

import dataclasses
import logging

from kvtransfer import get_kv_backend
from kvtransfer.base import FirstToken, KVPoll, KVSender, prompt_fingerprint
from pd.engine.disagg import DisaggConfig, follower_targets, kv_args
from pd.engine.io import EngineStats, GenerateRequest, TokenOutput
from pd.engine.model_runner import ModelRunner
from pd.engine.request import Req, ReqState
from pd.engine.scheduler import Scheduler, SchedulerConfig

logger = logging.getLogger(__name__)


class PrefillScheduler(Scheduler):
    def __init__(self, cfg: SchedulerConfig, runner: ModelRunner, disagg: DisaggConfig) -> None:
        super().__init__(cfg, runner)
        backend = get_kv_backend(disagg.backend)
        self.kv_manager = backend.start_prefill_manager(kv_args(runner), disagg, peers=follower_targets(runner))
        self._sender_cls = backend.KVSender
        self.senders: dict[str, KVSender] = {}
        self.transferring: list[Req] = []
        self.kv_pages_sent_total = 0  # pages that landed on decode instances

    @property
    def has_work(self) -> bool:
        return super().has_work or bool(self.transferring)

    def live_requests(self) -> list[Req]:
        return super().live_requests() + self.transferring

    def stats(self) -> EngineStats:
        return dataclasses.replace(super().stats(), kv_pages_sent_total=self.kv_pages_sent_total)

    def _kv_tokens(self, msg: GenerateRequest) -> int:
        return len(msg.input_ids)  # the first token's KV is computed by decode, not here

    def _enqueue(self, req: Req, msg: GenerateRequest) -> TokenOutput | None:
        assert msg.bootstrap_room is not None, "the HTTP front refuses PD requests without bootstrap fields"
        sender = self._sender_cls(self.kv_manager, msg.bootstrap_room, prompt_fingerprint(req.prompt_ids))
        if sender.poll() == KVPoll.Failed:  # e.g. the room is taken by a request still in flight: refuse, don't run
            return TokenOutput(req.rid, [], req.prompt_len, 0, "error",
                               error=f"bootstrap_room refused: {sender.failure_reason}", status=409)
        self.senders[req.rid] = sender
        return super()._enqueue(req, msg)

    def _decodes_further(self, req: Req) -> bool:
        return False  # decode computes every token after the first

    def _on_sampled(self, req: Req, token: int) -> TokenOutput | None:
        req.output_ids.append(token)
        self.running.remove(req)
        req.state = ReqState.TRANSFERRING
        self.transferring.append(req)
        return None

    def poll_transfers(self) -> list[TokenOutput]:
        outputs = []
        for req in list(self.transferring):
            sender = self.senders[req.rid]
            state = sender.poll()
            if state == KVPoll.WaitingForInput and not req.kv_sent:
                sender.send(req.pages, req.prompt_len, FirstToken(req.output_ids[0], req.prompt_len))
                req.kv_sent = True
                self._hand_out_parts()
            elif state == KVPoll.Success:
                self.kv_pages_sent_total += len(req.pages) - sender.peer_cached_tokens // self.page_size
                req.finish_reason = "length"
                outputs.append(self._finish(req))
            elif state == KVPoll.Failed:
                logger.warning("request %s: KV transfer failed: %s", req.rid, sender.failure_reason)
                req.finish_reason = "error"
                outputs.append(self._finish(req, error=f"KV transfer to decode failed: {sender.failure_reason}"))
        return outputs

    def _hand_out_parts(self) -> None:
        """The followers' shares of the rooms just sent (each rank caches its KV heads and writes them itself), over
        the step broadcast: they hear of rooms no other way."""
        take = getattr(self.kv_manager, "take_part_jobs", None)
        jobs = take() if take is not None else []
        if jobs:
            assert self.runner.sync is not None, "shares of a room for followers of a single-rank instance"
            self.runner.sync.send({"op": "kv_send", "jobs": [[rank, job] for rank, job in jobs]})

    def _finish(self, req: Req, error: str | None = None) -> TokenOutput:
        out = self._output(req)
        if error is not None:
            out = TokenOutput(
                out.rid, out.new_token_ids, out.prompt_tokens, out.completion_tokens, "error", error=error
            )
        self._release(req)
        return out

    def _release(self, req: Req) -> None:
        if req.state is ReqState.TRANSFERRING:
            self.transferring.remove(req)
        sender = self.senders.pop(req.rid, None)
        if sender is not None and req.finish_reason in ("abort", "error"):
            sender.abort()
        super()._release(req)

