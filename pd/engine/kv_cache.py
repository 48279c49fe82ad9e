"""Paged KV cache: page allocator, per-request slot table, and the per-layer KV buffers.

A slot is one token's KV entry; page p holds slots [p*page_size, (p+1)*page_size). The allocator hands out
whole pages; the page table on the KV cache's device maps (row, pos // page_size) to a page, so position `pos` of
the request in `row` lives in slot `pages[row, pos // page_size] * page_size + pos % page_size`. Attention
kernels read that table and the pages in place.

The buffers hold the model's dtype, or FP8 (--kv-cache-dtype fp8_e4m3|fp8_e5m2): K and V are rounded to FP8 as they
are stored, with a scale of 1.0 (SGLang's default without calibrated k/v scales; values past the format's largest
finite one saturate to it), and every reader computes in the model's dtype.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch

KV_STORAGE_DTYPES = {"fp8_e4m3": torch.float8_e4m3fn, "fp8_e5m2": torch.float8_e5m2}


def kv_storage_dtype(kv_cache_dtype: str, model_dtype: torch.dtype) -> torch.dtype:
    """The KV buffers' dtype for --kv-cache-dtype (auto: the model's)."""
    if kv_cache_dtype == "auto":
        return model_dtype
    if kv_cache_dtype not in KV_STORAGE_DTYPES:
        raise ValueError(f"--kv-cache-dtype {kv_cache_dtype!r}: expected auto or one of {sorted(KV_STORAGE_DTYPES)}")
    return KV_STORAGE_DTYPES[kv_cache_dtype]


class PagePool:
    """Free list of KV pages. Never hands out a page twice; `free` of a page not in use is a bug (asserted)."""

    def __init__(self, num_pages: int) -> None:
        self.num_pages = num_pages
        self._free = list(range(num_pages - 1, -1, -1))
        self._in_use = bytearray(num_pages)

    @property
    def num_free(self) -> int:
        return len(self._free)

    def alloc(self, n: int) -> list[int] | None:
        """n pages, or None (and nothing taken) when fewer are free."""
        if n > len(self._free):
            return None
        pages = [self._free.pop() for _ in range(n)]
        for p in pages:
            self._in_use[p] = 1
        return pages

    def free(self, pages: Sequence[int]) -> None:
        for p in pages:
            assert self._in_use[p], f"page {p} freed twice"
            self._in_use[p] = 0
        self._free.extend(pages)


class ReqToToken:
    """The page table: [max_rows, max_pages] int32 on the KV cache's device, plus a free list of rows (one row
    per live request). Only the entries a call assigns are copied to the device, never the whole table.

    A host copy of the table (``host_pages``, numpy; the same memory on a CPU device) lets a batch's KV slots be
    computed on the host and travel with its other inputs in one copy: on the device the lookup took six launches
    a step (a tenth of a decode step's host time at batch 1). On an accelerator, assignments reach the device table
    together, before the next forward reads it (``sync_device``: one copy and one scatter for however many
    requests were admitted, where a copy per request cost the host a driver call each)."""

    def __init__(self, max_rows: int, max_context: int, page_size: int, device: torch.device | str = "cpu",
                 host_copy: bool | None = None) -> None:  # fmt: skip
        """host_copy: keep the host table apart from the device's (default: when the device is not the CPU; tests
        ask for it on the CPU to run the accelerator's path)."""
        self.page_size = page_size
        self.max_pages = -(-max_context // page_size)
        self._pages = torch.zeros(max_rows, self.max_pages, dtype=torch.int32, device=device)
        if host_copy is None:
            host_copy = self._pages.device.type != "cpu"
        self.host_pages = np.zeros(tuple(self._pages.shape), dtype=np.int32) if host_copy else self._pages.numpy()
        self._free_rows = list(range(max_rows - 1, -1, -1))
        # Entries assigned on the host and not yet on the device: (row, first page index, end), in call order.
        self._unsynced: list[tuple[int, int, int]] | None = [] if host_copy else None
        self._read = 0  # how many of them the last unsynced_entries read
        # When a list: every assign_pages call is also recorded here, for mirrors kept on other ranks.
        self.journal: list[list[object]] | None = None

    @property
    def pages(self) -> torch.Tensor:
        """The device table, with every assignment made so far (kernels read it in place)."""
        self.sync_device()
        return self._pages

    def take_journal(self) -> list[list[object]]:
        """The assign_pages calls recorded since the last take (empty when not journaling)."""
        if not self.journal:
            return []
        taken, self.journal = self.journal, []
        return taken

    @property
    def num_free_rows(self) -> int:
        return len(self._free_rows)

    def alloc_row(self) -> int | None:
        return self._free_rows.pop() if self._free_rows else None

    def free_row(self, row: int) -> None:
        self._free_rows.append(row)

    def assign_pages(self, row: int, first_page_index: int, pages: list[int]) -> None:
        """Maps pages [first_page_index, first_page_index + len(pages)) of `row` onto `pages` (pages past the
        table's width, which no position reaches, are dropped). The device table has them from the next
        ``sync_device`` (every batch build calls it)."""
        if not pages:
            return
        if self.journal is not None:
            self.journal.append([row, first_page_index, list(pages)])
        end = min(first_page_index + len(pages), self.max_pages)
        if end <= first_page_index:
            return
        self.host_pages[row, first_page_index:end] = pages[: end - first_page_index]
        if self._unsynced is not None:
            self._unsynced.append((row, first_page_index, end))

    def sync_device(self) -> None:
        """Brings the device table up to date with the host's: the entries assigned since the last call, in one
        copy from pinned memory and one scatter, queued on the current stream (before the forward that reads
        them; a step still running read its own entries earlier in the same stream). A batch build carries them in
        its own copy instead (unsynced_entries, scatter_entries)."""
        entries = self.unsynced_entries()
        if entries is None:
            return
        if self._pages.device.type == "cuda" and torch.cuda.is_current_stream_capturing():
            # A graph would replay this copy from a pinned buffer long since reused: sync before capturing.
            raise RuntimeError("page-table entries assigned but not on the device when a CUDA graph is captured")
        index, values = entries
        n = len(index)
        # int64 flat indices, then the int32 values (a view of the same pinned buffer: one copy carries both)
        host = torch.empty(n + -(-n // 2), dtype=torch.int64, pin_memory=self._pages.device.type == "cuda")
        buf = host.numpy()
        buf[:n] = index
        buf[n:].view(np.int32)[:n] = values
        dev = host.to(self._pages.device, non_blocking=True)
        self.scatter_entries(dev[:n], dev[n:].view(torch.int32)[:n])

    def unsynced_entries(self) -> tuple[np.ndarray, np.ndarray] | None:
        """The entries assigned since the last sync, as flat int64 indices into the table and their int32 values,
        or None if there are none (or the table is the host's own memory). The values are read from the host table
        now, so an entry assigned twice carries its latest value in every duplicate. They stay unsynced until
        scatter_entries has queued them."""
        if not self._unsynced:
            return None
        width = self.max_pages
        self._read = len(self._unsynced)
        index = np.concatenate([np.arange(row * width + first, row * width + end)
                                for row, first, end in self._unsynced])  # fmt: skip
        return index, self.host_pages.reshape(-1)[index]

    def scatter_entries(self, index: torch.Tensor, values: torch.Tensor) -> None:
        """Writes the entries unsynced_entries gave (copied to the table's device) into the device table, queued on
        the current stream; they count as synced from here."""
        self._pages.view(-1).index_copy_(0, index, values)
        assert self._unsynced is not None
        del self._unsynced[: self._read]
        self._read = 0

    def slots(self, rows: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """KV slots (int64) of positions ``positions`` of rows ``rows`` (same-shaped or broadcastable int64
        tensors on the table's device)."""
        ps = self.page_size
        return self.pages[rows, torch.div(positions, ps, rounding_mode="floor")].long() * ps + positions % ps

    def host_slots(self, rows: np.ndarray, positions: np.ndarray) -> np.ndarray:
        """slots() on the host copy: int64 numpy arrays in, int64 out. One flat gather, and shifts for a power-of-two
        page size (a 16 x 1024-token prompt batch: 0.11 ms, against 0.19 ms for a 2-D index with division)."""
        ps = self.page_size
        if ps & (ps - 1):
            return self.host_pages[rows, positions // ps].astype(np.int64) * ps + positions % ps
        shift = ps.bit_length() - 1
        pages = positions >> shift
        if len(pages) and (pages.max() >= self.max_pages or pages.min() < 0):  # the flat index would not raise
            raise IndexError(f"a position's page {int(pages.max())} is past the table's {self.max_pages} pages")
        index = rows * self.max_pages
        index += pages
        slots = np.take(self.host_pages.reshape(-1), index).astype(np.int64)
        slots <<= shift
        slots |= positions & (ps - 1)
        return slots


def zeroed(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device | str) -> torch.Tensor:
    """torch.zeros, except that in host memory the pages are zeroed by the kernel when first written instead of all at
    start-up: torch.zeros writes every byte, and a CPU instance's default pool (gigabytes for a small model) then
    took tens of seconds of page faults to start. (numpy's zeros is calloc, whose large blocks are fresh mappings.)"""
    if torch.device(device).type != "cpu":
        return torch.zeros(shape, dtype=dtype, device=device)
    nbytes = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
    return torch.from_numpy(np.zeros(nbytes, dtype=np.uint8)).view(dtype).view(shape)


class KVCache:
    """Per-layer KV buffers. `layout` lists, per buffer kind, (heads, dim): [(kv_heads, head_dim)] * 2 for
    K and V of multi-head attention, [(1, latent_dim)] for MLA's compressed latent.

    Each buffer is [num_pages * page_size, heads, dim] in `dtype` on `device`.
    """

    def __init__(
        self,
        num_layers: int,
        num_pages: int,
        page_size: int,
        layout: list[tuple[int, int]],
        dtype: torch.dtype,
        device: torch.device,
    ) -> None:
        self.num_pages, self.page_size, self.device, self.dtype = num_pages, page_size, device, dtype
        # FP8 saturates at the largest finite value (a cast to e5m2 would overflow to infinity).
        self._fp8_max = torch.finfo(dtype).max if dtype in KV_STORAGE_DTYPES.values() else None
        num_slots = num_pages * page_size
        self.buffers = [
            [zeroed((num_slots, heads, dim), dtype, device) for heads, dim in layout] for _ in range(num_layers)
        ]

    @staticmethod
    def bytes_per_token(num_layers: int, layout: list[tuple[int, int]], dtype: torch.dtype) -> int:
        return num_layers * sum(h * d for h, d in layout) * torch.empty((), dtype=dtype).element_size()

    def store(self, layer_id: int, loc: torch.Tensor, *values: torch.Tensor) -> None:
        """Writes values[i] [T, heads_i, dim_i] into slots loc [T] (int64) of buffer i of the layer."""
        for buf, val in zip(self.buffers[layer_id], values, strict=True):
            if self._fp8_max is None:
                buf.index_copy_(0, loc, val.to(buf.dtype))
            else:  # index_copy_ has no FP8 kernels: copy the bytes
                fp8 = val.clamp(-self._fp8_max, self._fp8_max).to(buf.dtype)
                buf.view(torch.uint8).index_copy_(0, loc, fp8.view(torch.uint8))

    def gather(self, layer_id: int, slots: torch.Tensor) -> list[torch.Tensor]:
        """slots [B, L] int64 -> per buffer [B, L, heads, dim] (a copy)."""
        # index_select over rows of a 2-D view copies whole heads*dim rows; advanced indexing (buf[slots]) goes
        # through the generic element-wise gather, several times slower on CPU for the same result.
        flat = slots.reshape(-1)
        return [
            buf.view(buf.shape[0], -1).index_select(0, flat).view(*slots.shape, *buf.shape[1:])
            for buf in self.buffers[layer_id]
        ]
