"""Continuous batching with chunked prefill.

Every step runs one batch that holds each running request's next token (decode) plus as many prompt tokens
as the chunked-prefill budget allows, oldest request first. KV pages for a request's whole budget (prompt plus
max_new_tokens, capped by the context length) are taken when it is admitted, so a running request never runs
out of pages and nothing needs preempting; they are all returned when it finishes or is aborted.

With the prefix cache (pd.engine.radix_cache) a request starts with the longest cached whole-page prefix of its
prompt already computed: those pages are shared, the rest are fresh. When it ends, the whole pages of its computed
tokens go into the cache instead of the free list, and an allocation that finds the free list short evicts
unreferenced cached pages. Cached pages count as free in the stats: only live requests hold pages.
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import math
import random
import time
from collections import deque
from dataclasses import dataclass, field

import numpy as np
import torch

from pd.engine import compile_watch
from pd.engine.alloc_watch import AllocRetryWatch
from pd.engine.cuda_graph_runner import StagedDecode
from pd.engine.io import EngineStats, GenerateRequest, TokenOutput
from pd.engine.kv_cache import PagePool
from pd.engine.model_runner import ModelRunner
from pd.engine.radix_cache import Node, RadixCache
from pd.engine.request import Req, ReqState
from pd.engine.sampler import BAD_ROW, SamplingRows, all_greedy_rows, sample

# In a batch's host token list: this request's input token is the one the step in flight sampled (last_tokens).
FROM_DEVICE = -1

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class SchedulerConfig:
    max_running_requests: int
    chunked_prefill_size: int  # -1: whole prompts in one step
    overlap: bool = False  # prepare step N+1 on the host while the device runs step N (--disable-overlap-schedule)
    log_interval: int = 40  # steps between two progress lines in the log (SGLang's --decode-log-interval)
    radix_cache: bool = False  # reuse cached prompt prefixes (pd serve turns it on unless --disable-radix-cache)
    # --max-prefill-tokens: prompt tokens one step may carry, never below the context length (SGLang's rule); None:
    # no bound but the chunk's
    max_prefill_tokens: int | None = None
    # --prefill-wait-ms: how long an idle engine that just got a request may wait for more of its burst (EngineLoop
    # reads it; the scheduler only says whether a forward has room: prompt_room)
    prefill_wait_s: float = 0.0


class SamplingError(RuntimeError):
    """A request's row could not be sampled (its logits hold inf or nan); it ends that request alone."""


@dataclass(frozen=True)
class PageReturn:
    """An ended request's pages on their way back: the first `num_tokens` of the request's tokens are those whose KV
    they hold (their whole pages go into the prefix cache, when on), `node` the cached prefix it matched (unlocked
    then). The token list is made when the pages go back (Scheduler.tidy, once the step's outputs are out)."""

    req: Req
    num_tokens: int
    pages: list[int]
    node: Node | None

    @property
    def tokens(self) -> list[int]:
        return self.req.fill_ids[: self.num_tokens]


@dataclass
class LaunchedStep:
    """A step whose forward and sampling are queued on the device.

    reqs:       the requests that sample a token in it, in the order of `tokens`.
    tokens:     [len(reqs)] int64 on the host (pinned on CUDA), valid once `ready` has completed.
    ready:      an event recorded after the copy of `tokens` (None: the copy was synchronous).
    free_after: pages of requests that ended while the step ran, freed (or cached) once it has completed (its KV
                writes may still land in them, and on a decode instance a transfer into a reused page may not
                wait; a cached page must be complete before another request reads it).
    """

    reqs: list[Req]
    tokens: torch.Tensor | None
    ready: torch.cuda.Event | None
    free_after: list[PageReturn] = field(default_factory=list)
    waited_s: float = 0.0  # how long collecting it waited for the device


def _timed_event() -> torch.cuda.Event:
    """A CUDA event recorded now on the current stream, with timing."""
    event = torch.cuda.Event(enable_timing=True)
    event.record()
    return event


def _to_host(tokens: torch.Tensor) -> tuple[torch.Tensor, torch.cuda.Event | None]:
    """The step's one device-to-host copy: asynchronous into pinned memory on CUDA, with an event to wait on."""
    if tokens.device.type != "cuda":
        return tokens.cpu(), None
    host = torch.empty(tokens.shape, dtype=tokens.dtype, pin_memory=True)
    host.copy_(tokens, non_blocking=True)
    ready = torch.cuda.Event()
    ready.record()
    return host, ready


IDLE_GAP_S = 1.0


class StepLog:
    """Every `interval` steps, one INFO line on throughput and where a step's time goes: what an operator reads
    first when tokens come slowly (the batch, the queue, the KV pool, tokens/s, and the share of the step spent
    waiting for the device; under overlap a step that never waits is host-bound)."""

    def __init__(self, interval: int) -> None:
        self.interval, self.steps, self.wait_s = interval, 0, 0.0
        self.since = self.last = time.perf_counter()
        self.tokens_before, self.prompt_before = 0, 0

    def on_step(self, sched: Scheduler, waited_s: float) -> None:
        now = time.perf_counter()
        if now - self.last > IDLE_GAP_S:  # an interval measures busy time only: restart after an idle spell
            self.steps, self.wait_s, self.since = 0, 0.0, now
            self.tokens_before, self.prompt_before = sched.generated_tokens_total, sched.prompt_tokens_total
        self.last = now
        self.steps += 1
        self.wait_s += waited_s
        if self.interval <= 0 or self.steps < self.interval or not logger.isEnabledFor(logging.INFO):
            return
        elapsed, tokens = now - self.since, sched.generated_tokens_total - self.tokens_before
        pool = sched.pool
        logger.info("steps: %d in %.2f s (%.2f ms each, %.0f%% waiting for the device); running %d, queued %d; "
                    "KV pages %d/%d used; %.0f tok/s generated, %d prompt tokens admitted", self.steps, elapsed,
                    1e3 * elapsed / self.steps, 100 * self.wait_s / max(elapsed, 1e-9), len(sched.running),
                    len(sched.waiting), pool.num_pages - sched.num_free_pages, pool.num_pages,
                    tokens / max(elapsed, 1e-9),
                    sched.prompt_tokens_total - self.prompt_before)  # fmt: skip
        self.steps, self.wait_s, self.since = 0, 0.0, now
        self.tokens_before, self.prompt_before = sched.generated_tokens_total, sched.prompt_tokens_total


class Scheduler:
    def __init__(self, cfg: SchedulerConfig, runner: ModelRunner) -> None:
        self.cfg = cfg
        self.runner = runner
        self.page_size = runner.cfg.page_size
        self.context_length = runner.context_length
        self.prefill_cap = math.inf if cfg.max_prefill_tokens is None else max(cfg.max_prefill_tokens,
                                                                               self.context_length)  # fmt: skip
        self.pool = PagePool(runner.num_pages)
        self.cache = RadixCache(self.page_size, self.pool) if cfg.radix_cache else None
        self.slots = runner.make_slot_table(cfg.max_running_requests, self.context_length)
        self.eos_ids = set(runner.model_config.eos_token_ids)
        self.waiting: deque[Req] = deque()
        self.running: list[Req] = []
        self.prompt_tokens_total = 0
        self.generated_tokens_total = 0
        self.cached_tokens_total = 0  # prompt tokens whose KV came from the prefix cache
        # Overlap needs every input on this rank: followers of a multi-rank instance get theirs from the host.
        self.overlap = cfg.overlap and runner.single_rank
        if cfg.overlap and not self.overlap:
            logger.info("overlap scheduling off: multi-rank instances run each step's host work after its forward")
        self.in_flight: LaunchedStep | None = None
        # Pages of requests that ended in the step just collected, returned by tidy(): the engine loop sends the
        # step's outputs first (inserting 16 finished 1024-token prompts into the prefix cache took ~0.6 ms of a
        # served burst's host time on an H100 host, with the answers waiting).
        self.returns_after_outputs: list[PageReturn] = []
        # Each row's newest sampled token, on the device (the next decode input while the host has not seen it).
        self.last_tokens = torch.zeros(cfg.max_running_requests, dtype=torch.int64, device=runner.device)
        # Seeds of requests that did not bring one: reproducible from --random-seed, one stream per engine.
        self.seed_stream = random.Random(runner.cfg.random_seed)
        self.progress = StepLog(cfg.log_interval)
        # prefill lines waiting for their forward to end on the GPU: (began, ended, the line's format and values)
        # and when the first of its new requests arrived (None: no new request)
        self.prefill_lines: deque[tuple[torch.cuda.Event, torch.cuda.Event, tuple, float | None]] = deque()
        on_cuda = runner.device.type == "cuda"
        if on_cuda and runner.single_rank:
            self.warm_up()
        # counts from here: the warm-up's own retries stall no request
        self.alloc_watch = AllocRetryWatch(runner.device, self._memory_advice()) if on_cuda else None

    def warm_up(self) -> None:
        """Prompt forwards before the first request, so that Triton compiles their kernel variants now rather than
        on the first requests (a second or more each; the MoE runner picks block sizes by token count): one at each
        power-of-two token count up to the chunked-prefill budget (and the budget itself) and at one less than each;
        then two chunks after a cached prefix, one with as many new tokens as cached ones and one with fewer (MLA
        attends to the first with expanded keys, to the second in the latent space). With piecewise graphs all of
        them run once from the graphs (a forward pads to a captured size) and once eagerly, as forwards the graphs
        do not take run (mixed batches, MLA's latent form). Then one greedy sampling of the last forward's logits. A
        variant still met later is logged (pd.engine.compile_watch)."""
        budget = self.cfg.chunked_prefill_size if self.cfg.chunked_prefill_size > 0 else self.context_length - 1
        budget = int(min(budget, self.prefill_cap, self.context_length - 1, self.pool.num_pages * self.page_size))
        # Each power of two and the size below it: Triton specialises a kernel on whether an int argument (the
        # token count) divides by 16, and kernels pick block sizes by the next power of two, so between them the
        # two cover every variant a count up to the budget meets.
        powers = [1 << i for i in range(budget.bit_length()) if 1 << i <= budget] + [budget]
        sizes = sorted({n for p in powers for n in (p, p - 1) if n > 0})
        chunks = [(n, 0) for n in sizes]
        if budget > 1:
            chunks += [(n, budget - n) for n in sorted({budget // 2, max(budget // 4, 1)})]
        passes = (False, True) if self.runner.prompt_graphs is not None else (False,)
        forwards = [(new, cached, eager) for eager in passes for new, cached in chunks]
        start = time.perf_counter()
        pages, row = self.pool.alloc(self._pages_for(budget)), self.slots.alloc_row()
        assert pages is not None and row is not None
        try:
            self.slots.assign_pages(row, 0, pages)
            with compile_watch.expected():
                for new, cached, eager in forwards:
                    batch = self.runner.build_batch([0] * new, [row], [cached], [new], self.slots)
                    logits = self.runner.forward(batch, eager=eager)
                # and the greedy sampler's kernels (their variants follow the vocabulary and the logits' dtype)
                sample(logits, all_greedy_rows(logits.shape[0], logits.device))
                torch.cuda.synchronize(self.runner.device)
        finally:
            self.pool.free(pages)
            self.slots.free_row(row)
        logger.info("warm-up: %d forwards of 1 to %d tokens in %.1f s (kernels compiled before the first request)",
                    len(forwards), budget, time.perf_counter() - start)  # fmt: skip

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
            return TokenOutput(msg.rid, [], prompt_len, 0, finish_reason="error", error=error, status=400)
        ids = msg.input_ids
        req = Req(
            msg.rid,
            ids if isinstance(ids, np.ndarray) else np.asarray(ids, dtype=np.int64),
            msg.sampling,
            min(self.context_length, prompt_len + msg.sampling.max_new_tokens),
        )
        seed = msg.sampling.seed
        req.seed = seed & ((1 << 64) - 1) if seed is not None else self.seed_stream.getrandbits(64)
        req.kv_tokens = kv_tokens
        req.every_token, req.stream_interval = msg.every_token, max(1, msg.stream_interval)
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
                self.tidy()
                return out
        return None

    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self.running or self.in_flight)

    def prompt_room(self) -> bool:
        """Whether the next forward of an engine with only queued requests could take more prompts than are queued:
        fewer queued prompt tokens than one forward may carry, and a free batch row for another request (while so,
        an idle engine that just got requests waits briefly for more of their burst: pd.engine.engine_process)."""
        if not self.waiting or self.running or self.in_flight:
            return False
        queued = sum(r.prompt_len - r.num_computed for r in self.waiting)
        return queued < self.token_budget and len(self.waiting) < self.slots.num_free_rows

    @property
    def token_budget(self) -> float:
        """Tokens one forward may carry: the chunked-prefill size (none when chunking is off) and
        --max-prefill-tokens (self.prefill_cap)."""
        chunked = self.cfg.chunked_prefill_size > 0
        return min(self.cfg.chunked_prefill_size if chunked else math.inf, self.prefill_cap)

    def stats(self) -> EngineStats:
        return EngineStats(
            num_waiting=len(self.waiting),
            num_running=len(self.running),
            kv_pages_total=self.pool.num_pages,
            kv_pages_free=self.num_free_pages,
            kv_pages_cached=self.cache.num_evictable if self.cache is not None else 0,
            page_size=self.page_size,
            generated_tokens_total=self.generated_tokens_total,
            prompt_tokens_total=self.prompt_tokens_total,
            cached_tokens_total=self.cached_tokens_total,
            kv_heads_per_rank=self.runner.kv_heads_per_rank,
            kv_bytes_per_rank=self.runner.kv_bytes_per_rank,
            **self._eplb_stats(),
        )

    @property
    def num_free_pages(self) -> int:
        """Pages no live request holds: the free list plus cached pages that eviction may take."""
        return self.pool.num_free + (self.cache.num_evictable if self.cache is not None else 0)

    def flush_cache(self) -> int:
        """Drops every cached page no live request holds (SGLang's /flush_cache); returns how many."""
        freed = self.cache.flush() if self.cache is not None else 0
        logger.info("prefix cache flushed: %d pages freed", freed)
        return freed

    def _eplb_stats(self) -> dict[str, int | float]:
        eplb = self.runner.eplb
        if eplb is None or eplb.last_report is None:
            return {}
        return {"eplb_rebalances": eplb.rebalances, "eplb_balancedness": eplb.last_report.balancedness_before}

    # ---- one step ----
    @property
    def needs_compute(self) -> bool:
        """False when the only pending work is waiting on peers (transfers): the loop may sleep briefly."""
        return bool(self.waiting or self.running or self.in_flight)

    @property
    def has_prefill_work(self) -> bool:
        """Whether the next forward may carry prompt tokens (decides the dispatch mode under DP attention)."""
        return bool(self.waiting) or any(r.is_prefilling for r in self.running)

    def step(self, tidy: bool = True) -> list[TokenOutput]:
        """Transfers, then compute(); with tidy False the caller calls tidy() itself once the outputs are out."""
        outputs = self.poll_transfers()
        outputs += self.compute()
        if tidy:
            self.tidy()
        return outputs

    @property
    def untidy(self) -> bool:
        """Whether tidy() has work."""
        return bool(self.returns_after_outputs or self.prefill_lines)

    def tidy(self) -> bool:
        """The bookkeeping of a collected step that no output waits for: returning the ended requests' pages to the
        pool and the prefix cache, and the INFO lines of prompt forwards that have ended. Also done at the start of
        every compute() (admission needs the pages). Returns whether the engine's stats may have changed."""
        returns, self.returns_after_outputs = self.returns_after_outputs, []
        for ret in returns:
            self._return_pages(ret)
        if self.prefill_lines:
            self._flush_prefill_lines()
        return bool(returns)

    def compute(self) -> list[TokenOutput]:
        """Admits waiting requests, launches the next forward if the batch is not empty, and returns the outputs
        of a finished step: this one's, or under overlap the previous one's, collected while this one runs (the
        part of a step that may join collectives: under DP attention the leaders agree on it between
        poll_transfers and this)."""
        self.tidy()
        self._admit()
        try:
            launched = self._launch()
        except BaseException:
            for req in self.running:  # the failed forward may have written part of their KV: never cache it
                req.kv_trusted = False
            self._drop_in_flight()
            raise
        done, self.in_flight = (self.in_flight, launched) if self.overlap else (launched, None)
        if done is None:
            return []
        outputs = self._collect(done)
        self.progress.on_step(self, done.waited_s)
        if self.alloc_watch is not None:
            self.alloc_watch.check()
        return outputs

    def _memory_advice(self) -> str:
        """The flags that leave a GPU instance more memory beside its KV pool, with their values now."""
        return f"{self.runner.cfg.pool_flag} or --chunked-prefill-size (now {self.cfg.chunked_prefill_size})"

    def poll_transfers(self) -> list[TokenOutput]:
        """Hook for disaggregated schedulers: advance requests whose KV is moving between instances."""
        return []

    def _launch(self) -> LaunchedStep | None:
        """Builds the next batch and queues its forward and sampling on the device; None if nothing can run.
        Under overlap a decode request's input token may still be on the device (sampled by the step in flight):
        it is read there, from last_tokens."""
        batch_reqs, extend_lens = self._plan()
        if not batch_reqs:
            return None
        prefix_lens = [r.num_computed for r in batch_reqs]
        input_ids = self._input_ids(batch_reqs, extend_lens)
        # Logits only where a request's known tokens are all in after this step (it needs its next token).
        ends = [end - 1 for end in itertools.accumulate(extend_lens)]
        sampled = [i for i, (r, n) in enumerate(zip(batch_reqs, extend_lens, strict=True))
                   if r.num_computed + n == r.num_tokens + r.pending]  # fmt: skip
        batch = self.runner.build_batch(input_ids, [r.row for r in batch_reqs], prefix_lens, extend_lens,
                                        self.slots, logits_index=[ends[i] for i in sampled],
                                        token_source=self.last_tokens if self.overlap else None)  # fmt: skip
        now = time.monotonic()
        log_prefill = len(input_ids) > len(batch_reqs) and logger.isEnabledFor(logging.INFO)
        new = [r for r in batch_reqs if r.first_scheduled is None] if log_prefill else []
        for req, n in zip(batch_reqs, extend_lens, strict=True):
            if req.first_scheduled is None:
                req.first_scheduled = now
            req.num_computed += n
        began = _timed_event() if log_prefill and self.runner.device.type == "cuda" else None
        logits = self.runner.forward(batch)  # always: a middle prompt chunk samples nothing but writes its KV
        if log_prefill:
            self._log_prefill(batch_reqs, extend_lens, new, now, began)
        reqs = [batch_reqs[i] for i in sampled]
        if not reqs:
            return LaunchedStep([], None, None)
        rows = SamplingRows.build([r.sampling for r in reqs], [r.seed for r in reqs],
                                  [len(r.output_ids) + r.pending for r in reqs], logits.shape[-1],
                                  logits.device)  # fmt: skip
        tokens = sample(logits, rows)
        for req in reqs:
            req.pending += 1
        if self.overlap:  # the next step's decode inputs (a bad row's -1 must not reach the embedding)
            layout = getattr(batch, "layout", None)  # a two-batch-overlap forward has one per micro-batch
            if isinstance(batch, StagedDecode):  # every request samples: the rows are already on the device
                row_index = batch.rows
            elif layout is not None and len(reqs) == len(batch_reqs):  # every request samples: the batch's own rows
                row_index = layout.rows.to(torch.int64)
            else:
                row_index = torch.tensor([r.row for r in reqs], dtype=torch.int64)
                if logits.device.type == "cuda":
                    row_index = row_index.pin_memory()
                row_index = row_index.to(logits.device, non_blocking=True)
            self.last_tokens.index_copy_(0, row_index, tokens.clamp(min=0))
        return LaunchedStep(reqs, *_to_host(tokens))

    def _input_ids(self, reqs: list[Req], extend_lens: list[int]) -> list[int] | np.ndarray:
        """The batch's new tokens, request after request: a list for decode tokens alone (a list's extend beats
        numpy for a few dozen one-token pieces), else one int64 array joined from the prompt chunks' slices."""
        parts: list[np.ndarray] = []
        tokens: list[int] = []
        for req, n in zip(reqs, extend_lens, strict=True):
            ids = req.next_input_ids(n)
            if isinstance(ids, np.ndarray):
                if tokens:
                    parts.append(np.asarray(tokens, dtype=np.int64))
                    tokens = []
                parts.append(ids)
                continue
            if len(ids) < n:  # the token sampled by the step in flight
                assert self.overlap and n == 1 and req.pending, (req.rid, n, req.pending)
                ids = [FROM_DEVICE]
            tokens.extend(ids)
        if not parts:
            return tokens
        if tokens:
            parts.append(np.asarray(tokens, dtype=np.int64))
        return np.concatenate(parts)

    def _log_prefill(self, reqs: list[Req], extend_lens: list[int], new: list[Req], start: float,
                     began: torch.cuda.Event | None) -> None:  # fmt: skip
        """One INFO line per forward that carries prompt tokens (SGLang's "Prefill batch" line): what a slow first
        token is waiting on. A request's wait counts from its arrival at the engine; the launch is the host's time to
        queue the forward (a launch as long as the GPU's step means the host, not the GPU, paces prefill). On a GPU
        the line waits for the forward to end and adds its time on the device, from its first queued work to its
        last (`began`: an event recorded before the launch): more than its kernels take means the device idled
        inside it (the host launching too slowly, or the allocator stalling)."""
        # called after the launch advanced num_computed: a prompt chunk started before the prompt's end (even a
        # one-token chunk), a decode token after it
        chunks = [n for r, n in zip(reqs, extend_lens, strict=True) if r.num_computed - n < r.prompt_len]
        waited = max((start - r.arrival for r in new), default=0.0)
        # how far apart the new requests arrived: a burst split over forwards shows here
        first = min((r.arrival for r in new), default=None)
        spread = 0.0 if first is None else max(r.arrival for r in new) - first
        line = ("prefill batch: %d prompt tokens of %d requests (%d new, arrived over %.1f ms, longest wait %.1f ms), "
                "%d decodes; queued %d; KV pages %d/%d used; launched in %.1f ms",
                sum(chunks), len(chunks), len(new), 1e3 * spread, 1e3 * waited, len(reqs) - len(chunks),
                len(self.waiting), self.pool.num_pages - self.num_free_pages, self.pool.num_pages,
                1e3 * (time.monotonic() - start))  # fmt: skip
        if began is None:
            logger.info(*line)
        else:
            self.prefill_lines.append((began, _timed_event(), line, first))

    def _flush_prefill_lines(self) -> None:
        """Logs the prefill lines of forwards that have ended on the device, in launch order, with their device time
        and how long after its first new request's arrival the host saw it end (a step that samples waits for its
        forward, so every line before it is out once it is collected)."""
        now = time.monotonic()
        while self.prefill_lines and self.prefill_lines[0][1].query():
            began, ended, (fmt, *args), first = self.prefill_lines.popleft()
            fmt, args = fmt + ", %.1f ms on the device", [*args, began.elapsed_time(ended)]
            if first is not None:  # with the arrival spread and the wait: where a burst's time went, engine-side
                fmt += ", seen done %.1f ms after its first new request arrived"
                args.append(1e3 * (now - first))
            logger.info(fmt, *args)

    def _collect(self, step: LaunchedStep) -> list[TokenOutput]:
        """Waits for a launched step's sampled ids and applies them: each request's new token, finish checks,
        outputs. Past the forward a failure belongs to one request (its sampling, its bookkeeping): it ends alone."""
        start = time.perf_counter()
        if step.ready is not None:
            step.ready.synchronize()
        tokens = step.tokens.tolist() if step.tokens is not None else []
        step.waited_s = time.perf_counter() - start
        # pages of requests that ended while this step ran (its writes are done) and of those ending now: tidy()
        self.returns_after_outputs += step.free_after
        outputs = []
        for req, token in zip(step.reqs, tokens, strict=True):
            req.pending -= 1
            if req.state is ReqState.FINISHED or req.finish_reason is not None:
                continue  # ended while the step ran (aborted, or stopped on the token before): the token is void
            try:
                if token == BAD_ROW:
                    raise SamplingError("sampling failed: the logits of this request hold inf or nan")
                self.generated_tokens_total += 1
                out = self._on_sampled(req, token)
            except Exception as e:
                logger.error("request %s failed after the forward; ending it alone: %s", req.rid, e)
                out = self._fail(req, str(e) if isinstance(e, SamplingError) else f"{type(e).__name__}: {e}")
            if out is not None:
                outputs.append(out)
        return outputs

    def _drop_in_flight(self) -> None:
        """After a failed launch: waits out the step still running and returns the pages it held back."""
        step, self.in_flight = self.in_flight, None
        if step is not None:
            if step.ready is not None:
                step.ready.synchronize()
            for ret in step.free_after:
                self._return_pages(ret)
            for req in step.reqs:
                req.pending -= 1

    def _fail(self, req: Req, error: str) -> TokenOutput:
        """Ends one request with finish "error" and `error`, returning its pages; the others go on."""
        req.finish_reason = "error"
        req.kv_trusted = False
        out = self._output(req)
        if req.state is not ReqState.FINISHED:
            self._release(req)
        return dataclasses.replace(out, error=error)

    def _on_sampled(self, req: Req, token: int) -> TokenOutput | None:
        """Appends the request's new token; reports it, and releases the request if it finished."""
        req.output_ids.append(token)
        self._check_finished(req, token)
        if req.finish_reason is None and req.num_sent > 0:
            if not req.every_token or len(req.output_ids) - req.num_sent < req.stream_interval:
                return None  # reported later (at the end, or once stream_interval tokens wait), with every token since
        out = self._output(req)
        if req.finish_reason is not None:
            self._release(req)
        return out

    def _admit(self) -> None:
        while self.waiting and self.slots.num_free_rows > 0:
            req = self.waiting[0]
            if not self._take_pages(req):
                return  # wait for running requests to free pages
            row = self.slots.alloc_row()
            assert row is not None
            self.waiting.popleft()
            req.row, req.state = row, ReqState.RUNNING
            self.slots.assign_pages(row, 0, req.pages)
            self.running.append(req)
            self.prompt_tokens_total += req.prompt_len
            self.cached_tokens_total += req.cached_tokens

    def _take_pages(self, req: Req) -> bool:
        """Gives a request its pages: the cached prefix of its prompt (locked, its tokens counted as computed) and
        fresh pages for the rest of its KV budget. False, with nothing taken, when the pool is short even after
        eviction."""
        prefix, node = self._match_prefix(req.prompt_array)
        pages = self._alloc(self._pages_for(req.kv_tokens) - len(prefix))
        if pages is None:
            if node is not None:
                self.cache.unlock(node)  # type: ignore[union-attr]
            return False
        req.pages, req.cache_node = prefix + pages, node
        req.num_computed = req.cached_tokens = len(prefix) * self.page_size
        return True

    def _match_prefix(self, prompt: np.ndarray) -> tuple[list[int], Node | None]:
        """The cached pages a request with this prompt starts from (locked), and their node. At least the last
        prompt token is left to compute: its logits give the first output token."""
        if self.cache is None:
            return [], None
        reusable = (len(prompt) - 1) // self.page_size * self.page_size
        pages, node = self.cache.match(prompt[:reusable])
        self.cache.lock(node)
        return pages, node

    def _alloc(self, num_pages: int) -> list[int] | None:
        """Fresh pages, evicting unreferenced cached pages when the free list is short; None (nothing taken)
        when even that leaves too few."""
        pages = self.pool.alloc(num_pages)
        if pages is None and self.cache is not None:
            self.cache.evict(num_pages - self.pool.num_free)
            pages = self.pool.alloc(num_pages)
        return pages

    def _plan(self) -> tuple[list[Req], list[int]]:
        """Decode tokens first (one per request), then prompt chunks oldest-first within the token budget: the
        chunked-prefill size and --max-prefill-tokens. Unchunked, prompts go whole while they fit, the first always
        (as SGLang admits them)."""
        chunked = self.cfg.chunked_prefill_size > 0
        budget = self.token_budget
        reqs, lens = [], []
        for req in self.running:
            if not req.is_prefilling and self._decodes_further(req):
                reqs.append(req)
                lens.append(1)
        budget -= len(reqs)
        prefilling = [r for r in self.running if r.is_prefilling]
        first = True
        for req in prefilling:
            left = req.prompt_len - req.num_computed
            if chunked:
                n = int(min(left, budget))
            else:
                n = left if left <= budget or first else 0
            if n <= 0:
                break
            reqs.append(req)
            lens.append(n)
            budget -= n
            first = False
        if not reqs and prefilling:  # a budget smaller than the decode batch still moves one prompt forward
            reqs, lens = [prefilling[0]], [1]
        return reqs, lens

    def _decodes_further(self, req: Req) -> bool:
        """Whether a request past its prompt still needs a decode step, counting the token the step in flight
        samples for it (a request that stops on a stop token is only known after that token reaches the host)."""
        produced = len(req.output_ids) + req.pending
        return produced < req.sampling.max_new_tokens and req.num_tokens + req.pending < req.max_total_len

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
            req.prompt_len,
            len(req.output_ids),
            req.finish_reason,
            req.matched_stop,
            queue_time=queue_time,
            cached_tokens=req.cached_tokens,
        )

    def _release(self, req: Req) -> None:
        """Ends a request wherever it is and returns its pages and slot row."""
        if req.state is ReqState.RUNNING:
            self.running.remove(req)
        elif req.state is ReqState.WAITING:
            self.waiting.remove(req)
        if req.pages:
            ret = PageReturn(req, self._cacheable_count(req), req.pages, req.cache_node)
            # after the step in flight (it may still write them), else at the next tidy()
            (self.in_flight.free_after if self.in_flight is not None else self.returns_after_outputs).append(ret)
            req.pages, req.cache_node = [], None
        if req.row >= 0:
            self.slots.free_row(req.row)
            req.row = -1
        req.state = ReqState.FINISHED

    def _cacheable_count(self, req: Req) -> int:
        """How many of an ending request's tokens have KV in its pages that the cache may keep: every computed token
        (the tree takes whole pages only), or only its matched prefix when its KV may be garbage."""
        if self.cache is None:
            return 0
        return min(req.num_computed, req.num_tokens) if req.kv_trusted else req.cached_tokens

    def _return_pages(self, ret: PageReturn) -> None:
        if self.cache is None:
            self.pool.free(ret.pages)
        else:
            self.pool.free(self.cache.release(ret.tokens, ret.pages, ret.node or self.cache.root))

    def _pages_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.page_size)
