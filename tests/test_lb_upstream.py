"""The balancer's upstream HTTP client (`pd.lb.upstream`) and body splicing (`pd.lb.request.encode_body`).

The client is checked against raw asyncio servers that write exact bytes (chunked, content-length and
close-delimited bodies, hang-ups, silence), so the oracle is what the server put on the wire; the splice is checked
against `json.loads` of the spliced bytes compared with a plain dict update.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
from collections.abc import Awaitable, Callable

import pytest

from pd.lb.request import encode_body
from pd.lb.upstream import ConnectFailed, UpstreamError, UpstreamPool, UpstreamTimeout

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


async def read_request(reader: asyncio.StreamReader) -> tuple[bytes, bytes]:
    """(head, body) of one request with a content-length."""
    head = await reader.readuntil(b"\r\n\r\n")
    length = next(
        int(line.split(b":")[1]) for line in head.split(b"\r\n") if line.lower().startswith(b"content-length")
    )
    return head, await reader.readexactly(length)


def chunked(parts: list[bytes]) -> bytes:
    return b"".join(b"%x\r\n%s\r\n" % (len(p), p) for p in parts) + b"0\r\n\r\n"


async def serve(handler: Handler) -> tuple[asyncio.Server, str]:
    server = await asyncio.start_server(handler, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    return server, f"http://127.0.0.1:{port}"


def run(coro: Awaitable[None]) -> None:
    asyncio.run(asyncio.wait_for(coro, 30))  # type: ignore[arg-type]


def test_bodies_arrive_byte_exact_over_one_kept_alive_connection() -> None:
    parts = [os.urandom(random.randrange(1, 5000)) for _ in range(random.randrange(5, 40))]
    connections = 0

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal connections
        connections += 1
        while True:
            try:
                head, body = await read_request(reader)
            except asyncio.IncompleteReadError:
                return
            path = head.split(b" ")[1]
            if path == b"/chunked":
                writer.write(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n")
                for p in parts:  # one write per part, with pauses, as a decode stream does
                    writer.write(b"%x\r\n%s\r\n" % (len(p), p))
                    await writer.drain()
                    await asyncio.sleep(0.001)
                writer.write(b"0\r\n\r\n")
            else:  # echo the request body with a content-length
                writer.write(
                    b"HTTP/1.1 201 Created\r\ncontent-type: x/y\r\ncontent-length: %d\r\n\r\n%s" % (len(body), body)
                )

    async def main() -> None:
        server, url = await serve(handler)
        pool = UpstreamPool(timeout=10, connect_timeout=5)
        for _ in range(3):
            resp = await pool.request(url, "POST", "/chunked", b"x-a: 1\r\n", b"{}")
            got = []
            while chunk := await resp.next_chunk():
                got.append(chunk)
            resp.release()
            assert resp.status == 200 and b"".join(got) == b"".join(parts)
            payload = os.urandom(70_000)
            resp = await pool.request(url, "POST", "/echo", body=payload)
            assert await resp.read() == payload and resp.status == 201 and resp.header(b"content-type") == b"x/y"
        assert connections == 1
        await pool.close()
        server.close()

    run(main())


def test_a_body_without_length_ends_with_the_connection() -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nconnection: close\r\n\r\nhello ")
        await writer.drain()
        writer.write(b"world")
        writer.close()

    async def main() -> None:
        server, url = await serve(handler)
        pool = UpstreamPool(timeout=10, connect_timeout=5)
        assert await (await pool.request(url, "GET", "/")).read() == b"hello world"
        server.close()

    run(main())


def test_failures_are_typed_and_what_arrived_before_a_break_is_delivered() -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head, _ = await read_request(reader)
        path = head.split(b" ")[1]
        if path == b"/silent":
            await asyncio.sleep(5)
        elif path == b"/cut":
            writer.write(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n5\r\nfirst\r\n")
            await writer.drain()
            await asyncio.sleep(0.05)
        elif path == b"/garbage":
            writer.write(b"SPDY/9 banana\r\n\r\n")
        writer.close()

    async def main() -> None:
        server, url = await serve(handler)
        pool = UpstreamPool(timeout=0.3, connect_timeout=5)
        with pytest.raises(UpstreamTimeout):
            await pool.request(url, "GET", "/silent")
        resp = await pool.request(url, "GET", "/cut")
        assert await resp.next_chunk() == b"first"
        with pytest.raises(UpstreamError, match="closed before the answer was complete"):
            await resp.next_chunk()
        resp.release()
        with pytest.raises(UpstreamError, match="malformed"):
            await pool.request(url, "GET", "/garbage")
        server.close()
        await server.wait_closed()
        with pytest.raises(ConnectFailed):
            await pool.request(url, "GET", "/")

    run(main())


def test_an_unread_answer_closes_its_connection_and_a_slow_reader_gets_every_byte() -> None:
    big = os.urandom(8 << 20)  # beyond the high-water mark: reading pauses and resumes

    async def main() -> None:
        closed = asyncio.Event()

        async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            head, _ = await read_request(reader)
            if head.split(b" ")[1] == b"/big":
                writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\n\r\n" % len(big) + big)
                await writer.drain()
                await reader.read()  # keep the connection until the client is done
                return
            writer.write(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n4\r\ntick\r\n")
            await writer.drain()
            if await reader.read() == b"":  # EOF: the client closed instead of reading on
                closed.set()

        server, url = await serve(handler)
        pool = UpstreamPool(timeout=10, connect_timeout=5)
        resp = await pool.request(url, "GET", "/forever")
        assert await resp.next_chunk() == b"tick"
        resp.release()
        await asyncio.wait_for(closed.wait(), 5)
        resp = await pool.request(url, "GET", "/big")
        got = []
        while chunk := await resp.next_chunk():
            got.append(chunk)
            await asyncio.sleep(0.002)
        resp.release()
        assert b"".join(got) == big
        await pool.close()
        server.close()

    run(main())


@pytest.mark.parametrize(
    "raw",
    [
        b'{"text": "hi", "sampling_params": {"max_new_tokens": 4}, "stream": true}',
        b"  {}\n",
        b'{ "input_ids": [[1, 2], [3]], "rid": ["a", "b"] }\r\n',
        b'{"text": "x", "bootstrap_room": 5}',  # a field the balancer sets: dumped again, its value replaced
        '{"text": "\u00e9t\u00e9 \U0001f600"}'.encode(),
        '\ufeff{"text": "bom"}'.encode(),
        '{"text": "utf16"}'.encode("utf-16"),
    ],
)
def test_spliced_body_equals_the_dict_update(raw: bytes) -> None:
    body = json.loads(raw)
    added = {"bootstrap_host": "h", "bootstrap_port": None, "bootstrap_room": random.getrandbits(63), "rid": "r1"}
    out = encode_body(raw, dict(body), added)
    assert json.loads(out) == {**body, **added}
    if raw.strip().startswith(b"{") and not set(body) & set(added):  # spliced: the client's bytes kept as sent
        assert out.startswith(raw.strip()[:-1])
