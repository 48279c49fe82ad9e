"""A prefill follower rank's part in its instance's transfers (Mooncake backend).

Prefill ranks shard KV heads over tensor parallelism, so a room's KV lies on every rank of the attention group,
each rank holding its heads of the same pages. The leader's manager handles the room (registration, checks, the
status decode waits for) and writes its own heads; each follower writes its heads itself, from its own memory:
the leader hands it a PartJob over the group's step broadcast (the follower learns of rooms no other way), the
follower writes into the decode ranks the job names and answers PartDone to the leader's control listener. The
leader tells decode once every part has landed, and only then lets the room's pages go.
"""

from __future__ import annotations

import logging
import queue
import threading
import time

from kvtransfer.base import KVArgs, KVSourceHolder, KVTransferError
from kvtransfer.control import ControlPool
from kvtransfer.heads import HeadCopy, copies_regions
from kvtransfer.messages import PartDone, PartJob, part_job_from_dict
from kvtransfer.mooncake_engine import MAX_REGIONS_PER_BATCH, registered_engine
from kvtransfer.pages import chunk_bounds

logger = logging.getLogger(__name__)


class MooncakeKVSource(KVSourceHolder):
    """A prefill follower: its KV buffers registered with a transfer engine of its own, and one thread that runs the
    PartJobs its leader hands it (``submit``) in order. ``target`` (its endpoint and KV heads) is what its leader
    plans rooms with. Raises KVTransferError when the engine cannot start or register the memory."""

    def __init__(self, args: KVArgs, host: str, secret: str | None = None, io_timeout_s: float = 5.0) -> None:
        self.args = args
        self.engine, self.target = registered_engine(args, host, io_timeout_s=io_timeout_s)
        self.control = ControlPool(io_timeout_s, secret=secret)
        self._jobs: queue.SimpleQueue[PartJob | None] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._loop, name="kv-part", daemon=True)
        self._thread.start()
        logger.info("mooncake KV prefill source rank %d: transfer session %s", args.engine_rank,
                    self.engine.session_id)  # fmt: skip

    def submit(self, job: dict) -> None:
        """Queues one PartJob (its msgpack map, as the step broadcast carries it)."""
        self._jobs.put(part_job_from_dict(job))

    def close(self) -> None:
        self._jobs.put(None)
        self._thread.join(timeout=10)
        self.control.close()
        self.engine.close()

    def _loop(self) -> None:
        while (job := self._jobs.get()) is not None:
            try:
                self._write(job)
                done = PartDone(job.room, self.args.engine_rank, True, "")
            except KVTransferError as e:
                done = PartDone(job.room, self.args.engine_rank, False, str(e))
            except Exception as e:  # a bug here must fail the room, not kill the thread
                logger.exception("part of room %d crashed", job.room)
                done = PartDone(job.room, self.args.engine_rank, False, f"internal error: {e!r}")
            try:
                self.control.send(job.leader_control_addr, done)
            except KVTransferError as e:  # the leader's deadline fails the room
                logger.warning("could not tell leader %s about room %d: %s", job.leader_control_addr, job.room, e)

    def _write(self, job: PartJob) -> None:
        a = self.args
        deadline = time.monotonic() + job.timeout_ms / 1e3
        for t in job.targets:
            copies = [HeadCopy(0, 0, src_offset, dst_offset, count) for src_offset, dst_offset, count in t.copies]
            src, dst, lengths = copies_regions(a.kv_data_ptrs, a.kv_item_lens, a.kv_heads[1], t.ptrs, t.item_lens,
                                               a.page_size, job.src_pages, t.pages, copies)  # fmt: skip
            for lo, hi in chunk_bounds(len(src), MAX_REGIONS_PER_BATCH):
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise KVTransferError(f"prefill rank {a.engine_rank}'s heads of room {job.room} did not land in "
                                          f"time")  # fmt: skip
                self.engine.write(t.session_id, src[lo:hi], dst[lo:hi], lengths[lo:hi], remaining)
        logger.debug("room %d: prefill rank %d wrote its heads to %d decode ranks", job.room, a.engine_rank,
                     len(job.targets))  # fmt: skip


def start_prefill_source(args: KVArgs, cfg: object) -> MooncakeKVSource:
    """A prefill follower's source; cfg: the instance's transfer settings (host, secret)."""
    return MooncakeKVSource(args, cfg.host, getattr(cfg, "secret", None))  # type: ignore[attr-defined]
