"""A mixed load through `pd lb` over one prefill and one decode instance: 200 normal requests and 64 bad ones
(malformed, extreme, or hostile: 24% of the load), 16 in flight at a time, in random order.

Every normal request (native /generate with token ids or text, streamed or not; OpenAI completions and chat) gets
transformers' greedy tokens. Every malformed one gets a 4xx with an OpenAI-shaped error. Extreme but valid ones
(temperatures that mean greedy, a top_k that cuts nothing, the largest seed, unknown fields, a client's own
bootstrap fields, a form content type) are served and get the greedy tokens too; two requests sharing a rid each
get their own tokens or a 4xx. Clients that leave mid-request get nothing, by design. Throughout, the balancer
keeps both instances in rotation; afterwards no KV page is taken and no process logged a traceback.
"""

from __future__ import annotations

import asyncio
import json
import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import httpx

from tests.fuzz.deployment import CONTEXT, REQUEST_DEADLINE_S, Oracle, Watch
from tests.pd_cluster import Cluster
from tests.tiny_checkpoints import VOCAB

N_NORMAL, N_BAD, IN_FLIGHT, NEW_TOKENS = 200, 64, 16, 8
WORDS = ("pd", "prefill", "decode", "expert", "route", "token", "cache", "page", "mixture", "serve")


@dataclass
class Outcome:
    status: int  # 0: no answer (the client left)
    body: Any  # parsed JSON, or the list of SSE events' JSON
    raw: bytes


@dataclass
class Case:
    """One request of the load and what its answer must be."""

    kind: str
    send: Callable[[httpx.AsyncClient], Awaitable[Outcome]]
    check: Callable[[Outcome], str | None]  # None: as it must be; else what is wrong
    requests: int = 1


async def post(client: httpx.AsyncClient, path: str, content: bytes, content_type: str = "application/json",
               stream: bool = False) -> Outcome:  # fmt: skip
    headers = {"content-type": content_type}
    if not stream:
        r = await client.post(path, content=content, headers=headers)
        try:
            body = r.json()
        except ValueError:
            body = None
        return Outcome(r.status_code, body, r.content)
    async with client.stream("POST", path, content=content, headers=headers) as r:
        raw = await r.aread()
    events = [line[len("data: ") :] for line in raw.decode(errors="replace").split("\n") if line.startswith("data: ")]
    if r.status_code != 200:
        return Outcome(r.status_code, json.loads(raw) if raw.startswith(b"{") else None, raw)
    return Outcome(200, [json.loads(e) for e in events if e != "[DONE]"] + (["[DONE]"] if "[DONE]" in events else []),
                   raw)  # fmt: skip


def client_error(out: Outcome) -> str | None:
    """A 4xx that says what is wrong, in OpenAI's shape."""
    error = out.body.get("error") if isinstance(out.body, dict) else None
    if 400 <= out.status < 500 and isinstance(error, dict) and isinstance(error.get("message"), str):
        return None
    return f"want a 4xx with an error message, got {out.status} {out.raw[:300]!r}"


class Load:
    """Builds the cases from a seed; the oracle gives every served request's tokens."""

    def __init__(self, seed: int, oracle: Oracle) -> None:
        self.rng, self.oracle, self.tok = random.Random(seed), oracle, oracle.tokenizer
        self.id_prompts = [[self.rng.randrange(VOCAB) for _ in range(self.rng.randint(3, 60))] for _ in range(12)]
        self.texts = [" ".join(self.rng.choices(WORDS, k=self.rng.randint(2, 12))) for _ in range(12)]

    # ---- served requests: the oracle's greedy tokens ----
    def ids_answer(self, ids: list[int], stream: bool) -> Callable[[Outcome], str | None]:
        want = self.oracle.greedy(ids, NEW_TOKENS)

        def check(out: Outcome) -> str | None:
            if out.status != 200:
                return f"status {out.status}: {out.raw[:300]!r}"
            if not stream:
                got = out.body["output_ids"]
            elif out.body[-1:] == ["[DONE]"] and len(out.body) >= 2 and "output_ids" in out.body[-2]:
                got = out.body[-2]["output_ids"]  # cumulative
            else:
                return f"an incomplete stream: {out.raw[-300:]!r}"
            return None if got == want else f"output_ids {got}, transformers {want}"

        return check

    def text_answer(self, ids: list[int], chat: bool) -> Callable[[Outcome], str | None]:
        want = self.tok.decode(self.oracle.greedy(ids, NEW_TOKENS), skip_special_tokens=True)

        def check(out: Outcome) -> str | None:
            if out.status != 200:
                return f"status {out.status}: {out.raw[:300]!r}"
            choice = out.body["choices"][0]
            got = choice["message"]["content"] if chat else choice["text"]
            usage = out.body["usage"]["completion_tokens"]
            return None if (got, usage) == (want, NEW_TOKENS) else f"text {got!r} ({usage} tokens), want {want!r}"

        return check

    def generate(self, extra: dict[str, Any] | None = None, sampling: dict[str, Any] | None = None,
                 content_type: str = "application/json", kind: str = "normal") -> Case:  # fmt: skip
        """A greedy /generate of token ids or text, streamed or not, with `extra` fields and `sampling` params."""
        stream = self.rng.random() < 0.3
        params = {"max_new_tokens": NEW_TOKENS, "temperature": 0.0, **(sampling or {})}
        body: dict[str, Any] = {"sampling_params": params, "stream": stream, **(extra or {})}
        if self.rng.random() < 0.5:
            body["input_ids"] = ids = self.rng.choice(self.id_prompts)
        else:
            body["text"] = text = self.rng.choice(self.texts)
            ids = self.tok.encode(text)
        content = json.dumps(body).encode()
        return Case(kind, lambda c: post(c, "/generate", content, content_type, stream), self.ids_answer(ids, stream))

    def completion(self) -> Case:
        # Text answers are compared with the tokenizer's decoding of the oracle's tokens, which matches the server's
        # (a continuation of the prompt's text) only when the prompt ends on a whole character: ASCII prompts here.
        text = self.rng.choice(self.texts)
        ids = self.tok.encode(text)
        prompt = ids if self.rng.random() < 0.5 else text
        content = json.dumps({"prompt": prompt, "max_tokens": NEW_TOKENS, "temperature": 0}).encode()
        return Case("normal", lambda c: post(c, "/v1/completions", content), self.text_answer(ids, chat=False))

    def chat(self) -> Case:
        messages = [{"role": "user", "content": self.rng.choice(self.texts)}]
        prompt = self.tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        ids = self.tok.encode(prompt, add_special_tokens=False)
        content = json.dumps({"messages": messages, "max_tokens": NEW_TOKENS, "temperature": 0}).encode()
        return Case("normal", lambda c: post(c, "/v1/chat/completions", content), self.text_answer(ids, chat=True))

    def normal(self) -> Case:
        return self.rng.choice([self.generate, self.generate, self.generate, self.completion, self.chat])()

    # ---- bad requests ----
    def malformed(self) -> Case:
        ids = self.rng.choice(self.id_prompts)
        good = json.dumps({"input_ids": ids, "sampling_params": {"max_new_tokens": NEW_TOKENS}})
        bodies = [
            good[: self.rng.randrange(1, len(good) - 1)].encode(),  # truncated
            b"[1, 2, 3]",  # not an object
            b"\xff\xfe" + good.encode(),  # not UTF-8
            b"",  # nothing
            json.dumps({"input_ids": ids, "sampling_params": {"max_new_tokens": "8"}}).encode(),  # a string count
            json.dumps({"input_ids": ids, "sampling_params": {"top_k": 2**64}}).encode(),  # past 64 bits
            good[:-2].encode() + b', "temperature": NaN}}',  # not a number
            b'{"text": "x", "deep": ' + b"[" * 50_000 + b"]" * 50_000 + b"}",  # past the recursion limit
            b'{"input_ids": [1], "sampling_params": {"max_new_tokens": ' + b"9" * 5000 + b"}}",  # past 4300 digits
            b'{"text": "lone \\ud800 surrogate"}',  # not Unicode
            json.dumps({"input_ids": [self.rng.randrange(VOCAB) for _ in range(CONTEXT + 40)]}).encode(),  # too long
            json.dumps({"input_ids": [VOCAB + 7, 1]}).encode(),  # not in the vocabulary
            json.dumps({"input_ids": ids, "sampling_params": {"temprature": 0}}).encode(),  # misspelt
            json.dumps({"input_ids": ids, "sampling_params": {"n": 2}}).encode(),  # unsupported
            json.dumps({"text": "x", "stream": "yes"}).encode(),  # not a bool
            json.dumps({"text": "x" * 100_000}).encode(),  # a prompt far past the context
        ]
        content = self.rng.choice(bodies)
        path = "/generate"
        if self.rng.random() < 0.2:
            path, content = "/v1/chat/completions", json.dumps({"messages": [], "max_tokens": 2}).encode()
        return Case("malformed", lambda c: post(c, path, content), client_error)

    def extreme(self) -> Case:
        """Valid requests at the edges of the ranges, and a client posing as the balancer: served, greedy tokens."""
        return self.rng.choice([
            lambda: self.generate(sampling={"temperature": 1e-50}, kind="extreme"),
            lambda: self.generate(sampling={"top_k": 2**63 - 1, "seed": 2**64 - 1, "top_p": 1.0}, kind="extreme"),
            lambda: self.generate(sampling={"temperature": 0.9, "top_k": 1}, kind="extreme"),  # top_k 1 is greedy
            lambda: self.generate(extra={"bootstrap_host": "10.0.0.1", "bootstrap_port": 1, "bootstrap_room": 7},
                                  kind="hostile"),
            lambda: self.generate(extra={"custom": {"nested": [1, {"x": None}]}, "return_logprob": False},
                                  kind="extreme"),
            lambda: self.generate(content_type="application/x-www-form-urlencoded", kind="extreme"),
        ])()  # fmt: skip

    def leaving(self) -> Case:
        """A client that leaves: after the first streamed event, or before a non-streamed answer comes."""
        ids = self.rng.choice(self.id_prompts)
        stream = self.rng.random() < 0.5
        content = json.dumps({"input_ids": ids, "sampling_params": {"max_new_tokens": 64}, "stream": stream}).encode()

        async def send(client: httpx.AsyncClient) -> Outcome:
            if stream:
                async with client.stream("POST", "/generate", content=content) as r:
                    async for _ in r.aiter_raw():
                        break
            else:
                try:
                    await asyncio.wait_for(client.post("/generate", content=content), self.rng.uniform(0.05, 0.5))
                except asyncio.TimeoutError:
                    pass
            return Outcome(0, None, b"")

        return Case("hostile", send, lambda out: None)

    def same_rid(self) -> Case:
        """Two requests with one client rid, sent at once: each gets its own prompt's tokens, or a 4xx; at least one
        is served (a duplicate rid must not cost the request that holds it)."""
        rid = f"shared-{self.rng.getrandbits(32):x}"
        prompts = self.rng.sample(self.id_prompts, 2)
        bodies = [json.dumps({"input_ids": ids, "rid": rid, "sampling_params": {"max_new_tokens": NEW_TOKENS,
                                                                               "temperature": 0}}).encode()
                  for ids in prompts]  # fmt: skip
        served = [self.ids_answer(ids, stream=False) for ids in prompts]

        async def send(client: httpx.AsyncClient) -> Outcome:
            both = await asyncio.gather(*(post(client, "/generate", b) for b in bodies))
            return Outcome(0, both, b"")

        def check(out: Outcome) -> str | None:
            pairs = zip(out.body, served, strict=True)
            problems = [None if o.status != 200 and client_error(o) is None else ok(o) for o, ok in pairs]
            if all(o.status != 200 for o in out.body):
                problems.append(f"neither request of rid {rid} was served: {[o.raw[:200] for o in out.body]}")
            return "; ".join(p for p in problems if p) or None

        return Case("hostile", send, check, requests=2)


async def run_load(url: str, cases: list[Case]) -> tuple[list[Outcome], list[Any]]:
    """All cases with IN_FLIGHT at a time, in list order; (outcomes, the balancer's worker listings seen meanwhile)."""
    gate = asyncio.Semaphore(IN_FLIGHT)
    listings: list[Any] = []
    done = asyncio.Event()

    async def one(client: httpx.AsyncClient, case: Case) -> Outcome:
        async with gate:
            return await case.send(client)

    async def watch_rotation(client: httpx.AsyncClient) -> None:
        while not done.is_set():
            listings.append((await client.get("/list_workers")).json())
            await asyncio.sleep(0.25)

    limits = httpx.Limits(max_connections=4 * IN_FLIGHT)
    async with httpx.AsyncClient(base_url=url, timeout=REQUEST_DEADLINE_S, limits=limits) as client:
        watcher = asyncio.create_task(watch_rotation(client))
        outcomes = await asyncio.gather(*(one(client, c) for c in cases))
        done.set()
        await watcher
    return list(outcomes), listings


def test_mixed_load_serves_every_normal_request_its_greedy_tokens_and_every_bad_one_a_clear_error(
    fuzz_cluster: Cluster, oracle: Oracle, watch: Watch
) -> None:
    seed = random.SystemRandom().randrange(2**32)
    load = Load(seed, oracle)
    # Clients that leave go first, so decode's quarantine of the pages they touched is over by the end of the load.
    leaving = [load.leaving() for _ in range(8)]
    bad = [load.malformed() for _ in range(30)] + [load.extreme() for _ in range(18)]
    bad += [load.same_rid() for _ in range(4)]
    normal = [load.normal() for _ in range(N_NORMAL)]
    rest = bad + normal
    load.rng.shuffle(rest)
    cases = leaving + rest
    n_requests = sum(c.requests for c in cases)
    assert n_requests - N_NORMAL == N_BAD and N_BAD >= 0.1 * n_requests

    t0 = time.monotonic()
    with watch:
        outcomes, listings = asyncio.run(run_load(fuzz_cluster.url, cases))
    took = time.monotonic() - t0

    wrong = [f"{c.kind} #{i}: {problem}" for i, (c, out) in enumerate(zip(cases, outcomes, strict=True))
             if (problem := c.check(out)) is not None]  # fmt: skip
    assert not wrong, f"seed {seed}: {len(wrong)} of {len(cases)} requests answered wrongly:\n" + "\n".join(wrong[:20])
    out_of_rotation = [w for listing in listings for w in listing["prefill"] + listing["decode"] if not w["healthy"]]
    assert listings and not out_of_rotation, out_of_rotation[:3]
    print(f"mixed load (seed {seed}): {n_requests} requests in {took:.1f} s")
