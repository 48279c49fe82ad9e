"""The HTTP front of `pd lb`: the ASGI app (`create_app`) and the process entry point (`run_lb`).

POSTs to the generation routes go straight from the server to the `Forwarder`, a plain ASGI app; the admin and
probe routes are a FastAPI app behind it. One upstream pool, created with the app, carries every call to the
instances. Errors answer with OpenAI's error shape {"error": {"message", "type", "code"}}.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import uvicorn
from fastapi import FastAPI, Request, Response
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Receive, Scope, Send

from pd.lb.args import DEFAULT_BOOTSTRAP_PORT, LBArgs, LBArgsError, normalize_url, parse_bootstrap_port
from pd.lb.cache_aware import CacheAwarePolicy, evict_periodically
from pd.lb.fanout import FANOUT_ROUTES, fan_out
from pd.lb.metrics import LBMetrics
from pd.lb.proxy import JSON_HEADER, Forwarder, LBError
from pd.lb.request import parse_json_object
from pd.lb.upstream import UpstreamError, UpstreamPool
from pd.lb.workers import HealthChecker, WorkerError, WorkerRegistry
from pd.server.auth import ApiKeyMiddleware
from pd.server.protocol import error_body

logger = logging.getLogger(__name__)

GENERATE_ROUTES = frozenset({"/generate", "/v1/completions", "/v1/chat/completions"})
# A refused or unroutable connection fails fast, so a dead instance costs a retry, not a long wait.
CONNECT_TIMEOUT_S = 5.0


class LBApp:
    """Generation POSTs to the forwarder, everything else (and the lifespan) to the admin app."""

    def __init__(self, forwarder: Forwarder, admin: FastAPI) -> None:
        self.forwarder, self.admin = forwarder, admin

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["method"] == "POST" and scope["path"] in GENERATE_ROUTES:
            await self.forwarder(scope, receive, send)
        else:
            await self.admin(scope, receive, send)


def create_app(args: LBArgs) -> ASGIApp:
    """The balancer app for `args`. The health checker starts with the app (lifespan): one health-check round runs
    before it serves, so instances already up are in rotation at once. The read timeout of upstream calls is
    --request-timeout; connecting gives up after CONNECT_TIMEOUT_S. A cache_aware policy's trees are trimmed
    every --eviction-interval-secs, also from the lifespan."""
    registry = WorkerRegistry(args)
    metrics = LBMetrics()
    pool = UpstreamPool(args.request_timeout, min(CONNECT_TIMEOUT_S, args.request_timeout))
    forwarder = Forwarder(registry, pool, args, metrics)
    lb_auth = f"authorization: Bearer {args.api_key}\r\n".encode() if args.api_key else b""
    checker = HealthChecker(registry, pool, args, lb_auth)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await checker.check_all()
        tasks = [asyncio.create_task(checker.run())]
        for policy in forwarder.policies.values():
            if isinstance(policy, CacheAwarePolicy):
                tasks.append(asyncio.create_task(evict_periodically(policy)))
        try:
            yield
        finally:
            for task in tasks:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
            await pool.close()

    app = FastAPI(title="pd lb", lifespan=lifespan)
    app.state.registry = registry
    for route in sorted(GENERATE_ROUTES):  # reached only by other methods (405): LBApp takes the POSTs first
        app.router.add_route(route, forwarder, methods=["POST"])

    @app.exception_handler(LBError)
    async def lb_error(request: Request, e: LBError) -> Response:
        return e.response()

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, e: StarletteHTTPException) -> Response:
        """Unknown paths (404) and wrong methods (405) in the same error shape as every other answer."""
        err_type = "not_found_error" if e.status_code == 404 else "invalid_request_error"
        message = f"{e.detail}: {request.method} {request.url.path}"
        return JSONResponse(error_body(message, e.status_code, err_type), e.status_code, headers=e.headers)

    @app.get("/health")
    async def health() -> Response:
        counts = {role: len(registry.healthy(role)) for role in registry.roles}
        if all(counts.values()):
            return Response(status_code=200)
        have = " and ".join(f"{n} healthy {role}" for role, n in counts.items())
        raise LBError(f"not ready: {have} instances", 503, "service_unavailable")

    @app.get("/health_generate")
    async def health_generate(request: Request) -> Response:
        """GET /health_generate on every healthy instance; 200 if an instance of each role passes."""
        workers = [w for role in registry.roles for w in registry.healthy(role)]
        results = await asyncio.gather(*(_get(pool, w.url, "/health_generate", lb_auth) for w in workers))
        passed = {w.role for w, r in zip(workers, results, strict=True) if r == 200}
        body = {"workers": {w.url: r for w, r in zip(workers, results, strict=True)}}
        return JSONResponse(body, status_code=200 if passed == set(registry.roles) else 503)

    @app.get("/v1/models")
    @app.get("/get_model_info")
    @app.get("/model_info")
    async def from_decode(request: Request) -> Response:
        """Asked of a healthy decode (or regular) instance: the kind whose answers clients get."""
        a = request.headers.get("authorization")
        auth = f"authorization: {a}\r\n".encode("latin-1") if a else lb_auth
        for worker in registry.healthy(registry.answering):
            try:
                resp = await pool.request(worker.url, "GET", request.url.path, auth)
                await resp.read()
            except UpstreamError as e:
                logger.warning("GET %s on %s failed: %s", request.url.path, worker.url, e)
                continue
            ct = resp.header(b"content-type")
            return Response(resp.content, resp.status, media_type=ct.decode("latin-1") if ct is not None else None)
        raise LBError(f"no healthy {registry.answering} instance to ask", 503, "service_unavailable")

    @app.get("/get_server_info")
    async def server_info() -> dict[str, Any]:
        policies = {f"{role}_policy": name for role, name in args.role_policies.items()}
        cache_aware: dict[str, Any] = {}
        if args.uses_cache_aware:
            # Characters each instance's tree holds now, per role: what the policy believes each cache holds.
            trees = {role: {url: tree.size for url, tree in p.trees.items()}
                     for role, p in forwarder.policies.items() if isinstance(p, CacheAwarePolicy)}  # fmt: skip
            cache_aware = {"cache_aware": {**dataclasses.asdict(args.cache_aware), "tree_chars": trees}}
        return {
            "lb": {
                "mode": "pd" if args.pd_mode else "regular",
                **policies,
                **cache_aware,
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

    async def to_every_instance(request: Request) -> Response:
        """POST an admin route (FANOUT_ROUTES) on every instance (healthy or not); see pd.lb.fanout."""
        a = request.headers.get("authorization")
        auth = f"authorization: {a}\r\n".encode("latin-1") if a else lb_auth
        urls = [w.url for w in registry.all()]
        return await fan_out(pool, urls, request.url.path, JSON_HEADER + auth, await request.body())

    for route in FANOUT_ROUTES:
        app.router.add_api_route(route, to_every_instance, methods=["POST"])

    @app.post("/add_worker")
    async def add_worker(request: Request) -> dict[str, Any]:
        """Body {"url", "role": "prefill"|"decode"|"regular", "bootstrap_port"} or the same as query parameters
        (`worker_type` is accepted for `role`; in regular mode it may be left out). The reply says whether the
        first health check passed."""
        params = await _params(request)
        role = params.get("role", params.get("worker_type", None if args.pd_mode else "regular"))
        if role not in registry.roles:
            names = " or ".join(repr(r) for r in registry.roles)
            raise LBError(f"'role' must be {names} in this balancer's mode, got {role!r}", 400)
        if not isinstance(params.get("url"), str):
            raise LBError("give the instance's 'url' (http://HOST:PORT)", 400)
        try:
            url = normalize_url(params["url"], "url")
            port = parse_bootstrap_port(params.get("bootstrap_port", DEFAULT_BOOTSTRAP_PORT), "bootstrap_port")
            if role != "prefill" and params.get("bootstrap_port") is not None:
                raise LBArgsError("bootstrap_port: only prefill instances have a bootstrap server")
            worker = registry.add(url, role, port)
        except LBArgsError as e:
            raise LBError(str(e), 400) from None
        except WorkerError as e:
            raise LBError(str(e), e.status) from None
        await checker.check(worker)
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

    lb = LBApp(forwarder, app)
    return ApiKeyMiddleware(lb, api_key=args.api_key) if args.api_key else lb


def _workers_json(registry: WorkerRegistry) -> dict[str, Any]:
    return {role: [w.to_json() for w in registry.workers(role)] for role in registry.roles}


async def _get(pool: UpstreamPool, url: str, path: str, headers: bytes) -> int | str:
    try:
        resp = await pool.request(url, "GET", path, headers)
        await resp.read()
        return resp.status
    except UpstreamError as e:
        return f"{type(e).__name__}: {e}"


async def _params(request: Request) -> dict[str, Any]:
    """Query parameters, overlaid by a JSON object body if there is one."""
    params: dict[str, Any] = dict(request.query_params)
    raw = await request.body()
    if raw.strip():
        params.update(parse_json_object(raw))
    return params


def run_lb(args: LBArgs) -> None:
    """Serve the balancer until interrupted (logging is set up by the caller)."""
    if args.pd_mode:
        logger.info(
            "pd lb on %s: %d prefill, %d decode instances; policies prefill=%s decode=%s",
            args.url, len(args.prefill), len(args.decode), args.prefill_policy, args.decode_policy,
        )  # fmt: skip
    else:
        logger.info("pd lb on %s: %d regular instances; policy %s", args.url, len(args.worker_urls), args.policy)
    config = uvicorn.Config(
        create_app(args),
        host=args.host,
        port=args.port,
        log_level=args.log_level,
        log_config=None,  # keep the process's logging setup
        access_log=False,  # a log line per request costs more CPU than forwarding it; --log-level debug logs each
        proxy_headers=False,  # the balancer never looks at client addresses
        timeout_graceful_shutdown=5,
    )
    uvicorn.Server(config).run()
