"""The request body as the balancer reads and extends it: one JSON parse, the few fields the balancer itself
uses checked (everything else is the instances' to validate), `rid` and the bootstrap fields added. The added
fields are spliced onto the client's bytes rather than the whole body dumped again, so a long prompt costs one
parse and no serialisation.

Field names and shapes follow SGLang's PD router: `bootstrap_host` (the prefill URL's host), `bootstrap_port`
(the prefill's bootstrap server), `bootstrap_room` (random, 63 bits); a batched /generate gets one of each per
prompt, as lists.
"""

from __future__ import annotations

import json
import random
from typing import Any

from starlette.responses import JSONResponse, Response

from pd.lb.workers import Worker
from pd.server.protocol import error_body


class LBError(Exception):
    """Ends a request with an OpenAI-shaped JSON error {"error": {"message", "type", "code"}}."""

    def __init__(self, message: str, status: int, err_type: str = "invalid_request_error") -> None:
        super().__init__(message)
        self.status, self.err_type = status, err_type

    def response(self, rid: str | None = None) -> Response:
        return JSONResponse(error_body(str(self), self.status, self.err_type), self.status, headers=rid_headers(rid))


def parse_json_object(raw: bytes) -> dict[str, Any]:
    """A request body that must be a JSON object. Raises LBError (400) for malformed JSON (nesting past the
    recursion limit and integers past Python's 4300-digit limit included) and for any other JSON value."""
    try:
        body = json.loads(raw)
    except RecursionError:
        raise LBError("request body is not valid JSON: it is nested too deeply", 400) from None
    except ValueError as e:  # JSONDecodeError, UnicodeDecodeError, the integer digit limit
        raise LBError(f"request body is not valid JSON: {e}", 400) from None
    if not isinstance(body, dict):
        raise LBError(f"request body must be a JSON object, got {type(body).__name__}", 400)
    return body


def parse_body(raw: bytes) -> tuple[dict[str, Any], bool]:
    """The request body as a dict and its `stream` flag. Raises LBError (400) for what the balancer itself reads:
    malformed JSON, a non-object, a non-bool `stream`. Everything else is left for the instances to validate."""
    body = parse_json_object(raw)
    stream = body.get("stream")
    if stream is not None and not isinstance(stream, bool):
        raise LBError(f"'stream' must be true or false, got {stream!r}", 400)
    return body, bool(stream)


def batch_size(body: dict[str, Any]) -> int | None:
    """Number of prompts of a batched /generate (text list, or list of input_id lists); None for one prompt.
    A batch gets one bootstrap room per prompt, as in SGLang's router."""
    text, ids = body.get("text"), body.get("input_ids")
    if isinstance(text, list) and text:
        return len(text)
    if text is None and isinstance(ids, list) and ids and isinstance(ids[0], list):
        return len(ids)
    return None


def assign_rids(body: dict[str, Any], n: int | None) -> tuple[str, list[str]]:
    """Take `rid` from the body or make one (random, 32 hex digits); returns (request id, rid per prompt). The
    body is not changed. A batch's rid is a list of n strings (made as '<id>-<i>'). Raises LBError (400) for a
    malformed rid."""
    rid = body.get("rid")
    if n is None:
        if rid is None:
            rid = _new_id()
        elif not isinstance(rid, str) or not rid:
            raise LBError(f"'rid' must be a non-empty string, got {rid!r}", 400)
        return rid, [rid]
    if rid is None:
        base = _new_id()
        return base, [f"{base}-{i}" for i in range(n)]
    if not (isinstance(rid, list) and len(rid) == n and all(isinstance(r, str) and r for r in rid)):
        raise LBError(f"'rid' of a batch of {n} prompts must be a list of {n} non-empty strings, got {rid!r}", 400)
    return rid[0], rid


def _new_id() -> str:
    return f"{random.getrandbits(128):032x}"  # as unique as uuid4().hex, at a tenth of its cost


def bootstrap_fields(prefill: Worker, n: int | None) -> dict[str, Any]:
    """The fields that pair the two halves: where decode fetches the KV from, and the room that names it."""
    if n is None:
        return {"bootstrap_host": prefill.bootstrap_host, "bootstrap_port": prefill.bootstrap_port,
                "bootstrap_room": random.getrandbits(63)}  # fmt: skip
    return {"bootstrap_host": [prefill.bootstrap_host] * n, "bootstrap_port": [prefill.bootstrap_port] * n,
            "bootstrap_room": [random.getrandbits(63) for _ in range(n)]}  # fmt: skip


def encode_body(raw: bytes, body: dict[str, Any], added: dict[str, Any]) -> bytes:
    """The body to forward: `body` (parsed from the client's `raw` bytes) with the `added` fields. When the client
    sent none of them and plain UTF-8, they are spliced in before the closing brace of `raw`; otherwise `body` is
    updated and dumped (the added values win, as with a dict update). Raises LBError (400) when a body nested close
    to the recursion limit cannot be dumped again."""
    if not added:  # regular mode with the client's own rid: the bytes go on as they came
        return raw
    text = raw.strip()
    if text[:1] != b"{" or text[-1:] != b"}" or any(k in body for k in added):
        body.update(added)
        try:
            return json.dumps(body, separators=(",", ":")).encode()
        except RecursionError:  # parsed near the recursion limit, dumped from deeper in the stack
            raise LBError("request body is nested too deeply", 400) from None
    extra = json.dumps(added, separators=(",", ":")).encode()
    return text[:-1] + (b"," if body else b"") + extra[1:]


def rid_headers(rid: str | None) -> dict[str, str] | None:
    """{"x-request-id": rid} for a Starlette response, if `rid` can be a header value."""
    return {"x-request-id": rid} if rid and request_id_header(rid) is not None else None


def request_id_header(rid: str) -> bytes | None:
    """`rid` as the value of an x-request-id header, or None where it cannot be one (control or non-ASCII
    characters): the request still goes through, only without the header."""
    return rid.encode() if rid.isascii() and rid.isprintable() else None


def routing_text(route: str, body: dict[str, Any]) -> str:
    """The text a prefix-matching policy (cache_aware) routes by: /generate's `text` or `input_ids`, /v1/completions'
    `prompt`, or the contents of /v1/chat/completions' `messages` one per line (as sglang-router, roles and JSON
    syntax left out: text every conversation shares would make unrelated conversations look alike; a conversation
    resent with one more turn keeps its earlier text as a prefix). A batch is routed by its first prompt. "" when
    the body holds no prompt of a known shape (the instance answers that error)."""
    if route == "/v1/chat/completions":
        messages = body.get("messages")
        if not isinstance(messages, list):
            return ""
        return "\n".join(_content_text(m.get("content")) for m in messages if isinstance(m, dict))
    prompt = body.get("prompt") if route == "/v1/completions" else body.get("text", body.get("input_ids"))
    return _prompt_text(prompt)


def _content_text(content: Any) -> str:
    """A message's text: the string, or the text of its parts (OpenAI's [{"type": "text", "text": ...}, ...])."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return " ".join(p["text"] for p in content if isinstance(p, dict) and isinstance(p.get("text"), str))
    return ""


def _prompt_text(prompt: Any) -> str:
    if isinstance(prompt, str):
        return prompt
    if not isinstance(prompt, list) or not prompt:
        return ""
    if isinstance(prompt[0], (str, list)):  # a batch
        return _prompt_text(prompt[0])
    # Token ids: one character per id, so a match ratio is a ratio of tokens and the tree stays small.
    try:
        return "".join(map(chr, prompt))
    except (TypeError, ValueError, OverflowError):  # not ids an instance would accept; route by their spelling
        return " ".join(map(str, prompt))
