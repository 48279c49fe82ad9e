"""Refuses a request body larger than any prompt that fits the context could need, before it is parsed or
tokenized: a multi-megabyte body costs the front nothing but the 413.

The bound is generous on purpose: a token of real text averages a few characters, JSON escaping (`\\uXXXX`)
makes a character at most six bytes, and an `input_ids` entry takes at most eight ("123456, "). So no prompt that
fits the context averages anywhere near MAX_BODY_BYTES_PER_TOKEN per token; BODY_OVERHEAD_BYTES covers the rest
of a request. A /generate batch shares one body, hence one bound.
"""

from __future__ import annotations

from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from pd.server.protocol import ApiError, error_body

MAX_BODY_BYTES_PER_TOKEN = 32
BODY_OVERHEAD_BYTES = 64 << 10


def max_body_bytes(context_length: int) -> int:
    """The largest request body accepted by a server whose context holds `context_length` tokens."""
    return context_length * MAX_BODY_BYTES_PER_TOKEN + BODY_OVERHEAD_BYTES


def too_large_message(max_bytes: int, context_length: int) -> str:
    return (
        f"the request body is larger than {max_bytes} bytes, the most a request for a context of {context_length} "
        f"tokens may send ({MAX_BODY_BYTES_PER_TOKEN} bytes per token plus {BODY_OVERHEAD_BYTES} bytes); "
        "shorten the prompt, or send a batch as several requests"
    )


class BodyLimitMiddleware:
    """413 for a body over `max_bytes`: at once when Content-Length says so, otherwise as soon as the bytes read
    pass the bound (a chunked body), raised from `receive` as an ApiError the app answers."""

    def __init__(self, app: ASGIApp, max_bytes: int, context_length: int) -> None:
        self.app = app
        self.max_bytes = max_bytes
        self._message = too_large_message(max_bytes, context_length)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            response = JSONResponse(error_body(self._message, 413), status_code=413)
            await response(scope, receive, send)
            return
        received = 0

        async def counting_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    raise ApiError(self._message, 413)
            return message

        await self.app(scope, counting_receive, send)
