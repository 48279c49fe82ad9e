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
