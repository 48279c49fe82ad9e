"""Triton kernels of the torch backend's symmetric-memory transport (pd.moe.dispatcher.symm_exchange).

Every rank owns, in each peer's buffers, a block of ``capacity`` rows ([R, capacity, ...] per buffer, block s =
rows from source s). A dispatch or combine is a few launches:

- ``route`` (normal mode): per destination rank, each token's slot in that rank's block (-1 if none of its
  experts is there) and the row count, which it also writes, with this rank's token count, into the peer's
  meta buffer (so the receiver learns its counts after one barrier, without an all-to-all).
- ``send_rows``: each token's payload row (pd.moe.dispatcher.payload layout) straight into the peers' receive
  buffers. Low-latency mode writes every row 0..C-1 of every block (blank rows: zero hidden, ids -1), so shapes
  never change; normal mode writes only routed tokens, at the slots ``route`` gave them, and skips slots past
  the block's capacity (it sends before the counts arrive; a batch that did not fit is sent again after growth).
- ``unpack_rows``: the received rows, block after block (``counts`` says how many rows each source sent), split
  into hidden [N, H], local ids [N, K] int64 (-1 for other ranks' experts and for none), weights [N, K] float32
  and the valid-row mask.
- ``send_back``: each received row's expert output into its source rank's combine buffer, at the same slot.
- ``reduce_partials``: per token, the sum of the partials of the ranks it went to (float32 accumulation).

Rows move as 64-bit words (a store over NVLink is as wide as its element: 2-byte bf16 stores would be several
times slower), so hidden rows must span a multiple of 8 bytes. Peer buffers are reached through their
addresses in this process (``peer_ptrs``, int64 on the device). Tested on GPUs across processes
(tests/test_symm_exchange_gpu.py) and on CPU in Triton's interpreter with simulated ranks (tests/test_symm_kernels.py).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

WORDS_PER_BLOCK = 1024
TOKENS_PER_BLOCK = 128  # route's tile is [128, K] ids: a larger one spills registers


@triton.jit
def _source_of(counts_ptr, row, RANKS: tl.constexpr):
    """(source rank, index within its block) of received row ``row``; counts [R]: rows received per source. A row
    past all of them has source RANKS (a grid sized for full blocks, as CUDA graphs need, skips it)."""
    source = tl.full([], 0, tl.int32)
    start = tl.full([], 0, tl.int64)
    end = tl.full([], 0, tl.int64)
    for s in tl.static_range(RANKS):
        end += tl.load(counts_ptr + s)
        later = row >= end  # the row lies past source s's rows
        source += later.to(tl.int32)
        start = tl.where(later, end, start)
    return source, row - start


@triton.jit(do_not_specialize=["num_tokens"])
def _route_kernel(
    ids_ptr, pos_ptr, meta_peer_ptrs, num_tokens, my_rank, num_local_experts,
    TOP_K: tl.constexpr, SLOTS: tl.constexpr, BLOCK_T: tl.constexpr,
):  # fmt: skip
    peer = tl.program_id(0)
    slots = tl.arange(0, SLOTS)
    running = tl.full([], 0, tl.int32)
    for start in range(0, num_tokens, BLOCK_T):
        tokens = start + tl.arange(0, BLOCK_T)
        inside = tokens < num_tokens
        ids = tl.load(ids_ptr + tokens[:, None] * TOP_K + slots[None, :],
                      mask=inside[:, None] & (slots[None, :] < TOP_K), other=-1)  # fmt: skip
        ids32 = ids.to(tl.int32)  # 32-bit division: 64-bit is emulated
        owner = tl.where(ids32 >= 0, ids32 // num_local_experts, -1)
        sent = (tl.sum((owner == peer).to(tl.int32), axis=1) > 0).to(tl.int32)
        pos = tl.where(sent > 0, running + tl.cumsum(sent, axis=0) - 1, -1)
        tl.store(pos_ptr + peer * num_tokens + tokens, pos, mask=inside)
        running += tl.sum(sent, axis=0)
    meta = tl.load(meta_peer_ptrs + peer).to(tl.pointer_type(tl.int64)) + my_rank * 2
    tl.store(meta, running.to(tl.int64))
    tl.store(meta + 1, tl.full([], num_tokens, tl.int64))


@triton.jit
def _write_row(hidden_ptr, weights_ptr, peer_ptrs, peer, row, slot, ids, sent, is_token, capacity, my_rank,
               hidden_words, ids_at, row_bytes, TOP_K: tl.constexpr, SLOTS: tl.constexpr, BLOCK: tl.constexpr):
    """Token ``row``'s payload (a blank one unless ``sent``) into row ``slot`` of block [my_rank] on ``peer``."""
    slots = tl.arange(0, SLOTS)
    is_slot = slots < TOP_K
    dst = tl.load(peer_ptrs + peer) + (my_rank * capacity + slot).to(tl.int64) * row_bytes
    dst_words = dst.to(tl.pointer_type(tl.int64))
    src = hidden_ptr + row.to(tl.int64) * hidden_words
    for start in range(0, hidden_words, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        inside = offs < hidden_words
        tl.store(dst_words + offs, tl.load(src + offs, mask=inside & sent, other=0), mask=inside)
    meta = (dst + ids_at).to(tl.pointer_type(tl.int32))
    weights = tl.load(weights_ptr + row * TOP_K + slots, mask=is_token & is_slot, other=0.0)
    tl.store(meta + slots, tl.where(sent, ids, -1).to(tl.int32), mask=is_slot)
    tl.store(meta + TOP_K + slots, tl.where(sent, weights, 0.0).to(tl.int32, bitcast=True), mask=is_slot)


@triton.jit(do_not_specialize=["num_tokens"])
def _send_rows_kernel(
    hidden_ptr, ids_ptr, weights_ptr, pos_ptr, peer_ptrs, num_tokens, capacity, my_rank, num_local_experts,
    hidden_words, ids_at, row_bytes, ALL_ROWS: tl.constexpr, TOP_K: tl.constexpr, SLOTS: tl.constexpr,
    BLOCK: tl.constexpr,
):  # fmt: skip
    row = tl.program_id(0)
    peer = tl.program_id(1)
    slots = tl.arange(0, SLOTS)
    is_token = row < num_tokens
    ids = tl.load(ids_ptr + row * TOP_K + slots, mask=is_token & (slots < TOP_K), other=-1)
    if ALL_ROWS:  # low latency: row t of every block, blank where not routed; record the slot for combine
        owner = tl.where(ids >= 0, ids // num_local_experts, -1)
        sent = tl.sum((owner == peer).to(tl.int32), axis=0) > 0
        tl.store(pos_ptr + peer * num_tokens + row, tl.where(sent, row, -1), mask=is_token)
        _write_row(hidden_ptr, weights_ptr, peer_ptrs, peer, row, row, ids, sent, is_token, capacity, my_rank,
                   hidden_words, ids_at, row_bytes, TOP_K, SLOTS, BLOCK)  # fmt: skip
    else:  # normal: routed tokens only, at the slot route() gave them, if the block has room (else resent later)
        slot = tl.load(pos_ptr + peer * num_tokens + row)
        if (slot >= 0) & (slot < capacity):
            _write_row(hidden_ptr, weights_ptr, peer_ptrs, peer, row, slot, ids, slot >= 0, is_token, capacity,
                       my_rank, hidden_words, ids_at, row_bytes, TOP_K, SLOTS, BLOCK)  # fmt: skip


@triton.jit
def _unpack_rows_kernel(
    buffer_ptr, counts_ptr, hidden_ptr, ids_ptr, weights_ptr, valid_ptr, capacity, my_rank, num_local_experts,
    hidden_words, ids_at, row_bytes, RANKS: tl.constexpr, TOP_K: tl.constexpr, SLOTS: tl.constexpr,
    BLOCK: tl.constexpr,
):  # fmt: skip
    out_row = tl.program_id(0).to(tl.int64)
    source, index = _source_of(counts_ptr, out_row, RANKS)
    if source < RANKS:
        _unpack_one(buffer_ptr, hidden_ptr, ids_ptr, weights_ptr, valid_ptr, out_row, source * capacity + index,
                    my_rank, num_local_experts, hidden_words, ids_at, row_bytes, TOP_K, SLOTS, BLOCK)


@triton.jit
def _unpack_one(buffer_ptr, hidden_ptr, ids_ptr, weights_ptr, valid_ptr, out_row, row, my_rank, num_local_experts,
                hidden_words, ids_at, row_bytes, TOP_K: tl.constexpr, SLOTS: tl.constexpr, BLOCK: tl.constexpr):
    """Received row ``row`` (source-major index into the buffer) into output row ``out_row``."""
    src = buffer_ptr + row * (row_bytes // 8)
    dst = hidden_ptr + out_row * hidden_words
    for start in range(0, hidden_words, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        inside = offs < hidden_words
        tl.store(dst + offs, tl.load(src + offs, mask=inside), mask=inside)
    meta = (buffer_ptr.to(tl.pointer_type(tl.int8)) + row * row_bytes + ids_at).to(tl.pointer_type(tl.int32))
    slots = tl.arange(0, SLOTS)
    is_slot = slots < TOP_K
    ids = tl.load(meta + slots, mask=is_slot, other=-1)
    mine = (ids >= 0) & (ids // num_local_experts == my_rank)
    local = tl.where(mine, ids - my_rank * num_local_experts, -1)
    tl.store(ids_ptr + out_row * TOP_K + slots, local.to(tl.int64), mask=is_slot)
    weights = tl.load(meta + TOP_K + slots, mask=is_slot, other=0).to(tl.float32, bitcast=True)
    tl.store(weights_ptr + out_row * TOP_K + slots, weights, mask=is_slot)
    tl.store(valid_ptr + out_row, tl.sum(mine.to(tl.int32), axis=0) > 0)


@triton.jit
def _send_back_kernel(x_ptr, counts_ptr, peer_ptrs, capacity, my_rank, row_words, RANKS: tl.constexpr,
                      BLOCK: tl.constexpr):  # fmt: skip
    row = tl.program_id(0).to(tl.int64)
    source, index = _source_of(counts_ptr, row, RANKS)
    if source < RANKS:
        dst = tl.load(peer_ptrs + source).to(tl.pointer_type(tl.int64))
        dst += (my_rank * capacity + index).to(tl.int64) * row_words
        src = x_ptr + row * row_words
        for start in range(0, row_words, BLOCK):
            offs = start + tl.arange(0, BLOCK)
            inside = offs < row_words
            tl.store(dst + offs, tl.load(src + offs, mask=inside), mask=inside)


@triton.jit(do_not_specialize=["num_tokens"])
def _reduce_partials_kernel(
    buffer_ptr, pos_ptr, out_ptr, num_tokens, capacity, hidden, RANKS: tl.constexpr, BLOCK: tl.constexpr
):
    token = tl.program_id(0)
    for start in range(0, hidden, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        inside = offs < hidden
        acc = tl.zeros([BLOCK], dtype=tl.float32)
        for rank in tl.static_range(RANKS):
            slot = tl.load(pos_ptr + rank * num_tokens + token)
            rows = buffer_ptr + (rank * capacity + tl.maximum(slot, 0)).to(tl.int64) * hidden
            acc += tl.load(rows + offs, mask=inside & (slot >= 0), other=0.0).to(tl.float32)
        tl.store(out_ptr + token.to(tl.int64) * hidden + offs, acc.to(out_ptr.dtype.element_ty), mask=inside)


def _words(t: torch.Tensor) -> torch.Tensor:
    """A tensor's rows as 64-bit words (its last dimension must span a multiple of 8 bytes)."""
    return t.contiguous().view(torch.int64)


def route(ids_TK: torch.Tensor, meta_peer_ptrs: torch.Tensor, my_rank: int, num_local_experts: int) -> torch.Tensor:
    """-> pos [R, T] int32: token t's slot in rank r's block, -1 if not sent. Also writes (rows sent to r, T)
    into every peer r's meta buffer at [my_rank]."""
    num_tokens, top_k = ids_TK.shape
    ranks = meta_peer_ptrs.numel()
    pos_RT = torch.empty(ranks, num_tokens, dtype=torch.int32, device=ids_TK.device)
    _route_kernel[(ranks,)](
        ids_TK.contiguous(), pos_RT, meta_peer_ptrs, num_tokens, my_rank, num_local_experts, TOP_K=top_k,
        SLOTS=triton.next_power_of_2(top_k), BLOCK_T=TOKENS_PER_BLOCK,
    )  # fmt: skip
    return pos_RT


def send_rows(
    hidden_TH: torch.Tensor, ids_TK: torch.Tensor, weights_TK: torch.Tensor, pos_RT: torch.Tensor,
    peer_ptrs: torch.Tensor, capacity: int, my_rank: int, num_local_experts: int, ids_at: int, row_bytes: int,
    all_rows: bool,
) -> None:  # fmt: skip
    """Write this rank's rows into block [my_rank] of every peer's receive buffer.

    all_rows=True (low latency): rows 0..capacity-1, blank where a token is not routed there (and beyond T);
    fills ``pos_RT`` ([R, T] int32, written) with t or -1. all_rows=False (normal): only routed tokens, at
    ``pos_RT`` (from ``route``)."""
    num_tokens, top_k = ids_TK.shape
    grid_rows = capacity if all_rows else num_tokens
    if grid_rows == 0:
        return
    _send_rows_kernel[(grid_rows, peer_ptrs.numel())](
        _words(hidden_TH), ids_TK.contiguous(), weights_TK.float().contiguous(), pos_RT, peer_ptrs, num_tokens,
        capacity, my_rank, num_local_experts, hidden_TH.shape[1] * hidden_TH.element_size() // 8, ids_at,
        row_bytes, ALL_ROWS=all_rows, TOP_K=top_k, SLOTS=triton.next_power_of_2(top_k), BLOCK=WORDS_PER_BLOCK,
    )  # fmt: skip


def unpack_rows(
    buffer_RCB: torch.Tensor, counts_R: torch.Tensor, num_rows: int, hidden: int, dtype: torch.dtype,
    top_k: int, my_rank: int, num_local_experts: int, ids_at: int,
    out: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:  # fmt: skip
    """The first counts_R[s] rows (int64 [R] on the device) of each source block s, in source order.

    Returns hidden [N, H] dtype, local ids [N, K] int64, weights [N, K] float32, valid [N] bool (N = num_rows),
    into ``out`` when given. N may exceed the rows received (a grid fixed for CUDA graphs): rows past them are
    left as they were."""
    ranks, capacity, row_bytes = buffer_RCB.shape
    device = buffer_RCB.device
    if out is None:
        out = (torch.empty(num_rows, hidden, dtype=dtype, device=device),
               torch.empty(num_rows, top_k, dtype=torch.int64, device=device),
               torch.empty(num_rows, top_k, dtype=torch.float32, device=device),
               torch.empty(num_rows, dtype=torch.bool, device=device))  # fmt: skip
    hidden_NH, ids_NK, weights_NK, valid_N = out
    if num_rows:
        _unpack_rows_kernel[(num_rows,)](
            buffer_RCB.view(torch.int64), counts_R, hidden_NH.view(torch.int64), ids_NK, weights_NK, valid_N,
            capacity, my_rank, num_local_experts, hidden * hidden_NH.element_size() // 8, ids_at, row_bytes,
            RANKS=ranks, TOP_K=top_k, SLOTS=triton.next_power_of_2(top_k), BLOCK=WORDS_PER_BLOCK,
        )  # fmt: skip
    return hidden_NH, ids_NK, weights_NK, valid_N


def send_back(x_NH: torch.Tensor, counts_R: torch.Tensor, peer_ptrs: torch.Tensor, capacity: int,
              my_rank: int) -> None:  # fmt: skip
    """Received row n's expert output (row n of ``x_NH``, rows in unpack_rows' order) into its source's
    combine buffer, block [my_rank], at the slot it arrived in. Rows of ``x_NH`` past the rows received are
    skipped."""
    if x_NH.shape[0] == 0:
        return
    words = _words(x_NH)
    _send_back_kernel[(x_NH.shape[0],)](
        words, counts_R, peer_ptrs, capacity, my_rank, words.shape[1], RANKS=peer_ptrs.numel(),
        BLOCK=WORDS_PER_BLOCK,
    )  # fmt: skip


def reduce_partials(buffer_RCH: torch.Tensor, pos_RT: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """[T, H] (``out`` when given): per token t, the sum over ranks r with pos_RT[r, t] >= 0 of
    buffer_RCH[r, pos_RT[r, t]] (zeros for a token sent nowhere)."""
    ranks, capacity, hidden = buffer_RCH.shape
    num_tokens = pos_RT.shape[1]
    out_TH = torch.empty(num_tokens, hidden, dtype=buffer_RCH.dtype, device=buffer_RCH.device) if out is None else out
    if num_tokens:
        _reduce_partials_kernel[(num_tokens,)](
            buffer_RCH, pos_RT, out_TH, num_tokens, capacity, hidden, RANKS=ranks, BLOCK=WORDS_PER_BLOCK
        )
    return out_TH
