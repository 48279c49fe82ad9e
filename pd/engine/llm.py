"""In-process engine for offline use and tests: the same scheduler and runner as `pd serve`, no HTTP."""

from __future__ import annotations

import itertools

import torch

from pd.engine.io import GenerateRequest, SamplingParams
from pd.engine.model_runner import ModelRunner, RunnerConfig
from pd.engine.scheduler import Scheduler, SchedulerConfig
from pd.server_args import (
    default_chunked_prefill_size,
    default_cuda_graph_bs,
    default_piecewise_max_tokens,
    default_piecewise_tokens,
    gpu_memory_bytes,
    resolve_attention_backend,
    resolve_moe_runner,
)


class LLM:
    def __init__(
        self,
        model_path: str,
        device: str = "cpu",
        dtype: torch.dtype = torch.float32,
        page_size: int = 16,
        chunked_prefill_size: int | None = None,
        max_prefill_tokens: int | None = None,
        max_running_requests: int = 64,
        max_total_tokens: int | None = None,
        context_length: int | None = None,
        moe_runner: str = "auto",
        attention_backend: str = "auto",
        cuda_graph_bs: tuple[int, ...] | None = None,
        piecewise_tokens: tuple[int, ...] | None = None,
        overlap: bool = True,
        random_seed: int = 0,
        radix_cache: bool = False,
        quantization: str = "none",
        kv_cache_dtype: str = "auto",
    ) -> None:
        """cuda_graph_bs: decode batch sizes to capture (default on CUDA: SGLang's buckets up to
        max_running_requests; () runs eagerly). piecewise_tokens: prompt forward sizes replayed from piecewise
        graphs (default on CUDA: the server's sizes up to chunked_prefill_size; () runs eagerly). overlap: prepare
        each step while the previous one runs (the server's default; --disable-overlap-schedule). radix_cache: reuse
        the KV of cached prompt prefixes (the server's default; off here so that tests see every page come back to
        the pool). quantization: "fp8" quantizes an unquantized checkpoint's weights at load (--quantization);
        kv_cache_dtype: --kv-cache-dtype. max_prefill_tokens: --max-prefill-tokens (None: only the chunk bounds a
        step's prompt tokens)."""
        on_cuda = torch.device(device).type == "cuda"
        if chunked_prefill_size is None:  # the server's default (by the GPU's memory)
            chunked_prefill_size = default_chunked_prefill_size(gpu_memory_bytes(device))
        if cuda_graph_bs is None:
            cuda_graph_bs = default_cuda_graph_bs(max_running_requests) if on_cuda else ()
        if piecewise_tokens is None:
            max_tokens = default_piecewise_max_tokens(chunked_prefill_size)
            piecewise_tokens = default_piecewise_tokens(max_tokens) if on_cuda else ()
        cfg = RunnerConfig(
            model_path,
            device,
            dtype,
            page_size,
            context_length,
            max_total_tokens,
            None,
            moe_runner=resolve_moe_runner(moe_runner, torch.device(device).type),
            attention_backend=resolve_attention_backend(attention_backend, torch.device(device).type),
            cuda_graph_bs=cuda_graph_bs,
            piecewise_tokens=piecewise_tokens,
            random_seed=random_seed,
            quantization=quantization,
            kv_cache_dtype=kv_cache_dtype,
        )
        self.runner = ModelRunner(cfg)
        self.scheduler = Scheduler(SchedulerConfig(max_running_requests, chunked_prefill_size, overlap,
                                                   radix_cache=radix_cache, max_prefill_tokens=max_prefill_tokens),
                                   self.runner)  # fmt: skip
        self._ids = itertools.count()

    def generate(self, prompts: list[list[int]], sampling: SamplingParams | list[SamplingParams]) -> list[list[int]]:
        """Runs all prompts to completion with continuous batching; returns each one's output token ids."""
        params = sampling if isinstance(sampling, list) else [sampling] * len(prompts)
        rids = [f"offline-{next(self._ids)}" for _ in prompts]
        results: dict[str, list[int]] = {rid: [] for rid in rids}
        for rid, ids, sp in zip(rids, prompts, params, strict=True):
            error = self.scheduler.add(GenerateRequest(rid, list(ids), sp))
            if error is not None:
                raise ValueError(error.error)
        while self.scheduler.has_work:
            for out in self.scheduler.step():
                results[out.rid].extend(out.new_token_ids)
        return [results[rid] for rid in rids]

    @torch.inference_mode()
    def prefill_logits(self, input_ids: list[int]) -> torch.Tensor:
        """Logits [L, vocab] float32 of every prompt position, computed chunk by chunk through the paged cache
        (chunks of the scheduler's chunked-prefill size), the way a served prefill runs."""
        sched = self.scheduler
        pages = sched.pool.alloc(sched._pages_for(len(input_ids)))
        row = sched.slots.alloc_row()
        assert pages is not None and row is not None, "KV cache too small for this prompt"
        try:
            sched.slots.assign_pages(row, 0, pages)
            chunk = sched.cfg.chunked_prefill_size if sched.cfg.chunked_prefill_size > 0 else len(input_ids)
            logits = []
            for start in range(0, len(input_ids), chunk):
                ids = input_ids[start : start + chunk]
                batch = self.runner.build_batch(
                    ids, [row], [start], [len(ids)], sched.slots, logits_index=list(range(len(ids)))
                )
                logits.append(self.runner.forward(batch).float())
            return torch.cat(logits)
        finally:
            sched.pool.free(pages)
            sched.slots.free_row(row)
