"""SGLang's native routes: /generate, health, server/model info, abort, cache flush, metrics."""

from __future__ import annotations

import asyncio
import importlib.metadata
import json
import math
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any, TypeVar

import numpy as np
from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST

from pd.server.generation import (
    GenerationChunk,
    GenerationSpec,
    ServerContext,
    get_context,
    make_spec,
    stream_generation,
)
from pd.server.protocol import (
    AbortReqInput,
    ApiError,
    GenerateReqInput,
    SamplingParamsInput,
    error_body,
    read_body,
)
from pd.server.streaming import (
    close_after_answer,
    close_soon,
    error_type,
    gather_all,
    last_chunk,
    line_safe,
    raise_if_failed,
    run_unless_disconnected,
    sse,
    sse_response,
)

T = TypeVar("T")
# SGLang's default when sampling_params.max_new_tokens is absent.
DEFAULT_MAX_NEW_TOKENS = 128
HEALTH_GENERATE_TIMEOUT_S = 60.0

router = APIRouter()


@router.post("/generate")
async def generate(request: Request) -> Response:
    """SGLang's /generate: one prompt (or a batch, not streamed) in, text + output_ids + meta_info out."""
    ctx = get_context(request)
    body = await read_body(request, GenerateReqInput, ctx.logged_unknown_fields)
    specs, is_batch = await _specs(ctx, body, time.perf_counter())
    if body.stream:
        if is_batch:
            raise ApiError("stream=true is not supported for a batch; send one request per prompt")
        return await sse_response(request, stream_generation(ctx, specs[0]), lambda chunks: _events(ctx, chunks))
    generations = [stream_generation(ctx, s, every_token=False) for s in specs]
    try:
        finals = await run_unless_disconnected(request, gather_all([last_chunk(g, leave_open=True)
                                                                    for g in generations]))  # fmt: skip
        for final in finals:
            raise_if_failed(final)
    except BaseException:
        close_soon(generations)  # their engine requests aborted where they still run
        raise
    outputs = [_output(ctx, final) for final in finals]
    # the generations' endings (metrics, log lines) once the answer is out
    return JSONResponse(outputs if is_batch else outputs[0], background=close_after_answer(generations))


async def _specs(ctx: ServerContext, body: GenerateReqInput, arrival: float) -> tuple[list[GenerationSpec], bool]:
    if (body.text is None) == (body.input_ids is None):
        raise ApiError("give exactly one of text or input_ids")
    if body.text is not None:
        workers = ctx.tokenizer_workers
        if workers is None:
            raise ApiError("text input needs a tokenizer; send input_ids (the server runs with --skip-tokenizer-init)")
        is_batch = isinstance(body.text, list)
        texts = body.text if is_batch else [body.text]
        limit = ctx.engine.max_context_length
        prompts = await asyncio.gather(*(
            workers.encode(t, limit, what=f"text[{i}]" if is_batch else "text") for i, t in enumerate(texts)
        ))  # fmt: skip
    else:
        is_batch = isinstance(body.input_ids, list)  # of prompts, each an int64 array (GenerateReqInput)
        prompts = body.input_ids if is_batch else [body.input_ids]
    n = len(prompts)
    params = _per_item(body.sampling_params, n, is_batch, "sampling_params")
    rids = _per_item(body.rid, n, is_batch, "rid")
    hosts = _per_item(body.bootstrap_host, n, is_batch, "bootstrap_host")
    ports = _per_item(body.bootstrap_port, n, is_batch, "bootstrap_port")
    rooms = _per_item(body.bootstrap_room, n, is_batch, "bootstrap_room")
    if is_batch and body.rid is not None and len(set(rids)) != n:
        raise ApiError("rid values of a batch must be distinct")
    specs = []
    for i, ids in enumerate(prompts):
        where = f"[{i}]" if is_batch else ""
        if len(ids) == 0:
            raise ApiError(f"{'text' if body.text is not None else 'input_ids'}{where} is empty")
        sp = params[i] or SamplingParamsInput()
        specs.append(
            make_spec(
                ctx,
                rids[i] or uuid.uuid4().hex,
                ids if isinstance(ids, np.ndarray) else list(ids),
                max_new_tokens=sp.max_new_tokens,
                default_max_new_tokens=DEFAULT_MAX_NEW_TOKENS,
                max_tokens_name=f"sampling_params{where}.max_new_tokens",
                temperature=sp.temperature,  # None: the server's sampling defaults
                top_p=sp.top_p,
                top_k=sp.top_k,
                min_p=sp.min_p,
                seed=sp.seed if sp.seed is not None else sp.sampling_seed,
                stop=sp.stop,
                stop_token_ids=sp.stop_token_ids,
                ignore_eos=sp.ignore_eos,
                skip_special_tokens=sp.skip_special_tokens,
                no_stop_trim=sp.no_stop_trim,
                arrival=arrival,
                bootstrap=(hosts[i], ports[i], rooms[i]),
                stream_interval=sp.stream_interval,
            )
        )
    return specs, is_batch


def _per_item(value: T | list[T] | None, n: int, is_batch: bool, name: str) -> list[T | None]:
    """A field given once (applies to every prompt) or, for a batch, as a list with one value per prompt."""
    if isinstance(value, list):
        if not is_batch:
            raise ApiError(f"{name} is a list, but the request has a single prompt")
        if len(value) != n:
            raise ApiError(f"{name} has {len(value)} entries for a batch of {n} prompts")
        return list(value)
    if is_batch and value is not None and name in ("rid", "bootstrap_room"):
        raise ApiError(f"{name} of a batch must be a list with one distinct value per prompt")
    return [value] * n


def _output(ctx: ServerContext, chunk: GenerationChunk, meta_only: bool = False) -> dict[str, Any]:
    """SGLang's response object (cumulative text and output_ids); with meta_only, only its meta_info."""
    out: dict[str, Any] = {}
    if not meta_only:
        if ctx.tokenizer is not None:
            out["text"] = chunk.text
        out["output_ids"] = chunk.output_ids
    out["meta_info"] = {
        "id": chunk.rid,
        "finish_reason": None if chunk.finish is None else chunk.finish.to_sglang(),
        "prompt_tokens": chunk.prompt_tokens,
        "completion_tokens": chunk.completion_tokens,
        "cached_tokens": chunk.cached_tokens,
        "e2e_latency": chunk.e2e_latency,
    }
    return out


async def _events(ctx: ServerContext, chunks: AsyncIterator[GenerationChunk]) -> AsyncIterator[str]:
    encoder = CumulativeEvents(with_text=ctx.tokenizer is not None)
    async for chunk in chunks:
        if chunk.finish is not None and chunk.finish.type == "error":
            yield sse(error_body(f"generation failed: {chunk.finish.message}", chunk.finish.status,
                                 error_type(chunk.finish.status)))
            return
        yield encoder.event(ctx, chunk)


class CumulativeEvents:
    """The SSE events of one /generate stream, whose text and output_ids are cumulative (as SGLang's): the JSON
    of both so far is kept and extended by each chunk's new part, so an event costs what is new, not the whole
    length again (re-encoding 300 ids and their text is ~35 us, per token of every stream)."""

    def __init__(self, with_text: bool) -> None:
        self.with_text = with_text
        self.text_json = ""  # the JSON string body (escaped, unquoted) of the text so far
        self.text_len = 0
        self.ids_json = ""  # the ids so far, as JSON array items
        self.num_ids = 0
        self.rid: str | None = None
        self.rid_json = ""  # the rid as a JSON string (the same for every event of a stream)

    def event(self, ctx: ServerContext, chunk: GenerationChunk) -> str:
        extends = self.text_len + len(chunk.delta) == len(chunk.text) and len(chunk.output_ids) >= self.num_ids
        if not extends:  # not the previous chunk plus its delta (never from stream_generation): start over from it
            self.text_json, self.text_len, self.ids_json, self.num_ids = "", 0, "", 0
        new_text = chunk.delta if extends else chunk.text
        if new_text:
            self.text_json += line_safe(json.dumps(new_text, ensure_ascii=False)[1:-1])
            self.text_len += len(new_text)
        if len(chunk.output_ids) > self.num_ids:
            new = ", ".join(map(str, chunk.output_ids[self.num_ids :]))
            self.ids_json = f"{self.ids_json}, {new}" if self.ids_json else new
            self.num_ids = len(chunk.output_ids)
        meta = self._meta(chunk)
        text = f'"text": "{self.text_json}", ' if self.with_text else ""
        return f'data: {{{text}"output_ids": [{self.ids_json}], "meta_info": {meta}}}\n\n'

    def _meta(self, chunk: GenerationChunk) -> str:
        """json.dumps of _output's meta_info, written out: json.dumps of the dict was ~8% of the front's CPU at batch
        64 (the rid is encoded once per stream; only a finished chunk's finish_reason needs the encoder)."""
        if chunk.rid != self.rid:
            self.rid, self.rid_json = chunk.rid, line_safe(json.dumps(chunk.rid, ensure_ascii=False))
        finish = "null" if chunk.finish is None else line_safe(json.dumps(chunk.finish.to_sglang(), ensure_ascii=False))
        latency = float(chunk.e2e_latency)
        latency_json = repr(latency) if math.isfinite(latency) else json.dumps(latency)
        return (f'{{"id": {self.rid_json}, "finish_reason": {finish}, "prompt_tokens": {int(chunk.prompt_tokens)}, '
                f'"completion_tokens": {chunk.completion_tokens}, "cached_tokens": {int(chunk.cached_tokens)}, '
                f'"e2e_latency": {latency_json}}}')


@router.get("/health")
async def health(request: Request) -> Response:
    """200 while the engine process is up (the app only starts serving after the model has loaded) and, with
    several front processes, once all of them listen (connections made before go to this one alone)."""
    ctx = get_context(request)
    if not ctx.engine.is_alive:
        raise ApiError("the engine process is not running", 503, "service_unavailable")
    if ctx.fronts_listening is not None and not ctx.fronts_listening():
        raise ApiError("the other front processes are still starting", 503, "service_unavailable")
    return Response(status_code=200)


@router.get("/health_generate")
async def health_generate(request: Request) -> Response:
    """200 if the engine can generate one token now; 503 otherwise. A prefill or decode instance cannot
    generate alone (it needs its peer), so there it reports whether the engine is alive."""
    ctx = get_context(request)
    if ctx.server_args.disaggregation_mode != "null":
        if not ctx.engine.is_alive:
            raise ApiError("the engine process is not running", 503, "service_unavailable")
        return Response(status_code=200)
    spec = make_spec(
        ctx, f"health-{uuid.uuid4().hex}", [0], max_new_tokens=1, default_max_new_tokens=1,
        max_tokens_name="max_new_tokens", temperature=0.0, top_p=1.0, top_k=-1, min_p=0.0, seed=None, stop=(),
        stop_token_ids=None, ignore_eos=True, skip_special_tokens=True, no_stop_trim=False,
        arrival=time.perf_counter(),
    )  # fmt: skip
    try:
        final = await asyncio.wait_for(last_chunk(stream_generation(ctx, spec)), HEALTH_GENERATE_TIMEOUT_S)
    except asyncio.TimeoutError:
        raise ApiError(f"no token within {HEALTH_GENERATE_TIMEOUT_S:g} s", 503, "service_unavailable") from None
    if final.finish is None or final.finish.type in ("error", "abort") or not final.output_ids:
        reason = final.finish.message if final.finish is not None else "no finish"
        raise ApiError(f"health generation failed: {reason}", 503, "service_unavailable")
    return Response(status_code=200)


@router.get("/get_server_info")
@router.get("/server_info")
async def server_info(request: Request) -> dict[str, Any]:
    """The server arguments plus live engine state."""
    ctx = get_context(request)
    stats = ctx.engine.stats()
    live = {
        "num_running": stats.num_running,
        "num_waiting": stats.num_waiting,
        "kv_pages_total": int(stats.kv_pages_total),
        "kv_pages_free": int(stats.kv_pages_free),  # pages no running or queued request holds
        "kv_pages_cached": int(stats.kv_pages_cached),  # of those, pages holding a cached prefix
        "page_size": stats.page_size,
        "max_total_num_tokens": stats.kv_pages_total * stats.page_size,
        "generated_tokens_total": stats.generated_tokens_total,
        "prompt_tokens_total": stats.prompt_tokens_total,
        "cached_tokens_total": stats.cached_tokens_total,
        "kv_pages_sent_total": stats.kv_pages_sent_total,  # prefill: KV pages written to decode instances
        "eplb_rebalances": stats.eplb_rebalances,
        "eplb_balancedness": stats.eplb_balancedness,
        "kv_heads_per_rank": stats.kv_heads_per_rank,  # KV capacity of each rank (KV heads are sharded over TP)
        "kv_bytes_per_rank": stats.kv_bytes_per_rank,
    }
    return {
        **ctx.server_args.to_json_dict(),
        **live,
        "max_context_length": ctx.engine.max_context_length,
        "internal_states": [live],
        "version": _version(),
    }


@router.get("/get_model_info")
@router.get("/model_info")
async def model_info(request: Request) -> dict[str, Any]:
    ctx = get_context(request)
    cfg = ctx.engine.model_config
    return {
        "model_path": ctx.server_args.model_path,
        "tokenizer_path": ctx.server_args.tokenizer_path,
        "served_model_name": ctx.server_args.served_model_name,
        "is_generation": True,
        "model_type": cfg.get("model_type"),
        "architectures": cfg.get("architectures"),
        "vocab_size": ctx.vocab_size,
        "max_context_length": ctx.engine.max_context_length,
        "preferred_sampling_params": None,
        "weight_version": "default",
    }


@router.post("/abort_request")
async def abort_request(request: Request) -> Response:
    """Abort one request by rid, or every in-flight request with abort_all; the aborted requests end with
    finish_reason abort. Unknown rids are ignored (the request may have just finished)."""
    body = await read_body(request, AbortReqInput)
    ctx = get_context(request)
    if body.abort_all:
        await ctx.engine.abort_all()
    elif body.rid:
        await ctx.engine.abort(body.rid)
    else:
        raise ApiError("give rid, or abort_all=true")
    return Response(status_code=200)


@router.post("/flush_cache")
async def flush_cache(request: Request) -> Response:
    """SGLang's /flush_cache: drops every cached prefix page no request holds (running requests keep theirs).
    Answers at once; kv_pages_cached in /get_server_info drops when the engine has done it."""
    await get_context(request).engine.flush_cache()
    return Response("Cache flushed.\n", status_code=200, media_type="text/plain")


@router.get("/metrics")
async def metrics(request: Request) -> Response:
    ctx = get_context(request)
    return Response(ctx.metrics.render(ctx.engine.stats()), media_type=CONTENT_TYPE_LATEST)


def _version() -> str:
    try:
        return importlib.metadata.version("pd-serve")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"
