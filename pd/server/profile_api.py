"""SGLang's /start_profile and /stop_profile: torch.profiler traces of a running server's ranks (pd.engine.profiler).

``POST /start_profile`` (GET too, as SGLang) takes an optional JSON body with SGLang's fields:
    output_dir      where the traces go, created if missing (default: $SGLANG_TORCH_PROFILER_DIR, else /tmp)
    start_step      the engine step to start at, counted since start-up (default: the next step)
    num_steps       stop after this many steps and write the traces (default: at /stop_profile)
    activities      from "CPU" and "GPU" (default both; GPU events need a CUDA device)
    with_stack, record_shapes   torch.profiler's options (default true, as SGLang)
    profile_prefix  put before the profile id in the trace files' names
and answers "Start profiling." once every rank is armed. ``POST /stop_profile`` ends it and answers once each rank
has written ``{prefix-}{profile_id}-TP-{rank}-DP-{group}.trace.json.gz`` (``...-prefill-TP-...`` and ``-decode-``
on disaggregated instances), listing them. A profile
slows the host (CPU activity, stacks): measure with it off, profile to see where the time goes.
"""

from __future__ import annotations

import os
import time
from typing import Annotated, Any

from fastapi import APIRouter, Request, Response
from pydantic import Field

from pd.engine.profiler import ACTIVITIES
from pd.server.generation import ServerContext, get_context
from pd.server.protocol import ApiError, StrictModel, read_body

router = APIRouter()

# SGLang's variable for where the traces go when the request names no output_dir.
PROFILER_DIR_ENV = "SGLANG_TORCH_PROFILER_DIR"


class ProfileReqInput(StrictModel):
    output_dir: str | None = None
    start_step: Annotated[int, Field(ge=0)] | None = None
    num_steps: Annotated[int, Field(ge=1)] | None = None
    activities: list[str] | None = None
    with_stack: bool | None = None
    record_shapes: bool | None = None
    profile_prefix: str | None = None
    profile_by_stage: bool = False
    merge_profiles: bool = False


@router.api_route("/start_profile", methods=["GET", "POST"])
async def start_profile(request: Request) -> Response:
    ctx = get_context(request)
    raw = await request.body()
    body = await read_body(request, ProfileReqInput, ctx.logged_unknown_fields) if raw.strip() else ProfileReqInput()
    await _ask(ctx, "start", **profile_settings(body, os.environ))
    return Response("Start profiling.\n", media_type="text/plain")


@router.api_route("/stop_profile", methods=["GET", "POST"])
async def stop_profile(request: Request) -> Response:
    traces = [path for path in await _ask(get_context(request), "stop") if path]
    listed = "".join(f"{path}\n" for path in traces) if traces else "No step was recorded: no trace written.\n"
    return Response(f"Stop profiling. This will take some time.\n{listed}", media_type="text/plain")


def profile_settings(body: ProfileReqInput, env: Any) -> dict[str, Any]:
    """pd.engine.io.ProfileRequest's settings for ``body``; ApiError (400) for what this server does not do."""
    activities = ["CPU", "GPU"] if body.activities is None else body.activities
    unknown = [a for a in activities if a not in ACTIVITIES]
    if unknown or not activities:
        raise ApiError(f"activities: {unknown or activities!r} is not supported here; choose from "
                       f"{', '.join(ACTIVITIES)}")  # fmt: skip
    for name in ("profile_by_stage", "merge_profiles"):
        if getattr(body, name):
            raise ApiError(f"{name}: not supported by this server (each rank writes its own trace of every step)")
    prefix = body.profile_prefix or ""
    if os.sep in prefix or prefix in (".", ".."):
        raise ApiError(f"profile_prefix: {prefix!r} must be a file name prefix, not a path")
    output_dir = body.output_dir or env.get(PROFILER_DIR_ENV) or "/tmp"
    return {"output_dir": os.path.abspath(output_dir), "profile_id": f"{time.time():.6f}", "prefix": prefix,
            "start_step": body.start_step, "num_steps": body.num_steps, "activities": activities,
            "with_stack": body.with_stack is not False, "record_shapes": body.record_shapes is not False}  # fmt: skip


async def _ask(ctx: ServerContext, action: str, **settings: Any) -> list[str]:
    """Every leader's message for ``action``; ApiError (400) naming why when any of them refused."""
    replies = await ctx.engine.profile(action, **settings)
    refused = sorted({message for ok, message in replies if not ok})
    if refused:
        if action == "start" and any(ok for ok, _ in replies):  # the DP groups that did start stop: all or none
            await ctx.engine.profile("stop")
        raise ApiError("; ".join(refused))
    return [message for _, message in replies]
