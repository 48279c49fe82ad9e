"""benchmarks/bench_prefix_cache.py: its smoke run on a tiny checkpoint, which must pass the benchmark's own checks
(every request answered, the responses' prompt and cached tokens equal to the instances' counters, no cached token
without the cache, both instances used under each policy) before it writes its JSON; and that counter check,
run in this process, rejecting responses that report more cached tokens than the instances counted."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest

from pd.bench.client import RequestOutput
from tests.tiny_checkpoints import make_checkpoint

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_prefix_cache.py"
SMALL = ["--num-conversations", "2", "--num-turns", "3", "--turn-words", "5", "8", "--output-len", "2", "3",
         "--rounds", "1", "--conversation-rate", "inf"]  # fmt: skip


def _load_bench() -> ModuleType:
    spec = importlib.util.spec_from_file_location("bench_prefix_cache", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_smoke_run_passes_its_own_checks_and_writes_every_comparison(tmp_path: Path) -> None:
    model = make_checkpoint("qwen3_moe", str(tmp_path / "model"))
    out = tmp_path / "prefix_cache.json"
    proc = subprocess.run([sys.executable, str(SCRIPT), "--model-path", model, *SMALL, "--out", str(out)],
                          capture_output=True, text=True, timeout=600, cwd=SCRIPT.parents[1])  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr
    result = json.loads(out.read_text())
    checks = result["checks"]
    for mode in ("(a) cache", "(a) no_cache", "(b) cache_aware", "(b) round_robin"):
        assert f"{mode} round 1: all 6 requests succeeded" in checks
        assert f"{mode} round 1: responses' prompt and cached tokens equal the instances' counters" in checks
    assert "(a) the instance without the cache served no cached token" in checks
    assert {f"(b) {p}: both instances served requests in every round" for p in ("cache_aware", "round_robin")} <= set(
        checks
    )
    # Turns after the first resend their history, so the cache serves some of it; without it, none.
    assert result["cache"]["cache"]["cached_tokens"] > 0 and result["cache"]["no_cache"]["cached_tokens"] == 0
    assert set(result["acceptance"]) == {
        "(a) TTFT p50 >= 3x lower with the cache",
        "(a) throughput >= 1.5x higher with the cache",
        "(b) cache_aware hit rate > round_robin's",
        "(b) cache_aware TTFT p50 < round_robin's",
        "(b) cache_aware TTFT mean < round_robin's",
    }


def test_counter_check_rejects_responses_that_disagree_with_the_instances() -> None:
    bench = _load_bench()
    outputs = [RequestOutput(prompt_len=10, success=True, output_tokens=2, cached_tokens=c) for c in (0, 8)]
    checks: list[str] = []
    bench.check_run("ok", bench.Run(outputs, 1.0, 20, 8, [20]), checks)
    assert len(checks) == 2
    with pytest.raises(AssertionError, match="instances counted"):
        bench.check_run("off", bench.Run(outputs, 1.0, 20, 0, [20]), checks)
    failed = [*outputs, RequestOutput(prompt_len=10, error="HTTP 500: boom")]
    with pytest.raises(AssertionError, match="1 requests failed"):
        bench.check_run("failed", bench.Run(failed, 1.0, 20, 8, [20]), checks)


def test_client_reads_cached_tokens_where_each_backend_reports_them_and_the_report_sums_them() -> None:
    import time

    import torch

    from pd.bench.client import BenchClient, _TokenTimer
    from pd.bench.report import compute_metrics

    prompt, cached = (int(x) for x in torch.randint(1, 10_000, (2,)).sort().values)  # cached <= prompt
    outs = []
    for backend in ("native", "openai", "chat"):
        client = BenchClient("http://127.0.0.1:1", backend)
        # streamed: native events carry meta_info; OpenAI's usage chunk carries prompt_tokens_details
        out = RequestOutput(prompt_len=0)
        if backend == "native":
            event = {"text": "a", "output_ids": [1], "meta_info": {"prompt_tokens": prompt, "cached_tokens": cached,
                                                                     "completion_tokens": 1}}  # fmt: skip
        else:
            details = {"prompt_tokens_details": {"cached_tokens": cached}}
            event = {"choices": [], "usage": {"prompt_tokens": prompt, "completion_tokens": 1, **details}}
        client._on_event(event, _TokenTimer(out), time.perf_counter())
        assert (out.prompt_len, out.cached_tokens) == (prompt, cached), backend
        # whole answers; OpenAI leaves prompt_tokens_details out when nothing was cached
        whole = RequestOutput(prompt_len=0)
        if backend == "native":
            body = {"text": "a", "meta_info": {"prompt_tokens": prompt, "cached_tokens": 0, "completion_tokens": 1}}
        else:
            body = {"choices": [{"text": "a", "message": {"content": "a"}}],
                    "usage": {"prompt_tokens": prompt, "completion_tokens": 1}}  # fmt: skip
        assert client._read_whole(body, whole, time.perf_counter()) == ""
        assert (whole.prompt_len, whole.cached_tokens) == (prompt, 0), backend
        outs += [out, whole]
    for o in outs:
        o.success, o.output_tokens = True, 1
    m = compute_metrics(outs, 1.0)
    assert (m["total_cached_tokens"], m["total_input_tokens"]) == (3 * cached, 6 * prompt)
    assert m["cache_hit_rate"] == 3 * cached / (6 * prompt)
