"""The serving benchmark's prefill roofline counts the matmul FLOPs that transformers' own forward performs, as
torch's FLOP counter sees them, on fresh random tiny checkpoints of both benchmark models."""

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from benchmarks.bench_gpu_serve import model_config
from benchmarks.prefill_roofline import prefill_flops


@pytest.mark.parametrize("name,layers", [("qwen3", 3), ("deepseek", 3), ("deepseek", 1)])
def test_prefill_flops_match_the_counted_transformers_forward(name: str, layers: int) -> None:
    from transformers import AutoModelForCausalLM

    config = model_config(name, layers, tiny=True)
    # Eager attention and experts: matmuls the counter sees (SDPA and grouped_mm are not counted); the same FLOPs.
    model = AutoModelForCausalLM.from_config(config, attn_implementation="eager", experts_implementation="eager")
    prompts, length = int(torch.randint(2, 5, ())), int(torch.randint(17, 60, ()))
    ids = torch.randint(1, config.vocab_size, (prompts, length))
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model.eval()(ids, logits_to_keep=1)
    # eager attention scores every query against every key of its prompt and masks afterwards
    assert prefill_flops(config, prompts, length, causal=False) == counter.get_total_flops()
    causal = prefill_flops(config, prompts, length)
    assert causal < counter.get_total_flops()  # the roofline counts the causal half only
