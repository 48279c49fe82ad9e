"""What the engine refuses at admission, and with which status: a request that can never run here is the client's
fault (400), against limits computed independently from the engine's configuration."""

from __future__ import annotations

import pytest
import torch

from pd.engine.io import GenerateRequest, SamplingParams
from pd.engine.llm import LLM
from tests.tiny_checkpoints import make_checkpoint

CONTEXT, POOL_TOKENS, PAGE = 48, 32, 4


@pytest.fixture(scope="module")
def llm(tmp_path_factory: pytest.TempPathFactory) -> LLM:
    path = make_checkpoint("llama", str(tmp_path_factory.mktemp("ckpt") / "llama"), seed=0)
    return LLM(path, page_size=PAGE, max_total_tokens=POOL_TOKENS, context_length=CONTEXT)


@pytest.mark.parametrize("prompt_len,max_new,why", [
    (0, 4, "empty"),                     # nothing to prefill
    (CONTEXT, 1, "context length"),      # no room left in the context for one new token
    (10, 30, f"pool holds {POOL_TOKENS}"),  # min(context, 10 + 30) = 40 tokens of KV > the pool's 32
])  # fmt: skip
def test_requests_that_can_never_run_are_refused_with_400(llm: LLM, prompt_len: int, max_new: int, why: str):
    sched = llm.scheduler
    ids = torch.randint(0, 256, (prompt_len,)).tolist()
    out = sched.add(GenerateRequest("r", ids, SamplingParams(max_new_tokens=max_new)))
    assert out is not None and out.finish_reason == "error" and out.status == 400 and why in out.error, out
    assert sched.pool.num_free == sched.pool.num_pages and not sched.has_work


def test_a_request_that_fits_is_queued(llm: LLM):
    sched = llm.scheduler
    assert sched.add(GenerateRequest("ok", list(range(1, 11)), SamplingParams(max_new_tokens=22))) is None  # 32 fit
    sched.abort("ok")
    assert sched.pool.num_free == sched.pool.num_pages
