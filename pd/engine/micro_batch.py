"""Two-batch overlap: a batch's lists split into two micro-batches of about half the tokens each.

The split point may fall inside a request: its first tokens go to the first micro-batch, the rest to the second
as a continuation (prefix grown by what the first wrote). Within each layer the first micro-batch's attention
runs before the second's, so the second finds those KV entries in place, exactly as in a chunked prefill.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from pd.engine.forward_batch import ForwardBatch, TokenIds


@dataclass(frozen=True)
class BatchLists:
    """What build_forward_batch takes, for one micro-batch (logits_index relative to its own tokens)."""

    input_ids: TokenIds
    rows: list[int]
    prefix_lens: list[int]
    extend_lens: list[int]
    logits_index: list[int]


def split_in_two(input_ids: TokenIds, rows: list[int], prefix_lens: list[int], extend_lens: list[int],
                 logits_index: list[int] | None) -> tuple[BatchLists, BatchLists]:  # fmt: skip
    """(first, second): tokens [0, T // 2) and [T // 2, T) of the batch. logits_index (default: each request's
    last token) is split with them; either part may be empty (no requests) when T < 2."""
    total = len(input_ids)
    if logits_index is None:
        ends, end = [], 0
        for n in extend_lens:
            end += n
            ends.append(end - 1)
        logits_index = ends
    cut = total // 2
    first = BatchLists(input_ids[:cut], [], [], [], [i for i in logits_index if i < cut])
    second = BatchLists(input_ids[cut:], [], [], [], [i - cut for i in logits_index if i >= cut])
    start = 0
    for row, prefix, extend in zip(rows, prefix_lens, extend_lens, strict=True):
        before = min(max(cut - start, 0), extend)  # this request's tokens in the first micro-batch
        if before:
            first.rows.append(row)
            first.prefix_lens.append(prefix)
            first.extend_lens.append(before)
        if extend - before:
            second.rows.append(row)
            second.prefix_lens.append(prefix + before)
            second.extend_lens.append(extend - before)
        start += extend
    return first, second


@dataclass(frozen=True)
class MicroBatches:
    """One forward under two-batch overlap: its two micro-batches (the model returns first's tokens, then
    second's: the batch's own order)."""

    first: ForwardBatch
    second: ForwardBatch

    @property
    def logits_index(self) -> torch.Tensor:
        """[S] int64: the rows of the whole batch whose logits are wanted."""
        return torch.cat([self.first.logits_index, self.second.logits_index + self.first.num_tokens])
