"""CUDA: every architecture against transformers on the same GPU, in fp32 and bf16 (not run in CI).

fp32: prefill logits within 1e-4 and identical greedy tokens (TF32 off on both sides).
bf16: prefill logits within bf16 tolerance (median per-position relative error), and 90% of the greedy tokens we pick
are near-argmaxes of the fp32 logits on our sequence, up to transformers' own bf16 noise there (tokens may legitimately
differ after a near-tie).
"""

from __future__ import annotations

import pytest
import torch

from pd.engine.io import SamplingParams
from pd.engine.llm import LLM
from tests.tiny_checkpoints import load_hf, make_checkpoint

pytestmark = pytest.mark.gpu


@pytest.fixture(autouse=True)
def _release_gpu_memory():
    """Each test's engine sizes its KV cache from free GPU memory: hand back what the previous one cached."""
    yield
    import gc

    gc.collect()
    torch.cuda.empty_cache()
ARCHS = ["llama", "mixtral", "qwen2_moe", "qwen3_moe", "deepseek_v2", "deepseek_v3"]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("arch", ARCHS)
def test_cuda_engine_matches_transformers(arch, dtype, tmp_path):
    torch.backends.cuda.matmul.allow_tf32 = False
    seed = int(torch.randint(0, 2**31, ()).item())
    path = make_checkpoint(arch, str(tmp_path / arch), seed=seed)
    hf = load_hf(path).to("cuda", dtype)
    llm = LLM(path, device="cuda", dtype=dtype, chunked_prefill_size=32, page_size=4, max_total_tokens=16384)
    gen = torch.Generator().manual_seed(seed)
    prompts = [torch.randint(0, 256, (n,), generator=gen).tolist() for n in (5, 17, 75, 38)]

    # bf16 oracle: transformers in fp32 is the truth; ours must be as close to it as transformers' own bf16 run.
    hf32 = load_hf(path).to("cuda") if dtype != torch.float32 else hf

    def ref_logits(model, ids):
        with torch.no_grad():
            return model(torch.tensor([ids], device="cuda")).logits[0].float()

    for ids in prompts[1:3]:
        ours = llm.prefill_logits(ids)
        if dtype == torch.float32:
            torch.testing.assert_close(ours, ref_logits(hf, ids), atol=1e-4, rtol=0, msg=f"seed {seed}")
        else:
            truth = ref_logits(hf32, ids)
            # The median over positions of each position's relative error, within twice transformers' own bf16
            # error: a router near-tie flipped in bf16 moves a few positions a lot, on either side and by chance
            # (seen on the GPU: a tiny Mixtral at 8.5% whole-matrix error against transformers' 3.5%, while on the
            # CPU the same seed gives transformers itself 8.0%); an attention, norm or expert bug moves them all.
            ours_err, hf_err = (((x - truth).norm(dim=-1) / truth.norm(dim=-1)).median().item()
                                for x in (ours, ref_logits(hf, ids)))
            assert ours_err <= 2 * hf_err + 1e-2, f"seed {seed}: relative error {ours_err} vs {hf_err}"

    outs = llm.generate(prompts, SamplingParams(max_new_tokens=32, temperature=0.0))
    for ids, out in zip(prompts, outs, strict=True):
        if dtype == torch.float32:
            with torch.no_grad():
                ref_ids = hf.generate(torch.tensor([ids], device="cuda"), max_new_tokens=32, do_sample=False)
            assert out == ref_ids[0, len(ids):].tolist(), f"seed {seed}"
        else:
            # Each token we chose must be the fp32 argmax up to the bf16 noise transformers itself shows there.
            truth = ref_logits(hf32, ids + out)[len(ids) - 1 : -1]
            noise = (ref_logits(hf, ids + out)[len(ids) - 1 : -1] - truth).abs().max(dim=1).values
            chosen = truth.gather(1, torch.tensor(out, device="cuda")[:, None]).squeeze(1)
            gap = truth.max(dim=1).values - chosen
            # MLA runs in the absorbed form (q through W_UK, the attended latent through W_UV), which rounds to bf16
            # at other places than transformers' expanded K/V: its error is independent of transformers' own, so
            # allow 3x that noise there (seen: a chosen token 2.5x the noise below the fp32 argmax, 2026-12-01).
            slack = 3 if arch.startswith("deepseek") else 2
            # At 90% of the positions: where our bf16 router flips a near-tie that transformers' does not (or the
            # other way round), one position sits well below the argmax (seen: 0.18 against a noise of 0.02, once
            # in 32); broken kernels put most tokens there.
            near = gap <= slack * noise + 1e-3
            assert near.float().mean() >= 0.9, f"seed {seed}: gaps {gap.tolist()} noise {noise.tolist()}"


@pytest.mark.parametrize("arch", ["mixtral", "deepseek_v3"])
def test_pd_serve_on_cuda_matches_transformers(arch, tmp_path):
    import asyncio

    from tests.server_process import free_port, pd_process
    from tests.test_serve_parity import _generate_all

    seed = int(torch.randint(0, 2**31, ()).item())
    path = make_checkpoint(arch, str(tmp_path / arch), seed=seed)
    gen = torch.Generator().manual_seed(seed)
    prompts = [torch.randint(0, 256, (n,), generator=gen).tolist() for n in (3, 17, 73, 40)]
    port = free_port()
    args = ["serve", "--model-path", path, "--device", "cuda", "--dtype", "float32", "--port", str(port),
            "--chunked-prefill-size", "32", "--page-size", "4"]
    with pd_process(args, port) as url:
        outs = asyncio.run(_generate_all(url, prompts, 32))
    hf = load_hf(path).to("cuda")
    for ids, out in zip(prompts, outs, strict=True):
        with torch.no_grad():
            ref = hf.generate(torch.tensor([ids], device="cuda"), max_new_tokens=32, do_sample=False)
        assert out["output_ids"] == ref[0, len(ids):].tolist(), f"seed {seed}"
