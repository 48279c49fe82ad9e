"""Prefill/decode disaggregation end to end: greedy outputs through the load balancer (2 prefill x 2 decode)
equal non-disaggregated `pd serve` on the same checkpoint, streaming and not, and our instances behind
sglang-router give the same outputs as behind our load balancer."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch

from tests.pd_cluster import kv_pages_free, pd_cluster
from tests.server_process import pd_serve
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


def _prompts(seed: int, n: int) -> list[list[int]]:
    gen = torch.Generator().manual_seed(seed)
    lengths = torch.randint(3, 3 * CHUNK, (n,), generator=gen).tolist()
    lengths[0] = 2 * CHUNK + 7  # always one prompt longer than the chunked-prefill size
    return [torch.randint(0, 256, (n_,), generator=gen).tolist() for n_ in lengths]


def _wait_pages(urls: list[str], start: dict[str, int], timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while any(kv_pages_free(u) != start[u] for u in urls):
        assert time.monotonic() < deadline, {u: (kv_pages_free(u), start[u]) for u in urls}
        time.sleep(0.5)


@contextlib.contextmanager
def _pd_equals_pd_serve(
    arch: str, tmp_path: Path, num_requests: int, new_tokens: int, num_prefill: int, num_decode: int,
    **cluster_args: Any,
) -> Iterator[list[str]]:
    """Greedy outputs through our load balancer (odd requests streamed) equal one `pd serve` on a fresh checkpoint;
    yields the instances' URLs inside the cluster, then checks that every page came back."""
    seed = int(torch.randint(0, 2**31, ()).item())
    path = make_checkpoint(arch, str(tmp_path / arch), seed=seed)
    prompts = _prompts(seed, num_requests)
    streams = [i % 2 == 1 for i in range(len(prompts))]
    with pd_serve(path, *INSTANCE_ARGS) as url:
        expected = run_all(url, prompts, new_tokens, [False] * len(prompts))
    with pd_cluster(path, num_prefill, num_decode, instance_args=INSTANCE_ARGS, **cluster_args) as cluster:
        instances = [p.url for p in cluster.prefill + cluster.decode]
        start = {u: kv_pages_free(u) for u in instances}
        got = run_all(cluster.url, prompts, new_tokens, streams)
        assert got == expected, f"seed {seed}"
        yield instances
        _wait_pages(instances, start)


@pytest.mark.parametrize("arch", ["deepseek_v3", "qwen3_moe"])
def test_pd_behind_our_lb_equals_pd_serve(arch, tmp_path):
    with _pd_equals_pd_serve(arch, tmp_path, 18, 24, 2, 2) as instances:
        # Every instance served some of them (and no page leaks anywhere, checked on the way out).
        for u in instances:
            assert httpx.get(f"{u}/get_server_info").json()["prompt_tokens_total"] > 0, u


def test_our_instances_behind_sglang_router_equal_behind_our_lb(tmp_path):
    seed = int(torch.randint(0, 2**31, ()).item())
    path = make_checkpoint("qwen3_moe", str(tmp_path / "q3"), seed=seed)
    prompts = _prompts(seed, 8)
    streams = [i % 2 == 0 for i in range(len(prompts))]
    outputs = {}
    for router in ("pd", "sglang"):
        with pd_cluster(path, 1, 1, router=router, instance_args=INSTANCE_ARGS) as cluster:
            outputs[router] = run_all(cluster.url, prompts, 16, streams)
    assert outputs["sglang"] == outputs["pd"], f"seed {seed}"


# Prefill and decode with different tensor-parallel sizes: every rank caches all KV heads (and MLA's latent), so the
# leader's pages travel as they are and the decode leader shares them with its followers.
EPLB = ("--enable-eplb", "--ep-num-redundant-experts", "2", "--eplb-rebalance-num-iterations", "4")
TP_SPLITS = [
    ("qwen3_moe", ("--tp", "2", "--ep", "2", "--moe-a2a-backend", "torch"), ()),  # prefill: normal mode
    ("deepseek_v3", (), ("--tp", "2", "--ep", "2", "--moe-a2a-backend", "torch")),  # decode: low_latency mode
    ("qwen3_moe", (), ("--tp", "2")),
    # EPLB on both sides: expert weights move between ranks every 4 forwards while prompts transfer
    ("deepseek_v3", ("--tp", "2", "--ep", "2", "--moe-a2a-backend", "torch", *EPLB),
     ("--tp", "2", "--ep", "2", "--moe-a2a-backend", "torch", *EPLB)),
    # two-batch overlap on both sides: prompts (and chunks) cut between two micro-batches
    ("qwen3_moe", ("--tp", "2", "--ep", "2", "--moe-a2a-backend", "torch", "--enable-two-batch-overlap"),
     ("--tp", "2", "--ep", "2", "--moe-a2a-backend", "torch", "--enable-two-batch-overlap")),
]


@pytest.mark.parametrize(("arch", "prefill_args", "decode_args"), TP_SPLITS,
                         ids=["qwen3-prefill-tp2", "dsv3-decode-tp2", "qwen3-decode-tp2-none", "dsv3-eplb-both",
                              "qwen3-tbo-both"])
def test_pd_with_different_tp_on_each_side_equals_pd_serve(arch, prefill_args, decode_args, tmp_path):
    with _pd_equals_pd_serve(arch, tmp_path, 8, 16, 1, 1, prefill_args=prefill_args, decode_args=decode_args):
        pass


# DP attention on either side: each attention group has its own KV pool and transfer endpoints, and a PD request goes
# to group room % dp on both sides (the decode's group registers with the prefill group that holds the room).
DP = ("--enable-dp-attention", "--dp-size", "2")
DP_SPLITS = [
    ("deepseek_v3", ("--tp", "2", "--ep", "2", "--moe-a2a-backend", "torch", *DP),
     ("--tp", "2", "--ep", "2", "--moe-a2a-backend", "torch", *DP)),
    ("qwen3_moe", ("--tp", "2", *DP), ()),
    ("qwen3_moe", (), ("--tp", "4", *DP)),  # two groups of two ranks: the leader shares the pages in its group
]


@pytest.mark.parametrize(("arch", "prefill_args", "decode_args"), DP_SPLITS,
                         ids=["dsv3-dp2-both-torch-a2a", "qwen3-prefill-dp2", "qwen3-decode-tp4-dp2"])
def test_pd_with_dp_attention_equals_pd_serve(arch, prefill_args, decode_args, tmp_path):
    with _pd_equals_pd_serve(arch, tmp_path, 10, 16, 1, 1, prefill_args=prefill_args, decode_args=decode_args):
        pass


def test_pd_with_a_two_node_dp_attention_prefill_equals_pd_serve(tmp_path):
    """Node 1's DP group announces its transfer endpoints to the bootstrap server on node 0 and sends its rooms'
    pages from there."""
    args = ("--tp", "2", "--ep", "2", "--moe-a2a-backend", "torch", *DP)
    with _pd_equals_pd_serve("qwen3_moe", tmp_path, 10, 16, 1, 1, prefill_args=args, prefill_nodes=2):
        pass
