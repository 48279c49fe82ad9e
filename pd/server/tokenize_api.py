"""SGLang's /tokenize and /detokenize (also under /v1/): the server's own tokenizer, for clients that count prompt
tokens or build prompts from ids exactly as this server does.

``POST /tokenize`` {"prompt": text or [texts], "add_special_tokens": true} -> {"tokens": ids or [ids],
"count": n or [n], "max_model_len": the context length}; ``POST /detokenize`` {"tokens": ids or [ids],
"skip_special_tokens": true} -> {"text": text or [texts]}. The work runs on the tokenizer threads, off the event
loop (pd.server.tokenization). A server started with --skip-tokenizer-init has no tokenizer: 400.
"""

from __future__ import annotations

import sys
from typing import Any, TypeVar

from fastapi import APIRouter, Request

from pd.server.generation import ServerContext, get_context
from pd.server.protocol import ApiError, StrictModel, read_body
from pd.server.tokenization import TokenizerWorkers

router = APIRouter()
M = TypeVar("M", bound=StrictModel)


class TokenizeReqInput(StrictModel):
    model: str | None = None
    prompt: str | list[str]
    add_special_tokens: bool = True


class DetokenizeReqInput(StrictModel):
    model: str | None = None
    tokens: list[int] | list[list[int]]
    skip_special_tokens: bool = True


@router.post("/tokenize")
@router.post("/v1/tokenize")
async def tokenize(request: Request) -> dict[str, Any]:
    ctx, body, workers = await _read(request, TokenizeReqInput)
    texts = [body.prompt] if isinstance(body.prompt, str) else body.prompt
    # No length limit: counting a prompt longer than the context is what a client may ask this for (the body's own
    # size limit bounds the work).
    ids = [await workers.encode(t, sys.maxsize, add_special_tokens=body.add_special_tokens) for t in texts]
    if isinstance(body.prompt, str):
        return {"tokens": ids[0], "count": len(ids[0]), "max_model_len": ctx.engine.max_context_length}
    return {"tokens": ids, "count": [len(i) for i in ids], "max_model_len": ctx.engine.max_context_length}


@router.post("/detokenize")
@router.post("/v1/detokenize")
async def detokenize(request: Request) -> dict[str, Any]:
    ctx, body, workers = await _read(request, DetokenizeReqInput)
    single = not body.tokens or isinstance(body.tokens[0], int)
    rows: list[list[int]] = [body.tokens] if single else body.tokens  # type: ignore[list-item]
    bound = max(len(workers.tokenizer), int(ctx.engine.model_config.get("vocab_size") or 0))
    for row in rows:
        bad = next((t for t in row if not 0 <= t < bound), None)
        if bad is not None:
            raise ApiError(f"tokens: {bad} is not a token id of this model (0 <= id < {bound})")
    texts = await workers.run(workers.tokenizer.batch_decode, rows, skip_special_tokens=body.skip_special_tokens)
    return {"text": texts[0] if single else list(texts)}


async def _read(request: Request, model: type[M]) -> tuple[ServerContext, M, TokenizerWorkers]:
    """The server's context, the request's body as ``model``, and the tokenizer's workers (400 without them)."""
    ctx = get_context(request)
    body = await read_body(request, model, ctx.logged_unknown_fields)
    if ctx.tokenizer_workers is None:
        raise ApiError("this server was started with --skip-tokenizer-init: it has no tokenizer; send and read "
                       "token ids instead")  # fmt: skip
    return ctx, body, ctx.tokenizer_workers
