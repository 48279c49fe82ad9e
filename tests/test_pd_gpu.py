"""PD on one GPU (not run in CI: needs a CUDA GPU and Mooncake's CUDA build): a prefill and a decode instance
share the GPU (each --mem-fraction-static 0.35), Mooncake moves the prompt's KV from GPU memory to GPU memory,
the decode instance replays CUDA graphs, and the load balancer in front answers. The oracle is the unified
`pd serve` on the same GPU: the same greedy tokens in fp32, for prompts of many lengths sent concurrently.
"""

from __future__ import annotations

import concurrent.futures
import importlib.util

import httpx
import pytest
import torch

from tests.pd_cluster import pd_cluster
from tests.server_process import free_port, pd_process
from tests.tiny_checkpoints import make_checkpoint

GPU_ARGS = ("--device", "cuda", "--dtype", "float32", "--mem-fraction-static", "0.35")


def _greedy(url: str, prompts: list[list[int]], new_tokens: int) -> list[list[int]]:
    def one(ids: list[int]) -> list[int]:
        body = {"input_ids": ids, "sampling_params": {"max_new_tokens": new_tokens, "temperature": 0.0,
                                                      "ignore_eos": True}}  # fmt: skip
        r = httpx.post(f"{url}/generate", json=body, timeout=300)
        r.raise_for_status()
        return r.json()["output_ids"]

    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        return list(pool.map(one, prompts))


@pytest.mark.gpu
@pytest.mark.parametrize("arch", ["qwen3_moe", "deepseek_v3"])
def test_pd_on_one_gpu_gives_the_unified_servers_greedy_tokens(arch: str, tmp_path) -> None:
    if importlib.util.find_spec("mooncake") is None:
        pytest.skip("needs Mooncake's transfer engine (the CUDA build: mooncake-transfer-engine-cuda13)")
    seed = int(torch.randint(0, 2**31, ()).item())
    path = make_checkpoint(arch, str(tmp_path / arch), seed=seed)
    gen = torch.Generator().manual_seed(seed)
    prompts = [torch.randint(0, 256, (int(n),), generator=gen).tolist()
               for n in torch.randint(3, 300, (12,), generator=gen)]  # fmt: skip
    port = free_port()
    with pd_process(["serve", "--model-path", path, "--port", str(port), *GPU_ARGS], port, timeout=600) as url:
        expected = _greedy(url, prompts, 24)
    with pd_cluster(path, instance_args=GPU_ARGS) as cluster:
        got = _greedy(cluster.url, prompts, 24)
        decode_log = cluster.decode[0].log()
    assert "captured" in decode_log and "CUDA graphs" in decode_log, decode_log[-3000:]
    assert got == expected, f"seed {seed}"
