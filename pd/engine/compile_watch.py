"""A warning in the log for every Triton kernel compiled after the engine's warm-up.

The warm-up compiles the kernel variants that prompt forwards need before the first request; a variant it missed
(a batch shape, an argument alignment or a dtype it did not try) compiles on the request that first needs it, which
then waits a second or more with the whole batch behind it. That shows up as a latency spike nobody can explain
from the request itself, so each late compile is logged with the kernel and the specialization that caused it.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

logger = logging.getLogger(__name__)

_started: dict[int, tuple[float, bool]] = {}  # thread id -> when its compile began, and whether it was expected
_previous: dict[str, Any] = {}  # hooks someone else had installed: still called, first
_expected = 0  # > 0 inside expected(): start-up work that compiles on purpose
compiles_after_warm_up = 0  # for tests and benchmarks: how many warnings were logged


@contextmanager
def expected() -> Iterator[None]:
    """Compiles inside are start-up work (a warm-up, a graph capture; another engine's in the same process), not
    a request's wait: not counted (listed at debug level). Puts the hooks in place, so start-up is watched too."""
    global _expected
    watch_compiles()
    _expected += 1
    try:
        yield
    finally:
        _expected -= 1


def _before(**kwargs: Any) -> bool:
    previous = _previous.get("jit_cache_hook")
    if previous is not None and previous(**kwargs):
        return True  # that hook supplies the kernel: nothing compiles
    if not kwargs.get("is_manual_warmup"):
        _started[threading.get_ident()] = (time.perf_counter(), _expected > 0)
    return False  # False: compile as usual


def _after(**kwargs: Any) -> None:
    global compiles_after_warm_up
    previous = _previous.get("jit_post_compile_hook")
    if previous is not None:
        previous(**kwargs)
    started = _started.pop(threading.get_ident(), None)
    if started is None:
        return
    start, was_expected = started
    fn = kwargs.get("fn")
    if was_expected:
        # At debug level the start-up's variants are listed too, to compare with a late one's.
        logger.debug("Triton compiled %s at start-up (%.2f s): %s", getattr(fn, "name", "a kernel"),
                     time.perf_counter() - start, describe(kwargs))  # fmt: skip
        return
    compiles_after_warm_up += 1
    logger.warning("Triton compiled %s after the warm-up (%.2f s; the batch waited for it): %s",
                   getattr(fn, "name", "a kernel"), time.perf_counter() - start, describe(kwargs))  # fmt: skip


def describe(hook_kwargs: dict[str, Any]) -> str:
    """The variant's arguments as Triton specialised them: `name:type` (`/16` where a pointer or int was taken to
    be 16-divisible, the usual reason for a second variant) and `name=value` for constants."""
    compile_info = hook_kwargs.get("compile") or {}
    signature = compile_info.get("signature")
    if not isinstance(signature, dict):
        return str(hook_kwargs.get("repr", ""))
    constants = compile_info.get("constants") or {}
    configs = compile_info.get("configs") or [{}]
    attrs = configs[0] if isinstance(configs[0], dict) else {}
    parts = []
    for i, (name, kind) in enumerate(signature.items()):
        if kind == "constexpr":
            parts.append(f"{name}={constants.get((i,), constants.get(name, '?'))}")
        else:
            divisible = any(a and a[0] == "tt.divisibility" for a in attrs.get((i,), []))
            parts.append(f"{name}:{kind}{'/16' if divisible else ''}")
    return ", ".join(parts)


def watch_compiles() -> bool:
    """From now on, log each Triton compile (once per process; True when the hooks are in place). A Triton
    without the runtime hooks (before 3.4) logs nothing."""
    try:
        from triton import knobs
    except ImportError:
        return False
    runtime = getattr(knobs, "runtime", None)
    if runtime is None or not hasattr(runtime, "jit_cache_hook") or not hasattr(runtime, "jit_post_compile_hook"):
        return False
    if runtime.jit_cache_hook is not _before:
        _previous.update(jit_cache_hook=runtime.jit_cache_hook, jit_post_compile_hook=runtime.jit_post_compile_hook)
        runtime.jit_cache_hook, runtime.jit_post_compile_hook = _before, _after
    return True
