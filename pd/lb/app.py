"""The HTTP front of `pd lb`: the FastAPI app (`create_app`) and the process entry point (`run_lb`).

Generation routes are plain Starlette routes (no FastAPI parameter machinery on the hot path) handled by the
`Forwarder`; the rest are small admin and probe routes. One httpx client, created when the app starts, carries
every upstream call. Errors answer with OpenAI's error shape {"error": {"message", "type", "code"}}.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import httpx
import uvicorn
from fastapi import FastAPI, Request, Response
from fastapi.responses import JSONResponse

from pd.lb.args import DEFAULT_BOOTSTRAP_PORT, LBArgs, LBArgsError, normalize_url, parse_bootstrap_port
from pd.lb.metrics import LBMetrics
from pd.lb.proxy import Forwarder, LBError
from pd.lb.workers import ROLES, HealthChecker, WorkerError, WorkerRegistry
from pd.server.auth import ApiKeyMiddleware

logger = logging.getLogger(__name__)

GENERATE_ROUTES = ("/generate", "/v1/completions", "/v1/chat/completions")
# A refused or unroutable connection fails fast, so a dead instance costs a retry, not a long wait.
CONNECT_TIMEOUT_S = 5.0
# Two upstream connections per request in flight; the instances bound their own concurrency.
MAX_CONNECTIONS = 8192
MAX_KEEPALIVE = 1024


def make_client(args: LBArgs) -> httpx.AsyncClient:
    """The one upstream client: pooled keep-alive connections, identity encoding (streams pass through as
    bytes), read timeout = --request-timeout, and no HTTP_PROXY from the environment (worker traffic is internal;
    a proxy meant for the outside world must not capture it)."""
    timeout = httpx.Timeout(args.request_timeout, connect=min(CONNECT_TIMEOUT_S, args.request_timeout))
    limits = httpx.Limits(max_connections=MAX_CONNECTIONS, max_keepalive_connections=MAX_KEEPALIVE)
    headers = {"accept-encoding": "identity"}
    return httpx.AsyncClient(timeout=timeout, limits=limits, headers=headers, trust_env=False)


def create_app(args: LBArgs) -> FastAPI:
    """The balancer app for `args`. The upstream client and the health checker start with the app (lifespan):
    one health-check round runs before it serves, so instances already up are in rotation at once."""
    registry = WorkerRegistry(args)
    metrics = LBMetrics()
    lb_headers = {"authorization": f"Bearer {args.api_key}"} if args.api_key else {}

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        client = make_client(args)
        app.state.forwarder = Forwarder(registry, client, args, metrics)
        app.state.checker = checker = HealthChecker(registry, client, args, lb_headers)
        await checker.check_all()
        task = asyncio.create_task(checker.run())
        try:
            yield
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            await client.aclose()

    app = FastAPI(title="pd lb", lifespan=lifespan)
    app.state.registry = registry

    for route in GENERATE_ROUTES:
        app.add_route(route, _generate_endpoint(route), methods=["POST"])

    @app.exception_handler(LBError)
    async def lb_error(request: Request, e: LBError) -> Response:
        return e.response()

    @app.get("/health")
    async def health() -> Response:
        n_p, n_d = len(registry.healthy("prefill")), len(registry.healthy("decode"))
        if n_p and n_d:
            return Response(status_code=200)
        raise LBError(
            f"not ready: {n_p} healthy prefill and {n_d} healthy decode instances", 503, "service_unavailable"
        )

    @app.get("/health_generate")
    async def health_generate(request: Request) -> Response:
        """GET /health_generate on every healthy instance; 200 if a prefill and a decode instance pass."""
        workers = registry.healthy("prefill") + registry.healthy("decode")
        client = request.app.state.forwarder.client
        results = await asyncio.gather(*(_get(client, w.url + "/health_generate", lb_headers) for w in workers))
        passed = {w.role for w, r in zip(workers, results, strict=True) if r == 200}
        body = {"workers": {w.url: r for w, r in zip(workers, results, strict=True)}}
        return JSONResponse(body, status_code=200 if passed == set(ROLES) else 503)

    @app.get("/v1/models")
    @app.get("/get_model_info")
    @app.get("/model_info")
    async def from_decode(request: Request) -> Response:
        """Asked of a healthy decode instance (the one whose answers clients get)."""
        client = request.app.state.forwarder.client
        auth = {"authorization": a} if (a := request.headers.get("authorization")) else lb_headers
        for worker in registry.healthy("decode"):
            try:
                resp = await client.get(worker.url + request.url.path, headers=auth)
            except httpx.HTTPError as e:
                logger.warning("GET %s on %s failed: %s", request.url.path, worker.url, e)
                continue
            return Response(resp.content, resp.status_code, media_type=resp.headers.get("content-type"))
        raise LBError("no healthy decode instance to ask", 503, "service_unavailable")

    @app.get("/get_server_info")
    async def server_info() -> dict[str, Any]:
        return {
            "lb": {
                "prefill_policy": args.prefill_policy,
                "decode_policy": args.decode_policy,
                "health_check_interval": args.health_check_interval,
                "health_failure_threshold": args.health_failure_threshold,
                "request_timeout": args.request_timeout,
            },
            **_workers_json(registry),
        }

    @app.get("/list_workers")
    async def list_workers() -> dict[str, Any]:
        return {"urls": [w.url for w in registry.all()], **_workers_json(registry)}

    @app.get("/metrics")
    async def prometheus() -> Response:
        return Response(metrics.render(registry), media_type="text/plain; version=0.0.4; charset=utf-8")

    @app.post("/add_worker")
    async def add_worker(request: Request) -> dict[str, Any]:
        """Body {"url", "role": "prefill"|"decode", "bootstrap_port"} or the same as query parameters
        (`worker_type` is accepted for `role`). The reply says whether the first health check passed."""
        params = await _params(request)
        role = params.get("role", params.get("worker_type"))
        if role not in ROLES:
            raise LBError(f"'role' must be 'prefill' or 'decode', got {role!r}", 400)
        if not isinstance(params.get("url"), str):
            raise LBError("give the instance's 'url' (http://HOST:PORT)", 400)
        try:
            url = normalize_url(params["url"], "url")
            port = parse_bootstrap_port(params.get("bootstrap_port", DEFAULT_BOOTSTRAP_PORT), "bootstrap_port")
            if role == "decode" and params.get("bootstrap_port") is not None:
                raise LBArgsError("bootstrap_port: only prefill instances have a bootstrap server")
            worker = registry.add(url, role, port)
        except LBArgsError as e:
            raise LBError(str(e), 400) from None
        except WorkerError as e:
            raise LBError(str(e), e.status) from None
        await request.app.state.checker.check(worker)
        return worker.to_json()

    @app.post("/remove_worker")
    async def remove_worker(request: Request) -> dict[str, Any]:
        """Body {"url"} or ?url=; requests already on the instance run to their end."""
        url = (await _params(request)).get("url")
        if not isinstance(url, str):
            raise LBError("give the instance's 'url' (http://HOST:PORT)", 400)
        try:
            return registry.remove(normalize_url(url, "url")).to_json()
        except LBArgsError as e:
            raise LBError(str(e), 400) from None
        except WorkerError as e:
            raise LBError(str(e), e.status) from None

    if args.api_key:
        app.add_middleware(ApiKeyMiddleware, api_key=args.api_key)
    return app


def _generate_endpoint(route: str) -> Any:
    async def endpoint(request: Request) -> Response:
        return await request.app.state.forwarder.handle(request, route)

    return endpoint


def _workers_json(registry: WorkerRegistry) -> dict[str, Any]:
    return {role: [w.to_json() for w in registry.workers(role)] for role in ROLES}


async def _get(client: httpx.AsyncClient, url: str, headers: dict[str, str]) -> int | str:
    try:
        return (await client.get(url, headers=headers)).status_code
    except httpx.HTTPError as e:
        return f"{type(e).__name__}: {e}"


async def _params(request: Request) -> dict[str, Any]:
    """Query parameters, overlaid by a JSON object body if there is one."""
    params: dict[str, Any] = dict(request.query_params)
    raw = await request.body()
    if raw.strip():
        try:
            body = await request.json()
        except ValueError as e:
            raise LBError(f"request body is not valid JSON: {e}", 400) from None
        if not isinstance(body, dict):
            raise LBError("request body must be a JSON object", 400)
        params.update(body)
    return params


def run_lb(args: LBArgs) -> None:
    """Serve the balancer until interrupted (logging is set up by the caller)."""
    if args.log_level != "debug":  # httpx logs every upstream call at info: twice per request
        logging.getLogger("httpx").setLevel(logging.WARNING)
    logger.info(
        "pd lb on %s: %d prefill, %d decode instances; policies prefill=%s decode=%s",
        args.url, len(args.prefill), len(args.decode), args.prefill_policy, args.decode_policy,
    )  # fmt: skip
    config = uvicorn.Config(
        create_app(args),
        host=args.host,
        port=args.port,
        log_level=args.log_level,
        log_config=None,  # keep the process's logging setup
        access_log=False,  # each request is logged once by the forwarder
        timeout_graceful_shutdown=5,
    )
    uvicorn.Server(config).run()
