"""benchmarks/bench_served_prefill.py on a small burst: the stand-in device saw every prompt token of every burst, a
batched request ran as one forward, and the figures it prints follow from what it recorded."""

from __future__ import annotations

import argparse
import random
import statistics

import pytest


@pytest.mark.slow
def test_every_prompt_token_reaches_the_stand_in_and_a_batch_is_one_forward() -> None:
    from benchmarks.bench_served_prefill import run

    rng = random.Random()
    prompts, length, bursts = rng.randint(2, 6), rng.randint(8, 64), 2
    args = argparse.Namespace(prompts=prompts, length=length, bursts=bursts, fronts=1, fixed_ms=2.0,
                              us_per_token=1.0, serve_args="", out=None, against=None)  # fmt: skip
    result = run(args)
    assert result["stand_in_burst_ms"] == pytest.approx(2.0 + prompts * length / 1e3)
    for form in ("concurrent", "batched"):
        runs = result[form]["bursts"]
        assert len(runs) == bursts
        for b in runs:
            assert sum(b["forwards"]) == prompts * length, (form, b)
            # a burst cannot beat the device time of the forwards it ran
            assert b["ms"] >= sum(2.0 + n / 1e3 for n in b["forwards"]), (form, b)
            assert 0 <= b["first_forward_ms"] < b["ms"]
        assert result[form]["median_ms"] == statistics.median(b["ms"] for b in runs)
        assert result[form]["x_stand_in"] == pytest.approx(result[form]["median_ms"] / result["stand_in_burst_ms"])
    assert all(len(b["forwards"]) == 1 for b in result["batched"]["bursts"])


@pytest.mark.slow
def test_against_another_checkout_pairs_the_bursts() -> None:
    """--against ROOT (here this same checkout): a second server, bursts taking turns, the paired differences
    computed from the recorded bursts."""
    from benchmarks.bench_served_prefill import ROOT, run

    prompts, length, bursts = 3, random.Random().randint(8, 32), 3
    args = argparse.Namespace(prompts=prompts, length=length, bursts=bursts, fronts=1, fixed_ms=2.0,
                              us_per_token=1.0, serve_args="", out=None, against=ROOT)  # fmt: skip
    result = run(args)
    for form in ("concurrent", "batched"):
        this, against = result[form]["bursts"], result[form]["against"]["bursts"]
        assert len(this) == len(against) == bursts
        for b in this + against:
            assert sum(b["forwards"]) == prompts * length, (form, b)
        diffs = [a["ms"] - b["ms"] for a, b in zip(this, against, strict=True)]
        assert result[form]["paired_diff_ms"] == pytest.approx(statistics.median(diffs))
