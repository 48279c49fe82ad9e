"""benchmarks/bench_overlap.py: its CPU (gloo) smoke run, which first checks that two micro-batches interleaved through
the layers' stages give the one-batch output, then writes one row per token count with positive times."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_overlap.py"


def test_cpu_smoke_run_checks_the_outputs_and_writes_sane_rows(tmp_path: Path) -> None:
    out = tmp_path / "overlap.json"
    args = ["--tokens", "33", "--hidden", "64", "--inter", "32", "--experts", "8", "--layers", "2", "--iters", "1"]
    proc = subprocess.run([sys.executable, str(SCRIPT), *args, "--out", str(out)], capture_output=True, text=True,
                          timeout=180, cwd=SCRIPT.parents[1])  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr
    (row,) = json.loads(out.read_text())["rows"]
    assert row["tokens"] == 33
    for key in ("one_batch_ms", "two_micro_batches_ms"):
        assert math.isfinite(row[key]) and row[key] > 0
    assert row["ratio"] > 0
