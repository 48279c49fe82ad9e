"""Hypothesis strategies for hostile HTTP requests: bodies, their bytes, methods, paths and content types.

A body starts as a valid request for its route (short prompt, at most 4 new tokens) and takes zero to three
mutations: a field (top level, inside `sampling_params`, a chat message or `chat_template_kwargs`) set to an edge
value or a random JSON value of any type, deleted, or an unknown field added. Its JSON text is then sent as is or
damaged: truncated, given garbage or a 5000-digit integer, nested past the recursion limit, re-encoded (UTF-16, a
BOM), given invalid UTF-8, or replaced by random bytes. Every strategy is bounded in size, so an example costs
one short request.
"""

from __future__ import annotations

import json
import math
from typing import Any

from hypothesis import strategies as st

from pd.server.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    GenerateReqInput,
    SamplingParamsInput,
)
from tests.fuzz.deployment import CONTEXT

INT_EDGES = (0, 1, -1, 2, 4, 255, 256, 511, 512, CONTEXT - 1, CONTEXT, 2**31 - 1, 2**31, 2**32, 2**53 + 1,
             2**63 - 1, 2**63, 2**64 - 1, 2**64, -(2**63), -(2**63) - 1, 2**100, -(2**100))  # fmt: skip
FLOAT_EDGES = (0.0, -0.0, 5e-324, 1e-300, 1e-50, 1e-7, 1e-6, 2e-6, 0.5, 1.0, 1.0000001, 2.0, 1e308, -1e-9, -1.0,
               math.nan, math.inf, -math.inf)  # fmt: skip
TEXT_EDGES = ("", " ", "a", "\x00", "\ud800", "a\udfffb", "\U0001f600", "<|im_start|>", "<|im_end|>",
              "<|endoftext|>", "{{ 7 * 7 }}", "{% raw %}", "\r\n\r\n", "%s%n", "NaN", "null", "x" * 3000,
              "\u00e9" * 500, "\u202e\ufeff")  # fmt: skip
# Keyword names apply_chat_template takes itself: as chat_template_kwargs they collide with the front's own.
CHAT_TEMPLATE_KEYS = ("tokenize", "add_generation_prompt", "continue_final_message", "return_dict", "chat_template",
                      "tools", "documents", "padding", "truncation", "max_length", "return_tensors",
                      "return_assistant_tokens_mask", "conversation", "messages")  # fmt: skip

leaves = st.one_of(
    st.none(),
    st.booleans(),
    st.sampled_from(INT_EDGES),
    st.integers(),
    st.sampled_from(FLOAT_EDGES),
    st.floats(),
    st.sampled_from(TEXT_EDGES),
    st.text(max_size=16),
)
keys = st.one_of(st.text(max_size=10), st.sampled_from(TEXT_EDGES[:8]))
json_values = st.recursive(
    leaves, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(keys, inner, max_size=4), max_leaves=10
)

prompt_ids = st.lists(st.integers(0, 255), min_size=1, max_size=12)
prompt_text = st.text(st.characters(codec="utf-8"), min_size=1, max_size=24)
new_tokens = st.integers(1, 4)
temperature = st.sampled_from([0.0, 0.0, 0.7, 1.0])


def _fields(model: Any) -> list[str]:
    return sorted(model.model_fields)


GENERATE_FIELDS = _fields(GenerateReqInput)
SAMPLING_FIELDS = [*_fields(SamplingParamsInput), "max_tokens", "temprature"]
COMPLETION_FIELDS = _fields(CompletionRequest)
CHAT_FIELDS = _fields(ChatCompletionRequest)
MESSAGE_FIELDS = ["role", "content", "name", "tool_calls", "tool_call_id"]
BOOTSTRAP_FIELDS = ("bootstrap_host", "bootstrap_port", "bootstrap_room")


@st.composite
def generate_body(draw: st.DrawFn) -> dict[str, Any]:
    sampling = {"max_new_tokens": draw(new_tokens), "temperature": draw(temperature)}
    if draw(st.booleans()):
        body: dict[str, Any] = {"input_ids": draw(prompt_ids)}
    else:
        body = {"text": draw(prompt_text)}
    if draw(st.integers(0, 5)) == 0:  # a batch of the same kind
        key = next(iter(body))
        body[key] = [body[key], draw(prompt_ids if key == "input_ids" else prompt_text)]
    body["sampling_params"] = sampling
    if draw(st.booleans()):
        body["stream"] = draw(st.booleans())
    return body


@st.composite
def completion_body(draw: st.DrawFn) -> dict[str, Any]:
    prompt = draw(prompt_ids | prompt_text)
    body = {"prompt": prompt, "max_tokens": draw(new_tokens), "temperature": draw(temperature)}
    if draw(st.booleans()):
        body["stream"] = draw(st.booleans())
    return body


@st.composite
def chat_body(draw: st.DrawFn) -> dict[str, Any]:
    roles = draw(st.lists(st.sampled_from(["system", "user", "assistant"]), min_size=1, max_size=3))
    messages = [{"role": r, "content": draw(prompt_text)} for r in roles]
    body = {"messages": messages, "max_tokens": draw(new_tokens), "temperature": draw(temperature)}
    if draw(st.booleans()):
        body["stream"] = draw(st.booleans())
    return body


@st.composite
def mutated(draw: st.DrawFn, base: st.SearchStrategy[dict[str, Any]], top: list[str],
            nested: dict[str, list[str]]) -> dict[str, Any]:  # fmt: skip
    """`base` with 0-3 mutations of its top-level fields (names from `top`) or of the objects under the `nested` keys
    (names from their lists; "messages" means the first chat message)."""
    body = draw(base)
    for _ in range(draw(st.integers(0, 3))):
        where = draw(st.sampled_from([None, *nested]))
        if where is None:
            target, names = body, top
        elif where == "messages":
            messages = body.get("messages")
            if not (isinstance(messages, list) and messages and isinstance(messages[0], dict)):
                continue
            target, names = messages[0], nested[where]
        else:
            if not isinstance(body.get(where), dict):
                body[where] = {}
            target, names = body[where], nested[where]
        key = draw(st.sampled_from(names) | keys)
        action = draw(st.sampled_from(["edge", "edge", "any", "delete"]))
        if action == "delete":
            target.pop(key, None)
        else:
            target[key] = draw(leaves if action == "edge" else json_values)
    return body


def route_bodies(route: str) -> st.SearchStrategy[dict[str, Any]]:
    """Mutated bodies for one generation or admin route of an instance or the balancer."""
    if route == "/generate":
        return mutated(generate_body(), GENERATE_FIELDS, {"sampling_params": SAMPLING_FIELDS})
    if route == "/v1/completions":
        return mutated(completion_body(), COMPLETION_FIELDS, {})
    if route == "/v1/chat/completions":
        nested = {"messages": MESSAGE_FIELDS, "chat_template_kwargs": list(CHAT_TEMPLATE_KEYS),
                  "stream_options": ["include_usage", "continuous_usage_stats"]}  # fmt: skip
        return mutated(chat_body(), CHAT_FIELDS, nested)
    if route == "/abort_request":
        return mutated(st.fixed_dictionaries({"rid": st.text(max_size=12)}), ["rid", "abort_all"], {})
    return st.dictionaries(keys, json_values, max_size=4)


DEEP = (500, 5000, 100_000)  # JSON nesting levels: near and past Python's recursion limit


@st.composite
def encoded(draw: st.DrawFn, body: Any) -> bytes:
    """The bytes sent for `body`: its JSON (NaN and Infinity as Python writes them) as is, or damaged."""
    text = json.dumps(body)
    how = draw(st.sampled_from(["as_is"] * 8 + ["truncated", "garbage", "huge_int", "deep", "utf16", "bom",
                                                "bad_utf8", "random", "empty"]))  # fmt: skip
    if how == "truncated":
        return text[: draw(st.integers(0, max(len(text) - 1, 0)))].encode()
    if how == "garbage":
        return text.encode() + draw(st.binary(min_size=1, max_size=8))
    if how == "empty":
        return draw(st.sampled_from([b"", b" ", b"\n\t ", b"null"]))
    if how == "random":
        return draw(st.binary(max_size=64))
    if how == "utf16":
        return text.encode("utf-16")
    if how == "bom":
        return b"\xef\xbb\xbf" + text.encode()
    if how == "bad_utf8":
        raw = text.encode()
        cut = draw(st.integers(0, len(raw)))
        return raw[:cut] + draw(st.sampled_from([b"\xff", b"\xc3", b"\xed\xa0\x80", b"\xf4\x90\x80\x80"])) + raw[cut:]
    if not (isinstance(body, dict) and text.endswith("}")):
        return text.encode()
    sep = ", " if body else ""
    if how == "huge_int":  # Python's int() refuses more than 4300 digits
        return f'{text[:-1]}{sep}"n": {"9" * 5000}}}'.encode()
    if how == "deep":
        depth = draw(st.sampled_from(DEEP))
        return f'{text[:-1]}{sep}"deep": {"[" * depth}{"]" * depth}}}'.encode()
    return text.encode()


content_types = st.sampled_from([
    "application/json", "application/json", "text/plain", "application/x-www-form-urlencoded",
    "multipart/form-data; boundary=x", "application/json; charset=utf-16", "", "\x7f",
])  # fmt: skip
methods = st.sampled_from(["GET", "POST", "PUT", "DELETE", "PATCH", "OPTIONS", "HEAD"])
odd_paths = st.one_of(
    st.sampled_from(["/", "//generate", "/generate/", "/GENERATE", "/v1", "/v1/models/", "/v1/models/%00",
                     "/v1/models/" + "x" * 2000, "/%2e%2e/etc/passwd", "/generate?stream=true",
                     "/health?x=" + "y" * 4000, "/docs", "/openapi.json", "/abort_request/../health"]),
    st.text(st.characters(codec="ascii", categories=["L", "N", "P"]), max_size=30).map(lambda s: "/" + s),
)  # fmt: skip
