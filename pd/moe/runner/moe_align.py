"""(token, slot) pairs sorted into per-expert blocks of BLOCK_M rows, on the device, for the fused-MoE GEMMs.

A pair is ``p = t * K + k`` (token-major). Each local expert gets a run of rows holding its pairs in ascending
``p``, padded with the sentinel ``N * K`` to a multiple of BLOCK_M; runs follow each other in expert order, so
every block of BLOCK_M rows belongs to one expert. Slots whose id is -1 (another rank's expert) are left out.

No host sync, and every shape a function of (N, K, E, BLOCK_M) only, so the whole thing is captured in a CUDA graph
as it is. Up to BLOCK_T pairs (one tile: decode batches, where the step is launch-bound) it is one launch,
``_align_one_tile_kernel``, which does in one program what the four launches below do. Above, four launches:

1. ``_count_kernel`` (one program per tile of BLOCK_T pairs): a histogram of the tile's experts, and the
   sentinel written over this program's share of ``sorted_ids``.
2. ``_tile_cumsum_kernel`` (one program per BLOCK_E experts): pairs of each expert in tiles up to and including
   each tile. (torch.cumsum over the tiles' dimension took 91 us at 8,192 tokens x top-8 on an H200, over three
   times the other three launches together (~25 us): its scan runs one column per thread. This kernel: 9 us.)
3. ``_offsets_kernel`` (one program per BLOCK_B blocks): each expert's first row (runs padded to BLOCK_M), the
   padded row count, and the expert of every block (-1 past the last run).
4. ``_scatter_kernel`` (one program per tile): each local pair's row = its expert's first row + pairs of that
   expert in earlier tiles + pairs of that expert earlier in this tile.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

BLOCK_T = 128  # pairs per tile; the scatter compares the tile's pairs pairwise, [BLOCK_T, BLOCK_T]
BLOCK_B = 64  # blocks per step when the offsets kernel writes expert_of_block
BLOCK_P = 16  # padding rows per run per step in the one-tile kernel (divides every block_m)
CUMSUM_BLOCK_E, CUMSUM_CHUNK = 32, 64  # experts per program and tiles per step of the tiles' cumsum


@dataclass(frozen=True)
class AlignedPairs:
    """Pairs sorted by local expert in blocks of ``block_m`` rows (all tensors on the ids' device).

    sorted_ids: [max_rows] int32 pair index ``t * K + k`` per row; padding rows hold ``num_pairs`` (N * K).
    expert_of_block: [max_blocks] int32 local expert of each block of ``block_m`` rows; -1 past the used rows.
    num_rows_post_pad: [1] int32 rows in use (a multiple of block_m; the rows past it are padding too).
    num_pairs: N * K (the sentinel).
    block_m: rows per block.
    """

    sorted_ids: torch.Tensor
    expert_of_block: torch.Tensor
    num_rows_post_pad: torch.Tensor
    num_pairs: int
    block_m: int


def max_padded_rows(num_pairs: int, num_experts: int, block_m: int) -> int:
    """Static bound on the rows of the padded layout: at most min(E, pairs) experts are hit, each wasting
    at most block_m - 1 rows to padding; rounded up to whole blocks."""
    rows = num_pairs + min(num_experts, num_pairs) * (block_m - 1)
    return triton.cdiv(rows, block_m) * block_m


@triton.jit
def _load_experts(ids_ptr, pairs, num_pairs, num_experts):
    ids = tl.load(ids_ptr + pairs, mask=pairs < num_pairs, other=-1)
    # Foreign slots (-1), ids out of range and lanes past the end all land in bin num_experts, which nobody reads.
    local = (ids >= 0) & (ids < num_experts)
    return local, tl.where(local, ids, num_experts).to(tl.int32)


@triton.jit
def _rank_in_tile(experts, lanes):
    # Rank among this tile's pairs of the same expert: the same-expert pairs at earlier lanes.
    earlier = (experts[None, :] == experts[:, None]) & (lanes[None, :] < lanes[:, None])
    return tl.sum(earlier.to(tl.int32), axis=1)


@triton.jit
def _store_owners(end, is_expert, num_experts, expert_of_block_ptr, first_block, last_block,
                  BLOCK_M: tl.constexpr, BLOCK_B: tl.constexpr):  # fmt: skip
    """The expert of blocks [first_block, last_block), from the runs' padded ends (-1 past the last run)."""
    # Block b belongs to the first expert whose run ends past it: the number of runs ending at or before b.
    end_block = tl.where(is_expert, end // BLOCK_M, 0x7FFFFFFF)
    for b0 in range(first_block, last_block, BLOCK_B):
        blocks = b0 + tl.arange(0, BLOCK_B)
        owner = tl.sum((blocks[:, None] >= end_block[None, :]).to(tl.int32), axis=1)
        owner = tl.where(owner < num_experts, owner, -1)
        tl.store(expert_of_block_ptr + blocks, owner, mask=blocks < last_block)


@triton.jit
def _padded_runs(counts, BLOCK_M: tl.constexpr):
    """Each expert's run of counts[e] rows padded to BLOCK_M, in expert order: (padded length, end row)."""
    padded = (counts + BLOCK_M - 1) // BLOCK_M * BLOCK_M
    return padded, tl.cumsum(padded, axis=0)


@triton.jit
def _store_runs(counts, is_expert, num_experts, expert_of_block_ptr, num_rows_post_pad_ptr, max_blocks,
                BLOCK_M: tl.constexpr, BLOCK_B: tl.constexpr):  # fmt: skip
    """Runs of counts[e] rows padded to BLOCK_M, in expert order: stores the padded row count and the expert of
    every block; returns each expert's padded run length and first row."""
    padded, end = _padded_runs(counts, BLOCK_M)
    tl.store(num_rows_post_pad_ptr, tl.sum(padded, axis=0))
    _store_owners(end, is_expert, num_experts, expert_of_block_ptr, 0, max_blocks, BLOCK_M, BLOCK_B)
    return padded, end - padded


@triton.jit(do_not_specialize=["num_pairs", "fill_per_program", "max_rows"])
def _count_kernel(ids_ptr, tile_counts_ptr, sorted_ids_ptr, num_pairs, num_experts, fill_per_program, max_rows,
                  E_PAD: tl.constexpr, BLOCK_T: tl.constexpr):  # fmt: skip
    tile = tl.program_id(0)
    _, experts = _load_experts(ids_ptr, tile * BLOCK_T + tl.arange(0, BLOCK_T), num_pairs, num_experts)
    tl.store(tile_counts_ptr + tile * E_PAD + tl.arange(0, E_PAD), tl.histogram(experts, E_PAD))
    # The sentinel over every row (the scatter overwrites the rows in use), each program a share of them.
    start = tile * fill_per_program
    for row0 in range(start, start + fill_per_program, BLOCK_T):
        rows = row0 + tl.arange(0, BLOCK_T)
        tl.store(sorted_ids_ptr + rows, tl.full([BLOCK_T], 0, tl.int32) + num_pairs, mask=rows < max_rows)


@triton.jit(do_not_specialize=["tiles"])
def _tile_cumsum_kernel(tile_counts_ptr, tile_cumsum_ptr, tiles, E_PAD: tl.constexpr, BLOCK_E: tl.constexpr,
                        CHUNK: tl.constexpr):  # fmt: skip
    # Inclusive cumsum over tiles of BLOCK_E experts' columns, CHUNK tiles at a time, carrying the running total.
    experts = tl.program_id(0) * BLOCK_E + tl.arange(0, BLOCK_E)
    rows = tl.arange(0, CHUNK)
    carry = tl.zeros([BLOCK_E], tl.int32)
    for t0 in range(0, tiles, CHUNK):
        at = (t0 + rows)[:, None] * E_PAD + experts[None, :]
        inside = (t0 + rows < tiles)[:, None]
        counts = tl.load(tile_counts_ptr + at, mask=inside, other=0)
        tl.store(tile_cumsum_ptr + at, tl.cumsum(counts, axis=0) + carry[None, :], mask=inside)
        carry += tl.sum(counts, axis=0)


@triton.jit(do_not_specialize=["max_blocks"])
def _offsets_kernel(totals_ptr, expert_start_ptr, expert_of_block_ptr, num_rows_post_pad_ptr, num_experts,
                    max_blocks, E_PAD: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_B: tl.constexpr):  # fmt: skip
    # One program per BLOCK_B blocks, each recomputing the runs (E_PAD counts), so the owners of many blocks are
    # not one program's serial loop (5.5 us at 64 tokens x top-8 over 128 experts on an H200 as one program).
    experts = tl.arange(0, E_PAD)
    is_expert = experts < num_experts
    counts = tl.load(totals_ptr + experts, mask=is_expert, other=0)
    padded, end = _padded_runs(counts, BLOCK_M)
    first = tl.program_id(0) * BLOCK_B
    _store_owners(end, is_expert, num_experts, expert_of_block_ptr, first, tl.minimum(first + BLOCK_B, max_blocks),
                  BLOCK_M, BLOCK_B)  # fmt: skip
    if tl.program_id(0) == 0:
        tl.store(num_rows_post_pad_ptr, tl.sum(padded, axis=0))
        tl.store(expert_start_ptr + experts, end - padded, mask=is_expert)


@triton.jit(do_not_specialize=["num_pairs"])
def _scatter_kernel(ids_ptr, tile_counts_ptr, tile_cumsum_ptr, expert_start_ptr, sorted_ids_ptr, num_pairs,
                    num_experts, E_PAD: tl.constexpr, BLOCK_T: tl.constexpr):  # fmt: skip
    tile = tl.program_id(0)
    lanes = tl.arange(0, BLOCK_T)
    pairs = tile * BLOCK_T + lanes
    local, experts = _load_experts(ids_ptr, pairs, num_pairs, num_experts)
    rank = _rank_in_tile(experts, lanes)
    # Pairs of the expert in earlier tiles: inclusive cumsum up to this tile minus this tile's own count.
    at = tile * E_PAD + experts
    before = tl.load(tile_cumsum_ptr + at, mask=local, other=0) - tl.load(tile_counts_ptr + at, mask=local, other=0)
    row = tl.load(expert_start_ptr + experts, mask=local, other=0) + before + rank
    tl.store(sorted_ids_ptr + row, pairs, mask=local)


@triton.jit(do_not_specialize=["num_pairs", "max_rows", "max_blocks"])
def _align_one_tile_kernel(ids_ptr, sorted_ids_ptr, expert_of_block_ptr, num_rows_post_pad_ptr, num_pairs,
                           num_experts, max_rows, max_blocks, E_PAD: tl.constexpr, BLOCK_M: tl.constexpr,
                           BLOCK_T: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_P: tl.constexpr):  # fmt: skip
    """All four launches in one program, for num_pairs <= BLOCK_T.

    The four launches write the sentinel over every row and then let the scatter overwrite the rows in use; in one
    program that needs the fill's stores to land before the scatter's, which stores from different threads to the
    same address do not promise without a barrier. Instead every row of sorted_ids is stored exactly once, with
    its final value, by one of three disjoint sets of stores: the pairs' rows, each run's padding after its pairs,
    and the rows from num_rows_post_pad on. No store order matters, so there is no barrier to get right (nor a
    race the tests could miss: the interpreter runs stores in program order).
    """
    lanes = tl.arange(0, BLOCK_T)
    local, experts = _load_experts(ids_ptr, lanes, num_pairs, num_experts)
    expert_range = tl.arange(0, E_PAD)
    is_expert = expert_range < num_experts
    counts = tl.where(is_expert, tl.histogram(experts, E_PAD), 0)
    padded, start = _store_runs(counts, is_expert, num_experts, expert_of_block_ptr, num_rows_post_pad_ptr,
                                max_blocks, BLOCK_M, BLOCK_B)  # fmt: skip

    # The pairs: row = the expert's first row + rank. Registers cannot be indexed by expert, so the first row is
    # counted from the pairs too: an expert's run has one block per pair of it whose rank is a multiple of BLOCK_M,
    # so it starts BLOCK_M rows past each such pair of a lower expert (foreign lanes hold num_experts, never lower).
    rank = _rank_in_tile(experts, lanes)
    opens_block = (rank % BLOCK_M) == 0
    opened_below = (experts[None, :] < experts[:, None]) & opens_block[None, :]
    first_row = tl.sum(opened_below.to(tl.int32), axis=1) * BLOCK_M
    tl.store(sorted_ids_ptr + first_row + rank, lanes, mask=local)

    # Each run's padding: rows start + counts up to start + padded (fewer than BLOCK_M), BLOCK_P at a time.
    pad_from = start + counts
    for j0 in range(0, BLOCK_M, BLOCK_P):
        j = j0 + tl.arange(0, BLOCK_P)
        rows = pad_from[:, None] + j[None, :]
        in_pad = j[None, :] < (padded - counts)[:, None]  # none past the experts: their counts are 0
        tl.store(sorted_ids_ptr + rows, tl.full([E_PAD, BLOCK_P], 0, tl.int32) + num_pairs, mask=in_pad)

    # The rows past the runs.
    used = tl.sum(padded, axis=0)
    sentinel = tl.full([BLOCK_T], 0, tl.int32) + num_pairs
    for row0 in range(0, max_rows, BLOCK_T):
        rows = row0 + lanes
        tl.store(sorted_ids_ptr + rows, sentinel, mask=(rows >= used) & (rows < max_rows))


def align_pairs_to_blocks(topk_ids_NK: torch.Tensor, num_experts: int, block_m: int) -> AlignedPairs:
    """Sort this rank's (token, slot) pairs by local expert into blocks of ``block_m`` rows. Asynchronous.

    Args:
        topk_ids_NK: [N, K] int64 (or int32) local expert ids; -1 (and, unchecked, any id >= num_experts: checking
            would need a host sync) marks a slot this rank does not compute.
        num_experts: E_local.
        block_m: rows per block (the GEMMs' BLOCK_M), a power of two >= 16.

    Returns:
        AlignedPairs with ``max_rows = max_padded_rows(N * K, E, block_m)`` rows and ``max_rows // block_m``
        blocks: static shapes given N, so a CUDA graph can capture it. Within an expert, rows are in ascending
        pair index; the result is deterministic.
    """
    return _align(topk_ids_NK, num_experts, block_m, one_launch=topk_ids_NK.numel() <= BLOCK_T)


def _align(topk_ids_NK: torch.Tensor, num_experts: int, block_m: int, one_launch: bool) -> AlignedPairs:
    """align_pairs_to_blocks on the path asked for: one launch (up to BLOCK_T pairs) or the four (any number of
    pairs; the tests compare the two on one tile)."""
    assert topk_ids_NK.dim() == 2 and topk_ids_NK.dtype in (torch.int64, torch.int32), topk_ids_NK.dtype
    assert block_m >= 16 and block_m & (block_m - 1) == 0, block_m
    device = topk_ids_NK.device
    ids = topk_ids_NK.contiguous().view(-1)
    num_pairs = ids.numel()
    assert num_pairs > 0, "nothing to align: the caller skips empty batches"
    max_rows = max_padded_rows(num_pairs, num_experts, block_m)
    max_blocks = max_rows // block_m
    e_pad = triton.next_power_of_2(num_experts + 1)  # one bin more than experts: the skipped slots
    tiles = triton.cdiv(num_pairs, BLOCK_T)

    sorted_ids = torch.empty(max_rows, dtype=torch.int32, device=device)
    expert_of_block = torch.empty(max_blocks, dtype=torch.int32, device=device)
    num_rows_post_pad = torch.empty(1, dtype=torch.int32, device=device)
    if one_launch:
        assert tiles == 1, num_pairs
        # 8 warps: with 4, ptxas (sm_90) spills registers around the two [BLOCK_T, BLOCK_T] pairwise sums.
        _align_one_tile_kernel[(1,)](ids, sorted_ids, expert_of_block, num_rows_post_pad, num_pairs, num_experts,
                                     max_rows, max_blocks, E_PAD=e_pad, BLOCK_M=block_m, BLOCK_T=BLOCK_T,
                                     BLOCK_B=BLOCK_B, BLOCK_P=BLOCK_P, num_warps=8)  # fmt: skip
        return AlignedPairs(sorted_ids, expert_of_block, num_rows_post_pad, num_pairs, block_m)

    tile_counts = torch.empty(tiles, e_pad, dtype=torch.int32, device=device)
    expert_start = torch.empty(e_pad, dtype=torch.int32, device=device)
    fill = triton.cdiv(triton.cdiv(max_rows, tiles), BLOCK_T) * BLOCK_T
    _count_kernel[(tiles,)](ids, tile_counts, sorted_ids, num_pairs, num_experts, fill, max_rows,
                            E_PAD=e_pad, BLOCK_T=BLOCK_T)  # fmt: skip
    tile_cumsum = torch.empty_like(tile_counts)
    block_e = min(e_pad, CUMSUM_BLOCK_E)
    _tile_cumsum_kernel[(e_pad // block_e,)](tile_counts, tile_cumsum, tiles, E_PAD=e_pad, BLOCK_E=block_e,
                                             CHUNK=CUMSUM_CHUNK)  # fmt: skip
    _offsets_kernel[(triton.cdiv(max_blocks, BLOCK_B),)](
        tile_cumsum[-1], expert_start, expert_of_block, num_rows_post_pad, num_experts, max_blocks, E_PAD=e_pad,
        BLOCK_M=block_m, BLOCK_B=BLOCK_B,
    )  # fmt: skip
    _scatter_kernel[(tiles,)](ids, tile_counts, tile_cumsum, expert_start, sorted_ids, num_pairs, num_experts,
                              E_PAD=e_pad, BLOCK_T=BLOCK_T)  # fmt: skip
    return AlignedPairs(sorted_ids, expert_of_block, num_rows_post_pad, num_pairs, block_m)
