"""Shared pytest hooks."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from tests.interpreter_child import InterpreterChild
    from tests.test_pd_e2e import Reference


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Skip tests marked `gpu` on machines without CUDA (CI), so they show as skipped, not failed."""
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


@pytest.fixture(scope="module")
def interpreter() -> Iterator[InterpreterChild]:
    """A Python with Triton's CPU interpreter on, shared by a module's kernel checks (tests.interpreter_child)."""
    from tests.interpreter_child import InterpreterChild

    with InterpreterChild() as child:
        yield child


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
