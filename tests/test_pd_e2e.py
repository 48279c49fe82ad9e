"""Prefill/decode disaggregation end to end: greedy outputs through the load balancer (2 prefill x 2 decode, and
1 x 1 with different parallel layouts on each side) equal non-disaggregated `pd serve` on the same checkpoint,
streaming and not, and the same instances behind sglang-router give those outputs too. One reference `pd serve` run
per architecture and pytest run answers every comparison (Reference)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import secrets
import subprocess
import sys
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
import torch

from tests.pd_cluster import Cluster, kv_pages_free, pd_cluster, start_proc, wait_healthy
from tests.server_process import free_port, pd_serve
from tests.tiny_checkpoints import make_checkpoint

CHUNK, PAGE = 32, 4
INSTANCE_ARGS = ("--chunked-prefill-size", str(CHUNK), "--page-size", str(PAGE))


async def _one(client: httpx.AsyncClient, url: str, ids: list[int], new_tokens: int, stream: bool) -> list[int]:
    body = {"input_ids": ids, "sampling_params": {"max_new_tokens": new_tokens, "temperature": 0.0},
            "stream": stream}
    if not stream:
        r = await client.post(f"{url}/generate", json=body)
        assert r.status_code == 200, r.text
        return r.json()["output_ids"]
    output_ids: list[int] = []
    async with client.stream("POST", f"{url}/generate", json=body) as r:
        assert r.status_code == 200, await r.aread()
        async for line in r.aiter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                chunk = json.loads(line[6:])
                assert "error" not in chunk, chunk
                output_ids = chunk["output_ids"]  # cumulative
    return output_ids


def run_all(url: str, prompts: list[list[int]], new_tokens: int, streams: list[bool]) -> list[list[int]]:
    async def go() -> list[list[int]]:
        async with httpx.AsyncClient(timeout=120) as client:
            pairs = zip(prompts, streams, strict=True)
            return await asyncio.gather(*[_one(client, url, p, new_tokens, s) for p, s in pairs])

    return asyncio.run(go())


# The reference answers: enough prompts and tokens for every test here, which takes prefixes (greedy answers to
# fewer tokens are prefixes of these).
MAX_REQUESTS, MAX_NEW_TOKENS = 18, 24


def _prompts(seed: int, n: int) -> list[list[int]]:
    gen = torch.Generator().manual_seed(seed)
    lengths = torch.randint(3, 3 * CHUNK, (n,), generator=gen).tolist()
    lengths[0] = 2 * CHUNK + 7  # always one prompt longer than the chunked-prefill size
    return [torch.randint(0, 256, (n_,), generator=gen).tolist() for n_ in lengths]


class Reference:
    """A fresh random checkpoint of `arch`, MAX_REQUESTS prompts and one `pd serve`'s greedy answers to them
    (MAX_NEW_TOKENS each): what every PD deployment of that checkpoint must reproduce. Made once per pytest run and
    architecture (the `pd_references` fixture in conftest.py)."""

    def __init__(self, arch: str, root: str) -> None:
        self.arch, self.seed = arch, secrets.randbelow(2**31)
        self.path = make_checkpoint(arch, os.path.join(root, arch), seed=self.seed)
        self.prompts = _prompts(self.seed, MAX_REQUESTS)
        with pd_serve(self.path, *INSTANCE_ARGS) as url:
            self.answers = run_all(url, self.prompts, MAX_NEW_TOKENS, [False] * MAX_REQUESTS)

    def check(self, url: str, num_requests: int, new_tokens: int, streams: list[bool]) -> None:
        """The first num_requests prompts through `url` (prompt i streamed when streams[i]) get the reference's
        first new_tokens tokens."""
        assert num_requests <= MAX_REQUESTS and new_tokens <= MAX_NEW_TOKENS
        got = run_all(url, self.prompts[:num_requests], new_tokens, streams)
        assert got == [a[:new_tokens] for a in self.answers[:num_requests]], f"{self.arch}, seed {self.seed}"


def _wait_pages(urls: list[str], start: dict[str, int], timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while any(kv_pages_free(u) != start[u] for u in urls):
        assert time.monotonic() < deadline, {u: (kv_pages_free(u), start[u]) for u in urls}
        time.sleep(0.1)


@contextlib.contextmanager
def _no_page_leak(cluster: Cluster) -> Iterator[list[str]]:
    """Yields the instances' URLs; on the way out, waits until each has its free pages of the start back."""
    instances = [p.url for p in cluster.prefill + cluster.decode]
    start = {u: kv_pages_free(u) for u in instances}
    yield instances
    _wait_pages(instances, start)


@contextlib.contextmanager
def _pd_equals_pd_serve(ref: Reference, num_requests: int, new_tokens: int, num_prefill: int, num_decode: int,
                        **cluster_args: Any) -> Iterator[list[str]]:
    """Greedy outputs through our load balancer (odd requests streamed) equal the reference `pd serve`'s; yields the
    instances' URLs inside the cluster, then checks that every page came back."""
    streams = [i % 2 == 1 for i in range(num_requests)]
    with pd_cluster(ref.path, num_prefill, num_decode, instance_args=INSTANCE_ARGS, **cluster_args) as cluster:
        with _no_page_leak(cluster) as instances:
            ref.check(cluster.url, num_requests, new_tokens, streams)
            yield instances


@pytest.fixture(scope="module", params=["deepseek_v3", "qwen3_moe"])
def cluster_2x2(request: pytest.FixtureRequest, pd_references: Any) -> Iterator[tuple[Reference, Cluster]]:
    """2 prefill x 2 decode instances of the reference checkpoint behind our load balancer."""
    ref = pd_references(request.param)
    with pd_cluster(ref.path, 2, 2, instance_args=INSTANCE_ARGS) as cluster:
        yield ref, cluster


def test_pd_behind_our_lb_equals_pd_serve(cluster_2x2: tuple[Reference, Cluster]) -> None:
    ref, cluster = cluster_2x2
    with _no_page_leak(cluster) as instances:
        ref.check(cluster.url, MAX_REQUESTS, MAX_NEW_TOKENS, [i % 2 == 1 for i in range(MAX_REQUESTS)])
    # Every instance served some of them (and no page leaks anywhere, checked on the way out).
    for u in instances:
        assert httpx.get(f"{u}/get_server_info").json()["prompt_tokens_total"] > 0, u


def test_the_same_instances_behind_sglang_router_equal_pd_serve(cluster_2x2: tuple[Reference, Cluster]) -> None:
    """sglang-router (round robin) in front of the instances our balancer fronts gives the same answers."""
    ref, cluster = cluster_2x2
    port = free_port()
    argv = [sys.executable, "-m", "sglang_router.launch_router", "--pd-disaggregation", "--host", "127.0.0.1",
            "--port", str(port), "--policy", "round_robin",
            # its Prometheus exporter binds 29000 by default: two routers on one machine would collide
            "--prometheus-port", str(free_port())]
    for p, bport in zip(cluster.prefill, cluster.bootstrap_ports, strict=True):
        argv += ["--prefill", p.url, str(bport)]
    for p in cluster.decode:
        argv += ["--decode", p.url]
    router = start_proc("sglang-router", argv, f"http://127.0.0.1:{port}")
    try:
        wait_healthy([router], timeout=60)
        with _no_page_leak(cluster):
            ref.check(router.url, 8, 16, [i % 2 == 0 for i in range(8)])
    finally:
        router.popen.terminate()
        try:
            router.popen.wait(20)
        except subprocess.TimeoutExpired:
            router.kill()
        os.unlink(router.log_path)


# Prefill and decode with different tensor-parallel sizes: every rank caches all KV heads (and MLA's latent), so the
# prefill leader writes them into every decode rank's own memory.
EPLB = ("--enable-eplb", "--ep-num-redundant-experts", "2", "--eplb-rebalance-num-iterations", "4")
TP_SPLITS = [
    ("qwen3_moe", ("--tp", "2", "--ep", "2", "--moe-a2a-backend", "torch"), ()),  # prefill: normal mode
    ("deepseek_v3", (), ("--tp", "2", "--ep", "2", "--moe-a2a-backend", "torch")),  # decode: low_latency mode
    # (decode at --tp 2 without EP: tests/test_pd_tp_kv.py, which also counts the decode ranks' collectives)
    # EPLB on both sides: expert weights move between ranks every 4 forwards while prompts transfer
    ("deepseek_v3", ("--tp", "2", "--ep", "2", "--moe-a2a-backend", "torch", *EPLB),
     ("--tp", "2", "--ep", "2", "--moe-a2a-backend", "torch", *EPLB)),
    # two-batch overlap on both sides: prompts (and chunks) cut between two micro-batches
    ("qwen3_moe", ("--tp", "2", "--ep", "2", "--moe-a2a-backend", "torch", "--enable-two-batch-overlap"),
     ("--tp", "2", "--ep", "2", "--moe-a2a-backend", "torch", "--enable-two-batch-overlap")),
]


@pytest.mark.parametrize(("arch", "prefill_args", "decode_args"), TP_SPLITS,
                         ids=["qwen3-prefill-tp2", "dsv3-decode-tp2", "dsv3-eplb-both", "qwen3-tbo-both"])
def test_pd_with_different_tp_on_each_side_equals_pd_serve(arch, prefill_args, decode_args, pd_references):
    with _pd_equals_pd_serve(pd_references(arch), 8, 16, 1, 1, prefill_args=prefill_args, decode_args=decode_args):
        pass


# DP attention on either side: each attention group has its own KV pool and transfer endpoints, and a PD request goes
# to group room % dp on both sides (the decode's group registers with the prefill group that holds the room).
DP = ("--enable-dp-attention", "--dp-size", "2")
DP_SPLITS = [
    ("deepseek_v3", ("--tp", "2", "--ep", "2", "--moe-a2a-backend", "torch", *DP),
     ("--tp", "2", "--ep", "2", "--moe-a2a-backend", "torch", *DP)),
    ("qwen3_moe", ("--tp", "2", *DP), ()),
    ("qwen3_moe", (), ("--tp", "4", *DP)),  # two groups of two ranks: each rank receives its own pages
]


@pytest.mark.parametrize(("arch", "prefill_args", "decode_args"), DP_SPLITS,
                         ids=["dsv3-dp2-both-torch-a2a", "qwen3-prefill-dp2", "qwen3-decode-tp4-dp2"])
def test_pd_with_dp_attention_equals_pd_serve(arch, prefill_args, decode_args, pd_references):
    with _pd_equals_pd_serve(pd_references(arch), 10, 16, 1, 1, prefill_args=prefill_args, decode_args=decode_args):
        pass


def test_pd_with_a_two_node_dp_attention_prefill_equals_pd_serve(pd_references):
    """Node 1's DP group announces its transfer endpoints to the bootstrap server on node 0 and sends its rooms'
    pages from there."""
    args = ("--tp", "2", "--ep", "2", "--moe-a2a-backend", "torch", *DP)
    with _pd_equals_pd_serve(pd_references("qwen3_moe"), 10, 16, 1, 1, prefill_args=args, prefill_nodes=2):
        pass
