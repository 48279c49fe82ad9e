"""Owns the model and its KV cache on one device and runs forward passes."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from pd.engine.forward_batch import ForwardBatch, build_forward_batch
from pd.engine.kv_cache import KVCache
from pd.layers.cpu_packed import pack_linears_for_cpu
from pd.models.config import ModelConfig
from pd.models.loader import load_model
from pd.moe.context import MoeContext
from pd.moe.layer import FusedMoE

logger = logging.getLogger(__name__)

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


class ModelRunner:
    def __init__(self, cfg: RunnerConfig, moe_ctx: MoeContext | None = None) -> None:
        torch.manual_seed(cfg.random_seed)
        self.cfg = cfg
        self.device = torch.device(cfg.device)
        self.model_config = ModelConfig.from_path(cfg.model_path)
        model_max = self.model_config.max_position_embeddings
        if cfg.context_length is not None and cfg.context_length > model_max:
            logger.warning("--context-length %d exceeds the model's max_position_embeddings %d",
                           cfg.context_length, model_max)
        self.context_length = cfg.context_length or model_max
        self.model = load_model(self.model_config, cfg.dtype, self.device, moe_ctx or MoeContext(runner=cfg.moe_runner),
                                max_position=max(self.context_length, model_max))
        for module in self.model.modules():
            if isinstance(module, FusedMoE):
                module.finalize_weights()
        if self.device.type == "cpu":
            # oneDNN-packed weights run decode-sized (few-row) GEMMs ~2-3x faster than F.linear on CPU.
            pack_linears_for_cpu(self.model)
        layout = self.model.kv_layout()
        self.num_pages = self._num_pages(layout)
        self.kv_cache = KVCache(self.model.num_layers, self.num_pages, cfg.page_size, layout, cfg.dtype, self.device)
        logger.info("model %s loaded on %s (%s); KV cache: %d pages x %d tokens", self.model_config.architecture,
                    self.device, cfg.dtype, self.num_pages, cfg.page_size)

    def _num_pages(self, layout: list[tuple[int, int]]) -> int:
        cfg = self.cfg
        if cfg.max_total_tokens is not None:
            tokens = cfg.max_total_tokens
        elif self.device.type == "cpu":
            tokens = _CPU_DEFAULT_TOTAL_TOKENS
        else:
            per_token = KVCache.bytes_per_token(self.model.num_layers, layout, cfg.dtype)
            free, total = torch.cuda.mem_get_info(self.device)
            fraction = cfg.mem_fraction_static or 0.85
            budget = free - total * (1.0 - fraction)
            tokens = int(budget // per_token)
            if tokens < cfg.page_size:
                raise RuntimeError(
                    f"no GPU memory left for the KV cache: {free / 2**30:.1f} GiB free of {total / 2**30:.1f} GiB "
                    f"after loading the model, and --mem-fraction-static {fraction} keeps "
                    f"{(1 - fraction) * total / 2**30:.1f} GiB back; raise --mem-fraction-static or free the GPU"
                )
        return max(tokens // cfg.page_size, 1)

    def build_batch(
        self,
        input_ids: list[int],
        rows: list[int],
        prefix_lens: list[int],
        extend_lens: list[int],
        req_to_token: torch.Tensor,
        logits_index: list[int] | None = None,
    ) -> ForwardBatch:
        return build_forward_batch(input_ids, rows, prefix_lens, extend_lens, req_to_token, self.kv_cache, logits_index)

    @torch.inference_mode()
    def forward(self, batch: ForwardBatch) -> torch.Tensor:
        """-> logits [S, vocab] float32 for the batch's logits_index rows."""
        hidden = self.model(batch)
        return self.model.compute_logits(hidden[batch.logits_index])
