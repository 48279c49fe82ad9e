"""Shared pytest hooks."""

from __future__ import annotations

import os
import secrets
import zlib
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from tests.interpreter_child import InterpreterChild
    from tests.test_pd_e2e import Reference


# Decode holds the pages of a transfer that failed in flight this long before reusing them (decode/scheduler.py);
# 15 s in production, where a transfer call may still be writing; loopback copies of a few pages are done far sooner,
# and fault tests wait out the quarantine. Set before any test imports decode.scheduler, inherited by servers.
os.environ.setdefault("PD_KV_QUARANTINE_S", "5")

# torch's global generator starts from the same seed in every process, so tests that draw their inputs (or their
# checkpoint seeds) from it would see the same "random" values on every run: seed it freshly, and say with what.
TORCH_SEED = int(os.environ.get("PD_TEST_SEED") or secrets.randbelow(2**63))


def pytest_configure(config: pytest.Config) -> None:
    import torch

    # pytest-xdist's marker (tests/conftest.py groups the PD tests), known also in a run without the plugin
    config.addinivalue_line("markers", "xdist_group(name): tests of one group run on one xdist worker")

    torch.manual_seed(TORCH_SEED)  # for module- and session-scoped fixtures, which run before the per-test seed


def pytest_report_header(config: pytest.Config) -> str:
    return f"torch global seed {TORCH_SEED} (PD_TEST_SEED={TORCH_SEED} repeats this run's draws)"


@pytest.fixture(autouse=True)
def _fresh_torch_seed(request: pytest.FixtureRequest) -> None:
    """Each test draws from the global generator seeded from the run's seed and its own name: fresh every run,
    repeatable with PD_TEST_SEED, and independent of which tests ran before it."""
    import torch

    torch.manual_seed((TORCH_SEED + zlib.crc32(request.node.nodeid.encode())) % 2**63)


# Modules whose tests run PD deployments or Mooncake transfer engines (with the tests that use pd_references). Under
# pytest-xdist (CI: -n 2 --dist loadgroup) they share one group, so they run one after another on one worker, never
# two deployments at once: the one failure seen with two workers (a PD answer that was not the unified server's, in
# test_fp8_kv_cache.py) came with two PD clusters and their transfer engines on the machine at the same time.
KV_TRANSFER_MODULES = frozenset({
    "test_control_plane_auth.py", "test_first_hour.py", "test_fp8_kv_cache.py", "test_kv_cached_prefix.py",
    "test_kv_heads.py", "test_kvtransfer.py", "test_pd_e2e.py", "test_pd_faults.py", "test_pd_gpu.py",
    "test_pd_kv_heads.py", "test_pd_prefix_cache.py", "test_pd_rooms.py", "test_pd_tp_kv.py", "test_pd_up.py",
    "test_control.py", "test_http.py", "test_mixed_load.py",
})  # fmt: skip


@pytest.hookimpl(tryfirst=True)  # before xdist's own hook, which reads the groups
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Group the PD / KV-transfer tests for pytest-xdist (above); skip tests marked `gpu` on machines without CUDA
    (CI), so they show as skipped, not failed."""
    for item in items:
        if item.path.name in KV_TRANSFER_MODULES or "pd_references" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.xdist_group("kv_transfer"))
    if not any(item.get_closest_marker("gpu") for item in items):
        return
    import torch  # only when a gpu test was collected; keeps CPU-only collection light

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (not available on this machine)")
    for item in items:
        if item.get_closest_marker("gpu"):
            item.add_marker(skip)


@pytest.fixture
def gpu_fp32_clean() -> Iterator[None]:
    """For GPU tests comparing two engines: exact fp32 matmuls (no TF32), and the GPU memory the test's engines
    cached handed back afterwards (the next engine sizes its KV cache from free memory)."""
    import gc

    import torch

    torch.backends.cuda.matmul.allow_tf32 = False
    yield
    gc.collect()
    torch.cuda.empty_cache()


@pytest.fixture(scope="session")
def _interpreter_children() -> Iterator[list[InterpreterChild]]:
    children: list[InterpreterChild] = []
    yield children
    for child in children:
        child.close()


@pytest.fixture(scope="module")
def interpreter(_interpreter_children: list[InterpreterChild]) -> InterpreterChild:
    """A Python with Triton's CPU interpreter on, running kernel checks (tests.interpreter_child). One serves the
    whole run (each start costs an interpreter, torch and Triton); a module after one whose check killed it, or ran
    past its time, gets a fresh one."""
    from tests.interpreter_child import InterpreterChild

    if not _interpreter_children or not _interpreter_children[-1].alive:
        _interpreter_children.append(InterpreterChild())
    return _interpreter_children[-1]


@pytest.fixture(scope="session")
def pd_references(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], Reference]:
    """arch -> tests.test_pd_e2e.Reference (a fresh checkpoint and one `pd serve`'s greedy answers), made on first
    use and shared by every PD test of the pytest run that compares against it."""
    from tests.test_pd_e2e import Reference

    made: dict[str, Reference] = {}

    def get(arch: str) -> Reference:
        if arch not in made:
            made[arch] = Reference(arch, str(tmp_path_factory.mktemp(f"pd-reference-{arch}")))
        return made[arch]

    return get
