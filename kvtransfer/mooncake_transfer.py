"""Prefill side of the Mooncake backend: the thread that writes rooms' pages into decode memory, then tells
decode. One thread per rank: Mooncake calls are serialised anyway (see kvtransfer.mooncake_engine), and
rooms finish in the order prefill finished them.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

from kvtransfer.base import KVPoll, KVTransferError
from kvtransfer.messages import RegisterRoom, TransferStatus
from kvtransfer.mooncake_engine import MAX_REGIONS_PER_BATCH
from kvtransfer.pages import chunk_bounds

if TYPE_CHECKING:
    from kvtransfer.mooncake import MooncakeKVManager
    from kvtransfer.mooncake_rooms import MooncakeKVSender

logger = logging.getLogger(__name__)


@dataclass
class _Job:
    sender: MooncakeKVSender
    registration: RegisterRoom
    regions: tuple[list[int], list[int], list[int]]  # (src addrs, dst addrs, lengths)
    status: TransferStatus  # sent to decode once every region has landed


class TransferWorker:
    """Runs queued transfers: batched writes (at most MAX_REGIONS_PER_BATCH regions per call, all within the
    sender's deadline), then the status message; the sender ends Success only once decode has been told."""

    def __init__(self, mgr: MooncakeKVManager) -> None:
        self._mgr = mgr
        self._jobs: queue.SimpleQueue[_Job | None] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._loop, name="kv-transfer", daemon=True)
        self._thread.start()

    def submit(self, sender: MooncakeKVSender, regions: tuple[list[int], list[int], list[int]],
               status: TransferStatus) -> None:
        assert sender.registration is not None
        self._jobs.put(_Job(sender, sender.registration, regions, status))

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
        src, dst, lengths = job.regions
        t0 = time.monotonic()
        try:
            for lo, hi in chunk_bounds(len(src), MAX_REGIONS_PER_BATCH):
                if sender.state != KVPoll.Transferring:
                    return  # aborted or failed meanwhile; whoever did it told decode
                remaining = sender.deadline - time.monotonic()
                if remaining <= 0:
                    raise KVTransferError(f"pages did not land within {mgr.transfer_timeout_s:.1f}s")
                mgr.engine.write(reg.session_id, src[lo:hi], dst[lo:hi], lengths[lo:hi], remaining)
        except KVTransferError as e:
            mgr.fail(sender, f"writing room {sender.room} to decode {reg.session_id} failed: {e}")
            return
        if sender.state != KVPoll.Transferring:
            return
        try:
            mgr.control.send(reg.control_addr, job.status)
        except KVTransferError as e:
            mgr.fail(sender, f"pages of room {sender.room} landed but decode {reg.control_addr} could not be "
                             f"told: {e}", notify_peer=False)
            return
        mgr.succeed(sender)
        logger.debug("room %d: %d bytes in %d regions sent in %.1f ms", sender.room, sum(lengths), len(src),
                     (time.monotonic() - t0) * 1e3)
