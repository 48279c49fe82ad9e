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

A decode batch never becomes a ForwardBatch (ModelRunner.build_batch hands it to `stage`): every static input,
the attention backend's per-request facts included, is one buffer on the device, written from the host lists with
one copy; the KV slots come from the page table's host copy. Building a ForwardBatch and copying its tensors into
the static inputs took about twenty launches a step, most of batch 1's host time.
"""

from __future__ import annotations

import bisect
import logging
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch

from pd.engine.forward_batch import BatchLayout, ForwardBatch, TokenIds, empty_layout, read_device_tokens
from pd.engine.graph_memory import free_before_capture, used_since

if TYPE_CHECKING:
    from pd.engine.kv_cache import ReqToToken
    from pd.engine.model_runner import ModelRunner

logger = logging.getLogger(__name__)

# Rows of the staged inputs: int64 [input_ids, positions, out_loc, rows], then int32 [rows, prefix_lens, kv_lens]
# (the attention backend's facts).
_I64_ROWS, _I32_ROWS = 4, 3


@dataclass(frozen=True)
class StagedDecode:
    """A decode batch of n requests whose inputs are already on their way into the static buffers of bucket bs
    (CudaGraphRunner.stage); ModelRunner.forward replays it.

    rows: [n] int64 on the device, each request's page-table row (a view of the static inputs: read it before the
        next batch is staged, as the scheduler does right after the forward).
    """

    n: int
    bs: int
    rows: torch.Tensor


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
        # Every static input in one buffer, so that a staged batch is one host-to-device copy.
        self._split = _I64_ROWS * bs * 8
        self._inputs = torch.zeros(self._split + _I32_ROWS * bs * 4, dtype=torch.uint8, device=device)
        self._i64 = self._inputs[: self._split].view(torch.int64).view(_I64_ROWS, bs)
        self._i32 = self._inputs[self._split :].view(torch.int32).view(_I32_ROWS, bs)
        self.input_ids, self.positions, self.out_loc, self.rows = self._i64
        self.pad_slot = pad_slot
        self.page_table = page_table
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.logits: dict[int, torch.Tensor] = {}
        self.static: dict[int, ForwardBatch] = {}
        self._pad(0, bs)
        self._i32[2].fill_(1)  # padding requests' KV length
        runner.attn_backend.init_graph_state(bs, runner.kv_cache, runner.context_length, facts=self._i32)
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
        free_before = free_before_capture(device)
        pool = torch.cuda.graph_pool_handle()
        stream = torch.cuda.Stream(device)
        self.page_table.sync_device()  # nothing may be left to copy inside a capture
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
        used = used_since(device, free_before)
        logger.info("captured %d CUDA graphs (decode batch sizes %s) in %.1f s, %.0f MiB", len(self.graphs),
                    _ranges(self.batch_sizes), time.perf_counter() - start, used)  # fmt: skip

    def _pad(self, n: int, bs: int) -> None:
        """Static inputs of requests [n, bs): token 0 at position 0 of row 0 writing the sink slot."""
        self._i64[:, n:bs].zero_()
        self.out_loc[n:bs].fill_(self.pad_slot)

    def can_stage(self, extend_lens: list[int], num_logits: int) -> bool:
        """A decode batch (one new token per request, logits for each) no larger than the largest bucket."""
        n = len(extend_lens)
        return 0 < n <= self.max_bs and num_logits == n and max(extend_lens) == 1

    def stage(self, input_ids: TokenIds, rows: list[int], prefix_lens: list[int],
              token_source: torch.Tensor | None = None) -> StagedDecode:  # fmt: skip
        """Writes a decode batch into the static inputs of its bucket (can_stage must hold): one copy from pinned
        host memory, then, for tokens the host has not seen (negative input ids: under overlap scheduling, sampled
        by the step in flight), one gather from token_source ([R] int64, each row's newest token)."""
        n = len(rows)
        bs = self.batch_sizes[bisect.bisect_left(self.batch_sizes, n)]
        on_cuda = self._inputs.device.type == "cuda"
        self.page_table.sync_device()  # the graphs read the device table in place: pages of new requests first
        # The caching host allocator hands a pinned block back only once the copies that read it have run.
        host = torch.empty(self._inputs.shape[0], dtype=torch.uint8, pin_memory=on_cuda)
        raw = host.numpy()
        h64 = raw[: self._split].view(np.int64).reshape(_I64_ROWS, self.max_bs)
        h32 = raw[self._split :].view(np.int32).reshape(_I32_ROWS, self.max_bs)
        rows_np = np.asarray(rows, dtype=np.int64)
        positions = np.asarray(prefix_lens, dtype=np.int64)  # the new token follows its prefix
        ids = np.asarray(input_ids, dtype=np.int64)
        h64[0, :n], h64[1, :n], h64[3, :n] = ids, positions, rows_np
        h64[2, :n] = self.page_table.host_slots(rows_np, positions)
        h32[0, :n], h32[1, :n], h32[2, :n] = rows_np, positions, positions + 1
        # Padding requests: token 0 at position 0 of row 0, one token of context, KV into the sink slot.
        h64[:, n:bs] = 0
        h64[2, n:bs] = self.pad_slot
        h32[:, n:bs] = 0
        h32[2, n:bs] = 1
        self._inputs.copy_(host, non_blocking=on_cuda)
        if token_source is not None:
            read_device_tokens(ids, self.input_ids[:n], token_source, self.rows[:n])
        return StagedDecode(n, bs, self.rows[:n])

    def replay_staged(self, staged: StagedDecode) -> torch.Tensor:
        """-> logits [n, vocab] (model dtype) of a staged batch (a view of the bucket's static logits: consume it before
        the next replay, as the sampler does)."""
        bs = staged.bs
        if bs in self.graphs:
            self.graphs[bs].replay()
            return self.logits[bs][: staged.n]
        static, model = self.static[bs], self.runner.model  # not captured: the same static forward, run eagerly
        return model.compute_logits(model(static)[static.logits_index])[: staged.n]


def _ranges(sizes: tuple[int, ...]) -> str:
    return ", ".join(map(str, sizes)) if len(sizes) <= 8 else f"{sizes[0]}, {sizes[1]}, ... {sizes[-1]} ({len(sizes)})"
