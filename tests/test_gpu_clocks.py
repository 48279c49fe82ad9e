"""The benchmarks' GPU state sampler (benchmarks/gpu_clocks.py) against a stand-in for nvidia-smi that prints
random samples (and the lines nvidia-smi prints when a field is unavailable), at times this test notes."""

from __future__ import annotations

import json
import math
import random
import statistics
import sys
import textwrap
import time

from benchmarks.gpu_clocks import GpuClocks, describe


def test_a_span_summarizes_the_samples_taken_within_it(tmp_path) -> None:  # noqa: ANN001
    seed = random.randrange(2**31)
    rng = random.Random(seed)
    rows = [(rng.randrange(300, 2000), round(rng.uniform(50, 700), 2), rng.randrange(25, 90)) for _ in range(30)]
    script = tmp_path / "smi.py"
    script.write_text(textwrap.dedent(f"""
        import json, sys, time
        for i, (sm, w, t) in enumerate(json.loads({json.dumps(rows)!r})):
            if i % 7 == 3:
                print("[N/A], [N/A], [N/A]", flush=True)  # no clock: not a sample
            if i % 5 == 2:
                w = "[N/A]"  # a field nvidia-smi could not read: the sample counts without it
            print(f"{{sm}}, {{w}}, {{t}}", flush=True)
            time.sleep(0.01)
        time.sleep(60)
    """))
    before = time.monotonic()
    clocks = GpuClocks(command=[sys.executable, str(script)])
    try:
        deadline = time.monotonic() + 30
        while len(clocks.samples) < len(rows) and time.monotonic() < deadline:
            time.sleep(0.01)
        after = time.monotonic()
        read = [(s[1], None if math.isnan(s[2]) else s[2], s[3]) for s in clocks.samples]
        assert read == [(float(sm), None if i % 5 == 2 else w, float(t)) for i, (sm, w, t) in enumerate(rows)], seed
        whole = clocks.span(before, after)
        watts = [w for i, (_, w, _) in enumerate(rows) if i % 5 != 2]
        assert whole == {"sm_mhz_median": statistics.median(r[0] for r in rows), "sm_mhz_min": min(r[0] for r in rows),
                         "power_w_median": statistics.median(watts),
                         "temp_c_max": max(r[2] for r in rows), "samples": len(rows)}, seed  # fmt: skip
        # a span holds only the samples taken inside it
        times = [s[0] for s in clocks.samples]
        i, j = sorted(rng.sample(range(len(rows)), 2))
        part = clocks.span(times[i], times[j])
        assert part is not None and part["samples"] == j - i + 1, seed
        assert part["sm_mhz_min"] == min(r[0] for r in rows[i : j + 1]), seed
        assert clocks.span(after + 1, after + 2) is None
        assert "MHz" in describe(whole) and describe(None) == "clocks not sampled"
    finally:
        clocks.close()


def test_without_sampling_every_span_is_none() -> None:
    clocks = GpuClocks(enabled=False)
    assert clocks.span(0.0, time.monotonic()) is None
    clocks.close()
