"""Prompt forwards replayed from piecewise CUDA graphs against the same engine run eagerly.

The oracle is the eager forward of the same engine (no piecewise graphs): in fp32 the greedy tokens are identical
with prompt steps of every size between the captured sizes (padding tokens), chunked prompts and prompt chunks
mixed with decode tokens. The replay makes no host sync. On CPU (CI) the bookkeeping (sizes, static inputs,
padding into the sink slot, the split at each attention call, the shared buffers, the attention's output written in
place) runs uncaptured, with the Triton kernels in Triton's interpreter: with the fused KV store (the rotary kernel
writes K and V, the attention only reads them) and without (the attention stores what the piece copied out).
"""

from __future__ import annotations

import contextlib
import importlib.util

import pytest
import torch

from pd.engine import compile_watch
from pd.engine.llm import LLM
from pd.server_args import ServerArgs, default_piecewise_tokens
from tests.test_cuda_graphs import forward_without_sync, greedy_workload
from tests.tiny_checkpoints import make_checkpoint


def test_default_sizes_pad_at_most_an_eighth_past_512_tokens():
    sizes = default_piecewise_tokens(8192)
    assert sizes[:3] == (64, 128, 192) and sizes[-1] == 8192 and len(set(sizes)) == len(sizes)
    assert sizes == tuple(sorted(sizes))
    for n in range(1, 8193):
        padded = min(s for s in sizes if s >= n)
        assert padded - n < 64 or (padded - n) / n <= 0.125 + 1e-9, (n, padded)
    assert default_piecewise_tokens(100) == (64, 100)
    assert default_piecewise_tokens(30) == (30,)


def test_flags_resolve_like_sglang():
    from types import SimpleNamespace

    from pd.server_args import ServerArgsError, resolve_piecewise_tokens

    assert ServerArgs(model_path="m", device="cpu").piecewise_cuda_graph_tokens == (), "graphs only on CUDA"

    def flags(**given: object) -> SimpleNamespace:  # ServerArgs' fields before resolution
        base = {"disable_piecewise_cuda_graph": False, "piecewise_cuda_graph_tokens": None,
                "piecewise_cuda_graph_max_tokens": None}  # fmt: skip
        return SimpleNamespace(**{**base, **given})

    assert resolve_piecewise_tokens(flags(), "cuda", 1024) == default_piecewise_tokens(1024)  # the chunk size
    assert resolve_piecewise_tokens(flags(), "cuda", -1)[-1] == 4096
    assert resolve_piecewise_tokens(flags(piecewise_cuda_graph_max_tokens=300), "cuda", 1024)[-1] == 300
    assert resolve_piecewise_tokens(flags(piecewise_cuda_graph_tokens=(512, 8, 512)), "cuda", 1024) == (8, 512)
    assert resolve_piecewise_tokens(flags(disable_piecewise_cuda_graph=True), "cuda", 1024) == ()
    assert resolve_piecewise_tokens(flags(), "cpu", 1024) == ()
    parsed = ServerArgs.from_cli(["--model-path", "m", "--device", "cpu", "--piecewise-cuda-graph-tokens", "64", "8",
                                  "--piecewise-cuda-graph-max-tokens", "64", "--disable-piecewise-cuda-graph"])
    assert parsed.disable_piecewise_cuda_graph and parsed.piecewise_cuda_graph_max_tokens == 64
    with pytest.raises(ServerArgsError, match="--piecewise-cuda-graph-tokens"):
        ServerArgs(model_path="m", device="cpu", piecewise_cuda_graph_tokens=(0, 64))
    with pytest.raises(ServerArgsError, match="--piecewise-cuda-graph-max-tokens"):
        ServerArgs(model_path="m", device="cpu", piecewise_cuda_graph_max_tokens=0)


def piecewise_equal_eager(arch: str, root: str, device: str, fused: bool, num_prompts: int, max_prompt: int,
                          max_new: int, sizes: tuple[int, ...]) -> None:  # fmt: skip
    """Greedy tokens with prompt steps run through piecewise graphs of ``sizes`` (on CPU uncaptured) equal the
    eager engine's, in fp32. Decode batches replay their CUDA graphs on the GPU in both runs."""
    from pd.layers import fused_kernels

    seed, path, prompts, params = greedy_workload(arch, root, device, num_prompts, max_prompt, max_new)
    chunk = sizes[-1]
    outs, replayed = {}, 0
    fused_ctx = fused_kernels.on_cpu() if device == "cpu" and fused else contextlib.nullcontext()
    with fused_ctx:
        for piecewise in (True, False):
            llm = LLM(path, device=device, dtype=torch.float32, page_size=16, chunked_prefill_size=chunk,
                      max_running_requests=16, max_total_tokens=8192, attention_backend="triton",
                      moe_runner="triton", piecewise_tokens=sizes if piecewise else (),
                      cuda_graph_bs=None if device == "cuda" else ())  # fmt: skip
            graphs = llm.runner.prompt_graphs
            assert (graphs is not None) == piecewise
            if graphs is not None:
                assert graphs.sizes == sizes and (device == "cpu") == (not graphs.pieces)
                run = graphs.forward

                def counted(batch, run=run, graphs=graphs):  # noqa: ANN001, ANN202
                    nonlocal replayed
                    replayed += 1
                    # every real token's inputs are in the static buffers, padding after them
                    hidden = run(batch)
                    n = batch.num_tokens
                    size = min(s for s in sizes if s >= n)
                    assert torch.equal(graphs.input_ids[:n], batch.input_ids)
                    assert torch.equal(graphs.out_loc[:n], batch.layout.out_loc)
                    assert (graphs.input_ids[n:size] == 0).all() and (graphs.positions[n:size] == 0).all()
                    assert (graphs.out_loc[n:size] == graphs.pad_slot).all()
                    return hidden

                graphs.forward = counted
            late = compile_watch.compiles_after_warm_up
            outs[piecewise] = llm.generate(prompts, params)
            if piecewise and device == "cuda":
                assert compile_watch.compiles_after_warm_up == late, "a kernel variant compiled after the warm-up"
            if graphs is not None:  # MLA's prompt form was captured: decode-like batches must not replay it
                assert graphs.expands == arch.startswith("deepseek")
            del llm
    assert replayed > 0, "no forward went through the piecewise graphs"
    assert outs[True] == outs[False], f"seed {seed}"


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")
@pytest.mark.parametrize(("arch", "fused"), [("qwen3_moe", True), ("deepseek_v3", False)])
def test_piecewise_bookkeeping_uncaptured_on_cpu_gives_the_eager_tokens(arch, fused, tmp_path, interpreter):
    interpreter.run(__name__, "piecewise_equal_eager", arch, str(tmp_path), "cpu", fused, 3, 40, 3, (8, 24, 32))


@pytest.mark.gpu
@pytest.mark.parametrize("arch", ["llama", "mixtral", "qwen3_moe", "deepseek_v3"])
def test_piecewise_replay_gives_the_eager_greedy_tokens(arch, tmp_path, gpu_fp32_clean):
    piecewise_equal_eager(arch, str(tmp_path), "cuda", True, 13, 200, 20, (16, 48, 64, 128, 192, 256))


@pytest.mark.gpu
@pytest.mark.parametrize("arch", ["qwen3_moe", "deepseek_v3"])
def test_piecewise_replay_makes_no_host_sync(arch, tmp_path, gpu_fp32_clean):
    path = make_checkpoint(arch, str(tmp_path / arch), seed=0)
    llm = LLM(path, device="cuda", dtype=torch.bfloat16, page_size=16, max_running_requests=8, max_total_tokens=4096,
              chunked_prefill_size=256)  # fmt: skip
    runner, sched = llm.runner, llm.scheduler
    assert runner.prompt_graphs is not None and runner.prompt_graphs.pieces
    rows, lens = [], (37, 150, 9)
    for n in lens:
        row = sched.slots.alloc_row()
        sched.slots.assign_pages(row, 0, sched.pool.alloc(sched._pages_for(n + 4)))
        rows.append(row)
    batch = runner.build_batch(list(range(sum(lens))), rows, [0, 0, 0], list(lens), sched.slots)
    logits = forward_without_sync(runner, batch)
    assert logits.shape[0] == 3 and torch.isfinite(logits).all()


def test_weak_alias_reads_the_memory_without_keeping_it():
    """The attention's inputs inside a capture are held as aliases (pd.engine.piecewise_graphs.weak_alias): the
    same memory, dtype, shape, strides and offset as the tensor (any strided view), and the tensor's memory is not
    kept by the alias (its storage's reference count does not move)."""
    from pd.engine.piecewise_graphs import weak_alias

    gen = torch.Generator().manual_seed(int(torch.randint(0, 2**31, ())))
    for _ in range(20):
        rows, cols = (int(n) for n in torch.randint(2, 40, (2,), generator=gen))
        base = torch.randn(rows, cols, generator=gen).to(torch.bfloat16)
        r0, c0 = (int(torch.randint(0, n - 1, (), generator=gen)) for n in (rows, cols))
        view = base[r0:, c0:]
        if torch.rand((), generator=gen) < 0.5:
            view = view.transpose(0, 1)
        owners = torch._C._storage_Use_Count(base.untyped_storage()._cdata)
        alias = weak_alias(view)
        assert torch._C._storage_Use_Count(base.untyped_storage()._cdata) == owners
        assert (alias.dtype, alias.shape, alias.stride()) == (view.dtype, view.shape, view.stride())
        assert alias.data_ptr() == view.data_ptr() and torch.equal(alias, view)
        base.mul_(-2)  # a later write to the memory (a replay) is what the alias reads
        assert torch.equal(alias, view)
