"""The serving benchmarks' HTTP client (benchmarks/bench_gpu_serve._stream): it counts each streamed `data:` event
once, markers split across reads included, leaves `[DONE]` out, and names the status of a refused request."""

from __future__ import annotations

import asyncio

import pytest

from benchmarks.bench_gpu_serve import _stream, run_load


async def _serve_and_load(events: list[bytes], status: bytes, clients: int, chunk: int) -> list[list[float]]:
    """A server writing `events` (then `data: [DONE]`) `chunk` bytes at a time to each of `clients` requests."""

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        body = b"".join(b"data: " + e + b"\n\n" for e in events) + b"data: [DONE]\n\n"
        writer.write(b"HTTP/1.1 " + status + b"\r\ncontent-type: text/event-stream\r\n\r\n")
        for i in range(0, len(body), chunk):
            writer.write(body[i : i + chunk])
            await writer.drain()
            await asyncio.sleep(0.001)  # separate reads on the client's side
        writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    async with server:
        return await asyncio.gather(*[_stream(f"http://127.0.0.1:{port}", b"{}") for _ in range(clients)])


@pytest.mark.parametrize("chunk", [3, 7, 4096])  # event markers split across reads, and whole events per read
def test_each_event_is_counted_once_in_order_without_the_done_marker(chunk: int) -> None:
    events = [b'{"output_ids": [%d]}' % i for i in range(9)]
    for times in run_load(_serve_and_load(events, b"200 OK", 3, chunk)):
        assert len(times) == 9 and times == sorted(times)


def test_a_refused_request_raises_naming_its_status() -> None:
    with pytest.raises(RuntimeError, match="400 Bad Request"):
        run_load(_serve_and_load([], b"400 Bad Request", 1, 4096))
