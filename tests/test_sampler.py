"""The sampler against an independent computation of the filtered distribution."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from pd.engine.io import SamplingParams
from pd.engine.sampler import BAD_ROW, SamplingRows, sample, uniform_from


def _filtered_probs(logits: list[float], p: SamplingParams) -> list[float]:
    """Plain-Python reference: temperature, then top-k, top-p (smallest prefix reaching p), min-p."""
    scaled = [x / p.temperature for x in logits]
    m = max(scaled)
    exp = [math.exp(x - m) for x in scaled]
    total = sum(exp)
    probs = [e / total for e in exp]
    order = sorted(range(len(probs)), key=lambda i: -probs[i])
    keep, cum = [], 0.0
    for rank, i in enumerate(order):
        if rank > 0 and (p.top_k > 0 and rank >= p.top_k or cum > p.top_p or probs[i] < p.min_p * probs[order[0]]):
            continue
        keep.append(i)
        cum += probs[i]
    kept_total = sum(probs[i] for i in keep)
    return [probs[i] / kept_total if i in keep else 0.0 for i in range(len(probs))]


def _sample(logits: torch.Tensor, params: list[SamplingParams], seeds: list[int] | None = None,
            index: int = 0) -> list[int]:
    seeds = seeds if seeds is not None else list(range(len(params)))
    rows = SamplingRows.build(params, seeds, [index] * len(params), logits.shape[-1], logits.device)
    return sample(logits, rows).tolist()


def test_greedy_rows_take_the_argmax_and_mixed_batches_work():
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(5, 300, generator=gen)
    params = [SamplingParams(temperature=0.0), SamplingParams(temperature=0.7, top_p=0.9, min_p=0.05),
              SamplingParams(top_k=1), SamplingParams(temperature=1.3, top_k=20), SamplingParams(temperature=0.0)]
    out = _sample(logits, params)
    argmax = logits.argmax(-1).tolist()
    assert out[0] == argmax[0] and out[2] == argmax[2] and out[4] == argmax[4]
    assert all(0 <= t < 300 for t in out)


def test_a_row_draws_the_same_token_whatever_batch_it_shares():
    """The draw depends on (seed, output index) only: alone, in another batch, in another row order."""
    logits = torch.randn(6, 100, generator=torch.Generator().manual_seed(1))
    params = [SamplingParams(temperature=1.0, top_p=0.95, seed=7 + i) for i in range(6)]
    seeds = [7 + i for i in range(6)]
    together = _sample(logits, params, seeds, index=3)
    alone = [_sample(logits[i : i + 1], params[i : i + 1], seeds[i : i + 1], index=3)[0] for i in range(6)]
    flipped = _sample(logits.flip(0), params[::-1], seeds[::-1], index=3)[::-1]
    assert together == alone == flipped
    # and the index matters: the next output token draws another number
    assert uniform_from(7, 3) != uniform_from(7, 4)


def test_uniforms_are_uniform():
    """The hash's numbers against U[0, 1): mean, variance and the decile counts of 20000 draws."""
    u = torch.tensor([uniform_from(seed, i) for seed in range(200) for i in range(100)], dtype=torch.float64)
    n = u.numel()
    assert 0.0 <= u.min() and u.max() < 1.0
    assert abs(u.mean().item() - 0.5) < 4 * math.sqrt(1 / 12 / n)
    assert abs(u.var().item() - 1 / 12) < 0.003
    counts = torch.histc(u, bins=10, min=0.0, max=1.0)
    chi2 = ((counts - n / 10) ** 2 / (n / 10)).sum().item()
    assert chi2 < 27.9  # chi-square with 9 degrees of freedom, p = 0.001


@pytest.mark.parametrize("p", [SamplingParams(temperature=0.8, top_k=5), SamplingParams(temperature=1.2, top_p=0.7),
                               SamplingParams(temperature=1.0, min_p=0.2),
                               SamplingParams(temperature=0.9, top_k=6, top_p=0.8),
                               SamplingParams(temperature=1.1)])  # fmt: skip
def test_empirical_distribution_matches_the_filtered_softmax(p: SamplingParams):
    """Equal in distribution: 20000 draws (fresh seeds) against the plain-Python filtered distribution."""
    gen = torch.Generator().manual_seed(3)
    vocab, n = 12, 20000
    row = (torch.randn(vocab, generator=gen) * 1.5).tolist()
    base = int(torch.randint(0, 2**62, (1,)).item())
    expected = _filtered_probs(row, p)
    tokens = _sample(torch.tensor([row] * n), [p] * n, [base + i for i in range(n)])
    counts = torch.bincount(torch.tensor(tokens), minlength=vocab).double() / n
    for i, e in enumerate(expected):
        if e == 0.0:
            assert counts[i] == 0, (p, i)
        else:
            assert abs(counts[i].item() - e) < 4.5 * math.sqrt(e * (1 - e) / n) + 1e-3, (p, i, counts[i], e)


# ---- extreme but valid parameters, against simple oracles
@pytest.mark.parametrize("temperature", [0.0, 1e-50, 1e-300, 5e-7])
def test_temperatures_below_the_greedy_threshold_equal_the_argmax(temperature: float) -> None:
    logits = torch.randn(6, 257, generator=torch.Generator().manual_seed(5)) * 4
    params = [SamplingParams(temperature=temperature, top_k=k) for k in (-1, 0, 7, 2**63 - 1, 2**64, 1)]
    assert _sample(logits, params) == logits.argmax(-1).tolist()


def test_a_tiny_temperature_above_the_threshold_samples_without_overflow() -> None:
    """1e-5 is not greedy, but dividing by it must stay finite; the distribution is then ~one-hot on the argmax."""
    logits = torch.randn(4, 300, generator=torch.Generator().manual_seed(6)) * 30
    params = [SamplingParams(temperature=1e-5)] * 4
    assert _sample(logits, params) == logits.argmax(-1).tolist()


@pytest.mark.parametrize("huge_k", [0, 300, 301, 2**40, 2**63 - 1, 2**63, 2**64 + 3])
def test_a_top_k_at_or_beyond_the_vocabulary_draws_exactly_as_no_top_k(huge_k: int) -> None:
    """Same seeds, same distribution: the seeded draws are identical to top_k=-1 (no cut)."""
    logits = torch.randn(5, 300, generator=torch.Generator().manual_seed(7))
    base = SamplingParams(temperature=0.9, top_p=0.95)
    off = _sample(logits, [base] * 5, [100 + i for i in range(5)])
    huge = dataclasses.replace(base, top_k=huge_k)
    assert _sample(logits, [huge] * 5, [100 + i for i in range(5)]) == off


def test_normalized_params_follow_sglang() -> None:
    assert SamplingParams(temperature=1e-50).normalized(300).temperature == 0.0
    assert SamplingParams(temperature=0.5).normalized(300).temperature == 0.5
    top_ks = [SamplingParams(top_k=k).normalized(300).top_k for k in (-1, 0, 1, 299, 300, 2**63)]
    assert top_ks == [-1, -1, 1, 299, -1, -1]


@pytest.mark.parametrize("poison", [float("nan"), float("inf")])
def test_a_row_that_cannot_be_sampled_is_marked_alone(poison: float) -> None:
    """A drawn row whose logits hold nan/inf gives BAD_ROW; the other rows get exactly what sampling them alone
    gives (the scheduler ends only that request)."""
    logits = torch.randn(5, 64, generator=torch.Generator().manual_seed(8))
    logits[2, 10] = poison
    params = [SamplingParams(temperature=0.0), SamplingParams(temperature=0.8, seed=1), SamplingParams(temperature=1.0),
              SamplingParams(temperature=1.2, top_k=9), SamplingParams(top_k=1)]  # fmt: skip
    out = _sample(logits, params, [11, 12, 13, 14, 15])
    assert out[2] == BAD_ROW
    alone = [_sample(logits[i : i + 1], [params[i]], [11 + i])[0] for i in range(5) if i != 2]
    assert [t for i, t in enumerate(out) if i != 2] == alone
    assert out[0] == logits[0].argmax().item() and out[4] == logits[4].argmax().item()


@pytest.mark.gpu
def test_device_sampling_matches_the_cpu_and_syncs_nothing() -> None:
    """On CUDA: the same tokens as on the CPU for the same seeds (fp32 logits), and no host sync while sampling."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    logits = torch.randn(64, 151936, generator=torch.Generator().manual_seed(9))
    params = [SamplingParams(temperature=0.7, top_p=0.9), SamplingParams(temperature=1.0, top_k=40, min_p=0.05),
              SamplingParams(temperature=0.0), SamplingParams(temperature=1.3)] * 16  # fmt: skip
    seeds = list(range(1000, 1064))
    cpu = _sample(logits, params, seeds, index=5)
    gpu_logits = logits.cuda()
    rows = SamplingRows.build(params, seeds, [5] * 64, gpu_logits.shape[-1], gpu_logits.device)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        tokens = sample(gpu_logits, rows)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    got = tokens.tolist()
    # Sums in another order may move a draw that falls within rounding of a bucket edge: allow one in 64.
    assert sum(a != b for a, b in zip(got, cpu, strict=True)) <= 1, (got, cpu)
