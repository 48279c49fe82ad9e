"""Rooms are owned: requests sent straight to a prefill and a decode instance (as the load balancer would) that
share a bootstrap_room never get each other's KV. A second claim on a live room is refused on either side with a
clear error and the first request still answers transformers' greedy tokens; a decode whose prompt differs from
the prefill's for the same room fails naming the prompt mismatch, and no KV page stays taken.

One prefill and one decode `pd serve` subprocess on loopback, KV over Mooncake/TCP.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import httpx
import pytest
import torch

from decode.scheduler import QUARANTINE_S
from tests.pd_cluster import Cluster, kv_pages_free, pd_cluster
from tests.tiny_checkpoints import load_hf, make_checkpoint

BOOTSTRAP_TIMEOUT = TRANSFER_TIMEOUT = 6.0
INSTANCE_ARGS = ("--chunked-prefill-size", "32", "--page-size", "4",
                 "--disaggregation-transfer-timeout", str(TRANSFER_TIMEOUT),
                 "--disaggregation-bootstrap-timeout", str(BOOTSTRAP_TIMEOUT))
PROMPT_LEN, NEW_TOKENS = 21, 8


@dataclass
class Answer:
    status: int
    ids: list[int] | None  # output_ids when status is 200
    text: str

    @property
    def ok(self) -> bool:
        return self.status == 200


async def post(client: httpx.AsyncClient, url: str, ids: list[int], bootstrap_port: int, room: int) -> Answer:
    body = {"input_ids": ids, "sampling_params": {"max_new_tokens": NEW_TOKENS, "temperature": 0.0},
            "bootstrap_host": "127.0.0.1", "bootstrap_port": bootstrap_port, "bootstrap_room": room}
    r = await client.post(url + "/generate", json=body)
    return Answer(r.status_code, r.json()["output_ids"] if r.status_code == 200 else None, r.text)


@pytest.fixture(scope="module")
def seed() -> int:
    return random.SystemRandom().randrange(2**31)


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory, seed: int) -> str:
    return make_checkpoint("qwen3_moe", str(tmp_path_factory.mktemp("pd_rooms") / "qwen3_moe"), seed=seed)


@pytest.fixture(scope="module")
def cluster(model: str) -> Iterator[Cluster]:
    with pd_cluster(model, 1, 1, instance_args=INSTANCE_ARGS) as c:
        yield c
        for p in c.prefill + c.decode:  # no refusal may surface as an unhandled exception
            assert "Traceback" not in p.log(), p.log()[-6000:]


@pytest.fixture(scope="module")
def oracle(model: str) -> Any:
    hf, cache = load_hf(model), {}

    def greedy(ids: list[int]) -> list[int]:
        if tuple(ids) not in cache:
            with torch.no_grad():
                out = hf.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                                  max_new_tokens=NEW_TOKENS, do_sample=False)
            cache[tuple(ids)] = out[0, len(ids):].tolist()
        return cache[tuple(ids)]

    return greedy


@pytest.fixture
def two_prompts(seed: int) -> tuple[list[int], list[int]]:
    """Two different prompts of the same length (the prefill's token-count check cannot tell them apart)."""
    gen = torch.Generator().manual_seed(seed + random.randrange(1 << 20))
    a, b = (torch.randint(0, 256, (PROMPT_LEN,), generator=gen).tolist() for _ in range(2))
    b[0] = (a[0] + 1) % 256
    return a, b


def scenario(steps: list[tuple[float, str, list[int]]], cluster: Cluster, room: int) -> list[Answer]:
    """Posts each (delay after the previous post, "prefill" | "decode", prompt) with bootstrap_room `room`, all
    in flight together; returns their answers in order."""
    prefill, decode, port = cluster.prefill[0].url, cluster.decode[0].url, cluster.bootstrap_ports[0]

    async def go() -> list[Answer]:
        async with httpx.AsyncClient(timeout=60) as client:
            tasks = []
            for delay, side, ids in steps:
                await asyncio.sleep(delay)
                url = prefill if side == "prefill" else decode
                tasks.append(asyncio.create_task(post(client, url, ids, port, room)))
            return list(await asyncio.gather(*tasks))

    return asyncio.run(go())


def assert_own_tokens(answers: list[Answer], prompts: list[list[int]], oracle: Any) -> None:
    """Every answer that succeeded holds its own prompt's greedy tokens (prefill answers only the first)."""
    for a, ids in zip(answers, prompts, strict=True):
        if a.ok:
            assert a.ids == oracle(ids)[: len(a.ids or [])], (a, oracle(ids))


def wait_pages(cluster: Cluster, start: dict[str, int], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while (now := {u: kv_pages_free(u) for u in start}) != start:
        assert time.monotonic() < deadline, f"KV pages not returned after {timeout:.0f} s: free {now}, start {start}"
        time.sleep(0.1)


def test_same_room_same_length_prompts_never_get_each_others_tokens(cluster, oracle, two_prompts) -> None:
    """The finding: A's prefill holds the room; B's prefill and B's decode come with the same room and a prompt of
    the same length. Both B requests fail with a clear error, and A's decode answers A's tokens."""
    a, b = two_prompts
    answers = scenario([(0.0, "prefill", a), (1.0, "prefill", b), (0.0, "decode", b), (0.5, "decode", a)],
                       cluster, random.getrandbits(63))
    assert_own_tokens(answers, [a, b, b, a], oracle)
    prefill_a, prefill_b, decode_b, decode_a = answers
    assert prefill_a.ok and decode_a.ok and decode_a.ids == oracle(a), answers
    assert prefill_b.status == 409 and "already has a sender" in prefill_b.text, prefill_b
    assert not decode_b.ok and "claimed by two different prompts" in decode_b.text, decode_b


def test_duplicate_live_room_on_decode_is_refused_and_the_first_is_served(cluster, oracle, two_prompts) -> None:
    a, _ = two_prompts
    answers = scenario([(0.0, "decode", a), (0.5, "decode", a), (0.5, "prefill", a)], cluster,
                       random.getrandbits(63))
    first, second, prefill = answers
    assert second.status == 409 and "already has a receiver" in second.text, second  # the client's fault: 4xx
    assert first.ok and first.ids == oracle(a) and prefill.ok, answers


def test_duplicate_live_room_on_prefill_is_refused_and_the_first_is_served(cluster, oracle, two_prompts) -> None:
    a, _ = two_prompts
    answers = scenario([(0.0, "prefill", a), (0.5, "prefill", a), (0.5, "decode", a)], cluster,
                       random.getrandbits(63))
    first, second, decode = answers
    assert second.status == 409 and "already has a sender" in second.text, second
    assert first.ok and decode.ok and decode.ids == oracle(a), answers


def test_decode_with_another_prompt_than_its_prefill_fails_clearly_and_leaks_no_page(cluster, two_prompts) -> None:
    a, b = two_prompts
    instances = [cluster.prefill[0].url, cluster.decode[0].url]
    # Idle means every page free (a snapshot could catch an earlier test's quarantined pages on their way back).
    start = {u: int(httpx.get(f"{u}/get_server_info", timeout=10).json()["kv_pages_total"]) for u in instances}
    t0 = time.monotonic()
    prefill, decode = scenario([(0.0, "prefill", a), (0.0, "decode", b)], cluster, random.getrandbits(63))
    assert not decode.ok and "claimed by two different prompts" in decode.text, decode
    # The prefill keeps waiting for a decode with its prompt, then gives up in bounded time.
    assert not prefill.ok and "decode never registered" in prefill.text, prefill
    assert time.monotonic() - t0 < BOOTSTRAP_TIMEOUT + 4
    wait_pages(cluster, start, QUARANTINE_S + 10)
