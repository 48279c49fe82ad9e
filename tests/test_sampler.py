"""The sampler against an independent computation of the filtered distribution."""

from __future__ import annotations

import math

import torch

from pd.engine.io import SamplingParams
from pd.engine.sampler import sample


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
