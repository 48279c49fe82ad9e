"""Forwarding one generation request to a (prefill, decode) pair, the way SGLang's PD router does, or in regular
mode to one instance, the way SGLang's router does.

The body is parsed once (to check what the balancer reads), `rid`, `bootstrap_host`, `bootstrap_port` and a
random 63-bit `bootstrap_room` are spliced onto the client's bytes, and the same bytes are POSTed to both
instances at once. The decode answer is the client's answer; a stream is relayed as raw bytes, whatever has
arrived per send, never parsed. The prefill answer is read and only logged, unless it fails before decode has
answered: then it is the client's answer (its error status as is, a transport failure as 502), because a decode
instance never fed its KV would only wait for its own timeout.

In regular mode there is no prefill half: no bootstrap fields are added and the one instance's answer is the
client's, with the same failure rules as decode's.

The `Forwarder` is a plain ASGI app that the server calls directly: every framework layer between it and the
server would cost CPU on each relayed chunk.

A request whose rid is already in flight through this balancer is refused (400) before it reaches an instance.
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
from collections import Counter
from dataclasses import dataclass
from typing import Any

from starlette.types import Receive, Scope, Send

from pd.lb.args import LBArgs
from pd.lb.metrics import LBMetrics
from pd.lb.policies import make_policy
from pd.lb.request import (
    LBError,
    assign_rids,
    batch_size,
    bootstrap_fields,
    encode_body,
    parse_body,
    request_id_header,
    rid_headers,
    routing_text,
)
from pd.lb.upstream import ConnectFailed, UpstreamError, UpstreamPool, UpstreamResponse
from pd.lb.workers import Role, Worker, WorkerRegistry
from pd.server.protocol import error_body

logger = logging.getLogger(__name__)

# How long a decode error waits for its prefill's outcome, to tell a dead prefill (retry) from a real error.
PREFILL_GRACE_S = 1.0

SSE_DONE = b"data: [DONE]\n\n"
# Status nginx uses for "client closed the request"; nobody reads it, it only shows in metrics.
CLIENT_CLOSED_STATUS = 499
ABORT_TIMEOUT_S = 2.0
JSON_HEADER = b"content-type: application/json\r\n"


class _ConnectFailed(Exception):
    """An instance refused the connection: nothing reached it, so the request may go to another pair."""

    def __init__(self, worker: Worker, reason: str) -> None:
        super().__init__(reason)
        self.worker = worker


class _ClientGone(UpstreamError):
    """The client left; raised where the balancer waits, and used to break off decode's stream."""


@dataclass(frozen=True)
class _Call:
    """One client request as forwarded: its route, ids, upstream header lines and arrival time."""

    route: str
    rid: str
    rids: list[str]
    headers: bytes
    auth: bytes  # the client's authorization header line, or b""
    start: float


async def _read_body(receive: Receive) -> bytes | None:
    """The request body; None if the client left before sending all of it."""
    parts = []
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return None
        parts.append(message.get("body", b""))
        if not message.get("more_body"):
            return parts[0] if len(parts) == 1 else b"".join(parts)


async def _wait_disconnect(receive: Receive) -> None:
    """Returns when the client has gone, or the answer is complete (the body was read before, so the server
    has nothing else to deliver)."""
    while (await receive())["type"] != "http.disconnect":
        pass


async def _send_whole(send: Send, status: int, body: bytes, content_type: bytes | None, rid: str) -> None:
    headers = [(b"content-length", b"%d" % len(body))]
    if content_type is not None:
        headers.append((b"content-type", content_type))
    if (rid_value := request_id_header(rid)) is not None:
        headers.append((b"x-request-id", rid_value))
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


class Forwarder:
    """Picks pairs by policy and forwards generation requests (an ASGI app for those routes); one per balancer,
    sharing its upstream pool."""

    def __init__(self, registry: WorkerRegistry, pool: UpstreamPool, args: LBArgs, metrics: LBMetrics) -> None:
        self.registry, self.pool, self.metrics = registry, pool, metrics
        self.policies = {
            role: make_policy(name, cache_aware=args.cache_aware) for role, name in args.role_policies.items()
        }
        self.needs_text = any(p.needs_text for p in self.policies.values())
        self.request_timeout = args.request_timeout
        self.lb_auth = f"authorization: Bearer {args.api_key}\r\n".encode() if args.api_key else b""
        self._background: set[asyncio.Task[Any]] = set()  # fire-and-forget tasks, referenced until done
        # rids of the requests being forwarded, or being aborted (a count of holders each). A request with a rid in
        # here is refused before it reaches an instance: the instances would refuse it too, and the aborts the
        # balancer sends after a refusal name the rid, so they would end the request that holds it.
        self._inflight: Counter[str] = Counter()

    def pick_pair(self, text: str = "") -> tuple[Worker | None, Worker]:
        """One healthy prefill and one healthy decode instance by policy, or (None, a healthy regular instance) in
        regular mode. `text`: the request's routing text, for policies that need it. Raises LBError (503) if a
        role has no healthy instance."""
        if self.registry.answering == "regular":
            return None, self._pick("regular", text)
        prefills, decodes = self.registry.healthy("prefill"), self.registry.healthy("decode")
        if not prefills or not decodes:
            n_p, n_d = len(self.registry.workers("prefill")), len(self.registry.workers("decode"))
            raise LBError(
                f"no healthy prefill/decode pair: {len(prefills)} of {n_p} prefill and {len(decodes)} of {n_d} decode"
                " instances are healthy; see /list_workers",
                503, "service_unavailable",
            )  # fmt: skip
        return self._pick("prefill", text, prefills), self._pick("decode", text, decodes)

    def _pick(self, role: Role, text: str, candidates: list[Worker] | None = None) -> Worker:
        candidates = self.registry.healthy(role) if candidates is None else candidates
        if not candidates:
            n = len(self.registry.workers(role))
            raise LBError(f"no healthy instance: 0 of {n} {role} instances are healthy; see /list_workers", 503,
                          "service_unavailable")  # fmt: skip
        policy = self.policies[role]
        loads = [w.outstanding for w in candidates]
        if policy.needs_text:
            return candidates[policy.select(loads, [w.url for w in candidates], text)]
        return candidates[policy.select(loads)]

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Answer one POST to a generation route (/generate, /v1/completions, /v1/chat/completions)."""
        start = time.perf_counter()
        route = scope["path"]
        raw = await _read_body(receive)
        if raw is None:
            self.metrics.observe(route, CLIENT_CLOSED_STATUS, time.perf_counter() - start)
            return
        gone = asyncio.ensure_future(_wait_disconnect(receive))
        rid: str | None = None
        held: list[str] = []  # rids this request holds in _inflight
        try:
            body, stream = parse_body(raw)
            n = batch_size(body) if route == "/generate" else None
            rid, rids = assign_rids(body, n)
            text = routing_text(route, body) if self.needs_text else ""
            if (taken := next((r for r in rids if r in self._inflight), None)) is not None:
                raise LBError(f"request id {taken!r} is already in flight; use a unique rid", 400)
            held = rids
            self._inflight.update(held)
            auth = next((b"authorization: " + v + b"\r\n" for k, v in scope["headers"] if k == b"authorization"), b"")
            rid_value = request_id_header(rid)
            headers = JSON_HEADER + (b"x-request-id: " + rid_value + b"\r\n" if rid_value else b"") + auth
            # A refused connection takes its instance out of rotation, so each retry draws from fewer instances
            # and the loop ends with an answer or a 503 (the bound only guards against health checks racing it).
            refused = ""
            for attempt in range(1 + len(self.registry.all())):
                prefill, decode = self.pick_pair(text)
                # A retry is a new upstream request: the refused attempt's other half may still hold the old rid
                # (and is being told to abort it), so reusing it would be refused as a duplicate or aborted.
                attempt_rids = rids if attempt == 0 else [f"{r}-retry{attempt}" for r in rids]
                added = bootstrap_fields(prefill, n) if prefill is not None else {}
                if body.get("rid") != (sent_rid := attempt_rids[0] if n is None else attempt_rids):
                    added["rid"] = sent_rid
                data = encode_body(raw, body, added)
                if logger.isEnabledFor(logging.DEBUG):
                    logger.debug("rid=%s %s %s%s", rid, route, _urls(prefill, decode),
                                 f" (attempt {attempt + 1})" if attempt else "")  # fmt: skip
                call = _Call(route, rid, attempt_rids, headers, auth, start)
                try:
                    answer = self._stream if stream else self._unary
                    status = await answer(send, gone, prefill, decode, data, call)
                    break
                except _ConnectFailed as e:
                    self.registry.mark_down(e.worker, str(e))
                    self.metrics.retries.inc()
                    refused = f"{e.worker.role} worker {e.worker.url} refused: {e}"
            else:
                raise LBError(refused, 502, "upstream_error")
        except LBError as e:
            status = e.status
            await e.response(rid)(scope, receive, send)
        except _ClientGone:
            status = CLIENT_CLOSED_STATUS
            await send({"type": "http.response.start", "status": status, "headers": []})  # to nobody, as a record
            await send({"type": "http.response.body", "body": b""})
        finally:
            gone.cancel()
            self._release(held)
        self.metrics.observe(route, status, time.perf_counter() - start)

    # ---- the two answer shapes; each returns the status the client got ----
    async def _unary(
        self, send: Send, gone: asyncio.Future[None], prefill: Worker | None, decode: Worker, data: bytes, call: _Call
    ) -> int:
        pf = self._start_prefill(prefill, call, data)
        dc = asyncio.create_task(self._send(decode, call, data, read=True))
        resp = await self._race(gone, pf, dc, prefill, decode, call, stream=False)
        if resp.status < 400:
            self._keep_logging(pf, prefill, call.rid)
        await _send_whole(send, resp.status, resp.content, resp.header(b"content-type"), call.rid)
        return resp.status

    async def _stream(
        self, send: Send, gone: asyncio.Future[None], prefill: Worker | None, decode: Worker, data: bytes, call: _Call
    ) -> int:
        pf = self._start_prefill(prefill, call, data)
        dc = asyncio.create_task(self._send(decode, call, data, read=False))
        resp = await self._race(gone, pf, dc, prefill, decode, call, stream=True)
        if resp.status != 200:  # an error answer, not a stream: pass it back whole
            try:
                content = await resp.read()
            except UpstreamError as e:
                reason = f"decode worker {decode.url} failed: {type(e).__name__}: {e}"
                raise LBError(reason, 502, "upstream_error") from None
            finally:
                self._close(decode, resp)
            await _send_whole(send, resp.status, content, resp.header(b"content-type"), call.rid)
            return resp.status

        def client_gone(_: object) -> None:
            resp.abort(_ClientGone("client disconnected"))

        headers = [(b"content-type", resp.header(b"content-type") or b"text/event-stream")]
        if (rid_value := request_id_header(call.rid)) is not None:
            headers.append((b"x-request-id", rid_value))
        complete = False
        gone.add_done_callback(client_gone)
        try:
            await send({"type": "http.response.start", "status": 200, "headers": headers})
            # Whole events only: a chunk's bytes after its last event boundary wait for the next chunk, so a decode
            # dying mid-event leaves the client no half event (which, followed by the error event, would not parse).
            held = b""
            try:
                while chunk := await resp.next_chunk():
                    data = held + chunk
                    end = data.rfind(b"\n\n") + 2
                    if end == 1:  # no boundary yet: all of it waits
                        held = data
                        continue
                    held, data = data[end:], data[:end]
                    await send({"type": "http.response.body", "body": data, "more_body": True})
                complete = True
                tail = held  # a stream that ends off a boundary still ends as it was sent
            except _ClientGone:
                tail = b""
            except UpstreamError as e:
                reason = f"decode worker {decode.url} failed mid-stream: {type(e).__name__}: {e}"
                logger.warning("rid=%s %s", call.rid, reason)
                event = json.dumps(error_body(reason, 502, "upstream_error")).encode()
                tail = b"data: " + event + b"\n\n" + SSE_DONE
            await send({"type": "http.response.body", "body": tail, "more_body": False})
        finally:
            gone.remove_done_callback(client_gone)
            self._close(decode, resp)
            if complete:
                self._keep_logging(pf, prefill, call.rid)
            else:  # client gone or decode failed: stop prefill too
                if pf is not None and prefill is not None and not pf.done():
                    logger.info("rid=%s stream ended early; aborting on %s and %s", call.rid, prefill.url, decode.url)
                if pf is not None:
                    pf.cancel()
                self._abort(call, (prefill, decode))
        return 200

    async def _race(
        self, gone: asyncio.Future[None], pf: asyncio.Task[UpstreamResponse] | None,
        dc: asyncio.Task[UpstreamResponse], prefill: Worker | None, decode: Worker, call: _Call, stream: bool,
    ) -> UpstreamResponse:  # fmt: skip
        """Wait for decode's answer (a stream's headers), watching for the client leaving and prefill (if any)
        failing first. Unless decode answers a success, both upstream requests are closed and aborted on the way
        out."""
        waiting: set[asyncio.Future[Any]] = {dc, gone} if pf is None else {pf, dc, gone}
        deadline = time.monotonic() + self.request_timeout
        answer: UpstreamResponse | None = None
        try:
            while True:
                done, _ = await asyncio.wait(
                    waiting, timeout=deadline - time.monotonic(), return_when="FIRST_COMPLETED"
                )
                if not done:
                    raise LBError(f"no answer within --request-timeout ({self.request_timeout:g} s)", 504, "timeout")
                if gone in done:
                    logger.info("rid=%s client disconnected; aborting on %s", call.rid, _urls(prefill, decode))
                    raise _ClientGone()
                if pf is not None and prefill is not None and pf in done and pf in waiting:
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
                    if answer.status >= 500 and pf is not None and prefill is not None and not pf.done():
                        # Decode fails fast when it cannot reach its prefill; if that prefill refuses us too, the
                        # request never started anywhere and another pair should get it.
                        await asyncio.wait({pf}, timeout=PREFILL_GRACE_S)
                        early = _prefill_failure(pf, prefill) if pf.done() else None
                        if isinstance(early, _ConnectFailed):
                            answer = None  # its stream, if one opened, is closed on the way out
                            raise early
                    return answer
        finally:
            if answer is None or answer.status >= 400:
                # Decode rejected the request or never answered: prefill's work (and its KV) would be stranded.
                if pf is not None:
                    pf.cancel()
                dc.cancel()
                if answer is None and stream:
                    self._close_when_opened(decode, dc)  # a stream opened just as we gave up on it
                self._abort(call, (prefill, decode))

    # ---- upstream calls ----
    def _start_prefill(self, prefill: Worker | None, call: _Call, data: bytes) -> asyncio.Task[UpstreamResponse] | None:
        """Prefill's half, read whole in the background; None in regular mode."""
        if prefill is None:
            return None
        return asyncio.create_task(self._send(prefill, call, data, read=True))

    async def _send(self, worker: Worker, call: _Call, data: bytes, read: bool) -> UpstreamResponse:
        """POST to one instance; read: the whole answer, else return at the headers (the caller closes).
        Refused -> _ConnectFailed."""
        worker.outstanding += 1
        try:
            resp = await self.pool.request(worker.url, "POST", call.route, call.headers, data)
            if read:
                await resp.read()
        except ConnectFailed as e:
            worker.outstanding -= 1
            raise _ConnectFailed(worker, str(e)) from None
        except BaseException:
            worker.outstanding -= 1
            raise
        if read:
            worker.outstanding -= 1
        return resp

    def _close(self, worker: Worker, resp: UpstreamResponse) -> None:
        """End a streamed response; unread, its connection is dropped, which the instance sees as a disconnect."""
        worker.outstanding -= 1
        resp.release()

    def _close_when_opened(self, decode: Worker, dc: asyncio.Task[UpstreamResponse]) -> None:
        """Close decode's stream if its request succeeds after all (now, or later despite the cancellation)."""

        def close(t: asyncio.Task[UpstreamResponse]) -> None:
            if not t.cancelled() and t.exception() is None:
                self._close(decode, t.result())

        if dc.done():
            close(dc)
        else:
            dc.add_done_callback(close)

    def _keep_logging(self, pf: asyncio.Task[UpstreamResponse] | None, prefill: Worker | None, rid: str) -> None:
        """Let prefill's answer finish in the background (it is consumed, not relayed) and log a failure."""
        if pf is None or prefill is None:
            return

        def log(t: asyncio.Task[UpstreamResponse]) -> None:
            if t.cancelled():
                return
            if isinstance(exc := t.exception(), _ConnectFailed):
                self.registry.mark_down(prefill, str(exc))
            elif exc is not None:
                logger.warning("rid=%s prefill %s failed: %s", rid, prefill.url, exc)
            elif (resp := t.result()).status >= 400:
                logger.warning("rid=%s prefill %s answered %d: %.300s", rid, prefill.url, resp.status, resp.text)

        if pf.done():
            log(pf)
            return
        self._background.add(pf)
        pf.add_done_callback(self._background.discard)
        pf.add_done_callback(log)

    def _abort(self, call: _Call, workers: tuple[Worker | None, ...]) -> None:
        """POST /abort_request {"rid"} for every rid to every worker, in the background, errors only logged."""

        async def one(worker: Worker, rid: str) -> None:
            try:
                body = json.dumps({"rid": rid}).encode()
                resp = await self.pool.request(
                    worker.url, "POST", "/abort_request", headers, body, timeout=ABORT_TIMEOUT_S
                )
                await resp.read()
            except UpstreamError as e:
                logger.debug("abort of rid=%s on %s failed: %s", rid, worker.url, e)

        headers = JSON_HEADER + (call.auth or self.lb_auth)
        for worker in filter(None, workers):
            for rid in call.rids:
                task = asyncio.create_task(one(worker, rid))
                self._background.add(task)
                task.add_done_callback(self._background.discard)
                # Until it has gone out, a new request with this rid would be the one the abort ends.
                self._inflight[rid] += 1
                task.add_done_callback(lambda _, rid=rid: self._release([rid]))

    def _release(self, rids: list[str]) -> None:
        self._inflight.subtract(rids)
        for rid in rids:
            if self._inflight[rid] <= 0:
                del self._inflight[rid]


def _urls(*workers: Worker | None) -> str:
    return " and ".join(w.url for w in workers if w is not None)


def _prefill_failure(pf: asyncio.Task[UpstreamResponse], prefill: Worker) -> Exception | None:
    """What ends the request when prefill finished before decode answered: a refused connection (retry), a
    transport failure (502), or an error status (passed back as is, as an LBError carrying prefill's body)."""
    exc = pf.exception()
    if isinstance(exc, _ConnectFailed):
        return exc
    if exc is not None:
        return LBError(f"prefill worker {prefill.url} failed: {type(exc).__name__}: {exc}", 502, "upstream_error")
    resp = pf.result()
    if resp.status >= 400:
        return _PrefillRejected(resp)
    return None


class _PrefillRejected(LBError):
    """Prefill answered an error before decode answered: the client gets prefill's answer unchanged."""

    def __init__(self, resp: UpstreamResponse) -> None:
        super().__init__(resp.text, resp.status)
        self.upstream = resp

    def response(self, rid: str | None = None) -> Any:
        from starlette.responses import Response

        ct = self.upstream.header(b"content-type")
        media = ct.decode("latin-1") if ct is not None else None
        return Response(self.upstream.content, self.upstream.status, rid_headers(rid), media)
