"""A piecewise-graph capture that fails says what to do: out of GPU memory, which flags leave the forwards more room
(with the KV pool's flag and its value now); any other failure, how to run the prompt forwards eagerly. CPU: the
capture itself is replaced by one that raises what CUDA would."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from pd.engine.kv_cache import ReqToToken
from pd.engine.model_runner import RunnerConfig
from pd.engine.piecewise_graphs import PiecewiseGraphs


def _runner(**cfg: object) -> SimpleNamespace:
    config = RunnerConfig("m", "cuda", torch.bfloat16, 16, None, cfg.get("max_total_tokens"),  # type: ignore[arg-type]
                          cfg.get("mem_fraction_static"))  # type: ignore[arg-type]  # fmt: skip
    return SimpleNamespace(device=torch.device("cpu"), cfg=config)


@pytest.mark.parametrize(("cfg", "pool"), [({}, "--mem-fraction-static (now 0.85)"),
                                           ({"mem_fraction_static": 0.7}, "--mem-fraction-static (now 0.7)"),
                                           ({"max_total_tokens": 5000}, "--max-total-tokens (now 5000)")])  # fmt: skip
def test_out_of_memory_names_the_flags_that_leave_room(cfg: dict, pool: str, monkeypatch) -> None:
    def oom(self: PiecewiseGraphs) -> None:
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 576.00 MiB.")

    monkeypatch.setattr(PiecewiseGraphs, "_capture", oom)
    with pytest.raises(RuntimeError) as err:
        PiecewiseGraphs(_runner(**cfg), ReqToToken(4, 64, 16, torch.device("cpu")), (512, 16384), pad_slot=0)
    message = str(err.value)
    assert "CUDA out of memory" in message and f"lower {pool}" in message, message
    assert "a forward of 16384 tokens" in message and "--chunked-prefill-size" in message, message
    assert "--disable-piecewise-cuda-graph" in message


def test_another_failure_says_how_to_run_eagerly(monkeypatch) -> None:
    def host_sync(self: PiecewiseGraphs) -> None:
        raise RuntimeError("operation not permitted when stream is capturing")

    monkeypatch.setattr(PiecewiseGraphs, "_capture", host_sync)
    with pytest.raises(RuntimeError) as err:
        PiecewiseGraphs(_runner(), ReqToToken(4, 64, 16, torch.device("cpu")), (512,), pad_slot=0)
    message = str(err.value)
    assert "--disable-piecewise-cuda-graph" in message and "--mem-fraction-static" not in message, message
