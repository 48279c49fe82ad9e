"""The warning for GPU memory short beside the KV pool (pd.engine.alloc_watch), driven by a stand-in retry counter:
the CUDA allocator's own counter exists only on a GPU."""

from __future__ import annotations

import dataclasses
import logging
import random

import pytest

from pd.engine.alloc_watch import AllocRetryWatch


def test_retries_are_reported_once_per_interval_with_their_counts(caplog: pytest.LogCaptureFixture) -> None:
    rng = random.Random()
    seed = rng.randrange(2**31)
    rng.seed(seed)
    count = [rng.randrange(5)]  # retries before the watch starts (the warm-up's) are never reported
    watch = AllocRetryWatch(None, "--flag-a (now 1) or --flag-b (now 2)", retries=lambda: count[0], interval_s=1.0)
    now, reported, last_check = watch.checked, count[0], watch.checked
    with caplog.at_level(logging.WARNING, logger="pd.engine.alloc_watch"):
        for _ in range(300):
            now += rng.choice((0.01, 0.3, 0.9, 2.5))
            count[0] += rng.choice((0, 0, 0, 1, 3))
            caplog.clear()
            watch.check(now)
            due = now - last_check >= 1.0
            if due:
                last_check = now
            new = count[0] - reported if due else 0
            if due:
                reported = count[0]
            if new:
                (record,) = caplog.records
                message = record.getMessage()
                assert f"retried {new} allocation(s)" in message and f"{count[0]} since start-up" in message, seed
                assert "--flag-a (now 1) or --flag-b (now 2)" in message
            else:
                assert not caplog.records, (seed, caplog.records)


def test_the_advice_names_the_flags_that_size_the_pool(tmp_path) -> None:  # noqa: ANN001
    from pd.engine.llm import LLM
    from tests.tiny_checkpoints import make_checkpoint

    path = make_checkpoint("llama", str(tmp_path / "m"), seed=0)
    llm = LLM(path, chunked_prefill_size=96, max_total_tokens=640)
    assert llm.scheduler.alloc_watch is None  # the CPU has no caching allocator to watch
    assert llm.scheduler._memory_advice() == "--max-total-tokens (now 640) or --chunked-prefill-size (now 96)"
    llm.runner.cfg = dataclasses.replace(llm.runner.cfg, max_total_tokens=None)
    assert llm.scheduler._memory_advice() == "--mem-fraction-static (now 0.85) or --chunked-prefill-size (now 96)"
