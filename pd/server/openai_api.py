"""OpenAI-compatible routes: /v1/completions, /v1/chat/completions, /v1/models."""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse

from pd.server.generation import GenerationChunk, GenerationSpec, ServerContext, get_context, make_spec
from pd.server.generation import stream_generation as run
from pd.server.protocol import (
    ApiError,
    ChatCompletionRequest,
    CompletionRequest,
    OpenAIRequestBase,
    error_body,
    read_body,
)
from pd.server.streaming import error_type, last_chunk, raise_if_failed, run_unless_disconnected, sse, sse_response
from pd.server.tokenization import TokenizerWorkers

# Used when the tokenizer has no chat template of its own.
CHATML_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

router = APIRouter()


@router.get("/v1/models")
async def list_models(request: Request) -> dict[str, Any]:
    ctx = get_context(request)
    return {"object": "list", "data": [_model_card(ctx)]}


@router.get("/v1/models/{model_id:path}")
async def get_model(model_id: str, request: Request) -> dict[str, Any]:
    ctx = get_context(request)
    if model_id not in _accepted_names(ctx):
        raise ApiError(f"model {model_id!r} is not served here", 404, "not_found_error")
    return _model_card(ctx)


@router.post("/v1/completions")
async def completions(request: Request) -> Response:
    ctx = get_context(request)
    body = await read_body(request, CompletionRequest, ctx.logged_unknown_fields)
    arrival = time.perf_counter()
    _check_model(ctx, body.model)
    prompt = body.prompt
    if isinstance(prompt, list) and prompt and not isinstance(prompt[0], int):
        if len(prompt) != 1:
            raise ApiError(f"prompt has {len(prompt)} entries; this server takes one prompt per request")
        prompt = prompt[0]
    if isinstance(prompt, str):
        input_ids = await _workers(ctx, "a text prompt").encode(prompt, ctx.engine.max_context_length)
    else:
        input_ids = list(prompt)
    spec = _spec(ctx, body, input_ids, body.max_tokens, "max_tokens", arrival)
    created = int(time.time())
    if body.stream:
        return await sse_response(request, run(ctx, spec), lambda c: _completion_events(ctx, body, created, c))
    final = await run_unless_disconnected(request, last_chunk(run(ctx, spec, every_token=False)))
    raise_if_failed(final)
    choice = {"index": 0, "text": final.text, "logprobs": None, **_finish_fields(final)}
    return JSONResponse(_envelope(ctx, final, "text_completion", created, [choice], usage=_usage(final)))


@router.post("/v1/chat/completions")
async def chat_completions(request: Request) -> Response:
    ctx = get_context(request)
    body = await read_body(request, ChatCompletionRequest, ctx.logged_unknown_fields)
    arrival = time.perf_counter()
    _check_model(ctx, body.model)
    workers = _workers(ctx, "chat")
    tokenizer = workers.tokenizer
    messages = [{**m.model_dump(exclude_none=True), "content": m.content or ""} for m in body.messages]
    try:
        prompt = await workers.run(
            tokenizer.apply_chat_template,
            messages,
            tokenize=False,
            add_generation_prompt=not body.continue_final_message,
            continue_final_message=body.continue_final_message,
            chat_template=None if tokenizer.chat_template else CHATML_TEMPLATE,
            **(body.chat_template_kwargs or {}),
        )
    except Exception as e:  # jinja errors raised by the template (e.g. roles must alternate)
        raise ApiError(f"the chat template rejected the messages: {e}") from None
    # The template already holds every special token the model expects (BOS included).
    input_ids = await workers.encode(prompt, ctx.engine.max_context_length, add_special_tokens=False,
                                     what="the prompt the chat template made of the messages")
    max_tokens, name = body.max_completion_tokens, "max_completion_tokens"
    if max_tokens is None:
        max_tokens, name = body.max_tokens, "max_tokens"
    spec = _spec(ctx, body, input_ids, max_tokens, name, arrival)
    created = int(time.time())
    if body.stream:
        return await sse_response(request, run(ctx, spec), lambda c: _chat_events(ctx, body, created, c))
    final = await run_unless_disconnected(request, last_chunk(run(ctx, spec, every_token=False)))
    raise_if_failed(final)
    choice = {
        "index": 0,
        "message": {"role": "assistant", "content": final.text},
        "logprobs": None,
        **_finish_fields(final),
    }
    return JSONResponse(_envelope(ctx, final, "chat.completion", created, [choice], usage=_usage(final)))


# ---- request side ----
def _accepted_names(ctx: ServerContext) -> set[str]:
    args = ctx.server_args
    return {n for n in (args.served_model_name, args.model_path) if n}


def _check_model(ctx: ServerContext, model: str | None) -> None:
    """A missing/null model means the served one; any other name that is not ours is an error."""
    if model is not None and model not in _accepted_names(ctx):
        raise ApiError(f"model {model!r} is not served here; this server serves {ctx.server_args.served_model_name!r}")


def _workers(ctx: ServerContext, what: str) -> TokenizerWorkers:
    if ctx.tokenizer_workers is None:
        raise ApiError(f"{what} needs a tokenizer, and this server runs with --skip-tokenizer-init")
    return ctx.tokenizer_workers


def _spec(
    ctx: ServerContext, body: OpenAIRequestBase, input_ids: list[int], max_tokens: int | None, name: str, arrival: float
) -> GenerationSpec:
    if not input_ids:
        raise ApiError("the prompt is empty")
    return make_spec(
        ctx,
        body.rid or uuid.uuid4().hex,
        input_ids,
        max_new_tokens=max_tokens,
        default_max_new_tokens=None,  # null max_tokens: up to the context length, as OpenAI does
        max_tokens_name=name,
        temperature=body.temperature,  # None: the server's sampling defaults
        top_p=body.top_p,
        top_k=body.top_k,
        min_p=body.min_p,
        seed=body.seed,
        stop=body.stop,
        stop_token_ids=body.stop_token_ids,
        ignore_eos=body.ignore_eos,
        skip_special_tokens=body.skip_special_tokens,
        no_stop_trim=body.no_stop_trim,
        arrival=arrival,
        bootstrap=(body.bootstrap_host, body.bootstrap_port, body.bootstrap_room),
    )


# ---- response side ----
def _model_card(ctx: ServerContext) -> dict[str, Any]:
    return {
        "id": ctx.server_args.served_model_name,
        "object": "model",
        "created": int(ctx.started_at),
        "owned_by": "pd",
        "root": ctx.server_args.model_path,
        "max_model_len": ctx.engine.max_context_length,
    }


def _finish_fields(chunk: GenerationChunk) -> dict[str, Any]:
    """finish_reason ("stop" | "length" | "abort" | None) and SGLang's matched_stop."""
    if chunk.finish is None:
        return {"finish_reason": None, "matched_stop": None}
    return {"finish_reason": chunk.finish.type, "matched_stop": chunk.finish.matched}


def _usage(chunk: GenerationChunk) -> dict[str, Any]:
    """OpenAI's usage; prompt_tokens_details (optional in OpenAI's schema) only when the prefix cache served part
    of the prompt."""
    usage: dict[str, Any] = {
        "prompt_tokens": chunk.prompt_tokens,
        "completion_tokens": chunk.completion_tokens,
        "total_tokens": chunk.prompt_tokens + chunk.completion_tokens,
    }
    if chunk.cached_tokens:
        usage["prompt_tokens_details"] = {"cached_tokens": chunk.cached_tokens}
    return usage


def _envelope(
    ctx: ServerContext, chunk: GenerationChunk, obj: str, created: int, choices: list[dict[str, Any]], **extra: Any
) -> dict[str, Any]:
    return {
        "id": chunk.rid,
        "object": obj,
        "created": created,
        "model": ctx.server_args.served_model_name,
        "choices": choices,
        **extra,
    }


def _stream_usage(body: OpenAIRequestBase) -> tuple[bool, bool]:
    """(usage chunk at the end, usage on every chunk)."""
    opts = body.stream_options
    return (opts is not None and opts.include_usage, opts is not None and opts.continuous_usage_stats)


async def _completion_events(
    ctx: ServerContext, body: CompletionRequest, created: int, chunks: AsyncIterator[GenerationChunk]
) -> AsyncIterator[str]:
    include_usage, continuous = _stream_usage(body)
    async for chunk in chunks:
        if chunk.finish is not None and chunk.finish.type == "error":
            yield sse(error_body(f"generation failed: {chunk.finish.message}", chunk.finish.status,
                                 error_type(chunk.finish.status)))
            return
        if chunk.delta or chunk.finish is not None:
            choice = {"index": 0, "text": chunk.delta, "logprobs": None, **_finish_fields(chunk)}
            usage = {"usage": _usage(chunk) if continuous else None} if include_usage or continuous else {}
            yield sse(_envelope(ctx, chunk, "text_completion", created, [choice], **usage))
        if chunk.finish is not None and include_usage:
            yield sse(_envelope(ctx, chunk, "text_completion", created, [], usage=_usage(chunk)))


async def _chat_events(
    ctx: ServerContext, body: ChatCompletionRequest, created: int, chunks: AsyncIterator[GenerationChunk]
) -> AsyncIterator[str]:
    include_usage, continuous = _stream_usage(body)
    first = True
    async for chunk in chunks:
        if chunk.finish is not None and chunk.finish.type == "error":
            yield sse(error_body(f"generation failed: {chunk.finish.message}", chunk.finish.status,
                                 error_type(chunk.finish.status)))
            return
        usage = {"usage": _usage(chunk) if continuous else None} if include_usage or continuous else {}
        if first:
            # OpenAI streams open with the role, content empty.
            role = {"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None}
            yield sse(_envelope(ctx, chunk, "chat.completion.chunk", created, [role], **usage))
            first = False
        if chunk.delta or chunk.finish is not None:
            delta = {"content": chunk.delta} if chunk.delta else {}
            choice = {"index": 0, "delta": delta, "logprobs": None, **_finish_fields(chunk)}
            yield sse(_envelope(ctx, chunk, "chat.completion.chunk", created, [choice], **usage))
        if chunk.finish is not None and include_usage:
            yield sse(_envelope(ctx, chunk, "chat.completion.chunk", created, [], usage=_usage(chunk)))
