"""Turns a batch's logits into next tokens: greedy, temperature, top-k, top-p, min-p, per-request seeds."""

from __future__ import annotations

import torch

from pd.engine.io import SamplingParams


def sample(logits: torch.Tensor, params: list[SamplingParams], generators: list[torch.Generator | None]) -> list[int]:
    """logits [S, V] float32 -> S token ids. Greedy rows take the argmax (deterministic); other rows sample
    from the filtered distribution, with the request's own generator when it asked for a seed."""
    greedy = [p.is_greedy for p in params]
    if all(greedy):
        return logits.argmax(dim=-1).tolist()
    device = logits.device
    temps = torch.tensor([1.0 if g else p.temperature for p, g in zip(params, greedy, strict=True)], device=device)
    sorted_logits, sorted_ids = (logits / temps[:, None]).sort(dim=-1, descending=True)
    probs = sorted_logits.softmax(dim=-1)
    vocab = logits.shape[-1]
    ranks = torch.arange(vocab, device=device)[None, :]
    top_k = torch.tensor([p.top_k if p.top_k > 0 else vocab for p in params], device=device)
    top_p = torch.tensor([p.top_p for p in params], device=device)
    min_p = torch.tensor([p.min_p for p in params], device=device)
    drop = ranks >= top_k[:, None]
    drop |= (probs.cumsum(dim=-1) - probs) > top_p[:, None]  # keep the smallest prefix reaching top_p
    drop |= probs < (min_p[:, None] * probs[:, :1])
    drop[:, 0] = False  # the most likely token always survives
    probs = probs.masked_fill(drop, 0.0)
    probs = probs / probs.sum(dim=-1, keepdim=True)

    choice = torch.empty(len(params), dtype=torch.int64, device=device)
    unseeded = [i for i, g in enumerate(generators) if g is None]
    if unseeded:
        idx = torch.tensor(unseeded, device=device)
        choice[idx] = torch.multinomial(probs[idx], 1).squeeze(1)
    for i, gen in enumerate(generators):  # seeded requests draw from their own stream (a loop over requests)
        if gen is not None:
            choice[i] = torch.multinomial(probs[i], 1, generator=gen).squeeze(0)
    tokens = sorted_ids.gather(1, choice[:, None]).squeeze(1)
    argmax = logits.argmax(dim=-1)
    greedy_t = torch.tensor(greedy, device=device)
    return torch.where(greedy_t, argmax, tokens).tolist()
