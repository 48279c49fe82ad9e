"""The prefix cache end to end: greedy tokens with the cache equal those without it.

In process, the oracle is the same engine with the cache off, under both schedule loops: full hits, partial hits,
hits on a previous answer's tokens, misses, requests sharing a prefix in the same batch, eviction when the pool is
too small to keep everything, and aborts in the middle of a prompt and of a decode, whose pages are then reused.
Each request's cached_tokens must be the oracle's longest whole-page prefix, and an idle engine holds no page.
Through `pd serve` (every architecture: Llama, Mixtral, Qwen2-MoE, Qwen3-MoE, DeepSeek-V3), the oracle is
transformers; meta_info.cached_tokens, OpenAI's usage.prompt_tokens_details, /get_server_info's page counts, /metrics'
hit rate and /flush_cache are checked.
"""

from __future__ import annotations

import asyncio
import dataclasses
import random
import time

import httpx
import pytest
import torch
from prometheus_client.parser import text_string_to_metric_families

from pd.engine.io import GenerateRequest, SamplingParams, TokenOutput
from pd.engine.llm import LLM
from pd.engine.scheduler import Scheduler
from pd.engine.spec import scheduler_config
from pd.server_args import ServerArgs
from tests.server_process import pd_serve
from tests.tiny_checkpoints import load_hf, make_checkpoint

PAGE = 4
CHUNK = 16
ROWS = 4


def _engine(path: str, cache: bool, overlap: bool, max_total_tokens: int = 2048) -> LLM:
    llm = LLM(path, dtype=torch.float32, page_size=PAGE, chunked_prefill_size=CHUNK, max_running_requests=ROWS,
              max_total_tokens=max_total_tokens, overlap=overlap)  # fmt: skip
    if cache:
        llm.scheduler = Scheduler(dataclasses.replace(llm.scheduler.cfg, radix_cache=True), llm.runner)
    return llm


Wave = list[tuple[str, list[int], int]]  # (rid, prompt, max_new_tokens)


def _run(llm: LLM, waves: list[Wave], aborts: dict[str, int] | None = None) -> dict[str, TokenOutput]:
    """Runs each wave to completion before the next one starts; `aborts` ends a request after that many steps of
    its wave. Returns each request's tokens as one TokenOutput (its last finish reason and cached_tokens)."""
    sched, got = llm.scheduler, {}
    for wave in waves:
        for rid, ids, n in wave:
            sp = SamplingParams(max_new_tokens=n, temperature=0.0, ignore_eos=True)
            assert sched.add(GenerateRequest(rid, ids, sp)) is None
            got[rid] = TokenOutput(rid, [], len(ids), 0)
        steps = 0
        while sched.has_work:
            outs = sched.step()
            steps += 1
            outs += [o for rid, at in (aborts or {}).items() if at == steps and (o := sched.abort(rid)) is not None]
            for out in outs:
                got[out.rid] = dataclasses.replace(out, new_token_ids=got[out.rid].new_token_ids + out.new_token_ids)
        assert sched.num_free_pages == sched.pool.num_pages, "an idle engine holds no page"
    return got


def expected_cached(prompt: list[int], computed: list[list[int]], page: int = PAGE) -> int:
    """The oracle's hit: the longest whole-page common prefix with the computed tokens of an earlier request, at
    most the prompt less its last token (whose logits give the first output token)."""
    best = 0
    for seq in computed:
        n = 0
        while n < min(len(seq), len(prompt)) and seq[n] == prompt[n]:
            n += 1
        best = max(best, n)
    return min(best, len(prompt) - 1) // page * page


def _fresh(rng: random.Random, n: int, avoid: int | None = None) -> list[int]:
    """n random tokens, the first one different from `avoid` (so a prefix ends exactly there)."""
    first = rng.choice([t for t in range(256) if t != avoid])
    return [first] + [rng.randrange(256) for _ in range(n - 1)]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> str:
    return make_checkpoint("qwen3_moe", str(tmp_path_factory.mktemp("ckpt") / "qwen3_moe"),
                           seed=int(torch.randint(0, 2**31, ()).item()))  # fmt: skip


def test_hits_partial_hits_and_misses_give_the_uncached_tokens(checkpoint: str) -> None:
    seed = int(torch.randint(0, 2**31, ()).item())
    rng = random.Random(seed)
    base, other = _fresh(rng, 2 * CHUNK + 5), _fresh(rng, 13)
    first: Wave = [("base", base, 8), ("other", other, 4)]
    plain = _engine(checkpoint, False, True)
    expected = _run(plain, [first])
    out = expected["base"].new_token_ids
    # Finished requests leave their computed tokens: the prompt and every output token but the last.
    computed = [base + out[:-1], other + expected["other"].new_token_ids[:-1]]
    second: Wave = [
        ("same", list(base), 4),  # the whole prompt is cached: all but its last page's worth is reused
        ("longer", base + _fresh(rng, 6, avoid=out[0]), 4),  # concurrent with "same", sharing its prefix
        ("partial", base[:10] + _fresh(rng, 9, avoid=base[10]), 4),
        ("answer", base + out[:6] + _fresh(rng, 3, avoid=out[6]), 4),  # a follow-up turn: reuses the answer too
    ]
    third: Wave = [("miss", _fresh(rng, 11, avoid=base[0]), 3), ("tiny", base[:3], 3)]  # shorter than a page
    expected |= _run(plain, [second, third])  # without the cache, earlier waves change nothing
    cached = _engine(checkpoint, True, True)
    got = _run(cached, [first, second, third])
    for rid, ref in expected.items():
        assert got[rid].new_token_ids == ref.new_token_ids, f"seed {seed}: {rid}"
    for rid, ids, _ in second + third:
        assert got[rid].cached_tokens == expected_cached(ids, computed), f"seed {seed}: {rid}"
    assert got["same"].cached_tokens > 0 and got["partial"].cached_tokens == 8 and got["miss"].cached_tokens == 0
    assert got["answer"].cached_tokens > len(base)
    sched = cached.scheduler
    assert sched.cached_tokens_total == sum(o.cached_tokens for o in got.values())
    assert sched.stats().kv_pages_cached > 0 and sched.cache is not None
    assert sched.flush_cache() > 0 and sched.pool.num_free == sched.pool.num_pages


def test_eviction_under_memory_pressure_gives_the_uncached_tokens(checkpoint: str) -> None:
    seed = int(torch.randint(0, 2**31, ()).item())
    rng = random.Random(seed)
    roots = [_fresh(rng, 21) for _ in range(3)]
    waves: list[Wave] = [
        [(f"w{w}r{i}", rng.choice(roots)[: rng.randrange(5, 22)] + _fresh(rng, rng.randrange(1, 6)), 5)
         for i in range(ROWS)]
        for w in range(3)
    ]  # fmt: skip
    # A last wave of four unrelated 26-token prompts (31 tokens, 8 pages each with their output) needs the whole pool,
    # so whatever the earlier waves left cached must be evicted, whichever prefixes they happened to share.
    waves.append([(f"w3r{i}", _fresh(rng, 26), 5) for i in range(ROWS)])
    # 32 pages: four requests of at most 31 tokens (8 pages) each fit; the cache must give pages back to admit them.
    expected = _run(_engine(checkpoint, False, True, max_total_tokens=32 * PAGE), waves)
    llm = _engine(checkpoint, True, True, max_total_tokens=32 * PAGE)
    cache = llm.scheduler.cache
    assert cache is not None
    evicted = []
    evict = cache.evict
    cache.evict = lambda n: evicted.append(evict(n)) or evicted[-1]  # type: ignore[method-assign]
    got = _run(llm, waves)
    for rid, ref in expected.items():
        assert got[rid].new_token_ids == ref.new_token_ids, f"seed {seed}: {rid}"
    assert sum(evicted) > 0, "the pool never ran short: the test does not exercise eviction"
    assert llm.scheduler.cached_tokens_total > 0


@pytest.mark.parametrize("overlap", [False, True])
def test_aborts_mid_prompt_and_mid_decode_leave_reusable_pages(checkpoint: str, overlap: bool) -> None:
    seed = int(torch.randint(0, 2**31, ()).item())
    rng = random.Random(seed)
    long, short = _fresh(rng, 3 * CHUNK + 2), _fresh(rng, 10)
    # "long" is aborted after its first chunk, "short" after a few decode steps; "keep" shares long's prefix.
    first: Wave = [("long", long, 12), ("short", short, 20), ("keep", long[: CHUNK + 3] + _fresh(rng, 5), 4)]
    second: Wave = [("long2", long + _fresh(rng, 2), 4), ("short2", short + _fresh(rng, 4), 4)]
    aborts = {"long": 1, "short": 6}
    expected = _run(_engine(checkpoint, False, overlap), [first, second], aborts)
    got = _run(_engine(checkpoint, True, overlap), [first, second], aborts)
    # The first wave hits nothing, so both engines run it step for step alike: the aborts cut the same tokens.
    for rid in ("long", "short", "keep", "long2", "short2"):
        assert got[rid].new_token_ids == expected[rid].new_token_ids, f"seed {seed}: {rid}"
    assert got["long"].finish_reason == got["short"].finish_reason == "abort" and got["short"].new_token_ids
    assert got["long2"].cached_tokens >= CHUNK and got["short2"].cached_tokens >= 8


def test_the_cache_is_on_by_default_and_disable_radix_cache_turns_it_off() -> None:
    assert scheduler_config(ServerArgs.from_cli([])).radix_cache
    assert not scheduler_config(ServerArgs.from_cli(["--disable-radix-cache"])).radix_cache


# ---------------------------------------------------------------- through pd serve
def _gauge(text: str, name: str) -> float:
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == name:
                return s.value
    raise KeyError(name)


def _wait_idle(url: str) -> dict:
    for _ in range(200):
        info = httpx.get(f"{url}/get_server_info", timeout=10).json()
        if info["kv_pages_free"] == info["kv_pages_total"] and info["num_running"] == info["num_waiting"] == 0:
            return info
        time.sleep(0.05)
    raise AssertionError(f"the instance holds pages while idle: {info}")


async def _post_all(url: str, calls: list[tuple[str, dict]]) -> list[dict]:
    async with httpx.AsyncClient(timeout=120) as client:
        responses = await asyncio.gather(*[client.post(url + path, json=body) for path, body in calls])
    for r in responses:
        assert r.status_code == 200, r.text
    return [r.json() for r in responses]


def _generate(ids: list[int], n: int) -> tuple[str, dict]:
    return "/generate", {"input_ids": ids, "sampling_params": {"max_new_tokens": n, "temperature": 0.0}}


@pytest.mark.parametrize("arch", ["llama", "mixtral", "qwen2_moe", "qwen3_moe", "deepseek_v3"])
def test_served_cache_hits_match_transformers_and_report_the_hit(arch: str, tmp_path) -> None:
    seed = int(torch.randint(0, 2**31, ()).item())
    rng = random.Random(seed)
    path = make_checkpoint(arch, str(tmp_path / arch), seed=seed)
    base, new = _fresh(rng, 2 * CHUNK + 7), 6
    with pd_serve(path, "--chunked-prefill-size", str(CHUNK), "--page-size", str(PAGE)) as url:
        (first,) = asyncio.run(_post_all(url, [_generate(base, new)]))
        assert first["meta_info"]["cached_tokens"] == 0
        answer = first["output_ids"][0]  # cached after base too: the prompts below diverge from it
        prompts = {
            "hit": base + _fresh(rng, 5, avoid=answer),
            "partial": base[:14] + _fresh(rng, 6, avoid=base[14]),
            "miss": _fresh(rng, 12, avoid=base[0]),
            "completion": base + _fresh(rng, 3, avoid=answer),  # through /v1/completions, concurrent with "hit"
        }
        calls = [_generate(prompts[k], new) for k in ("hit", "partial", "miss")]
        calls.append(("/v1/completions", {"prompt": prompts["completion"], "max_tokens": new, "temperature": 0.0}))
        hit, partial, miss, completion = asyncio.run(_post_all(url, calls))
        info = _wait_idle(url)
        metrics = httpx.get(f"{url}/metrics", timeout=10).text
        assert httpx.post(f"{url}/flush_cache", timeout=10).status_code == 200
        for _ in range(200):
            flushed = httpx.get(f"{url}/get_server_info", timeout=10).json()
            if flushed["kv_pages_cached"] == 0:
                break
            time.sleep(0.05)
        (again,) = asyncio.run(_post_all(url, [_generate(base, new)]))
        _wait_idle(url)
    computed = [base + first["output_ids"][:-1]]
    for name, out in (("hit", hit), ("partial", partial), ("miss", miss)):
        assert out["meta_info"]["cached_tokens"] == expected_cached(prompts[name], computed), f"seed {seed}: {name}"
    assert hit["meta_info"]["cached_tokens"] == len(base) // PAGE * PAGE and partial["meta_info"]["cached_tokens"] == 12
    assert completion["usage"]["prompt_tokens_details"]["cached_tokens"] == len(base) // PAGE * PAGE
    assert again["meta_info"]["cached_tokens"] == 0 and again["output_ids"] == first["output_ids"]
    assert info["kv_pages_cached"] > 0 and flushed["kv_pages_cached"] == 0
    assert flushed["kv_pages_free"] == flushed["kv_pages_total"]
    hits = sum(o["meta_info"]["cached_tokens"] for o in (hit, partial, miss)) + len(base) // PAGE * PAGE
    prompt_total = len(base) + sum(len(p) for p in prompts.values())
    assert _gauge(metrics, "pd:cache_hit_rate") == pytest.approx(hits / prompt_total)
    assert _gauge(metrics, "pd:kv_pages_cached") == info["kv_pages_cached"]
    hf = load_hf(path)
    outs = {"base": first["output_ids"], "hit": hit["output_ids"], "partial": partial["output_ids"],
            "miss": miss["output_ids"]}  # fmt: skip
    for name, out in outs.items():  # ("completion" answers text: its usage is what it checks)
        ids = base if name == "base" else prompts[name]
        with torch.no_grad():
            ref = hf.generate(torch.tensor([ids]), max_new_tokens=new, do_sample=False)[0, len(ids) :].tolist()
        assert out == ref, f"seed {seed}: {name}"
