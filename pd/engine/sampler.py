"""Next tokens from a batch's logits, on the logits' device: greedy, temperature, top-k, top-p, min-p, seeds.

No loop over requests and no host sync: the sampled rows' parameters travel in one host-to-device copy, a few
batched kernels pick the tokens, and the tokens stay on the device (the scheduler copies them to the host once
per step, possibly while the next step already runs).

Randomness is inverse-transform sampling with one uniform number per row, drawn by hashing (the request's seed,
the index of the output token): a token depends only on its request, never on the batch it shared, on the order
of rows, or on whether the step ran overlapped. A request without a seed gets one from the engine's own seeded
stream when it arrives.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from pd.engine.io import GREEDY_TEMPERATURE, SamplingParams

# A row whose filtered distribution is not finite (its logits hold inf or nan) samples this instead of a token.
BAD_ROW = -1
_MASK64 = (1 << 64) - 1


def uniform_from(seed: int, index: int) -> float:
    """A uniform number in [0, 1) determined by (seed, index): splitmix64 of the two, 53 bits of it."""
    x = (seed * 0x9E3779B97F4A7C15 + (index + 1) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    x ^= x >> 31
    return (x >> 11) / float(1 << 53)


@dataclass(frozen=True)
class SamplingRows:
    """The parameters of S rows to sample, on the device.

    temperature: [S] float32 (1 on greedy rows); top_k: [S] int64 (the vocabulary size when no cut);
    top_p, min_p: [S] float32; uniform: [S] float64 in [0, 1); greedy: [S] bool.
    all_greedy, any_cut: host facts that let a step skip the sampling path or the sort.
    """

    temperature: torch.Tensor
    top_k: torch.Tensor
    top_p: torch.Tensor
    min_p: torch.Tensor
    uniform: torch.Tensor
    greedy: torch.Tensor
    all_greedy: bool
    any_cut: bool

    @classmethod
    def build(cls, params: list[SamplingParams], seeds: list[int], indices: list[int], vocab: int,
              device: torch.device) -> SamplingRows:  # fmt: skip
        """params, seeds, indices: per row, its sampling settings, its request's seed and the index of the output
        token being drawn (0 for the first)."""
        greedy = [p.is_greedy for p in params]
        if all(greedy):
            return all_greedy_rows(len(params), device)
        # Clamped in Python: a top_k beyond the vocabulary (up to 2**63 and more) is no cut, not an overflow.
        top_k = [min(p.top_k, vocab) if p.top_k > 0 else vocab for p in params]
        cols = [
            [1.0 if g else max(p.temperature, GREEDY_TEMPERATURE) for p, g in zip(params, greedy, strict=True)],
            [float(k) for k in top_k],
            [p.top_p for p in params],
            [p.min_p for p in params],
            [uniform_from(s, i) for s, i in zip(seeds, indices, strict=True)],
            [float(g) for g in greedy],
        ]
        host = torch.tensor(cols, dtype=torch.float64)
        if device.type == "cuda":
            host = host.pin_memory()  # an asynchronous copy: the host does not wait for the running step
        t = host.to(device, non_blocking=True)
        any_cut = any(k < vocab or p.top_p < 1.0 or p.min_p > 0.0
                      for k, p, g in zip(top_k, params, greedy, strict=True) if not g)  # fmt: skip
        return cls(t[0].float(), t[1].long(), t[2].float(), t[3].float(), t[4], t[5] > 0.5, all_greedy=False,
                   any_cut=any_cut)  # fmt: skip


@functools.cache
def all_greedy_rows(n: int, device: torch.device) -> SamplingRows:
    """The rows of an all-greedy batch of n (their tensors are never read: sample takes the argmax), made once per
    size: a decode step of greedy requests launches nothing for them."""
    flags = torch.ones(n, dtype=torch.bool, device=device)
    one = torch.ones(n, device=device)
    return SamplingRows(one, one.long(), one, one, one.double(), flags, all_greedy=True, any_cut=False)


def _argmax(logits: torch.Tensor) -> torch.Tensor:
    """[S, V] -> [S] int64, torch's argmax; on CUDA the two-launch Triton kernel (torch's gives a row one block)."""
    if logits.device.type == "cuda" and logits.dim() == 2 and logits.shape[1] > 0:
        from pd.engine.triton_argmax import argmax_rows

        return argmax_rows(logits)
    return logits.argmax(dim=-1)


def sample(logits: torch.Tensor, rows: SamplingRows) -> torch.Tensor:
    """logits [S, V] (any float dtype; drawn rows compute in float32) -> [S] int64 token ids on the same device,
    without a host sync.

    Greedy rows take the argmax. The others draw from softmax(logits / temperature) cut by top-k, top-p (the
    smallest most-likely prefix reaching top_p) and min-p (tokens below min_p times the top probability), the
    most likely token always kept. A drawn row whose distribution is not finite gives BAD_ROW.
    """
    argmax = _argmax(logits)
    if rows.all_greedy:
        return argmax
    logits = logits.float()
    vocab = logits.shape[-1]
    # Probabilities and the draw stay in vocabulary order whatever the cuts, so a row draws the same token in any
    # batch (a batch where some row cuts sorts only to find what to drop).
    probs = (logits / rows.temperature[:, None]).softmax(dim=-1)
    if rows.any_cut:
        ranked, order = probs.sort(dim=-1, descending=True)
        ranks = torch.arange(vocab, device=logits.device)[None, :]
        drop = ranks >= rows.top_k[:, None]
        drop |= ((ranked.cumsum(dim=-1) - ranked) > rows.top_p[:, None]) & (rows.top_p[:, None] < 1.0)
        drop |= ranked < rows.min_p[:, None] * ranked[:, :1]
        drop[:, 0] = False
        probs = probs.masked_fill(torch.empty_like(drop).scatter_(1, order, drop), 0.0)
    # Inverse transform: the first token whose cumulative mass exceeds u times the (unnormalised) total.
    cdf = probs.cumsum(dim=-1, dtype=torch.float64)
    total = cdf[:, -1:]
    pick = torch.searchsorted(cdf, rows.uniform[:, None] * total, right=True).clamp_(max=vocab - 1)
    drawn = pick.squeeze(1)
    drawn = torch.where(torch.isfinite(total.squeeze(1)) & (total.squeeze(1) > 0), drawn, BAD_ROW)
    return torch.where(rows.greedy, argmax, drawn)
