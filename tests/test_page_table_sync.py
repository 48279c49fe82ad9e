"""The page table's device copy on an accelerator: assignments are made on the host and reach the device table together
at the next sync (every batch build and decode-graph staging syncs, and reading the device table does). Checked on the
CPU with the host table kept apart from the device's, as on a GPU: the table against a plain mirror, and whole engines
against the CPU's shared table (the same greedy tokens, prompts chunked, overlap scheduling on)."""

from __future__ import annotations

import random

import pytest
import torch

from pd.engine import model_runner
from pd.engine.io import SamplingParams
from pd.engine.kv_cache import ReqToToken
from pd.engine.llm import LLM
from tests.tiny_checkpoints import make_checkpoint


def check_assignments_reach_the_device_table(device: str, host_copy: bool | None) -> None:
    rng = random.Random(torch.randint(0, 2**31, ()).item())
    rows_total, width, page_size = 12, 20, 4
    table = ReqToToken(rows_total, width * page_size, page_size, torch.device(device), host_copy=host_copy)
    mirror = [[0] * width for _ in range(rows_total)]
    for round_ in range(60):
        before = table._pages.clone()
        for _ in range(rng.randint(0, 6)):
            row, first = rng.randrange(rows_total), rng.randrange(width + 3)
            pages = [rng.randrange(1, 10_000) for _ in range(rng.randint(0, 8))]
            table.assign_pages(row, first, pages)
            for i, page in enumerate(pages):
                if first + i < width:
                    mirror[row][first + i] = page
        assert table.host_pages.tolist() == mirror
        assert torch.equal(table._pages, before)  # nothing reaches the device table before a sync
        if round_ % 2:
            table.sync_device()
            assert table._pages.tolist() == mirror
        assert table.pages.tolist() == mirror  # reading the table syncs too


def test_page_table_assignments_reach_the_device_table_at_the_next_sync():
    """With a host table apart from the device's (an accelerator's layout, asked for on the CPU), assignments stay on
    the host until sync_device, then arrive together: rows assigned, reassigned, partly overwritten and past the
    table's width, in random order, against a plain mirror kept by this test; reading ``pages`` syncs first."""
    check_assignments_reach_the_device_table("cpu", host_copy=True)


@pytest.mark.gpu
def test_gpu_page_table_assignments_reach_the_device_table_at_the_next_sync():
    """The same on a CUDA table (a host table apart by default; the copy from pinned memory and the scatter on the
    device's stream)."""
    check_assignments_reach_the_device_table("cuda", host_copy=None)



@pytest.mark.parametrize("arch", ["qwen3_moe", "deepseek_v3"])
def test_an_engine_with_a_separate_host_table_generates_the_same_tokens(arch: str, tmp_path, monkeypatch):
    seed = int(torch.randint(0, 2**31, ()).item())
    path = make_checkpoint(arch, str(tmp_path / arch), seed=seed)
    gen = torch.Generator().manual_seed(seed)
    prompts = [torch.randint(0, 256, (n,), generator=gen).tolist() for n in (21, 5, 13, 9)]
    params = SamplingParams(max_new_tokens=6, temperature=0.0)

    def run() -> tuple[list[list[int]], ReqToToken]:
        llm = LLM(path, page_size=4, chunked_prefill_size=8, max_running_requests=3, max_total_tokens=512)
        return llm.generate(prompts, params), llm.scheduler.slots

    shared, shared_table = run()
    assert shared_table._unsynced is None  # the CPU's table is one memory
    monkeypatch.setattr(model_runner, "ReqToToken", lambda *a, **k: ReqToToken(*a, **k, host_copy=True))
    separate, table = run()
    assert table._unsynced == [] and table.host_pages.ctypes.data != table._pages.data_ptr()
    assert separate == shared, (seed, separate, shared)
