"""Page lists -> byte regions for the transfer engine.

A request's KV lives in pages that are rarely contiguous, but allocators hand out runs often enough that
merging neighbours pays: one region per run of pages where the source and the destination page both advance
by one, per KV buffer. The transfer engine then gets one batch of regions per request instead of one call per
page. Pure functions of their inputs; numpy does the per-page work.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def check_pages(pages: Sequence[int], num_pages: int, what: str) -> str | None:
    """A reason why `pages` cannot be a request's page list in a pool of `num_pages` pages, or None.

    pages: page indices (any int sequence). Out-of-range or repeated pages would make the engine write
    outside the buffers or write one destination page twice.
    """
    arr = np.asarray(pages, dtype=np.int64)
    if arr.ndim != 1:
        return f"{what} must be a flat list of page indices"
    if arr.size and (arr.min() < 0 or arr.max() >= num_pages):
        return f"{what} has a page outside [0, {num_pages}): min {int(arr.min())}, max {int(arr.max())}"
    if np.unique(arr).size != arr.size:
        return f"{what} repeats a page"
    return None


def page_runs(src_pages: Sequence[int], dst_pages: Sequence[int]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Splits the page mapping src_pages[i] -> dst_pages[i] into maximal runs contiguous on both sides.

    Returns (src_start [R], dst_start [R], num_pages [R]), int64: run r copies pages
    src_start[r] + k -> dst_start[r] + k for k in [0, num_pages[r]). sum(num_pages) == len(src_pages).
    """
    src = np.asarray(src_pages, dtype=np.int64)
    dst = np.asarray(dst_pages, dtype=np.int64)
    assert src.shape == dst.shape and src.ndim == 1, f"page lists differ in shape: {src.shape} vs {dst.shape}"
    if src.size == 0:
        empty = np.zeros(0, dtype=np.int64)
        return empty, empty, empty
    # A run breaks wherever either side does not step by exactly one page.
    breaks = (np.diff(src) != 1) | (np.diff(dst) != 1)
    starts = np.flatnonzero(np.concatenate(([True], breaks)))
    lengths = np.diff(np.append(starts, src.size))
    return src[starts], dst[starts], lengths


def transfer_regions(
    src_ptrs: Sequence[int],
    dst_ptrs: Sequence[int],
    item_lens: Sequence[int],
    page_size: int,
    src_pages: Sequence[int],
    dst_pages: Sequence[int],
) -> tuple[list[int], list[int], list[int]]:
    """Byte regions that copy pages src_pages[i] -> dst_pages[i] in every KV buffer.

    src_ptrs, dst_ptrs, item_lens: one entry per KV buffer (layer-major, as in KVArgs); buffer b's page p
    starts at ptr[b] + p * item_lens[b] * page_size on each side.
    Returns (src_addrs, dst_addrs, lengths), equal-length lists of ints, buffer-major then run order.
    """
    assert len(src_ptrs) == len(dst_ptrs) == len(item_lens), "one pointer and item length per buffer"
    src_start, dst_start, run_pages = page_runs(src_pages, dst_pages)
    page_bytes = np.asarray(item_lens, dtype=np.int64) * page_size  # [B]
    # User-space addresses fit in int64 (below 2**63 on every platform we target).
    src_addrs = np.asarray(src_ptrs, dtype=np.int64)[:, None] + src_start[None, :] * page_bytes[:, None]  # [B, R]
    dst_addrs = np.asarray(dst_ptrs, dtype=np.int64)[:, None] + dst_start[None, :] * page_bytes[:, None]  # [B, R]
    lengths = run_pages[None, :] * page_bytes[:, None]  # [B, R]
    return src_addrs.ravel().tolist(), dst_addrs.ravel().tolist(), lengths.ravel().tolist()


def chunk_bounds(num_items: int, max_per_chunk: int) -> list[tuple[int, int]]:
    """[(lo, hi), ...] splitting range(num_items) into consecutive chunks of at most max_per_chunk items."""
    assert max_per_chunk > 0
    return [(lo, min(lo + max_per_chunk, num_items)) for lo in range(0, num_items, max_per_chunk)]
