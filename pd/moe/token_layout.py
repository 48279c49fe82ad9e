"""How the tokens of a forward reach an MoE layer when an instance has several ranks.

Attention leaves the hidden states either replicated on every rank (plain tensor parallelism) or split by
request (DP attention). The dispatchers want something specific:

- ``as_is``: the dispatcher takes the tokens as they are. One rank; the ``none`` backend under plain TP
  (all ranks hold the same tokens, each computes its experts, all-reduce); an all-to-all backend under
  DP attention with one rank per attention group (each rank dispatches its own requests' tokens).
- ``scatter``: an all-to-all backend when several ranks hold the same T tokens (an attention group: the whole
  instance under plain TP, or each DP group). Rank r of the group dispatches only rows [r*C, (r+1)*C)
  (C = ceil(T / group size)) so no token is sent twice, and the outputs are all-gathered within the group.
- ``gather``: the ``none`` backend under DP attention. Groups hold different tokens; the first rank of each
  attention group contributes them to an all-gather, so every rank sees every token once (the ``none``
  contract), and each rank keeps its group's rows of the reduced output.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.distributed as dist

if TYPE_CHECKING:
    from torch.distributed import ProcessGroup

TOKEN_LAYOUTS = ("as_is", "scatter", "gather")

# What leave() needs: (rows this rank kept or owns, start row, padded rows per rank) or None for as_is.
LayoutState = tuple[int, int, int] | None


def _all_gather_rows(x_NC: torch.Tensor, counts: list[int], group: ProcessGroup) -> torch.Tensor:
    """Concatenation over ranks of each rank's first counts[r] rows; x is padded to max(counts) rows."""
    width = max(counts)
    padded = x_NC.new_zeros(width, *x_NC.shape[1:])
    padded[: x_NC.shape[0]] = x_NC
    parts = [torch.empty_like(padded) for _ in counts]
    dist.all_gather(parts, padded, group=group)
    return torch.cat([p[:n] for p, n in zip(parts, counts, strict=True)])


def enter(
    layout: str,
    group: ProcessGroup | None,
    attn_group: ProcessGroup | None,
    hidden_TH: torch.Tensor,
    logits_TE: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, LayoutState]:
    """-> (hidden [N, H], router logits [N, E], state for leave()), N the rows this rank dispatches.

    ``group`` is the MoE group (every rank of the instance); ``attn_group`` the ranks holding the same tokens as
    this one (an attention group; None when this rank's tokens are its own).
    """
    if layout == "as_is" or group is None:
        return hidden_TH, logits_TE, None
    num_tokens = hidden_TH.shape[0]
    if layout == "scatter":
        if attn_group is None:
            return hidden_TH, logits_TE, None
        ranks, rank = dist.get_world_size(attn_group), dist.get_rank(attn_group)
        chunk = -(-num_tokens // ranks)
        start = min(rank * chunk, num_tokens)
        end = min(start + chunk, num_tokens)
        return hidden_TH[start:end], logits_TE[start:end], (num_tokens, start, chunk)
    assert layout == "gather", layout
    ranks, rank = dist.get_world_size(group), dist.get_rank(group)
    # One copy of each attention group's tokens: its first rank contributes them (groups are consecutive ranks).
    attn_rank = dist.get_rank(attn_group) if attn_group is not None else 0
    counts_R = torch.zeros(ranks, dtype=torch.int64, device=hidden_TH.device)
    counts_R[rank] = num_tokens if attn_rank == 0 else 0
    dist.all_reduce(counts_R, group=group)
    counts = counts_R.tolist()  # host sync: the gathered size is data-dependent
    start = sum(counts[: rank - attn_rank])
    mine = hidden_TH if attn_rank == 0 else hidden_TH[:0]
    hidden = _all_gather_rows(mine, counts, group)
    logits = _all_gather_rows(logits_TE if attn_rank == 0 else logits_TE[:0], counts, group)
    return hidden, logits, (num_tokens, start, 0)


def leave(
    layout: str, group: ProcessGroup | None, attn_group: ProcessGroup | None, out_NH: torch.Tensor, state: LayoutState
) -> torch.Tensor:
    """The MoE output for this rank's own tokens, [T, H], in their original order."""
    if state is None or group is None:
        return out_NH
    num_tokens, start, chunk = state
    if layout == "scatter":
        assert attn_group is not None
        ranks = dist.get_world_size(attn_group)
        counts = [max(0, min(chunk, num_tokens - r * chunk)) for r in range(ranks)]
        return _all_gather_rows(out_NH, counts, attn_group)
    return out_NH[start : start + num_tokens]
