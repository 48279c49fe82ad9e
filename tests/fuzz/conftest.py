"""Fixtures of the fuzzing suites and the mixed-load test: the PD deployment they attack, started once for the
package (see tests/fuzz/deployment.py), the transformers oracle, and a `watch` per test."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.fuzz.deployment import CHECKPOINT_SEED, INSTANCE_ARGS, REQUEST_DEADLINE_S, Oracle, Watch
from tests.pd_cluster import Cluster, pd_cluster
from tests.tiny_checkpoints import make_checkpoint


@pytest.fixture(scope="package")
def fuzz_model(tmp_path_factory: pytest.TempPathFactory) -> str:
    return make_checkpoint("qwen3_moe", str(tmp_path_factory.mktemp("fuzz") / "qwen3_moe"), seed=CHECKPOINT_SEED)


@pytest.fixture(scope="package")
def fuzz_cluster(fuzz_model: str) -> Iterator[Cluster]:
    lb_args = ("--request-timeout", str(REQUEST_DEADLINE_S))
    with pd_cluster(fuzz_model, 1, 1, instance_args=INSTANCE_ARGS, lb_args=lb_args) as cluster:
        yield cluster


@pytest.fixture(scope="package")
def oracle(fuzz_model: str) -> Oracle:
    return Oracle(fuzz_model)


@pytest.fixture
def watch(fuzz_cluster: Cluster, oracle: Oracle) -> Watch:
    return Watch(fuzz_cluster, oracle)
