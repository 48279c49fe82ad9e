"""The whole model through `--attention-backend triton` against the torch backend (the SDPA reference).

On CPU the Triton kernels run in Triton's interpreter, in a child Python (TRITON_INTERPRET=1 must be set before
Triton is imported), on tiny random checkpoints of each attention kind: GQA (Llama, Qwen3-MoE with q/k norm and
head_dim != hidden/heads) and MLA (DeepSeek-V3, latent attention). There the triton engine runs every kernel a GPU
runs (pd.layers.fused_kernels.on_cpu: fused norms and residual adds, rotary with the q/k norms and the KV store, the
fused router, q/k/v as one GEMM, the Triton MoE runner) against the torch engine's reference code. Prompts longer
than the chunked-prefill size make chunks that extend a cached prefix, and continuous batching mixes them with decode
tokens in one batch.
The GPU tests run every architecture in fp32 (same greedy tokens, logits within 1e-4) and bf16 (logits within
bf16 tolerance), and check that a decode step launches no SDPA/cuDNN kernel and gathers no context.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import secrets

import pytest
import torch

from pd.engine.io import SamplingParams
from pd.engine.llm import LLM
from pd.layers import fused_kernels
from tests.tiny_checkpoints import make_checkpoint
from tests.triton_interpreter import patch_interpreter

needs_triton = pytest.mark.skipif(importlib.util.find_spec("triton") is None,
                                  reason="triton is not installed (the test extra installs it)")


def _prompts(seed: int, lengths: tuple[int, ...]) -> list[list[int]]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 256, (n,), generator=gen).tolist() for n in lengths]


def compare_backends(path: str, device: str, dtype: torch.dtype, page_size: int, seed: int, lengths: tuple[int, ...],
                     new_tokens: int, chunk: int, interpreted: bool = False) -> None:  # fmt: skip
    """Prefill logits and greedy continuations of both backends on the same checkpoint and prompts. fp32: logits
    within 1e-4 and the same tokens. bf16: the triton backend's logits are as close to the fp32 reference as the
    torch backend's own bf16 logits are (a token whose router sits on a near-tie may pick another expert in bf16
    on either side, so two bf16 runs are compared through the fp32 truth, not with each other)."""
    prompts = _prompts(seed, lengths)

    def kernels(name: str) -> contextlib.AbstractContextManager[None]:
        """Interpreted: the triton engine runs the GPU's fused kernels too, the torch engine the reference code."""
        return fused_kernels.on_cpu() if interpreted and name == "triton" else contextlib.nullcontext()

    def engine(name: str, dt: torch.dtype) -> LLM:
        with kernels(name):
            return LLM(path, device=device, dtype=dt, page_size=page_size, chunked_prefill_size=chunk,
                       max_total_tokens=4096, attention_backend=name,
                       moe_runner="triton" if interpreted and name == "triton" else "auto")  # fmt: skip

    def prefill_logits(name: str, ids: list[int]) -> torch.Tensor:
        with kernels(name):
            return engines[name].prefill_logits(ids)

    engines = {name: engine(name, dtype) for name in ("torch", "triton")}
    truth = engine("torch", torch.float32) if dtype != torch.float32 else None
    for ids in prompts[:2]:
        ref, got = (prefill_logits(n, ids) for n in ("torch", "triton"))
        if truth is None:
            torch.testing.assert_close(got, ref, atol=1e-4, rtol=0, msg=f"seed {seed}")
        else:
            # The median over positions of each position's relative error: a router near-tie flipped in bf16 moves
            # a few positions a lot (and differs between the two runs by chance), an attention bug moves them all.
            exact = truth.prefill_logits(ids)
            err, ref_err = (((x - exact).norm(dim=-1) / exact.norm(dim=-1)).median().item() for x in (got, ref))
            assert err <= 1.5 * ref_err + 1e-2, f"seed {seed}: relative error {err} vs the torch backend's {ref_err}"
    if dtype == torch.float32:
        sp = SamplingParams(max_new_tokens=new_tokens, temperature=0.0)
        with kernels("triton"):
            got_out = engines["triton"].generate(prompts, sp)
        ref_out = engines["torch"].generate(prompts, sp)
        assert got_out == ref_out, f"seed {seed}"


# ---- CPU: the kernels in Triton's interpreter (CI) ----
CPU_CASES = [("llama", 4), ("qwen3_moe", 1), ("deepseek_v3", 16)]


def _interpreted_case(case: int, tmp: str) -> None:
    """Runs in the child: one CPU_CASES entry, fp32, through both backends."""
    assert os.environ.get("TRITON_INTERPRET") == "1"
    patch_interpreter()
    arch, page_size = CPU_CASES[case]
    seed = secrets.randbelow(2**31)
    path = make_checkpoint(arch, os.path.join(tmp, arch), seed=seed)
    compare_backends(path, "cpu", torch.float32, page_size, seed, lengths=(21, 5, 9), new_tokens=6, chunk=8,
                     interpreted=True)


@needs_triton
@pytest.mark.parametrize("case", range(len(CPU_CASES)), ids=[f"{a}-page{p}" for a, p in CPU_CASES])
def test_triton_backend_equals_torch_backend_in_the_interpreter(case, tmp_path, interpreter):
    interpreter.run(__name__, "_interpreted_case", case, str(tmp_path))


# ---- GPU ----
GPU_ARCHS = ["llama", "mixtral", "qwen2_moe", "qwen3_moe", "deepseek_v2", "deepseek_v3"]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("page_size", [1, 16, 64])
@pytest.mark.parametrize("arch", GPU_ARCHS)
def test_triton_backend_equals_torch_backend_on_cuda(arch, page_size, dtype, tmp_path, gpu_fp32_clean):
    seed = secrets.randbelow(2**31)
    path = make_checkpoint(arch, str(tmp_path / arch), seed=seed)
    compare_backends(path, "cuda", dtype, page_size, seed, lengths=(300, 5, 77, 130), new_tokens=24, chunk=64)


@pytest.mark.gpu
@pytest.mark.parametrize("arch", ["qwen3_moe", "deepseek_v3"])
def test_decode_step_runs_no_sdpa_and_no_context_gather(arch, tmp_path, gpu_fp32_clean, monkeypatch):
    """One decode step of a 16-request batch: no SDPA call and no KV gather (both made to raise), and the
    profile shows no SDPA/cuDNN/flash kernel."""
    import torch.nn.functional as F
    from torch.profiler import ProfilerActivity, profile

    from pd.engine.kv_cache import KVCache

    path = make_checkpoint(arch, str(tmp_path / arch), seed=0)
    llm = LLM(path, device="cuda", dtype=torch.bfloat16, page_size=16, max_total_tokens=8192)
    sched = llm.scheduler
    prompts = _prompts(0, (40,) * 16)
    llm.generate(prompts, SamplingParams(max_new_tokens=2, temperature=0.0))  # warm-up: kernels compiled
    rows, pages_used = [], []
    for ids in prompts:
        pages = sched.pool.alloc(sched._pages_for(len(ids) + 1))
        row = sched.slots.alloc_row()
        sched.slots.assign_pages(row, 0, pages)
        rows.append(row)
        pages_used.append(pages)
        llm.runner.forward(llm.runner.build_batch(ids, [row], [0], [len(ids)], sched.slots))
    batch = llm.runner.build_batch([1] * 16, rows, [len(p) for p in prompts], [1] * 16, sched.slots)
    torch.cuda.synchronize()

    def forbidden(*args, **kwargs):
        raise AssertionError("called in a decode step")

    monkeypatch.setattr(F, "scaled_dot_product_attention", forbidden)
    monkeypatch.setattr(KVCache, "gather", forbidden)
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        llm.runner.forward(batch)
        torch.cuda.synchronize()
    names = [e.name for e in prof.events()]
    bad = [n for n in names if any(w in n.lower() for w in ("scaled_dot_product", "cudnn", "flash_attention",
                                                            "efficient_attention"))]  # fmt: skip
    assert not bad, sorted(set(bad))
    assert any("decode" in n.lower() for n in names), sorted(set(names))[:80]
    for row, pages in zip(rows, pages_used, strict=True):
        sched.pool.free(pages)
        sched.slots.free_row(row)


# ---- PD: prefill on the torch code, decode on the Triton kernels (CPU; the Triton side in the interpreter) ----
@needs_triton
def test_pd_with_triton_attention_and_moe_runner_on_the_decode_side_equals_pd_serve(pd_references, monkeypatch):
    """KV written by the torch backend on the prefill instance and read in place by the Triton attention kernels on
    the decode instance, whose experts run through the Triton MoE runner (the other way round differs only in which
    kernels read the same pages: both backends store KV with the same code)."""
    from tests.test_pd_e2e import _pd_equals_pd_serve

    reference = pd_references("deepseek_v3")  # made (if not yet) before the variables below are set
    # Only the instance given the Triton flags imports Triton; the variable lets it run on the CPU, and the site
    # directory applies the interpreter's fixes (tests/triton_interpreter.py) in that server process.
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    site = os.path.join(os.path.dirname(os.path.abspath(__file__)), "interpreter_site")
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [site, os.environ.get("PYTHONPATH")])))
    decode = ("--attention-backend", "triton", "--moe-runner-backend", "triton")
    with _pd_equals_pd_serve(reference, 4, 4, 1, 1, decode_args=decode):
        pass


# ---- the flag ----
def test_attention_backend_flag_resolution_and_refusals(monkeypatch):
    import pd.server_args as sa
    from tests.test_server_args import parse

    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert parse("").attention_backend == "torch"  # auto on CPU
    monkeypatch.setattr(sa, "_cuda_available", lambda: True)
    assert parse("--device cuda").attention_backend == "triton"  # auto on CUDA
    assert parse("--device cuda --attention-backend torch").attention_backend == "torch"
    with pytest.raises(sa.ServerArgsError, match="--attention-backend triton requires --device cuda"):
        parse("--attention-backend triton")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert parse("--attention-backend triton").attention_backend == "triton"
    for name in ("fa3", "flashinfer", "flashmla"):
        with pytest.raises(sa.ServerArgsError, match=f"--attention-backend {name} .*not implemented yet"):
            parse(f"--device cuda --attention-backend {name}")


def test_unknown_attention_backend_name_is_rejected():
    from pd.attention import backend_names, get_backend

    assert set(backend_names()) == {"torch", "triton"}
    with pytest.raises(ValueError, match="unknown attention backend 'fa3'"):
        get_backend("fa3")


@pytest.mark.gpu
@pytest.mark.parametrize("arch", ["qwen3_moe", "deepseek_v3"])
def test_decode_forward_replayed_from_a_cuda_graph_equals_eager(arch, tmp_path, gpu_fp32_clean):
    """The backend's graph hooks: a decode forward captured once for 8 requests over the static state, then
    replayed for 5 real requests at new lengths, gives the eager forward's logits."""
    from pd.engine.forward_batch import BatchLayout, ForwardBatch

    path = make_checkpoint(arch, str(tmp_path / arch), seed=1)
    # The engine's own graph runners stay off: this test drives the backend's hooks by hand (and a piecewise
    # replay inside its capture would be a graph launched while capturing).
    llm = LLM(path, device="cuda", dtype=torch.float32, page_size=16, max_total_tokens=8192, cuda_graph_bs=(),
              piecewise_tokens=())
    runner, sched = llm.runner, llm.scheduler
    backend, cache, device = runner.attn_backend, runner.kv_cache, runner.device
    prompts = _prompts(1, (30, 7, 51, 16, 3))
    rows = []
    for ids in prompts:
        row = sched.slots.alloc_row()
        sched.slots.assign_pages(row, 0, sched.pool.alloc(sched._pages_for(len(ids) + 8)))
        runner.forward(runner.build_batch(ids, [row], [0], [len(ids)], sched.slots))
        rows.append(row)
    pad_slot = sched.pool.alloc(1)[0] * cache.page_size  # where padding requests write their KV

    bs = 8
    backend.init_graph_state(bs, cache, max_context_len=4096)
    ids_s, pos_s = (torch.zeros(bs, dtype=torch.int64, device=device) for _ in range(2))
    loc_s = torch.full((bs,), pad_slot, dtype=torch.int64, device=device)
    i32 = torch.zeros(bs, dtype=torch.int32, device=device)
    layout_s = BatchLayout(rows=i32, prefix_lens=i32, extend_lens=i32 + 1, q_starts=i32, out_loc=loc_s,
                           page_table=sched.slots, host_prefix_lens=[0] * bs, host_extend_lens=[1] * bs)
    static = ForwardBatch(input_ids=ids_s, positions=pos_s, layout=layout_s, kv_cache=cache,
                          logits_index=torch.arange(bs, device=device), attn_backend=backend,
                          attn_meta=backend.capture_meta(bs, layout_s))
    backend.replay_prepare(bs, runner.build_batch([0] * 5, rows, [len(p) for p in prompts], [1] * 5,
                                                  sched.slots).layout)
    runner.forward(static)  # warm-up: Triton compiles outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        logits_s = runner.forward(static)

    lens = [len(p) for p in prompts]
    for step in range(3):
        new = torch.randint(0, 256, (5,)).tolist()
        eager = runner.build_batch(new, rows, lens, [1] * 5, sched.slots)
        ids_s[:5].copy_(eager.input_ids)
        pos_s[:5].copy_(eager.positions)
        loc_s[:5].copy_(eager.layout.out_loc)
        backend.replay_prepare(bs, eager.layout)
        graph.replay()
        replayed = logits_s[:5].clone()
        expected = runner.forward(eager)
        torch.testing.assert_close(replayed, expected, atol=1e-4, rtol=0, msg=f"step {step}")
        lens = [n + 1 for n in lens]


@needs_triton
def test_fused_kernels_switch_off_by_environment():
    """PD_FUSED_KERNELS=0 sends CUDA tensors to the reference code (checked in a fresh interpreter: the module
    reads the variable once)."""
    import subprocess
    import sys

    probe = "import torch; from pd.layers import fused_kernels as f; print(f.enabled_on(torch.device('cuda')))"
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    for value, expected in (("0", "False"), ("1", "True")):
        env = {**os.environ, "PD_FUSED_KERNELS": value, "PYTHONPATH": root}
        out = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True, check=True)
        assert out.stdout.strip() == expected, (value, out.stdout, out.stderr)
