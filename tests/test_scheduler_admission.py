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


def prefill_lines_name_their_batches(root: str, device: str, caplog: pytest.LogCaptureFixture) -> list[str]:
    """The "prefill batch" INFO lines of three prompts (lengths drawn here) run as one forward: the line counts
    the prompt tokens and requests it was given and says how long the host took to launch the forward."""
    path = make_checkpoint("llama", f"{root}/llama", seed=0)
    llm = LLM(path, device=device, page_size=PAGE, max_total_tokens=256, context_length=CONTEXT,
              chunked_prefill_size=-1)  # fmt: skip
    lens = torch.randint(2, 20, (3,)).tolist()
    prompts = [torch.randint(1, 256, (n,)).tolist() for n in lens]
    with caplog.at_level("INFO", logger="pd.engine.scheduler"):
        llm.generate(prompts, SamplingParams(max_new_tokens=1, temperature=0.0))
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("prefill batch")]
    assert len(lines) == 1, [r.getMessage() for r in caplog.records]
    assert f"prefill batch: {sum(lens)} prompt tokens of 3 requests (3 new" in lines[0], lines
    launched = float(lines[0].split("launched in ", 1)[1].split(" ms", 1)[0])
    assert 0.0 <= launched < 60_000, lines[0]
    return lines


def test_each_prefill_forward_logs_its_batch_and_launch_time(tmp_path, caplog: pytest.LogCaptureFixture):
    (line,) = prefill_lines_name_their_batches(str(tmp_path), "cpu", caplog)
    assert line.endswith(" ms") and "on the device" not in line, line  # the CPU's forward ran within the launch


@pytest.mark.gpu
def test_on_a_gpu_the_prefill_line_adds_the_forwards_device_time(tmp_path, caplog: pytest.LogCaptureFixture):
    """On a GPU the line is logged once the forward has ended, with its time on the device and when the host saw it
    end (after its requests arrived and it ran)."""
    (line,) = prefill_lines_name_their_batches(str(tmp_path), "cuda", caplog)
    device_ms = float(line.split(" ms on the device", 1)[0].rsplit(", ", 1)[1])
    seen_ms = float(line.split("seen done ", 1)[1].removesuffix(" ms after its first new request arrived"))
    assert 0.0 < device_ms < seen_ms < 60_000, line


def _expected_prefill_steps(lens: list[int], chunk: int, cap: int) -> list[tuple[int, int]]:
    """SGLang's packing of one-token requests into prefill steps, written out: (prompt tokens, requests) per step.
    A step's prompt tokens stay within min(chunk, cap) (no chunk: cap); chunked, the oldest prompts are cut to fit;
    unchunked, whole prompts go while they fit and the first always."""
    left, steps = list(lens), []
    while left:
        budget, tokens, reqs, done = min(chunk if chunk > 0 else cap, cap), 0, 0, 0
        for i, n in enumerate(left):
            take = min(n, budget) if chunk > 0 else (n if n <= budget or reqs == 0 else 0)
            if take <= 0:
                break
            left[i] -= take
            tokens, reqs, budget = tokens + take, reqs + 1, budget - take
            done += left[i] == 0
        steps.append((tokens, reqs))
        left = [n for n in left if n > 0]
        assert done or reqs, "no progress"
    return steps


@pytest.mark.parametrize("chunk", [-1, 40, 64])  # 64: the bound (CONTEXT) below the chunk
def test_max_prefill_tokens_bounds_each_prefill_step_never_below_the_context_length(tmp_path, chunk: int,
                                                                                    caplog: pytest.LogCaptureFixture):
    """--max-prefill-tokens (SGLang's): a step carries at most max(flag, context length) prompt tokens; a flag below
    the context length acts as the context length. The steps the engine logs are the packing this rule gives, and the
    tokens equal an engine without the bound."""
    path = make_checkpoint("llama", str(tmp_path / "llama"), seed=0)
    lens = torch.randint(9, CONTEXT - 4, (5,)).tolist()
    prompts = [torch.randint(1, 256, (n,)).tolist() for n in lens]
    sp = SamplingParams(max_new_tokens=1, temperature=0.0)
    engine = dict(page_size=PAGE, max_total_tokens=512, context_length=CONTEXT, chunked_prefill_size=chunk)
    unbounded = LLM(path, **engine).generate(prompts, sp)
    llm = LLM(path, **engine, max_prefill_tokens=3)  # below the context length: the bound is CONTEXT
    with caplog.at_level("INFO", logger="pd.engine.scheduler"):
        assert llm.generate(prompts, sp) == unbounded
    steps = [r.getMessage() for r in caplog.records if r.getMessage().startswith("prefill batch")]
    got = [(int(m.split()[2]), int(m.split(" of ")[1].split()[0])) for m in steps]
    assert got == _expected_prefill_steps(lens, chunk, CONTEXT), (lens, steps)
