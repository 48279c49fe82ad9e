"""One request's life in the HTTP front: checks against the model, engine submission, detokenization, stop
strings, metrics, the finish log line, and abort when the request ends early.

Both APIs (native /generate and OpenAI) build a `GenerationSpec` with `make_spec` and consume
`stream_generation`, which yields a cumulative `GenerationChunk` per engine message.
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import anyio
from fastapi import Request

from pd.engine.io import EngineStats, GenerateRequest, SamplingParams, TokenOutput
from pd.server.detokenizer import IncrementalDetokenizer
from pd.server.metrics import RequestTimer, ServerMetrics
from pd.server.protocol import ApiError
from pd.server_args import ServerArgs

logger = logging.getLogger(__name__)


class EngineClientLike(Protocol):
    """What the front needs from the engine client (pd.engine.client.EngineClient)."""

    model_config: dict[str, Any]
    max_context_length: int

    @property
    def is_alive(self) -> bool: ...

    def generate(self, req: GenerateRequest) -> AsyncIterator[TokenOutput]: ...

    async def abort(self, rid: str) -> None: ...

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

    @property
    def vocab_size(self) -> int | None:
        cfg = self.engine.model_config
        return cfg.get("vocab_size") or cfg.get("text_config", {}).get("vocab_size")


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
    input_ids: list[int]
    sampling: SamplingParams
    arrival: float
    stop: tuple[str, ...] = ()
    skip_special_tokens: bool = True
    no_stop_trim: bool = False
    bootstrap_host: str | None = None
    bootstrap_port: int | None = None
    bootstrap_room: int | None = None


@dataclass(frozen=True)
class GenerationChunk:
    """State after one engine message: cumulative text/ids plus what is new since the previous chunk."""

    rid: str
    delta: str
    text: str
    output_ids: list[int]
    prompt_tokens: int
    finish: FinishReason | None
    e2e_latency: float

    @property
    def completion_tokens(self) -> int:
        return len(self.output_ids)


def make_spec(
    ctx: ServerContext,
    rid: str,
    input_ids: list[int],
    *,
    max_new_tokens: int | None,
    default_max_new_tokens: int | None,
    max_tokens_name: str,
    temperature: float,
    top_p: float,
    top_k: int,
    min_p: float,
    seed: int | None,
    stop: Sequence[str],
    stop_token_ids: Sequence[int] | None,
    ignore_eos: bool,
    skip_special_tokens: bool,
    no_stop_trim: bool,
    arrival: float,
    bootstrap: tuple[str | None, int | None, int | None] = (None, None, None),
) -> GenerationSpec:
    """Check a request against the model (vocabulary, context length, KV capacity) and build its spec.

    max_new_tokens None means "up to `default_max_new_tokens` (None: no limit) within the context".
    `max_tokens_name` is the field name the client used, for error messages. Raises ApiError.
    """
    if stop and ctx.tokenizer is None:
        raise ApiError("stop strings need a tokenizer; this server runs with --skip-tokenizer-init")
    _check_token_ids(ctx, input_ids, "input_ids")
    _check_token_ids(ctx, stop_token_ids or [], "stop_token_ids")
    n_prompt = len(input_ids)
    limit = ctx.engine.max_context_length
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
    sampling = SamplingParams(
        max_new_tokens=max_new_tokens,
        temperature=temperature,
        top_p=top_p,
        top_k=top_k,
        min_p=min_p,
        seed=seed,
        stop_token_ids=tuple(stop_token_ids or ()),
        ignore_eos=ignore_eos,
    )
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
    )


def _check_token_ids(ctx: ServerContext, ids: Sequence[int], name: str) -> None:
    vocab = ctx.vocab_size
    if ids and vocab is not None and max(ids) >= vocab:
        raise ApiError(f"{name} contains token id {max(ids)}, but the vocabulary has {vocab} tokens")


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
    )
    output_ids: list[int] = []
    text = ""
    engine_done = False  # the engine has finished or failed the request itself: nothing to abort
    outcome = "abort (consumer gone)"
    stream = ctx.engine.generate(req)
    try:
        async for out in stream:
            engine_done = out.finish_reason is not None
            finish, new_ids, delta = _consume(out, detok, spec)
            output_ids.extend(new_ids)
            text += delta
            timer.on_output(len(new_ids), out.queue_time)
            if finish is not None:
                outcome = finish.type
            yield GenerationChunk(
                rid=spec.rid,
                delta=delta,
                text=text,
                output_ids=list(output_ids),
                prompt_tokens=len(spec.input_ids),
                finish=finish,
                e2e_latency=time.perf_counter() - spec.arrival,
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
    return FinishReason("error", message=out.error or f"engine error ({out.finish_reason})")
