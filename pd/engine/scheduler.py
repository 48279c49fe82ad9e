"""Continuous batching with chunked prefill.

Every step runs one batch that holds each running request's next token (decode) plus as many prompt tokens
as the chunked-prefill budget allows, oldest request first. KV pages for a request's whole budget (prompt plus
max_new_tokens, capped by the context length) are taken when it is admitted, so a running request never runs
out of pages and nothing needs preempting; they are all returned when it finishes or is aborted.
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import math
import time
from collections import deque
from dataclasses import dataclass

import torch

from pd.engine.io import EngineStats, GenerateRequest, TokenOutput
from pd.engine.kv_cache import PagePool
from pd.engine.model_runner import ModelRunner
from pd.engine.request import Req, ReqState
from pd.engine.sampler import sample_each

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class SchedulerConfig:
    max_running_requests: int
    chunked_prefill_size: int  # -1: whole prompts in one step
    overlap: bool = False  # prepare step N+1 on the host while the device runs step N (--disable-overlap-schedule)


class Scheduler:
    def __init__(self, cfg: SchedulerConfig, runner: ModelRunner) -> None:
        self.cfg = cfg
        self.runner = runner
        self.page_size = runner.cfg.page_size
        self.context_length = runner.context_length
        self.pool = PagePool(runner.num_pages)
        self.slots = runner.make_slot_table(cfg.max_running_requests, self.context_length)
        self.eos_ids = set(runner.model_config.eos_token_ids)
        self.waiting: deque[Req] = deque()
        self.running: list[Req] = []
        self.prompt_tokens_total = 0
        self.generated_tokens_total = 0

    # ---- requests in and out ----
    def add(self, msg: GenerateRequest) -> TokenOutput | None:
        """Queues a request; returns an error output right away if it can never run."""
        prompt_len = len(msg.input_ids)
        kv_tokens = self._kv_tokens(msg)
        error = None
        if prompt_len == 0:
            error = "the prompt is empty"
        elif prompt_len >= self.context_length:
            error = f"the prompt has {prompt_len} tokens; the context length is {self.context_length}"
        elif self._pages_for(kv_tokens) > self.pool.num_pages:
            capacity = self.pool.num_pages * self.page_size
            error = f"the request needs {kv_tokens} tokens of KV cache; the pool holds {capacity}"
        if error:
            return TokenOutput(msg.rid, [], prompt_len, 0, finish_reason="error", error=error)
        req = Req(
            msg.rid,
            list(msg.input_ids),
            msg.sampling,
            min(self.context_length, prompt_len + msg.sampling.max_new_tokens),
        )
        if msg.sampling.seed is not None:
            try:
                req.generator = torch.Generator(self.runner.device).manual_seed(msg.sampling.seed)
            except (RuntimeError, OverflowError) as e:
                return TokenOutput(msg.rid, [], prompt_len, 0, finish_reason="error", error=f"bad seed: {e}")
        req.kv_tokens = kv_tokens
        req.every_token = msg.every_token
        return self._enqueue(req, msg)

    def _kv_tokens(self, msg: GenerateRequest) -> int:
        """KV slots a request reserves on admission: its whole prompt and every token it may generate."""
        return min(self.context_length, len(msg.input_ids) + msg.sampling.max_new_tokens)

    def _enqueue(self, req: Req, msg: GenerateRequest) -> TokenOutput | None:
        self.waiting.append(req)
        return None

    def live_requests(self) -> list[Req]:
        return list(self.waiting) + self.running

    def abort(self, rid: str) -> TokenOutput | None:
        for req in self.live_requests():
            if req.rid == rid:
                req.finish_reason = "abort"
                out = self._output(req)
                self._release(req)
                return out
        return None

    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def stats(self) -> EngineStats:
        return EngineStats(
            num_waiting=len(self.waiting),
            num_running=len(self.running),
            kv_pages_total=self.pool.num_pages,
            kv_pages_free=self.pool.num_free,
            page_size=self.page_size,
            generated_tokens_total=self.generated_tokens_total,
            prompt_tokens_total=self.prompt_tokens_total,
            **self._eplb_stats(),
        )

    def _eplb_stats(self) -> dict[str, int | float]:
        eplb = self.runner.eplb
        if eplb is None or eplb.last_report is None:
            return {}
        return {"eplb_rebalances": eplb.rebalances, "eplb_balancedness": eplb.last_report.balancedness_before}

    # ---- one step ----
    @property
    def needs_compute(self) -> bool:
        """False when the only pending work is waiting on peers (transfers): the loop may sleep briefly."""
        return bool(self.waiting or self.running)

    @property
    def has_prefill_work(self) -> bool:
        """Whether the next forward may carry prompt tokens (decides the dispatch mode under DP attention)."""
        return bool(self.waiting) or any(r.is_prefilling for r in self.running)

    def step(self) -> list[TokenOutput]:
        outputs = self.poll_transfers()
        return outputs + self.compute()

    def compute(self) -> list[TokenOutput]:
        """Admits waiting requests and runs one forward if the batch is not empty (the part of a step that may
        join collectives: under DP attention the leaders agree on it between poll_transfers and this)."""
        self._admit()
        return self._forward_step() if self.running else []

    def poll_transfers(self) -> list[TokenOutput]:
        """Hook for disaggregated schedulers: advance requests whose KV is moving between instances."""
        return []

    def _forward_step(self) -> list[TokenOutput]:
        batch_reqs, extend_lens = self._plan()
        prefix_lens = [r.num_computed for r in batch_reqs]
        input_ids: list[int] = []
        for req, n in zip(batch_reqs, extend_lens, strict=True):
            input_ids.extend(req.next_input_ids(n))
        # Logits only where a request's known tokens are all in after this step (it needs its next token).
        ends = [end - 1 for end in itertools.accumulate(extend_lens)]
        sampled = [
            i
            for i, (r, n) in enumerate(zip(batch_reqs, extend_lens, strict=True))
            if r.num_computed + n == r.num_tokens
        ]
        batch = self.runner.build_batch(
            input_ids,
            [r.row for r in batch_reqs],
            prefix_lens,
            extend_lens,
            self.slots,
            logits_index=[ends[i] for i in sampled],
        )
        now = time.monotonic()
        for req in batch_reqs:
            if req.first_scheduled is None:
                req.first_scheduled = now
        logits = self.runner.forward(batch)  # always: a middle prompt chunk samples nothing but writes its KV
        # Past the forward, a failure belongs to one request (its sampling, its bookkeeping): it ends that one.
        tokens = (
            sample_each(logits, [batch_reqs[i].sampling for i in sampled], [batch_reqs[i].generator for i in sampled])
            if sampled
            else []
        )
        for req, n in zip(batch_reqs, extend_lens, strict=True):
            req.num_computed += n
        outputs = []
        for i, token in zip(sampled, tokens, strict=True):
            req = batch_reqs[i]
            try:
                if isinstance(token, str):
                    raise RuntimeError(token)
                self.generated_tokens_total += 1
                out = self._on_sampled(req, token)
            except Exception as e:
                logger.error("request %s failed after the forward; ending it alone: %s", req.rid, e)
                out = self._fail(req, str(e) if isinstance(token, str) else f"{type(e).__name__}: {e}")
            if out is not None:
                outputs.append(out)
        return outputs

    def _fail(self, req: Req, error: str) -> TokenOutput:
        """Ends one request with finish "error" and `error`, returning its pages; the others go on."""
        req.finish_reason = "error"
        out = self._output(req)
        if req.state is not ReqState.FINISHED:
            self._release(req)
        return dataclasses.replace(out, error=error)

    def _on_sampled(self, req: Req, token: int) -> TokenOutput | None:
        """Appends the request's new token; reports it, and releases the request if it finished."""
        req.output_ids.append(token)
        self._check_finished(req, token)
        if req.finish_reason is None and not req.every_token and len(req.output_ids) > 1:
            return None  # reported at the end, with every token since the first
        out = self._output(req)
        if req.finish_reason is not None:
            self._release(req)
        return out

    def _admit(self) -> None:
        while self.waiting and self.slots.num_free_rows > 0:
            req = self.waiting[0]
            pages = self.pool.alloc(self._pages_for(req.kv_tokens))
            if pages is None:
                return  # wait for running requests to free pages
            row = self.slots.alloc_row()
            assert row is not None
            self.waiting.popleft()
            req.pages, req.row, req.state = pages, row, ReqState.RUNNING
            self.slots.assign_pages(row, 0, pages)
            self.running.append(req)
            self.prompt_tokens_total += len(req.prompt_ids)

    def _plan(self) -> tuple[list[Req], list[int]]:
        """Decode tokens first (one per request), then prompt chunks oldest-first within the token budget."""
        budget = self.cfg.chunked_prefill_size if self.cfg.chunked_prefill_size > 0 else math.inf
        reqs, lens = [], []
        for req in self.running:
            if not req.is_prefilling:
                reqs.append(req)
                lens.append(1)
        budget -= len(reqs)
        for req in self.running:
            if req.is_prefilling and budget > 0:
                n = int(min(len(req.prompt_ids) - req.num_computed, budget))
                reqs.append(req)
                lens.append(n)
                budget -= n
        if not reqs:  # a budget smaller than the decode batch still moves one prompt forward
            req = next(r for r in self.running if r.is_prefilling)
            reqs, lens = [req], [1]
        return reqs, lens

    def _check_finished(self, req: Req, token: int) -> None:
        sp = req.sampling
        if token in sp.stop_token_ids:
            req.finish_reason, req.matched_stop = "stop", token
        elif not sp.ignore_eos and token in self.eos_ids:
            req.finish_reason, req.matched_stop = "stop", token
        elif len(req.output_ids) >= sp.max_new_tokens or req.num_tokens >= req.max_total_len:
            req.finish_reason = "length"

    def _output(self, req: Req) -> TokenOutput:
        new = req.output_ids[req.num_sent :]
        req.num_sent = len(req.output_ids)
        queue_time = (req.first_scheduled or time.monotonic()) - req.arrival
        return TokenOutput(
            req.rid,
            new,
            len(req.prompt_ids),
            len(req.output_ids),
            req.finish_reason,
            req.matched_stop,
            queue_time=queue_time,
        )

    def _release(self, req: Req) -> None:
        """Ends a request wherever it is and returns its pages and slot row."""
        if req.state is ReqState.RUNNING:
            self.running.remove(req)
        elif req.state is ReqState.WAITING:
            self.waiting.remove(req)
        if req.pages:
            self.pool.free(req.pages)
            req.pages = []
        if req.row >= 0:
            self.slots.free_row(req.row)
            req.row = -1
        req.state = ReqState.FINISHED

    def _pages_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.page_size)
