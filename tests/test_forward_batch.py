"""build_forward_batch against a plain-Python construction of the same batch, on fresh random ragged batches.

Also the property the padding exists for: every device array of the batch starts 16-byte aligned, whatever the
numbers of requests and tokens (Triton compiles one kernel variant per pointer alignment; an alignment that moved
with the batch's sizes compiled variants on requests, after the warm-up)."""

from __future__ import annotations

import random

import pytest
import torch

from pd.engine.forward_batch import build_forward_batch
from pd.engine.kv_cache import ReqToToken


class _KV:
    device = torch.device("cpu")


class _Backend:
    def prepare(self, layout, kv_cache):  # noqa: ANN001, ANN201
        return None


@pytest.mark.parametrize("page_size", [16, 12])
@pytest.mark.parametrize("host_copy", [False, True])
def test_batches_equal_the_plain_construction_and_every_array_is_16_byte_aligned(page_size: int, host_copy: bool):
    """host_copy: the page table kept apart from the device's (an accelerator's layout, asked for on the CPU), with
    rows reassigned before some builds: the build carries those entries to the device table in its own copy. A page
    size that is not a power of two takes host_slots' general path."""
    rng = random.Random(torch.randint(0, 2**31, ()).item())
    rows_total, max_pages = 40, -(-512 // page_size)
    table = ReqToToken(rows_total, max_pages * page_size, page_size, torch.device("cpu"), host_copy=host_copy)
    mirror = [rng.sample(range(10_000), max_pages) for _ in range(rows_total)]
    for row in range(rows_total):  # each row's pages: a random permutation, so slots differ from positions
        table.assign_pages(row, 0, mirror[row])
    if not host_copy:
        table.sync_device()
    for _ in range(200):
        for _ in range(rng.choice((0, 0, 1, 3)) if host_copy else 0):  # pages (re)assigned since the last build
            row, first = rng.randrange(rows_total), rng.randrange(max_pages)
            pages = rng.sample(range(10_000), rng.randint(1, max_pages - first))
            table.assign_pages(row, first, pages)
            mirror[row][first : first + len(pages)] = pages
        n = rng.randint(1, 12)
        rows = rng.sample(range(rows_total), n)
        decode = rng.random() < 0.3
        extend = [1] * n if decode else [rng.randint(1, 37) for _ in range(n)]
        prefix = [rng.randint(0, 400) for _ in range(n)]
        ids = [rng.randint(0, 1000) for _ in range(sum(extend))]
        logits = None if rng.random() < 0.5 else sorted(rng.sample(range(len(ids)), rng.randint(1, len(ids))))
        # Under overlap a negative id is read from the device's newest token of its row: none, some or all of them.
        source = torch.randint(0, 1000, (rows_total,)) if rng.random() < 0.6 else None
        sent = list(ids)
        if source is not None:
            share = rng.choice((0.0, 0.5, 1.0))
            sent = [-1 if rng.random() < share else t for t in ids]
        batch = build_forward_batch(sent, rows, prefix, extend, table, _KV(), _Backend(), logits_index=logits,
                                    token_source=source)  # fmt: skip

        positions = [p + i for p, e in zip(prefix, extend, strict=True) for i in range(e)]
        token_rows = [r for r, e in zip(rows, extend, strict=True) for _ in range(e)]
        starts = [sum(extend[:i]) for i in range(n)]
        slots = [mirror[r][p // page_size] * page_size + p % page_size
                 for r, p in zip(token_rows, positions, strict=True)]  # fmt: skip
        assert table._pages.tolist() == mirror and not table._unsynced  # the build brought the device table along
        layout = batch.layout
        if source is not None:
            ids = [int(source[r]) if t < 0 else t for t, r in zip(sent, token_rows, strict=True)]
        assert batch.input_ids.tolist() == ids
        assert batch.positions.tolist() == positions
        assert batch.logits_index.tolist() == (logits or [s + e - 1 for s, e in zip(starts, extend, strict=True)])
        assert layout.rows.tolist() == rows and layout.prefix_lens.tolist() == prefix
        assert layout.extend_lens.tolist() == extend and layout.q_starts.tolist() == starts
        assert layout.kv_lens is not None
        assert layout.kv_lens.tolist() == [p + e for p, e in zip(prefix, extend, strict=True)]
        assert layout.rows.dtype == layout.q_starts.dtype == layout.kv_lens.dtype == torch.int32
        assert layout.out_loc.tolist() == slots and layout.is_decode == all(e == 1 for e in extend)
        arrays = (batch.input_ids, batch.positions, batch.logits_index, layout.rows, layout.prefix_lens,
                  layout.extend_lens, layout.q_starts, layout.kv_lens)  # fmt: skip
        assert all(a.data_ptr() % 16 == 0 for a in arrays), [a.data_ptr() % 16 for a in arrays]


def test_expanded_context_equals_the_plain_construction_with_and_without_cached_prefixes():
    """The MLA prompt path's context (pd.attention.triton_backend.expanded_context): each request's prefix and new
    tokens, request after request, their KV slots, and where each request's first key lies. A batch with no cached
    prefix takes the batch's own slots and starts; any prefix the general construction."""
    from pd.attention.triton_backend import expanded_context

    rng = random.Random(torch.randint(0, 2**31, ()).item())
    page_size, rows_total = 16, 24
    table = ReqToToken(rows_total, 512, page_size, torch.device("cpu"))
    for row in range(rows_total):
        table.assign_pages(row, 0, rng.sample(range(10_000), 512 // page_size))
    for i in range(100):
        n = rng.randint(1, 10)
        rows = rng.sample(range(rows_total), n)
        extend = [rng.randint(1, 37) for _ in range(n)]
        prefix = [0] * n if i % 2 else [rng.choice((0, rng.randint(1, 400))) for _ in range(n)]
        ids = [rng.randint(0, 1000) for _ in range(sum(extend))]
        layout = build_forward_batch(ids, rows, prefix, extend, table, _KV(), _Backend()).layout
        context = expanded_context(layout)

        lengths = [p + e for p, e in zip(prefix, extend, strict=True)]
        slots = [int(table.pages[r, p // page_size]) * page_size + p % page_size
                 for r, n_ctx in zip(rows, lengths, strict=True) for p in range(n_ctx)]  # fmt: skip
        assert context.new_only == (not any(prefix))
        assert context.slots.tolist() == slots
        assert context.firsts.tolist() == [[sum(lengths[:b])] for b in range(n)]
        assert context.rows.tolist() == list(range(n)) and context.rows.dtype == context.firsts.dtype == torch.int32

