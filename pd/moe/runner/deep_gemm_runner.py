"""DeepGEMM MoE runner (``--moe-runner-backend deep_gemm``): the experts' GEMMs on DeepGEMM's bf16 grouped kernels.

Why: at prefill sizes the fused Triton kernel multiplies at ~78% of cuBLAS's rate on the same FLOPs (an H200 at the
DeepSeek-V3 shape, 16K tokens: ~600 against ~780 TFLOP/s), and neither torch's CUTLASS grouped GEMM nor a TMA read of
its A rows did better. DeepGEMM's Hopper kernels (TMA, warp-specialized producers, persistent CTAs) are what SGLang
runs there. They read A in expert order, each expert's rows a run padded to DeepGEMM's row alignment (128): the
"contiguous" layout; so the hidden rows are gathered into that order first. Measured on an H100 at that shape
(benchmarks/results/h100_2026-12-06): its bf16 grouped GEMMs ran at 488 (gate_up) and 520 (down) TFLOP/s on random
routing, 23.2 ms together, while the whole Triton runner took 23.5 ms; with the gather and the act-and-mul this runner
is the slower one there (on the same card DeepGEMM's dense bf16 GEMM of gate_up's FLOPs reached 760 TFLOP/s, cuBLAS
670). It stays an option, not the default.

Standard format, when the batch has at least ``min_pairs_per_expert`` local (token, slot) pairs per local expert on
average (prompt-sized batches; smaller ones, decode, go to the Triton runner, whose small row blocks waste less than
padding every hit expert to 128 rows):

1. align (pd.moe.runner.moe_align) at DeepGEMM's row alignment: the local pairs sorted by expert.
2. ``_gather_rows_kernel``: the hidden rows into that order [R, H]; each row's expert, -1 for a padding row (the
   grouped layout DeepGEMM reads: it skips a block whose first row is -1); each pair's row, for step 6. Padding
   rows of A are left unwritten: a GEMM row depends only on its own A row, and nothing reads those results.
3. gate_up: ``m_grouped_bf16_gemm_nt_contiguous`` -> [R, 2I].
4. act(gate) * up of the rows with an expert (pd.moe.runner.triton_runner.act_and_mul_rows) -> [R, I].
5. down: the same kernel -> [R, H].
6. per token, 0.0 plus weight * row for each of its local slots in ascending slot order, each product cast to the
   model dtype, summed in float32, one cast (triton_runner.sum_slots through each pair's row): the reference's
   arithmetic (pd.moe.runner.torch_ref) on the GEMMs' rows.

Batched format (low-latency dispatch: [E_local, max_rows, H] with counts on the device): ``m_grouped_bf16_gemm_nt_
masked`` for both GEMMs, act(gate) * up between (triton_runner.batched_act_and_mul); unweighted rows out, rows past
the counts unwritten, as the Triton runner's batched path.

No host sync; every shape follows the token count alone, so forwards capture into CUDA graphs (DeepGEMM compiles a
kernel for each new shape at its first call: the warm-up forwards before a capture make those calls). bfloat16 only:
FP8 experts are dequantized once at load (block_fp8 = False).
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable, Mapping

import torch
import triton
import triton.language as tl

from pd.moe.dispatcher.base import CombineInput, DispatchFormat, DispatchOutput
from pd.moe.runner import ExpertScales
from pd.moe.runner.moe_align import align_pairs_to_blocks
from pd.moe.runner.torch_ref import get_activation
from pd.moe.runner.triton_runner import TritonMoeRunner, act_and_mul_rows, batched_act_and_mul, sum_slots

# Below this many local pairs per local expert (on average) the Triton runner computes the batch. At 256 a expert the
# 128-row padding adds about a quarter more rows. Measured only at 16K tokens (512 a expert) so far, where DeepGEMM
# is still the slower of the two (benchmarks/results/h100_2026-12-06): benchmarks/bench_moe_kernel.py --runner
# deep_gemm (no hand-off) against --runner triton at smaller sizes is where to set it from.
MIN_PAIRS_PER_EXPERT = 256
_BLOCK_COLS = 2048  # columns per program of the gather


def jit_toolchain_problem(env: Mapping[str, str] = os.environ,
                          which: Callable[[str], str | None] = shutil.which) -> str | None:  # fmt: skip
    """What DeepGEMM's just-in-time compilation lacks on this host, or None. It finds CUDA as DeepGEMM does
    (CUDA_HOME, CUDA_PATH, nvcc's folder, /usr/local/cuda); every kernel it builds is compiled with nvcc there, or with
    NVRTC (DG_JIT_USE_NVRTC=1) against the headers there, and its kernel symbol read back with that CUDA's
    cuobjdump. A missing piece otherwise shows only at the first GEMM, as an assertion on an exit code."""
    home = env.get("CUDA_HOME") or env.get("CUDA_PATH")
    if not home:
        nvcc = which("nvcc")
        home = os.path.dirname(os.path.dirname(nvcc)) if nvcc else "/usr/local/cuda"
    nvrtc = env.get("DG_JIT_USE_NVRTC", "0") not in ("", "0")
    need = [os.path.join(home, "bin", "cuobjdump")]
    need.append(os.path.join(home, "include", "cuda.h") if nvrtc else env.get("DG_JIT_NVCC_COMPILER")
                or os.path.join(home, "bin", "nvcc"))  # fmt: skip
    missing = [path for path in need if not os.path.exists(path)]
    if not missing:
        return None
    return (f"DeepGEMM compiles its kernels at first use with the CUDA toolkit at {home} (CUDA_HOME), which lacks "
            f"{', '.join(missing)}. Point CUDA_HOME at a CUDA toolkit with nvcc and cuobjdump; or, without one, set "
            f"DG_JIT_USE_NVRTC=1 and give CUDA_HOME the CUDA headers (include/, with CCCL's) and bin/cuobjdump "
            f"(the nvidia-cuda-runtime, -cccl, -crt and -cuobjdump wheels). Or use --moe-runner-backend triton.")


class DeepGemmKernels:
    """The two DeepGEMM calls the runner makes, with the constraints DeepGEMM checks made into clear errors.

    contiguous(a [R, K], b [E, N, K], d [R, N], layout [R] int32): rows of a whose layout entry is e >= 0 times
        b[e]^T into d; the layout's runs are whole blocks of ``row_alignment`` rows, and a block whose first entry is
        -1 is skipped (rows of d whose entry is -1 hold anything).
    masked(a [E, M, K], b [E, N, K], d [E, M, N], counts [E] int32, expected_m): rows [0, counts[e]) of a[e] times
        b[e]^T into d[e] (rows past the counts hold anything); expected_m only steers its choice of block sizes.
    """

    def __init__(self) -> None:
        try:
            import deep_gemm
        except ImportError as e:
            raise ImportError(f"--moe-runner-backend deep_gemm needs DeepGEMM (the deep_gemm package, built for this "
                              f"torch and CUDA), which did not import: {e}. Use --moe-runner-backend triton, or "
                              f"install DeepGEMM.") from e  # fmt: skip
        problem = jit_toolchain_problem()
        if problem is not None:
            raise RuntimeError(f"--moe-runner-backend deep_gemm: {problem}")
        self._dg = deep_gemm
        self.row_alignment = int(deep_gemm.get_mk_alignment_for_contiguous_layout())

    @staticmethod
    def check_weights(w13_EXH: torch.Tensor, w2_EHI: torch.Tensor) -> None:
        """bfloat16 weights whose inner sizes DeepGEMM takes (K a multiple of 64 in both GEMMs), on a GPU it has
        kernels for (the weights' own: each rank checks its device once its weights are there)."""
        if w13_EXH.device.type == "cuda":
            major, minor = torch.cuda.get_device_capability(w13_EXH.device)
            if major not in (9, 10):
                raise RuntimeError(f"--moe-runner-backend deep_gemm needs a Hopper or Blackwell GPU (compute "
                                   f"capability 9.x or 10.x); this one is {major}.{minor}. Use --moe-runner-backend "
                                   f"triton.")  # fmt: skip
        if w13_EXH.dtype != torch.bfloat16 or w2_EHI.dtype != torch.bfloat16:
            raise ValueError(f"--moe-runner-backend deep_gemm computes in bfloat16; these experts are {w13_EXH.dtype}: "
                             f"serve with --dtype bfloat16, or use --moe-runner-backend triton")  # fmt: skip
        hidden, inter = w2_EHI.shape[1], w2_EHI.shape[2]
        if hidden % 64 or inter % 64:
            raise ValueError(f"--moe-runner-backend deep_gemm needs the hidden size ({hidden}) and the experts' "
                             f"intermediate size ({inter}, per rank) to be multiples of 64; use --moe-runner-backend "
                             f"triton")  # fmt: skip

    def contiguous(self, a: torch.Tensor, b: torch.Tensor, d: torch.Tensor, layout: torch.Tensor) -> None:
        self._dg.m_grouped_bf16_gemm_nt_contiguous(a, b, d, layout)

    def masked(self, a: torch.Tensor, b: torch.Tensor, d: torch.Tensor, counts: torch.Tensor, expected_m: int) -> None:
        self._dg.m_grouped_bf16_gemm_nt_masked(a, b, d, counts, expected_m)


@triton.jit
def _gather_rows_kernel(x_ptr, out_ptr, sorted_ids_ptr, expert_of_block_ptr, layout_ptr, row_of_pair_ptr, num_pairs,
                        hidden, stride_x, stride_o, TOP_K: tl.constexpr, BLOCK_M: tl.constexpr,
                        BLOCK: tl.constexpr):  # fmt: skip
    row = tl.program_id(0)
    pair = tl.load(sorted_ids_ptr + row)
    valid = pair < num_pairs  # padding rows (and the rows past the used ones) hold num_pairs
    if tl.program_id(1) == 0:
        expert = tl.load(expert_of_block_ptr + row // BLOCK_M)
        tl.store(layout_ptr + row, tl.where(valid, expert, -1))
        if valid:
            tl.store(row_of_pair_ptr + pair, row)
    if valid:
        cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        inside = cols < hidden
        token = pair // TOP_K
        values = tl.load(x_ptr + token.to(tl.int64) * stride_x + cols, mask=inside)
        tl.store(out_ptr + row.to(tl.int64) * stride_o + cols, values, mask=inside)


class DeepGemmMoeRunner:
    """MoE runner on DeepGEMM's grouped GEMMs (CUDA, Hopper or Blackwell, bfloat16).

    Args:
        kernels: the grouped GEMMs; None: DeepGEMM's (DeepGemmKernels). Tests pass a reference with the same
            contract, which also runs the runner's own kernels on a CPU under Triton's interpreter.
        min_pairs_per_expert: batches with fewer local pairs per local expert go to the Triton runner.
    """

    formats = (DispatchFormat.STANDARD, DispatchFormat.BATCHED)
    block_fp8 = False

    def __init__(self, kernels: DeepGemmKernels | None = None,
                 min_pairs_per_expert: int = MIN_PAIRS_PER_EXPERT) -> None:  # fmt: skip
        self.kernels = kernels if kernels is not None else DeepGemmKernels()
        self.min_pairs_per_expert = min_pairs_per_expert
        self.small = TritonMoeRunner()

    def prepare_weights(self, w13_EXH: torch.Tensor, w2_EHI: torch.Tensor) -> None:
        """Refuses, at load, experts DeepGEMM cannot multiply (their dtype or sizes)."""
        self.kernels.check_weights(w13_EXH, w2_EHI)

    def run(
        self,
        dispatch_out: DispatchOutput,
        w13_EXH: torch.Tensor,
        w2_EHI: torch.Tensor,
        activation: str = "silu",
        scales: ExpertScales | None = None,
    ) -> CombineInput:
        """Compute this rank's experts for the dispatched tokens. Asynchronous: no host sync.

        Args and returns: as pd.moe.runner.triton_runner.TritonMoeRunner.run, without ``scales`` (bfloat16 experts;
        FusedMoE dequantizes FP8 ones for this runner). The standard format's output is per token the sum over its
        local slots of weight * down(act(gate(x)) * up(x)), zeros for a token without one; ids outside
        [0, E_local) are skipped like -1 (unchecked: that needs a host sync).
        """
        get_activation(activation)  # validates the name
        assert scales is None, "the deep_gemm runner takes bfloat16 experts (block_fp8 is False)"
        if dispatch_out.format == DispatchFormat.BATCHED:
            return self._run_masked(dispatch_out, w13_EXH, w2_EHI, activation)
        hidden_NH, ids_NK, weights_NK = dispatch_out.hidden_states, dispatch_out.topk_ids, dispatch_out.topk_weights
        assert ids_NK is not None and weights_NK is not None
        num_tokens, top_k = ids_NK.shape
        num_experts, two_inter, hidden = w13_EXH.shape
        num_pairs = num_tokens * top_k
        if num_pairs < self.min_pairs_per_expert * num_experts:
            return self.small.run(dispatch_out, w13_EXH, w2_EHI, activation)
        assert hidden_NH.shape == (num_tokens, hidden) and w2_EHI.shape == (num_experts, hidden, two_inter // 2)
        x_NH = hidden_NH.contiguous()
        ids_NK = ids_NK.contiguous()
        align = self.kernels.row_alignment
        aligned = align_pairs_to_blocks(ids_NK, num_experts, align)
        rows = aligned.sorted_ids.shape[0]

        a_RH = x_NH.new_empty(rows, hidden)
        layout_R = torch.empty(rows, dtype=torch.int32, device=x_NH.device)
        row_of_pair_P = torch.empty(num_pairs, dtype=torch.int32, device=x_NH.device)
        block = min(_BLOCK_COLS, triton.next_power_of_2(hidden))
        _gather_rows_kernel[(rows, triton.cdiv(hidden, block))](
            x_NH, a_RH, aligned.sorted_ids, aligned.expert_of_block, layout_R, row_of_pair_P, num_pairs, hidden,
            x_NH.stride(0), a_RH.stride(0), TOP_K=top_k, BLOCK_M=align, BLOCK=block,
        )  # fmt: skip
        gate_up_RX = x_NH.new_empty(rows, two_inter)
        self.kernels.contiguous(a_RH, w13_EXH.contiguous(), gate_up_RX, layout_R)
        inter_RI = act_and_mul_rows(gate_up_RX, layout_R, num_experts, activation)
        down_RH = x_NH.new_empty(rows, hidden)
        self.kernels.contiguous(inter_RI, w2_EHI.contiguous(), down_RH, layout_R)

        out_NH = x_NH.new_empty(num_tokens, hidden)
        sum_slots(down_RH, ids_NK, num_experts, out_NH, row_of_pair_P, weights_NK.to(torch.float32).contiguous())
        return CombineInput(hidden_states=out_NH, handle=dispatch_out.handle)

    def _run_masked(self, dispatch_out: DispatchOutput, w13_EXH: torch.Tensor, w2_EHI: torch.Tensor,
                    activation: str) -> CombineInput:  # fmt: skip
        """The batched format: masked grouped GEMMs over [E_local, max_rows, ...] with the counts on the device."""
        x_EMH, counts_E = dispatch_out.hidden_states, dispatch_out.expert_counts
        assert counts_E is not None
        num_experts, max_rows, hidden = x_EMH.shape
        two_inter = w13_EXH.shape[1]
        assert w13_EXH.shape == (num_experts, two_inter, hidden)
        assert w2_EHI.shape == (num_experts, hidden, two_inter // 2)
        out_EMH = x_EMH.new_empty(num_experts, max_rows, hidden)
        if num_experts * max_rows == 0:
            return CombineInput(hidden_states=out_EMH, handle=dispatch_out.handle)
        # The counts stay on the device; the hint DeepGEMM picks its blocks by is the bound on them.
        x_EMH = x_EMH.contiguous()
        gate_up_EMX = x_EMH.new_empty(num_experts, max_rows, two_inter)
        self.kernels.masked(x_EMH, w13_EXH.contiguous(), gate_up_EMX, counts_E, max_rows)
        inter_EMI = batched_act_and_mul(gate_up_EMX, counts_E, activation)
        self.kernels.masked(inter_EMI, w2_EHI.contiguous(), out_EMH, counts_E, max_rows)
        return CombineInput(hidden_states=out_EMH, handle=dispatch_out.handle)
