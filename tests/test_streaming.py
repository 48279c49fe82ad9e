"""pd.server.streaming on its own: the SSE response's background task really closes the generation."""

from __future__ import annotations

import asyncio
import threading

from starlette.requests import Request

from pd.server.generation import GenerationChunk
from pd.server.streaming import sse_response


def test_sse_background_task_closes_the_generation_on_the_event_loop() -> None:
    """A response whose body is dropped unread (the client went away before the first byte) still closes the
    generation, whose cleanup aborts the engine request; the close runs on the loop's thread, not a worker's."""
    closed_on: list[threading.Thread] = []

    async def generation():  # noqa: ANN202 (an async generator standing in for stream_generation)
        try:
            for i, text in enumerate("ab"):
                yield GenerationChunk("r", text, text, [i], 3, None, 0.0)
        finally:
            closed_on.append(threading.current_thread())

    async def formatter(chunks):  # noqa: ANN001, ANN202
        async for chunk in chunks:
            yield chunk.text

    async def receive() -> dict[str, object]:
        await asyncio.sleep(3600)
        return {"type": "http.disconnect"}

    async def main() -> None:
        request = Request({"type": "http", "method": "POST", "path": "/generate", "headers": []}, receive)
        response = await sse_response(request, generation(), formatter)
        assert response.background is not None
        await response.background()  # what Starlette runs after the (here never sent) body
        # Closed by now (not later by the loop's shutdown of leftover generators), and on the loop's thread.
        assert closed_on == [threading.main_thread()], closed_on

    asyncio.run(main())


def test_a_generation_finished_in_its_first_chunk_is_answered_whole() -> None:
    """One new token (a prefill-only request): the events and [DONE] in one plain response, the generation closed;
    a generation that goes on streams."""
    from fastapi.responses import StreamingResponse

    from pd.server.generation import FinishReason
    from pd.server.streaming import SSE_DONE

    closed: list[str] = []

    async def generation(finish_first: bool):  # noqa: ANN202
        try:
            first_finish = FinishReason("length", length=1) if finish_first else None
            yield GenerationChunk("r", "a", "a", [7], 3, first_finish, 0.0)
            yield GenerationChunk("r", "b", "ab", [7, 8], 3, FinishReason("length", length=2), 0.0)
        finally:
            closed.append("closed")

    async def formatter(chunks):  # noqa: ANN001, ANN202
        async for chunk in chunks:
            yield f"data: {chunk.text}\n\n"

    async def receive() -> dict[str, object]:
        await asyncio.sleep(3600)
        return {"type": "http.disconnect"}

    async def main() -> None:
        request = Request({"type": "http", "method": "POST", "path": "/generate", "headers": []}, receive)
        whole = await sse_response(request, generation(True), formatter)
        assert not isinstance(whole, StreamingResponse) and whole.media_type == "text/event-stream"
        assert whole.body == f"data: a\n\n{SSE_DONE}".encode() and closed == ["closed"]
        streamed = await sse_response(request, generation(False), formatter)
        assert isinstance(streamed, StreamingResponse)
        await streamed.background()  # type: ignore[misc]

    asyncio.run(main())


def test_the_awaited_generation_starts_before_tasks_already_waiting_and_a_disconnect_cancels_it() -> None:
    """run_unless_disconnected runs its awaitable in the caller's task: its first step (a generation's submission
    to the engine) comes before the steps of tasks already queued (in a burst, the handlers of requests read in
    the meantime), not after them. A client that goes away cancels the awaitable (whose cleanup runs) and raises
    ClientDisconnected; the caller's task is not left cancelled."""
    import pytest

    import pd.server.streaming as streaming

    order: list[str] = []

    async def step(name: str, forever: bool = False) -> str:
        order.append(name)
        try:
            await asyncio.sleep(3600 if forever else 0)
        finally:
            order.append(f"{name} cleaned up")
        return name

    def request_gone_after(calls: int) -> Request:
        seen = {"n": 0}

        async def receive() -> dict[str, object]:
            seen["n"] += 1
            if seen["n"] >= calls:
                return {"type": "http.disconnect"}
            await asyncio.sleep(3600)
            return {"type": "http.request", "body": b"", "more_body": False}

        return Request({"type": "http", "method": "POST", "path": "/generate", "headers": []}, receive)

    async def main() -> None:
        waiting = asyncio.ensure_future(step("queued before"))
        assert await streaming.run_unless_disconnected(request_gone_after(10**9), step("generation")) == "generation"
        await waiting
        assert order[0] == "generation", order

        order.clear()
        with pytest.raises(streaming.ClientDisconnected):
            await streaming.run_unless_disconnected(request_gone_after(1), step("abandoned", forever=True))
        assert order == ["abandoned", "abandoned cleaned up"], order
        cancelling = getattr(asyncio.current_task(), "cancelling", None)  # Python 3.11+
        assert cancelling is None or not cancelling()
        await asyncio.sleep(0)  # still runs: no cancellation left pending on this task

    original = streaming.DISCONNECT_POLL_S
    streaming.DISCONNECT_POLL_S = 0.01
    try:
        asyncio.run(main())
    finally:
        streaming.DISCONNECT_POLL_S = original


def test_last_chunk_returns_the_final_chunk_and_leaves_the_ending_to_the_answer() -> None:
    """A non-streamed answer takes each finished chunk as soon as it comes; the generations' endings (their metrics and
    log lines, in their finally) run once the answer is sent, each once; by default last_chunk ends the generation
    itself, and an answer that fails closes them at once."""
    from pd.server.generation import FinishReason
    from pd.server.streaming import close_after_answer, close_soon, last_chunk

    events: list[str] = []

    async def generation(name: str):  # noqa: ANN202
        try:
            yield GenerationChunk(name, "a", "a", [7], 3, None, 0.0)
            yield GenerationChunk(name, "b", "ab", [7, 8], 3, FinishReason("length", length=2), 0.0)
            events.append(f"{name} after the last chunk")  # never: stream_generation returns after a finished chunk
        finally:
            events.append(f"{name} ended")

    async def main() -> None:
        gens = [generation("x"), generation("y")]
        finals = [await last_chunk(g, leave_open=True) for g in gens]
        assert [f.output_ids for f in finals] == [[7, 8]] * 2 and events == [], events
        await close_after_answer(gens)()
        assert events == ["x ended", "y ended"], events
        events.clear()
        assert (await last_chunk(generation("z"))).finish is not None and events == ["z ended"], events
        events.clear()
        failed = generation("w")
        await last_chunk(failed, leave_open=True)
        close_soon([failed])
        await asyncio.sleep(0.01)
        assert events == ["w ended"], events

    asyncio.run(main())
