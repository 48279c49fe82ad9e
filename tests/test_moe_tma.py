"""The fused-MoE GEMM reading its weight tiles through a tensor descriptor (TMA on Hopper, ``tma=True``) against the
same GEMM through pointers, on fresh random inputs: equal bits (the same tiles reach the same dots), bf16 and block
FP8, over a K whose last tile is partial, an N that is not a multiple of the column block (the last block reads the
next expert's rows, or past the last expert, and must not store them) and rows without a local slot. Small shapes
under Triton's CPU interpreter in CI; Qwen3-30B-A3B shapes on a GPU."""

from __future__ import annotations

import importlib.util

import pytest
import torch

from tests.interpreter_child import InterpreterChild
from tests.test_moe_triton import make_case

needs_triton = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")


def check_descriptor_equals_pointers(device: str, seed: int) -> None:
    from pd.moe.runner.fused_moe_kernel import BlockFp8, invoke_fused_moe_gemm
    from pd.moe.runner.moe_align import align_pairs_to_blocks
    from pd.quant.fp8 import block_quant
    from pd.quant.fp8 import token_group_quant as quant

    # interpreter: small blocks; GPU: fp8 dots need k-steps of 32 and more, so checkpoints' 128x128 blocks
    cases = (((9, 2, 4, 80, 48), (16, 32, 32), (16, 16)), ((21, 3, 6, 72, 40), (16, 64, 32), (16, 16)))
    if device != "cpu":
        cases = (((64, 8, 128, 2048, 768), (16, 128, 128), (128, 128)),
                 ((1024, 8, 128, 2048, 768), (64, 128, 128), (128, 128)),
                 ((300, 4, 8, 640, 320), (64, 64, 128), (128, 128)))  # fmt: skip
    for i, ((tokens, top_k, experts, hidden, inter), (bm, bn, bk), block) in enumerate(cases):
        for fp8 in (False, True):
            # an FP8 k-step is one scale group or part of one
            config = {"BLOCK_SIZE_M": bm, "BLOCK_SIZE_N": bn, "BLOCK_SIZE_K": min(bk, block[1]) if fp8 else bk,
                      "GROUP_SIZE_M": 2, "num_warps": 4, "num_stages": 3}  # fmt: skip
            dispatched, w13, _ = make_case(seed + i, tokens, top_k, experts, torch.bfloat16, hidden, inter,
                                           foreign=0.3, device=device)  # fmt: skip
            x = dispatched.hidden_states
            aligned = align_pairs_to_blocks(dispatched.topk_ids, experts, bm)
            blocks = (aligned.sorted_ids, aligned.expert_of_block, aligned.num_rows_post_pad)
            # N = 2 * inter + 8: not a multiple of the column block, the gate/up split off a scale block's edge
            w = torch.cat([w13, w13[:, :8]], dim=1).contiguous()
            scales = None
            if fp8:
                pairs = [block_quant(w[e].float(), block) for e in range(experts)]
                w = torch.stack([q for q, _ in pairs])
                a, a_scale = quant(x, block[1])
                scales = BlockFp8(a_scale, torch.stack([s for _, s in pairs]), block, w.shape[1])
            else:
                a = x
            outs = []
            for tma in (False, True):
                c = torch.full((tokens * top_k, w.shape[1]), float("nan"), dtype=torch.bfloat16, device=device)
                invoke_fused_moe_gemm(a, w, c, *blocks, top_k, False, config, fp8=scales, tma=tma)
                outs.append(c.cpu())
            where = (tokens, top_k, experts, hidden, inter, fp8)
            assert torch.equal(outs[0].isnan(), outs[1].isnan()), where  # the same rows written, no others
            assert torch.equal(outs[0].nan_to_num(), outs[1].nan_to_num()), where
            assert outs[1].nan_to_num().abs().sum() > 0, where


@needs_triton
def test_weight_descriptor_equals_pointers_in_interpreter(interpreter: InterpreterChild) -> None:
    interpreter.run(__name__, "check_descriptor_equals_pointers", "cpu", int(torch.randint(0, 2**62, ())))


@pytest.mark.gpu
def test_weight_descriptor_equals_pointers_on_the_gpu() -> None:
    check_descriptor_equals_pointers("cuda", int(torch.randint(0, 2**62, ())))


def test_pd_moe_tma_takes_0_or_1_and_cpu_tensors_read_through_pointers(monkeypatch: pytest.MonkeyPatch) -> None:
    from pd.moe.runner.fused_moe_kernel import weight_descriptor_wanted

    cpu = torch.device("cpu")
    for value in ("0", "1"):
        monkeypatch.setenv("PD_MOE_TMA", value)
        assert weight_descriptor_wanted(cpu) is False  # no TMA off a GPU, whatever the setting
    monkeypatch.setenv("PD_MOE_TMA", "yes")
    with pytest.raises(ValueError, match="PD_MOE_TMA='yes': expected 0 or 1"):
        weight_descriptor_wanted(cpu)
