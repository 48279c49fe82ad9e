"""benchmarks/bench_dispatch.py: its CPU (gloo) smoke run, and that its correctness check rejects a wrong dispatch.

The smoke run is a subprocess of the documented command; its JSON must hold one row per CPU backend, every checked
backend's reference check run (an error recorded) and "ok", and DeepEP / CUDA graphs skipped with a reason. The
check itself is shown to flag wrong dispatches below.
"""

from __future__ import annotations

import importlib.util
import json
import math
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import torch

from pd.moe.dispatcher.base import DispatchOutput
from pd.moe.topk import TopKOutput

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_dispatch.py"


def _load_bench() -> ModuleType:
    spec = importlib.util.spec_from_file_location("bench_dispatch", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_cpu_smoke_run_writes_rows_with_sane_times_and_passing_checks(tmp_path: Path) -> None:
    out = tmp_path / "dispatch.json"
    args = ["--device", "cpu", "--ep", "2", "--tokens", "16", "--hidden", "64", "--experts", "8", "--topk", "2"]
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), *args, "--iters", "2", "--layers", "3", "--layer-reps", "2", "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    result = json.loads(out.read_text())
    assert result["card"] == "cpu" and result["versions"]["torch"] == torch.__version__
    assert "--device cpu" in result["command"] and result["date"]

    rows = {row["backend"]: row for row in result["rows"]}
    assert set(rows) == {"raw_all_to_all", "torch_normal", "torch_low_latency", "torch_low_latency_nccl"}
    for row in rows.values():
        assert row["tokens_per_rank"] == 16
        for key in ("dispatch_us", "combine_us", "total_us", "layer_us"):
            assert math.isfinite(row[key]) and row[key] > 0, (row["backend"], key, row[key])
        assert row["total_us"] >= max(row["dispatch_us"], row["combine_us"])
        assert row["vs_raw"] > 0 and row["vs_deepep"] is None and row["layer_vs_raw"] > 0
    assert rows["raw_all_to_all"]["check"] == "n/a"
    for name in ("torch_normal", "torch_low_latency", "torch_low_latency_nccl"):
        assert rows[name]["check"] == "ok" and 0 <= rows[name]["max_rel_err"] < 2e-2, rows[name]

    assert "deep_ep needs CUDA" in result["skipped"]["deepep_normal"]
    assert "CUDA graphs" in result["skipped"]["torch_low_latency_graph"]
    # no DeepEP, and 128 tokens/rank not run: both targets unjudged, on both measures
    assert [t["passed"] for t in result["targets"]] == [None] * 4
    assert "skipped deepep_normal: deep_ep needs CUDA" in proc.stdout and "TARGET low_latency" in proc.stdout


def test_reference_check_flags_a_dispatch_that_credits_the_wrong_expert() -> None:
    bench = _load_bench()
    gen = torch.Generator().manual_seed(3)
    tokens, experts, top_k = 64, 16, 4
    x = torch.randn(tokens, 32, generator=gen).to(torch.bfloat16)
    topk = bench.make_draw(5, tokens, experts, top_k, torch.device("cpu"))()
    scales = 0.5 + torch.rand(experts, generator=gen)
    bound = (2 + 2) * 2.0**-8  # what the benchmark allows at EP=2

    def error(ids: torch.Tensor) -> float:
        out = bench.expert_output(DispatchOutput(x, ids, topk.topk_weights, None), scales, 0)
        return bench.reference_error(out.hidden_states, x, TopKOutput(topk.topk_ids, topk.topk_weights, None), scales)

    assert error(topk.topk_ids) <= bound
    assert error((topk.topk_ids + 1) % experts) > 5 * bound  # each slot credited to the next expert
    dropped = topk.topk_ids.clone()
    dropped[0, topk.topk_weights[0].argmax()] = -1  # one token loses its heaviest slot
    assert error(dropped) > bound
