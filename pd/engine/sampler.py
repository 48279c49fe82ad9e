"""Turns a batch's logits into next tokens: greedy, temperature, top-k, top-p, min-p, per-request seeds."""

from __future__ import annotations

import logging

import torch

from pd.engine.io import GREEDY_TEMPERATURE, SamplingParams

logger = logging.getLogger(__name__)


class SamplingError(ValueError):
    """A request's row cannot be sampled (its logits hold inf or nan)."""


def sample(logits: torch.Tensor, params: list[SamplingParams], generators: list[torch.Generator | None]) -> list[int]:
    """logits [S, V] float32 -> S token ids. Greedy rows (temperature below GREEDY_TEMPERATURE, or top_k 1) take
    the argmax (deterministic); the other rows sample from the filtered distribution, with the request's own
    generator when it asked for a seed. Any top_k (<= 0 or >= V: no cut) and any temperature are safe.

    Raises SamplingError if a sampled row's distribution is not finite; `sample_each` confines that to the row.
    """
    argmax = logits.argmax(dim=-1)
    rows = [i for i, p in enumerate(params) if not p.is_greedy]
    if not rows:
        return argmax.tolist()
    device, vocab = logits.device, logits.shape[-1]
    picked = [params[i] for i in rows]
    # The temperature is at least GREEDY_TEMPERATURE here, so the scaled logits stay finite in float32.
    temps = torch.tensor([max(p.temperature, GREEDY_TEMPERATURE) for p in picked], device=device)
    sorted_logits, sorted_ids = (logits[rows] / temps[:, None]).sort(dim=-1, descending=True)
    probs = sorted_logits.softmax(dim=-1)
    ranks = torch.arange(vocab, device=device)[None, :]
    # Clamped in Python: a top_k beyond the vocabulary (up to 2**63 and more) is no cut, not an overflow.
    top_k = torch.tensor([min(p.top_k, vocab) if p.top_k > 0 else vocab for p in picked], device=device)
    top_p = torch.tensor([p.top_p for p in picked], device=device)
    min_p = torch.tensor([p.min_p for p in picked], device=device)
    drop = ranks >= top_k[:, None]
    drop |= (probs.cumsum(dim=-1) - probs) > top_p[:, None]  # keep the smallest prefix reaching top_p
    drop |= probs < (min_p[:, None] * probs[:, :1])
    drop[:, 0] = False  # the most likely token always survives
    probs = probs.masked_fill(drop, 0.0)
    probs = probs / probs.sum(dim=-1, keepdim=True)
    finite = torch.isfinite(probs).all(dim=-1).tolist()
    if not all(finite):
        bad = [rows[r] for r, ok in enumerate(finite) if not ok]
        raise SamplingError(f"the logits of batch rows {bad} hold inf or nan; they cannot be sampled")

    choice = torch.empty(len(rows), dtype=torch.int64, device=device)
    unseeded = [r for r, i in enumerate(rows) if generators[i] is None]
    if unseeded:
        idx = torch.tensor(unseeded, device=device)
        choice[idx] = torch.multinomial(probs[idx], 1).squeeze(1)
    for r, i in enumerate(rows):  # seeded requests draw from their own stream (a loop over requests)
        gen = generators[i]
        if gen is not None:
            choice[r] = torch.multinomial(probs[r], 1, generator=gen).squeeze(0)
    tokens = argmax.clone()
    tokens[torch.tensor(rows, device=device)] = sorted_ids.gather(1, choice[:, None]).squeeze(1)
    return tokens.tolist()


def sample_each(
    logits: torch.Tensor, params: list[SamplingParams], generators: list[torch.Generator | None]
) -> list[int | str]:
    """`sample`, with a failure kept to the rows it belongs to: one entry per row, the token id, or for a row
    that cannot be sampled a message saying why. The whole batch is sampled at once; only when that fails is
    each row sampled alone (seeded generators are first rewound, so seeded draws stay reproducible)."""
    states = [g.get_state() if g is not None else None for g in generators]
    try:
        return list(sample(logits, params, generators))
    except Exception as e:
        logger.warning("sampling a batch of %d failed (%s: %s); sampling its rows one by one", len(params),
                       type(e).__name__, e)  # fmt: skip
    for gen, state in zip(generators, states, strict=True):
        if gen is not None and state is not None:
            gen.set_state(state)
    out: list[int | str] = []
    for i, (p, gen) in enumerate(zip(params, generators, strict=True)):
        try:
            out.append(sample(logits[i : i + 1], [p], [gen])[0])
        except Exception as e:
            out.append(f"sampling failed: {type(e).__name__}: {e}")
    return out
