"""Shared pytest hooks."""

from __future__ import annotations

from collections.abc import Iterator

import pytest


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
