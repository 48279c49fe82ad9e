"""The benchmark's HTTP client: one request in, one timed `RequestOutput` out.

Three backends:
- `native`: SGLang's POST /generate with `input_ids` (or `text`) and `sampling_params` {max_new_tokens,
  temperature 0, ignore_eos true}. Each SSE event carries the cumulative `text`, `output_ids` and
  `meta_info.completion_tokens`, so the tokens new in an event are the growth of that count.
- `openai`: POST /v1/completions with `stream_options` {include_usage, continuous_usage_stats}. Servers that
  send per-chunk usage give exact token counts per chunk; otherwise each chunk with text counts as one token and
  the final usage chunk fixes the total.
- `chat`: POST /v1/chat/completions with `messages` (a text prompt becomes one user message), streamed like
  `openai`; a chunk's text is `choices[0].delta.content`, and the opening chunk, which carries only the role,
  holds no token.

Prompt tokens served from the server's prefix cache are read where SGLang reports them: `meta_info.cached_tokens`
(native) and OpenAI's `usage.prompt_tokens_details.cached_tokens` (absent means none).

Streaming is on and ignore_eos is sent unless the client is built with stream=False / ignore_eos=False. Without
streaming the whole answer arrives at once: TTFT equals the end-to-end latency and there are no inter-token
latencies (SGLang's bench_serving reports it the same way); the token count is the response's
meta_info.completion_tokens or usage.completion_tokens. Without ignore_eos the field is left out of the request,
so the server may stop at EOS before max tokens, as it would for a user.

Timing (all time.perf_counter): TTFT is the time from sending to the first event that carries a token. An event
carrying k > 1 new tokens after that (a server that batches its stream, or a decode step of several tokens)
adds k inter-token latencies of gap / k each, where gap is the time since the previous token-carrying event;
this is what SGLang's bench_serving does, and it keeps sum(itl) == last-token time - TTFT and len(itl) ==
output_tokens - 1 when the first event carries one token. Tokens that arrive with the first event add none.
"""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import httpx

from pd.bench.args import BACKENDS
from pd.bench.datasets import BenchRequest

HEALTH_TIMEOUT_S = 10.0
# A server answers /stop_profile once its traces are written: minutes for a long profile of a large model.
PROFILE_TIMEOUT_S = 600.0
PATHS = {"native": "/generate", "openai": "/v1/completions", "chat": "/v1/chat/completions"}


class BenchError(Exception):
    """The benchmark cannot run (server unreachable or unhealthy, warm-up failed, bad configuration)."""


@dataclass
class RequestOutput:
    """What one request measured; times in seconds.

    ttft: time to the first token (0.0 if none arrived). itl: inter-token latencies (see the module doc).
    latency: send to end of response. start_time: perf_counter at send. prompt_len: the server's prompt token
    count when it reports one, else the dataset's. cached_tokens: prompt tokens the server's prefix cache served
    (0 if it reports none). error: "" on success, else why the request failed.
    generated_text: the answer's text (a multi-turn conversation sends it back in the next turn).
    """

    prompt_len: int
    success: bool = False
    ttft: float = 0.0
    itl: list[float] = field(default_factory=list)
    latency: float = 0.0
    output_tokens: int = 0
    start_time: float = 0.0
    error: str = ""
    generated_text: str = ""
    cached_tokens: int = 0


def _auth_headers(api_key: str | None) -> dict[str, str]:
    return {"Authorization": f"Bearer {api_key}"} if api_key else {}


async def check_health(base_url: str, api_key: str | None = None) -> None:
    """GET {base_url}/health; raises BenchError with what to fix if the server is unreachable or not healthy."""
    url = base_url.rstrip("/") + "/health"
    try:
        async with httpx.AsyncClient(timeout=HEALTH_TIMEOUT_S) as http:
            resp = await http.get(url, headers=_auth_headers(api_key))
    except httpx.HTTPError as e:
        raise BenchError(f"cannot reach the server at {base_url} (GET /health: {type(e).__name__}: {e}); "
                         "check --base-url and that the server is running") from None  # fmt: skip
    if resp.status_code != 200:
        raise BenchError(f"the server at {base_url} is not healthy: GET /health answered {resp.status_code} "
                         f"{resp.text[:200]!r}")  # fmt: skip


async def fetch_vocab_size(base_url: str, api_key: str | None = None) -> int | None:
    """The model's vocab size from /model_info (or SGLang's /get_model_info), or None if neither reports it."""
    async with httpx.AsyncClient(timeout=HEALTH_TIMEOUT_S, base_url=base_url) as http:
        for path in ("/model_info", "/get_model_info"):
            try:
                resp = await http.get(path, headers=_auth_headers(api_key))
                value = resp.json().get("vocab_size") if resp.status_code == 200 else None
            except (httpx.HTTPError, ValueError, AttributeError):
                value = None
            if isinstance(value, int) and value > 0:
                return value
    return None


async def server_profile(
    base_url: str, api_key: str | None, action: str, body: dict[str, Any] | None = None
) -> list[str]:
    """POST /start_profile (``action`` "start", with ``body``) or /stop_profile ("stop") to the server; returns the
    trace files a stop listed: pd serve's answer (its first line, then a path a line) or, through pd lb, each
    instance's answer in "answers". Raises BenchError saying why when the server refuses."""
    path = f"/{action}_profile"
    try:
        async with httpx.AsyncClient(timeout=PROFILE_TIMEOUT_S, base_url=base_url) as http:
            resp = await http.post(path, json=body or {}, headers=_auth_headers(api_key))
    except httpx.HTTPError as e:
        raise BenchError(f"POST {path} failed: {type(e).__name__}: {e}") from None
    if resp.status_code != 200:
        hint = " (the server has no profiler: pd serve and SGLang do)" if resp.status_code == 404 else ""
        raise BenchError(f"POST {path} answered {resp.status_code} {resp.text[:300]!r}{hint}")
    try:
        answers = list(resp.json().get("answers", {}).values())  # pd lb: every instance's answer
    except (ValueError, AttributeError):
        answers = [resp.text]
    return [line for answer in answers for line in answer.splitlines()[1:] if line.strip()]


def _error_message(event: dict[str, Any]) -> str:
    err = event.get("error", event)
    return f"error event: {err.get('message', err) if isinstance(err, dict) else err}"


def _choice_text(choice: dict[str, Any], chat_field: str | None) -> str:
    """A choice's text: `text` for completions, `{chat_field}.content` for chat ("delta" in a stream chunk,
    "message" in a whole response); "" when it carries none."""
    text = choice.get("text") if chat_field is None else (choice.get(chat_field) or {}).get("content")
    return text or ""


class BenchClient:
    """Sends requests to one server; use as `async with BenchClient(...) as c: await c.send(req)`.

    max_connections: the connection-pool size; None (no limit) so that an unlimited request rate really has
    every request in flight at once (httpx's default pool would silently cap it at 100).
    """

    def __init__(
        self,
        base_url: str,
        backend: str = "native",
        api_key: str | None = None,
        model: str | None = None,
        timeout_s: float = 3600.0,
        max_connections: int | None = None,
        stream: bool = True,
        ignore_eos: bool = True,
    ) -> None:
        if backend not in BACKENDS:
            raise BenchError(f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}")
        self.backend = backend
        self.model = model
        self.stream = stream
        self.ignore_eos = ignore_eos
        self._http = httpx.AsyncClient(
            base_url=base_url.rstrip("/"),
            headers=_auth_headers(api_key),
            timeout=httpx.Timeout(timeout_s, connect=HEALTH_TIMEOUT_S),
            limits=httpx.Limits(max_connections=max_connections, max_keepalive_connections=max_connections),
        )

    async def __aenter__(self) -> BenchClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self._http.aclose()

    def payload(self, req: BenchRequest) -> dict[str, Any]:
        """The JSON body for `req`: greedy; ignore_eos and streaming unless the client turned them off."""
        messages = isinstance(req.prompt, list) and bool(req.prompt) and isinstance(req.prompt[0], dict)
        assert not messages or self.backend == "chat", "only the chat backend sends messages"
        assert self.backend != "chat" or messages or isinstance(req.prompt, str), "a chat message holds text"
        if self.backend == "native":
            params: dict[str, Any] = {"max_new_tokens": req.output_len, "temperature": 0.0}
            if self.ignore_eos:
                params["ignore_eos"] = True
            prompt_key = "text" if isinstance(req.prompt, str) else "input_ids"
            return {prompt_key: req.prompt, "sampling_params": params, "stream": self.stream}
        body: dict[str, Any] = {"max_tokens": req.output_len, "temperature": 0.0, "stream": self.stream}
        if self.backend == "openai":
            body["prompt"] = req.prompt
        else:
            body["messages"] = req.prompt if messages else [{"role": "user", "content": req.prompt}]
        if self.ignore_eos:
            body["ignore_eos"] = True
        if self.stream:
            body["stream_options"] = {"include_usage": True, "continuous_usage_stats": True}
        if self.model is not None:
            body["model"] = self.model
        return body

    async def send(self, req: BenchRequest) -> RequestOutput:
        """Send `req` and time its response. Never raises for a server or network failure: it is recorded in
        `error` (HTTP status and body, an error event in the stream, a stream cut before `data: [DONE]`)."""
        out = RequestOutput(prompt_len=req.prompt_len)
        out.start_time = time.perf_counter()
        try:
            async with self._http.stream("POST", PATHS[self.backend], json=self.payload(req)) as resp:
                if resp.status_code != 200:
                    body = (await resp.aread()).decode(errors="replace")
                    out.error = f"HTTP {resp.status_code}: {body[:300]}"
                    return out
                if self.stream:
                    out.error = await self._read_stream(resp, out)
                else:
                    raw = await resp.aread()
                    now = time.perf_counter()
                    out.error = self._read_whole(json.loads(raw), out, now)
            out.latency = time.perf_counter() - out.start_time
        # A malformed event (not JSON, not an object, wrong field types) fails the request, not the benchmark.
        except (httpx.HTTPError, ValueError, TypeError, KeyError, AttributeError) as e:
            out.error = f"{type(e).__name__}: {e}"
        if not out.error and out.output_tokens == 0:
            out.error = "the response carried no tokens"
        out.success = not out.error
        return out

    async def _read_stream(self, resp: httpx.Response, out: RequestOutput) -> str:
        """Reads SSE events into `out`; returns "" after `data: [DONE]`, else why the stream failed."""
        timer = _TokenTimer(out)
        async for line in sse_lines(resp):
            now = time.perf_counter()
            if not line.startswith("data:"):
                continue  # blank separators, SSE comments and other fields
            data = line[5:].strip()
            if data == "[DONE]":
                return ""
            event = json.loads(data)
            if "error" in event or event.get("object") == "error":
                return _error_message(event)
            self._on_event(event, timer, now)
        return "the stream ended before data: [DONE]"

    def _on_event(self, event: dict[str, Any], timer: _TokenTimer, now: float) -> None:
        out = timer.out
        if self.backend == "native":
            meta = event.get("meta_info") or {}
            total = meta.get("completion_tokens")
            if total is None:
                total = len(event.get("output_ids") or ())
            timer.tokens_at(int(total), now)
            out.generated_text = event.get("text", out.generated_text)  # cumulative
            if "prompt_tokens" in meta:
                out.prompt_len = int(meta["prompt_tokens"])
            out.cached_tokens = int(meta.get("cached_tokens") or out.cached_tokens)
            return
        usage = event.get("usage") or {}
        choices = event.get("choices") or []
        text = _choice_text(choices[0], "delta" if self.backend == "chat" else None) if choices else ""
        out.generated_text += text
        if not choices:
            # The final usage-only chunk: the true total, but no token arrived now.
            if "completion_tokens" in usage:
                out.output_tokens = max(out.output_tokens, int(usage["completion_tokens"]))
        elif "completion_tokens" in usage:
            timer.tokens_at(int(usage["completion_tokens"]), now)
        elif text:
            timer.tokens_at(timer.count + 1, now)
        if "prompt_tokens" in usage:
            out.prompt_len = int(usage["prompt_tokens"])
            out.cached_tokens = _usage_cached(usage)

    def _read_whole(self, body: dict[str, Any], out: RequestOutput, now: float) -> str:
        """Reads a non-streamed response into `out`; returns "" or why it failed."""
        if "error" in body or body.get("object") == "error":
            return _error_message(body)
        if self.backend == "native":
            meta = body.get("meta_info") or {}
            total, prompt = meta.get("completion_tokens", len(body.get("output_ids") or ())), meta.get("prompt_tokens")
            text = body.get("text")
            out.cached_tokens = int(meta.get("cached_tokens") or 0)
        else:
            usage = body.get("usage") or {}
            total, prompt = usage.get("completion_tokens"), usage.get("prompt_tokens")
            out.cached_tokens = _usage_cached(usage)
            text = _choice_text((body.get("choices") or [{}])[0], "message" if self.backend == "chat" else None)
        if total is None:
            return "the response has no completion token count (usage.completion_tokens)"
        out.ttft = now - out.start_time
        out.output_tokens = int(total)
        out.generated_text = text or ""
        if prompt is not None:
            out.prompt_len = int(prompt)
        return ""


def _usage_cached(usage: dict[str, Any]) -> int:
    """OpenAI usage's cached prompt tokens (prompt_tokens_details is optional: absent means none)."""
    return int((usage.get("prompt_tokens_details") or {}).get("cached_tokens") or 0)


class _TokenTimer:
    """Turns (cumulative token count, arrival time) pairs into TTFT and ITLs on a RequestOutput."""

    def __init__(self, out: RequestOutput) -> None:
        self.out = out
        self.count = 0
        self._last_time = 0.0

    def tokens_at(self, total: int, now: float) -> None:
        new = total - self.count
        if new <= 0:
            return
        if self.count == 0:
            self.out.ttft = now - self.out.start_time
        else:
            gap = now - self._last_time
            self.out.itl.extend([gap / new] * new)
        self.count = total
        self.out.output_tokens = total
        self._last_time = now


async def sse_lines(resp: httpx.Response) -> AsyncIterator[str]:
    """The lines of an event stream as SSE defines them (ended by LF, CR LF or CR). Not httpx's aiter_lines: it splits
    as str.splitlines does, also at U+2028, U+2029 and U+0085, which a server may send unescaped inside an event's
    JSON (generated text holds them now and then), and the event then fails to parse."""
    rest = b""
    async for data in resp.aiter_bytes():
        buf = rest + data
        held = b"\r" if buf.endswith(b"\r") else b""  # perhaps the first half of a CR LF
        lines = buf[: len(buf) - len(held)].replace(b"\r\n", b"\n").replace(b"\r", b"\n").split(b"\n")
        rest = lines.pop() + held
        for line in lines:
            yield line.decode("utf-8")
    if rest.endswith(b"\r"):  # a last line ended by a CR
        yield rest[:-1].decode("utf-8")
    elif rest:  # a last line with no end
        yield rest.decode("utf-8")
