"""--kv-cache-dtype fp8_e4m3|fp8_e5m2: K and V stored as FP8 (scale 1.0), read back in the model's dtype.

Oracle: the same checkpoint with an fp32 KV cache whose stored values are rounded through the FP8 format first
(saturating at its largest finite value): the model then sees exactly the K and V an FP8 cache holds, so the logits
must be bit-identical. Against the unrounded fp32 cache the logits stay close (e4m3 keeps 3 mantissa bits). On a
GPU the Triton kernels (and CUDA graphs) over an FP8 cache equal the torch backend over the same cache. PD: a
prefill and a decode instance both with an FP8 cache move FP8 pages as they are and give the unified FP8 server's
greedy tokens; a side with another KV dtype is refused at registration (the fingerprint names the dtype,
tests/test_kvtransfer.py).
"""

from __future__ import annotations

import secrets

import pytest
import torch

from pd.engine.io import SamplingParams
from pd.engine.kv_cache import KV_STORAGE_DTYPES, KVCache
from pd.engine.llm import LLM
from pd.server_args import ServerArgs
from tests.pd_cluster import pd_cluster
from tests.server_process import pd_serve
from tests.test_pd_e2e import run_all
from tests.tiny_checkpoints import make_checkpoint

ARCHS = ["qwen3_moe", "deepseek_v3"]  # GQA K/V buffers, and MLA's one latent buffer


def _prompts(n: int) -> list[list[int]]:
    lengths = torch.randint(3, 70, (n,)).tolist()
    return [torch.randint(0, 256, (k,)).tolist() for k in lengths]


def _rounded_through(fp8: torch.dtype) -> type[KVCache]:
    """An fp32 KV cache whose store rounds every value through ``fp8`` the way an FP8 cache must."""
    limit = torch.finfo(fp8).max

    class Rounded(KVCache):
        def store(self, layer_id: int, loc: torch.Tensor, *values: torch.Tensor) -> None:
            super().store(layer_id, loc, *(v.clamp(-limit, limit).to(fp8).to(v.dtype) for v in values))

    return Rounded


@pytest.mark.parametrize("kv_cache_dtype", list(KV_STORAGE_DTYPES))
@pytest.mark.parametrize("arch", ARCHS)
def test_fp8_kv_cache_equals_the_rounded_oracle_and_stays_close_to_fp32(arch, kv_cache_dtype, tmp_path, monkeypatch):
    path = make_checkpoint(arch, str(tmp_path / arch), seed=secrets.randbelow(2**31))
    engine = dict(page_size=4, chunked_prefill_size=32, max_total_tokens=2048)
    fp8 = LLM(path, kv_cache_dtype=kv_cache_dtype, **engine)
    storage = KV_STORAGE_DTYPES[kv_cache_dtype]
    assert {buf.dtype for layer in fp8.runner.kv_cache.buffers for buf in layer} == {storage}
    full = LLM(path, **engine)
    # The same pool holds the same tokens in a quarter of fp32's bytes.
    assert fp8.runner.kv_bytes_per_rank * 4 == full.runner.kv_bytes_per_rank
    monkeypatch.setattr("pd.engine.model_runner.KVCache", _rounded_through(storage))
    oracle = LLM(path, **engine)
    assert oracle.runner.kv_cache.dtype == torch.float32
    prompts = _prompts(3)
    for ids in prompts:  # 70 tokens span three chunks: later chunks read earlier chunks' K/V back from the cache
        got, want, exact = (e.prefill_logits(ids) for e in (fp8, oracle, full))
        assert torch.equal(got, want), arch
        # Rounding, not garbage: unrelated logits sit near 1.4 (zeros at 1.0); K/V rounded through two or three
        # mantissa bits and amplified through these random-weight layers measured up to 0.24 over 36 checkpoints.
        assert ((got - exact).norm() / exact.norm()).item() < 0.5, arch
    sampling = SamplingParams(max_new_tokens=8, temperature=0.0)
    assert fp8.generate(prompts, sampling) == oracle.generate(prompts, sampling)
    assert fp8.scheduler.pool.num_free == fp8.scheduler.pool.num_pages  # every page came back


def test_kv_cache_dtype_flag_is_parsed_and_checked() -> None:
    assert ServerArgs.from_cli(["--model-path", "m", "--kv-cache-dtype", "fp8_e5m2"]).kv_cache_dtype == "fp8_e5m2"
    assert ServerArgs.from_cli(["--model-path", "m"]).kv_cache_dtype == "auto"
    with pytest.raises(SystemExit):
        ServerArgs.from_cli(["--model-path", "m", "--kv-cache-dtype", "int8"])


def test_pd_with_fp8_kv_on_both_sides_equals_unified_fp8(tmp_path) -> None:
    seed = secrets.randbelow(2**31)
    path = make_checkpoint("qwen3_moe", str(tmp_path / "qwen3_moe"), seed=seed)
    args = ("--chunked-prefill-size", "32", "--page-size", "4", "--kv-cache-dtype", "fp8_e4m3")
    prompts, new_tokens, streams = _prompts(6), 12, [i % 2 == 0 for i in range(6)]
    with pd_serve(path, *args) as url:
        unified = run_all(url, prompts, new_tokens, [False] * len(prompts))
    with pd_cluster(path, 1, 1, instance_args=args) as cluster:
        got = run_all(cluster.url, prompts, new_tokens, streams)
        # Once seen to fail, not reproduced since: what to look at if it fails again.
        differ = [i for i, (a, b) in enumerate(zip(got, unified, strict=True)) if a != b]
        assert got == unified, (f"checkpoint seed {seed}, prompts {differ} differ: PD {[got[i] for i in differ]}, "
                                f"unified {[unified[i] for i in differ]}; prompts {prompts}\n{cluster.logs()}")


@pytest.mark.gpu
@pytest.mark.parametrize("arch", ARCHS)
def test_triton_backend_over_an_fp8_kv_cache_equals_torch_backend_on_cuda(arch, tmp_path, gpu_fp32_clean):
    path = make_checkpoint(arch, str(tmp_path / arch), seed=secrets.randbelow(2**31))

    def engine(backend: str) -> LLM:
        return LLM(path, device="cuda", page_size=16, chunked_prefill_size=64, max_total_tokens=4096,
                   attention_backend=backend, kv_cache_dtype="fp8_e4m3")  # fmt: skip

    triton, reference = engine("triton"), engine("torch")
    assert triton.runner.graph_bs, "decode batches replay CUDA graphs over the FP8 cache"
    prompts = _prompts(4)
    for ids in prompts[:2]:
        torch.testing.assert_close(triton.prefill_logits(ids), reference.prefill_logits(ids), atol=1e-4, rtol=0)
    sampling = SamplingParams(max_new_tokens=16, temperature=0.0)
    assert triton.generate(prompts, sampling) == reference.generate(prompts, sampling)
