"""KV transfer layer: moves a prompt's KV pages from a prefill rank to a decode rank.

Contracts in kvtransfer.base; backends are registered by name and imported on first use.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass

from kvtransfer.base import KVArgs, KVManager, KVReceiver, KVSender, KVTargetHolder

# name -> module defining KVManager, KVSender, KVReceiver, start_prefill_manager, start_decode_manager,
# start_decode_target, start_prefill_source
_BACKENDS: dict[str, tuple[str, str, str, str]] = {
    "mooncake": ("kvtransfer.mooncake", "MooncakeKVManager", "MooncakeKVSender", "MooncakeKVReceiver"),
}


@dataclass(frozen=True)
class KVBackend:
    """A backend's classes and the factories that build a rank's manager from the instance's settings
    (an object with host, bootstrap_port, bootstrap_timeout and transfer_timeout, e.g. DisaggConfig).
    start_decode_target builds what a decode follower rank holds: its KV memory registered for prefill ranks to
    write into, described by the result's ``target`` (a kvtransfer.messages.KVTarget its leader registers);
    start_prefill_source what a prefill follower holds: its KV memory registered to write its share of each room's
    KV heads from (its ``submit`` takes the PartJobs its leader's manager hands out)."""

    name: str
    KVManager: type[KVManager]
    KVSender: type[KVSender]
    KVReceiver: type[KVReceiver]
    start_prefill_manager: Callable[[KVArgs, object], KVManager]
    start_decode_manager: Callable[..., KVManager]
    start_decode_target: Callable[[KVArgs, object], KVTargetHolder]
    start_prefill_source: Callable[[KVArgs, object], KVTargetHolder]


def kv_backend_names() -> list[str]:
    return sorted(_BACKENDS)


def get_kv_backend(name: str) -> KVBackend:
    """The backend registered as `name`; ValueError naming the known ones otherwise."""
    if name not in _BACKENDS:
        raise ValueError(f"unknown KV transfer backend {name!r}; known: {', '.join(kv_backend_names())}")
    module_name, manager, sender, receiver = _BACKENDS[name]
    module = importlib.import_module(module_name)
    return KVBackend(name, getattr(module, manager), getattr(module, sender), getattr(module, receiver),
                     module.start_prefill_manager, module.start_decode_manager, module.start_decode_target,
                     module.start_prefill_source)
