"""Contracts of the KV transfer layer: what prefill and decode engines call, whatever moves the bytes.

Flow for one request (room = the 63-bit `bootstrap_room` the load balancer put in the request):

  decode rank                                   prefill rank
  -----------                                   ------------
  KVReceiver(mgr, host, port, room)             KVSender(mgr, room)
    asks the prefill bootstrap server for the     poll() == Bootstrapping until decode's
    prefill ranks' endpoints (cached per          registration for `room` arrives
    prefill instance), checks compatibility
  receiver.init(dst_pages, num_tokens)  ------>   poll() == WaitingForInput
    (registers destination pages with room)     ... prefill runs the prompt ...
                                                sender.send(src_pages, num_tokens, first_token)
                                                  poll() == Transferring -> Success | Failed
  poll() == Transferring / Success | Failed <---- pages written by the transfer engine, then a
  receiver.result() -> first token + meta          status message (first token with it)

Every poll is non-blocking; every wait has a deadline (a transfer failure is a state with a reason, never a
hang). Control messages are msgpack dicts with a schema (kvtransfer.messages), never pickle.
"""

from __future__ import annotations

import hashlib
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, field
from enum import IntEnum

import numpy as np


class KVPoll(IntEnum):
    Failed = 0
    Bootstrapping = 1
    WaitingForInput = 2
    Transferring = 3
    Success = 4


class KVTransferError(RuntimeError):
    """A handshake or transfer problem a user or a peer can cause (incompatible peers, dead peer, timeout)."""


@dataclass(frozen=True)
class KVArgs:
    """What one engine rank exposes for transfers.

    kv_data_ptrs:  base address of every KV buffer, layer-major: layer 0's buffers, then layer 1's, ...
    kv_item_lens:  bytes of one token slot in each of those buffers (a page is item_len * page_size bytes,
                   and page p of a buffer starts at ptr + p * item_len * page_size).
    fingerprint:   what both sides must agree on (architecture, layers, KV layout per layer, dtype,
                   page size); a mismatch is a clear KVTransferError at handshake.
    kv_data_lens:  bytes of each of those buffers; backends that register memory with a NIC or transfer
                   engine (mooncake) need it, and it bounds the page indices a peer may name.
    host_memory:   whether those buffers are host memory, which lets a backend copy scattered pages through
                   host staging buffers (kvtransfer.staging); None: they are exactly when this process sees no
                   CUDA device (kv_in_host_memory).
    kv_heads:      (first, count) of the model's KV heads this rank caches in every buffer, back to back in a token
                   slot (tensor-parallel ranks shard them); the fingerprint's kv_layout names the model's totals.
                   The default (0, 1) takes a token slot as one unit (MLA's latent).
    """

    engine_rank: int
    kv_data_ptrs: list[int]
    kv_item_lens: list[int]
    page_size: int
    fingerprint: dict[str, object] = field(default_factory=dict)
    kv_data_lens: list[int] = field(default_factory=list)
    host_memory: bool | None = None
    kv_heads: tuple[int, int] = (0, 1)


def kv_in_host_memory(args: KVArgs) -> bool:
    """args.host_memory, or when that is None whether this process has no CUDA device (then nothing else can
    hold the KV cache)."""
    if args.host_memory is not None:
        return args.host_memory
    import torch  # the engine has it loaded already; kvtransfer itself needs only numpy

    return not torch.cuda.is_available()


@dataclass(frozen=True)
class FirstToken:
    """The token prefill sampled after the prompt, and what decode needs to continue from it."""

    token_id: int
    prompt_tokens: int


def prompt_fingerprint(token_ids: Sequence[int]) -> int:
    """A 64-bit digest (blake2b of the ids as little-endian int64) of the prompt a room's KV was computed for.

    Prefill and decode each compute it from their own copy of the request: equal prompts give equal values, so a
    room that two different requests claim is caught before one client's KV answers another's prompt.
    """
    data = np.asarray(token_ids, dtype="<i8").tobytes()
    return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "little")


class KVManager(ABC):
    """One per engine rank: owns the transfer engine, the registered KV memory and the control listener."""

    @abstractmethod
    def close(self) -> None: ...


class KVTargetHolder(ABC):
    """A decode rank that only receives (a follower of its attention group's leader): its KV memory, registered for
    prefill ranks to write into. ``target`` (a kvtransfer.messages.KVTarget) is what its leader registers rooms
    with; the leader hears each room's status for every rank of the group."""

    target: object

    @abstractmethod
    def close(self) -> None: ...


class KVSourceHolder(KVTargetHolder):
    """A prefill rank that only writes (a follower of its attention group's leader): its KV memory, registered to
    write its share of each room's KV heads from. Its leader's manager plans each room and hands this rank its
    share (``submit``), and hears back when it has landed."""

    @abstractmethod
    def submit(self, job: dict) -> None:
        """Queues one share of a room (a backend-defined map, as the leader's manager made it). Non-blocking."""


class KVSender(ABC):
    """Prefill side of one request. Backends construct it as (manager, room, prompt_hash): the room belongs to
    this request, and only a decode registration with the same prompt_fingerprint() is accepted for it (another is
    refused, its decode told why, and this sender keeps waiting for the right one)."""

    @abstractmethod
    def poll(self) -> KVPoll: ...

    @abstractmethod
    def send(self, page_indices: list[int], num_tokens: int, first_token: FirstToken) -> None:
        """Starts moving the prompt's pages (non-blocking); poll() reports Transferring then Success/Failed."""

    @property
    @abstractmethod
    def failure_reason(self) -> str | None: ...

    @property
    def peer_cached_tokens(self) -> int:
        """Leading prompt tokens the decode peer holds already (its registration says so once it has come):
        send() writes only the pages after them."""
        return 0

    @abstractmethod
    def abort(self) -> None: ...


class KVReceiver(ABC):
    """Decode side of one request. Backends construct it as (manager, bootstrap_host, bootstrap_port, room,
    prompt_hash): the room fails, and its pages must not be read, when prefill's KV was computed for a prompt with
    another prompt_fingerprint()."""

    @abstractmethod
    def init(self, page_indices: list[int], num_tokens: int, cached_tokens: int = 0) -> None:
        """Registers the destination pages for this room with the prefill rank (non-blocking): one per page of
        the prompt, the first cached_tokens / page_size of them already holding the KV of the prompt's first
        cached_tokens tokens (decode's prefix cache; the prefill writes only the pages after them)."""

    @abstractmethod
    def poll(self) -> KVPoll: ...

    @abstractmethod
    def result(self) -> FirstToken:
        """The first token; valid once poll() == Success."""

    @property
    @abstractmethod
    def failure_reason(self) -> str | None: ...

    @abstractmethod
    def abort(self) -> None: ...
