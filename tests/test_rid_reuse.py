"""A request id is free again as soon as its request's answer can go out, although the generation's ending (metrics,
log line, closing the engine stream) runs after the answer: a client that sends the same rid again right after the
answer is served, not refused as "already in flight", and the first request's late ending touches nothing of the
second (its queue, its owner, no abort sent for it)."""

from __future__ import annotations

import asyncio
import json
from multiprocessing import Pipe
from typing import Any

from pd.dist.launch import LeaderLink
from pd.engine.client import EngineClient
from pd.engine.io import (
    AbortRequest,
    EngineStats,
    GenerateRequest,
    SamplingParams,
    TokenOutput,
    output_to_row,
    to_dict,
    unpack_messages,
)
from pd.server_args import ServerArgs
from tests.test_http_api import make_app
from tests.test_http_api import tokenizer as tokenizer  # noqa: F401  (session fixture)


def test_the_engine_client_frees_a_finished_rid_before_its_stream_is_closed() -> None:
    async def main() -> None:
        engine_end, front_end = Pipe(duplex=False)
        out_recv, _ = Pipe(duplex=False)
        client = EngineClient(ServerArgs(model_path="/models/none", device="cpu"), spec=None)  # type: ignore[arg-type]
        client._leaders = [LeaderLink(inbox=front_end, outbox=out_recv)]
        client._loop = asyncio.get_running_loop()
        client._stats = [EngineStats(0, 0, 8, 8, 16, 0, 0)]
        req = GenerateRequest("x", [1, 2, 3], SamplingParams(max_new_tokens=1))
        first = client.generate(req)
        pending = asyncio.ensure_future(anext(first))
        await asyncio.sleep(0)
        stats = to_dict(EngineStats(0, 0, 8, 8, 16, 0, 0))
        client._deliver(0, {"stats": stats, "outputs": [output_to_row(TokenOutput("x", [5], 3, 1, "length"))]})
        assert (await pending).finish_reason == "length"  # the answer's chunk; the stream is still open
        second = client.generate(req)  # the same rid again: accepted
        waiting = asyncio.ensure_future(anext(second))
        await asyncio.sleep(0)
        await first.aclose()  # the first request's late ending
        assert client._queues.get("x") is not None and client._owner.get("x") == 0, "the ending dropped the second"
        client._deliver(0, {"stats": stats, "outputs": [output_to_row(TokenOutput("x", [6], 3, 1, "length"))]})
        assert (await waiting).new_token_ids == [6]
        await second.aclose()
        await asyncio.sleep(0)
        sent = []
        while engine_end.poll(0):
            sent += list(unpack_messages(engine_end.recv_bytes()))
        assert [type(m) for m in sent] == [GenerateRequest, GenerateRequest], sent
        assert not any(isinstance(m, AbortRequest) for m in sent)

    asyncio.run(main())


def test_a_batched_answers_rids_can_be_sent_again_before_its_generations_end(tokenizer: Any) -> None:
    app, _ = make_app(tokenizer)
    body = json.dumps({"input_ids": [[1, 2, 3], [4, 5]], "rid": ["a", "b"],
                       "sampling_params": {"max_new_tokens": 2}}).encode()  # fmt: skip

    async def call(on_body: Any = None) -> list[dict[str, Any]]:
        sent: list[dict[str, Any]] = []
        scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST",
                 "scheme": "http", "path": "/generate", "raw_path": b"/generate", "query_string": b"",
                 "root_path": "", "headers": [(b"content-type", b"application/json")], "client": ("127.0.0.1", 1),
                 "server": ("127.0.0.1", 2), "state": {}}  # fmt: skip
        delivered = False

        async def receive() -> dict[str, Any]:
            nonlocal delivered
            if not delivered:
                delivered = True
                return {"type": "http.request", "body": body, "more_body": False}
            await asyncio.sleep(3600)
            return {"type": "http.disconnect"}

        async def send(message: dict[str, Any]) -> None:
            sent.append(message)
            if message["type"] == "http.response.body" and on_body is not None:
                await on_body()  # the answer is out; the generations' endings have not run yet

        await app(scope, receive, send)
        return sent

    async def main() -> None:
        again: list[list[dict[str, Any]]] = []

        async def resend() -> None:
            again.append(await call())

        first = await call(resend)
        assert first[0]["status"] == 200
        assert again and again[0][0]["status"] == 200, again[0][1]["body"] if again else "no second call"
        assert [o["meta_info"]["id"] for o in json.loads(again[0][1]["body"])] == ["a", "b"]

    asyncio.run(main())
