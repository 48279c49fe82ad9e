"""A scheduler factory for served tests: the real scheduler over a runner whose forward stands in for the device,
answering zero logits at once, except a forward of exactly SLOW_TOKENS tokens, which takes SLOW_S seconds (a long
prompt forward on a large model). A module of its own: an instance's rank processes import the factory by name."""

from __future__ import annotations

import time
from typing import Any

import torch

SLOW_TOKENS = 333  # no warm-up forward has this size (they are powers of two, one less, and budget fractions)
SLOW_S = 3.0


def slow_forward_scheduler(cfg: Any, runner: Any, disagg: Any = None) -> Any:
    from pd.engine.scheduler import Scheduler

    vocab = runner.model.config.vocab_size

    def forward(batch: Any, logits: bool = True, eager: bool = False) -> torch.Tensor:
        if batch.num_tokens == SLOW_TOKENS:
            time.sleep(SLOW_S)
        return torch.zeros(int(batch.logits_index.shape[0]), vocab)

    runner.forward = forward
    return Scheduler(cfg, runner)
