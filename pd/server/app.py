"""The HTTP front of `pd serve`: the FastAPI app (`create_app`) and the process entry point (`run_server`).

The app is built around an engine client that is already started, so tests can hand it a fake one and drive
it without a socket. Every failure a client can cause answers with OpenAI's error shape
{"error": {"message", "type", "code"}}: 400 for a bad request (FastAPI's 422 included), 401 without the API
key, 413 for a body larger than the context could need (pd.server.body_limit), 503 when the engine queue is full
or the engine process is gone. Tokenization runs on worker threads (pd.server.tokenization), so the event loop
keeps answering while a long prompt is tokenized.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import socket
import sys
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import uvicorn
from fastapi import FastAPI, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect
from starlette.routing import Route

from pd.dist.launch import SWITCH_INTERVAL_S, LeaderLink
from pd.engine.client import EngineDeadError, EngineFullError
from pd.engine.spec import EngineSpec
from pd.gc_pause import freeze_startup_objects
from pd.server import native_api, openai_api, profile_api, tokenize_api
from pd.server.auth import ApiKeyMiddleware
from pd.server.body_limit import BodyLimitMiddleware, max_body_bytes
from pd.server.front_workers import FrontWorkers, listen_socket
from pd.server.generation import EngineClientLike, ServerContext
from pd.server.metrics import share_across_processes
from pd.server.protocol import ApiError, describe_validation_errors, error_body
from pd.server.streaming import ClientDisconnected
from pd.server_args import ServerArgs

logger = logging.getLogger(__name__)

# On shutdown, uvicorn waits this long for in-flight requests before cancelling them (whose cleanup aborts
# their engine requests).
GRACEFUL_SHUTDOWN_S = 5
# Requests still running this long before that timeout are aborted, so they end cleanly.
ABORT_MARGIN_S = 1
# Then how long aborted requests get to end before the engine is closed under them.
SHUTDOWN_DRAIN_S = 5
# How long the other front processes get to drain and exit (their own graceful shutdown) before being killed.
WORKER_STOP_S = GRACEFUL_SHUTDOWN_S + SHUTDOWN_DRAIN_S + 5
# Status nginx uses for "client closed the request"; nobody reads it, it only shows in logs.
CLIENT_CLOSED_STATUS = 499


def create_app(
    engine_client: EngineClientLike, tokenizer: Any | None, server_args: ServerArgs, *, owns_engine: bool = False,
    workers: FrontWorkers | None = None,
) -> FastAPI:  # fmt: skip
    """The FastAPI app serving `engine_client` (already started).

    tokenizer: a Hugging Face tokenizer, or None for token-ids-only serving (--skip-tokenizer-init).
    owns_engine: close the engine client when the app shuts down (run_server's case).
    workers: the other front processes (--tokenizer-worker-num), stopped before the engine is closed.
    """
    ctx = ServerContext(engine_client, tokenizer, server_args)
    if workers is not None:
        ctx.fronts_listening = workers.all_listening.is_set

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        yield
        if owns_engine:
            await _abort_in_flight(ctx)
            if workers is not None:  # they drain their own requests on the engine still running
                await asyncio.get_running_loop().run_in_executor(None, workers.join, WORKER_STOP_S)
            await _close_engine(app)
        if ctx.tokenizer_workers is not None:
            ctx.tokenizer_workers.close()

    app = FastAPI(title="pd", lifespan=lifespan)
    app.state.ctx = ctx
    app.state.engine_closed = False
    app.include_router(native_api.router)
    app.include_router(openai_api.router)
    # The generation routes also as plain Starlette routes, ahead of FastAPI's (which stay for the OpenAPI schema):
    # their handlers read their own bodies and return a Response, and FastAPI's per-request dependency solving and
    # wrapping cost ~50 us a request (of ~270 us in the app for /generate) on a 2-core CPU host.
    for i, (path, handler) in enumerate((("/generate", native_api.generate),
                                         ("/v1/completions", openai_api.completions),
                                         ("/v1/chat/completions", openai_api.chat_completions))):  # fmt: skip
        app.router.routes.insert(i, Route(path, handler, methods=["POST"]))
    app.include_router(profile_api.router)
    app.include_router(tokenize_api.router)
    _add_error_handlers(app)
    context_length = engine_client.max_context_length
    app.add_middleware(BodyLimitMiddleware, max_bytes=max_body_bytes(context_length), context_length=context_length)
    if server_args.api_key:  # added last, so it runs first: no key, no 413 either
        app.add_middleware(ApiKeyMiddleware, api_key=server_args.api_key)
    return app


async def _abort_in_flight(ctx: ServerContext) -> None:
    """Abort what is still running at shutdown and let those requests end (finish_reason abort) while the
    engine can still hear their aborts."""
    for rid in list(ctx.inflight):
        await ctx.engine.abort(rid)
    deadline = time.monotonic() + SHUTDOWN_DRAIN_S
    while ctx.inflight and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    if ctx.inflight:
        logger.warning("%d requests still in flight at shutdown", len(ctx.inflight))


async def _close_engine(app: FastAPI) -> None:
    if not app.state.engine_closed:
        app.state.engine_closed = True
        await app.state.ctx.engine.close()


def _error(message: str, status: int, err_type: str) -> JSONResponse:
    return JSONResponse(error_body(message, status, err_type), status_code=status)


def _add_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(RequestValidationError)
    async def on_validation(request: Request, exc: RequestValidationError) -> Response:
        message = describe_validation_errors(exc.errors())
        logger.info("400 %s %s: %s", request.method, request.url.path, message)
        return _error(message, 400, "invalid_request_error")

    @app.exception_handler(ApiError)
    async def on_api_error(request: Request, exc: ApiError) -> Response:
        logger.info("%d %s %s: %s", exc.status, request.method, request.url.path, exc.message)
        return _error(exc.message, exc.status, exc.err_type)

    @app.exception_handler(EngineFullError)
    async def on_engine_full(request: Request, exc: Exception) -> Response:
        message = f"the server is at capacity, retry later ({exc})"
        logger.warning("503 %s %s: %s", request.method, request.url.path, message)
        return _error(message, 503, "service_unavailable")

    @app.exception_handler(EngineDeadError)
    async def on_engine_dead(request: Request, exc: Exception) -> Response:
        logger.error("503 %s %s: %s", request.method, request.url.path, exc)
        return _error(f"the engine is not running: {exc}", 503, "service_unavailable")

    @app.exception_handler(ClientDisconnected)
    @app.exception_handler(ClientDisconnect)  # gone while its body was being read: not an internal error
    async def on_disconnect(request: Request, exc: Exception) -> Response:
        return Response(status_code=CLIENT_CLOSED_STATUS)

    @app.exception_handler(StarletteHTTPException)
    async def on_http_error(request: Request, exc: StarletteHTTPException) -> Response:
        err_type = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        return _error(f"{exc.detail}: {request.method} {request.url.path}", exc.status_code, err_type)

    @app.exception_handler(Exception)
    async def on_internal_error(request: Request, exc: Exception) -> Response:
        logger.exception("500 %s %s", request.method, request.url.path)
        return _error(f"internal error: {type(exc).__name__}: {exc}", 500, "internal_error")


def load_tokenizer(path: str) -> Any:
    """The Hugging Face tokenizer in `path` (a checkpoint directory or a hub id)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path)


def run_server(server_args: ServerArgs, spec: EngineSpec) -> None:
    """Serve the instance ``spec`` describes (built by the launcher from ``server_args``, its model resolved) until
    SIGINT/SIGTERM: start the engine, run uvicorn on --host/--port; shutdown drains requests for up to
    GRACEFUL_SHUTDOWN_S and closes the engine."""
    _run(_serve(server_args, spec))


def run_front_worker(server_args: ServerArgs, spec: EngineSpec, links: list[LeaderLink], index: int,
                     on_listening: Callable[[], None], fronts_listening: Callable[[], bool]) -> None:  # fmt: skip
    """A front process beyond the first (pd.server.front_workers): the same app on the same port, on its own pipes
    to the engine's leaders, until SIGINT/SIGTERM; ``on_listening`` runs once it listens, and its health answers
    503 until ``fronts_listening()`` (every front listens)."""
    _run(_serve_worker(server_args, spec, links, index, on_listening, fronts_listening))


def _run(main: Any) -> None:
    sys.setswitchinterval(SWITCH_INTERVAL_S)  # the engine's outputs reach the reader thread while the loop is busy
    try:
        if hasattr(asyncio, "Runner"):  # Python 3.11+
            with asyncio.Runner(loop_factory=_fast_loop_factory()) as runner:
                runner.run(main)
        else:
            asyncio.run(main)
    except KeyboardInterrupt:
        pass


def _fast_loop_factory() -> Any:
    """uvloop's event loop where it is installed (uvicorn picks it only when it creates the loop itself, and here
    the engine starts first): less of the front's CPU per streamed event (47.0 against 50.7 us per token at batch
    64 on a 2-core machine, benchmarks/results/front_cpu.json), which bounds decode at large batches. None
    (asyncio's own loop) otherwise."""
    try:
        import uvloop
    except ImportError:
        return None
    return uvloop.new_event_loop


async def _serve(args: ServerArgs, spec: EngineSpec) -> None:
    from pd.engine.client import EngineClient

    assert args.model_path is not None
    tokenizer = None if args.skip_tokenizer_init else load_tokenizer(args.tokenizer_path or args.model_path)
    engine = EngineClient(args, spec)
    workers: FrontWorkers | None = None
    if args.tokenizer_worker_num > 1:
        share_across_processes()  # before the app's metrics exist, and inherited by the other front processes

    def start_workers(links: list[list[LeaderLink]]) -> None:
        # Right after the ranks: the other front processes start (seconds: interpreter, imports, tokenizer) while
        # the model loads, and serve as soon as it is ready.
        nonlocal workers
        if links:
            workers = FrontWorkers.start(args, spec, links, _stop_server)

    try:
        await engine.start(on_spawned=start_workers)
    except BaseException:
        if workers is not None:
            workers.join(WORKER_STOP_S)
        await engine.close()
        raise
    app = create_app(engine, tokenizer, args, owns_engine=True, workers=workers)
    server = _Server(_uvicorn_config(app, args), app.state.ctx, workers)
    announce = asyncio.create_task(_announce_when_up(server, args, workers))
    try:
        await server.serve(sockets=[listen_socket(args.host, args.port)] if workers is not None else None)
    finally:
        announce.cancel()
        # Normally closed by the app's shutdown; this covers uvicorn failing before its lifespan ran.
        if workers is not None:
            await asyncio.get_running_loop().run_in_executor(None, workers.join, WORKER_STOP_S)
        await _close_engine(app)


def _stop_server(reason: str) -> None:
    """A front process is gone: the server cannot go on without it (its port share would refuse connections)."""
    logger.error("%s; stopping the server", reason)
    os.kill(os.getpid(), signal.SIGTERM)


async def _serve_worker(args: ServerArgs, spec: EngineSpec, links: list[LeaderLink], index: int,
                        on_listening: Callable[[], None], fronts_listening: Callable[[], bool]) -> None:  # fmt: skip
    from pd.engine.client import EngineClient

    assert args.model_path is not None
    tokenizer = None if args.skip_tokenizer_init else load_tokenizer(args.tokenizer_path or args.model_path)
    engine = EngineClient(args, spec, links=links)
    try:
        await engine.start()
    except BaseException:
        await engine.close()
        raise
    app = create_app(engine, tokenizer, args, owns_engine=True)
    app.state.ctx.fronts_listening = fronts_listening
    server = _Server(_uvicorn_config(app, args), app.state.ctx)
    freeze_startup_objects(f"front {index}")
    listening = asyncio.create_task(_until(lambda: server.started, then=on_listening))
    try:
        await server.serve(sockets=[listen_socket(args.host, args.port)])
    finally:
        listening.cancel()
        await _close_engine(app)


async def _until(ready: Callable[[], bool], then: Callable[[], None] = lambda: None) -> None:
    """Polls ``ready`` (uvicorn's started flag, the other fronts' listening) every 50 ms; then ``then()``."""
    while not ready():
        await asyncio.sleep(0.05)
    then()


def _uvicorn_config(app: FastAPI, args: ServerArgs) -> uvicorn.Config:
    return uvicorn.Config(
        app,
        host=args.host,
        port=args.port,
        log_level=args.log_level,
        log_config=None,  # keep the process's logging setup
        access_log=False,  # each finished request is logged once by the front
        timeout_graceful_shutdown=GRACEFUL_SHUTDOWN_S,
    )


class _Server(uvicorn.Server):
    """uvicorn's server, plus: requests still running shortly before the graceful-shutdown timeout are aborted,
    so their clients get a proper end (finish_reason abort) instead of a cut connection."""

    def __init__(self, config: uvicorn.Config, ctx: ServerContext, workers: FrontWorkers | None = None) -> None:
        super().__init__(config)
        self._ctx, self._workers = ctx, workers

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        if self._workers is not None:  # the other front processes drain their requests meanwhile
            self._workers.terminate()

        async def abort_late() -> None:
            await asyncio.sleep(max(GRACEFUL_SHUTDOWN_S - ABORT_MARGIN_S, 0))
            await _abort_in_flight(self._ctx)

        task = asyncio.create_task(abort_late())
        try:
            await super().shutdown(sockets=sockets)
        finally:
            task.cancel()


async def _announce_when_up(server: Any, args: ServerArgs, workers: FrontWorkers | None) -> None:
    await _until(lambda: server.started and (workers is None or workers.listening.is_set()))
    if workers is not None:
        workers.all_listening.set()  # every front's health says 200 from now on
    freeze_startup_objects("front")
    logger.info("serving %s (%s) at %s", args.served_model_name, args.model_path, args.url)
    if _fast_loop_factory() is None:  # a declared dependency, so missing only from a hand-made environment
        logger.warning("uvloop is not installed: the front runs asyncio's own event loop, more CPU per streamed "
                       "token, which bounds decode throughput at large batches (pip install uvloop)")
