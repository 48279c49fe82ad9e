"""A step's outputs leave before its bookkeeping: the pages of requests that ended in it go back to the pool and the
prefix cache in Scheduler.tidy(), which the engine loop calls once the outputs are sent.

Oracle: the same engine stepping with tidy on every step (the plain loop) gives the same tokens, and the same pages
come back: none may be lost or returned twice, whether overlap scheduling holds them for the step in flight or tidy
returns them, and a request admitted after a finished one finds its pages (and its cached prefix) free.
"""

from __future__ import annotations

import secrets

import pytest
import torch

from pd.engine.io import GenerateRequest, SamplingParams
from pd.engine.llm import LLM
from tests.tiny_checkpoints import make_checkpoint


def _engine(path: str, overlap: bool) -> LLM:
    return LLM(path, dtype=torch.float32, page_size=4, chunked_prefill_size=48, max_running_requests=4,
               max_total_tokens=512, overlap=overlap, radix_cache=True)  # fmt: skip


def _run(llm: LLM, prompts: list[list[int]], params: list[SamplingParams], tidy: bool) -> dict[str, list[int]]:
    sched = llm.scheduler
    for i, (ids, sp) in enumerate(zip(prompts, params, strict=True)):
        assert sched.add(GenerateRequest(f"r{i}", ids, sp)) is None
    out: dict[str, list[int]] = {f"r{i}": [] for i in range(len(prompts))}
    held_after_outputs = 0
    while sched.has_work:
        for o in sched.step(tidy=tidy):
            out[o.rid] += o.new_token_ids
        if not tidy:
            held_after_outputs += len(sched.returns_after_outputs)
            sched.tidy()
            assert not sched.returns_after_outputs
    if not tidy:  # the deferred path was taken: requests ended with nothing in flight
        assert held_after_outputs > 0
    assert sched.tidy() is False  # nothing left
    pool = sched.pool.num_free + (sched.cache.num_evictable if sched.cache is not None else 0)
    assert pool == sched.pool.num_pages, (pool, sched.pool.num_pages)
    return out


@pytest.mark.parametrize("overlap", [False, True])
def test_tidy_after_the_outputs_gives_the_plain_loops_tokens_and_pages(overlap: bool, tmp_path) -> None:
    seed = secrets.randbelow(2**31)
    path = make_checkpoint("llama", str(tmp_path / "m"), seed=seed)
    gen = torch.Generator().manual_seed(seed)
    shared = torch.randint(0, 256, (13,), generator=gen).tolist()
    # Some prompts share a prefix (the later ones hit what the earlier ones cached), more requests than batch rows,
    # some ending at their first token (prefill-only: they end with nothing in flight).
    prompts = [(shared if i % 2 else []) + torch.randint(0, 256, (int(n),), generator=gen).tolist()
               for i, n in enumerate(torch.randint(2, 40, (9,), generator=gen))]  # fmt: skip
    params = [SamplingParams(max_new_tokens=1 if i % 3 == 0 else int(torch.randint(2, 9, (), generator=gen)),
                             temperature=0.0) for i in range(len(prompts))]  # fmt: skip
    plain = _run(_engine(path, overlap), prompts, params, tidy=True)
    after = _run(_engine(path, overlap), prompts, params, tidy=False)
    assert after == plain, f"seed {seed}"


def test_an_abort_returns_its_pages_at_once(tmp_path) -> None:
    path = make_checkpoint("llama", str(tmp_path / "m"))
    sched = _engine(path, overlap=False).scheduler
    assert sched.add(GenerateRequest("a", list(range(1, 30)), SamplingParams(max_new_tokens=8))) is None
    sched.step()
    assert sched.pool.num_free < sched.pool.num_pages
    assert sched.abort("a") is not None
    assert not sched.returns_after_outputs
    assert sched.pool.num_free + sched.cache.num_evictable == sched.pool.num_pages
