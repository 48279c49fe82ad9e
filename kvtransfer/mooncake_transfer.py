"""Prefill side of the Mooncake backend: the thread that writes rooms' pages into decode memory (every rank of the
decode's attention group that registered, each its own), then tells its manager, which tells decode once the
followers' parts have landed too (kvtransfer.mooncake_source). One thread per rank: Mooncake calls are serialised
anyway (see kvtransfer.mooncake_engine), and rooms finish in the order prefill finished them.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from kvtransfer.base import KVArgs, KVPoll, KVTransferError
from kvtransfer.heads import HeadCopy, copies_regions
from kvtransfer.messages import PartJob, PartTarget, RegisterRoom, TransferStatus
from kvtransfer.mooncake_engine import MAX_REGIONS_PER_BATCH
from kvtransfer.pages import (
    chunk_bounds,
    merge_regions,
    staged_ptrs,
    staging_pays,
    staging_pieces,
    transfer_regions,
)

if TYPE_CHECKING:
    from kvtransfer.mooncake import MooncakeKVManager
    from kvtransfer.mooncake_rooms import MooncakeKVSender

logger = logging.getLogger(__name__)

Regions = tuple[list[int], list[int], list[int]]  # (src addrs, dst addrs, lengths)
_Target = tuple[str, list[int], list[int], list[int], np.ndarray]  # session, buffer ptrs, item lens, heads, pages
Assignment = list[tuple[int, list[HeadCopy] | None]]  # (target index, head runs or None = whole pages)


def room_targets(args: KVArgs, reg: RegisterRoom, num_sent: int) -> list[_Target]:
    """Every decode rank of the registration, as (session, buffer pointers, item lens, KV heads, destination page
    of each of the num_sent pages sent, past the decode's cached prefix). The registering rank's may be its staging
    area: a page table whose page i is the i-th page sent."""
    skip = reg.cached_tokens // args.page_size
    dst_pages = np.asarray(reg.dst_pages, dtype=np.int64)[skip:]
    first: _Target = (reg.session_id, reg.dst_ptrs, reg.item_lens, reg.kv_heads, dst_pages)
    if reg.staging_addr:
        dst_page_bytes = [il * args.page_size for il in reg.item_lens]
        first = (reg.session_id, staged_ptrs(reg.staging_addr, dst_page_bytes, num_sent), reg.item_lens,
                 reg.kv_heads, np.arange(num_sent))  # fmt: skip
    return [first, *((peer.session_id, peer.ptrs, peer.item_lens, peer.kv_heads, dst_pages) for peer in reg.peers)]


def part_job(room: int, leader_addr: str, src_pages: np.ndarray, timeout_s: float, targets: list[_Target],
             assignment: Assignment, heads: int) -> PartJob:  # fmt: skip
    """A follower's share of a room (heads: how many KV heads the follower caches, what whole pages carry)."""
    parts = [PartTarget(targets[d][0], list(targets[d][1]), list(targets[d][2]), targets[d][4].tolist(),
                        [[0, 0, heads]] if copies is None else [[c.src_offset, c.dst_offset, c.count] for c in copies])
             for d, copies in assignment]  # fmt: skip
    return PartJob(room, leader_addr, src_pages.tolist(), int(timeout_s * 1e3), parts)


@dataclass
class _Job:
    sender: MooncakeKVSender
    registration: RegisterRoom
    src_pages: np.ndarray  # [pages] int64: this rank's pages sent (past the decode's cached prefix), in prompt order
    status: TransferStatus  # sent to decode once every region (this rank's and the followers') has landed
    targets: list[_Target]  # room_targets
    own: Assignment  # what this rank writes (kvtransfer.heads.assign_targets)


class TransferWorker:
    """Runs queued transfers: batched writes (at most MAX_REGIONS_PER_BATCH regions per call, all within the
    sender's deadline), then the status message; the sender ends Success only once decode has been told.
    Scattered source pages are gathered into the manager's gather buffer first, one piece at a time."""

    def __init__(self, mgr: MooncakeKVManager) -> None:
        self._mgr = mgr
        self._jobs: queue.SimpleQueue[_Job | None] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._loop, name="kv-transfer", daemon=True)
        self._thread.start()

    def submit(self, sender: MooncakeKVSender, src_pages: np.ndarray, status: TransferStatus, targets: list[_Target],
               own: Assignment) -> None:  # fmt: skip
        assert sender.registration is not None
        self._jobs.put(_Job(sender, sender.registration, src_pages, status, targets, own))

    def close(self) -> None:
        self._jobs.put(None)

    def _loop(self) -> None:
        while (job := self._jobs.get()) is not None:
            try:
                self._run(job)
            except Exception as e:  # a bug here must fail the room, not kill the thread
                logger.exception("transfer of room %d crashed", job.sender.room)
                self._mgr.fail(job.sender, f"internal error: {e!r}")

    def _run(self, job: _Job) -> None:
        mgr, sender, reg = self._mgr, job.sender, job.registration
        t0, nbytes, nregions = time.monotonic(), 0, 0
        session = reg.session_id
        try:
            for session, (src, dst, lengths) in self._batches(job):
                for lo, hi in chunk_bounds(len(src), MAX_REGIONS_PER_BATCH):
                    if sender.state != KVPoll.Transferring:
                        return  # aborted or failed meanwhile; whoever did it told decode
                    remaining = sender.deadline - time.monotonic()
                    if remaining <= 0:
                        raise KVTransferError(f"pages did not land within {mgr.transfer_timeout_s:.1f}s")
                    mgr.engine.write(session, src[lo:hi], dst[lo:hi], lengths[lo:hi], remaining)
                nbytes, nregions = nbytes + sum(lengths), nregions + len(src)
        except KVTransferError as e:
            mgr.fail(sender, f"writing room {sender.room} to decode {session} failed: {e}")
            return
        logger.debug("room %d: %d bytes in %d regions to %d decode ranks written in %.1f ms", sender.room, nbytes,
                     nregions, 1 + len(reg.peers), (time.monotonic() - t0) * 1e3)
        mgr.own_part_done(sender, job.status)

    def _batches(self, job: _Job) -> Iterator[tuple[str, Regions]]:
        """(decode session, regions) batches of this rank's share of the room: for each decode rank it writes whole
        pages to, one batch from the KV buffers themselves, or, when gathering the source pages pays, one batch per
        gather-buffer piece, each piece gathered just before it is written to every such decode rank; for each
        decode rank caching other KV heads than this rank (another TP size), its runs of heads token by token."""
        a, src_pages = self._mgr.args, job.src_pages
        page_bytes = [il * a.page_size for il in a.kv_item_lens]
        for d, copies in job.own:
            if copies is not None:
                session, dst_ptrs, dst_lens, _, pages = job.targets[d]
                yield session, copies_regions(a.kv_data_ptrs, a.kv_item_lens, a.kv_heads[1], dst_ptrs, dst_lens,
                                              a.page_size, src_pages, pages, copies)  # fmt: skip
        targets = [(job.targets[d][0], job.targets[d][1], job.targets[d][4]) for d, copies in job.own
                   if copies is None]  # fmt: skip
        staging = self._mgr.staging
        buf = None if staging is None else staging.gather_buf
        if staging is None or buf is None or not staging_pays(src_pages, page_bytes):
            for session, dst_ptrs, pages in targets:
                yield session, merge_regions(*transfer_regions(a.kv_data_ptrs, dst_ptrs, a.kv_item_lens, a.page_size,
                                                               src_pages, pages))
            return
        if not targets:
            return
        base = buf.ctypes.data
        for piece in staging_pieces(len(src_pages), page_bytes, buf.size):
            for b, lo, hi, offset in piece:
                staging.views.gather(b, src_pages[lo:hi], buf[offset:offset + (hi - lo) * page_bytes[b]])
            for session, dst_ptrs, pages in targets:
                batch: Regions = ([], [], [])
                for b, lo, hi, offset in piece:
                    part = transfer_regions([base + offset], [dst_ptrs[b]], [a.kv_item_lens[b]], a.page_size,
                                            np.arange(hi - lo), pages[lo:hi])
                    for acc, xs in zip(batch, part, strict=True):
                        acc.extend(xs)
                yield session, merge_regions(*batch)
