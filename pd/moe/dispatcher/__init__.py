"""Dispatcher registry (``--moe-a2a-backend``): name -> implementation, imported only when asked for."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from pd.moe.context import MoeContext
    from pd.moe.dispatcher.base import Dispatcher

# name -> (module, class); backends with optional dependencies stay unimported until selected.
_DISPATCHERS: dict[str, tuple[str, str]] = {
    "single_rank": ("pd.moe.dispatcher.single_rank", "SingleRankDispatcher"),
}


def dispatcher_names() -> tuple[str, ...]:
    """Names accepted by get_dispatcher."""
    return tuple(_DISPATCHERS)


def get_dispatcher(name: str, ctx: MoeContext) -> Dispatcher:
    """Build the dispatcher registered under ``name`` for this rank.

    Raises:
        ValueError: unknown name (the message lists the known ones), or a context the backend cannot serve.
    """
    if name not in _DISPATCHERS:
        raise ValueError(f"unknown MoE dispatcher {name!r}; known: {', '.join(_DISPATCHERS)}")
    module_name, class_name = _DISPATCHERS[name]
    cls = getattr(importlib.import_module(module_name), class_name)
    return cls(ctx)
