"""Mooncake KV transfer backend: prefill ranks write KV pages straight into decode ranks' buffers.

Each rank of a prefill or decode attention group caches its share of the KV heads. The leaders talk (below); a
decode follower only exposes its memory (MooncakeKVTarget), a prefill follower writes its heads of each room when
its leader says so (kvtransfer.mooncake_source) and the leader sends the status once every part has landed.

Prefill rank                                          Decode rank
  manager: control listener, Mooncake engine with       manager: control listener, Mooncake engine with
  every KV buffer registered, PUT /route to bootstrap   every KV buffer registered, bootstrap client
  KVSender(room)       Bootstrapping                    KVReceiver(room)   Bootstrapping: GET /route (cached),
                                                                           compare KV layouts
                       <---------- RegisterRoom ------- init(pages)        WaitingForInput -> Transferring
                       WaitingForInput
  send(pages)          Transferring: batched writes
                       ----------- TransferStatus ----> Success (first token) | Failed (prefill's reason)
                       Success | Failed

With the KV cache in host memory, each side copies pages scattered over many runs through a contiguous staging
buffer (kvtransfer.staging), so such a room takes a few large regions instead of one per run. A decode whose own
prefix cache holds the prompt's first pages says how many tokens they cover (RegisterRoom.cached_tokens): only the
pages after them are written.

Rooms are owned: a second sender or receiver for a live room on one rank is refused, a prefill rank keeps only
its room's first registration and refuses one for another prompt (prompt fingerprints differ) or from another
decode, and decode fails a status whose fingerprint is not its prompt's. A registration that arrives before its
sender exists is kept for bootstrap_timeout_s, at most max_pending_rooms of them. Every wait has a
deadline; a dropped control connection to a prefill fails that prefill's rooms at once. All network I/O
happens on background threads: poll() only reads state and compares clocks.
"""

from __future__ import annotations

import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Literal, Protocol

from kvtransfer.base import KVArgs, KVManager, KVPoll, KVTargetHolder, KVTransferError, kv_in_host_memory
from kvtransfer.bootstrap import BootstrapClient, BootstrapServer
from kvtransfer.control import ControlPool, ControlServer
from kvtransfer.heads import plan_head_copies
from kvtransfer.messages import (
    AbortRoom,
    ControlMessage,
    KVTarget,
    PartDone,
    RankInfo,
    RegisterRoom,
    TransferStatus,
    layout_mismatch,
)
from kvtransfer.mooncake_engine import MooncakeEngine, registered_engine
from kvtransfer.mooncake_rooms import (
    MooncakeKVReceiver,
    MooncakeKVSender,
    Room,
    cached_tokens_problem,
    prompt_mismatch,
)
from kvtransfer.mooncake_source import start_prefill_source
from kvtransfer.mooncake_transfer import TransferWorker
from kvtransfer.staging import HostStaging

logger = logging.getLogger(__name__)

# Registrations for rooms whose request has not reached this prefill rank yet: the load balancer sends both halves
# at once, so a few per request in flight; far more means a peer registers rooms nobody will prefill.
MAX_PENDING_ROOMS = 4096

# Prefill: the gather buffer (rooms larger than it go in pieces); decode: the staging pool (rooms that find it full
# are written into their pages directly, one region per run). A 4096-token prompt of a 4-layer, 2-KV-head fp32
# model is 16 MiB.
STAGING_BYTES = 64 * 2**20

__all__ = ["MooncakeKVManager", "MooncakeKVReceiver", "MooncakeKVSender", "MooncakeKVTarget", "start_decode_manager",
           "start_decode_target", "start_prefill_manager", "start_prefill_source"]


class MooncakeKVManager(KVManager):
    """One per engine rank: the Mooncake engine, the control channel, and the rooms in flight.

    args:        this rank's KV buffers; kv_data_lens is required (the engine registers the memory).
    role:        "prefill" (sends pages) or "decode" (receives them).
    host:        the address peers reach this rank on (control channel and transfer engine).
    bootstrap:   prefill only: (host, port) of its instance's bootstrap server, which it announces itself to;
                 serve_bootstrap starts that server here (rank 0 of the instance does).
    dp_rank, dp_size: prefill only: this rank's DP-attention group and the instance's number of groups (each
                 group has its own KV pool and managers; room r is prefilled by group r % dp_size).
    bootstrap_timeout_s: prefill: how long a sender waits for decode's registration (and a registration for
                 its sender); decode: how long a receiver waits for the bootstrap server.
    transfer_timeout_s:  decode: from init() to the prefill's status; prefill: from send() to pages landed.
    io_timeout_s: each connect, control send, HTTP call and non-transfer engine call.
    max_pending_rooms: prefill: registrations kept for rooms without a sender yet (each for at most
                 bootstrap_timeout_s); one past the bound is refused, so rooms nobody asks for cannot grow memory.
    staging_bytes: host KV caches only (kv_in_host_memory): prefill's gather buffer / decode's staging pool for
                 scattered pages; 0 turns staging off. At least one page of the largest KV buffer.
    secret:      the instances' shared key (--api-key): bootstrap routes need it as a bearer token and every
                 control frame is signed with it; None leaves the control plane open (a trusted network).
    peers:       the other ranks of this rank's attention group. Decode: MooncakeKVTarget.target of each,
                 registered with every room so the prefill writes each rank's pages into its own memory. Prefill:
                 MooncakeKVSource.target of each: every rank caches its share of the KV heads, and the leader hands
                 each follower its share of a room to write (take_part_jobs), waiting for PartDone before the status.
    Raises KVTransferError when the engine, the listener or the bootstrap announcement cannot be set up.
    """

    def __init__(
        self,
        args: KVArgs,
        role: Literal["prefill", "decode"],
        host: str,
        bootstrap: tuple[str, int] | None = None,
        *,
        tp_size: int = 1,
        dp_rank: int = 0,
        dp_size: int = 1,
        control_port: int = 0,
        serve_bootstrap: bool = False,
        bootstrap_timeout_s: float = 30.0,
        transfer_timeout_s: float = 60.0,
        io_timeout_s: float = 5.0,
        protocol: str = "tcp",
        device_name: str = "",
        max_pending_rooms: int = MAX_PENDING_ROOMS,
        staging_bytes: int = STAGING_BYTES,
        secret: str | None = None,
        peers: list[KVTarget] | None = None,
    ) -> None:
        if role not in ("prefill", "decode"):
            raise ValueError(f"role must be 'prefill' or 'decode', got {role!r}")
        if role == "prefill" and bootstrap is None:
            raise ValueError("a prefill KV manager needs its bootstrap server's (host, port)")
        if len(args.kv_data_lens) != len(args.kv_data_ptrs) or len(args.kv_item_lens) != len(args.kv_data_ptrs):
            raise ValueError("KVArgs needs one kv_item_lens and one kv_data_lens entry per kv_data_ptrs entry "
                             "(the mooncake backend registers each buffer's bytes)")
        self.args, self.role, self.host, self.tp_size = args, role, host, tp_size
        self.peers = list(peers or [])
        # Prefill: the KV heads (first, count) of every rank of the group, this one first, as assign_targets takes
        # them; and the followers' shares of rooms sent, (follower rank, PartJob map), until the scheduler takes them.
        self.prefill_ranges = [tuple(args.kv_heads), *(tuple(p.kv_heads) for p in self.peers)]
        self.part_jobs: list[tuple[int, dict]] = []
        self.dp_rank, self.dp_size = dp_rank, dp_size
        self.bootstrap_timeout_s, self.transfer_timeout_s = bootstrap_timeout_s, transfer_timeout_s
        self.io_timeout_s = io_timeout_s
        self.num_pages = min(n // (i * args.page_size) for n, i in zip(args.kv_data_lens, args.kv_item_lens,
                                                                      strict=True))
        # A failed room's area is reused once a prefill with our settings has given up writing into it.
        self.staging = (HostStaging(role, args, staging_bytes, hold_s=transfer_timeout_s + 3 * io_timeout_s)
                        if staging_bytes > 0 and kv_in_host_memory(args) else None)
        self.lock = threading.RLock()  # guards the room tables and every room's state
        self._senders: dict[int, MooncakeKVSender] = {}
        self._receivers: dict[int, MooncakeKVReceiver] = {}
        self._pending: dict[int, tuple[RegisterRoom, float]] = {}  # room -> (registration, expiry)
        self.max_pending_rooms = max_pending_rooms
        self.io = ThreadPoolExecutor(4, thread_name_prefix=f"kv-io-{role}")
        self.control = ControlPool(io_timeout_s, on_peer_lost=self._on_peer_lost, secret=secret)
        self.bootstrap_client = BootstrapClient(io_timeout_s, secret=secret)
        self._bootstrap_server: BootstrapServer | None = None
        self._server: ControlServer | None = None
        self.transfers: TransferWorker | None = None
        self.bootstrap: tuple[str, int] | None = None  # prefill: where this rank announced itself
        self.engine = MooncakeEngine(host, protocol, device_name, io_timeout_s)
        try:
            staging = [] if self.staging is None else [self.staging.memory]
            self.engine.register([*args.kv_data_ptrs, *(m.ctypes.data for m in staging)],
                                 [*args.kv_data_lens, *(m.size for m in staging)])
            self._server = ControlServer(host, control_port, self._on_message, secret=secret)
            if role == "prefill":
                assert bootstrap is not None
                self.transfers = TransferWorker(self)
                if serve_bootstrap:
                    self._bootstrap_server = BootstrapServer(*bootstrap, secret=secret).start()
                    bootstrap = (bootstrap[0], self._bootstrap_server.port)  # port 0 asked for any free port
                # the DP groups' leaders start together, but only the first serves: the others may wait for it
                self.bootstrap_client.put_route(*bootstrap, self.rank_info(), timeout_s=bootstrap_timeout_s)
                self.bootstrap = bootstrap
        except BaseException:
            self.close()
            raise
        logger.info("mooncake KV %s manager rank %d: control %s, transfer session %s", role, args.engine_rank,
                    self.control_addr, self.engine.session_id)

    @property
    def control_addr(self) -> str:
        assert self._server is not None
        return self._server.address

    def rank_info(self) -> RankInfo:
        a = self.args
        return RankInfo(a.engine_rank, self.tp_size, self.control_addr, self.engine.session_id, list(a.kv_data_ptrs),
                        list(a.kv_item_lens), a.page_size, dict(a.fingerprint), self.dp_rank, self.dp_size,
                        list(a.kv_heads))

    def layout_problem(self, page_size: int, item_lens: list[int], fingerprint: dict[str, object],
                       kv_heads: list[int]) -> str | None:
        """Why a peer with this layout (caching KV heads kv_heads = [first, count]) cannot exchange pages with us
        (names both values), or None."""
        mine = (self.args.page_size, list(self.args.kv_item_lens), dict(self.args.fingerprint))
        theirs = (page_size, item_lens, fingerprint)
        if self.role == "prefill":
            return layout_mismatch(mine, theirs, self.args.kv_heads[1], kv_heads[1])
        return layout_mismatch(theirs, mine, kv_heads[1], self.args.kv_heads[1])

    # ---- room bookkeeping (called by senders and receivers) -------------------------------------------------

    def add_sender(self, sender: MooncakeKVSender) -> None:
        with self.lock:
            self._sweep_pending()
            if sender.room in self._senders:
                self.fail(sender, f"room {sender.room} already has a sender on this rank")
                return
            self._senders[sender.room] = sender
            pending = self._pending.pop(sender.room, None)
            if pending is not None:
                self._attach(sender, pending[0])

    def add_receiver(self, receiver: MooncakeKVReceiver) -> None:
        with self.lock:
            if receiver.room in self._receivers:
                self.fail(receiver, f"room {receiver.room} already has a receiver on this rank")
                return
            self._receivers[receiver.room] = receiver

    def fail(self, room: Room, reason: str, notify_peer: bool = True) -> None:
        """Room -> Failed(reason) unless already finished; tells the peer when it knows about the room."""
        with self.lock:
            if room.state in (KVPoll.Success, KVPoll.Failed):
                return
            room.state, room.reason = KVPoll.Failed, reason
            self._forget(room)
        logger.info("KV transfer of room %d failed: %s", room.room, reason)
        if notify_peer:
            self._notify_peer(room, reason)

    def take_part_jobs(self) -> list[tuple[int, dict]]:
        """The followers' shares of the rooms sent since the last call: (follower rank, PartJob as a map), for the
        scheduler to hand over the step broadcast (the followers hear of rooms no other way)."""
        with self.lock:
            jobs, self.part_jobs = self.part_jobs, []
        return jobs

    def own_part_done(self, sender: MooncakeKVSender, status: TransferStatus) -> None:
        """This rank's writes of the room have landed (transfer thread): tell decode unless followers still write."""
        with self.lock:
            sender.own_done = True
            ready = not sender.parts_pending and sender.state == KVPoll.Transferring
        if ready:
            self._tell_decode(sender, status)

    def _tell_decode(self, sender: MooncakeKVSender, status: TransferStatus) -> None:
        reg = sender.registration
        assert reg is not None
        try:
            self.control.send(reg.control_addr, status)
        except KVTransferError as e:
            self.fail(sender, f"pages of room {sender.room} landed but decode {reg.control_addr} could not be "
                              f"told: {e}", notify_peer=False)  # fmt: skip
            return
        self.succeed(sender)

    def _on_part_done(self, msg: PartDone) -> None:
        with self.lock:
            sender = self._senders.get(msg.room)
            if sender is None or sender.state != KVPoll.Transferring or msg.engine_rank not in sender.parts_pending:
                logger.debug("part of room %d from prefill rank %d ignored", msg.room, msg.engine_rank)
                return
            sender.parts_pending.discard(msg.engine_rank)
            ready = msg.ok and sender.own_done and not sender.parts_pending
        if not msg.ok:
            self.fail(sender, f"prefill rank {msg.engine_rank} could not write its KV heads of room {msg.room}: "
                              f"{msg.reason}")  # fmt: skip
        elif ready:
            assert sender.status is not None
            self.io.submit(self._tell_decode, sender, sender.status)

    def succeed(self, sender: MooncakeKVSender) -> None:
        with self.lock:
            if sender.state == KVPoll.Transferring:
                sender.state = KVPoll.Success
                self._forget(sender)

    def abort(self, room: Room) -> None:
        with self.lock:
            live = room.state not in (KVPoll.Success, KVPoll.Failed)
            if live:
                room.state, room.reason = KVPoll.Failed, "aborted"
            self._forget(room)
        logger.debug("room %d aborted (%s)", room.room, "live" if live else "finished")
        if live:
            self._notify_peer(room, f"{self.role} aborted room {room.room}")

    def _forget(self, room: Room) -> None:
        table: dict = self._senders if isinstance(room, MooncakeKVSender) else self._receivers
        if table.get(room.room) is room:
            del table[room.room]
        if isinstance(room, MooncakeKVReceiver) and room.staging_offset is not None:
            assert self.staging is not None
            self.staging.give_back(room.staging_offset, room.state == KVPoll.Success)
            room.staging_offset = None

    def _notify_peer(self, room: Room, reason: str) -> None:
        if isinstance(room, MooncakeKVSender):
            if room.registration is not None:
                status = TransferStatus(room.room, False, reason, -1, 0)
                self.io.submit(self._send_quietly, room.registration.control_addr, status)
        elif room.registered and room.prefill is not None:
            self.io.submit(self._send_quietly, room.prefill.control_addr, AbortRoom(room.room, reason))

    def _send_quietly(self, addr: str, msg: ControlMessage) -> None:
        try:
            self.control.send(addr, msg)
        except KVTransferError as e:
            logger.debug("could not tell %s about room %d: %s", addr, msg.room, e)

    def _sweep_pending(self) -> None:
        now = time.monotonic()
        for room in [r for r, (_, expiry) in self._pending.items() if expiry < now]:
            logger.debug("registration for room %d expired before its sender was created", room)
            del self._pending[room]

    # ---- control messages ----------------------------------------------------------------------------------

    def _on_message(self, msg: ControlMessage) -> None:
        if isinstance(msg, RegisterRoom) and self.role == "prefill":
            self._on_register(msg)
        elif isinstance(msg, PartDone) and self.role == "prefill":
            self._on_part_done(msg)
        elif isinstance(msg, TransferStatus) and self.role == "decode":
            self._on_status(msg)
        elif isinstance(msg, AbortRoom):
            self._on_abort(msg)
        else:
            logger.warning("%s rank got a %s message; ignored", self.role, type(msg).__name__)

    def _on_register(self, msg: RegisterRoom) -> None:
        refusal = None
        with self.lock:
            self._sweep_pending()
            sender = self._senders.get(msg.room)
            first = sender.registration if sender is not None else self._pending.get(msg.room, (None, 0.0))[0]
            if first is not None:
                # A room belongs to its first registrant: a second decode (or a second request of the same decode)
                # claiming it would be written another request's KV.
                if _same_registrant(first, msg):
                    logger.debug("repeated registration for room %d ignored", msg.room)
                else:
                    refusal = f"room {msg.room} is already registered by another decode request ({first.control_addr})"
            elif sender is None:
                if len(self._pending) >= self.max_pending_rooms:
                    refusal = (f"prefill rank {self.args.engine_rank} already holds {len(self._pending)} registrations "
                               "for rooms it has no request for")
                else:
                    self._pending[msg.room] = (msg, time.monotonic() + self.bootstrap_timeout_s)
            elif sender.state == KVPoll.Bootstrapping:
                self._attach(sender, msg)
            else:
                logger.debug("registration for finished room %d ignored", msg.room)
        if refusal is not None:
            self._refuse(msg, refusal)

    def _refuse(self, msg: RegisterRoom, reason: str) -> None:
        """Tells the decode that sent msg its room failed; whatever this rank holds for the room is untouched."""
        logger.info("registration of room %d from %s refused: %s", msg.room, msg.control_addr, reason)
        self.io.submit(self._send_quietly, msg.control_addr, TransferStatus(msg.room, False, reason, -1, 0))

    def _attach(self, sender: MooncakeKVSender, msg: RegisterRoom) -> None:
        if msg.prompt_hash != sender.prompt_hash:
            # Another request's decode claims this room: refuse it, and keep waiting for our own decode.
            self._refuse(msg, prompt_mismatch(msg.room, sender.prompt_hash, msg.prompt_hash))
            return
        sender.registration = msg
        problem = self.layout_problem(msg.page_size, msg.item_lens, msg.fingerprint, msg.kv_heads)
        if problem is None and msg.engine_rank != self.args.engine_rank:
            problem = f"decode engine_rank {msg.engine_rank} registered with prefill rank {self.args.engine_rank}"
        if problem is None and len(msg.dst_ptrs) != len(msg.item_lens):
            problem = f"registration has {len(msg.dst_ptrs)} buffer pointers for {len(msg.item_lens)} buffers"
        if problem is None:  # (the page sizes agree by now)
            problem = cached_tokens_problem(msg.cached_tokens, msg.num_tokens, msg.page_size)
        for peer in msg.peers:
            if problem is None:
                problem = self.layout_problem(msg.page_size, peer.item_lens, msg.fingerprint, peer.kv_heads)
            if problem is None and len(peer.ptrs) != len(peer.item_lens):
                problem = f"decode rank {peer.engine_rank} has {len(peer.ptrs)} buffer pointers for " \
                          f"{len(peer.item_lens)} buffers"
        if problem is None:
            problem = self.heads_problem([msg.kv_heads, *(peer.kv_heads for peer in msg.peers)])
        if problem is not None:
            self.fail(sender, f"incompatible decode for room {msg.room}: {problem}")
        else:
            sender.state = KVPoll.WaitingForInput
            logger.debug("room %d registered by decode %s", msg.room, msg.control_addr)

    def heads_problem(self, decode_heads: list[list[int]]) -> str | None:
        """Why this prefill group cannot send every decode rank its KV heads (decode_heads: [first, count] of each),
        or None: some decode head that no rank of the group caches (the models differ)."""
        try:
            plan_head_copies(self.prefill_ranges, [(first, count) for first, count in decode_heads])
        except ValueError as e:
            return str(e)
        return None

    def _on_status(self, msg: TransferStatus) -> None:
        with self.lock:
            receiver = self._receivers.get(msg.room)
            if receiver is None:
                logger.debug("status for unknown room %d ignored", msg.room)
                return
            same_prompt = msg.prompt_tokens == receiver.num_tokens and msg.prompt_hash == receiver.prompt_hash
            area = receiver.staging_offset if msg.staged else None
        if msg.ok and same_prompt and (area is not None or not msg.staged):
            if area is not None:  # should the room fail meanwhile, the area is held back, not lent again
                assert self.staging is not None and receiver.pages is not None
                self.staging.unstage(area, receiver.sent_pages)
            with self.lock:
                if self._receivers.get(msg.room) is receiver:  # else aborted or failed meanwhile
                    receiver.set_success(msg.first_token, msg.prompt_tokens)
                    self._forget(receiver)
            logger.debug("room %d received", msg.room)
            return
        if msg.ok and msg.prompt_tokens != receiver.num_tokens:
            reason = f"prefill sent {msg.prompt_tokens} prompt tokens, decode expected {receiver.num_tokens}"
        elif msg.ok and not same_prompt:
            # Same length, other tokens: the KV in our pages answers someone else's prompt and must not be used.
            reason = (f"prefill sent the KV of another prompt for room {msg.room} (prompt fingerprint "
                      f"{msg.prompt_hash:#018x}, this request's {receiver.prompt_hash:#018x}); "
                      "is the bootstrap_room reused?")
        elif msg.ok:
            reason = f"prefill wrote room {msg.room} to a staging area this decode did not lend it"
        else:
            reason = f"prefill reported: {msg.reason}"
        self.fail(receiver, reason, notify_peer=False)

    def _on_abort(self, msg: AbortRoom) -> None:
        with self.lock:
            self._pending.pop(msg.room, None)
            room: Room | None = self._senders.get(msg.room) or self._receivers.get(msg.room)
        if room is None:
            logger.debug("abort for unknown room %d ignored", msg.room)
        else:
            self.fail(room, f"peer aborted: {msg.reason}", notify_peer=False)

    def _on_peer_lost(self, addr: str) -> None:
        now = time.monotonic()
        with self.lock:
            for r in self._receivers.values():
                if r.registered and r.prefill is not None and r.prefill.control_addr == addr:
                    r.peer_lost_at = now
                    self.bootstrap_client.invalidate(*r.bootstrap_addr)

    # ---- decode: bootstrap and registration (io threads) ---------------------------------------------------

    def bootstrap_receiver(self, r: MooncakeKVReceiver) -> None:
        host, port = r.bootstrap_addr
        try:
            route = self.bootstrap_client.get_route(host, port, max(r.bootstrap_deadline - time.monotonic(), 0.1))
        except KVTransferError as e:
            self.fail(r, f"bootstrap with prefill {host}:{port} failed: {e}")
            return
        if route.tp_size != self.tp_size:
            self.fail(r, f"prefill {host}:{port} has tp_size={route.tp_size}, this decode tp_size={self.tp_size}; "
                         "different TP sizes are not supported yet")
            return
        info = route.rank_for(r.room, self.args.engine_rank)
        problem = self.layout_problem(info.page_size, info.kv_item_lens, info.fingerprint, info.kv_heads)
        if problem is not None:
            self.fail(r, f"prefill {host}:{port} and this decode have incompatible KV caches: {problem}")
            return
        with self.lock:
            if r.state != KVPoll.Bootstrapping:
                return
            r.prefill, r.state = info, KVPoll.WaitingForInput
            ready = r.pages is not None
        if ready:
            self.register_receiver(r)

    def register_receiver(self, r: MooncakeKVReceiver) -> None:
        assert r.prefill is not None and r.pages is not None
        a = self.args
        staging_addr = 0
        if r.staging_offset is not None:
            assert self.staging is not None
            staging_addr = self.staging.address(r.staging_offset)
        msg = RegisterRoom(r.room, a.engine_rank, self.control_addr, self.engine.session_id, list(a.kv_data_ptrs),
                           list(a.kv_item_lens), a.page_size, r.pages, r.num_tokens, dict(a.fingerprint),
                           r.prompt_hash, staging_addr, self.peers, r.cached_tokens, list(a.kv_heads))
        try:
            self.control.send(r.prefill.control_addr, msg)
        except KVTransferError as e:
            self.bootstrap_client.invalidate(*r.bootstrap_addr)  # a restarted prefill has new endpoints
            self.fail(r, f"cannot register room {r.room} with prefill {r.prefill.control_addr} "
                         f"(is it down?): {e}", notify_peer=False)
            return
        with self.lock:
            r.registered = True
            if r.state == KVPoll.WaitingForInput:  # the status may already have come back
                r.state = KVPoll.Transferring
            aborted_meanwhile = r.state == KVPoll.Failed
        if aborted_meanwhile:  # abort() did not know the prefill had the room yet
            self._notify_peer(r, f"decode aborted room {r.room}")
        logger.debug("room %d registered with prefill %s", r.room, r.prefill.control_addr)

    def close(self) -> None:
        """Stops the threads, the listener and the engine; rooms still in flight get no answer."""
        if self.transfers is not None:
            self.transfers.close()
        if self._server is not None:
            self._server.close()
        self.io.shutdown(wait=False, cancel_futures=True)
        self.control.close()
        if self._bootstrap_server is not None:
            self._bootstrap_server.close()
        self.engine.close()


def _same_registrant(a: RegisterRoom, b: RegisterRoom) -> bool:
    """Whether b repeats a's registration (the same decode rank's same pages) rather than a second claim."""
    return (a.control_addr, a.session_id, a.dst_pages, a.prompt_hash) == (b.control_addr, b.session_id, b.dst_pages,
                                                                          b.prompt_hash)


class DisaggSettings(Protocol):
    """What the factories read from the instance's disaggregation settings (pd.engine.disagg.DisaggConfig)."""

    host: str
    bootstrap_port: int
    bootstrap_timeout: float
    transfer_timeout: float
    dp_rank: int
    dp_size: int
    bootstrap_host: str  # "" = host
    secret: str | None  # the instances' --api-key: authenticates bootstrap routes and control messages


def start_prefill_manager(args: KVArgs, cfg: DisaggSettings, tp_size: int = 1,
                          peers: list[KVTarget] | None = None) -> MooncakeKVManager:
    """A prefill leader's manager; ``peers``: its attention group's other ranks (start_prefill_source on each).
    Rank 0 of DP group 0 also serves the instance's bootstrap server on cfg.bootstrap_port."""
    bootstrap = (cfg.bootstrap_host or cfg.host, cfg.bootstrap_port)
    return MooncakeKVManager(args, "prefill", cfg.host, bootstrap, tp_size=tp_size,
                             dp_rank=cfg.dp_rank, dp_size=cfg.dp_size,
                             serve_bootstrap=args.engine_rank == 0 and cfg.dp_rank == 0,
                             bootstrap_timeout_s=cfg.bootstrap_timeout, transfer_timeout_s=cfg.transfer_timeout,
                             secret=cfg.secret, peers=peers)


def start_decode_manager(args: KVArgs, cfg: DisaggSettings, tp_size: int = 1,
                         peers: list[KVTarget] | None = None) -> MooncakeKVManager:
    """A decode leader's manager; ``peers``: its attention group's other ranks (start_decode_target on each)."""
    return MooncakeKVManager(args, "decode", cfg.host, None, tp_size=tp_size,
                             bootstrap_timeout_s=cfg.bootstrap_timeout, transfer_timeout_s=cfg.transfer_timeout,
                             secret=cfg.secret, peers=peers)


class MooncakeKVTarget(KVTargetHolder):
    """A decode rank that only receives: its KV buffers registered with a transfer engine, which prefill ranks write
    rooms' pages into. It has no rooms, no control listener and no threads of its own: its leader's manager
    registers each room for it (``target`` travels in RegisterRoom.peers) and hears the room's status.
    Raises KVTransferError when the engine cannot start or register the memory."""

    def __init__(self, args: KVArgs, host: str, protocol: str = "tcp", device_name: str = "",
                 io_timeout_s: float = 5.0) -> None:
        self.engine, self.target = registered_engine(args, host, protocol, device_name, io_timeout_s)
        logger.info("mooncake KV decode target rank %d: transfer session %s", args.engine_rank, self.engine.session_id)

    def close(self) -> None:
        self.engine.close()


def start_decode_target(args: KVArgs, cfg: DisaggSettings) -> MooncakeKVTarget:
    return MooncakeKVTarget(args, cfg.host)
