"""The balancer's HTTP/1.1 client for its instances: pooled keep-alive connections on asyncio protocols, parsed by
httptools (the C parser uvicorn uses), so relaying a stream costs one parser call per read and no Python-level
HTTP machinery. httpx spent about 2.7 ms of CPU on a 32-event stream where this spends about 0.7 ms
(benchmarks/bench_lb.py); at the balancer's request rates that difference is most of its cost.

`UpstreamPool.request` returns at the answer's headers. The body is then read whole (`read`, which also puts the
connection back in the pool) or chunk by chunk (`next_chunk`, then `release`). A connection whose answer was not
read to its end is closed, never reused, so the instance sees the disconnect at once.

Failures are exceptions, never HTTP statuses: `ConnectFailed` (nothing reached the instance: refused,
unreachable, connect timeout), `UpstreamTimeout` (nothing arrived for the read timeout), `UpstreamError` for any
other break (connection lost mid-answer, malformed HTTP).
"""

from __future__ import annotations

import asyncio
import ssl
import urllib.parse
from collections import deque
from dataclasses import dataclass

import httptools

# Stop reading an instance while this much of its answer waits for a slow client.
HIGH_WATER_BYTES = 1 << 20
# uvicorn closes idle keep-alive connections after 5 s; reusing one just as it does would fail the request.
KEEPALIVE_S = 4.0
MAX_IDLE_PER_INSTANCE = 1024


class UpstreamError(Exception):
    """The exchange with an instance broke off (a transport failure, not an HTTP status)."""


class ConnectFailed(UpstreamError):
    """No connection could be made (refused, unreachable, connect timeout): nothing reached the instance."""


class UpstreamTimeout(UpstreamError):
    """The instance sent nothing for the read timeout."""


@dataclass(frozen=True)
class _Origin:
    host: str
    port: int
    ssl: ssl.SSLContext | None
    host_header: bytes

    @classmethod
    def parse(cls, base_url: str) -> _Origin:
        u = urllib.parse.urlsplit(base_url)
        https = u.scheme == "https"
        assert u.hostname, f"not a base URL: {base_url!r}"
        return cls(u.hostname, u.port or (443 if https else 80), ssl.create_default_context() if https else None,
                   u.netloc.encode())  # fmt: skip


class _Connection(asyncio.Protocol):
    """One keep-alive connection, carrying one exchange at a time. The parser's callbacks fill the current
    answer's status, headers and body chunks, and wake the one coroutine waiting for them."""

    def __init__(self, pool: UpstreamPool, origin: _Origin) -> None:
        self.pool, self.origin = pool, origin
        self.loop = asyncio.get_running_loop()
        self.transport: asyncio.Transport | None = None
        self.closed = False
        self.busy = False
        self.timer: asyncio.TimerHandle | None = None
        self.waiter: asyncio.Future[None] | None = None
        # One parser for the connection's life: it reads answer after answer (a failed one closes the connection).
        self.parser = httptools.HttpResponseParser(self)

    # ---- one exchange ----
    def start(self, request: bytes, timeout: float) -> None:
        assert self.transport is not None and not self.busy
        self.busy = True
        self.status = 0
        self.headers: list[tuple[bytes, bytes]] = []
        self.chunks: deque[bytes] = deque()
        self.buffered = 0
        self.headers_done = self.complete = self.keep_alive = self.until_close = self.paused = False
        self.error: UpstreamError | None = None
        self.timeout, self.last_read = timeout, self.loop.time()
        self.timer = self.loop.call_later(timeout, self._check_idle)
        if self.closed:  # the peer hung up between connecting (or idling) and now
            self.error = UpstreamError(f"{self.origin.host}:{self.origin.port} closed the connection")
            return
        self.transport.write(request)

    async def wait(self) -> None:
        self.waiter = self.loop.create_future()
        try:
            await self.waiter
        finally:
            self.waiter = None

    def fail(self, error: UpstreamError) -> None:
        """End the exchange with `error` (unless it already ended) and drop the connection."""
        if not self.complete and self.error is None:
            self.error = error
        self.close()
        self._wake()

    def close(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        if not self.closed:
            self.closed = True
            assert self.transport is not None
            self.transport.close()

    def _wake(self) -> None:
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_result(None)

    def _check_idle(self) -> None:
        now = self.loop.time()
        if self.paused:  # waiting for a slow client is not the instance's silence
            self.last_read = now
        idle = now - self.last_read
        if idle >= self.timeout:
            self.fail(UpstreamTimeout(f"no data from {self.origin.host}:{self.origin.port} for {self.timeout:g} s"))
        else:
            self.timer = self.loop.call_later(self.timeout - idle, self._check_idle)

    # ---- asyncio.Protocol ----
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # a stream transport (uvloop's is no subclass)

    def data_received(self, data: bytes) -> None:
        if not self.busy:  # nothing was asked: a broken or confused peer
            self.close()
            return
        self.last_read = self.loop.time()
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError as e:
            self.fail(UpstreamError(f"malformed HTTP answer from {self.origin.host}:{self.origin.port}: {e}"))

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self.busy and not self.complete:
            if self.until_close and self.error is None:  # a body without length ends with the connection
                self.complete = True
            else:
                why = f": {type(exc).__name__}: {exc}" if exc else ""
                self.fail(UpstreamError(f"connection to {self.origin.host}:{self.origin.port} closed before the"
                                        f" answer was complete{why}"))  # fmt: skip
        self.close()
        self._wake()
        if not self.busy:
            self.pool._forget(self)

    # ---- httptools callbacks ----
    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers.append((name.lower(), value))

    def on_headers_complete(self) -> None:
        self.status = self.parser.get_status_code()
        self.keep_alive = self.parser.should_keep_alive()
        names = {n for n, _ in self.headers}
        self.until_close = b"content-length" not in names and b"transfer-encoding" not in names
        self.headers_done = True
        self._wake()

    def on_body(self, body: bytes) -> None:
        self.chunks.append(body)
        self.buffered += len(body)
        if self.buffered > HIGH_WATER_BYTES and not self.paused:
            assert self.transport is not None
            self.transport.pause_reading()
            self.paused = True
        self._wake()

    def on_message_complete(self) -> None:
        self.complete = True
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        self._wake()


class UpstreamResponse:
    """An instance's answer, from its headers on. Read it whole (`read`) or by chunks (`next_chunk`, then
    `release`); `close` drops it unread."""

    def __init__(self, conn: _Connection) -> None:
        self._conn: _Connection | None = conn
        self.status: int = conn.status
        self.headers = conn.headers
        self.content = b""

    def header(self, name: bytes) -> bytes | None:
        """The first value of header `name` (lower case)."""
        for n, v in self.headers:
            if n == name:
                return v
        return None

    @property
    def text(self) -> str:
        return self.content.decode(errors="replace")

    async def next_chunk(self) -> bytes:
        """Everything received since the last call (waiting for at least one byte), or b"" at the end of the body.
        Raises UpstreamError if the exchange broke off; what arrived before the break is returned first."""
        c = self._conn
        assert c is not None, "the response was released"
        while not c.chunks:
            if c.complete:
                return b""
            if c.error is not None:
                raise c.error
            await c.wait()
        data = c.chunks.popleft() if len(c.chunks) == 1 else b"".join(c.chunks)
        c.chunks.clear()
        c.buffered = 0
        if c.paused and c.transport is not None:
            c.paused = False
            c.transport.resume_reading()
        return data

    async def read(self) -> bytes:
        """The whole body (also kept as `content`); the connection goes back to the pool. Raises UpstreamError."""
        parts = []
        try:
            while chunk := await self.next_chunk():
                parts.append(chunk)
        finally:
            self.release()
        self.content = b"".join(parts)
        return self.content

    def abort(self, error: UpstreamError) -> None:
        """Break an unfinished exchange off from outside: a waiting `next_chunk` raises `error`; the connection is
        closed."""
        if self._conn is not None and not self._conn.complete:
            self._conn.fail(error)

    def release(self) -> None:
        """Done with the answer: a fully read one returns its connection to the pool, anything else closes it."""
        c, self._conn = self._conn, None
        if c is None:
            return
        c.busy = False
        if c.complete and c.error is None and c.keep_alive and not c.closed:
            c.pool._checkin(c)
        else:
            c.close()

    close = release


class UpstreamPool:
    """Keep-alive connections per instance (base URL), opened on demand without a limit: the instances bound their
    own concurrency. `timeout` is the read timeout: the longest wait for the next byte of an answer."""

    def __init__(self, timeout: float, connect_timeout: float) -> None:
        self.timeout, self.connect_timeout = timeout, connect_timeout
        self._origins: dict[str, _Origin] = {}
        self._idle: dict[_Origin, dict[_Connection, float]] = {}  # insertion order: the last is the warmest

    async def request(
        self, base_url: str, method: str, path: str, headers: bytes = b"", body: bytes = b"",
        timeout: float | None = None,
    ) -> UpstreamResponse:  # fmt: skip
        """Send one request and return at the answer's headers. `headers`: extra header lines, each ending in
        CRLF (Host and Content-Length are added). Raises ConnectFailed, UpstreamTimeout or UpstreamError; a
        cancelled call closes its connection."""
        origin = self._origins.get(base_url)
        if origin is None:
            origin = self._origins[base_url] = _Origin.parse(base_url)
        conn = self._checkout(origin) or await self._connect(origin, timeout)
        head = b"%s %s HTTP/1.1\r\nhost: %s\r\ncontent-length: %d\r\n%s\r\n" % (
            method.encode(), path.encode(), origin.host_header, len(body), headers,
        )  # fmt: skip
        conn.start(head + body, timeout or self.timeout)
        try:
            while not conn.headers_done:
                if conn.error is not None:
                    raise conn.error
                await conn.wait()
        except BaseException:
            conn.busy = False
            conn.close()
            raise
        return UpstreamResponse(conn)

    async def close(self) -> None:
        for idle in self._idle.values():
            for conn in list(idle):
                conn.close()
        self._idle.clear()

    def _checkout(self, origin: _Origin) -> _Connection | None:
        idle = self._idle.get(origin)
        if not idle:
            return None
        now = asyncio.get_running_loop().time()
        while idle:
            conn, since = idle.popitem()
            if not conn.closed and now - since < KEEPALIVE_S:
                return conn
            conn.close()
        return None

    def _checkin(self, conn: _Connection) -> None:
        idle = self._idle.setdefault(conn.origin, {})
        if len(idle) >= MAX_IDLE_PER_INSTANCE:
            conn.close()
        else:
            idle[conn] = conn.loop.time()

    def _forget(self, conn: _Connection) -> None:
        idle = self._idle.get(conn.origin)
        if idle is not None:
            idle.pop(conn, None)

    async def _connect(self, origin: _Origin, timeout: float | None) -> _Connection:
        # Not asyncio.wait_for: before Python 3.12 it can swallow a cancellation that comes as the connection is
        # made, and the caller then runs on, holding a connection that nobody will close.
        loop = asyncio.get_running_loop()
        limit = min(self.connect_timeout, timeout or self.timeout)
        task = loop.create_task(
            loop.create_connection(lambda: _Connection(self, origin), origin.host, origin.port, ssl=origin.ssl)
        )
        try:
            done, _ = await asyncio.wait({task}, timeout=limit)
        except BaseException:
            _drop_connect(task)
            raise
        if not done:
            _drop_connect(task)
            raise ConnectFailed(f"connecting to {origin.host}:{origin.port} timed out after {limit:g} s")
        try:
            _, conn = task.result()
        except OSError as e:
            raise ConnectFailed(f"cannot connect to {origin.host}:{origin.port}: {e.strerror or e}") from None
        return conn


def _drop_connect(task: asyncio.Task[tuple[asyncio.BaseTransport, _Connection]]) -> None:
    """Give up on a connection attempt; one that completes all the same is closed."""

    def close(t: asyncio.Task[tuple[asyncio.BaseTransport, _Connection]]) -> None:
        if not t.cancelled() and t.exception() is None:
            t.result()[0].close()

    task.cancel()
    task.add_done_callback(close)
