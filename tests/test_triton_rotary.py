"""The Triton rotary kernel against the torch reference (pd.layers.rotary.RotaryEmbedding's CPU path): Triton's
CPU interpreter in CI on ragged, strided inputs in both layouts, with and without Qwen3's per-head q/k RMSNorm
fused in (the reference: pd.layers.norm.RMSNorm's CPU path, then the rotation), and with the KV store fused in (the
rotated K and V land in their cache slots, every other slot untouched); large shapes on a GPU."""

from __future__ import annotations

import contextlib
import importlib.util

import pytest
import torch

from pd.layers import fused_kernels
from pd.layers.norm import RMSNorm
from pd.layers.rotary import RotaryEmbedding
from tests.interpreter_child import InterpreterChild

needs_triton = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")


def check(device: str, tokens: int, heads_q: int, heads_k: int, dim: int, dtype: torch.dtype, interleaved: bool,
          rope: dict, seed: int, norm: bool = False, store: bool = False) -> None:  # fmt: skip
    from pd.layers.triton_rotary import apply_rotary

    gen = torch.Generator().manual_seed(seed)
    emb = RotaryEmbedding(dim, {"rope_theta": 10000.0, **rope}, max_position=512, interleaved=interleaved)
    positions = torch.randint(0, 512, (tokens,), generator=gen)
    # q and k as views of one fused projection, as the attention layers produce them
    qkv = (torch.randn(tokens, (heads_q + 2 * heads_k) * dim, generator=gen) * 2).to(dtype)
    q = qkv[:, : heads_q * dim].view(tokens, heads_q, dim)
    k = qkv[:, heads_q * dim : (heads_q + heads_k) * dim].view(tokens, heads_k, dim)
    norms, kernel_norms = (None, None), None
    if norm:
        norms = (RMSNorm(dim, 1e-6), RMSNorm(dim, 1e-5))
        for n in norms:
            n.weight.data = (torch.randn(dim, generator=gen) * 0.5 + 1).to(dtype)
        kernel_norms = (norms[0].weight.to(device), 1e-6, norms[1].weight.to(device), 1e-5)
        q, k = q * 3, k / 3  # away from unit scale, so that a missing or misplaced norm shows
    ref_q, ref_k = emb(positions, q, k, *norms)
    table = emb._table_on(torch.device(device))
    kv_store, v = None, qkv[:, (heads_q + heads_k) * dim :].view(tokens, heads_k, dim)
    if store:  # the cache's K and V buffers hold random bytes; the tokens write slots of a random permutation
        slots = tokens + 7
        caches = [torch.randn(slots, heads_k, dim, generator=gen).to(dtype) for _ in range(2)]
        before = [c.clone() for c in caches]
        loc = torch.randperm(slots, generator=gen)[:tokens]
        kv_store = (v.to(device), *(c.to(device) for c in caches), loc.to(device))
    got_q, got_k = apply_rotary(positions.to(device), q.to(device), k.to(device), table, interleaved, kernel_norms,
                                kv_store)  # fmt: skip
    if store:
        assert got_k is None
        k_cache, v_cache = (c.cpu() for c in kv_store[1:3])
        got_k = k_cache[loc]
        assert torch.equal(v_cache[loc], v), "V lands in its slots as it is"
        others = torch.ones(slots, dtype=torch.bool)
        others[loc] = False
        assert torch.equal(k_cache[others], before[0][others]) and torch.equal(v_cache[others], before[1][others])
    if norm:  # what the rotation sees: the reference's normalised heads (CPU path), in the input dtype
        q, k = norms[0](q), norms[1](k)
    if dtype != torch.float32:
        # The reference in bf16/fp16 rounds each product, so a cancelling pair can be off by an ulp of the products,
        # not of the result. The kernel computes in float32 and rounds once: the float32 reference on the same inputs
        # is its oracle, within one ulp of the output dtype (and float32's own rounding near zero).
        ref_q, ref_k = (r.to(dtype) for r in emb(positions, q.float(), k.float()))
    tol = {torch.float32: 2e-6, torch.bfloat16: 2**-7, torch.float16: 2**-10}[dtype]
    atol = tol if dtype == torch.float32 else 1e-5
    if norm and dtype != torch.float32:
        # The kernel's sum of squares runs in another order: a normalised value may land an ulp of the input dtype
        # away, and a cancelling rotation turns that into an absolute error of an ulp at the heads' scale.
        atol = 2 * tol * max(q.abs().max().item(), k.abs().max().item())
    torch.testing.assert_close(got_q.cpu().float(), ref_q.float(), rtol=tol, atol=atol)
    torch.testing.assert_close(got_k.cpu().float(), ref_k.float(), rtol=tol, atol=atol)


CASES = [(5, 4, 2, 32, torch.float32, False, {}), (3, 8, 1, 16, torch.float32, True, {}),
         (7, 3, 3, 24, torch.bfloat16, False, {"rope_type": "linear", "factor": 2.0}),
         (2, 5, 1, 16, torch.float16, True, {"rope_type": "yarn", "factor": 4.0,
                                            "original_max_position_embeddings": 128}),
         (0, 4, 2, 32, torch.float32, False, {})]  # fmt: skip
NORM_CASES = [(5, 4, 2, 32, torch.float32, False, {}), (6, 3, 1, 24, torch.bfloat16, False, {}),
              (3, 2, 2, 16, torch.float16, True, {})]  # fmt: skip
# (..., norm): the store with and without the q/k norms
STORE_CASES = [(5, 4, 2, 32, torch.float32, False, {}, True), (6, 3, 3, 24, torch.bfloat16, True, {}, False),
               (0, 4, 2, 16, torch.float32, False, {}, True)]  # fmt: skip


@needs_triton
@pytest.mark.parametrize("case", range(len(CASES)))
def test_triton_rotary_equals_the_reference_under_the_interpreter(case: int, interpreter: InterpreterChild) -> None:
    seed = int(torch.randint(0, 2**62, ()))  # fresh each run (tests/conftest.py seeds the global generator)
    interpreter.run(__name__, "check", "cpu", *CASES[case], seed, timeout_s=300)


@needs_triton
@pytest.mark.parametrize("case", range(len(NORM_CASES)))
def test_triton_rotary_with_qk_norm_equals_norm_then_rotation_under_the_interpreter(
    case: int, interpreter: InterpreterChild
) -> None:
    seed = int(torch.randint(0, 2**62, ()))
    interpreter.run(__name__, "check", "cpu", *NORM_CASES[case], seed, True, timeout_s=300)


@needs_triton
@pytest.mark.parametrize("case", range(len(STORE_CASES)))
def test_triton_rotary_storing_kv_writes_the_cache_slots_under_the_interpreter(
    case: int, interpreter: InterpreterChild
) -> None:
    *shape, norm = STORE_CASES[case]
    seed = int(torch.randint(0, 2**62, ()))
    interpreter.run(__name__, "check", "cpu", *shape, seed, norm, True, timeout_s=300)


@pytest.mark.gpu
@pytest.mark.parametrize("store", [False, True])
@pytest.mark.parametrize("norm", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("tokens,heads_q,heads_k,dim,interleaved",
                         [(1, 32, 4, 128, False), (8192, 32, 4, 128, False), (333, 128, 1, 64, True)])  # fmt: skip
def test_triton_rotary_equals_the_reference_on_the_gpu(tokens, heads_q, heads_k, dim, interleaved, dtype, norm,
                                                       store):  # fmt: skip
    check("cuda", tokens, heads_q, heads_k, dim, dtype, interleaved, {}, int(torch.randint(0, 2**62, ())), norm,
          store)  # fmt: skip


def check_inplace(device: str, tokens: int, heads: int, nope: int, rope_dim: int, latent: int, dtype: torch.dtype,
                  seed: int, fused: bool = False) -> None:  # fmt: skip
    """MLA's in-place rotation: the rope columns of the query [T, H, nope + rope] and of the latent row
    [T, latent + rope] are rotated where they lie (the kernel, or the torch path on the CPU) and equal the
    reference's new tensors; every other column keeps its bits."""
    gen = torch.Generator().manual_seed(seed)
    emb = RotaryEmbedding(rope_dim, {"rope_theta": 10000.0}, max_position=512, interleaved=True)
    positions = torch.randint(0, 512, (tokens,), generator=gen)
    q = torch.randn(tokens, heads, nope + rope_dim, generator=gen).to(dtype)
    kv = torch.randn(tokens, latent + rope_dim, generator=gen).to(dtype)
    ref_q, ref_k = emb(positions, q[..., nope:], kv[:, None, latent:])  # the CPU reference: new tensors
    got_q, got_kv = q.clone().to(device), kv.clone().to(device)
    q_pe, k_pe = got_q[..., nope:], got_kv[:, None, latent:]
    with fused_kernels.on_cpu() if fused and device == "cpu" else contextlib.nullcontext():
        out_q, out_k = emb.to(device)(positions.to(device), q_pe, k_pe, inplace=True)
    assert out_q.data_ptr() == q_pe.data_ptr() and out_k.data_ptr() == k_pe.data_ptr(), "the views, returned"
    got_q, got_kv = got_q.cpu(), got_kv.cpu()
    assert torch.equal(got_q[..., :nope], q[..., :nope]) and torch.equal(got_kv[:, :latent], kv[:, :latent])
    tol = {torch.float32: 2e-6, torch.bfloat16: 2**-7}[dtype]
    torch.testing.assert_close(got_q[..., nope:].float(), ref_q.float(), rtol=tol, atol=tol * 8)
    torch.testing.assert_close(got_kv[:, None, latent:].float(), ref_k.float(), rtol=tol, atol=tol * 8)


@pytest.mark.parametrize("fused", [False, True])
def test_rotation_in_place_rotates_only_the_rope_columns(fused: bool, interpreter: InterpreterChild) -> None:
    seed = int(torch.randint(0, 2**62, ()))
    if not fused:
        check_inplace("cpu", 9, 4, 16, 8, 32, torch.float32, seed)
    else:
        if importlib.util.find_spec("triton") is None:
            pytest.skip("triton is not installed")
        interpreter.run(__name__, "check_inplace", "cpu", 9, 4, 16, 8, 32, torch.float32, seed, True, timeout_s=300)


@pytest.mark.gpu
def test_rotation_in_place_on_the_gpu() -> None:
    check_inplace("cuda", 4099, 128, 128, 64, 512, torch.bfloat16, int(torch.randint(0, 2**62, ())))
