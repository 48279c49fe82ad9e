"""API-key check (`--api-key`): every route except the probes needs `Authorization: Bearer <key>`.

A plain ASGI middleware rather than Starlette's BaseHTTPMiddleware, which would sit between streaming
responses and the server and hide client disconnects from them.
"""

from __future__ import annotations

import hmac

from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Receive, Scope, Send

from pd.server.protocol import error_body

# Load balancers and Prometheus probe these without credentials.
OPEN_PATHS = frozenset({"/health", "/metrics"})


class ApiKeyMiddleware:
    """Answers 401 (OpenAI-style JSON) to HTTP requests without the right bearer token."""

    def __init__(self, app: ASGIApp, api_key: str) -> None:
        self.app = app
        self._expected = f"Bearer {api_key}".encode()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] in OPEN_PATHS or scope["method"] == "OPTIONS":
            await self.app(scope, receive, send)
            return
        given = dict(scope["headers"]).get(b"authorization", b"")
        if hmac.compare_digest(given, self._expected):
            await self.app(scope, receive, send)
            return
        message = "missing or invalid API key; send 'Authorization: Bearer <key>'"
        response = JSONResponse(error_body(message, 401, "authentication_error"), status_code=401)
        await response(scope, receive, send)
