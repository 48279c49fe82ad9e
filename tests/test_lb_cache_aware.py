"""The cache_aware policy of `pd lb` and the balancer's regular mode (`--worker-urls`).

Oracles: for the approximate radix tree, brute force over the inserted strings (longest common prefix with any of
them; the tree's size is the number of distinct non-empty prefixes); for the policy, the rules of sglang-router's
cache_aware spelled out by brute force over each worker's texts, on a simulated workload of random loads,
thresholds, candidate sets and prompts that share prefixes of every length. End to end, the real `pd lb` CLI
runs against stub workers (tests/test_lb.py's) and the stubs' records say where each request went.
"""

from __future__ import annotations

import contextlib
import random
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from typing import Any

import httpx
import pytest
import torch

from pd.lb.cache_aware import ApproxRadixTree, CacheAwareConfig, CacheAwarePolicy
from pd.lb.request import routing_text
from tests.test_lb import Stub, _status, free_port, start_stub, wait_until


def _rng() -> random.Random:
    """A generator seeded from torch's, which conftest seeds freshly per run and test."""
    return random.Random(int(torch.randint(0, 2**62, ())))


def _lcp(a: str, b: str) -> int:
    n = 0
    while n < len(a) and n < len(b) and a[n] == b[n]:
        n += 1
    return n


def _prefixes(texts: Sequence[str]) -> set[str]:
    return {t[:k] for t in texts for k in range(1, len(t) + 1)}


def _random_text(rng: random.Random, pool: Sequence[str], alphabet: str = "abc", max_len: int = 24) -> str:
    """A fresh string, or one that shares a random-length prefix with (or extends, or is a prefix of) one in pool."""
    fresh = "".join(rng.choice(alphabet) for _ in range(rng.randrange(max_len + 1)))
    if not pool or rng.random() < 0.3:
        return fresh
    base = rng.choice(pool)
    return base[: rng.randrange(len(base) + 1)] + fresh[: rng.randrange(len(fresh) + 1)]


# ---------------------------------------------------------------- the tree
def test_tree_match_and_size_equal_brute_force_over_inserted_strings() -> None:
    rng = _rng()
    for alphabet in ("ab", "abcd", "aé漢\U0001f600"):
        tree, inserted = ApproxRadixTree(), []
        for _ in range(300):
            text = _random_text(rng, inserted, alphabet)
            tree.insert(text)
            inserted.append(text)
            for q in [text, *(_random_text(rng, inserted, alphabet) for _ in range(4))]:
                assert tree.match(q) == max(_lcp(q, t) for t in inserted), (q, inserted)
        assert tree.size == len(_prefixes(inserted))


def test_eviction_keeps_the_most_recently_used_strings_that_fit_and_trims_to_max_size() -> None:
    rng = _rng()
    for _ in range(30):
        tree, inserted = ApproxRadixTree(), []
        for _ in range(rng.randrange(1, 60)):
            text = _random_text(rng, inserted, "abc", 16)
            tree.insert(text)
            inserted.append(text)
        max_size = rng.randrange(0, tree.size + 2)
        tree.evict(max_size)
        assert tree.size <= max_size
        # Whatever survives is a prefix-closed set of the inserted strings' prefixes, and size counts it.
        kept = [t[: tree.match(t)] for t in inserted]
        assert tree.size == len(_prefixes(kept))
        # LRU: the newest strings are kept whole as long as together they fit.
        newest: list[str] = []
        for text in reversed(inserted):
            if len(_prefixes([*newest, text])) > max_size:
                break
            newest.append(text)
        assert all(tree.match(t) == len(t) for t in newest), (max_size, inserted)


# ---------------------------------------------------------------- the policy against a reference
class ReferencePolicy:
    """sglang-router's cache_aware by brute force: imbalanced (both thresholds passed) -> least loaded; else the
    longest match if its ratio passes cache_threshold (ties: less loaded, then first), else the fewest cached
    characters (ties: less loaded, then first). Workers not among the candidates lose their texts."""

    def __init__(self, c: CacheAwareConfig) -> None:
        self.c = c
        self.texts: dict[str, list[str]] = {}
        self.prefixes: dict[str, set[str]] = {}  # the distinct non-empty prefixes of each worker's texts

    def select(self, loads: Sequence[int], urls: Sequence[str], text: str) -> int:
        self.texts = {u: self.texts.get(u, []) for u in urls}
        self.prefixes = {u: self.prefixes.get(u, set()) for u in urls}
        hi, lo, n = max(loads), min(loads), len(loads)
        if hi - lo > self.c.balance_abs_threshold and hi > self.c.balance_rel_threshold * lo:
            i = loads.index(lo)
        else:
            match = [max((_lcp(text, t) for t in self.texts[u]), default=0) for u in urls]
            best = min((j for j in range(n) if match[j] == max(match)), key=lambda j: (loads[j], j))
            if text and match[best] / len(text) > self.c.cache_threshold:
                i = best
            else:
                size = [len(self.prefixes[u]) for u in urls]
                i = min(range(n), key=lambda j: (size[j], loads[j], j))
        self.texts[urls[i]].append(text)
        self.prefixes[urls[i]] |= _prefixes([text])
        return i


def test_policy_choices_equal_the_reference_on_a_simulated_workload() -> None:
    rng = _rng()
    pool = [f"http://w{k}:1" for k in range(4)]
    for _ in range(12):
        config = CacheAwareConfig(
            cache_threshold=rng.choice([0.0, 0.3, 0.5, round(rng.random(), 2), 1.0]),
            balance_abs_threshold=rng.randrange(0, 6),
            balance_rel_threshold=rng.choice([1.0, 1.25, 1.5, 2.0]),
        )
        policy, ref, sent = CacheAwarePolicy(config), ReferencePolicy(config), []
        urls = pool[:]
        for _ in range(120):
            if rng.random() < 0.05:  # instances leave and come back (removed, or out of rotation)
                urls = rng.sample(pool, rng.randrange(1, len(pool) + 1))
            loads = [rng.randrange(0, 10) for _ in urls]
            text = _random_text(rng, sent, "ab", 30)
            sent.append(text)
            assert policy.select(loads, urls, text) == ref.select(loads, urls, text), (config, loads, text)


def test_an_overloaded_worker_is_skipped_exactly_when_both_thresholds_are_passed() -> None:
    rng = _rng()
    for _ in range(300):
        abs_t, rel_t = rng.randrange(0, 5), rng.choice([1.0, 1.5, 2.0])
        policy = CacheAwarePolicy(CacheAwareConfig(balance_abs_threshold=abs_t, balance_rel_threshold=rel_t))
        urls = [f"http://w{k}:1" for k in range(rng.randrange(2, 5))]
        text = "".join(rng.choice("xyz") for _ in range(40))
        assert policy.select([0] * len(urls), urls, text) == 0  # cached on w0 (all empty: the first)
        rng.shuffle(urls)
        cached = urls.index("http://w0:1")
        loads = [rng.randrange(0, 12) for _ in urls]
        loads[cached] = max(loads) + rng.randrange(0, 3)  # the worker holding the prefix is the busiest
        hi, lo = max(loads), min(loads)
        imbalanced = hi - lo > abs_t and hi > rel_t * lo
        expected = loads.index(lo) if imbalanced else cached
        assert policy.select(loads, urls, text + "more") == expected, (abs_t, rel_t, loads)


def test_conversations_stick_to_one_worker_and_new_ones_spread_over_the_smallest_trees() -> None:
    rng = _rng()
    urls = [f"http://w{k}:1" for k in range(3)]
    policy = CacheAwarePolicy()
    words = "the cache keeps each conversation on the instance that already holds its history".split()
    history: dict[int, list[dict[str, str]]] = {c: [] for c in range(9)}
    home: dict[int, int] = {}
    turns = [c for c in history for _ in range(5)]
    rng.shuffle(turns)  # conversations interleave, each turn in order
    for c in turns:
        # Each conversation opens differently within a few words, as real ones do. A later turn adds less than its
        # history holds: the history is then over cache_threshold (0.3) of the text, which affinity routing needs (an
        # opening of 30 words followed by a turn of 60 was not: the conversation then rightly went to the smallest
        # tree, as the reference test above has it).
        opening = f"conversation {c}: " if not history[c] else ""
        length = rng.randrange(30, 60) if not history[c] else rng.randrange(5, 20)
        history[c].append({"role": "user", "content": opening + " ".join(rng.choices(words, k=length))})
        text = routing_text("/v1/chat/completions", {"messages": history[c]})
        chosen = policy.select([rng.randrange(0, 4) for _ in urls], urls, text)
        assert home.setdefault(c, chosen) == chosen, f"conversation {c} moved from {home[c]} to {chosen}"
        history[c].append({"role": "assistant", "content": " ".join(rng.choices(words, k=8))})
    assert set(home.values()) == set(range(len(urls)))


def test_worker_out_of_the_candidates_loses_its_tree_and_eviction_trims_every_tree() -> None:
    a, b = "http://a:1", "http://b:1"
    policy = CacheAwarePolicy(CacheAwareConfig(max_tree_size=10))
    text = "a long shared system prompt, then a question"
    assert policy.select([0, 0], [a, b], text) == 0
    assert policy.select([0], [b], text + " one") == 0  # a out of rotation (or removed): b gets it
    assert set(policy.trees) == {b}
    assert policy.select([0, 0], [a, b], "unrelated") == 0  # a is back, empty: the smallest tree
    assert policy.trees[a].size == len("unrelated") and policy.trees[b].size == len(text + " one")
    policy.evict()
    assert all(t.size <= 10 for t in policy.trees.values())


def test_routing_text_keeps_a_conversation_prefix_and_one_character_per_token() -> None:
    rng = _rng()
    messages: list[dict[str, Any]] = [{"role": "user", "content": f"turn {i} {rng.random()}"} for i in range(5)]
    messages[3]["content"] = [
        {"type": "text", "text": "part one"},
        {"type": "image_url"},
        {"type": "text", "text": "2"},
    ]
    texts = [routing_text("/v1/chat/completions", {"messages": messages[:k]}) for k in range(1, 6)]
    assert all(later.startswith(earlier) for earlier, later in zip(texts, texts[1:], strict=False))
    assert texts[-1].split("\n") == [m["content"] for m in messages[:3]] + ["part one 2", messages[4]["content"]]
    ids = [rng.randrange(0, 200_000) for _ in range(50)]
    text = routing_text("/generate", {"input_ids": ids})
    assert [ord(ch) for ch in text] == ids
    assert routing_text("/generate", {"input_ids": [ids, [1, 2]]}) == text  # a batch: by its first prompt
    assert routing_text("/v1/completions", {"prompt": ["first", "second"]}) == "first"
    assert routing_text("/generate", {"text": "plain"}) == "plain"
    assert routing_text("/v1/chat/completions", {"messages": "not a list"}) == ""


# ---------------------------------------------------------------- flags
def _args(argv: list[str]) -> Any:
    from pd.lb.args import LBArgs

    return LBArgs.from_cli(argv)


def test_policy_is_the_default_of_both_roles_and_per_role_flags_override_it() -> None:
    argv = ["--prefill", "http://p:1", "--decode", "http://d:1", "--policy", "cache_aware"]
    a = _args(argv)
    assert (a.prefill_policy, a.decode_policy) == ("cache_aware", "cache_aware")
    a = _args([*argv, "--decode-policy", "power_of_two", "--cache-threshold", "0.7", "--eviction-interval", "5"])
    assert (a.prefill_policy, a.decode_policy) == ("cache_aware", "power_of_two")
    assert (a.cache_aware.cache_threshold, a.cache_aware.eviction_interval_secs) == (0.7, 5.0)
    a = _args(["--worker-urls", "http://w:1", "http://w:2", "--policy", "cache_aware", "--max-tree-size", "9"])
    assert a.role_policies == {"regular": "cache_aware"} and a.cache_aware.max_tree_size == 9


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--policy", "cache_aware", "--cache-threshold", "1.5"], "--cache-threshold must be in [0, 1]"),
        (["--policy", "cache_aware", "--balance-abs-threshold", "-1"], "--balance-abs-threshold must be >= 0"),
        (["--policy", "cache_aware", "--balance-rel-threshold", "0.5"], "--balance-rel-threshold must be >= 1.0"),
        (["--policy", "cache_aware", "--eviction-interval-secs", "0"], "--eviction-interval-secs must be > 0"),
        (["--policy", "cache_aware", "--max-tree-size", "0"], "--max-tree-size must be >= 1"),
        (["--policy", "round_robin", "--cache-threshold", "0.5"], "only apply to the cache_aware policy"),
        (["--decode-policy", "cache_aware", "--worker-urls", "http://w:1", "--max-tree-size", "5"], "PD mode"),
        (["--worker-urls", "http://w:1", "--prefill", "http://p:1"], "cannot be combined with --prefill"),
        (["--worker-urls", "http://w:1", "http://w:1"], "more than once"),
        (["--worker-urls", "w:1"], "not a worker URL"),
    ],
)
def test_bad_cache_aware_and_mode_flags_fail_at_start_with_a_clear_message(
    argv: list[str], message: str, capsys: Any
) -> None:
    from launch.cli import main

    with pytest.raises(SystemExit) as e:
        main(["lb", *argv])
    assert e.value.code == 2
    assert message in capsys.readouterr().err


# ---------------------------------------------------------------- end to end through the `pd lb` CLI
@contextlib.contextmanager
def lb_cli(*flags: str) -> Iterator[str]:
    """`python -m pd lb FLAGS` on a free port; yields its URL once /health answers 200."""
    port = free_port()
    argv = [sys.executable, "-m", "pd", "lb", "--host", "127.0.0.1", "--port", str(port), *flags]
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while _status(url + "/health") != 200:
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                raise AssertionError(f"pd lb {flags} did not become healthy:\n{proc.communicate()[1].decode()[-3000:]}")
            time.sleep(0.05)
        yield url
    finally:
        proc.terminate()
        proc.wait(20)


def _stubs(n: int, role: str = "decode") -> list[Stub]:
    return [start_stub(role) for _ in range(n)]


def _stop(stubs: list[Stub]) -> None:
    for s in stubs:
        s.server.stop()


def _where(stubs: list[Stub], rid: str) -> int:
    found = [k for k, s in enumerate(stubs) for b in s.state.bodies if b.get("rid") == rid]
    assert len(found) == 1, f"rid {rid} reached {found}"
    return found[0]


def _chat(url: str, messages: list[dict[str, str]], rid: str) -> None:
    body = {"messages": messages, "max_tokens": 3, "rid": rid}
    r = httpx.post(url + "/v1/chat/completions", json=body, timeout=10)
    assert r.status_code == 200, r.text


def _tree_chars(url: str) -> dict[str, dict[str, int]]:
    return httpx.get(url + "/get_server_info", timeout=5).json()["lb"]["cache_aware"]["tree_chars"]


def _healthy(url: str, worker: str) -> bool:
    return next(w["healthy"] for w in httpx.get(url + "/list_workers").json()["regular"] if w["url"] == worker)


def test_regular_mode_cache_aware_keeps_conversations_on_one_instance_and_adds_no_bootstrap_fields() -> None:
    rng = _rng()
    workers = _stubs(2)
    try:
        with lb_cli("--worker-urls", *(w.url for w in workers), "--policy", "cache_aware") as url:
            info = httpx.get(url + "/get_server_info").json()["lb"]
            assert info["mode"] == "regular" and info["regular_policy"] == "cache_aware"
            history: dict[int, list[dict[str, str]]] = {c: [] for c in range(4)}
            turns = [c for c in history for _ in range(4)]
            rng.shuffle(turns)
            homes: dict[int, set[int]] = {c: set() for c in history}
            for i, c in enumerate(turns):
                history[c].append({"role": "user", "content": f"#{c} turn {i}: " + "words " * 20})
                _chat(url, history[c], f"r{i}")
                homes[c].add(_where(workers, f"r{i}"))
                history[c].append({"role": "assistant", "content": "an answer"})
            assert all(len(h) == 1 for h in homes.values()), homes
            assert {h for hs in homes.values() for h in hs} == {0, 1}
            assert not any("bootstrap_room" in b for w in workers for b in w.state.bodies)
            assert set(_tree_chars(url)["regular"]) == {w.url for w in workers}
    finally:
        _stop(workers)


def test_pd_mode_prefill_cache_aware_with_decode_power_of_two_through_the_cli() -> None:
    prefill, decode = _stubs(2, "prefill"), _stubs(2)
    flags = [a for p in prefill for a in ("--prefill", p.url, "none")]
    flags += [a for d in decode for a in ("--decode", d.url)]
    try:
        with lb_cli(*flags, "--prefill-policy", "cache_aware", "--decode-policy", "power_of_two") as url:
            info = httpx.get(url + "/get_server_info").json()["lb"]
            assert (info["prefill_policy"], info["decode_policy"]) == ("cache_aware", "power_of_two")
            for c in range(2):
                prompt = f"shared document {c} " + "lorem ipsum " * 30
                for turn in range(3):
                    prompt += f" question {turn}?"
                    body = {"text": prompt, "rid": f"c{c}-{turn}", "sampling_params": {"max_new_tokens": 2}}
                    assert httpx.post(url + "/generate", json=body, timeout=10).status_code == 200
            wait_until(lambda: sum(len(p.state.bodies) for p in prefill) == 6, 5, "prefill got too little")
            assert [_where(prefill, f"c{c}-{t}") for c in range(2) for t in range(3)] == [0, 0, 0, 1, 1, 1]
            assert set(_tree_chars(url)) == {"prefill"}  # the decode side keeps no trees
            assert sum(len(d.state.bodies) for d in decode) == 6
    finally:
        _stop(prefill + decode)


def test_removed_and_unhealthy_workers_lose_their_trees_through_the_cli() -> None:
    a, b = _stubs(2)
    text = "system prompt " * 20
    try:
        with lb_cli("--worker-urls", a.url, b.url, "--policy", "cache_aware", "--health-check-interval", "0.1",
                    "--health-failure-threshold", "1") as url:  # fmt: skip
            for i in range(2):
                assert httpx.post(url + "/generate", json={"text": text + str(i), "rid": f"x{i}"}).status_code == 200
            assert [_where([a, b], f"x{i}") for i in range(2)] == [0, 0]
            assert httpx.post(url + "/remove_worker", json={"url": a.url}).status_code == 200
            assert httpx.post(url + "/generate", json={"text": text + "2", "rid": "x2"}).status_code == 200
            assert _where([a, b], "x2") == 1
            r = httpx.post(url + "/add_worker", json={"url": a.url})  # regular mode: no role needed
            assert r.status_code == 200 and r.json()["healthy"], r.text
            assert httpx.post(url + "/generate", json={"text": text + "3", "rid": "x3"}).status_code == 200
            assert _where([a, b], "x3") == 1 and _tree_chars(url)["regular"][a.url] == 0
            # Out of rotation by health checks: the same.
            assert httpx.post(url + "/generate", json={"text": "other " * 30, "rid": "y0"}).status_code == 200
            assert _where([a, b], "y0") == 0 and _tree_chars(url)["regular"][a.url] > 0
            a.server.stop()
            wait_until(lambda: not _healthy(url, a.url), 5, "a dead worker stayed in rotation")
            assert httpx.post(url + "/generate", json={"text": "other " * 31, "rid": "y1"}).status_code == 200
            a.server.start()
            wait_until(lambda: _healthy(url, a.url), 5, "a recovered worker stayed out")
            assert httpx.post(url + "/generate", json={"text": "b", "rid": "y2"}).status_code == 200
            assert _tree_chars(url)["regular"][a.url] <= 1  # only what came after its return, if anything
    finally:
        _stop([a, b])


def test_load_imbalance_beyond_both_thresholds_overrides_affinity_through_the_cli() -> None:
    a, b = _stubs(2)
    text = "the same long prefix " * 10
    try:
        with lb_cli("--worker-urls", a.url, b.url, "--policy", "cache_aware", "--balance-abs-threshold", "2",
                    "--balance-rel-threshold", "1.5") as url, httpx.Client(timeout=10) as client:  # fmt: skip
            a.state.hang = b.state.hang = True  # streams stay open: each holds one request in flight
            with contextlib.ExitStack() as streams:
                for i in range(4):
                    body = {"text": text + str(i), "rid": f"s{i}", "stream": True}
                    # Headers back: the instance has the request (a stream's body is left unread, so it stays open).
                    resp = streams.enter_context(client.stream("POST", url + "/generate", json=body))
                    assert resp.status_code == 200
                # loads a:b were 0:0, 1:0, 2:0 (2 - 0 is not > 2: affinity), then 3:0 (imbalanced: the idle one)
                assert [_where([a, b], f"s{i}") for i in range(4)] == [0, 0, 0, 1]
                a.state.hang = b.state.hang = False
    finally:
        a.state.hang = b.state.hang = False
        _stop([a, b])


def test_periodic_eviction_trims_trees_to_max_tree_size_through_the_cli() -> None:
    a, b = _stubs(2)
    try:
        with lb_cli("--worker-urls", a.url, b.url, "--policy", "cache_aware", "--eviction-interval-secs", "0.1",
                    "--max-tree-size", "50") as url:  # fmt: skip
            for i in range(4):
                body = {"text": f"{i} " + "long prompt " * 20, "rid": f"e{i}"}
                assert httpx.post(url + "/generate", json=body).status_code == 200
            wait_until(lambda: all(n <= 50 for n in _tree_chars(url)["regular"].values()), 5, "trees not trimmed")
    finally:
        _stop([a, b])
