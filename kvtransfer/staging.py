"""Host staging for scattered KV pages: a room whose pages lie in many runs moves as a few large regions.

Mooncake's TCP transport pays about as much per region as copying 256 KiB costs (kvtransfer.pages.staging_pays),
so a prompt whose pages are scattered (a long-running instance's free list) is copied once more on each
scattered side instead:
  prefill  gathers the prompt's pages into its registered gather buffer (piece by piece when the room is larger)
           and writes from there;
  decode   lends the room an area of its registered staging pool (RegisterRoom.staging_addr) and, when the status
           says the pages landed there, scatters the area into the room's pages before the room succeeds.
An area holds every KV buffer's pages in prompt order, buffer after buffer (kvtransfer.pages.staged_ptrs).

Only for KV caches in host memory: the copies are numpy views over the registered addresses.
"""

from __future__ import annotations

import ctypes
import threading
import time
from collections.abc import Sequence
from typing import Literal

import numpy as np

from kvtransfer.base import KVArgs
from kvtransfer.pages import staging_pays


def host_bytes(ptr: int, nbytes: int) -> np.ndarray:
    """uint8 [nbytes] view of host memory [ptr, ptr + nbytes); the caller keeps that memory alive."""
    return np.ctypeslib.as_array((ctypes.c_uint8 * nbytes).from_address(ptr))


class PageViews:
    """A rank's KV buffers as page tables over their host memory.

    ptrs, data_lens, page_bytes: per KV buffer (layer-major, as in KVArgs): base address, bytes, bytes of a page.
    """

    def __init__(self, ptrs: Sequence[int], data_lens: Sequence[int], page_bytes: Sequence[int]) -> None:
        self.page_bytes = list(page_bytes)
        self._bufs = [host_bytes(p, n - n % pb).reshape(-1, pb)  # [pages, page_bytes] uint8
                      for p, n, pb in zip(ptrs, data_lens, page_bytes, strict=True)]

    def gather(self, b: int, pages: np.ndarray, out: np.ndarray) -> None:
        """Copies buffer b's pages into out (uint8 [len(pages) * page_bytes[b]]), back to back in that order."""
        # pages were checked against the pool (check_pages); with mode="raise" numpy would gather into a
        # temporary and copy that into out
        np.take(self._bufs[b], pages, axis=0, out=out.reshape(len(pages), self.page_bytes[b]), mode="clip")

    def scatter(self, area: np.ndarray, pages: Sequence[int]) -> None:
        """Writes a staged room into its pages. area: uint8 [len(pages) * sum(page_bytes)], the staged_ptrs layout
        (buffer b's pages in prompt order, buffer after buffer); pages: the room's pages in prompt order."""
        idx, lo = np.asarray(pages, dtype=np.int64), 0
        for buf, pb in zip(self._bufs, self.page_bytes, strict=True):
            hi = lo + idx.size * pb
            buf[idx] = area[lo:hi].reshape(idx.size, pb)
            lo = hi


class StagingPool:
    """Areas of one host buffer lent to rooms: first fit over a free list kept sorted and merged.

    An area whose room failed may still be written by a prefill that has not heard yet, so it goes back to the
    free list only hold_s later (hold()); free() is for areas nobody writes any more.
    """

    def __init__(self, nbytes: int, hold_s: float) -> None:
        self.memory = np.empty(nbytes, dtype=np.uint8)
        self.hold_s = hold_s
        self._lock = threading.Lock()
        self._free: list[tuple[int, int]] = [(0, nbytes)]  # (offset, length), sorted, never adjacent
        self._lent: dict[int, int] = {}  # offset -> length
        self._held: list[tuple[float, int]] = []  # (release time, offset)

    def alloc(self, nbytes: int) -> int | None:
        """The offset of a free area of nbytes (> 0), or None when no free area is that large."""
        assert nbytes > 0
        with self._lock:
            self._release_held(time.monotonic())
            for i, (off, length) in enumerate(self._free):
                if length >= nbytes:
                    self._free[i:i + 1] = [(off + nbytes, length - nbytes)] if length > nbytes else []
                    self._lent[off] = nbytes
                    return off
        return None

    def view(self, offset: int) -> np.ndarray:
        """The lent area at offset, uint8 [its length]."""
        return self.memory[offset:offset + self._lent[offset]]

    def free(self, offset: int) -> None:
        with self._lock:
            self._give_back(offset)

    def hold(self, offset: int) -> None:
        """Frees the area hold_s from now."""
        with self._lock:
            self._held.append((time.monotonic() + self.hold_s, offset))

    def free_bytes(self) -> int:
        with self._lock:
            return sum(length for _, length in self._free)

    def _release_held(self, now: float) -> None:
        due = [off for t, off in self._held if t <= now]
        self._held = [(t, off) for t, off in self._held if t > now]
        for off in due:
            self._give_back(off)

    def _give_back(self, offset: int) -> None:
        length = self._lent.pop(offset)
        free = self._free
        i = next((i for i, (o, _) in enumerate(free) if o > offset), len(free))
        free.insert(i, (offset, length))
        if i + 1 < len(free) and offset + length == free[i + 1][0]:  # merge with the next free area
            free[i:i + 2] = [(offset, length + free[i + 1][1])]
        if i > 0 and free[i - 1][0] + free[i - 1][1] == offset:  # and with the previous one
            free[i - 1:i + 1] = [(free[i - 1][0], free[i - 1][1] + free[i][1])]


class HostStaging:
    """One rank's staging: views of its KV pages, and prefill's gather buffer or decode's pool (`memory`, which
    the rank registers with its transfer engine beside the KV buffers).

    args: the rank's KV buffers (host memory); nbytes: the buffer or pool size; hold_s: decode: how long the area
    of a failed room is kept from reuse. Raises ValueError when nbytes cannot hold a page of every buffer.
    """

    def __init__(self, role: Literal["prefill", "decode"], args: KVArgs, nbytes: int, hold_s: float) -> None:
        self.page_bytes = [i * args.page_size for i in args.kv_item_lens]
        if nbytes < max(self.page_bytes, default=0):
            raise ValueError(f"{nbytes} bytes of staging memory cannot hold one {max(self.page_bytes)}-byte KV "
                             "page; give at least that, or 0 to turn staging off")
        self.views = PageViews(args.kv_data_ptrs, args.kv_data_lens, self.page_bytes)
        self.pool = StagingPool(nbytes, hold_s) if role == "decode" else None
        self.gather_buf = np.empty(nbytes, dtype=np.uint8) if role == "prefill" else None  # the transfer thread's
        self.memory = self.pool.memory if self.pool is not None else self.gather_buf
        assert self.memory is not None

    def lend(self, pages: list[int]) -> int | None:
        """Decode: the pool offset of an area for a room with these pages when staging them pays and the pool has
        room, else None (the prefill then writes into the pages themselves)."""
        if self.pool is None or not staging_pays(pages, self.page_bytes):
            return None
        return self.pool.alloc(len(pages) * sum(self.page_bytes))

    def address(self, offset: int) -> int:
        return self.memory.ctypes.data + offset

    def unstage(self, offset: int, pages: list[int]) -> None:
        """Decode: copies the area at offset, filled by the prefill, into the room's pages."""
        assert self.pool is not None
        self.views.scatter(self.pool.view(offset), pages)

    def give_back(self, offset: int, succeeded: bool) -> None:
        """Decode: returns a room's area: at once after success, hold_s later after a failure (the prefill may
        still be writing into it)."""
        assert self.pool is not None
        (self.pool.free if succeeded else self.pool.hold)(offset)
