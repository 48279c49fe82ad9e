"""The forward's dispatch mode is a field of the batch, chosen where the batch is built (issue: a captured graph and
the eager path must not disagree through shared state): prefill-bearing batches dispatch in normal mode, decode
batches in low_latency mode, and the DP-attention agreement overrides both."""

from __future__ import annotations

import torch

from pd.engine.llm import LLM
from pd.moe.layer import FusedMoE
from tests.tiny_checkpoints import make_checkpoint


def test_batch_mode_follows_the_batch_and_the_agreed_override(tmp_path):
    path = make_checkpoint("qwen3_moe", str(tmp_path / "q3"), seed=0)
    llm = LLM(path, device="cpu", dtype=torch.float32, page_size=4, max_total_tokens=512)
    runner, slots = llm.runner, llm.scheduler.slots
    rows = [slots.alloc_row(), slots.alloc_row()]
    for row in rows:
        slots.assign_pages(row, 0, llm.scheduler.pool.alloc(4))
    assert runner.build_batch([1, 2, 3], rows[:1], [0], [3], slots).moe_mode == "normal"
    assert runner.build_batch([1, 2], rows, [3, 5], [1, 1], slots).moe_mode == "low_latency"
    assert runner.build_batch([1, 2, 3], rows, [3, 5], [1, 2], slots).moe_mode == "normal"  # mixed
    runner.forced_mode = "normal"
    assert runner.build_batch([1, 2], rows, [3, 5], [1, 1], slots).moe_mode == "normal"


def test_each_moe_layer_picks_the_dispatcher_of_the_mode_it_is_given():
    class Marker:
        def __init__(self, name: str) -> None:
            self.name = name

    layer = FusedMoE.__new__(FusedMoE)
    torch.nn.Module.__init__(layer)
    layer.dispatchers = {"normal": Marker("n"), "low_latency": Marker("ll")}
    assert layer.dispatcher("normal").name == "n" and layer.dispatcher("low_latency").name == "ll"
    layer.dispatchers = {"normal": Marker("only")}
    assert layer.dispatcher("low_latency").name == "only"  # one mode configured: the mode is ignored
