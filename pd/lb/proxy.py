"""Forwarding one generation request to a (prefill, decode) pair, the way SGLang's PD router does.

The body is parsed once, gets `rid`, `bootstrap_host`, `bootstrap_port` and a random 63-bit `bootstrap_room`,
is dumped once, and the same bytes are POSTed to both instances at once. The decode answer is the client's
answer; streams are relayed chunk by chunk as raw bytes, never re-parsed. The prefill answer is read and only
logged, unless it fails before decode has answered: then it is the client's answer (its error status as is, a
transport failure as 502), because a decode instance never fed its KV would only wait for its own timeout.

Failure rules: a refused connection to either instance takes that instance out of rotation and the request is
retried on a fresh pair (new room, rid suffixed `-retryN`; nothing has reached the client yet) while a healthy
pair is left; decode failing mid-stream ends the stream with an SSE error event and `data: [DONE]`; no healthy
pair is a 503.
Whenever a request ends without decode's complete answer (client gone, failure, timeout), both upstream
connections are closed, so the instances see the disconnect, and POST /abort_request {"rid"} goes to both as a
best effort.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import anyio
import httpx
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.types import Receive, Scope, Send

from pd.lb.args import LBArgs
from pd.lb.metrics import LBMetrics
from pd.lb.policies import make_policy
from pd.lb.request import LBError, add_bootstrap, assign_rids, batch_size, parse_body
from pd.lb.workers import Worker, WorkerRegistry
from pd.server.protocol import error_body

logger = logging.getLogger(__name__)

# How long a decode error waits for its prefill's outcome, to tell a dead prefill (retry) from a real error.
PREFILL_GRACE_S = 1.0

SSE_DONE = b"data: [DONE]\n\n"
# Status nginx uses for "client closed the request"; nobody reads it, it only shows in metrics.
CLIENT_CLOSED_STATUS = 499
ABORT_TIMEOUT_S = 2.0
_CONNECT_ERRORS = (httpx.ConnectError, httpx.ConnectTimeout)


class _ConnectFailed(Exception):
    """An instance refused the connection: nothing reached it, so the request may go to another pair."""

    def __init__(self, worker: Worker, reason: str) -> None:
        super().__init__(reason)
        self.worker = worker


class _ClientGone(Exception):
    pass


@dataclass(frozen=True)
class _Call:
    """One client request as forwarded: its route, ids, upstream headers and arrival time."""

    route: str
    rid: str
    rids: list[str]
    headers: dict[str, str]
    start: float


async def _wait_disconnect(receive: Receive) -> None:
    """Returns when the client has gone (the body was read before, so the next message is the disconnect)."""
    while (await receive())["type"] != "http.disconnect":
        pass


class UpstreamStream(StreamingResponse):
    """A streaming response whose `on_end()` runs however it ends (finished, client gone, error), shielded from
    the cancellation that a client disconnect brings."""

    def __init__(self, body: AsyncIterator[bytes], on_end: Callable[[], Awaitable[None]], **kw: Any) -> None:
        super().__init__(body, **kw)
        self._on_end = on_end

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            with anyio.CancelScope(shield=True):
                await self._on_end()


class Forwarder:
    """Picks pairs by policy and forwards generation requests; one per app, sharing the app's HTTP client."""

    def __init__(self, registry: WorkerRegistry, client: httpx.AsyncClient, args: LBArgs, metrics: LBMetrics) -> None:
        assert args.prefill_policy is not None and args.decode_policy is not None
        self.registry, self.client, self.metrics = registry, client, metrics
        self.prefill_policy = make_policy(args.prefill_policy)
        self.decode_policy = make_policy(args.decode_policy)
        self.request_timeout = args.request_timeout
        self.lb_auth = {"authorization": f"Bearer {args.api_key}"} if args.api_key else {}
        self._background: set[asyncio.Task[Any]] = set()  # fire-and-forget tasks, referenced until done

    def pick_pair(self) -> tuple[Worker, Worker]:
        """One healthy prefill and one healthy decode instance by policy. Raises LBError (503) if a side has none."""
        prefills, decodes = self.registry.healthy("prefill"), self.registry.healthy("decode")
        if not prefills or not decodes:
            n_p, n_d = len(self.registry.workers("prefill")), len(self.registry.workers("decode"))
            raise LBError(
                f"no healthy prefill/decode pair: {len(prefills)} of {n_p} prefill and {len(decodes)} of {n_d} decode"
                " instances are healthy; see /list_workers",
                503, "service_unavailable",
            )  # fmt: skip
        p = prefills[self.prefill_policy.select([w.outstanding for w in prefills])]
        d = decodes[self.decode_policy.select([w.outstanding for w in decodes])]
        return p, d

    async def handle(self, request: Request, route: str) -> Response:
        """Answer one POST to `route` (/generate, /v1/completions, /v1/chat/completions)."""
        start = time.perf_counter()
        rid = None
        try:
            body, stream = parse_body(await request.body())
            n = batch_size(body) if route == "/generate" else None
            rid, rids = assign_rids(body, n)
            headers = {"content-type": "application/json", "x-request-id": rid}
            if auth := request.headers.get("authorization"):
                headers["authorization"] = auth
            # A refused connection takes its instance out of rotation, so each retry draws from fewer instances
            # and the loop ends with an answer or a 503 (the bound only guards against health checks racing it).
            refused = ""
            for attempt in range(1 + len(self.registry.all())):
                prefill, decode = self.pick_pair()
                add_bootstrap(body, prefill, n)
                # A retry is a new upstream request: the refused attempt's other half may still hold the old rid
                # (and is being told to abort it), so reusing it would be refused as a duplicate or aborted.
                attempt_rids = rids if attempt == 0 else [f"{r}-retry{attempt}" for r in rids]
                body["rid"] = attempt_rids[0] if n is None else attempt_rids
                data = json.dumps(body, separators=(",", ":")).encode()
                logger.debug("rid=%s %s prefill=%s decode=%s%s", rid, route, prefill.url, decode.url,
                            f" (attempt {attempt + 1})" if attempt else "")  # fmt: skip
                call = _Call(route, rid, attempt_rids, headers, start)
                try:
                    answer = self._stream if stream else self._unary
                    resp = await answer(request, prefill, decode, data, call)
                    break
                except _ConnectFailed as e:
                    self.registry.mark_down(e.worker, str(e))
                    self.metrics.retries.inc()
                    refused = f"{e.worker.role} worker {e.worker.url} refused: {e}"
            else:
                raise LBError(refused, 502, "upstream_error")
        except LBError as e:
            resp = e.response(rid)
        except _ClientGone:
            resp = Response(status_code=CLIENT_CLOSED_STATUS)
        if not isinstance(resp, UpstreamStream):  # a stream is counted when it ends
            self.metrics.observe(route, resp.status_code, time.perf_counter() - start)
        return resp

    # ---- the two answer shapes ----
    async def _unary(self, request: Request, prefill: Worker, decode: Worker, data: bytes, call: _Call) -> Response:
        pf = asyncio.create_task(self._send(prefill, call, data, stream=False))
        dc = asyncio.create_task(self._send(decode, call, data, stream=False))
        resp = await self._race(request, pf, dc, prefill, decode, call, stream=False)
        if resp.status_code < 400:
            self._keep_logging(pf, prefill, call.rid)
        return Response(resp.content, resp.status_code, {"x-request-id": call.rid}, resp.headers.get("content-type"))

    async def _stream(self, request: Request, prefill: Worker, decode: Worker, data: bytes, call: _Call) -> Response:
        pf = asyncio.create_task(self._send(prefill, call, data, stream=False))
        dc = asyncio.create_task(self._send(decode, call, data, stream=True))
        resp = await self._race(request, pf, dc, prefill, decode, call, stream=True)
        if resp.status_code != 200:  # an error answer, not a stream: pass it back whole
            try:
                content = await resp.aread()
            finally:
                await self._close(decode, resp)
            return Response(content, resp.status_code, {"x-request-id": call.rid}, resp.headers.get("content-type"))
        complete = False

        async def relay() -> AsyncIterator[bytes]:
            nonlocal complete
            last = b"\n\n"
            try:
                async for chunk in resp.aiter_raw():
                    last = chunk
                    yield chunk
            except httpx.HTTPError as e:
                reason = f"decode worker {decode.url} failed mid-stream: {type(e).__name__}: {e}"
                logger.warning("rid=%s %s", call.rid, reason)
                sep = b"" if last.endswith(b"\n\n") else b"\n\n"  # never glue the error onto a half-sent event
                event = json.dumps(error_body(reason, 502, "upstream_error")).encode()
                yield sep + b"data: " + event + b"\n\n" + SSE_DONE
                return
            complete = True

        async def on_end() -> None:
            await self._close(decode, resp)
            if complete:
                self._keep_logging(pf, prefill, call.rid)
            else:  # client gone or decode failed: stop prefill too
                if not pf.done():
                    logger.info("rid=%s stream ended early; aborting on %s and %s", call.rid, prefill.url, decode.url)
                pf.cancel()
                self._abort(call, (prefill, decode))
            self.metrics.observe(call.route, 200, time.perf_counter() - call.start)

        media = resp.headers.get("content-type", "text/event-stream")
        return UpstreamStream(relay(), on_end, status_code=200, headers={"x-request-id": call.rid}, media_type=media)

    async def _race(
        self, request: Request, pf: asyncio.Task[httpx.Response], dc: asyncio.Task[httpx.Response],
        prefill: Worker, decode: Worker, call: _Call, stream: bool,
    ) -> httpx.Response:  # fmt: skip
        """Wait for decode's answer (a stream's headers), watching for the client leaving and prefill failing
        first. Unless decode answers a success, both upstream requests are closed and aborted on the way out."""
        gone = asyncio.create_task(_wait_disconnect(request.receive))
        waiting: set[asyncio.Future[Any]] = {pf, dc, gone}
        deadline = time.monotonic() + self.request_timeout
        answer: httpx.Response | None = None
        try:
            while True:
                done, _ = await asyncio.wait(
                    waiting, timeout=deadline - time.monotonic(), return_when="FIRST_COMPLETED"
                )
                if not done:
                    raise LBError(f"no answer within --request-timeout ({self.request_timeout:g} s)", 504, "timeout")
                if gone in done:
                    logger.info("rid=%s client disconnected; aborting on %s and %s", call.rid, prefill.url, decode.url)
                    raise _ClientGone()
                if pf in done and pf in waiting:
                    waiting.discard(pf)
                    early = _prefill_failure(pf, prefill)
                    # A refused prefill never saw the request, so a decode answer that came in with the refusal
                    # can only be the failure that follows from it: another pair gets the request either way.
                    if early is not None and (isinstance(early, _ConnectFailed) or not dc.done()):
                        raise early
                if dc in done:
                    exc = dc.exception()
                    if isinstance(exc, _ConnectFailed):
                        raise exc
                    if exc is not None:
                        reason = f"decode worker {decode.url} failed: {type(exc).__name__}: {exc}"
                        raise LBError(reason, 502, "upstream_error")
                    answer = dc.result()
                    if answer.status_code >= 500 and not pf.done():
                        # Decode fails fast when it cannot reach its prefill; if that prefill refuses us too, the
                        # request never started anywhere and another pair should get it.
                        await asyncio.wait({pf}, timeout=PREFILL_GRACE_S)
                        early = _prefill_failure(pf, prefill) if pf.done() else None
                        if isinstance(early, _ConnectFailed):
                            if stream:
                                await self._close(decode, answer)
                            answer = None
                            raise early
                    return answer
        finally:
            gone.cancel()
            if answer is None or answer.status_code >= 400:
                # Decode rejected the request or never answered: prefill's work (and its KV) would be stranded.
                pf.cancel()
                dc.cancel()
                if answer is None and stream and dc.done() and not dc.cancelled() and dc.exception() is None:
                    await self._close(decode, dc.result())  # a stream opened just as we gave up on it
                self._abort(call, (prefill, decode))

    # ---- upstream calls ----
    async def _send(self, worker: Worker, call: _Call, data: bytes, stream: bool) -> httpx.Response:
        """POST to one instance (stream: return at the headers; the caller closes). Refused -> _ConnectFailed."""
        worker.outstanding += 1
        req = self.client.build_request("POST", worker.url + call.route, content=data, headers=call.headers)
        try:
            resp = await self.client.send(req, stream=stream)
        except _CONNECT_ERRORS as e:
            worker.outstanding -= 1
            raise _ConnectFailed(worker, f"{type(e).__name__}: {e}") from None
        except BaseException:
            worker.outstanding -= 1
            raise
        if not stream:
            worker.outstanding -= 1
        return resp

    async def _close(self, worker: Worker, resp: httpx.Response) -> None:
        """End a streamed response; unread, its connection is dropped, which the instance sees as a disconnect."""
        worker.outstanding -= 1
        await resp.aclose()

    def _keep_logging(self, pf: asyncio.Task[httpx.Response], prefill: Worker, rid: str) -> None:
        """Let prefill's answer finish in the background (it is consumed, not relayed) and log it."""

        def log(t: asyncio.Task[httpx.Response]) -> None:
            if t.cancelled():
                return
            if isinstance(exc := t.exception(), _ConnectFailed):
                self.registry.mark_down(prefill, str(exc))
            elif exc is not None:
                logger.warning("rid=%s prefill %s failed: %s", rid, prefill.url, exc)
            elif t.result().status_code >= 400:
                logger.warning("rid=%s prefill %s answered %d: %.300s", rid, prefill.url, t.result().status_code,
                               t.result().text)  # fmt: skip
            else:
                logger.debug("rid=%s prefill %s answered %d", rid, prefill.url, t.result().status_code)

        self._background.add(pf)
        pf.add_done_callback(self._background.discard)
        pf.add_done_callback(log)

    def _abort(self, call: _Call, workers: tuple[Worker, ...]) -> None:
        """POST /abort_request {"rid"} for every rid to every worker, in the background, errors only logged."""

        async def one(worker: Worker, rid: str) -> None:
            try:
                await self.client.post(
                    worker.url + "/abort_request", json={"rid": rid}, headers=auth, timeout=ABORT_TIMEOUT_S
                )
            except httpx.HTTPError as e:
                logger.debug("abort of rid=%s on %s failed: %s", rid, worker.url, e)

        auth = {k: v for k, v in call.headers.items() if k == "authorization"} or self.lb_auth
        for worker in workers:
            for rid in call.rids:
                task = asyncio.create_task(one(worker, rid))
                self._background.add(task)
                task.add_done_callback(self._background.discard)


def _prefill_failure(pf: asyncio.Task[httpx.Response], prefill: Worker) -> Exception | None:
    """What ends the request when prefill finished before decode answered: a refused connection (retry), a
    transport failure (502), or an error status (passed back as is, as an LBError carrying prefill's body)."""
    exc = pf.exception()
    if isinstance(exc, _ConnectFailed):
        return exc
    if exc is not None:
        return LBError(f"prefill worker {prefill.url} failed: {type(exc).__name__}: {exc}", 502, "upstream_error")
    resp = pf.result()
    if resp.status_code >= 400:
        return _PrefillRejected(resp)
    return None


class _PrefillRejected(LBError):
    """Prefill answered an error before decode answered: the client gets prefill's answer unchanged."""

    def __init__(self, resp: httpx.Response) -> None:
        super().__init__(resp.text, resp.status_code)
        self.upstream = resp

    def response(self, rid: str | None = None) -> Response:
        headers = {"x-request-id": rid} if rid else None
        ct = self.upstream.headers.get("content-type")
        return Response(self.upstream.content, self.upstream.status_code, headers, ct)
