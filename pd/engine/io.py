"""Messages between the HTTP front and the engine (scheduler) process.

They cross a process boundary, so each is a plain dataclass of ints, floats, strings and lists that
`to_dict`/`from_dict` turn into msgpack-able dicts. Never pickle. A request's prompt may also be an int64 array
(what the front parsed it into); `pack_message` sends that as its raw bytes and `unpack_messages` reads it back as an
array without a Python int per token.
"""

from __future__ import annotations

import dataclasses
import operator
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, TypeVar

import msgpack
import numpy as np

T = TypeVar("T")

# Temperatures below this mean greedy (SGLang's threshold): dividing logits by less overflows float32.
GREEDY_TEMPERATURE = 1e-6


@dataclass(frozen=True)
class SamplingParams:
    """Per-request sampling settings. A temperature below GREEDY_TEMPERATURE (or top_k == 1) means greedy
    (deterministic); top_k <= 0 or >= the vocabulary means no top-k cut (`normalized` writes those as 0 and -1).

    Stop strings are matched by the front on detokenized text; the engine only sees token ids.
    """

    max_new_tokens: int = 128
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1  # -1: no top-k cut
    min_p: float = 0.0
    seed: int | None = None
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False

    @property
    def is_greedy(self) -> bool:
        return self.temperature < GREEDY_TEMPERATURE or self.top_k == 1

    def normalized(self, vocab_size: int | None) -> SamplingParams:
        """SGLang's normalisation: greedy temperatures become 0, a top_k that cuts nothing becomes -1."""
        temperature = 0.0 if self.temperature < GREEDY_TEMPERATURE else self.temperature
        no_cut = self.top_k <= 0 or (vocab_size is not None and self.top_k >= vocab_size)
        return dataclasses.replace(self, temperature=temperature, top_k=-1 if no_cut else self.top_k)


@dataclass(frozen=True)
class GenerateRequest:
    """One request handed to the engine. `input_ids` is the full tokenized prompt."""

    rid: str
    input_ids: list[int] | np.ndarray  # an array: int64 (the front's parsed /generate input_ids)
    sampling: SamplingParams = field(default_factory=SamplingParams)
    # Disaggregation fields (PD mode only; None otherwise).
    bootstrap_host: str | None = None
    bootstrap_port: int | None = None
    bootstrap_room: int | None = None
    # Report every token as it is sampled (streaming, or stop strings checked by the front); otherwise only the
    # first token and the end, which spares the front a wake-up per token of every non-streaming request.
    every_token: bool = True
    # With every_token: report every this many tokens (the first at once, the end always), SGLang's stream interval.
    stream_interval: int = 1


@dataclass(frozen=True)
class AbortRequest:
    """Abort request `rid` (the engine ignores rids it does not hold), or with every_request all of them, whichever
    front process sent them (--tokenizer-worker-num)."""

    rid: str
    every_request: bool = False


@dataclass(frozen=True)
class FlushCacheRequest:
    """Drop every cached prefix page no request holds."""


@dataclass(frozen=True)
class ProfileRequest:
    """Start or stop the torch profiler on every rank of the leader's group (SGLang's /start_profile and
    /stop_profile; pd.engine.profiler). The leader answers with a reply of the same rid: (rid, ok, message)."""

    rid: str
    action: str  # "start" or "stop"
    output_dir: str = ""  # where each rank writes its trace (absolute: the front resolved it)
    profile_id: str = ""  # the traces' shared name (the front's clock when it started them)
    prefix: str = ""  # put before the profile id in the file names
    start_step: int | None = None  # the engine step to start at (counted since start-up, as SGLang); None: now
    num_steps: int | None = None  # stop after this many steps; None: at /stop_profile
    activities: list[str] = field(default_factory=lambda: ["CPU", "GPU"])
    with_stack: bool = True
    record_shapes: bool = True


# slots, not frozen: a frozen dataclass's __init__ costs ~8x more (one per request per step, on both sides of the
# engine pipe).
@dataclass(slots=True)
class TokenOutput:
    """New tokens of one request since the last message.

    finish_reason is None while running, else one of "stop" (EOS / stop token), "length"
    (max_new_tokens or context length), "abort" (aborted by the client), "error" (see `error`).
    """

    rid: str
    new_token_ids: list[int]
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str | None = None
    matched_stop: int | None = None
    error: str | None = None
    # With finish_reason "error", whose fault it is, as the HTTP status the front answers with: 400 the request can
    # never run here (too long for the context or the KV pool), 409 its bootstrap room is taken, 500 the engine.
    status: int = 500
    # Time the request spent queued before its first forward, in seconds (for metrics).
    queue_time: float = 0.0
    # Prompt tokens whose KV came from the prefix cache.
    cached_tokens: int = 0


@dataclass(frozen=True)
class EngineStats:
    """Live state of the engine, reported after every step (and on request)."""

    num_waiting: int
    num_running: int
    kv_pages_total: int
    kv_pages_free: int
    page_size: int
    generated_tokens_total: int
    prompt_tokens_total: int
    kv_pages_cached: int = 0  # of the free pages, those holding a cached prefix (evicted when pages run short)
    cached_tokens_total: int = 0  # prompt tokens whose KV came from the prefix cache
    kv_pages_sent_total: int = 0  # prefill: KV pages written to decode instances (not those decode had cached)
    # EPLB (the same on every rank of the expert group): rebalances so far, and the balancedness (mean / max GPU
    # load) measured over the window before the last one (1.0 before the first).
    eplb_rebalances: int = 0
    eplb_balancedness: float = 1.0
    # KV capacity of one rank (every rank of an instance holds the same amount): the KV heads it caches per layer and
    # buffer (1 for MLA's latent; fewer than the model's when tensor-parallel ranks shard them) and its pool's bytes.
    kv_heads_per_rank: int = 0
    kv_bytes_per_rank: int = 0


_OUTPUT_FIELDS = tuple(f.name for f in dataclasses.fields(TokenOutput))
_output_row = operator.attrgetter(*_OUTPUT_FIELDS)


def output_to_row(out: TokenOutput) -> tuple[Any, ...]:
    """A TokenOutput as its field values in declaration order: the engine sends one per request per step, and
    a row packs and unpacks ~10x faster than a tagged dict (1.1 ms -> 0.09 ms for a 256-request step)."""
    return _output_row(out)


def output_from_row(row: list[Any]) -> TokenOutput:
    """Inverse of `output_to_row`; raises ValueError on a row of the wrong length (a peer of another version)."""
    if len(row) != len(_OUTPUT_FIELDS):
        raise ValueError(f"a token output row has {len(row)} fields, expected {len(_OUTPUT_FIELDS)}")
    return TokenOutput(*row)


def to_dict(msg: Any) -> dict[str, Any]:
    """Dataclass -> dict with a type tag, ready for msgpack. Shallow (lists are not copied, nested dataclasses
    become plain dicts): `dataclasses.asdict` deep-copies, ~6x slower, and the engine sends one of these per
    streamed token."""
    d = _fields(msg)
    d["__type__"] = type(msg).__name__
    return d


def _fields(msg: Any) -> dict[str, Any]:
    return {f.name: _fields(v) if dataclasses.is_dataclass(v := getattr(msg, f.name)) else v
            for f in dataclasses.fields(msg)}  # fmt: skip


_TYPES: dict[str, type] = {
    t.__name__: t
    for t in (SamplingParams, GenerateRequest, AbortRequest, FlushCacheRequest, ProfileRequest, TokenOutput,
              EngineStats)
}


def from_dict(d: dict[str, Any]) -> Any:
    """Inverse of `to_dict`; rejects unknown type tags (schema check, not arbitrary code)."""
    d = dict(d)
    name = d.pop("__type__")
    cls = _TYPES[name]
    if cls is GenerateRequest:
        d["sampling"] = SamplingParams(**{**d["sampling"], "stop_token_ids": tuple(d["sampling"]["stop_token_ids"])})
    elif cls is SamplingParams:
        d["stop_token_ids"] = tuple(d["stop_token_ids"])
    return cls(**d)


# msgpack extension code of a one-dimensional int64 array (little-endian bytes): a 1024-token prompt packs and unpacks
# in ~2 us this way against ~50 us as a list of ints, which the front's single thread and the engine's loop both paid.
TOKEN_ARRAY_EXT = 1


def _pack_array(obj: Any) -> msgpack.ExtType:
    if isinstance(obj, np.ndarray) and obj.ndim == 1 and obj.dtype == np.int64:
        return msgpack.ExtType(TOKEN_ARRAY_EXT, obj.astype("<i8", copy=False).tobytes())
    if isinstance(obj, int):  # what msgpack raises without this hook
        raise OverflowError(f"the integer {obj} is out of msgpack's 64-bit range")
    raise TypeError(f"a {type(obj).__name__} cannot be sent to the engine")


def _unpack_ext(code: int, data: bytes) -> Any:
    if code != TOKEN_ARRAY_EXT or len(data) % 8:
        raise ValueError(f"unknown msgpack extension {code} ({len(data)} bytes)")
    return np.frombuffer(data, dtype="<i8").astype(np.int64, copy=False)


def pack_message(msg: Any) -> bytes:
    """A front-to-engine message (a dataclass of this module) as msgpack bytes."""
    return msgpack.packb(to_dict(msg), use_bin_type=True, default=_pack_array)


def unpack_messages(data: bytes) -> Iterator[Any]:
    """The messages of `data`: one or more `pack_message` results back to back."""
    unpacker = msgpack.Unpacker(raw=False, ext_hook=_unpack_ext, max_buffer_size=max(len(data), 1))
    unpacker.feed(data)  # the limits of unpackb: the data's own size
    for packed in unpacker:
        yield from_dict(packed)
