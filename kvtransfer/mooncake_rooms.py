"""The two ends of one request's transfer over the Mooncake backend: state, deadlines, and the calls the
schedulers make. Messages and I/O belong to the manager (kvtransfer.mooncake); these objects only hold what
their manager's threads fill in, so poll() is a few attribute reads and a clock comparison.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np

from kvtransfer.base import FirstToken, KVPoll, KVReceiver, KVSender
from kvtransfer.heads import assign_targets
from kvtransfer.messages import RankInfo, RegisterRoom, TransferStatus
from kvtransfer.mooncake_transfer import part_job, room_targets
from kvtransfer.pages import check_pages

if TYPE_CHECKING:
    from kvtransfer.mooncake import MooncakeKVManager

_DONE = (KVPoll.Success, KVPoll.Failed)

# How long rooms of a prefill whose control connection dropped wait for a status that may already be in
# flight on the other connection (prefill -> decode) before failing.
PEER_LOST_GRACE_S = 0.5


def prompt_mismatch(room: int, prefill_hash: int, decode_hash: int) -> str:
    return (f"room {room} is claimed by two different prompts: prefill's has fingerprint {prefill_hash:#018x}, "
            f"decode's {decode_hash:#018x} (is the bootstrap_room reused?)")


def cached_tokens_problem(cached_tokens: int, num_tokens: int, page_size: int) -> str | None:
    """Why a decode cannot hold `cached_tokens` of a `num_tokens` prompt already (whole pages only, and at least
    the last prompt token's page is sent), or None."""
    if not 0 <= cached_tokens < num_tokens or cached_tokens % page_size:
        return (f"decode claims to hold {cached_tokens} of {num_tokens} prompt tokens already; that must be a "
                f"multiple of the page size {page_size} below {num_tokens}")
    return None


class MooncakeKVSender(KVSender):
    """Prefill side of room `room`. Bootstrapping until decode registers (at most bootstrap_timeout_s from
    construction), WaitingForInput until send(), Transferring until the pages have landed and decode knows."""

    def __init__(self, mgr: MooncakeKVManager, room: int, prompt_hash: int = 0) -> None:
        assert mgr.role == "prefill", "senders live on prefill ranks"
        self.mgr, self.room, self.prompt_hash = mgr, room, prompt_hash
        self.state = KVPoll.Bootstrapping
        self.reason: str | None = None
        self.deadline = time.monotonic() + mgr.bootstrap_timeout_s
        self.registration: RegisterRoom | None = None  # set by the manager when decode registers
        # Set by send(): the status decode gets once this rank's writes are done (own_done) and every follower that
        # writes a share of the heads has answered (parts_pending empties).
        self.status: TransferStatus | None = None
        self.own_done = False
        self.parts_pending: set[int] = set()
        mgr.add_sender(self)

    def poll(self) -> KVPoll:
        state = self.state
        if state == KVPoll.Bootstrapping and time.monotonic() > self.deadline:
            self.mgr.fail(self, f"decode never registered room {self.room} within {self.mgr.bootstrap_timeout_s:.1f}s")
        elif state == KVPoll.Transferring and time.monotonic() > self.deadline + self.mgr.io_timeout_s * 3:
            # The transfer thread enforces the deadline itself; this catches a job stuck behind it.
            self.mgr.fail(self, f"room {self.room} did not finish within {self.mgr.transfer_timeout_s:.1f}s")
        return self.state

    def send(self, page_indices: Sequence[int], num_tokens: int, first_token: FirstToken) -> None:
        """Queues the writes of the prompt's pages (page_indices: this rank's pages in prompt order, one per
        page_size tokens; those of the decode's cached prefix, peer_cached_tokens, are skipped) into the registered
        decode pages, then the status with first_token and the prompt hash.
        Non-blocking; a layout, length or prompt disagreement with the registration fails the room (and tells
        decode) before any page is written."""
        if self.state == KVPoll.Failed:
            return  # decode aborted or failed between the caller's poll() and now; poll() will say so
        assert self.state == KVPoll.WaitingForInput, f"send() on room {self.room} in state {self.state.name}"
        mgr, reg = self.mgr, self.registration
        assert reg is not None
        problem = check_pages(page_indices, mgr.num_pages, "prefill pages")
        if problem is None and len(page_indices) != len(reg.dst_pages):
            problem = (f"prefill has {len(page_indices)} pages of room {self.room}, "
                       f"decode registered {len(reg.dst_pages)}")
        if problem is None and num_tokens != reg.num_tokens:
            problem = f"prefill has {num_tokens} prompt tokens of room {self.room}, decode expects {reg.num_tokens}"
        if problem is None and self.prompt_hash != reg.prompt_hash:  # _attach refuses these; keep the invariant
            problem = prompt_mismatch(self.room, self.prompt_hash, reg.prompt_hash)
        if problem is not None:
            mgr.fail(self, problem)
            return
        status = TransferStatus(self.room, True, "", first_token.token_id, first_token.prompt_tokens,
                                self.prompt_hash, staged=reg.staging_addr != 0)
        # The pages of the decode's cached prefix hold their KV there already: only the pages after them move.
        src = np.asarray(page_indices, dtype=np.int64)[reg.cached_tokens // mgr.args.page_size :]
        targets = room_targets(mgr.args, reg, len(src))
        own, *parts = assign_targets(mgr.prefill_ranges, [t[3] for t in targets])  # checked at registration
        with mgr.lock:
            if self.state != KVPoll.WaitingForInput:
                return  # aborted while we checked the pages
            self.state = KVPoll.Transferring
            self.deadline = time.monotonic() + mgr.transfer_timeout_s
            self.status = status
            for follower, assignment in zip(mgr.peers, parts, strict=True):
                if assignment:
                    self.parts_pending.add(follower.engine_rank)
                    job = part_job(self.room, mgr.control_addr, src, mgr.transfer_timeout_s, targets, assignment,
                                   follower.kv_heads[1])  # fmt: skip
                    mgr.part_jobs.append((follower.engine_rank, dataclasses.asdict(job)))
        assert mgr.transfers is not None
        mgr.transfers.submit(self, src, status, targets, own)

    @property
    def failure_reason(self) -> str | None:
        return self.reason

    @property
    def peer_cached_tokens(self) -> int:
        return self.registration.cached_tokens if self.registration is not None else 0

    def abort(self) -> None:
        """Forgets the room; a registered decode is told. A write already in flight still completes."""
        self.mgr.abort(self)


class MooncakeKVReceiver(KVReceiver):
    """Decode side of room `room`, whose prefill's bootstrap server is bootstrap_host:bootstrap_port.

    Bootstrapping while the prefill's route is fetched and its KV layout compared with ours (at most
    bootstrap_timeout_s); WaitingForInput until init() has been delivered to the prefill rank; Transferring
    until the prefill's status (at most transfer_timeout_s after init()); then Success or Failed.
    """

    def __init__(self, mgr: MooncakeKVManager, bootstrap_host: str, bootstrap_port: int, room: int,
                 prompt_hash: int = 0) -> None:
        assert mgr.role == "decode", "receivers live on decode ranks"
        self.mgr, self.room, self.prompt_hash = mgr, room, prompt_hash
        self.bootstrap_addr = (bootstrap_host, int(bootstrap_port))
        self.state = KVPoll.Bootstrapping
        self.reason: str | None = None
        self.bootstrap_deadline = time.monotonic() + mgr.bootstrap_timeout_s
        self.transfer_deadline: float | None = None  # set by init()
        self.prefill: RankInfo | None = None  # set by the manager once bootstrapped
        self.pages: list[int] | None = None
        self.num_tokens = 0
        self.cached_tokens = 0  # set by init(): prompt tokens whose pages hold their KV already
        self.staging_offset: int | None = None  # the area of the manager's staging pool lent to this room
        self.registered = False
        self.peer_lost_at: float | None = None  # set by the manager when the prefill's connection drops
        self._first: FirstToken | None = None
        mgr.add_receiver(self)
        if self.state == KVPoll.Bootstrapping:
            mgr.io.submit(mgr.bootstrap_receiver, self)

    def init(self, page_indices: Sequence[int], num_tokens: int, cached_tokens: int = 0) -> None:
        """Registers the destination pages (this rank's, in prompt order: ceil(num_tokens / page_size) of
        them) and the prompt's fingerprint with the prefill rank, now or as soon as bootstrapping is done; a
        status for another prompt fails the room. The first cached_tokens / page_size pages hold their KV
        already (decode's prefix cache): the prefill writes only the pages after them (sent_pages). Sent pages
        scattered enough that staging pays are received into an area of the manager's staging pool (while it
        has room) and copied into place before Success.
        Non-blocking.
        Raises ValueError on a page list or cached_tokens that cannot be right (wrong count, out of range,
        repeated; not whole pages below num_tokens)."""
        mgr = self.mgr
        need = -(-num_tokens // mgr.args.page_size)
        if len(page_indices) != need:
            raise ValueError(f"room {self.room}: {len(page_indices)} pages for {num_tokens} tokens at page size "
                             f"{mgr.args.page_size}; expected {need}")
        problem = check_pages(page_indices, mgr.num_pages, "decode pages") or cached_tokens_problem(
            cached_tokens, num_tokens, mgr.args.page_size)
        if problem is not None:
            raise ValueError(f"room {self.room}: {problem}")
        with mgr.lock:
            assert self.pages is None, f"init() called twice for room {self.room}"
            self.pages, self.num_tokens = np.asarray(page_indices, dtype=np.int64).tolist(), num_tokens
            self.cached_tokens = cached_tokens
            self.transfer_deadline = time.monotonic() + mgr.transfer_timeout_s
            if self.state not in _DONE:  # a finished room would never give the area back
                self.staging_offset = None if mgr.staging is None else mgr.staging.lend(self.sent_pages)
            ready = self.state == KVPoll.WaitingForInput
        if ready:
            mgr.io.submit(mgr.register_receiver, self)

    @property
    def sent_pages(self) -> list[int]:
        """The registered pages the prefill writes: those after the cached prefix, in prompt order."""
        assert self.pages is not None
        return self.pages[self.cached_tokens // self.mgr.args.page_size :]

    def poll(self) -> KVPoll:
        state = self.state
        if state in _DONE:
            return state
        now = time.monotonic()
        if state == KVPoll.Bootstrapping and now > self.bootstrap_deadline:
            host, port = self.bootstrap_addr
            self.mgr.fail(self, f"bootstrap server {host}:{port} gave no route within "
                                f"{self.mgr.bootstrap_timeout_s:.1f}s")
        elif self.transfer_deadline is not None and now > self.transfer_deadline:
            self.mgr.fail(self, f"prefill did not send room {self.room} within {self.mgr.transfer_timeout_s:.1f}s")
        elif self.peer_lost_at is not None and now > self.peer_lost_at + PEER_LOST_GRACE_S:
            addr = self.prefill.control_addr if self.prefill else "?"
            self.mgr.fail(self, f"lost the control connection to prefill {addr} (did the prefill process die?)",
                          notify_peer=False)
        return self.state

    def set_success(self, token_id: int, prompt_tokens: int) -> None:
        """Called by the manager, under its lock, when the prefill's ok status arrives."""
        self._first = FirstToken(token_id, prompt_tokens)
        self.state = KVPoll.Success

    def result(self) -> FirstToken:
        assert self.state == KVPoll.Success and self._first is not None, f"room {self.room} has no result yet"
        return self._first

    @property
    def failure_reason(self) -> str | None:
        return self.reason

    def abort(self) -> None:
        """Forgets the room and tells the prefill rank (best effort). A write the prefill rank has already
        started still lands in the pages, so pages of a room aborted while Transferring are not safe to reuse
        at once."""
        self.mgr.abort(self)


Room = MooncakeKVSender | MooncakeKVReceiver
