"""Two-batch overlap's split: the two micro-batches hold exactly the batch's tokens, each at its request's position."""

from __future__ import annotations

import torch

from pd.engine.micro_batch import BatchLists, split_in_two


def _tokens(rows: list[int], prefix_lens: list[int], extend_lens: list[int]) -> list[tuple[int, int]]:
    """(row, position) of every new token, request after request: the independent description of a batch."""
    return [(row, prefix + i) for row, prefix, n in zip(rows, prefix_lens, extend_lens, strict=True) for i in range(n)]


def test_the_two_micro_batches_are_the_batch_cut_at_half_its_tokens() -> None:
    gen = torch.Generator().manual_seed(int(torch.randint(0, 2**31, ()).item()))
    for _ in range(200):
        num = int(torch.randint(1, 6, (), generator=gen))
        extend = torch.randint(1, 9, (num,), generator=gen).tolist()
        if bool(torch.rand((), generator=gen) < 0.3):
            extend = [1] * num  # a decode batch
        prefix = torch.randint(0, 20, (num,), generator=gen).tolist()
        rows = torch.randperm(32, generator=gen)[:num].tolist()
        ids = torch.randint(0, 1000, (sum(extend),), generator=gen).tolist()
        first, second = split_in_two(ids, rows, prefix, extend, None)
        assert len(first.input_ids) == len(ids) // 2
        assert first.input_ids + second.input_ids == ids
        for part in (first, second):
            assert len(part.input_ids) == sum(part.extend_lens) and all(n >= 1 for n in part.extend_lens)
        assert _tokens(first.rows, first.prefix_lens, first.extend_lens) + _tokens(
            second.rows, second.prefix_lens, second.extend_lens
        ) == _tokens(rows, prefix, extend)
        # logits: each request's last token, wherever it landed
        last = [sum(extend[: i + 1]) - 1 for i in range(num)]
        assert first.logits_index + [i + len(first.input_ids) for i in second.logits_index] == last


def test_a_one_token_batch_leaves_the_first_micro_batch_empty() -> None:
    first, second = split_in_two([7], [3], [10], [1], None)
    assert first == BatchLists([], [], [], [], [])
    assert second == BatchLists([7], [3], [10], [1], [0])
