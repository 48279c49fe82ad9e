"""The sampler against an independent computation of the filtered distribution."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from pd.engine.io import SamplingParams
from pd.engine.sampler import sample, sample_each


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


def test_greedy_rows_take_the_argmax_and_mixed_batches_work():
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(5, 300, generator=gen)
    params = [SamplingParams(temperature=0.0), SamplingParams(temperature=0.7, top_p=0.9, min_p=0.05),
              SamplingParams(top_k=1), SamplingParams(temperature=1.3, top_k=20), SamplingParams(temperature=0.0)]
    out = sample(logits, params, [None] * 5)
    argmax = logits.argmax(-1).tolist()
    assert out[0] == argmax[0] and out[2] == argmax[2] and out[4] == argmax[4]
    assert all(0 <= t < 300 for t in out)


def test_seeded_sampling_is_reproducible():
    logits = torch.randn(3, 100, generator=torch.Generator().manual_seed(1))
    params = [SamplingParams(temperature=1.0, seed=7)] * 3
    draws = [sample(logits, params, [torch.Generator().manual_seed(7) for _ in range(3)]) for _ in range(2)]
    assert draws[0] == draws[1]


def test_empirical_distribution_matches_the_filtered_softmax():
    gen = torch.Generator().manual_seed(3)
    vocab, n = 12, 20000
    row = (torch.randn(vocab, generator=gen) * 1.5).tolist()
    cases = [SamplingParams(temperature=0.8, top_k=5), SamplingParams(temperature=1.2, top_p=0.7),
             SamplingParams(temperature=1.0, min_p=0.2), SamplingParams(temperature=0.9, top_k=6, top_p=0.8)]
    torch.manual_seed(4)
    for p in cases:
        expected = _filtered_probs(row, p)
        tokens = sample(torch.tensor([row] * n), [p] * n, [None] * n)
        counts = torch.bincount(torch.tensor(tokens), minlength=vocab).double() / n
        for i, e in enumerate(expected):
            if e == 0.0:
                assert counts[i] == 0, (p, i)
            else:
                assert abs(counts[i].item() - e) < 4 * math.sqrt(e * (1 - e) / n) + 1e-3, (p, i, counts[i], e)


# ---- extreme but valid parameters, against simple oracles
@pytest.mark.parametrize("temperature", [0.0, 1e-50, 1e-300, 5e-7])
def test_temperatures_below_the_greedy_threshold_equal_the_argmax(temperature: float) -> None:
    logits = torch.randn(6, 257, generator=torch.Generator().manual_seed(5)) * 4
    params = [SamplingParams(temperature=temperature, top_k=k) for k in (-1, 0, 7, 2**63 - 1, 2**64, 1)]
    assert sample(logits, params, [None] * 6) == logits.argmax(-1).tolist()


def test_a_tiny_temperature_above_the_threshold_samples_without_overflow() -> None:
    """1e-5 is not greedy, but dividing by it must stay finite; the distribution is then ~one-hot on the argmax."""
    logits = torch.randn(4, 300, generator=torch.Generator().manual_seed(6)) * 30
    params = [SamplingParams(temperature=1e-5)] * 4
    assert sample(logits, params, [torch.Generator().manual_seed(i) for i in range(4)]) == logits.argmax(-1).tolist()


@pytest.mark.parametrize("huge_k", [0, 300, 301, 2**40, 2**63 - 1, 2**63, 2**64 + 3])
def test_a_top_k_at_or_beyond_the_vocabulary_draws_exactly_as_no_top_k(huge_k: int) -> None:
    """Same seeds, same distribution: the seeded draws are identical to top_k=-1 (no cut)."""
    logits = torch.randn(5, 300, generator=torch.Generator().manual_seed(7))
    base = SamplingParams(temperature=0.9, top_p=0.95)
    off = sample(logits, [base] * 5, [torch.Generator().manual_seed(100 + i) for i in range(5)])
    huge = dataclasses.replace(base, top_k=huge_k)
    assert sample(logits, [huge] * 5, [torch.Generator().manual_seed(100 + i) for i in range(5)]) == off


def test_normalized_params_follow_sglang() -> None:
    assert SamplingParams(temperature=1e-50).normalized(300).temperature == 0.0
    assert SamplingParams(temperature=0.5).normalized(300).temperature == 0.5
    top_ks = [SamplingParams(top_k=k).normalized(300).top_k for k in (-1, 0, 1, 299, 300, 2**63)]
    assert top_ks == [-1, -1, 1, 299, -1, -1]


def test_sample_each_ends_only_the_row_that_cannot_be_sampled() -> None:
    """A row whose logits hold nan fails alone; the other rows get exactly what sampling them alone gives."""
    logits = torch.randn(5, 64, generator=torch.Generator().manual_seed(8))
    logits[2, 10] = float("nan")
    params = [SamplingParams(temperature=0.0), SamplingParams(temperature=0.8, seed=1), SamplingParams(temperature=1.0),
              SamplingParams(temperature=1.2, seed=2), SamplingParams(top_k=1)]  # fmt: skip

    def gens() -> list[torch.Generator | None]:
        return [None, torch.Generator().manual_seed(1), None, torch.Generator().manual_seed(2), None]

    out = sample_each(logits, params, gens())
    assert isinstance(out[2], str) and "inf or nan" in out[2]
    alone = [sample(logits[i : i + 1], [params[i]], [g])[0] for i, g in enumerate(gens()) if i != 2]
    assert [t for i, t in enumerate(out) if i != 2] == alone
    assert out[0] == logits[0].argmax().item() and out[4] == logits[4].argmax().item()
