"""Fuzzing the HTTP fronts: every route of a prefill and a decode instance and of `pd lb`, with hostile bodies (see
tests/fuzz/bodies.py), methods, paths and content types, while probes go through the balancer.

Each answer comes within the request deadline and is never a 5xx (every fuzzed request is the client's fault or a
valid request): a 4xx carries an OpenAI-shaped error with a message, a 2xx is well-formed JSON or a complete SSE
stream without an error event. The instances are sent requests that cannot reach their engine (a bootstrap field
is missing: only the balancer adds those), so their validation is fuzzed alone and fast; through the balancer,
whatever is valid is generated. Admin routes of the balancer never change its membership for good: a fuzzed
worker that gets added is removed again, and the real instances stay in rotation.
"""

from __future__ import annotations

import json
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import httpx
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from tests.fuzz.bodies import (
    BOOTSTRAP_FIELDS,
    content_types,
    encoded,
    json_values,
    methods,
    odd_paths,
    route_bodies,
)
from tests.fuzz.deployment import CONTEXT, FUZZ, REQUEST_DEADLINE_S, Oracle, Watch, assert_alive, probe_prompts
from tests.pd_cluster import Cluster
from tests.server_process import free_port

POST_ROUTES = ("/generate", "/v1/completions", "/v1/chat/completions", "/abort_request")
INSTANCE_GETS = ("/health", "/health_generate", "/get_server_info", "/server_info", "/get_model_info", "/model_info",
                 "/v1/models", "/v1/models/m", "/metrics")  # fmt: skip
LB_POSTS = (*POST_ROUTES, "/flush_cache")
LB_GETS = ("/health", "/health_generate", "/get_server_info", "/list_workers", "/v1/models", "/get_model_info",
           "/model_info", "/metrics")  # fmt: skip


# uvicorn's answer (400, plain text) to what its HTTP parser refuses before the app sees it (a control character in a
# header value, say).
HTTP_PARSER_REJECTION = "Invalid HTTP request received."


@dataclass(frozen=True)
class Req:
    method: str
    path: str
    content: bytes
    content_type: str | None

    def send(self, client: httpx.Client, base: str) -> httpx.Response:
        headers = {} if self.content_type is None else {"content-type": self.content_type}
        try:
            return client.request(self.method, base + self.path, content=self.content, headers=headers)
        except httpx.TimeoutException:
            raise AssertionError(f"no answer within {REQUEST_DEADLINE_S:g} s to {self}") from None


def defused(body: Any, instance: Any | None) -> Any:
    """`body` without what would end other clients' requests by design (abort_all is the operator's "stop
    everything"), and, for an instance (`instance` is a drawn bootstrap field name), without that bootstrap field:
    only the balancer adds them, so the request cannot reach the engine and wait out a bootstrap timeout."""
    if isinstance(body, dict):
        if body.get("abort_all") is True:
            body["abort_all"] = False
        if instance is not None:
            body.pop(instance, None)
    return body


@st.composite
def fuzzed_requests(draw: st.DrawFn, posts: tuple[str, ...], gets: tuple[str, ...], instance: bool) -> Req:
    kind = draw(st.sampled_from(["post"] * 6 + ["get", "odd"]))
    if kind == "post":
        path = draw(st.sampled_from(posts))
        body = defused(draw(route_bodies(path)), draw(st.sampled_from(BOOTSTRAP_FIELDS)) if instance else None)
        return Req("POST", path, draw(encoded(body)), draw(st.none() | content_types))
    body = draw(st.none() | json_values)
    content = b"" if body is None else draw(encoded(defused(body, None)))
    path = draw(st.sampled_from(gets) if kind == "get" else odd_paths)
    return Req(draw(methods), path, content, draw(st.none() | content_types))


def check_answer(r: httpx.Response, req: Req) -> None:
    """Below 500; a 4xx says what is wrong in OpenAI's shape; a 2xx body is well-formed."""
    where = f"{req.method} {req.path} {req.content[:300]!r} (content-type {req.content_type!r})"
    assert r.status_code < 500, f"{where}: {r.status_code} {r.text[:1500]}"
    if req.method == "HEAD" or not r.content:
        return
    ctype = r.headers.get("content-type", "")
    if r.status_code >= 400 and r.text == HTTP_PARSER_REJECTION:
        return
    if r.status_code >= 400:
        error = r.json().get("error")
        assert isinstance(error, dict) and isinstance(error.get("message"), str) and error["message"], (where, r.text)
    elif ctype.startswith("text/event-stream"):
        events = [line[len("data: ") :] for line in r.text.split("\n") if line.startswith("data: ")]
        assert events and events[-1] == "[DONE]", (where, r.text[-500:])
        for e in events[:-1]:
            assert "error" not in json.loads(e), (where, e)
    elif ctype.startswith("application/json"):
        r.json()


@pytest.mark.parametrize("target", ["prefill", "decode", "balancer"])
def test_fuzzed_requests_get_a_4xx_or_a_well_formed_answer_and_probes_keep_their_tokens(
    fuzz_cluster: Cluster, watch: Watch, target: str
) -> None:
    instance = target != "balancer"
    url = {"prefill": fuzz_cluster.prefill[0].url, "decode": fuzz_cluster.decode[0].url}.get(target, fuzz_cluster.url)
    posts, gets = (POST_ROUTES, INSTANCE_GETS) if instance else (LB_POSTS, LB_GETS)
    client = httpx.Client(timeout=REQUEST_DEADLINE_S)

    @settings(FUZZ, max_examples=250 if instance else 300)
    @given(fuzzed_requests(posts, gets, instance))
    # Findings, kept as explicit examples: each answered 500 before its fix.
    @example(Req("POST", "/generate", b'{"input_ids": [1], "deep": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", None))
    @example(Req("POST", "/generate", b'{"text": "x", "sampling_params": {"max_new_tokens": ' + b"9" * 5000 + b"}}",
                 "application/json"))  # fmt: skip
    @example(Req("POST", "/generate", b'{"input_ids": [1, 2], "rid": "\\ud800", "sampling_params": '
                                      b'{"max_new_tokens": 2}}', None))  # fmt: skip
    @example(Req("POST", "/v1/chat/completions", b'{"messages": [{"role": "user", "content": "a\\udfffb"}], '
                                                 b'"max_tokens": 2}', None))  # fmt: skip
    @example(Req("POST", "/abort_request", b'{"rid": "\\ud800"}', None))
    @example(Req("POST", "/abort_request", b"[" * 5000, None))
    @example(Req("GET", "/no/such/route", b"", None))
    def fuzz(req: Req) -> None:
        check_answer(req.send(client, url), req)
        assert_alive(fuzz_cluster)

    with client, watch:
        fuzz()


@st.composite
def worker_changes(draw: st.DrawFn, closed_url: str) -> tuple[str, dict[str, str], bytes]:
    """A POST to /add_worker or /remove_worker: (path, query parameters, body bytes). URLs never name a real
    instance: the one that would be valid is a closed port on this machine."""
    urls = st.sampled_from([closed_url, closed_url + "/", closed_url.upper(), "http://127.0.0.1:70000",
                            "http://127.0.0.1:0", "127.0.0.1:1", "http://:1", "http://[::1]:1", "ftp://127.0.0.1:1",
                            closed_url + "/generate", closed_url + "?x=1", ""]) | json_values  # fmt: skip
    ports = st.sampled_from([1, 65535, 0, 65536, -1, "8998", "none", "x", True, 2**64])
    roles = st.sampled_from(["prefill", "decode", "both", "", "PREFILL"]) | json_values
    fields = {"url": urls, "role": roles, "worker_type": roles, "bootstrap_port": ports | json_values}
    body = draw(st.fixed_dictionaries({}, optional=fields) | json_values)
    text = st.text(st.characters(codec="utf-8"), max_size=30)  # a query string carries UTF-8 only
    query = draw(st.dictionaries(st.sampled_from(["url", "role", "bootstrap_port"]) | text, text, max_size=3))
    path = draw(st.sampled_from(["/add_worker", "/remove_worker"]))
    return path, query, draw(encoded(body)) if draw(st.booleans()) else json.dumps(body).encode()


def test_fuzzed_worker_changes_get_a_4xx_or_are_undone_and_the_real_instances_stay_in_rotation(
    fuzz_cluster: Cluster, watch: Watch
) -> None:
    client = httpx.Client(timeout=REQUEST_DEADLINE_S)
    real = sorted(p.url for p in fuzz_cluster.prefill + fuzz_cluster.decode)
    closed_url = f"http://127.0.0.1:{free_port()}"

    @settings(FUZZ, max_examples=100)
    @given(worker_changes(closed_url))
    @example(("/add_worker", {}, b"[" * 100_000))
    def fuzz(change: tuple[str, dict[str, str], bytes]) -> None:
        path, query, content = change
        req = Req("POST", path, content, "application/json")
        r = client.post(fuzz_cluster.url + path, params=query, content=content)
        check_answer(r, req)
        if r.status_code == 200 and path == "/add_worker":  # undo it
            assert client.post(fuzz_cluster.url + "/remove_worker", json={"url": r.json()["url"]}).status_code == 200
        listing = client.get(fuzz_cluster.url + "/list_workers").json()
        assert sorted(listing["urls"]) == real, (req, listing)
        assert all(w["healthy"] for w in listing["prefill"] + listing["decode"]), (req, listing)

    with client, watch:
        fuzz()


def test_a_request_reusing_a_rid_in_flight_is_refused_and_the_first_keeps_its_tokens(
    fuzz_cluster: Cluster, oracle: Oracle
) -> None:
    """Finding (mixed load): the instances refused the second request as a duplicate, and the aborts the balancer
    then sent for its rid ended the first one, which answered 200 with a truncated output. The balancer now refuses
    the second itself, and the first runs to its end."""
    # The first as long as the context allows: at a few ms a token, 48 tokens were over before the second request got
    # to the balancer now and then, which then (rightly) took it.
    first_ids, second_ids = probe_prompts()[1], probe_prompts()[2]
    n = CONTEXT - len(first_ids) - 8
    rid = f"reused-{uuid.uuid4().hex}"

    def generate(ids: list[int], tokens: int) -> httpx.Response:
        body = {"input_ids": ids, "rid": rid, "sampling_params": {"max_new_tokens": tokens, "temperature": 0}}
        return httpx.post(fuzz_cluster.url + "/generate", json=body, timeout=REQUEST_DEADLINE_S)

    def forwarding() -> int:  # requests the balancer has sent to decode and not had answered yet
        return int(httpx.get(fuzz_cluster.url + "/list_workers", timeout=10).json()["decode"][0]["outstanding"])

    with ThreadPoolExecutor(1) as pool:
        first = pool.submit(generate, first_ids, n)
        deadline = time.monotonic() + REQUEST_DEADLINE_S
        while not forwarding():
            assert time.monotonic() < deadline and not first.done(), "the first request was never forwarded"
            time.sleep(0.01)
        second = generate(second_ids, 4)
        answer = first.result()
    assert second.status_code == 400 and "already in flight" in second.text, (second.text, answer.text)
    assert answer.status_code == 200 and answer.json()["output_ids"] == oracle.greedy(first_ids, n), answer.text
