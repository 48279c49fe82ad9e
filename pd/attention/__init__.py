"""Attention backends (``--attention-backend``): name -> implementation, imported only when asked for.

A backend owns its metadata: each forward it gets the batch's neutral facts (`BatchLayout`: page-table rows,
prefix and new lengths, the slots new tokens write) and builds what its kernels need, once for all layers.
Every layer then calls `forward`, which stores the new tokens' KV into the paged cache and attends over each
request's whole context. Multi-head / grouped-query attention caches K and V; MLA (DeepSeek) caches one latent
row per token and attends in the latent space (the query already absorbed into the key projection, the value
being the latent's first ``v_dim`` columns), so both run on the same kernels.

A CUDA-graph runner drives three more hooks: `init_graph_state` once (static buffers for its largest batch),
`capture_meta` when it captures a decode batch of ``bs`` requests (metadata over views of those buffers), and
`replay_prepare` before each replay (copies the real batch's facts into them, on the device).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Protocol

import torch

from pd.layers.attention import LatentExpand

if TYPE_CHECKING:
    from pd.engine.forward_batch import BatchLayout, ForwardBatch
    from pd.engine.kv_cache import KVCache

__all__ = ["AttentionBackend", "LatentExpand", "get_backend"]


class AttentionBackend(Protocol):
    """Paged attention over a ragged batch."""

    name: str

    def prepare(self, layout: BatchLayout, kv_cache: KVCache) -> object:
        """This forward's metadata, built from the batch's facts (shared by every layer)."""

    def forward(
        self,
        layer_id: int,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor | None,
        batch: ForwardBatch,
        scale: float,
        kv_heads: slice | None = None,
        v_dim: int | None = None,
        kv_stored: bool = False,
        out: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Stores the new tokens' KV in the layer's cache (unless kv_stored: the caller did), then attends.

        Args:
            q: [T, Hq, Dk] queries of the T new tokens (model dtype).
            k: [T, Hk, Dk] their keys; v: [T, Hk, Dv] their values. MLA: k is the latent row [T, 1, Dk] and
                v is None: values are the first ``v_dim`` columns of the cached latent.
            scale: softmax scale.
            kv_heads: the cached KV heads this rank's queries use (a tensor-parallel share; default all). Hq
                must be a multiple of their count.
            out: [T, Hq, Dv] to write the result into (a piecewise graph's static buffer); default a new tensor.

        Returns:
            [T, Hq, Dv] in q's dtype.
        """

    def forward_expanded(
        self,
        layer_id: int,
        q: torch.Tensor,
        latent: torch.Tensor,
        expand: LatentExpand,
        v_dim: int,
        batch: ForwardBatch,
        scale: float,
        out: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """MLA by multi-head attention: stores the new tokens' latents [T, 1, C + R], reads each request's context
        latents [S, C + R] back from the cache, expands them into per-head keys [S, H, Dk] and values [S, H, v_dim]
        (``expand``: kv_b_proj, and the rope part every head shares, held apart) and attends causally with q
        [T, H, Dk]. For prompt
        forwards: per head the latent form reads C + R columns for keys and C for values (576 / 512 for
        DeepSeek-V3) where this reads Dk / v_dim (192 / 128), at the price of the expansion's GEMM over the whole
        context. -> [T, H, v_dim] (into ``out`` when given)."""

    def init_graph_state(self, max_bs: int, kv_cache: KVCache, max_context_len: int,
                         facts: torch.Tensor | None = None) -> None:  # fmt: skip
        """Allocates the static state a CUDA graph of up to ``max_bs`` decode requests, of contexts up to
        ``max_context_len`` tokens, reads. ``facts``: [3, max_bs] int32 on the device, each request's page-table
        row, prefix length and KV length (prefix + 1), which the graph runner fills before a replay (with one
        copy of all its inputs) instead of replay_prepare; the state reads those rows in place."""

    def capture_meta(self, bs: int, layout: BatchLayout) -> object:
        """Metadata for capturing a decode batch of ``bs`` requests: it reads the static state only."""

    def replay_prepare(self, bs: int, layout: BatchLayout) -> None:
        """Copies a real decode batch's facts (``layout``, padded to ``bs`` requests) into the static state."""


# name -> (module, class); each is imported when chosen, so a machine without Triton never imports it.
_BACKENDS: dict[str, tuple[str, str]] = {
    "torch": ("pd.attention.torch_backend", "TorchAttentionBackend"),
    "triton": ("pd.attention.triton_backend", "TritonAttentionBackend"),
}

def backend_names() -> tuple[str, ...]:
    """Names get_backend accepts."""
    return tuple(_BACKENDS)


def get_backend(name: str) -> AttentionBackend:
    """Build the backend registered under ``name``.

    Raises:
        ValueError: unknown name (the message lists the known ones).
    """
    if name not in _BACKENDS:
        raise ValueError(f"unknown attention backend {name!r}; known: {', '.join(_BACKENDS)}")
    module_name, class_name = _BACKENDS[name]
    backend: AttentionBackend = getattr(importlib.import_module(module_name), class_name)()
    return backend
