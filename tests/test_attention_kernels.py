"""The Triton paged-attention kernels (pd.attention.triton_decode, pd.attention.triton_extend) against an oracle.

The oracle is written here, independently of the kernels and of the torch backend: each request's context slots
gathered through the page table, scores in fp32 with an explicit causal mask, softmax, weighted sum of values.
Batches are ragged (cached prefixes, multi-token extends and one-token decode requests mixed), pages are handed
out shuffled, request rows are out of order, and every cache slot and page-table entry no request owns holds
random values, so a kernel reading a wrong slot or a stale entry fails. Tolerances: fp32 1e-4; fp16 2e-3 and bf16
2e-2 (absolute and relative, against the oracle's fp32 result): the kernels round the softmax weights to the model
dtype before the value product, as flash attention does, and round the output.

CPU: small shapes in Triton's interpreter, in a child Python with TRITON_INTERPRET=1 set before Triton is
imported, shared by the run's kernel checks (tests/interpreter_child.py). GPU (marked ``gpu``): long prefixes, real
head shapes, and a CUDA graph of decode attention replayed with new lengths.
"""

from __future__ import annotations

import importlib.util
import math
import os
from dataclasses import dataclass
from types import ModuleType

import pytest
import torch

from tests.interpreter_child import InterpreterChild
from tests.triton_interpreter import patch_interpreter

needs_triton = pytest.mark.skipif(importlib.util.find_spec("triton") is None,
                                 reason="triton is not installed (the test extra installs it)")  # fmt: skip

TOLERANCE = {torch.float32: 1e-4, torch.float16: 2e-3, torch.bfloat16: 2e-2}


def _interpreted_kernels() -> tuple[ModuleType, ModuleType]:
    """(triton_decode, triton_extend) in this (child) process, built for Triton's interpreter."""
    assert os.environ.get("TRITON_INTERPRET") == "1", "run in a child with TRITON_INTERPRET=1"
    patch_interpreter()

    import pd.attention.triton_decode as decode
    import pd.attention.triton_extend as extend

    return decode, extend


def _child_check(check: str, case: int) -> None:
    """In the interpreter child (tests.interpreter_child): ``check(decode, extend, *CPU_CASES[case])``."""
    globals()[check](*_interpreted_kernels(), *CPU_CASES[case])


@dataclass
class Heads:
    """Attention shape: query/KV heads, head dims, and whether V is the first Dv columns of K's rows (MLA)."""

    q: int
    kv: int
    dk: int
    dv: int
    mla: bool = False


@dataclass
class PagedBatch:
    """A ragged batch over a paged cache. Per request b: row rows[b] of page_table, prefix_lens[b] cached tokens,
    extend_lens[b] new ones (queries q[q_starts[b] : q_starts[b] + extend_lens[b]]), all of whose keys are in
    the cache."""

    q: torch.Tensor
    k_buffer: torch.Tensor
    v_buffer: torch.Tensor
    page_table: torch.Tensor
    rows: torch.Tensor
    prefix_lens: torch.Tensor
    extend_lens: torch.Tensor
    q_starts: torch.Tensor
    page_size: int
    scale: float


def make_batch(seed: int, prefix_lens: list[int], extend_lens: list[int], heads: Heads, page_size: int,
               dtype: torch.dtype, device: str = "cpu", spare_pages: int = 5,
               kv_dtype: torch.dtype | None = None) -> PagedBatch:  # fmt: skip
    """kv_dtype: the cache's dtype when not the model's (an FP8 KV cache: random values rounded to FP8)."""
    gen = torch.Generator().manual_seed(seed)
    batch = len(prefix_lens)
    pages_per_req = [math.ceil((p + e) / page_size) for p, e in zip(prefix_lens, extend_lens, strict=True)]
    num_pages = sum(pages_per_req) + spare_pages
    num_rows, width = batch + 3, max(pages_per_req) + 2
    # Unused entries point at real (garbage-filled) pages: reading one gives wrong values, not a crash.
    page_table = torch.randint(0, num_pages, (num_rows, width), generator=gen, dtype=torch.int32)
    rows = torch.randperm(num_rows, generator=gen)[:batch].to(torch.int32)
    shuffled = torch.randperm(num_pages, generator=gen).to(torch.int32)
    taken = 0
    for row, n in zip(rows.tolist(), pages_per_req, strict=True):
        page_table[row, :n] = shuffled[taken : taken + n]
        taken += n
    slots = num_pages * page_size
    k_buffer = torch.randn(slots, heads.kv, heads.dk, generator=gen).to(kv_dtype or dtype)
    if heads.mla:
        assert heads.kv == 1
        v_buffer = k_buffer[..., : heads.dv]
    else:
        v_buffer = torch.randn(slots, heads.kv, heads.dv, generator=gen).to(kv_dtype or dtype)
    q = torch.randn(sum(extend_lens), heads.q, heads.dk, generator=gen).to(dtype)
    starts = [0] + list(torch.tensor(extend_lens).cumsum(0)[:-1].tolist())
    i32 = {"dtype": torch.int32, "device": device}
    return PagedBatch(
        q=q.to(device), k_buffer=k_buffer.to(device),
        v_buffer=k_buffer.to(device)[..., : heads.dv] if heads.mla else v_buffer.to(device),
        page_table=page_table.to(device), rows=rows.to(device), prefix_lens=torch.tensor(prefix_lens, **i32),
        extend_lens=torch.tensor(extend_lens, **i32), q_starts=torch.tensor(starts, **i32), page_size=page_size,
        scale=heads.dk**-0.5,
    )  # fmt: skip


def reference_attention(b: PagedBatch) -> torch.Tensor:
    """The oracle: [T, Hq, Dv] fp32, one request at a time over its gathered context."""
    num_q_heads, num_kv_heads = b.q.shape[1], b.k_buffer.shape[1]
    group = num_q_heads // num_kv_heads  # query head h reads KV head h // group
    out = torch.empty(b.q.shape[0], num_q_heads, b.v_buffer.shape[-1], dtype=torch.float32, device=b.q.device)
    table = b.page_table.long()
    for i in range(b.rows.numel()):
        row, prefix, new, start = (int(t[i]) for t in (b.rows, b.prefix_lens, b.extend_lens, b.q_starts))
        pos = torch.arange(prefix + new, device=b.q.device)
        slots = table[row, pos // b.page_size] * b.page_size + pos % b.page_size
        k, v = b.k_buffer[slots].float(), b.v_buffer[slots].float()  # [L, Hk, D]
        q = b.q[start : start + new].float().view(new, num_kv_heads, group, -1)  # [E, Hk, G, Dk]
        scores = torch.einsum("ekgd,lkd->kgel", q, k) * b.scale
        visible = pos[None, :] <= (prefix + torch.arange(new, device=b.q.device))[:, None]  # [E, L]
        probs = scores.masked_fill(~visible, float("-inf")).softmax(dim=-1)
        out[start : start + new] = torch.einsum("kgel,lkd->ekgd", probs, v).reshape(new, num_q_heads, -1)
    return out


def _assert_close(actual: torch.Tensor, expected: torch.Tensor, what: str) -> None:
    tol = TOLERANCE[actual.dtype]
    torch.testing.assert_close(actual.float(), expected, atol=tol, rtol=tol, msg=lambda m: f"{what}: {m}")


def run_extend(extend: ModuleType, b: PagedBatch, config: dict[str, int] | None = None) -> torch.Tensor:
    # garbage in out: rows the kernel forgets to write cannot pass for zeros
    out = torch.randn(b.q.shape[0], b.q.shape[1], b.v_buffer.shape[-1], device=b.q.device).to(b.q.dtype)
    return extend.extend_attention(b.q, b.k_buffer, b.v_buffer, out, b.page_table, b.rows, b.q_starts,
                                   b.extend_lens, b.prefix_lens, int(b.extend_lens.max()), b.scale, b.page_size,
                                   config=config)  # fmt: skip


def run_decode(decode: ModuleType, b: PagedBatch, splits: int, config: dict[str, int] | None = None,
               nan_workspace: bool = False) -> torch.Tensor:  # fmt: skip
    """Decode over a batch whose requests each extend by exactly one token."""
    assert bool((b.extend_lens == 1).all())
    batch, num_q_heads, dv = b.q.shape[0], b.q.shape[1], b.v_buffer.shape[-1]
    out = torch.randn(batch, num_q_heads, dv, device=b.q.device).to(b.q.dtype)
    workspace = decode.decode_workspace(batch, num_q_heads, dv, splits, b.q.device)
    if nan_workspace:  # a reused workspace holds anything: parts left empty must not leak into the merge
        for t in workspace:
            t.fill_(float("nan"))
    kv_lens = b.prefix_lens + b.extend_lens
    return decode.decode_attention(b.q, b.k_buffer, b.v_buffer, out, b.page_table, b.rows, kv_lens, b.scale,
                                   b.page_size, splits, workspace, config=config)  # fmt: skip


# ---- CPU, in Triton's interpreter ----

CPU_CASES = [  # heads, page size, dtype
    (Heads(4, 4, 16, 16), 1, torch.float32),  # MHA, one token per page
    (Heads(4, 2, 32, 32), 4, torch.float32),  # GQA 2
    (Heads(8, 2, 24, 24), 16, torch.float32),  # GQA 4, odd head dim (padded to 32)
    (Heads(4, 2, 48, 32), 4, torch.float32),  # Dk = 32 + 16 in two pieces, Dv != Dk (DeepSeek MHA-like)
    (Heads(8, 1, 48, 32, mla=True), 4, torch.float32),  # MLA-like: V = the first 32 columns of K's rows
    (Heads(8, 2, 32, 32), 16, torch.bfloat16),
    (Heads(4, 4, 24, 24), 4, torch.float16),
    (Heads(16, 1, 48, 32, mla=True), 16, torch.bfloat16),
]
SMALL_DECODE = {"BLOCK_H": 16, "BLOCK_N": 16, "num_warps": 4, "num_stages": 1}
SMALL_EXTEND = {"BLOCK_M": 16, "BLOCK_N": 16, "num_warps": 4, "num_stages": 1}


def _ragged(seed: int, batch: int, max_prefix: int, max_extend: int) -> tuple[list[int], list[int]]:
    """Random prefix and extend lengths; about a third of the requests are one-token (decode-like) extends."""
    gen = torch.Generator().manual_seed(seed)
    prefix = torch.randint(0, max_prefix + 1, (batch,), generator=gen)
    extend = torch.randint(1, max_extend + 1, (batch,), generator=gen)
    extend[torch.rand(batch, generator=gen) < 0.35] = 1
    prefix[0], extend[0] = 0, max_extend  # a whole prompt with no cached prefix
    return prefix.tolist(), extend.tolist()


def check_extend_matches_oracle(decode: ModuleType, extend: ModuleType, heads: Heads, page_size: int,
                                dtype: torch.dtype) -> None:  # fmt: skip
    for seed in range(2):
        prefix, new = _ragged(seed, 5, 40, 20)
        b = make_batch(seed, prefix, new, heads, page_size, dtype)
        expected = reference_attention(b)
        small = run_extend(extend, b, SMALL_EXTEND)
        _assert_close(small, expected, f"extend seed {seed} 16x16 tiles")
        # the other program order (heads fastest by default only for grouped heads): the same programs, same bits
        other_order = dict(SMALL_EXTEND, HEADS_FASTEST=heads.q == heads.kv)
        assert torch.equal(run_extend(extend, b, other_order), small), f"extend seed {seed}, the other order"
        _assert_close(run_extend(extend, b), expected, f"extend seed {seed} default tiles")


def check_decode_matches_oracle(decode: ModuleType, extend: ModuleType, heads: Heads, page_size: int,
                                dtype: torch.dtype) -> None:  # fmt: skip
    gen = torch.Generator().manual_seed(7)
    kv_lens = torch.randint(1, 60, (6,), generator=gen).tolist()
    kv_lens[0] = 1  # a request's very first token
    b = make_batch(7, [n - 1 for n in kv_lens], [1] * len(kv_lens), heads, page_size, dtype)
    expected = reference_attention(b)
    for splits in (1, 3, 8):  # 8: short contexts leave parts empty
        _assert_close(run_decode(decode, b, splits, SMALL_DECODE, nan_workspace=True), expected,
                      f"decode, {splits} splits")  # fmt: skip
    _assert_close(run_decode(decode, b, 2), expected, "decode, default tiles")
    # one-token extends are decode: the extend kernel agrees on the same batch
    _assert_close(run_extend(extend, b, SMALL_EXTEND), expected, "extend of decode tokens")


def check_strided_inputs_and_empty_requests(decode: ModuleType, extend: ModuleType, heads: Heads, page_size: int,
                                            dtype: torch.dtype) -> None:  # fmt: skip
    """q and out as strided views (a fused qkv projection's output), a decode workspace with more rows than the
    batch (a CUDA graph's, sized for its largest bucket), a zero-length decode request (a graph's padding row:
    zeros, not NaN) and a zero-length extend request (its rows left untouched)."""
    b = make_batch(3, [5, 17, 0], [1, 1, 1], heads, page_size, dtype)
    wide = torch.randn(3, heads.q, heads.dk + 8).to(dtype)
    wide[..., : heads.dk] = b.q
    b.q = wide[..., : heads.dk]
    expected = reference_attention(b)
    out_wide = torch.randn(3, heads.q, heads.dv + 4).to(dtype)
    kv_lens = (b.prefix_lens + 1).clone()
    kv_lens[2] = 0
    workspace = decode.decode_workspace(5, heads.q, heads.dv, 4, "cpu")
    decode.decode_attention(b.q, b.k_buffer, b.v_buffer, out_wide[..., : heads.dv], b.page_table, b.rows, kv_lens,
                            b.scale, page_size, 4, workspace, config=SMALL_DECODE)  # fmt: skip
    _assert_close(out_wide[:2, :, : heads.dv], expected[:2], "decode into a strided out")
    assert not out_wide[2, :, : heads.dv].any(), "a zero-length request decodes to zeros"
    out = torch.randn(3, heads.q, heads.dv).to(dtype)
    before = out.clone()
    lens = torch.tensor([1, 0, 1], dtype=torch.int32)
    extend.extend_attention(b.q, b.k_buffer, b.v_buffer, out, b.page_table, b.rows, b.q_starts, lens, b.prefix_lens,
                            1, b.scale, page_size, config=SMALL_EXTEND)  # fmt: skip
    _assert_close(out[[0, 2]], expected[[0, 2]], "extend with a strided q")
    assert torch.equal(out[1], before[1]), "a zero-length extend request writes nothing"


def split_keys(b: PagedBatch, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """MLA's prefill operands in small: each head's key = its own first columns (a strided view of a wider
    projection output whose other half is V) followed by rope columns one head shares ([S, 1, Dr]). Rewrites b's
    K and V to the same keys and values whole, for the oracle. -> (k_main view, k_rope, v view)."""
    from pd.attention.triton_decode import head_dim_blocks

    gen = torch.Generator().manual_seed(seed)
    slots, num_kv, dk = b.k_buffer.shape
    dv = b.v_buffer.shape[-1]
    main, rest = head_dim_blocks(dk)
    assert rest > 0, f"head dim {dk} is one tile"
    # kv_b_proj's output: K's columns, then V's
    wide = torch.randn(slots, num_kv, main + dv, generator=gen).to(b.q.device, b.q.dtype)
    rope = torch.randn(slots, 1, rest, generator=gen).to(b.q.device, b.q.dtype)
    k_main, v = wide[..., :main], wide[..., main:]
    b.k_buffer = torch.cat((k_main, rope.expand(slots, num_kv, rest)), dim=-1)
    b.v_buffer = v.contiguous()
    return k_main, rope, v


def check_extend_with_split_keys(decode: ModuleType, extend: ModuleType, heads: Heads, page_size: int,
                                 dtype: torch.dtype, lens: tuple[int, int] = (30, 20),
                                 device: str = "cpu") -> None:  # fmt: skip
    """Keys held as two tensors (extend_attention's k_rope) give the oracle's attention over the whole keys."""
    prefix, new = _ragged(5, 4, *lens)
    b = make_batch(5, prefix, new, heads, page_size, dtype, device)
    k_main, rope, v = split_keys(b, 5)
    expected = reference_attention(b)
    for config in (SMALL_EXTEND, None):
        out = torch.randn(b.q.shape[0], b.q.shape[1], heads.dv).to(b.q.device, dtype)
        extend.extend_attention(b.q, k_main, v, out, b.page_table, b.rows, b.q_starts, b.extend_lens, b.prefix_lens,
                                int(b.extend_lens.max()), b.scale, page_size, k_rope=rope, config=config)  # fmt: skip
        _assert_close(out, expected, f"extend over split keys, tiles {config}")
    # contiguous: each request's keys copied to consecutive rows (in request order, after one spare row), each
    # followed by a row of NaNs that a tile on the diagonal covers but no score may take in; the table's column 0
    # holding the first
    table = b.page_table.long()
    nan_row = k_main.shape[0]  # appended below
    rows = [torch.tensor([0], device=b.q.device)]
    firsts = []
    for i in range(b.rows.numel()):
        pos = torch.arange(int(b.prefix_lens[i] + b.extend_lens[i]), device=b.q.device)
        firsts.append(sum(len(r) for r in rows))
        rows += [table[int(b.rows[i]), pos // page_size] * page_size + pos % page_size,
                 torch.tensor([nan_row], device=b.q.device)]  # fmt: skip
    order = torch.cat(rows)
    first_table = torch.zeros(table.shape[0], 1, dtype=torch.int32)
    first_table[b.rows.long().cpu(), 0] = torch.tensor(firsts, dtype=torch.int32)

    def with_nan_row(t: torch.Tensor) -> torch.Tensor:
        return torch.cat((t, torch.full_like(t[:1], float("nan"))))

    # a kv_b_proj output again: K's columns, then V's
    wide = torch.cat((with_nan_row(k_main)[order], with_nan_row(v)[order]), dim=-1)
    k_wide, v_wide, rope_rows = wide[..., : k_main.shape[-1]], wide[..., k_main.shape[-1] :], with_nan_row(rope)[order]
    tiles = extend.extend_config(heads.dk, heads.dv, dtype)
    block_dk, block_dr = extend.head_dim_blocks(heads.dk)
    # the tensor-descriptor path takes these operands (else this test would not run it)
    assert extend._kv_descriptors(k_wide, rope_rows, v_wide, tiles["BLOCK_N"], block_dk, block_dr, heads.dv, False)
    for config in (dict(tiles, KV_DESC=False), dict(tiles, KV_DESC=True)):
        out = torch.randn(b.q.shape[0], b.q.shape[1], heads.dv).to(b.q.device, dtype)
        extend.extend_attention(b.q, k_wide, v_wide, out, first_table.to(b.q.device), b.rows, b.q_starts,
                                b.extend_lens, b.prefix_lens, int(b.extend_lens.max()), b.scale, 1, k_rope=rope_rows,
                                contiguous=True, config=config)  # fmt: skip
        _assert_close(out, expected, f"extend over contiguous split keys, {config}")


def check_both_match_oracle(decode: ModuleType, extend: ModuleType, heads: Heads, page_size: int,
                            dtype: torch.dtype) -> None:  # fmt: skip
    check_decode_matches_oracle(decode, extend, heads, page_size, dtype)
    check_extend_matches_oracle(decode, extend, heads, page_size, dtype)


# An FP8 KV cache (--kv-cache-dtype): the kernels convert each loaded K/V row to q's dtype; the oracle reads the same
# FP8 values in fp32, so the tolerances are the model dtype's.
FP8_KV_CASES = [
    (Heads(4, 2, 32, 32), 4, torch.float32, torch.float8_e4m3fn),
    (Heads(8, 2, 32, 32), 16, torch.bfloat16, torch.float8_e4m3fn),
    (Heads(16, 1, 48, 32, mla=True), 4, torch.bfloat16, torch.float8_e5m2),
]


def check_fp8_kv_matches_oracle(case: int) -> None:
    decode, extend = _interpreted_kernels()
    heads, page_size, dtype, kv_dtype = FP8_KV_CASES[case]
    prefix, new = _ragged(case, 4, 40, 12)
    for what, extends in (("extend", new), ("decode", [1] * len(new))):
        b = make_batch(case, prefix, extends, heads, page_size, dtype, kv_dtype=kv_dtype)
        assert b.k_buffer.dtype == kv_dtype
        expected = reference_attention(b)
        _assert_close(run_extend(extend, b, SMALL_EXTEND), expected, f"extend kernel, {what} batch over FP8 KV")
        if what == "decode":
            _assert_close(run_decode(decode, b, 3, SMALL_DECODE), expected, "decode kernel over FP8 KV")


# Decode writing its output in e4m3 too, for a block-FP8 o_proj: (heads, page size, dtype, scale group, splits).
FP8_ROWS_CASES = [
    (Heads(8, 2, 32, 32), 4, torch.bfloat16, 16, 3),
    (Heads(4, 2, 32, 32), 1, torch.float32, 32, 1),
    (Heads(4, 2, 48, 32), 16, torch.float16, 16, 2),  # Dk in two pieces, Dv = 32
]


def check_decode_writes_fp8_rows(decode: ModuleType, heads: Heads, page_size: int, dtype: torch.dtype, group: int,
                                 splits: int, seed: int) -> None:  # fmt: skip
    """decode_attention with fp8_rows: the same output bits as without, and the e4m3 rows and scales that
    token_group_quant gives for that output as [B, Hq * Dv] rows, bit for bit."""
    from pd.layers.triton_fp8_gemm import token_group_quant

    gen = torch.Generator().manual_seed(seed)
    prefix = torch.randint(0, 40, (5,), generator=gen).tolist()
    b = make_batch(seed, prefix, [1] * len(prefix), heads, page_size, dtype, device=b_device(decode))
    plain = run_decode(decode, b, splits, SMALL_DECODE)
    batch, width = b.q.shape[0], heads.q * heads.dv
    q8 = torch.full((batch, width), float("nan"), device=b.q.device).to(torch.float8_e4m3fn)
    scale = torch.full((batch, width // group), float("nan"), device=b.q.device)
    out = torch.randn(batch, heads.q, heads.dv, device=b.q.device).to(dtype)
    decode.decode_attention(b.q, b.k_buffer, b.v_buffer, out, b.page_table, b.rows, b.prefix_lens + 1, b.scale,
                            b.page_size, splits, config=SMALL_DECODE, fp8_rows=(q8, scale, group))  # fmt: skip
    assert torch.equal(out, plain)
    want_q, want_scale = token_group_quant(plain.reshape(batch, width), group)
    assert torch.equal(q8.view(torch.uint8), want_q.view(torch.uint8))
    assert torch.equal(scale, want_scale)


def b_device(decode: ModuleType) -> str:
    return "cpu" if os.environ.get("TRITON_INTERPRET") == "1" else "cuda"


def check_fp8_rows_case(case: int, seed: int) -> None:
    decode, _ = _interpreted_kernels()
    check_decode_writes_fp8_rows(decode, *FP8_ROWS_CASES[case], seed)


@needs_triton
@pytest.mark.parametrize("case", range(len(FP8_ROWS_CASES)))
def test_decode_writes_fp8_rows_for_o_proj_interpreted(case: int, interpreter: InterpreterChild) -> None:
    interpreter.run(__name__, "check_fp8_rows_case", case, int(torch.randint(0, 2**31, ())), timeout_s=300)


def test_fp8_rows_fit() -> None:
    pytest.importorskip("triton")
    from pd.attention.triton_decode import fp8_rows_fit

    assert fp8_rows_fit(128, 128) and fp8_rows_fit(128, 64) and fp8_rows_fit(32, 16)
    assert not fp8_rows_fit(128, 256)  # a group wider than a head's row
    assert not fp8_rows_fit(96, 32)  # a padded row
    assert not fp8_rows_fit(128, 8) and not fp8_rows_fit(128, 48)


@needs_triton
@pytest.mark.parametrize("case", range(len(FP8_KV_CASES)))
def test_kernels_read_an_fp8_kv_cache_interpreted(case: int, interpreter: InterpreterChild) -> None:
    interpreter.run(__name__, "check_fp8_kv_matches_oracle", case, timeout_s=300)


@needs_triton
@pytest.mark.parametrize("case", range(len(CPU_CASES)))
def test_decode_and_extend_match_oracle_interpreted(case: int, interpreter: InterpreterChild) -> None:
    interpreter.run(__name__, "_child_check", "check_both_match_oracle", case, timeout_s=300)


@needs_triton
@pytest.mark.parametrize("case", [2, 4])
def test_strided_inputs_and_empty_requests_interpreted(case: int, interpreter: InterpreterChild) -> None:
    interpreter.run(__name__, "_child_check", "check_strided_inputs_and_empty_requests", case, timeout_s=300)


@needs_triton
@pytest.mark.parametrize("case", [3, 7])
def test_extend_over_split_keys_interpreted(case: int, interpreter: InterpreterChild) -> None:
    interpreter.run(__name__, "_child_check", "check_extend_with_split_keys", case, timeout_s=300)


def test_head_dim_blocks() -> None:
    pytest.importorskip("triton")
    from pd.attention.triton_decode import head_dim_blocks

    assert head_dim_blocks(576) == (512, 64)  # MLA: latent + rope
    assert head_dim_blocks(192) == (128, 64)
    assert head_dim_blocks(128) == (128, 0)
    assert head_dim_blocks(48) == (32, 16)
    assert head_dim_blocks(24) == (32, 0)  # 16 + 8: 8 is too narrow for a dot, padded instead
    assert head_dim_blocks(8) == (16, 0)


# ---- GPU ----

GPU_HEADS = {
    "mha": Heads(8, 8, 128, 128),
    "gqa4": Heads(32, 8, 128, 128),
    "gqa8": Heads(32, 4, 128, 128),
    "d64": Heads(16, 2, 64, 64),
    "d192": Heads(16, 16, 192, 128),
    "odd": Heads(6, 2, 80, 80),
    "mla": Heads(128, 1, 576, 512, mla=True),
}
# every (GQA ratio, page size) pair, the dtypes alternating (each compile costs seconds)
GPU_CASES = [(h, ps, ("bf16", "fp16")[(i + j) % 2]) for i, h in enumerate(("mha", "gqa4", "gqa8"))
             for j, ps in enumerate((1, 16, 64))] + [
    ("d64", 16, "bf16"), ("d192", 64, "bf16"), ("odd", 16, "fp16"), ("gqa8", 16, "fp32"),
    ("mla", 1, "bf16"), ("mla", 64, "bf16"), ("mla", 16, "fp16"),
]  # fmt: skip
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


@pytest.mark.gpu
@pytest.mark.parametrize(("heads", "page_size", "dtype"), GPU_CASES)
def test_decode_matches_oracle_gpu(heads: str, page_size: int, dtype: str) -> None:
    import pd.attention.triton_decode as decode

    h = GPU_HEADS[heads]
    gen = torch.Generator().manual_seed(11)
    kv_lens = torch.randint(1, 4097, (12,), generator=gen).tolist()
    kv_lens[:3] = [1, 4096, 17]
    b = make_batch(11, [n - 1 for n in kv_lens], [1] * len(kv_lens), h, page_size, DTYPES[dtype], "cuda")
    expected = reference_attention(b)
    default = decode.default_num_kv_splits(len(kv_lens), 4096, "cuda", num_q_heads=h.q, num_kv_heads=h.kv,
                                           head_dim_k=h.dk, head_dim_v=h.dv)  # fmt: skip
    for splits in sorted({1, 7, default}):
        _assert_close(run_decode(decode, b, splits, nan_workspace=True), expected, f"{splits} splits")


@pytest.mark.gpu
@pytest.mark.parametrize("group", [128, 64])
def test_decode_writes_fp8_rows_for_o_proj_gpu(group: int) -> None:
    import pd.attention.triton_decode as decode

    for seed, dtype in ((1, torch.bfloat16), (2, torch.float16)):
        check_decode_writes_fp8_rows(decode, Heads(32, 4, 128, 128), 16, dtype, group, 2, seed)


@pytest.mark.gpu
@pytest.mark.parametrize(("heads", "page_size", "dtype"), GPU_CASES)
def test_extend_matches_oracle_gpu(heads: str, page_size: int, dtype: str) -> None:
    import pd.attention.triton_extend as extend

    h = GPU_HEADS[heads]
    prefix, new = _ragged(5, 8, 4096, 300 if h.mla else 700)
    prefix[1], new[1] = 4096, 1  # a long decode-like request
    b = make_batch(5, prefix, new, h, page_size, DTYPES[dtype], "cuda")
    _assert_close(run_extend(extend, b), reference_attention(b), "extend")


@pytest.mark.gpu
def test_extend_over_split_keys_gpu() -> None:
    """DeepSeek-V3's prompt forward: 128 heads, keys 128 + 64 (the rope part one shared head), values 128."""
    import pd.attention.triton_decode as decode
    import pd.attention.triton_extend as extend

    check_extend_with_split_keys(decode, extend, Heads(128, 128, 192, 128), 1, torch.bfloat16, (512, 1024), "cuda")


@pytest.mark.gpu
@pytest.mark.parametrize("heads", ["gqa8", "mla"])
def test_decode_cuda_graph_replays_new_lengths(heads: str) -> None:
    """Capture decode_attention once over static inputs (queries, rows, lengths, page table, workspace), copy a new
    batch into them on the device, replay: bitwise the eager result for the new batch (and the oracle's)."""
    import pd.attention.triton_decode as decode

    h, page_size, bs = GPU_HEADS[heads], 16, 16
    gen = torch.Generator().manual_seed(2)
    kv_lens_new = torch.randint(1, 4097, (bs,), generator=gen).tolist()
    kv_lens_new[0] = 1
    new = make_batch(2, [n - 1 for n in kv_lens_new], [1] * bs, h, page_size, torch.bfloat16, "cuda")
    num_pages = new.k_buffer.shape[0] // page_size
    # static inputs, first holding another (short) batch: the warm-up launch runs on them
    q = torch.randn_like(new.q)
    rows = torch.arange(bs, dtype=torch.int32, device="cuda")
    kv_lens = torch.full((bs,), 5, dtype=torch.int32, device="cuda")
    table = torch.randint(0, num_pages, new.page_table.shape, dtype=torch.int32, device="cuda")
    splits = decode.default_num_kv_splits(bs, 4096, "cuda", num_q_heads=h.q, num_kv_heads=h.kv, head_dim_k=h.dk,
                                          head_dim_v=h.dv)  # fmt: skip
    workspace = decode.decode_workspace(bs, h.q, h.dv, splits, "cuda")
    out = torch.empty(bs, h.q, h.dv, dtype=torch.bfloat16, device="cuda")

    def step() -> None:
        decode.decode_attention(q, new.k_buffer, new.v_buffer, out, table, rows, kv_lens, new.scale, page_size,
                                splits, workspace)  # fmt: skip

    step()  # compiles outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    eager = run_decode(decode, new, splits)
    q.copy_(new.q)
    rows.copy_(new.rows)
    kv_lens.copy_(new.prefix_lens + 1)
    table.copy_(new.page_table)
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(out, eager), "replay with new lengths equals the eager launch"
    _assert_close(out, reference_attention(new), "replay vs oracle")
