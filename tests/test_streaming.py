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
