"""pd.gc_pause: start-up objects leave the collector's walk, and a long collection is logged."""

from __future__ import annotations

import gc
import logging
import time

import pytest

from pd import gc_pause


@pytest.fixture
def clean_gc():  # noqa: ANN201
    callbacks = list(gc.callbacks)
    yield
    gc.unfreeze()
    gc.callbacks[:] = callbacks


def test_freeze_exempts_live_objects_and_a_full_collection_no_longer_walks_them(clean_gc: None) -> None:
    keep = [[i] for i in range(200_000)]  # start-up state: many containers
    gc.collect()
    start = time.perf_counter()
    gc.collect()
    before = time.perf_counter() - start
    gc_pause.freeze_startup_objects("test")
    assert gc.get_freeze_count() >= len(keep)
    start = time.perf_counter()
    gc.collect()
    after = time.perf_counter() - start
    assert after < before / 2, (before, after)
    assert keep[-1] == [199_999]


def test_a_collection_longer_than_the_threshold_is_logged(clean_gc: None, caplog: pytest.LogCaptureFixture) -> None:
    gc_pause.log_long_pauses("test", threshold_s=0.0)
    with caplog.at_level(logging.WARNING, logger="pd.gc_pause"):
        gc.collect()
    assert any("test: garbage collection of generation 2 took" in r.getMessage() for r in caplog.records)
