"""Page lists -> byte regions for the transfer engine.

A request's KV lives in pages that are rarely contiguous, but allocators hand out runs often enough that
merging neighbours pays: one region per run of pages where the source and the destination page both advance
by one, per KV buffer. The transfer engine then gets one batch of regions per request instead of one call per
page. When a side's pages are scattered over many runs, that side goes through a contiguous staging area
instead (kvtransfer.staging): these functions say when that pays and how a room's bytes lay out there.
Pure functions of their inputs; numpy does the per-page work.
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


def merge_regions(src: Sequence[int], dst: Sequence[int], lengths: Sequence[int]) -> tuple[list[int], list[int],
                                                                                      list[int]]:
    """Regions (src addrs, dst addrs, lengths) with every region that continues the previous one on both sides
    folded into it: the same bytes in as few regions as their order allows."""
    s, d, n = (np.asarray(x, dtype=np.int64) for x in (src, dst, lengths))
    if s.size == 0:
        return [], [], []
    continues = (s[:-1] + n[:-1] == s[1:]) & (d[:-1] + n[:-1] == d[1:])
    starts = np.flatnonzero(np.concatenate(([True], ~continues)))
    return s[starts].tolist(), d[starts].tolist(), np.add.reduceat(n, starts).tolist()


# What one extra region costs, in bytes copied: Mooncake's TCP transport took 35-70 us per region of a scattered
# prompt (benchmarks/bench_kv_transfer.py, 2-core x86 VM), about what a host memcpy needs for 256 KiB.
REGION_COST_BYTES = 256 * 1024


def staging_pays(pages: Sequence[int], page_bytes: Sequence[int]) -> bool:
    """Whether one side of a transfer should copy its pages through a contiguous staging area.

    pages: that side's pages in prompt order; page_bytes: bytes of a page in each KV buffer. Staging copies every
    byte once more but leaves that side one run per buffer instead of runs(pages) of them, so it pays when the
    regions it saves cost more than the copy.
    """
    arr = np.asarray(pages, dtype=np.int64)
    runs = 1 + int(np.count_nonzero(np.diff(arr) != 1)) if arr.size else 0
    return (runs - 1) * len(page_bytes) * REGION_COST_BYTES > arr.size * sum(page_bytes)


def staged_ptrs(base: int, page_bytes: Sequence[int], num_pages: int) -> list[int]:
    """Where each KV buffer's pages start in a room's staging area at `base`: buffer-major, every buffer's
    num_pages pages in prompt order, so the area is itself a KV layout whose page i is prompt page i."""
    offsets = np.cumsum([0, *page_bytes[:-1]], dtype=np.int64) * num_pages
    return (base + offsets).tolist()


Segment = tuple[int, int, int, int]  # (buffer, first prompt page, end prompt page, byte offset in the piece)


def staging_pieces(num_pages: int, page_bytes: Sequence[int], capacity: int) -> list[list[Segment]]:
    """Splits a room's staged bytes (the staged_ptrs layout) into pieces of at most `capacity` bytes, in order.

    Each piece is a list of segments (b, lo, hi, offset): buffer b's prompt pages [lo, hi) sit at `offset` of
    the piece, back to back. Every page of every buffer is in exactly one segment. Needs capacity >= max(page_bytes).
    """
    assert capacity >= max(page_bytes, default=0), f"a {capacity}-byte piece cannot hold one page"
    pieces: list[list[Segment]] = [[]]
    used = 0
    for b, pb in enumerate(page_bytes):
        lo = 0
        while lo < num_pages:
            fit = (capacity - used) // pb
            if fit == 0:
                pieces.append([])
                used = 0
                continue
            hi = min(num_pages, lo + fit)
            pieces[-1].append((b, lo, hi, used))
            used += (hi - lo) * pb
            lo = hi
    return [p for p in pieces if p]


def chunk_bounds(num_items: int, max_per_chunk: int) -> list[tuple[int, int]]:
    """[(lo, hi), ...] splitting range(num_items) into consecutive chunks of at most max_per_chunk items."""
    assert max_per_chunk > 0
    return [(lo, min(lo + max_per_chunk, num_items)) for lo in range(0, num_items, max_per_chunk)]
