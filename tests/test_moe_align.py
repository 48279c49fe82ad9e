"""The one-launch alignment (pd.moe.runner.moe_align, up to BLOCK_T pairs) against a torch oracle and against the
four-launch path on the same ids, and the four-launch path over many tiles (prefill sizes) against the oracle: all
three outputs bit-identical, on fresh random ids with foreign slots (-1) and ids >= E mixed in, int64 and int32.
Triton's CPU interpreter in CI (tests/interpreter_child.py); CUDA with
``pytest.mark.gpu``. The outputs start out poisoned, so an equal result means every element was written."""

from __future__ import annotations

import importlib.util
import itertools
from unittest import mock

import pytest
import torch

from tests.interpreter_child import InterpreterChild

needs_triton = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")

SHAPES = {1: (1, 1), 8: (2, 4), 37: (37, 1), 64: (8, 8), 128: (16, 8), 129: (43, 3), 8200: (1025, 8),
          65536: (8192, 8)}  # N * K -> (N, K)
POISON = -7  # neither a pair index, the sentinel, an expert nor -1
NAMES = ("sorted_ids", "expert_of_block", "num_rows_post_pad")


def draw_ids(gen: torch.Generator, num_pairs: int, num_experts: int, dtype: torch.dtype) -> torch.Tensor:
    """Local ids, about a quarter of them -1 and a tenth out of range (E itself, just past it, or int32's max)."""
    ids = torch.randint(0, num_experts, (num_pairs,), generator=gen)
    draw = torch.rand(num_pairs, generator=gen)
    out_of_range = torch.tensor([num_experts, num_experts + 1, 2**31 - 1])
    ids = torch.where(draw < 0.1, out_of_range[torch.randint(0, 3, (num_pairs,), generator=gen)], ids)
    ids = torch.where((draw >= 0.1) & (draw < 0.35), -1, ids)
    return ids.view(SHAPES[num_pairs]).to(dtype)


def oracle(ids_NK: torch.Tensor, num_experts: int, block_m: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A stable sort of the pairs by expert, each expert's run padded with the sentinel to whole blocks, the
    sentinel past the runs; the expert of every block, -1 past the runs; the rows the runs use."""
    from pd.moe.runner.moe_align import max_padded_rows

    flat = ids_NK.flatten().long()
    sentinel = flat.numel()
    expert = torch.where((flat >= 0) & (flat < num_experts), flat, num_experts)  # skipped slots sort last
    order = torch.sort(expert, stable=True).indices
    counts = torch.bincount(expert, minlength=num_experts + 1)[:num_experts]
    padded = (counts + block_m - 1) // block_m * block_m
    runs = []
    for pairs, count, rows in zip(order[: int(counts.sum())].split(counts.tolist()), counts, padded, strict=True):
        runs += [pairs, torch.full((int(rows - count),), sentinel)]
    used = torch.cat(runs)
    max_rows = max_padded_rows(sentinel, num_experts, block_m)
    assert used.numel() <= max_rows
    sorted_ids = torch.cat([used, torch.full((max_rows - used.numel(),), sentinel)])
    blocks = torch.repeat_interleave(torch.arange(num_experts), padded // block_m)
    expert_of_block = torch.cat([blocks, torch.full((max_rows // block_m - blocks.numel(),), -1)])
    return sorted_ids.int(), expert_of_block.int(), torch.tensor([used.numel()], dtype=torch.int32)


def check(device: str, num_pairs: int, experts: tuple[int, ...], seed: int) -> None:
    from pd.moe.runner import moe_align

    empty = torch.empty

    def poisoned_empty(*args: object, **kwargs: object) -> torch.Tensor:
        # The outputs are allocated empty: poison them, so that an element no store reached cannot pass.
        return empty(*args, **kwargs).fill_(POISON)

    def outputs(aligned: moe_align.AlignedPairs) -> list[torch.Tensor]:
        return [t.cpu() for t in (aligned.sorted_ids, aligned.expert_of_block, aligned.num_rows_post_pad)]

    gen = torch.Generator().manual_seed(seed)
    for num_experts, block_m, dtype in itertools.product(experts, (16, 64), (torch.int64, torch.int32)):
        ids = draw_ids(gen, num_pairs, num_experts, dtype)
        case = (num_pairs, num_experts, block_m, dtype, ids.flatten().tolist())
        with mock.patch.object(torch, "empty", poisoned_empty):
            public = moe_align.align_pairs_to_blocks(ids.to(device), num_experts, block_m)
            one = outputs(moe_align._align(ids.to(device), num_experts, block_m, one_launch=True))
            four = outputs(moe_align._align(ids.to(device), num_experts, block_m, one_launch=False))
        assert public.num_pairs == num_pairs and public.block_m == block_m
        for name, got, want in zip(NAMES, one, oracle(ids, num_experts, block_m), strict=True):
            assert got.dtype == torch.int32 and torch.equal(got, want), (name, got.tolist(), want.tolist(), case)
        for name, got, want in zip(NAMES, one, four, strict=True):
            assert torch.equal(got, want), (name, got.tolist(), want.tolist(), case)
        assert all(torch.equal(a, b) for a, b in zip(outputs(public), one, strict=True)), case


def check_tiles(device: str, num_pairs: int, experts: tuple[int, ...], seed: int) -> None:
    """The four launches over many tiles (more tiles than the cumsum's CHUNK when num_pairs is large) against the
    oracle."""
    from pd.moe.runner import moe_align

    empty = torch.empty

    def poisoned_empty(*args: object, **kwargs: object) -> torch.Tensor:
        return empty(*args, **kwargs).fill_(POISON)

    gen = torch.Generator().manual_seed(seed)
    for num_experts, block_m, dtype in itertools.product(experts, (16, 128), (torch.int64, torch.int32)):
        ids = draw_ids(gen, num_pairs, num_experts, dtype)
        with mock.patch.object(torch, "empty", poisoned_empty):
            got = moe_align.align_pairs_to_blocks(ids.to(device), num_experts, block_m)
        outs = [t.cpu() for t in (got.sorted_ids, got.expert_of_block, got.num_rows_post_pad)]
        for name, out, want in zip(NAMES, outs, oracle(ids, num_experts, block_m), strict=True):
            assert torch.equal(out, want), (name, num_pairs, num_experts, block_m, dtype, seed)


@needs_triton
@pytest.mark.parametrize("num_pairs", [129, 8200])
def test_many_tile_alignment_equals_oracle_in_interpreter(num_pairs: int, interpreter: InterpreterChild) -> None:
    seed = int(torch.randint(0, 2**62, ()))
    interpreter.run(__name__, "check_tiles", "cpu", num_pairs, (1, 60, 257), seed, timeout_s=300)


@pytest.mark.gpu
@pytest.mark.parametrize("num_pairs", [129, 8200, 65536])
def test_gpu_many_tile_alignment_equals_oracle(num_pairs: int) -> None:
    check_tiles("cuda", num_pairs, (1, 128, 256), int(torch.randint(0, 2**62, ())))


@needs_triton
@pytest.mark.parametrize("num_pairs", [1, 8, 37, 128])
def test_one_launch_alignment_equals_oracle_and_four_launches_in_interpreter(
    num_pairs: int, interpreter: InterpreterChild
) -> None:
    seed = int(torch.randint(0, 2**62, ()))  # fresh each run (tests/conftest.py seeds the global generator)
    interpreter.run(__name__, "check", "cpu", num_pairs, (1, 4, 60, 128), seed, timeout_s=300)


@pytest.mark.gpu
@pytest.mark.parametrize("num_pairs", [8, 64, 128])
def test_gpu_one_launch_alignment_equals_oracle_and_four_launches(num_pairs: int) -> None:
    check("cuda", num_pairs, (128,), int(torch.randint(0, 2**62, ())))
