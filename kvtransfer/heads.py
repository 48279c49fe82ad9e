"""Which KV heads each decode rank takes from which prefill rank, when the two instances shard KV heads over
different tensor-parallel sizes, and the byte regions that move them.

A rank caches a contiguous range of the model's KV heads, (first, count), in every KV buffer: a token's slot holds
its `count` heads back to back. Two instances with the same TP size hold the same ranges, rank for rank; otherwise a
decode rank's range is cut from one or more prefill ranks' (decode TP larger: a part of one rank's; smaller: several
ranks' side by side), and a replicated head (fewer KV heads than ranks) may come from any rank that holds it.
Pure functions of their inputs.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from kvtransfer.pages import merge_regions

HeadRange = tuple[int, int]  # (first head, number of heads)


@dataclass(frozen=True)
class HeadCopy:
    """Heads [src_first + src_offset, + count) of prefill rank src_rank go to decode rank dst_rank, at offset
    dst_offset of its range (offsets in heads, within each rank's own range)."""

    src_rank: int
    dst_rank: int
    src_offset: int
    dst_offset: int
    count: int


def plan_head_copies(src_ranges: Sequence[HeadRange], dst_ranges: Sequence[HeadRange]) -> list[HeadCopy]:
    """Every head of every decode rank, from a prefill rank that holds it, in runs as long as possible.

    src_ranges[p], dst_ranges[d]: (first, count) of prefill rank p's and decode rank d's heads. Decode rank d takes
    a head held by several prefill ranks from the d-th of them (modulo), so replicas share the sending.
    Raises ValueError when some decode head is held by no prefill rank.
    """
    copies: list[HeadCopy] = []
    for d, (d_first, d_count) in enumerate(dst_ranges):
        for h in range(d_first, d_first + d_count):
            holders = [p for p, (first, count) in enumerate(src_ranges) if first <= h < first + count]
            if not holders:
                raise ValueError(f"decode rank {d} caches KV head {h}, which no prefill rank holds "
                                 f"({list(src_ranges)})")
            p = holders[d % len(holders)]
            src_offset, dst_offset = h - src_ranges[p][0], h - d_first
            last = copies[-1] if copies else None
            if (last is not None and (last.src_rank, last.dst_rank) == (p, d)
                    and (last.src_offset + last.count, last.dst_offset + last.count) == (src_offset, dst_offset)):
                copies[-1] = HeadCopy(p, d, last.src_offset, last.dst_offset, last.count + 1)
            else:
                copies.append(HeadCopy(p, d, src_offset, dst_offset, 1))
    return copies


def assign_targets(src_ranges: Sequence[HeadRange], dst_ranges: Sequence[HeadRange]
                   ) -> list[list[tuple[int, list[HeadCopy] | None]]]:  # fmt: skip
    """Which decode ranks each prefill rank writes, and how: per prefill rank p, [(decode rank d, copies)], copies
    None meaning whole pages (p caches exactly d's heads). A decode rank whose range some prefill ranks hold exactly
    takes whole pages from one of them (the d-th modulo, so replicas share the sending); any other takes its heads
    in runs from the ranks plan_head_copies picks. Raises ValueError like plan_head_copies."""
    out: list[list[tuple[int, list[HeadCopy] | None]]] = [[] for _ in src_ranges]
    for d, dst in enumerate(dst_ranges):
        exact = [p for p, src in enumerate(src_ranges) if tuple(src) == tuple(dst)]
        if exact:
            out[exact[d % len(exact)]].append((d, None))
            continue
        by_rank: dict[int, list[HeadCopy]] = {}
        for c in plan_head_copies(src_ranges, [dst]):
            by_rank.setdefault(c.src_rank, []).append(HeadCopy(c.src_rank, d, c.src_offset, c.dst_offset, c.count))
        for p, copies in sorted(by_rank.items()):
            out[p].append((d, copies))
    return out


def head_regions(
    src_ptrs: Sequence[int],
    src_item_lens: Sequence[int],
    dst_ptrs: Sequence[int],
    dst_item_lens: Sequence[int],
    head_bytes: Sequence[int],
    page_size: int,
    src_pages: Sequence[int],
    dst_pages: Sequence[int],
    copy: HeadCopy,
) -> tuple[list[int], list[int], list[int]]:
    """Byte regions that copy one HeadCopy's heads of every token of pages src_pages[i] -> dst_pages[i], in every
    KV buffer: one region per token and buffer (a token's heads are contiguous, a page's subrange of heads is not),
    folded where consecutive tokens continue each other on both sides (then whole pages, and runs of pages, go as
    one region).

    *_ptrs, *_item_lens, head_bytes: one entry per KV buffer (layer-major, as in KVArgs); a token's slot is
    item_len bytes, head h of it starts at h * head_bytes.
    Returns (src_addrs, dst_addrs, lengths), buffer-major then token order.
    """
    src = np.asarray(src_pages, dtype=np.int64)
    dst = np.asarray(dst_pages, dtype=np.int64)
    assert src.shape == dst.shape and src.ndim == 1, f"page lists differ in shape: {src.shape} vs {dst.shape}"
    offset = np.arange(page_size, dtype=np.int64)
    src_slots = (src[:, None] * page_size + offset).ravel()  # [pages * page_size]
    dst_slots = (dst[:, None] * page_size + offset).ravel()
    srcs, dsts, lens = [], [], []
    for sp, si, dp, di, hb in zip(src_ptrs, src_item_lens, dst_ptrs, dst_item_lens, head_bytes, strict=True):
        srcs.append(sp + src_slots * si + copy.src_offset * hb)
        dsts.append(dp + dst_slots * di + copy.dst_offset * hb)
        lens.append(np.full(src_slots.size, copy.count * hb, dtype=np.int64))
    if not srcs:
        return [], [], []
    return merge_regions(np.concatenate(srcs), np.concatenate(dsts), np.concatenate(lens))


def copies_regions(
    src_ptrs: Sequence[int],
    src_item_lens: Sequence[int],
    src_heads: int,
    dst_ptrs: Sequence[int],
    dst_item_lens: Sequence[int],
    page_size: int,
    src_pages: Sequence[int],
    dst_pages: Sequence[int],
    copies: Sequence[HeadCopy],
) -> tuple[list[int], list[int], list[int]]:
    """head_regions of several runs of heads (offsets within each side's own head range) out of a rank caching
    src_heads heads, one after the other: what one prefill rank writes into one decode rank."""
    head_bytes = [il // src_heads for il in src_item_lens]
    srcs: list[int] = []
    dsts: list[int] = []
    lens: list[int] = []
    for copy in copies:
        s, d, n = head_regions(src_ptrs, src_item_lens, dst_ptrs, dst_item_lens, head_bytes, page_size, src_pages,
                               dst_pages, copy)  # fmt: skip
        srcs, dsts, lens = srcs + list(s), dsts + list(d), lens + list(n)
    return srcs, dsts, lens
