"""Decode batches replayed from CUDA graphs (SGLang's --cuda-graph-bs / --cuda-graph-max-bs / --disable-cuda-graph).

A decode step launches hundreds of small kernels whose host-side cost (Python, the framework, the launches) is
several times their GPU time at serving batch sizes. Captured once per bucket size and replayed, the whole
forward is one launch. A batch of n requests runs in the smallest bucket bs >= n: the real requests' token,
position and KV slot are copied into the static inputs, the padding requests read one token of row 0 and write
their KV into a sink page no request owns, and the first n rows of the static logits are the answer.

Buckets are captured from the largest down into one memory pool (a smaller graph reuses the larger ones' blocks),
after an eager warm-up run that compiles every Triton kernel outside the capture. Capture time and the pool's
size are logged. The attention backend owns its static state (`init_graph_state`, `capture_meta`,
`replay_prepare`); everything else a forward reads is here.
"""

from __future__ import annotations

import bisect
import logging
import time
from typing import TYPE_CHECKING

import torch

from pd.engine.forward_batch import BatchLayout, ForwardBatch, empty_layout

if TYPE_CHECKING:
    from pd.engine.kv_cache import ReqToToken
    from pd.engine.model_runner import ModelRunner

logger = logging.getLogger(__name__)


class CudaGraphRunner:
    """Captured decode forwards of one rank.

    Args:
        runner: the model runner whose model, KV cache and attention backend are captured.
        page_table: the scheduler's page table (the graphs read its device tensor in place).
        batch_sizes: the buckets (sorted ascending).
        pad_slot: a KV slot no request owns (padding requests write there).
        capture: False runs each bucket's static forward eagerly instead of replaying a graph (the same static
            inputs, padding and metadata: how the runner's bookkeeping is tested without a GPU).
    """

    def __init__(self, runner: ModelRunner, page_table: ReqToToken, batch_sizes: tuple[int, ...], pad_slot: int,
                 capture: bool = True) -> None:  # fmt: skip
        self.runner, self.batch_sizes = runner, tuple(sorted(batch_sizes))
        self.max_bs = self.batch_sizes[-1]
        device, bs = runner.device, self.max_bs
        self.input_ids = torch.zeros(bs, dtype=torch.int64, device=device)
        self.positions = torch.zeros(bs, dtype=torch.int64, device=device)
        self.out_loc = torch.full((bs,), pad_slot, dtype=torch.int64, device=device)
        self.pad_slot = pad_slot
        self.page_table = page_table
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.logits: dict[int, torch.Tensor] = {}
        self.static: dict[int, ForwardBatch] = {}
        runner.attn_backend.init_graph_state(bs, runner.kv_cache, runner.context_length)
        if capture:
            self._capture()
        else:
            self.static = {b: self._static_batch(b) for b in self.batch_sizes}

    def _static_batch(self, bs: int) -> ForwardBatch:
        """The forward a bucket captures: views of the static inputs, metadata over the backend's static state."""
        i32 = torch.zeros(bs, dtype=torch.int32, device=self.runner.device)
        layout = BatchLayout(rows=i32, prefix_lens=i32, extend_lens=i32 + 1, q_starts=i32,
                             out_loc=self.out_loc[:bs], page_table=self.page_table, host_prefix_lens=[0] * bs,
                             host_extend_lens=[1] * bs)  # fmt: skip
        backend = self.runner.attn_backend
        return ForwardBatch(input_ids=self.input_ids[:bs], positions=self.positions[:bs], layout=layout,
                            kv_cache=self.runner.kv_cache, logits_index=torch.arange(bs, device=self.runner.device),
                            attn_backend=backend, attn_meta=backend.capture_meta(bs, layout),
                            moe_mode="low_latency")  # fmt: skip

    @torch.inference_mode()
    def _capture(self) -> None:
        start = time.perf_counter()
        device = self.runner.device
        free_before = torch.cuda.mem_get_info(device)[0]
        pool = torch.cuda.graph_pool_handle()
        stream = torch.cuda.Stream(device)
        model = self.runner.model
        for bs in reversed(self.batch_sizes):
            batch = self._static_batch(bs)
            # Padding everywhere: row 0, one token of context, KV into the sink page.
            self._pad(0, bs)
            self.runner.attn_backend.replay_prepare(bs, empty_layout(device, self.page_table))
            stream.wait_stream(torch.cuda.current_stream(device))
            with torch.cuda.stream(stream):
                for _ in range(2):  # warm-up outside the capture: Triton compiles, the allocator settles
                    model.compute_logits(model(batch)[batch.logits_index])
            torch.cuda.current_stream(device).wait_stream(stream)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool, stream=stream):
                self.logits[bs] = model.compute_logits(model(batch)[batch.logits_index])
            self.graphs[bs] = graph
            self.static[bs] = batch  # the graph reads its tensors (logits_index, metadata) at every replay
        torch.cuda.synchronize(device)
        used = (free_before - torch.cuda.mem_get_info(device)[0]) / 2**20
        logger.info("captured %d CUDA graphs (decode batch sizes %s) in %.1f s, %.0f MiB", len(self.graphs),
                    _ranges(self.batch_sizes), time.perf_counter() - start, used)  # fmt: skip

    def _pad(self, n: int, bs: int) -> None:
        """Static inputs of requests [n, bs): token 0 at position 0 writing the sink slot."""
        self.input_ids[n:bs].zero_()
        self.positions[n:bs].zero_()
        self.out_loc[n:bs].fill_(self.pad_slot)

    def can_run(self, batch: ForwardBatch) -> bool:
        """A decode batch (one new token per request, logits for each) no larger than the largest bucket."""
        layout = batch.layout
        n = layout.num_reqs
        return 0 < n <= self.max_bs and layout.is_decode and int(batch.logits_index.shape[0]) == n

    def replay(self, batch: ForwardBatch) -> torch.Tensor:
        """-> logits [n, vocab] float32 of a decode batch of n requests (can_run(batch) must hold)."""
        n = batch.layout.num_reqs
        bs = self.batch_sizes[bisect.bisect_left(self.batch_sizes, n)]
        self.input_ids[:n].copy_(batch.input_ids)
        self.positions[:n].copy_(batch.positions)
        self.out_loc[:n].copy_(batch.layout.out_loc)
        if n < bs:
            self._pad(n, bs)
        self.runner.attn_backend.replay_prepare(bs, batch.layout)
        if bs in self.graphs:
            self.graphs[bs].replay()
            logits = self.logits[bs]
        else:  # not captured (capture=False): the same static forward, run eagerly
            static, model = self.static[bs], self.runner.model
            logits = model.compute_logits(model(static)[static.logits_index])
        return logits[:n][batch.logits_index]


def _ranges(sizes: tuple[int, ...]) -> str:
    return ", ".join(map(str, sizes)) if len(sizes) <= 8 else f"{sizes[0]}, {sizes[1]}, ... {sizes[-1]} ({len(sizes)})"
