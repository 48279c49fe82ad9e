"""One byte row per dispatched token: hidden state, global expert ids and routing weights side by side.

Sending the three together makes dispatch a single all-to-all (each collective costs a launch and a rendezvous,
which dominate at decode sizes). Row layout, in bytes: ``[hidden H*itemsize | pad to 4 | ids int32 K | weights
float32 K | pad to 16]``. Ids stay global (-1 = no expert): a receiver turns them into its own local ids, so the
row is the same whatever rank it goes to and can be built once per token.
"""

from __future__ import annotations

import torch


def row_layout(hidden_size: int, dtype: torch.dtype, top_k: int) -> tuple[int, int]:
    """(byte offset of the ids, bytes per row)."""
    hidden_bytes = hidden_size * dtype.itemsize
    ids_at = -(-hidden_bytes // 4) * 4
    return ids_at, -(-(ids_at + 8 * top_k) // 16) * 16


def pack_rows(hidden_TH: torch.Tensor, ids_TK: torch.Tensor, weights_TK: torch.Tensor) -> torch.Tensor:
    """-> [T, row_bytes] uint8. ids [T, K] int (global, -1 = none), weights [T, K] float32."""
    num_tokens, top_k = ids_TK.shape
    ids_at, row = row_layout(hidden_TH.shape[1], hidden_TH.dtype, top_k)
    out = torch.zeros(num_tokens, row, dtype=torch.uint8, device=hidden_TH.device)
    out[:, : hidden_TH.shape[1] * hidden_TH.element_size()] = hidden_TH.contiguous().view(torch.uint8)
    out[:, ids_at : ids_at + 4 * top_k] = ids_TK.to(torch.int32).view(torch.uint8)
    out[:, ids_at + 4 * top_k : ids_at + 8 * top_k] = weights_TK.float().contiguous().view(torch.uint8)
    return out


def blank_row(hidden_size: int, dtype: torch.dtype, top_k: int, device: torch.device) -> torch.Tensor:
    """[row_bytes] uint8: a padding row (zero hidden, every id -1, zero weights)."""
    ids_at, row = row_layout(hidden_size, dtype, top_k)
    out = torch.zeros(row, dtype=torch.uint8, device=device)
    out[ids_at : ids_at + 4 * top_k] = torch.full((top_k,), -1, dtype=torch.int32, device=device).view(torch.uint8)
    return out


def unpack_rows(
    rows_NB: torch.Tensor, hidden_size: int, dtype: torch.dtype, top_k: int, rank: int, num_local_experts: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Received rows -> (hidden [N, H] dtype (contiguous copy), local ids [N, K] int64 as seen by ``rank`` (-1 for
    other ranks' experts and for none), weights [N, K] float32)."""
    ids_at, _ = row_layout(hidden_size, dtype, top_k)
    hidden_bytes = hidden_size * dtype.itemsize
    hidden = rows_NB[:, :hidden_bytes].contiguous().view(dtype)
    meta = rows_NB[:, ids_at : ids_at + 8 * top_k].contiguous()
    ids = meta[:, : 4 * top_k].view(torch.int32).long()
    weights = meta[:, 4 * top_k :].view(torch.float32)
    mine = ids.div(num_local_experts, rounding_mode="floor") == rank  # -1 (no expert) floors to -1
    return hidden, torch.where(mine, ids - rank * num_local_experts, -1), weights
