"""Schemas of what prefill and decode ranks tell each other, and their validated encodings.

Control channel (msgpack, kvtransfer.control):
  RegisterRoom    decode -> prefill   where to write a room's pages (every rank of the decode's attention group:
                                      the registering leader and its KVTarget peers), and the layout to check
  TransferStatus  prefill -> decode   the room's pages have landed (ok) or why not; carries the first token
  AbortRoom       either way          forget the room
  PartDone        prefill follower -> its leader   the follower's share of a room's KV heads has landed (or why not)
Step broadcast (msgpack, pd.dist.step_sync; leader -> followers of a prefill instance):
  PartJob         which of a room's pages and KV heads a follower writes into which decode ranks
Bootstrap server (JSON over HTTP, kvtransfer.bootstrap):
  RankInfo        one prefill rank's endpoints and KV layout (and its DP-attention group)

Decoding checks every field's type: a peer that sends garbage gets a KVTransferError, never a half-built
message. Unknown extra keys are ignored so a newer peer may add fields.
"""

from __future__ import annotations

import dataclasses
import json
import typing
from dataclasses import dataclass, field
from typing import Any, ClassVar

import msgpack

from kvtransfer.base import KVTransferError


@dataclass(frozen=True)
class KVTarget:
    """One more decode rank whose own KV buffers a room's pages are written into (same page ids as the leader's)."""

    engine_rank: int
    session_id: str  # host:rpc_port of that rank's transfer engine
    ptrs: list[int]  # per KV buffer, layer-major
    item_lens: list[int]  # per KV buffer
    kv_heads: list[int] = field(default_factory=lambda: [0, 1])  # [first, count]: see KVArgs.kv_heads


@dataclass(frozen=True)
class RegisterRoom:
    TYPE: ClassVar[str] = "register"
    room: int
    engine_rank: int
    control_addr: str  # host:port of the decode rank's control listener (status goes there)
    session_id: str  # host:rpc_port of the decode rank's transfer engine (pages are written there)
    dst_ptrs: list[int]  # per KV buffer, layer-major
    item_lens: list[int]  # per KV buffer
    page_size: int
    dst_pages: list[int]  # destination page of each prompt page, in prompt order
    num_tokens: int
    fingerprint: dict[str, Any]
    prompt_hash: int = 0  # kvtransfer.base.prompt_fingerprint of decode's prompt
    # Non-zero: write the pages to this address in the decode's staging pool instead of dst_pages, laid out as
    # kvtransfer.pages.staged_ptrs says; decode scatters them into dst_pages (kvtransfer.staging).
    staging_addr: int = 0
    # The other ranks of the decode's attention group: each caches the room too, in its own memory, so the prefill
    # writes there as well (the status still comes to control_addr alone, once every rank's pages have landed).
    peers: list[KVTarget] = field(default_factory=list)
    # Leading prompt tokens whose KV the decode holds already (its own prefix cache), a multiple of page_size and
    # fewer than num_tokens: the prefill writes only the pages after them (dst_pages still lists every prompt page).
    cached_tokens: int = 0
    kv_heads: list[int] = field(default_factory=lambda: [0, 1])  # [first, count] of the registering rank's heads


@dataclass(frozen=True)
class TransferStatus:
    TYPE: ClassVar[str] = "status"
    room: int
    ok: bool
    reason: str  # empty when ok
    first_token: int  # -1 when not ok
    prompt_tokens: int
    prompt_hash: int = 0  # kvtransfer.base.prompt_fingerprint of the prompt prefill computed the KV for
    staged: bool = False  # the pages went to the registration's staging_addr (a peer without staging: dst_pages)


@dataclass(frozen=True)
class PartDone:
    TYPE: ClassVar[str] = "part_done"
    room: int
    engine_rank: int  # the prefill follower's rank in its attention group
    ok: bool
    reason: str  # empty when ok


@dataclass(frozen=True)
class PartTarget:
    """One decode rank a prefill follower writes into: its buffers (or, for a staging area, the staged layout's
    per-buffer bases), the destination page of each page sent, and the runs of heads [src_offset, dst_offset,
    count] (offsets within each side's own head range) this follower copies."""

    session_id: str
    ptrs: list[int]
    item_lens: list[int]
    pages: list[int]
    copies: list[list[int]]


@dataclass(frozen=True)
class PartJob:
    """A prefill follower's share of a room: its pages (the sent ones, in prompt order; every rank of the group
    holds the room in the same pages) and its targets; PartDone goes to leader_control_addr within timeout_ms."""

    room: int
    leader_control_addr: str
    src_pages: list[int]
    timeout_ms: int
    targets: list[PartTarget]


@dataclass(frozen=True)
class AbortRoom:
    TYPE: ClassVar[str] = "abort"
    room: int
    reason: str


@dataclass(frozen=True)
class RankInfo:
    engine_rank: int
    tp_size: int
    control_addr: str  # host:port
    session_id: str  # host:rpc_port
    kv_data_ptrs: list[int]
    kv_item_lens: list[int]
    page_size: int
    fingerprint: dict[str, Any]
    # Under DP attention each attention group of the prefill instance has its own KV pool and endpoints: room r
    # lives in group r % dp_size (its front sends the request there), so decode asks that group's ranks.
    dp_rank: int = 0
    dp_size: int = 1
    kv_heads: list[int] = field(default_factory=lambda: [0, 1])  # [first, count] of the KV heads this rank caches


ControlMessage = RegisterRoom | TransferStatus | AbortRoom | PartDone
_CONTROL_TYPES: dict[str, type] = {cls.TYPE: cls for cls in (RegisterRoom, TransferStatus, AbortRoom, PartDone)}


def _type_ok(value: object, tp: object) -> bool:
    if tp is bool:
        return isinstance(value, bool)
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if tp is str:
        return isinstance(value, str)
    if typing.get_origin(tp) is list:
        (item_tp,) = typing.get_args(tp)
        return isinstance(value, list) and all(_type_ok(v, item_tp) for v in value)
    if typing.get_origin(tp) is dict:
        return isinstance(value, dict) and all(isinstance(k, str) for k in value)
    if dataclasses.is_dataclass(tp):  # checked (and built) by _build
        return isinstance(value, dict)
    raise AssertionError(f"schema uses an unsupported type {tp}")


def _build(cls: type, data: object) -> Any:
    """cls(**data) after checking that every field without a default is present, and every field given has the
    annotated type."""
    if not isinstance(data, dict):
        raise KVTransferError(f"{cls.__name__}: expected a map, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for f in dataclasses.fields(cls):
        if f.name not in data:
            if f.default is not dataclasses.MISSING or f.default_factory is not dataclasses.MISSING:
                continue
            raise KVTransferError(f"{cls.__name__}: missing field {f.name!r}")
        if not _type_ok(data[f.name], hints[f.name]):
            raise KVTransferError(
                f"{cls.__name__}: field {f.name!r} should be {hints[f.name]}, got {type(data[f.name]).__name__}"
            )
        kwargs[f.name] = data[f.name]
        args = typing.get_args(hints[f.name])
        if typing.get_origin(hints[f.name]) is list and args and dataclasses.is_dataclass(args[0]):
            kwargs[f.name] = [_build(args[0], item) for item in data[f.name]]
    return cls(**kwargs)


def encode_message(msg: ControlMessage) -> bytes:
    """msgpack bytes of a control message (a map with its fields and "type")."""
    return msgpack.packb({"type": msg.TYPE, **dataclasses.asdict(msg)}, use_bin_type=True)


def decode_message(data: bytes) -> ControlMessage:
    """The control message in `data`. Raises KVTransferError on anything that is not a valid message."""
    try:
        obj = msgpack.unpackb(data, raw=False)
    except Exception as e:  # msgpack raises several unrelated types on corrupt input
        raise KVTransferError(f"undecodable control message: {e}") from e
    kind = obj.get("type") if isinstance(obj, dict) else None
    cls = _CONTROL_TYPES.get(kind) if isinstance(kind, str) else None
    if cls is None:
        raise KVTransferError(f"unknown control message type {kind!r}")
    return _build(cls, obj)


def part_job_from_dict(data: object) -> PartJob:
    """A PartJob from its msgpack map (dataclasses.asdict). Raises KVTransferError when a field is wrong."""
    return _build(PartJob, data)


def rank_info_to_json(info: RankInfo) -> dict[str, Any]:
    return dataclasses.asdict(info)


def rank_info_from_json(data: object) -> RankInfo:
    """A RankInfo from its JSON object. Raises KVTransferError when a field is missing or mistyped."""
    return _build(RankInfo, data)


def layout_mismatch(
    prefill: tuple[int, list[int], dict[str, Any]],
    decode: tuple[int, list[int], dict[str, Any]],
    prefill_heads: int = 1,
    decode_heads: int = 1,
) -> str | None:
    """Why a prefill rank's KV pages cannot be copied into a decode rank's, naming both values; None if they can.

    Each side is (page_size, kv_item_lens, fingerprint); *_heads: how many KV heads each side's token slots hold
    (ranks of different TP sizes cache different numbers of heads: the bytes of one head must agree). Fingerprint
    keys come first: "num_layers prefill=4 decode=2" says more than the buffer counts that follow from it.
    """
    (p_page, p_lens, p_fp), (d_page, d_lens, d_fp) = prefill, decode
    # One side's fingerprint may have come through JSON or msgpack (tuples become lists): compare it that way.
    p_fp, d_fp, p_lens, d_lens = (json.loads(json.dumps(x)) for x in (p_fp, d_fp, p_lens, d_lens))
    p_lens, d_lens = [n // prefill_heads for n in p_lens], [n // decode_heads for n in d_lens]
    problems = [
        f"{key} prefill={p_fp.get(key, '<missing>')!r} decode={d_fp.get(key, '<missing>')!r}"
        for key in sorted(set(p_fp) | set(d_fp))
        if p_fp.get(key) != d_fp.get(key)
    ]
    if p_page != d_page:
        problems.append(f"page_size prefill={p_page} decode={d_page}")
    if len(p_lens) != len(d_lens):
        problems.append(f"number of KV buffers prefill={len(p_lens)} decode={len(d_lens)}")
    elif p_lens != d_lens:
        b = next(i for i, (p, d) in enumerate(zip(p_lens, d_lens, strict=True)) if p != d)
        per = "bytes per token" if (prefill_heads, decode_heads) == (1, 1) else "bytes per token and KV head"
        problems.append(f"{per} of KV buffer {b} prefill={p_lens[b]} decode={d_lens[b]}")
    return "; ".join(problems) or None
