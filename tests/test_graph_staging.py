"""CudaGraphRunner.stage (a decode batch written into the graph's static inputs with one copy) against the plain
construction of the same batch: tokens (from the host, or from the device for negative ids, mixed or not),
positions, KV slots (the page table's device lookup, ReqToToken.slots, as the oracle of the host copy's), the
attention backend's per-request facts, and the padding of the bucket. On fresh random tables and batches; CPU
(the runner uncaptured: staging launches no Triton kernel)."""

from __future__ import annotations

import importlib.util
from types import SimpleNamespace

import pytest
import torch

pytestmark = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")

PAGE_SIZE, MAX_CONTEXT, ROWS = 4, 64, 12


def make_runner(buckets: tuple[int, ...], pad_slot: int):  # noqa: ANN201 (CudaGraphRunner, imported lazily)
    from pd.attention.triton_backend import TritonAttentionBackend
    from pd.engine.cuda_graph_runner import CudaGraphRunner
    from pd.engine.kv_cache import KVCache, ReqToToken

    device = torch.device("cpu")
    table = ReqToToken(ROWS, MAX_CONTEXT, PAGE_SIZE, device)
    cache = KVCache(1, pad_slot // PAGE_SIZE + 1, PAGE_SIZE, [(1, 8), (1, 8)], torch.float32, device)
    runner = SimpleNamespace(device=device, attn_backend=TritonAttentionBackend(), kv_cache=cache,
                             context_length=MAX_CONTEXT)  # fmt: skip
    return CudaGraphRunner(runner, table, buckets, pad_slot=pad_slot, capture=False), table


@pytest.mark.parametrize("token_mix", ["host", "device", "mixed"])
def test_staged_inputs_equal_the_plain_batch(token_mix: str) -> None:
    gen = torch.Generator().manual_seed(int(torch.randint(0, 2**31, ())))
    num_pages, pad_slot = 200, 200 * PAGE_SIZE
    graphs, table = make_runner((1, 2, 4, 8), pad_slot)
    for row in range(ROWS):  # random distinct pages for every row
        pages = torch.randperm(num_pages, generator=gen)[: MAX_CONTEXT // PAGE_SIZE].tolist()
        table.assign_pages(row, 0, pages)
    token_source = torch.randint(0, 1000, (ROWS,), generator=gen)
    for n in (1, 3, 5, 8, 2):  # several batches in a row: each overwrites the previous one's inputs
        rows = torch.randperm(ROWS, generator=gen)[:n].tolist()
        prefix = torch.randint(0, MAX_CONTEXT, (n,), generator=gen).tolist()
        ids = torch.randint(0, 1000, (n,), generator=gen).tolist()
        if token_mix != "host":
            from_device = torch.rand(n, generator=gen) < 0.5 if token_mix == "mixed" else torch.ones(n, dtype=bool)
            ids = [-1 if d else t for t, d in zip(ids, from_device.tolist(), strict=True)]
        staged = graphs.stage(ids, rows, prefix, token_source if token_mix != "host" else None)

        bs = min(b for b in graphs.batch_sizes if b >= n)
        assert (staged.n, staged.bs) == (n, bs)
        rows_t, pos_t = torch.tensor(rows), torch.tensor(prefix)
        want_ids = torch.where(torch.tensor(ids) < 0, token_source[rows_t], torch.tensor(ids))
        assert torch.equal(graphs.input_ids[:n], want_ids), (ids, rows)
        assert torch.equal(graphs.positions[:n], pos_t)
        assert torch.equal(graphs.out_loc[:n], table.slots(rows_t, pos_t))  # the device table's lookup
        assert torch.equal(staged.rows, rows_t) and staged.rows.dtype == torch.int64
        state = graphs.runner.attn_backend.graph
        assert torch.equal(state.rows[:n], rows_t.int())
        assert torch.equal(state.prefix_lens[:n], pos_t.int())
        assert torch.equal(state.kv_lens[:n], pos_t.int() + 1)
        # Padding requests: token 0 at position 0 of row 0, one token of context, KV into the sink slot.
        for name, want in (("input_ids", 0), ("positions", 0), ("out_loc", pad_slot)):
            assert (getattr(graphs, name)[n:bs] == want).all(), name
        assert (state.rows[n:bs] == 0).all() and (state.prefix_lens[n:bs] == 0).all()
        assert (state.kv_lens[n:bs] == 1).all()


def test_can_stage_only_decode_batches_within_the_largest_bucket() -> None:
    graphs, _ = make_runner((1, 2, 4), pad_slot=400)
    assert graphs.can_stage([1, 1, 1], 3)
    assert not graphs.can_stage([1] * 5, 5)  # past the largest bucket
    assert not graphs.can_stage([1, 2], 2)  # a prompt chunk
    assert not graphs.can_stage([1, 1], 1)  # a request without logits
    assert not graphs.can_stage([], 0)
