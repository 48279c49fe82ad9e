"""Owns the model and its KV cache on one device and runs forward passes."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch

from pd.attention import get_backend
from pd.dist.tp import SINGLE, TensorParallel
from pd.engine import compile_watch
from pd.engine.cuda_graph_runner import CudaGraphRunner, StagedDecode
from pd.engine.forward_batch import ForwardBatch, TokenIds, build_forward_batch, empty_forward_batch
from pd.engine.kv_cache import KVCache, ReqToToken, kv_storage_dtype
from pd.engine.micro_batch import MicroBatches, split_in_two
from pd.engine.piecewise_graphs import PiecewiseGraphs
from pd.layers import fused_kernels
from pd.layers.cpu_packed import pack_linears_for_cpu
from pd.models.config import ModelConfig
from pd.models.llama import Attention, DecoderLayer, DenseMLP
from pd.models.loader import load_model
from pd.moe.context import MoeContext
from pd.moe.eplb.manager import EplbManager, place_from_file
from pd.moe.layer import FusedMoE
from pd.server_args import DEFAULT_GPU_MEM_FRACTION

if TYPE_CHECKING:
    from pd.dist.step_sync import StepSync

logger = logging.getLogger(__name__)

# Share of the free GPU memory at most kept back for activations and CUDA graphs when sizing the KV cache.
GPU_HEADROOM = 0.15
# KV capacity on the CPU when --max-total-tokens is not given (host memory is not measured).
_CPU_DEFAULT_TOTAL_TOKENS = 65536


@dataclass(frozen=True)
class RunnerConfig:
    """The parts of ServerArgs the runner needs, resolved (no "auto" left)."""

    model_path: str
    device: str
    dtype: torch.dtype
    page_size: int
    context_length: int | None
    max_total_tokens: int | None
    mem_fraction_static: float | None
    random_seed: int = 0
    moe_runner: str = "torch"  # a --moe-runner-backend name (resolved)
    two_batch_overlap: bool = False  # every forward as two micro-batches interleaved layer by layer
    attention_backend: str = "torch"  # an --attention-backend name (resolved)
    cuda_graph_bs: tuple[int, ...] = ()  # decode batch sizes to capture as CUDA graphs (empty: eager)
    piecewise_tokens: tuple[int, ...] = ()  # prompt forward token counts to capture as piecewise graphs (empty: eager)
    quantization: str = "none"  # --quantization: "fp8" quantizes an unquantized checkpoint at load
    kv_cache_dtype: str = "auto"  # --kv-cache-dtype: auto (= dtype), fp8_e4m3 or fp8_e5m2

    @property
    def pool_flag(self) -> str:
        """The flag that sizes the KV pool, with its value now (lowering it leaves the forwards more GPU memory)."""
        if self.max_total_tokens is not None:
            return f"--max-total-tokens (now {self.max_total_tokens})"
        return f"--mem-fraction-static (now {self.mem_fraction_static or DEFAULT_GPU_MEM_FRACTION})"


class ModelRunner:
    """One rank's model shard, KV cache and forward.

    Args:
        cfg: resolved runner settings.
        moe_ctx: this rank's expert placement and dispatcher (default: one rank).
        tp: the attention group's tensor-parallel coordinates (default: one rank).
        sync: the attention group's broadcast channel when it has several ranks (the leader sends each forward
            to its followers through it); None for a one-rank group.
        agree_pages: makes every rank of the instance use the same KV page count (the minimum); None on one rank.
    """

    def __init__(
        self,
        cfg: RunnerConfig,
        moe_ctx: MoeContext | None = None,
        tp: TensorParallel = SINGLE,
        sync: StepSync | None = None,
        agree_pages: Callable[[int], int] | None = None,
    ) -> None:
        torch.manual_seed(cfg.random_seed)
        self.cfg = cfg
        self.device = torch.device(cfg.device)
        self.sync, self.tp = sync, tp
        self.model_config = ModelConfig.from_path(cfg.model_path)
        model_max = self.model_config.max_position_embeddings
        if cfg.context_length is not None and cfg.context_length > model_max:
            logger.warning("--context-length %d exceeds the model's max_position_embeddings %d",
                           cfg.context_length, model_max)
        self.context_length = cfg.context_length or model_max
        moe_ctx = moe_ctx or MoeContext(runner=cfg.moe_runner)
        self.model = load_model(self.model_config, cfg.dtype, self.device, moe_ctx,
                                max_position=max(self.context_length, model_max), tp=tp,
                                quantization=cfg.quantization)  # fmt: skip
        moe_layers = [m for m in self.model.modules() if isinstance(m, FusedMoE)]
        for module in moe_layers:
            module.finalize_weights()
        if moe_ctx.eplb is not None and moe_ctx.eplb.init_location is not None and moe_layers:
            place_from_file(moe_layers, moe_ctx, moe_ctx.eplb)
        self.eplb: EplbManager | None = None
        if moe_ctx.eplb is not None and moe_ctx.eplb.rebalance_every > 0 and moe_layers:
            self.eplb = EplbManager(moe_layers, moe_ctx, moe_ctx.eplb)
        if self.device.type == "cpu" and not fused_kernels.enabled_on(self.device):
            # oneDNN-packed weights run decode-sized (few-row) GEMMs ~2-3x faster than F.linear on CPU.
            pack_linears_for_cpu(self.model)
        else:
            fused = [m.fuse_qkv() for m in self.model.modules() if isinstance(m, Attention)]
            if fused and not all(fused):
                logger.info("q/k/v projections fused in %d of %d layers (the others: FP8 blocks straddling q/k/v, "
                            "or mixed dtypes)", sum(fused), len(fused))  # fmt: skip
            fused = [m.fuse_gate_up() for m in self.model.modules() if isinstance(m, DenseMLP)]
            if fused and not all(fused):
                logger.info("MLP gate/up projections fused in %d of %d MLPs (the others: FP8 blocks straddling gate "
                            "and up, or mixed dtypes)", sum(fused), len(fused))  # fmt: skip
            for layer in self.model.modules():
                if isinstance(layer, DecoderLayer):
                    layer.quantize_norm_for_qkv()
                    if fused_kernels.enabled_on(self.device):
                        layer.sum_o_proj_in_norm()
                elif isinstance(layer, Attention) and fused_kernels.enabled_on(self.device):
                    layer.quantize_output_for_o_proj()
        layout = self.model.kv_layout()
        self.kv_dtype = kv_storage_dtype(cfg.kv_cache_dtype, cfg.dtype)
        self.num_pages = self._num_pages(layout)
        if agree_pages is not None:
            self.num_pages = agree_pages(self.num_pages)
        # This rank's KV capacity (EngineStats): heads cached per buffer (MLA: its one latent), the pool's bytes.
        self.kv_heads_per_rank = self.model.kv_heads()[1]
        self.kv_bytes_per_rank = (KVCache.bytes_per_token(self.model.num_layers, layout, self.kv_dtype) * self.num_pages
                                  * cfg.page_size)
        # One rank holds the whole forward (no followers, no expert peers): graphs and overlap need that.
        self.single_rank = sync is None and moe_ctx.ep_size == 1 and moe_ctx.group is None
        blocker = self._graph_blocker(has_moe=bool(moe_layers))
        self.graph_bs = self._graph_sizes(cfg.cuda_graph_bs, "CUDA graphs", blocker or self._attention_blocker())
        self.piecewise_tokens = self._graph_sizes(cfg.piecewise_tokens, "piecewise CUDA graphs", blocker)
        # Under CUDA graphs one page past the pool's is the sink padding requests and tokens write their KV to.
        sink = bool(self.graph_bs or self.piecewise_tokens)
        self.kv_cache = KVCache(self.model.num_layers, self.num_pages + sink, cfg.page_size, layout, self.kv_dtype,
                                self.device)  # fmt: skip
        self.attn_backend = get_backend(cfg.attention_backend)
        self.graphs: CudaGraphRunner | None = None  # captured once the scheduler's page table exists
        self.prompt_graphs: PiecewiseGraphs | None = None  # likewise
        self.slot_table: ReqToToken | None = None
        self.forced_mode: str | None = None  # set by the DP-attention gate: the mode all leaders agreed on
        self.num_forwards = 0
        logger.info("model %s loaded on %s (%s); KV cache: %d pages x %d tokens, %s; attention backend %s",
                    self.model_config.architecture, self.device, cfg.dtype, self.num_pages, cfg.page_size,
                    self._kv_summary(), cfg.attention_backend)  # fmt: skip
        if moe_layers and moe_ctx.group_rank_is_first:
            logger.info("MoE: %d layers, %s", len(moe_layers), _moe_summary(moe_layers[0], moe_ctx, cfg))

    def _kv_summary(self) -> str:
        """This rank's KV capacity, for the start-up log: which heads it caches and its pool's size."""
        first, count, total = self.model.kv_heads()
        heads = f"all {total} KV heads" if count == total else f"KV heads [{first}, {first + count}) of {total}"
        return f"{heads}, {self.kv_bytes_per_rank / 2**20:.1f} MiB on this rank"

    def make_slot_table(self, max_rows: int, max_context: int) -> ReqToToken:
        """The request -> KV page table the scheduler fills, on this rank's device (followers keep a mirror fed by
        the leader's journal)."""
        self.slot_table = ReqToToken(max_rows, max_context, self.cfg.page_size, self.device)
        if self.sync is not None and self.sync.is_leader:
            self.slot_table.journal = []
        pad_slot = self.num_pages * self.cfg.page_size
        capture = self.device.type == "cuda"
        if self.graph_bs:
            sizes = tuple(b for b in self.graph_bs if b <= max_rows) or (max_rows,)
            with compile_watch.expected():
                self.graphs = CudaGraphRunner(self, self.slot_table, sizes, pad_slot=pad_slot, capture=capture)
        if self.piecewise_tokens:
            with compile_watch.expected():
                self.prompt_graphs = PiecewiseGraphs(self, self.slot_table, self.piecewise_tokens, pad_slot=pad_slot,
                                                     capture=capture)  # fmt: skip
        return self.slot_table

    def _graph_blocker(self, has_moe: bool) -> str | None:
        """Why this rank cannot replay graphs of its forwards (decode or piecewise), or None."""
        cfg = self.cfg
        if has_moe and cfg.moe_runner not in ("triton", "deep_gemm"):
            return f"--moe-runner-backend {cfg.moe_runner} reads expert counts on the host (use triton or deep_gemm)"
        if not self.single_rank:
            return "multi-rank instances replay graphs in a later version"
        if cfg.two_batch_overlap:
            return "two-batch overlap runs eagerly"
        if self.eplb is not None:
            return "EPLB runs eagerly"
        return None

    def _attention_blocker(self) -> str | None:
        """Why the attention cannot be captured (a decode graph holds it; piecewise graphs run it eagerly)."""
        name = self.cfg.attention_backend
        return None if name == "triton" else f"--attention-backend {name} cannot be captured (use triton)"

    @staticmethod
    def _graph_sizes(sizes: tuple[int, ...], what: str, blocker: str | None) -> tuple[int, ...]:
        """sizes, or () with the reason logged when there is a blocker."""
        if sizes and blocker is not None:
            logger.warning("%s off: %s", what, blocker)
            return ()
        return sizes

    def _num_pages(self, layout: list[tuple[int, int]]) -> int:
        cfg = self.cfg
        if cfg.max_total_tokens is not None:
            tokens = cfg.max_total_tokens
        elif self.device.type == "cpu":
            tokens = _CPU_DEFAULT_TOTAL_TOKENS
        else:
            per_token = KVCache.bytes_per_token(self.model.num_layers, layout, self.kv_dtype)
            free, total = torch.cuda.mem_get_info(self.device)
            fraction = cfg.mem_fraction_static or DEFAULT_GPU_MEM_FRACTION
            # This instance's share of the GPU (weights + KV) is fraction x total, whatever other processes hold:
            # two instances on one GPU (PD on one GPU) each take their fraction. It never takes more than is free,
            # less the headroom activations and graphs need.
            weights = torch.cuda.memory_allocated(self.device)
            headroom = min(total * (1.0 - fraction), free * GPU_HEADROOM)
            budget = min(total * fraction - weights, free - headroom)
            tokens = int(budget // per_token)
            if tokens < cfg.page_size:
                raise RuntimeError(
                    f"no GPU memory left for the KV cache: --mem-fraction-static {fraction} gives this instance "
                    f"{fraction * total / 2**30:.1f} GiB of the GPU's {total / 2**30:.1f} GiB, the weights take "
                    f"{weights / 2**30:.1f} GiB and {free / 2**30:.1f} GiB are free; raise --mem-fraction-static "
                    f"or free the GPU"
                )
        return max(tokens // cfg.page_size, 1)

    def build_batch(
        self,
        input_ids: TokenIds,
        rows: list[int],
        prefix_lens: list[int],
        extend_lens: list[int],
        slots: ReqToToken,
        logits_index: list[int] | None = None,
        token_source: torch.Tensor | None = None,
    ) -> ForwardBatch | MicroBatches | StagedDecode:
        """The leader's (or a lone rank's) next forward. Its followers are told first and run it too, so
        forward() must follow. token_source: see build_forward_batch (one-rank instances only). A decode batch
        that a CUDA graph replays goes straight into the graph's static inputs (graphs run on lone ranks only)."""
        num_logits = len(rows) if logits_index is None else len(logits_index)
        if self.graphs is not None and self.graphs.can_stage(extend_lens, num_logits):
            return self.graphs.stage(input_ids, rows, prefix_lens, token_source)
        mode = self.forced_mode or ("normal" if max(extend_lens) > 1 else "low_latency")
        if self.sync is not None:
            assert token_source is None, "followers take their input tokens from the host"
            journal = self.slot_table.take_journal() if self.slot_table is not None else []
            ids = input_ids.tolist() if isinstance(input_ids, np.ndarray) else input_ids  # the pipe carries lists
            self.sync.send({"op": "forward", "input_ids": ids, "rows": rows, "prefix_lens": prefix_lens,
                            "extend_lens": extend_lens, "logits_index": logits_index, "slots": journal, "mode": mode})
        return self.make_batch(input_ids, rows, prefix_lens, extend_lens, slots, logits_index, mode, token_source)

    def make_batch(
        self,
        input_ids: TokenIds,
        rows: list[int],
        prefix_lens: list[int],
        extend_lens: list[int],
        slots: ReqToToken,
        logits_index: list[int] | None,
        mode: str,
        token_source: torch.Tensor | None = None,
    ) -> ForwardBatch | MicroBatches:
        """The forward of these lists in dispatch mode ``mode`` (leader and followers alike): one ForwardBatch, or
        under two-batch overlap its two micro-batches (the whole batch is then never built)."""
        if not self.cfg.two_batch_overlap:
            return build_forward_batch(input_ids, rows, prefix_lens, extend_lens, slots, self.kv_cache,
                                       self.attn_backend, logits_index, mode, token_source)  # fmt: skip
        first, second = (
            build_forward_batch(part.input_ids, part.rows, part.prefix_lens, part.extend_lens, slots,
                                self.kv_cache, self.attn_backend, part.logits_index, mode, token_source)
            if part.rows else empty_forward_batch(self.kv_cache, self.attn_backend, mode)
            for part in split_in_two(input_ids, rows, prefix_lens, extend_lens, logits_index)
        )  # fmt: skip
        return MicroBatches(first, second)

    @torch.inference_mode()
    def forward(self, batch: ForwardBatch | MicroBatches | StagedDecode, logits: bool = True,
                eager: bool = False) -> torch.Tensor:  # fmt: skip
        """-> logits [S, vocab] in the model dtype for the batch's logits_index rows (an empty tensor with logits=False:
        followers only take part in the collectives; the leader samples). eager: not from the piecewise graphs
        (the warm-up compiles the kernels of forwards they do not take)."""
        self.num_forwards += 1
        if isinstance(batch, StagedDecode):
            assert self.graphs is not None and logits
            return self.graphs.replay_staged(batch)
        if isinstance(batch, MicroBatches):
            hidden = self.model.forward_two(batch.first, batch.second)
        elif self.prompt_graphs is not None and not eager and self.prompt_graphs.can_run(batch):
            hidden = self.prompt_graphs.forward(batch)
        else:
            hidden = self.model(batch)
        if self.eplb is not None:
            self.eplb.after_forward()  # collective every N forwards: every rank runs the same forwards
        if not logits:
            return hidden[:0]
        return self.model.compute_logits(hidden[batch.logits_index])

    @torch.inference_mode()
    def idle_forward(self, mode: str | None = None) -> None:
        """A forward without tokens: an idle DP-attention rank still joins its peers' MoE collectives. ``mode``:
        the dispatch mode its leader chose (followers); default the mode the leaders agreed on."""
        mode = mode or self.forced_mode or "normal"
        if self.sync is not None and self.sync.is_leader:
            self.sync.send({"op": "idle", "mode": mode})
        self.num_forwards += 1
        empty = empty_forward_batch(self.kv_cache, self.attn_backend, mode)
        if self.cfg.two_batch_overlap:  # the same collectives as a busy peer's two micro-batches
            self.model.forward_two(empty, empty_forward_batch(self.kv_cache, self.attn_backend, mode))
        else:
            self.model(empty)
        if self.eplb is not None:
            self.eplb.after_forward()

    def heartbeat(self) -> None:
        """An empty broadcast to the followers: raises when one of them (on any node) has died."""
        if self.sync is not None:
            self.sync.send({"op": "ping"})

    def stop_followers(self) -> None:
        if self.sync is not None:
            self.sync.send({"op": "stop"})


def _moe_summary(layer: FusedMoE, ctx: MoeContext, cfg: RunnerConfig) -> str:
    """One line on how the routed experts run: what an operator checks first when MoE throughput looks wrong."""
    parts = [f"{layer.num_experts} experts", f"ep {ctx.ep_size}", f"dispatcher {ctx.dispatcher} ({ctx.a2a_mode})",
             f"runner {ctx.runner}"]  # fmt: skip
    if ctx.moe_tp_size > 1:
        parts.append(f"each expert split over {ctx.moe_tp_size} ranks")
    if ctx.eplb is not None:
        slots = layer.num_physical_experts
        every = f"rebalanced every {ctx.eplb.rebalance_every} forwards" if ctx.eplb.rebalance_every else "static"
        parts.append(f"{slots} expert slots ({slots - layer.num_experts} redundant, {every})")
    if ctx.single_batch_overlap:
        parts.append("single-batch overlap")
    if cfg.two_batch_overlap:
        parts.append("two-batch overlap")
    return ", ".join(parts)
