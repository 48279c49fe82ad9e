"""`pd serve` end to end against transformers: concurrent greedy requests through the HTTP API, for every MoE
architecture of the zoo, with one prompt longer than the chunked-prefill size."""

from __future__ import annotations

import asyncio
import secrets

import httpx
import pytest
import torch

from tests.server_process import pd_serve
from tests.tiny_checkpoints import load_hf, make_checkpoint

ARCHS = ["mixtral", "qwen2_moe", "qwen3_moe", "deepseek_v2", "deepseek_v3"]
CHUNK = 32


async def _generate_all(url: str, prompts: list[list[int]], new_tokens: int) -> list[dict]:
    async with httpx.AsyncClient(timeout=120) as client:
        params = {"max_new_tokens": new_tokens, "temperature": 0.0}
        responses = await asyncio.gather(*[
            client.post(f"{url}/generate", json={"input_ids": p, "sampling_params": params}) for p in prompts
        ])
    for r in responses:
        assert r.status_code == 200, r.text
    return [r.json() for r in responses]


@pytest.mark.parametrize("arch", ARCHS)
def test_concurrent_greedy_requests_match_transformers(arch, tmp_path):
    seed = secrets.randbelow(2**31)
    path = make_checkpoint(arch, str(tmp_path / arch), seed=seed)
    gen = torch.Generator().manual_seed(seed)
    lengths = [3, 17, 2 * CHUNK + 9, 40, 11]
    prompts = [torch.randint(0, 256, (n,), generator=gen).tolist() for n in lengths]
    with pd_serve(path, "--chunked-prefill-size", str(CHUNK), "--page-size", "4") as url:
        outs = asyncio.run(_generate_all(url, prompts, 32))
    hf = load_hf(path)
    for ids, out in zip(prompts, outs, strict=True):
        with torch.no_grad():
            ref = hf.generate(torch.tensor([ids]), max_new_tokens=32, do_sample=False)[0, len(ids):].tolist()
        assert out["output_ids"] == ref, f"seed {seed}, prompt length {len(ids)}"
        assert out["meta_info"]["prompt_tokens"] == len(ids)
        assert out["meta_info"]["completion_tokens"] == 32
