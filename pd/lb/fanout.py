"""Admin POSTs the balancer sends to every instance it fronts (`/abort_request`, `/flush_cache`, `/start_profile`,
`/stop_profile`), with one answer.

The client's body and Authorization header go to each instance as they are, all at once. The answer is 200 with
{"workers": {url: status}} when every instance answered 2xx (for the profile routes, with {"answers": {url: text}}:
where each instance's traces went); otherwise an OpenAI-shaped error that names each
failing instance and why, with the same "workers" map: the instances' 4xx status when every failure is one (the
client sent something they refuse: their common status, else 400), 502 when any instance failed otherwise. An
instance that does not have the route (404) is listed under "unsupported" when the route is in `optional`, and
does not fail the call.
"""

from __future__ import annotations

import asyncio
from collections.abc import Collection, Sequence

from fastapi.responses import JSONResponse

from pd.lb.upstream import UpstreamError, UpstreamPool
from pd.server.protocol import error_body

FANOUT_ROUTES = ("/abort_request", "/flush_cache", "/start_profile", "/stop_profile")
# Routes an instance may lack (pd serve and SGLang have them; an older server may not): reported, not a failure.
OPTIONAL_ROUTES = frozenset({"/flush_cache", "/start_profile", "/stop_profile"})
# Routes whose instances' answers are passed on (the trace files /stop_profile wrote).
ANSWERED_ROUTES = frozenset({"/start_profile", "/stop_profile"})
FANOUT_TIMEOUT_S = 30.0
# An instance answers /stop_profile once its traces are written: minutes for a long profile of a large model.
ROUTE_TIMEOUT_S = {"/stop_profile": 600.0}


async def fan_out(
    pool: UpstreamPool, urls: Sequence[str], path: str, headers: bytes, body: bytes,
    optional: Collection[str] = OPTIONAL_ROUTES,
) -> JSONResponse:  # fmt: skip
    """POST `body` to `path` on every instance in `urls` at once; the aggregate answer described above.
    `headers`: extra header lines, each ending in CRLF."""

    answers: dict[str, str] = {}
    timeout = ROUTE_TIMEOUT_S.get(path, FANOUT_TIMEOUT_S)

    async def one(url: str) -> int | str:
        try:
            resp = await pool.request(url, "POST", path, headers, body, timeout=timeout)
            text = (await resp.read()).decode(errors="replace").strip()
        except UpstreamError as e:
            return f"{type(e).__name__}: {e}"
        if 200 <= resp.status < 300 and path in ANSWERED_ROUTES:
            answers[url] = text
        return resp.status if 200 <= resp.status < 300 or not text else f"{resp.status} {text[:200]}"

    results = dict(zip(urls, await asyncio.gather(*(one(u) for u in urls)), strict=True))
    unsupported = [u for u, r in results.items() if path in optional and _status(r) == 404]
    failed = {u: r for u, r in results.items() if not (isinstance(r, int) and r < 300) and u not in unsupported}
    content: dict[str, object] = {"workers": results}
    if answers:
        content["answers"] = answers
    if unsupported:
        content["unsupported"] = unsupported
    if not urls:
        content = error_body(f"POST {path}: the balancer fronts no instance", 503, "service_unavailable")
        return JSONResponse(content, 503)
    if not failed:
        return JSONResponse(content, 200)
    reasons = "; ".join(f"{u}: {r}" for u, r in failed.items())
    refused = {_status(r) for r in failed.values()}
    if all(s is not None and 400 <= s < 500 for s in refused):
        # The instances refused what the client sent (a malformed body, a wrong key): the client's error, not ours.
        status = refused.pop() if len(refused) == 1 else 400
        message = f"POST {path} was refused by {len(failed)} of {len(urls)} instances: {reasons}"
        return JSONResponse({**error_body(message, status), **content}, status)
    message = f"POST {path} failed on {len(failed)} of {len(urls)} instances: {reasons}"
    return JSONResponse({**error_body(message, 502, "upstream_error"), **content}, 502)


def _status(result: int | str) -> int | None:
    """The HTTP status of one instance's result (None for a transport failure)."""
    if isinstance(result, int):
        return result
    head = result.split(" ", 1)[0]
    return int(head) if head.isdigit() else None
