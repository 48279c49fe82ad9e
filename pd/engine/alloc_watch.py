"""Warning when the GPU memory left beside the KV pool is too small for the forwards.

The KV pool takes what --mem-fraction-static gives it; activations, graph pools and the attention's temporaries live
in the rest. When that rest is short, torch's caching allocator finds no free block, frees every cached block (which
synchronizes the device) and retries the allocation: the request still succeeds, so nothing fails, but each retry
stalls the step and throws away the cache the next forward then allocates again. It shows only as forwards slower
than they should be. The allocator counts these retries; this watch reads the count at most once per interval and
logs a warning naming the flags that leave more room.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

import torch

logger = logging.getLogger(__name__)

CHECK_INTERVAL_S = 1.0  # reading the allocator's counters costs tens of microseconds


class AllocRetryWatch:
    """Logs a warning when the caching allocator's retry count has grown since the last check.

    retries: returns the count so far (default: the CUDA allocator's num_alloc_retries on `device`).
    advice: the flags to name, with their values (e.g. "--mem-fraction-static 0.85 or --chunked-prefill-size 8192").
    """

    def __init__(self, device: torch.device | None, advice: str, retries: Callable[[], int] | None = None,
                 interval_s: float = CHECK_INTERVAL_S) -> None:  # fmt: skip
        self.retries = retries or (lambda: cuda_alloc_retries(device))
        self.advice, self.interval_s = advice, interval_s
        self.seen = self.retries()
        self.checked = time.monotonic()

    def check(self, now: float | None = None) -> None:
        now = time.monotonic() if now is None else now
        if now - self.checked < self.interval_s:
            return
        count = self.retries()
        if count > self.seen:
            logger.warning("GPU memory is short beside the KV pool: the caching allocator freed its cache and retried "
                           "%d allocation(s) in the last %.0f s (each one synchronizes the device and stalls the "
                           "step; %d since start-up). Leave more room to activations: lower %s", count - self.seen,
                           now - self.checked, count, self.advice)  # fmt: skip
        self.seen, self.checked = count, now


def cuda_alloc_retries(device: torch.device) -> int:
    """The caching allocator's count of cudaMalloc calls it retried after freeing its cache, on `device`."""
    return int(torch.cuda.memory_stats_as_nested_dict(device).get("num_alloc_retries", 0))
