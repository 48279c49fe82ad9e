"""benchmarks/bench_overlap.py: its CPU (gloo) smoke run, which must pass the benchmark's own check that two
micro-batches interleaved through the layers' stages give the one-batch output before it writes a row; and that
check, run in this process on one rank, rejecting a micro-batch whose rows come back out of order."""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import socket
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest
import torch
import torch.distributed as dist

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_overlap.py"
SMALL = ["--tokens", "33", "--hidden", "64", "--inter", "32", "--experts", "8", "--layers", "2", "--iters", "1"]


def _load_bench() -> ModuleType:
    spec = importlib.util.spec_from_file_location("bench_overlap", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_cpu_smoke_run_passes_its_output_check_and_writes_a_row(tmp_path: Path) -> None:
    out = tmp_path / "overlap.json"
    proc = subprocess.run([sys.executable, str(SCRIPT), *SMALL, "--out", str(out)], capture_output=True, text=True,
                          timeout=300, cwd=SCRIPT.parents[1])  # fmt: skip
    # A mismatch between the two runs is an assert_close failure in a rank: a non-zero exit, and no row.
    assert proc.returncode == 0, proc.stdout + proc.stderr
    (row,) = json.loads(out.read_text())["rows"]
    assert row["tokens"] == 33
    for key in ("one_batch_ms", "two_micro_batches_ms"):
        assert math.isfinite(row[key]) and row[key] > 0
    assert "T=   33/rank" in proc.stdout


def test_output_check_rejects_a_micro_batch_whose_rows_come_back_out_of_order(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    bench = _load_bench()
    real = bench.interleave

    def rolled(steps: list) -> list[torch.Tensor]:  # the second micro-batch's rows shifted by one, every layer
        first, second = real(steps)
        return [first, second.roll(1, 0)]

    monkeypatch.setattr(bench, "interleave", rolled)
    args = argparse.ArgumentParser()
    for name in ("tokens", "hidden", "inter", "experts", "layers", "iters"):
        args.add_argument(f"--{name}", type=int, nargs="+" if name == "tokens" else None)
    a = args.parse_args(SMALL)
    a.ep, a.device, a.topk, a.out = 1, "cpu", 4, str(tmp_path / "never.json")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    threads = torch.get_num_threads()
    try:
        with pytest.raises(AssertionError, match="not close"):
            bench._worker(0, a, port)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
        torch.set_num_threads(threads)
    assert not (tmp_path / "never.json").exists()
