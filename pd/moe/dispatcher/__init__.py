"""Dispatcher registry (``--moe-a2a-backend``): name -> implementation, imported only when asked for."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from pd.moe.context import MoeContext
    from pd.moe.dispatcher.base import Dispatcher

# name -> (module, class); backends with optional dependencies stay unimported until selected.
_DISPATCHERS: dict[str, tuple[str, str]] = {
    "single_rank": ("pd.moe.dispatcher.single_rank", "SingleRankDispatcher"),
    "none": ("pd.moe.dispatcher.allgather", "AllReduceDispatcher"),
    "torch": ("pd.moe.dispatcher.torch_a2a", "TorchA2ADispatcher"),
    "deepep": ("pd.moe.dispatcher.deepep", "DeepEPDispatcher"),
}


def dispatcher_names() -> tuple[str, ...]:
    """Names accepted by get_dispatcher."""
    return tuple(_DISPATCHERS)


def get_dispatcher(name: str, ctx: MoeContext, **options: Any) -> Dispatcher:
    """Build the dispatcher registered under ``name`` for this rank.

    Args:
        name: registry name (``--moe-a2a-backend``, or "single_rank" for the EP=1 bypass).
        ctx: placement and process group of this rank.
        options: backend keyword arguments, passed through: the multi-rank backends ("none", "torch",
            "deepep") need ``num_experts``; "torch" and "deepep" also take ``mode`` ("normal" | "low_latency"),
            ``max_tokens_per_rank`` and (torch) ``long_seq``. See each class.

    Raises:
        ValueError: unknown name (the message lists the known ones), or a context the backend cannot serve.
        ImportError: "deepep" without the ``deep_ep`` package.
    """
    if name not in _DISPATCHERS:
        raise ValueError(f"unknown MoE dispatcher {name!r}; known: {', '.join(_DISPATCHERS)}")
    module_name, class_name = _DISPATCHERS[name]
    cls = getattr(importlib.import_module(module_name), class_name)
    dispatcher: Dispatcher = cls(ctx, **options)
    return dispatcher
