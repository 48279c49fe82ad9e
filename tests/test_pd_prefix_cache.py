"""Prefix caches in a PD deployment: greedy tokens equal a unified `pd serve --disable-radix-cache`'s.

One prefill instance and two decode instances, one with --disaggregation-decode-enable-radix-cache (a small KV pool)
and one without, each a `pd serve` subprocess, KV over Mooncake/TCP; requests go straight to a prefill and a decode
with the same bootstrap room, as the load balancer sends them, so each side's answer (its cached_tokens) is seen.
The caching decode: hits, partial hits, misses, a follow-up turn whose cached prefix is longer than the prefill's,
concurrent requests sharing a cached prefix, an abort mid-decode (its tokens are cached and reused), an abort while
its KV is awaited (the cached prefix is unlocked at once, the fresh pages come back after the quarantine), and
eviction under memory pressure. Each hit must be the oracle's longest whole-page prefix, and the prefill must have
written exactly the pages after it (its kv_pages_sent_total). The plain decode: the prefill's own hits give the same
tokens and show in its answers and metrics. No instance holds a page once idle.
"""

from __future__ import annotations

import asyncio
import json
import random
import threading
import time
from collections.abc import Collection, Iterator
from dataclasses import dataclass, field
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from decode.scheduler import QUARANTINE_S
from pd.engine.spec import scheduler_config
from pd.server_args import ServerArgs, ServerArgsError
from tests.pd_cluster import Proc, serve_argv, start_proc, stop_procs, wait_healthy
from tests.server_process import free_port
from tests.test_prefix_cache_serve import expected_cached
from tests.tiny_checkpoints import make_checkpoint

CHUNK, PAGE = 16, 4
DECODE_POOL_PAGES = 96  # the caching decode's pool: the pressure test caches more than this
INSTANCE_ARGS = ("--chunked-prefill-size", str(CHUNK), "--page-size", str(PAGE))
FLAG = "--disaggregation-decode-enable-radix-cache"
IDLE_TIMEOUT_S = QUARANTINE_S + 20  # an aborted transfer's pages come back after the quarantine

Req = tuple[list[int], int]  # (prompt, max_new_tokens)


@dataclass
class Deployment:
    oracle: str  # unified pd serve, no prefix cache
    prefill: Proc
    bootstrap_port: int
    cached: Proc  # decode with the flag
    plain: Proc  # decode without
    seed: int
    prefill_prompts: list[list[int]] = field(default_factory=list)  # every prompt the prefill computed
    decode_computed: list[list[int]] = field(default_factory=list)  # the caching decode's computed tokens


def _start(path: str) -> tuple[list[Proc], int]:
    ports = set()
    while len(ports) < 5:
        ports.add(free_port())
    oracle, prefill, bport, cached, plain = ports
    procs = [
        start_proc("oracle", serve_argv(path, oracle, *INSTANCE_ARGS, "--disable-radix-cache"),
                   f"http://127.0.0.1:{oracle}"),
        start_proc("prefill", serve_argv(path, prefill, *INSTANCE_ARGS, "--disaggregation-mode", "prefill",
                                         "--disaggregation-bootstrap-port", str(bport)), f"http://127.0.0.1:{prefill}"),
        start_proc("decode-cached", serve_argv(path, cached, *INSTANCE_ARGS, "--disaggregation-mode", "decode", FLAG,
                                               "--max-total-tokens", str(DECODE_POOL_PAGES * PAGE)),
                   f"http://127.0.0.1:{cached}"),
        start_proc("decode-plain", serve_argv(path, plain, *INSTANCE_ARGS, "--disaggregation-mode", "decode"),
                   f"http://127.0.0.1:{plain}"),
    ]
    return procs, bport


@pytest.fixture(scope="module")
def deployment(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Deployment]:
    seed = random.SystemRandom().randrange(2**31)
    path = make_checkpoint("qwen3_moe", str(tmp_path_factory.mktemp("pd_prefix") / "qwen3_moe"), seed=seed)
    for attempt in range(3):  # a port free when picked may be taken before the instance binds it
        procs, bport = _start(path)
        try:
            wait_healthy(procs)
            break
        except RuntimeError as e:
            stop_procs(procs)
            if attempt == 2 or "address already in use" not in str(e).lower():
                raise
    oracle, prefill, cached, plain = procs
    try:
        yield Deployment(oracle.url, prefill, bport, cached, plain, seed)
    finally:
        stop_procs(procs)


# ---- requests ----
def _body(ids: list[int], n: int, **extra: Any) -> dict[str, Any]:
    return {"input_ids": ids, "sampling_params": {"max_new_tokens": n, "temperature": 0.0, "ignore_eos": True},
            **extra}


def _pd_body(dep: Deployment, ids: list[int], n: int, **extra: Any) -> dict[str, Any]:
    return _body(ids, n, bootstrap_host="127.0.0.1", bootstrap_port=dep.bootstrap_port,
                 bootstrap_room=random.getrandbits(63), **extra)


async def _post(client: httpx.AsyncClient, url: str, body: dict[str, Any]) -> dict[str, Any]:
    r = await client.post(f"{url}/generate", json=body)
    assert r.status_code == 200, r.text
    return r.json()


def _wave(dep: Deployment, decode: Proc, reqs: list[Req]) -> list[tuple[dict, dict]]:
    """Every request at once through the prefill and `decode`: (prefill answer, decode answer) of each."""

    async def one(client: httpx.AsyncClient, ids: list[int], n: int) -> tuple[dict, dict]:
        body = _pd_body(dep, ids, n)
        p, d = await asyncio.gather(_post(client, dep.prefill.url, body), _post(client, decode.url, body))
        return p, d

    async def go() -> list[tuple[dict, dict]]:
        async with httpx.AsyncClient(timeout=120) as client:
            return list(await asyncio.gather(*[one(client, ids, n) for ids, n in reqs]))

    return asyncio.run(go())


def _oracle(dep: Deployment, reqs: list[Req]) -> list[list[int]]:
    async def go() -> list[list[int]]:
        async with httpx.AsyncClient(timeout=120) as client:
            outs = await asyncio.gather(*[_post(client, dep.oracle, _body(ids, n)) for ids, n in reqs])
        return [o["output_ids"] for o in outs]

    return asyncio.run(go())


def _info(url: str) -> dict[str, Any]:
    return httpx.get(f"{url}/get_server_info", timeout=10).json()


def _wait_for(pred: Any, timeout: float, what: Any) -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        assert time.monotonic() < deadline, what() if callable(what) else what
        time.sleep(0.1)


def _wait_idle(*urls: str) -> None:
    """Every instance ends up holding no page (cached pages count as free)."""
    for url in urls:
        _wait_for(lambda url=url: (i := _info(url))["kv_pages_free"] == i["kv_pages_total"], IDLE_TIMEOUT_S,
                  lambda url=url: f"{url} holds pages while idle: {_info(url)}")


def _gauge(url: str, name: str) -> float:
    for family in text_string_to_metric_families(httpx.get(f"{url}/metrics", timeout=10).text):
        for s in family.samples:
            if s.name == name:
                return s.value
    raise KeyError(name)


# ---- the oracle's hits ----
def _pages(n: int) -> int:
    return -(-n // PAGE)


def _fresh(rng: random.Random, n: int, avoid: Collection[int] = ()) -> list[int]:
    """n random tokens, the first not in `avoid` (so a shared prefix ends exactly there)."""
    return [rng.choice([t for t in range(256) if t not in avoid])] + [rng.randrange(256) for _ in range(n - 1)]


@dataclass
class Tally:
    """What the prefill must have written (pages per request) and the caching decode must have hit (tokens)."""

    sent: list[int] = field(default_factory=list)
    decode_hits: list[int] = field(default_factory=list)


def _run_checked(dep: Deployment, decode: Proc, reqs: list[Req], tally: Tally,
                 exact_decode_hits: bool = True) -> list[tuple[dict, dict]]:
    """A wave through the prefill and `decode`: the oracle's tokens, and each side's cached_tokens the oracle's hit
    (the prefill never evicts here; the caching decode's when `exact_decode_hits`, that is with no eviction since
    its flush; 0 on the plain one)."""
    expected = _oracle(dep, reqs)
    prefill_hits = [expected_cached(ids, dep.prefill_prompts, PAGE) for ids, _ in reqs]
    decode_hits = [expected_cached(ids, dep.decode_computed, PAGE) if decode is dep.cached else 0 for ids, _ in reqs]
    got = _wave(dep, decode, reqs)
    for i, ((ids, _), (p, d), want) in enumerate(zip(reqs, got, expected, strict=True)):
        where = f"seed {dep.seed}: request {i} of the wave"
        assert d["output_ids"] == want, where
        assert p["output_ids"] == want[:1], f"{where}: the prefill's first token"
        assert p["meta_info"]["cached_tokens"] == prefill_hits[i], f"{where}: prefill hit"
        hit = d["meta_info"]["cached_tokens"]
        if exact_decode_hits or decode is dep.plain:
            assert hit == decode_hits[i], f"{where}: decode hit"
        tally.sent.append(_pages(len(ids)) - hit // PAGE)
        if decode is dep.cached:
            tally.decode_hits.append(hit)
    dep.prefill_prompts += [ids for ids, _ in reqs]
    if decode is dep.cached:  # a finished request computed its prompt and every output token but the last
        dep.decode_computed += [ids + d["output_ids"][:-1] for (ids, _), (_, d) in zip(reqs, got, strict=True)]
    return got


def _check_totals(dep: Deployment, prefill_before: dict, decode_before: dict, tally: Tally) -> None:
    """The prefill wrote exactly the pages after each request's decode-cached prefix; the caching decode's stats
    and metrics count its hits."""
    _wait_for(lambda: _info(dep.prefill.url)["kv_pages_sent_total"] - prefill_before["kv_pages_sent_total"]
              == sum(tally.sent), 30,
              lambda: (_info(dep.prefill.url)["kv_pages_sent_total"] - prefill_before["kv_pages_sent_total"],
                       sum(tally.sent)))  # fmt: skip
    assert _gauge(dep.prefill.url, "pd:kv_pages_sent_total") == _info(dep.prefill.url)["kv_pages_sent_total"]
    stats = _info(dep.cached.url)
    assert stats["cached_tokens_total"] - decode_before["cached_tokens_total"] == sum(tally.decode_hits)
    assert _gauge(dep.cached.url, "pd:cache_hit_rate") == pytest.approx(
        stats["cached_tokens_total"] / stats["prompt_tokens_total"])


def _flush(url: str) -> None:
    assert httpx.post(f"{url}/flush_cache", timeout=10).status_code == 200
    _wait_for(lambda: _info(url)["kv_pages_cached"] == 0, 30, f"{url} kept cached pages after /flush_cache")


def _abort_mid_decode(dep: Deployment, prompt: list[int], n: int) -> list[int]:
    """Streams a request from the caching decode and aborts it there after 4 tokens; returns the tokens it got."""

    async def go() -> list[int]:
        rid = f"abort-decode-{random.getrandbits(32)}"
        body = _pd_body(dep, prompt, n, rid=rid, stream=True)
        ids: list[int] = []
        async with httpx.AsyncClient(timeout=120) as client:
            prefill = asyncio.create_task(_post(client, dep.prefill.url, {**body, "stream": False}))
            async with client.stream("POST", f"{dep.cached.url}/generate", json=body) as r:
                assert r.status_code == 200, await r.aread()
                aborted = False
                async for line in r.aiter_lines():
                    if line.startswith("data: ") and line != "data: [DONE]":
                        ids = json.loads(line[6:]).get("output_ids", ids)  # cumulative
                        if len(ids) >= 4 and not aborted:
                            aborted = True
                            await client.post(f"{dep.cached.url}/abort_request", json={"rid": rid})
            await prefill
        return ids

    return asyncio.run(go())


def _abort_mid_transfer(dep: Deployment, prompt: list[int], n: int) -> None:
    """Sends a request to the caching decode alone (its KV never comes) and aborts it once it holds its pages: its
    cached prefix is unlocked at once, its fresh pages stay quarantined (prefill could still write them)."""
    url, free_before = dep.cached.url, _info(dep.cached.url)["kv_pages_free"]
    hit = expected_cached(prompt, dep.decode_computed, PAGE)
    assert hit > 0, "the test wants a cached prefix here"
    taken, fresh = _pages(len(prompt) + n), _pages(len(prompt) + n) - hit // PAGE
    rid = f"abort-transfer-{random.getrandbits(32)}"
    answer: list[httpx.Response] = []
    thread = threading.Thread(target=lambda: answer.append(
        httpx.post(f"{url}/generate", json=_pd_body(dep, prompt, n, rid=rid), timeout=60)))
    thread.start()
    try:
        _wait_for(lambda: _info(url)["kv_pages_free"] == free_before - taken, 30,
                  lambda: f"pages taken: {free_before - _info(url)['kv_pages_free']}, expected {taken}")
        assert httpx.post(f"{url}/abort_request", json={"rid": rid}, timeout=10).status_code == 200
    finally:
        thread.join(60)
    assert answer and answer[0].status_code == 200, answer
    assert answer[0].json()["meta_info"]["finish_reason"]["type"] == "abort", answer[0].text
    _wait_for(lambda: _info(url)["kv_pages_free"] == free_before - fresh, 10,
              lambda: f"after the abort {free_before - _info(url)['kv_pages_free']} pages are held, expected the "
                      f"{fresh} fresh ones only")


# ---- tests ----
def test_decode_cache_hits_partial_hits_misses_and_aborts_give_the_uncached_tokens(deployment: Deployment) -> None:
    dep, rng = deployment, random.Random(deployment.seed)
    _flush(dep.cached.url)
    dep.decode_computed.clear()
    prefill_before, decode_before, tally = _info(dep.prefill.url), _info(dep.cached.url), Tally()

    base, other = _fresh(rng, 2 * CHUNK + 5), _fresh(rng, 13)
    ((_, first), _) = _run_checked(dep, dep.cached, [(base, 8), (other, 4)], tally)
    out = first["output_ids"]
    shared = _fresh(rng, 1, avoid={out[0]})[0]
    wave: list[Req] = [
        (list(base), 4),  # the whole prompt again
        (base + out[:6] + _fresh(rng, 3, avoid={out[6]}), 4),  # the next turn: its answer is cached on decode only
        (base + [shared] + _fresh(rng, 4), 4),  # these two run together, sharing base's cached pages
        (base + _fresh(rng, 6, avoid={out[0], shared}), 4),
        (base[:10] + _fresh(rng, 9, avoid={base[10]}), 4),  # a partial hit
    ]
    got = _run_checked(dep, dep.cached, wave, tally)
    prefill_hit, decode_hit = (got[1][k]["meta_info"]["cached_tokens"] for k in (0, 1))
    assert decode_hit > prefill_hit, "the follow-up turn should hold more on decode than on prefill"
    assert got[4][1]["meta_info"]["cached_tokens"] == 8
    firsts = {s[0] for s in dep.prefill_prompts}
    got = _run_checked(dep, dep.cached, [(_fresh(rng, 11, avoid=firsts), 3), (base[:3], 3)], tally)
    assert [d["meta_info"]["cached_tokens"] for _, d in got] == [0, 0]

    # An abort mid-decode: the tokens it had are the oracle's, and its KV serves the next turn.
    prompt, n = _fresh(rng, 5 * PAGE, avoid=firsts), 64
    (want,) = _oracle(dep, [(prompt, n)])
    streamed = _abort_mid_decode(dep, prompt, n)
    assert 4 <= len(streamed) < n and streamed == want[: len(streamed)], f"seed {dep.seed}: {streamed} vs {want}"
    dep.prefill_prompts.append(prompt)
    tally.sent.append(_pages(len(prompt)))
    tally.decode_hits.append(0)
    dep.decode_computed.append(prompt + want[:2])  # at least these had their KV computed before the abort
    ((_, d),) = _run_checked(dep, dep.cached, [(prompt + want[:2] + _fresh(rng, 3, avoid={want[2]}), 4)], tally)
    assert d["meta_info"]["cached_tokens"] == len(prompt)

    # An abort while its KV is awaited.
    _abort_mid_transfer(dep, base + _fresh(rng, 6, avoid={out[0], shared}), 8)  # counts no hit: it never ran

    assert sum(tally.decode_hits) > 0
    _check_totals(dep, prefill_before, decode_before, tally)
    _wait_idle(dep.prefill.url, dep.cached.url, dep.plain.url)


def test_decode_cache_under_memory_pressure_gives_the_uncached_tokens(deployment: Deployment) -> None:
    """More conversations than the caching decode's pool holds, each followed by its next turn: eviction frees
    cached pages for new requests, and hits that survive it give the oracle's tokens like misses do."""
    dep, rng = deployment, random.Random(deployment.seed + 1)
    prefill_before, decode_before, tally = _info(dep.prefill.url), _info(dep.cached.url), Tally()
    turns = [_fresh(rng, rng.randint(30, 50)) for _ in range(12)]
    answers: list[list[int]] = []
    for lo in range(0, len(turns), 4):  # four at a time: each wave fits the pool beside nothing else
        got = _run_checked(dep, dep.cached, [(t, 8) for t in turns[lo:lo + 4]], tally, exact_decode_hits=False)
        answers += [d["output_ids"] for _, d in got]
    # Newest conversations first: in the order of the first turns, LRU would evict each before its next turn.
    follow = [t + a + _fresh(rng, 4) for t, a in reversed(list(zip(turns, answers, strict=True)))]
    for lo in range(0, len(follow), 4):
        _run_checked(dep, dep.cached, [(t, 4) for t in follow[lo:lo + 4]], tally, exact_decode_hits=False)
    distinct = {tuple(seq[: (i + 1) * PAGE]) for seq in dep.decode_computed for i in range(len(seq) // PAGE)}
    assert len(distinct) > DECODE_POOL_PAGES, "the cache never outgrew the pool: nothing was evicted"
    assert sum(tally.decode_hits[len(turns):]) > 0, "no next turn found its conversation cached"
    _check_totals(dep, prefill_before, decode_before, tally)
    _wait_idle(dep.prefill.url, dep.cached.url)


def test_prefill_cache_hits_with_a_plain_decode_give_the_uncached_tokens(deployment: Deployment) -> None:
    """A decode without the flag caches nothing and receives every page; the prefill's own hits (which it reports in
    its answers, /get_server_info and /metrics) change no token."""
    dep, rng = deployment, random.Random(deployment.seed + 2)
    prefill_before, tally = _info(dep.prefill.url), Tally()
    base = _fresh(rng, 2 * CHUNK + 3)
    ((_, first),) = _run_checked(dep, dep.plain, [(base, 6)], tally)
    out = first["output_ids"]
    firsts = {s[0] for s in dep.prefill_prompts}
    wave: list[Req] = [
        (base + out + _fresh(rng, 4), 5),  # the next turn: the prefill has base's whole pages
        (base[:13] + _fresh(rng, 6, avoid={base[13]}), 5),
        (_fresh(rng, 9, avoid=firsts), 5),
    ]
    got = _run_checked(dep, dep.plain, wave, tally)
    hits = [p["meta_info"]["cached_tokens"] for p, _ in got]
    assert hits == [len(base) // PAGE * PAGE, 12, 0], f"seed {dep.seed}"
    assert tally.sent == [_pages(len(ids)) for ids, _ in [(base, 6), *wave]]  # every page went
    info = _info(dep.prefill.url)
    assert info["cached_tokens_total"] - prefill_before["cached_tokens_total"] == sum(hits)
    assert info["kv_pages_sent_total"] - prefill_before["kv_pages_sent_total"] == sum(tally.sent)
    assert _gauge(dep.prefill.url, "pd:cache_hit_rate") == pytest.approx(
        info["cached_tokens_total"] / info["prompt_tokens_total"])
    plain = _info(dep.plain.url)
    assert plain["cached_tokens_total"] == plain["kv_pages_cached"] == 0
    _wait_idle(dep.prefill.url, dep.plain.url)


def test_decode_cache_flag_is_off_by_default_and_conflicts_with_disable_radix_cache() -> None:
    def cache(*argv: str) -> bool:
        return scheduler_config(ServerArgs.from_cli(list(argv))).radix_cache

    assert not cache("--disaggregation-mode", "decode")
    assert cache("--disaggregation-mode", "decode", FLAG)
    assert cache("--disaggregation-mode", "prefill", FLAG) and cache("--disaggregation-mode", "prefill")
    with pytest.raises(ServerArgsError, match="--disable-radix-cache"):
        ServerArgs(disaggregation_mode="decode", disaggregation_decode_enable_radix_cache=True,
                   disable_radix_cache=True)
