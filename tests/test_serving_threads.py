"""Torch's CPU threads in a rank once its model is loaded: one on an accelerator (the host only schedules, and a
wide OpenMP pool stalls beside the HTTP fronts), the loading pool on a CPU rank (its threads run the model), and
OMP_NUM_THREADS over either."""

from __future__ import annotations

import random

import pytest

from pd.engine.engine_process import serving_threads


@pytest.mark.parametrize("device", ["cuda", "npu"])
def test_an_accelerator_rank_schedules_on_one_thread(device: str) -> None:
    assert serving_threads(device, {}, random.randint(2, 256)) == 1


def test_a_cpu_rank_keeps_the_threads_it_loaded_with() -> None:
    threads = random.randint(1, 256)
    assert serving_threads("cpu", {}, threads) == threads


@pytest.mark.parametrize("device", ["cuda", "cpu"])
def test_omp_num_threads_wins(device: str) -> None:
    # the loading pool was sized from OMP_NUM_THREADS already (run_engine): it stays
    threads = random.randint(2, 64)
    assert serving_threads(device, {"OMP_NUM_THREADS": str(threads)}, threads) == threads
