"""One request's life in the HTTP front: checks against the model, engine submission, detokenization, stop
strings, metrics, the finish log line, and abort when the request ends early.

Both APIs (native /generate and OpenAI) build a `GenerationSpec` with `make_spec` and consume
`stream_generation`, which yields a cumulative `GenerationChunk` per engine message.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import anyio
import numpy as np
from fastapi import Request

from pd.engine.io import EngineStats, GenerateRequest, SamplingParams, TokenOutput
from pd.server.detokenizer import IncrementalDetokenizer
from pd.server.metrics import RequestTimer, ServerMetrics
from pd.server.protocol import ApiError
from pd.server.tokenization import TokenizerWorkers
from pd.server_args import ServerArgs

logger = logging.getLogger(__name__)

# An engine message with more new tokens than this (the end of a non-streamed request) is detokenized on a tokenizer
# thread; smaller ones, the streaming case, are cheaper to decode in place than to hand over.
INLINE_DETOKENIZE_TOKENS = 256


class EngineClientLike(Protocol):
    """What the front needs from the engine client (pd.engine.client.EngineClient)."""

    model_config: dict[str, Any]
    max_context_length: int

    @property
    def is_alive(self) -> bool: ...

    def generate(self, req: GenerateRequest) -> AsyncIterator[TokenOutput]: ...

    async def abort(self, rid: str) -> None: ...

    async def abort_all(self) -> None: ...

    async def flush_cache(self) -> None: ...

    async def profile(self, action: str, **settings: Any) -> list[tuple[bool, str]]: ...

    def stats(self) -> EngineStats: ...

    async def close(self) -> None: ...


@dataclass
class ServerContext:
    """Everything a route handler needs; one per app (kept on `app.state.ctx`)."""

    engine: EngineClientLike
    tokenizer: Any | None  # None with --skip-tokenizer-init: token ids in, token ids out
    server_args: ServerArgs
    metrics: ServerMetrics = field(default_factory=ServerMetrics)
    inflight: set[str] = field(default_factory=set)  # rids being generated, to refuse duplicates and abort all
    started_at: float = field(default_factory=time.time)
    logged_unknown_fields: set[str] = field(default_factory=set)  # unknown request fields already logged
    # Sampling parameters a request leaves unset (--sampling-defaults); read from the model directory.
    sampling_defaults: dict[str, float | int] = field(init=False)
    # Runs the tokenizer off the event loop; None without a tokenizer.
    tokenizer_workers: TokenizerWorkers | None = field(init=False)
    # With several front processes: whether all of them listen on the port yet (health says 503 until then).
    fronts_listening: Callable[[], bool] | None = None

    def __post_init__(self) -> None:
        self.sampling_defaults = load_sampling_defaults(self.server_args)
        self.tokenizer_workers = None if self.tokenizer is None else TokenizerWorkers(self.tokenizer)

    @property
    def vocab_size(self) -> int | None:
        cfg = self.engine.model_config
        return cfg.get("vocab_size") or cfg.get("text_config", {}).get("vocab_size")


# OpenAI's defaults, which are also what an unset parameter means when the model has no generation_config.json.
OPENAI_SAMPLING_DEFAULTS: dict[str, float | int] = {"temperature": 1.0, "top_p": 1.0, "top_k": -1, "min_p": 0.0}
_DEFAULT_CHECKS: dict[str, Callable[[float], bool]] = {
    "temperature": lambda v: v >= 0,
    "top_p": lambda v: 0 < v <= 1,
    "top_k": lambda v: v == int(v) and -1 <= v < 2**63,
    "min_p": lambda v: 0 <= v <= 1,
}


def load_sampling_defaults(args: ServerArgs) -> dict[str, float | int]:
    """Sampling defaults for requests that leave them unset: with --sampling-defaults model (SGLang's default),
    temperature / top_p / top_k / min_p from the model's generation_config.json over OpenAI's; with `openai`,
    OpenAI's alone. A missing file or a value out of range keeps OpenAI's (logged). A repetition_penalty other
    than 1 cannot be applied (this server has no penalties) and is logged."""
    defaults = dict(OPENAI_SAMPLING_DEFAULTS)
    if args.sampling_defaults != "model" or args.model_path is None:
        return defaults
    config = _read_generation_config(args.model_path)
    for name, ok in _DEFAULT_CHECKS.items():
        value = config.get(name)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or not ok(value):
            logger.warning("generation_config.json: ignoring %s=%r (out of range)", name, value)
            continue
        defaults[name] = int(value) if name == "top_k" else float(value)
    penalty = config.get("repetition_penalty")
    if penalty is not None and penalty != 1.0:
        logger.warning("generation_config.json sets repetition_penalty=%r, which this server cannot apply", penalty)
    if defaults != OPENAI_SAMPLING_DEFAULTS:
        logger.info("sampling defaults from the model's generation_config.json: %s", defaults)
    return defaults


def _read_generation_config(model_path: str) -> dict[str, Any]:
    """generation_config.json of a model directory (or of a hub id already in the local cache); {} if none."""
    path: str | None = os.path.join(model_path, "generation_config.json")
    if not os.path.isdir(model_path):
        try:
            from huggingface_hub import try_to_load_from_cache

            cached = try_to_load_from_cache(model_path, "generation_config.json")
            path = cached if isinstance(cached, str) else None
        except Exception:  # not a valid repo id either
            path = None
    if path is None or not os.path.isfile(path):
        return {}
    try:
        with open(path, encoding="utf-8") as f:
            config = json.load(f)
    except (OSError, ValueError) as e:
        logger.warning("could not read %s: %s; using OpenAI's sampling defaults", path, e)
        return {}
    return config if isinstance(config, dict) else {}


def get_context(request: Request) -> ServerContext:
    """The app's ServerContext (set by create_app)."""
    ctx: ServerContext = request.app.state.ctx
    return ctx


@dataclass(frozen=True)
class FinishReason:
    """Why a request ended. type: "stop" | "length" | "abort" | "error"."""

    type: str
    matched: int | str | None = None  # stop token id or stop string
    length: int | None = None
    message: str | None = None
    status: int = 500  # of an error: the HTTP status it answers with (the engine's TokenOutput.status)

    def to_sglang(self) -> dict[str, Any]:
        """SGLang's meta_info.finish_reason shape."""
        if self.type == "stop":
            return {"type": "stop", "matched": self.matched}
        if self.type == "length":
            return {"type": "length", "length": self.length}
        return {"type": "abort", "message": self.message}


@dataclass(frozen=True)
class GenerationSpec:
    """A validated request, ready for the engine. `arrival` is time.perf_counter() when it came in."""

    rid: str
    input_ids: list[int] | np.ndarray  # an array: int64, as /generate's parser makes it
    sampling: SamplingParams
    arrival: float
    stop: tuple[str, ...] = ()
    skip_special_tokens: bool = True
    no_stop_trim: bool = False
    bootstrap_host: str | None = None
    bootstrap_port: int | None = None
    bootstrap_room: int | None = None
    stream_interval: int = 1  # a streamed request's tokens come every this many (the first at once)


# slots, not frozen: a frozen dataclass's __init__ costs ~8x more (one per streamed event).
@dataclass(slots=True)
class GenerationChunk:
    """State after one engine message: cumulative text/ids plus what is new since the previous chunk."""

    rid: str
    delta: str
    text: str
    output_ids: list[int]
    prompt_tokens: int
    finish: FinishReason | None
    e2e_latency: float
    cached_tokens: int = 0  # prompt tokens whose KV came from the engine's prefix cache

    @property
    def completion_tokens(self) -> int:
        return len(self.output_ids)


def make_spec(
    ctx: ServerContext,
    rid: str,
    input_ids: list[int] | np.ndarray,
    *,
    max_new_tokens: int | None,
    default_max_new_tokens: int | None,
    max_tokens_name: str,
    temperature: float | None,
    top_p: float | None,
    top_k: int | None,
    min_p: float | None,
    seed: int | None,
    stop: Sequence[str],
    stop_token_ids: Sequence[int] | None,
    ignore_eos: bool,
    skip_special_tokens: bool,
    no_stop_trim: bool,
    arrival: float,
    bootstrap: tuple[str | None, int | None, int | None] = (None, None, None),
    stream_interval: int | None = None,
) -> GenerationSpec:
    """Check a request against the model (vocabulary, context length, KV capacity) and build its spec.

    max_new_tokens None means "up to `default_max_new_tokens` (None: no limit) within the context".
    `max_tokens_name` is the field name the client used, for error messages. A sampling parameter left None takes
    the server's default (`ctx.sampling_defaults`); the result is normalised as SGLang does (a temperature below
    1e-6 is greedy, a top_k of 0 or at least the vocabulary is no cut). Raises ApiError.
    """
    if stop and ctx.tokenizer is None:
        raise ApiError("stop strings need a tokenizer; this server runs with --skip-tokenizer-init")
    n_prompt = len(input_ids)
    limit = ctx.engine.max_context_length
    if n_prompt > limit:  # before anything that walks the ids: a huge prompt is refused in O(1)
        raise ApiError(f"the prompt ({n_prompt} tokens) is longer than the context length ({limit})")
    _check_token_ids(ctx, input_ids, "input_ids")
    _check_token_ids(ctx, stop_token_ids or [], "stop_token_ids")
    if max_new_tokens is not None:
        if max_new_tokens > limit:
            raise ApiError(f"{max_tokens_name} ({max_new_tokens}) is larger than the context length ({limit})")
        if n_prompt + max_new_tokens > limit:
            raise ApiError(
                f"the prompt ({n_prompt} tokens) plus {max_tokens_name} ({max_new_tokens}) is "
                f"{n_prompt + max_new_tokens} tokens, more than the context length ({limit}); "
                f"shorten the prompt or lower {max_tokens_name}"
            )
    else:
        room = limit - n_prompt
        if room < 1:
            raise ApiError(f"the prompt ({n_prompt} tokens) leaves no room for output in the context length ({limit})")
        max_new_tokens = room if default_max_new_tokens is None else min(default_max_new_tokens, room)
    stats = ctx.engine.stats()
    kv_tokens = stats.kv_pages_total * stats.page_size
    if kv_tokens and n_prompt + max_new_tokens > kv_tokens:
        raise ApiError(
            f"the prompt ({n_prompt} tokens) plus {max_tokens_name} ({max_new_tokens}) needs more KV cache than "
            f"this server has ({kv_tokens} tokens)"
        )
    defaults = ctx.sampling_defaults
    sampling = SamplingParams(
        max_new_tokens=max_new_tokens,
        temperature=float(defaults["temperature"] if temperature is None else temperature),
        top_p=float(defaults["top_p"] if top_p is None else top_p),
        top_k=int(defaults["top_k"] if top_k is None else top_k),
        min_p=float(defaults["min_p"] if min_p is None else min_p),
        seed=seed,
        stop_token_ids=tuple(stop_token_ids or ()),
        ignore_eos=ignore_eos,
    ).normalized(ctx.vocab_size)
    host, port, room_id = bootstrap
    mode = ctx.server_args.disaggregation_mode
    if mode != "null" and (host is None or port is None or room_id is None):
        raise ApiError(
            f"this server is the {mode} half of a prefill/decode pair: send requests through a PD load balancer "
            "(`pd lb`, or sglang-router --pd-disaggregation), which adds bootstrap_host, bootstrap_port and "
            "bootstrap_room"
        )
    return GenerationSpec(
        rid=rid,
        input_ids=input_ids,
        sampling=sampling,
        arrival=arrival,
        stop=tuple(stop),
        skip_special_tokens=skip_special_tokens,
        no_stop_trim=no_stop_trim,
        bootstrap_host=host,
        bootstrap_port=port,
        bootstrap_room=room_id,
        stream_interval=ctx.server_args.stream_interval if stream_interval is None else stream_interval,
    )


def _check_token_ids(ctx: ServerContext, ids: Sequence[int] | np.ndarray, name: str) -> None:
    vocab = ctx.vocab_size
    if len(ids) and vocab is not None and (top := int(ids.max() if isinstance(ids, np.ndarray) else max(ids))) >= vocab:
        raise ApiError(f"{name} contains token id {top}, but the vocabulary has {vocab} tokens")


async def stream_generation(
    ctx: ServerContext, spec: GenerationSpec, every_token: bool = True
) -> AsyncIterator[GenerationChunk]:
    """Run `spec` on the engine; yields one chunk per engine message, the last one with `finish` set.
    With every_token False (a consumer that only wants the end) the engine reports the first token and the
    end only, unless stop strings need checking as tokens arrive.

    Raises ApiError (duplicate rid) and whatever the engine client raises on submission
    (EngineFullError when its queue is full) before the first chunk. If the consumer stops early (client
    disconnect, cancellation, aclose) the engine request is aborted. A matched stop string ends the request
    in the front and aborts it in the engine.
    """
    if spec.rid in ctx.inflight:
        raise ApiError(f"request id {spec.rid!r} is already in flight; use a unique rid")
    ctx.inflight.add(spec.rid)
    detok = (
        IncrementalDetokenizer(
            ctx.tokenizer,
            spec.input_ids,
            skip_special_tokens=spec.skip_special_tokens,
            stop=spec.stop,
            no_stop_trim=spec.no_stop_trim,
        )
        if ctx.tokenizer is not None
        else None
    )
    timer = RequestTimer(ctx.metrics, spec.arrival)
    req = GenerateRequest(
        rid=spec.rid,
        input_ids=spec.input_ids,
        sampling=spec.sampling,
        bootstrap_host=spec.bootstrap_host,
        bootstrap_port=spec.bootstrap_port,
        bootstrap_room=spec.bootstrap_room,
        every_token=every_token or bool(spec.stop),
        stream_interval=spec.stream_interval if every_token else 1,  # stop strings alone: checked at every token
    )
    output_ids: list[int] = []
    text = ""
    cached_tokens = 0
    engine_done = False  # the engine has finished or failed the request itself: nothing to abort
    rid_released = False  # discarded from ctx.inflight already (a newer request may hold the rid now)
    outcome = "abort (consumer gone)"
    stream = ctx.engine.generate(req)
    try:
        async for out in stream:
            engine_done = out.finish_reason is not None
            try:
                if detok is not None and ctx.tokenizer_workers is not None and (
                    len(out.new_token_ids) > INLINE_DETOKENIZE_TOKENS
                ):
                    finish, new_ids, delta = await ctx.tokenizer_workers.run(_consume, out, detok, spec)
                else:
                    finish, new_ids, delta = _consume(out, detok, spec)
            except Exception as e:  # this request's detokenization or stop-string check: it ends alone
                logger.exception("rid=%s: detokenizing the output failed", spec.rid)
                reason = f"detokenizing the output failed: {type(e).__name__}: {e}"
                finish, new_ids, delta = FinishReason("error", message=reason), list(out.new_token_ids), ""
            output_ids.extend(new_ids)
            text += delta
            cached_tokens = out.cached_tokens
            timer.on_output(len(new_ids), out.queue_time)
            if finish is not None:
                outcome = finish.type
                if engine_done:  # its rid is free again before the answer goes out (the ending may run after it)
                    ctx.inflight.discard(spec.rid)
                    rid_released = True
            yield GenerationChunk(
                rid=spec.rid,
                delta=delta,
                text=text,
                output_ids=list(output_ids),
                prompt_tokens=len(spec.input_ids),
                finish=finish,
                e2e_latency=time.perf_counter() - spec.arrival,
                cached_tokens=cached_tokens,
            )
            if finish is not None:
                return
        engine_done = True
        outcome = "error"
        yield GenerationChunk(
            rid=spec.rid,
            delta="",
            text=text,
            output_ids=list(output_ids),
            prompt_tokens=len(spec.input_ids),
            finish=FinishReason("error", message="the engine ended the request without a finish reason"),
            e2e_latency=time.perf_counter() - spec.arrival,
            cached_tokens=cached_tokens,
        )
    except Exception as e:
        # EngineFullError on submission, or a failure while running; the abort below is harmless either way.
        outcome = f"{'rejected' if not output_ids else 'failed'} ({type(e).__name__})"
        raise
    finally:
        # Shielded: this runs while a disconnect is cancelling the task, and the abort must still go out.
        with anyio.CancelScope(shield=True):
            try:
                aclose = getattr(stream, "aclose", None)
                if aclose is not None:
                    await aclose()
                if not engine_done:  # after aclose: a client that aborts on close has forgotten the rid by now
                    await ctx.engine.abort(spec.rid)
            except Exception as e:  # e.g. the engine is already gone at shutdown; nothing left to free
                logger.warning("could not abort rid=%s in the engine: %r", spec.rid, e)
        if not rid_released:
            ctx.inflight.discard(spec.rid)
        latency = timer.on_finish(outcome.split(" ")[0], len(spec.input_ids))
        logger.info(
            "finished rid=%s prompt_tokens=%d completion_tokens=%d finish=%s latency=%.3fs",
            spec.rid,
            len(spec.input_ids),
            len(output_ids),
            outcome,
            latency,
        )


def _consume(
    out: TokenOutput, detok: IncrementalDetokenizer | None, spec: GenerationSpec
) -> tuple[FinishReason | None, list[int], str]:
    """One engine message -> (finish reason or None, output ids to keep, newly visible text)."""
    new_ids = list(out.new_token_ids)
    if detok is None:
        return _engine_finish(out), new_ids, ""
    # A matched stop token stays in output_ids but not in the text (unless no_stop_trim), as in SGLang.
    trim_token = out.finish_reason == "stop" and out.matched_stop is not None and not spec.no_stop_trim
    text_ids = new_ids[:-1] if trim_token and new_ids else new_ids
    step = detok.add(text_ids)
    delta = step.delta
    if step.stop is not None:
        return FinishReason("stop", matched=step.stop), new_ids[: step.tokens_used], delta
    finish = _engine_finish(out)
    if finish is not None:
        tail = detok.finish()
        delta += tail.delta
        if tail.stop is not None:
            finish = FinishReason("stop", matched=tail.stop)
    return finish, new_ids, delta


def _engine_finish(out: TokenOutput) -> FinishReason | None:
    if out.finish_reason is None:
        return None
    if out.finish_reason == "stop":
        return FinishReason("stop", matched=out.matched_stop)
    if out.finish_reason == "length":
        return FinishReason("length", length=out.completion_tokens)
    if out.finish_reason == "abort":
        return FinishReason("abort", message=out.error or "the request was aborted")
    return FinishReason("error", message=out.error or f"engine error ({out.finish_reason})", status=out.status)
