"""`pd serve` against transformers on one GPU, in one run, with the decode weight-read roofline beside them.

Model (random bf16 weights, written with transformers): `qwen3` = Qwen3-MoE at Qwen3-30B-A3B widths (hidden 2048,
32/4 heads of dim 128, 128 experts top-8 of 768, vocab 151936) with --layers layers (default 8); `deepseek` = a
DeepSeek-V3 shape small enough for one GPU (MLA with 128 heads, 256 experts top-8 of 2048 with group-limited
routing, first layer dense) with --layers layers (default 2: one dense and one MoE layer, ~27 GB of bf16
weights, held by transformers and by pd serve at once).

The prefill's compute roofline (benchmarks/prefill_roofline.py): its matmul FLOPs at the rate of one large bf16 GEMM
measured in the same run, and what that bounds the ratio to transformers at.

Workloads (the serving issue's): prefill tok/s of 16 x 1024-token prompts with 1 new token (transformers: forwards
of 8 prompts, and of one --prefill-chunk's worth if that differs, the faster counting, each computing the last
position's logits only, as its generate does for a prompt; pd serve: the median of
--prefill-bursts bursts of 16 concurrent requests, and as many bursts sent as one batched /generate request, SGLang's
batch form); decode out tok/s at each
--batches size with 128-token prompts, 128 new tokens, greedy, ignore_eos
(transformers: `generate` on the batch; pd serve: the median of --decode-runs runs of that many concurrent streamed
/generate requests, every run's figure in the JSON), and pd serve's
inter-token latency p50/p99/mean from the stream, also over the roofline's step time (batch 1's target is stated
on the inter-token latency). Roofline of a decode step at batch B: the bytes every step must read
(weights outside the routed experts, the expected number of distinct experts hit per MoE layer, E(1 - (1 - k/E)^B),
times one expert's bytes, and the KV of the batch) over the device-to-device copy bandwidth measured in the same
run ((read + write) / time of a 1 GiB copy).

With --fp8-batches (default 64) the same checkpoint is served again with `--quantization fp8` in the same run:
FP8 decode tok/s against bf16's, and the FP8 weight-read roofline (quantized weights at one byte each).

Usage: python benchmarks/bench_gpu_serve.py [--model qwen3|deepseek] [--layers N] [--batches 1,16,64,256]
                                            [--fp8-batches 64] [--out results.json] [--device cuda]
`--device cpu --tiny` runs the whole procedure on a small model (a smoke run, not a measurement).
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import importlib.util
import json
import os
import sys
import tempfile
import time
from typing import Any

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from benchmarks.gpu_clocks import GpuClocks, describe, gpu_uuid  # noqa: E402
from benchmarks.prefill_roofline import matmul_rate, median_seconds, prefill_flops, sync  # noqa: E402


def model_config(name: str, layers: int, tiny: bool):  # noqa: ANN201 (transformers is imported lazily)
    import transformers

    common = dict(num_hidden_layers=layers, bos_token_id=None, eos_token_id=None, pad_token_id=0,
                  tie_word_embeddings=False, max_position_embeddings=4096)  # fmt: skip
    if name == "qwen3":
        widths = dict(vocab_size=151936, hidden_size=2048, intermediate_size=6144, moe_intermediate_size=768,
                      num_attention_heads=32, num_key_value_heads=4, head_dim=128, num_experts=128)  # fmt: skip
        if tiny:
            widths = dict(vocab_size=4096, hidden_size=128, intermediate_size=256, moe_intermediate_size=64,
                          num_attention_heads=4, num_key_value_heads=2, head_dim=32, num_experts=16)  # fmt: skip
        return transformers.Qwen3MoeConfig(**common, **widths, num_experts_per_tok=8 if not tiny else 4,
                                           norm_topk_prob=True, decoder_sparse_step=1, mlp_only_layers=[])  # fmt: skip
    widths = dict(vocab_size=129280, hidden_size=7168, intermediate_size=18432, moe_intermediate_size=2048,
                  num_attention_heads=128, num_key_value_heads=128, n_routed_experts=256, q_lora_rank=1536,
                  kv_lora_rank=512, qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128)  # fmt: skip
    if tiny:
        widths = dict(vocab_size=4096, hidden_size=128, intermediate_size=256, moe_intermediate_size=64,
                      num_attention_heads=4, num_key_value_heads=4, n_routed_experts=16, q_lora_rank=64,
                      kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16)  # fmt: skip
    return transformers.DeepseekV3Config(**common, **widths, num_experts_per_tok=8 if not tiny else 4,
                                         n_shared_experts=1, first_k_dense_replace=1, n_group=8 if not tiny else 4,
                                         topk_group=4 if not tiny else 2, routed_scaling_factor=2.5,
                                         norm_topk_prob=True)  # fmt: skip


def write_checkpoint(path: str, config, device: str) -> None:  # noqa: ANN001
    from transformers import AutoModelForCausalLM

    from tests.tiny_checkpoints import write_tokenizer

    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config).to(torch.bfloat16)
    model.save_pretrained(path)
    # Gone from the device before anything is served: with --skip-transformers nothing else frees it, and the
    # DeepSeek shape's writer holds ~68 GiB (its float32 init and the bf16 copy) that pd serve then lacks.
    del model
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()
    write_tokenizer(path)


def copy_bandwidth(device: str) -> float:
    """(read + written bytes) / time of a 1 GiB device-to-device copy, bytes/s (the median of 10)."""
    n = (1 << 30) if device == "cuda" else (1 << 26)
    src, dst = torch.empty(n, dtype=torch.uint8, device=device), torch.empty(n, dtype=torch.uint8, device=device)
    return 2 * n / median_seconds(lambda: dst.copy_(src), device)


def transformers_version() -> str:
    """The reference's version (its MoE layers' default kernels changed between releases)."""
    import transformers

    return transformers.__version__


def step_bytes(config, batch: int, context: int, fp8: bool = False) -> float:  # noqa: ANN001
    """Bytes one decode step at batch ``batch`` must read: every weight outside the routed experts, the expected
    distinct experts hit in each MoE layer, and the batch's KV (bf16). fp8: the weights `--quantization fp8`
    quantizes (linears and experts; not the embeddings, the output head or the routers) at one byte each plus a
    float32 scale per 128x128 block."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    expert_bytes, dense_bytes, moe_layers = 0, 0, set()
    for name, p in model.named_parameters():
        kept = name.endswith("mlp.gate.weight") or any(k in name for k in ("embed_tokens", "lm_head", "expert_gate"))
        quantized = fp8 and p.dim() >= 2 and not kept
        nbytes = p.numel() * (1 + 4 / (128 * 128) if quantized else 2)
        if ".experts." in name and "shared" not in name:
            moe_layers.add(name.split(".experts.")[0])
            expert_bytes += nbytes
        elif "embed_tokens" not in name:  # an embedding reads B rows, not the table
            dense_bytes += nbytes
    experts = getattr(config, "num_experts", None) or config.n_routed_experts
    top_k = config.num_experts_per_tok
    per_expert = expert_bytes / max(1, experts * len(moe_layers))
    hit = experts * (1 - (1 - top_k / experts) ** batch)
    if hasattr(config, "kv_lora_rank"):
        kv_per_token = config.num_hidden_layers * (config.kv_lora_rank + config.qk_rope_head_dim) * 2
    else:
        kv_per_token = config.num_hidden_layers * 2 * config.num_key_value_heads * config.head_dim * 2
    return dense_bytes + len(moe_layers) * hit * per_expert + batch * context * kv_per_token


def bench_transformers(path: str, device: str, args: argparse.Namespace, clocks: GpuClocks) -> dict[str, object]:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16).to(device).eval()
    vocab = model.config.vocab_size
    gen = torch.Generator().manual_seed(0)
    out: dict[str, object] = {}
    with torch.no_grad():
        # Forwards of 8 prompts, and of as many as pd serve's prefill chunk holds when that differs: the faster is
        # the reference (transformers gets the same batching pd serve is given). Each forward computes the logits
        # of the last position only (logits_to_keep=1), as transformers' own generate does for a prompt and as pd
        # serve does: a plain forward's LM head over every position (the DeepSeek shape at 16 x 1024 tokens: 30
        # TFLOP, 4 GiB of logits) is work neither needs for one new token. Until 2026-12-06 this reference was
        # the plain forward; that figure is still measured, once per shape (prefill_tok_s_all_logits), to set
        # earlier results beside.
        per_forward = sorted({8, max(1, args.prefill_chunk // args.prefill_len)})
        by_batch, all_logits = {}, {}
        began = time.monotonic()
        for n in per_forward:
            ids = torch.randint(1, vocab, (n, args.prefill_len), generator=gen).to(device)
            forwards = max(1, args.prefill_prompts // n)
            model(ids, logits_to_keep=1)  # warm-up at the measured shape
            sync(device)
            start = time.perf_counter()
            for _ in range(forwards):
                model(ids, logits_to_keep=1)
            sync(device)
            by_batch[n] = forwards * n * args.prefill_len / (time.perf_counter() - start)
            model(ids)  # the plain forward's own warm-up (its LM head's GEMM shape)
            sync(device)
            start = time.perf_counter()
            model(ids)
            sync(device)
            all_logits[n] = n * args.prefill_len / (time.perf_counter() - start)
            del ids
        out["prefill_tok_s_by_prompts_per_forward"] = by_batch
        out["prefill_tok_s"] = max(by_batch.values())
        out["prefill_tok_s_all_logits_by_prompts_per_forward"] = all_logits
        out["prefill_tok_s_all_logits"] = max(all_logits.values())
        out["prefill_clocks"] = clocks.span(began, time.monotonic())
        print(f"transformers prefill tok/s by prompts per forward: {by_batch} (every position's logits: "
              f"{all_logits})", flush=True)
        for b in args.batches:
            ids = torch.randint(1, vocab, (b, args.prompt), generator=gen).to(device)
            model.generate(ids[:, :16], max_new_tokens=2, do_sample=False, pad_token_id=0)  # warm-up
            sync(device)
            start, began = time.perf_counter(), time.monotonic()
            model.generate(ids, max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens, do_sample=False,
                           pad_token_id=0)  # fmt: skip
            sync(device)
            out[f"decode_b{b}_tok_s"] = b * args.new_tokens / (time.perf_counter() - start)
            out[f"decode_b{b}_clocks"] = clocks.span(began, time.monotonic())
            print(f"transformers batch {b}: {out[f'decode_b{b}_tok_s']:.0f} out tok/s", flush=True)
    # pd serve sizes its KV pool from the memory it finds free: transformers' model (its modules hold reference
    # cycles, so `del` alone keeps it) and its allocator's cached blocks must be gone first, or pd serve runs
    # against the allocation limit (a prefill 20x slower was measured that way).
    del model
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()
        print(f"transformers released: {torch.cuda.memory_reserved() / 2**30:.2f} GiB still reserved", flush=True)
    return out


def _body(ids: list[int], new_tokens: int) -> bytes:
    return json.dumps({"input_ids": ids, "stream": True, "sampling_params": {
        "max_new_tokens": new_tokens, "temperature": 0.0, "ignore_eos": True}}).encode()  # fmt: skip


class _EventCounter(asyncio.Protocol):
    """One streamed request's connection: the arrival time of each `data: ` event as its bytes come in, counted in
    the transport's callback itself (no stream reader, no coroutine woken per read)."""

    def __init__(self, request: bytes) -> None:
        self.request, self.buf, self.times = request, b"", []
        self.done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.status: bytes | None = None
        self.finished = 0  # `data: [DONE]` markers seen

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        transport.write(self.request)  # type: ignore[attr-defined]

    def data_received(self, data: bytes) -> None:
        now = time.perf_counter()
        if self.status is None:  # the status line comes first, in the first read
            self.status = data.split(b"\r\n", 1)[0]
        buf = self.buf + data  # an event marker may straddle two reads
        self.times.extend([now] * (buf.count(b"data: ") - self.buf.count(b"data: ")))
        self.finished += buf.count(b"data: [DONE]") - self.buf.count(b"data: [DONE]")
        self.buf = buf[-12:] if b" 200 " in self.status else buf  # an error's body is kept for its message

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.done.done():
            self.done.set_result(None)


async def _stream(url: str, body: bytes) -> list[float]:
    """Arrival times of each streamed token event of one greedy request (its JSON body ready).

    A bare HTTP/1.1 client: a protocol that counts `data: ` events as bytes arrive, so at hundreds of concurrent
    streams the client is not what the benchmark measures (a full HTTP client library parsing every event costs as
    much per token as the server's whole step; on a 2-core CPU machine, 64 streams of 128 events 2 ms apart cost
    the client 25-28 us of CPU per event with an asyncio stream reader per connection, 18-21 us with this)."""
    host, port = url.removeprefix("http://").split(":")
    request = (b"POST /generate HTTP/1.1\r\nHost: %s\r\nContent-Type: application/json\r\nContent-Length: %d\r\n"
               b"Connection: close\r\n\r\n%s" % (host.encode(), len(body), body))  # fmt: skip
    loop = asyncio.get_running_loop()
    transport, counter = await loop.create_connection(lambda: _EventCounter(request), host, int(port))
    try:
        await counter.done
    finally:
        transport.close()
    if counter.status is None or b" 200 " not in counter.status:
        raise RuntimeError(f"/generate answered {counter.status!r}: {counter.buf[:500]!r}")
    return counter.times[: len(counter.times) - counter.finished]


def run_load(load: Any) -> Any:
    """Runs a client load on uvloop where installed: at tens of thousands of events a second the client's own loop
    must not be what the figures measure."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(load)
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(load)


async def _serve_load(url: str, prompts: list[list[int]], new_tokens: int,
                      began: list[float] | None = None) -> tuple[float, list[list[float]]]:
    """(seconds from the first request's connection to the last answer's end, each request's event times in
    seconds from that start). The bodies are encoded before the clock starts: JSON-encoding 16 prompts of 1024 ids
    is the client's work (~2 ms of one core), not the server's, and transformers' side times its forwards alone."""
    bodies = [_body(p, new_tokens) for p in prompts]
    start = time.perf_counter()
    if began is not None:  # the start on time.monotonic (the clock of the server's records)
        began.append(time.monotonic())
    arrivals = await asyncio.gather(*[_stream(url, b) for b in bodies])
    return time.perf_counter() - start, [[t - start for t in times] for times in arrivals]


async def _batch_load(url: str, prompts: list[list[int]], new_tokens: int, began: list[float] | None = None) -> float:
    """Seconds for one non-streamed /generate request carrying every prompt (SGLang's batch form, what its
    bench_one_batch_server sends): the burst reaches the engine at once, whatever one front's cost per request.
    Encoded before the clock starts, as _serve_load's bodies."""
    body = json.dumps({"input_ids": prompts, "sampling_params": {
        "max_new_tokens": new_tokens, "temperature": 0.0, "ignore_eos": True}}).encode()  # fmt: skip
    start = time.perf_counter()
    if began is not None:
        began.append(time.monotonic())
    await _stream(url, body)
    return time.perf_counter() - start


def _first_tokens_ms(arrivals: list[list[float]]) -> list[float]:
    """[earliest, median, last] of the requests' first-token times (ms from the load's start); [] without any."""
    got = sorted(1e3 * a[0] for a in arrivals if a)
    return [round(got[0], 1), round(got[len(got) // 2], 1), round(got[-1], 1)] if got else []


def profiled_burst(url: str, folder: str, prompts: list[list[int]], with_stack: bool) -> dict[str, object]:
    """One more batched burst under the server's own profiler (/start_profile, /stop_profile; after the measured
    ones: profiling slows the host): its wall time, and each rank's device timeline from its trace (busy time
    against the span of the forward: what the served burst's device did, beside the in-process profile). With
    ``with_stack`` the traces hold the host's Python calls too (slower still): where the engine's host time goes."""
    import httpx

    from pd.engine.profiler import trace_device_events, trace_timeline

    settings = {"output_dir": os.path.abspath(folder), "profile_prefix": "prefill", "with_stack": with_stack,
                "record_shapes": False}  # fmt: skip
    httpx.post(url + "/start_profile", json=settings, timeout=60).raise_for_status()
    elapsed = run_load(_batch_load(url, prompts, 1))
    answer = httpx.post(url + "/stop_profile", timeout=600)
    answer.raise_for_status()
    traces = answer.text.splitlines()[1:]
    timelines = {}
    for trace in traces:
        events = trace_device_events(trace)
        timelines[os.path.basename(trace)] = {**trace_timeline(events), "top_kernels_ms": kernel_totals(events, 12)}
    for name, t in timelines.items():
        print(f"profiled batched burst {1e3 * elapsed:.1f} ms; {name}: {json.dumps(t)}", flush=True)
    return {"prefill_profiled_ms": round(1e3 * elapsed, 2), "prefill_profile": timelines}


def kernel_totals(events: list[tuple[str, float, float]], top: int) -> dict[str, float]:
    """A trace's ``top`` device events (pd.engine.profiler.trace_device_events) by summed time (ms), names cut to 80
    characters: the served forward's kernel table, to set beside profile_decode_step.py's in-process one."""
    totals: dict[str, float] = {}
    for name, _, dur in events:
        totals[name[:80]] = totals.get(name[:80], 0.0) + dur / 1e3
    return {name: round(ms, 3) for name, ms in sorted(totals.items(), key=lambda kv: -kv[1])[:top]}


def bench_pd_serve(path: str, device: str, args: argparse.Namespace, vocab: int,
                   clocks: GpuClocks) -> dict[str, object]:  # fmt: skip
    from tests.server_process import free_port, pd_process

    port = free_port()
    max_bs = max(args.batches)
    argv = ["serve", "--model-path", path, "--device", device, "--dtype", "bfloat16", "--port", str(port),
            "--max-running-requests", str(max(max_bs, args.prefill_prompts)),
            "--chunked-prefill-size", str(args.prefill_chunk), "--log-level", "warning",
            *args.serve_args.split()]  # fmt: skip
    gen = torch.Generator().manual_seed(1)
    # The front runs uvloop where it is installed (a declared dependency; less CPU per streamed event than asyncio's
    # own loop, and the front's CPU bounds decode at large batches): say which one these figures had.
    out: dict[str, object] = {"front_event_loop": "uvloop" if importlib.util.find_spec("uvloop") else "asyncio"}
    log_path = None
    if args.server_log:
        os.makedirs(args.server_log, exist_ok=True)
        log_path = os.path.join(args.server_log, "fp8.log" if "fp8" in args.serve_args else "serve.log")
    with pd_process(argv, port, timeout=900, log_path=log_path) as url:
        run_load(_serve_load(url, [[1, 2, 3]], 4))  # warm-up
        # Fresh random prompts for every run: a repeated prompt would be served from the prefix cache.
        def fresh(n: int, length: int) -> list[list[int]]:
            return [torch.randint(1, vocab, (length,), generator=gen).tolist() for _ in range(n)]

        # The measured shape once: every kernel variant it needs compiles. Then --prefill-bursts bursts of fresh
        # prompts, one after another; the median burst is the figure (one burst is ~70 ms: a single one is noise).
        run_load(_serve_load(url, fresh(args.prefill_prompts, args.prefill_len), 1))
        # Per burst also when each request's first (only) token came: [earliest, median, last] ms from the start.
        bursts, firsts = [], []
        began = time.monotonic()
        for _ in range(args.prefill_bursts):
            prompts = fresh(args.prefill_prompts, args.prefill_len)
            elapsed, arrivals = run_load(_serve_load(url, prompts, 1))
            bursts.append(elapsed)
            firsts.append(_first_tokens_ms(arrivals))
        out["prefill_clocks"] = clocks.span(began, time.monotonic())
        out["prefill_burst_ms"] = [round(1e3 * b, 2) for b in bursts]
        out["prefill_first_token_ms"] = firsts
        out["prefill_tok_s"] = args.prefill_prompts * args.prefill_len / sorted(bursts)[len(bursts) // 2]
        # The same bursts as one batched request each (beside the figure above, not instead of it).
        began = time.monotonic()
        batched = [run_load(_batch_load(url, fresh(args.prefill_prompts, args.prefill_len), 1))
                   for _ in range(args.prefill_bursts)]  # fmt: skip
        out["prefill_batched_clocks"] = clocks.span(began, time.monotonic())
        out["prefill_batched_ms"] = [round(1e3 * b, 2) for b in batched]
        out["prefill_batched_tok_s"] = args.prefill_prompts * args.prefill_len / sorted(batched)[len(batched) // 2]
        if args.profile_prefill:
            out.update(profiled_burst(url, args.profile_prefill, fresh(args.prefill_prompts, args.prefill_len),
                                      args.profile_stack))  # fmt: skip
        for b in args.batches:
            run_load(_serve_load(url, fresh(b, args.prompt), 4))  # warm-up at this batch size
            # --decode-runs runs of the batch, one after another: the median run's tok/s and ITLs count (a single
            # run of a few hundred ms moved by 10-30% between calls on an H200 host)
            began = time.monotonic()
            runs = [run_load(_serve_load(url, fresh(b, args.prompt), args.new_tokens)) for _ in range(args.decode_runs)]
            out[f"decode_b{b}_clocks"] = clocks.span(began, time.monotonic())
            elapsed, arrivals = sorted(runs, key=lambda run: run[0])[len(runs) // 2]
            itl = sorted(1e3 * (t1 - t0) for times in arrivals for t0, t1 in zip(times[1:], times[2:], strict=False))
            out[f"decode_b{b}_runs_tok_s"] = [round(b * args.new_tokens / run[0], 1) for run in runs]
            out[f"decode_b{b}_tok_s"] = b * args.new_tokens / elapsed
            out[f"decode_b{b}_itl_ms_mean"] = sum(itl) / len(itl) if itl else None
            out[f"decode_b{b}_itl_ms_p50"] = itl[len(itl) // 2] if itl else None
            out[f"decode_b{b}_itl_ms_p99"] = itl[min(len(itl) - 1, int(0.99 * len(itl)))] if itl else None
            # The run's start: until its last request's first token the batch is not whole (prompts still arriving
            # or prefilling); a run lasts about that plus (new tokens - 1) steps.
            out[f"decode_b{b}_first_token_ms"] = _first_tokens_ms(arrivals)
            print(f"pd serve batch {b}: {out[f'decode_b{b}_tok_s']:.0f} out tok/s, ITL p50 "
                  f"{out[f'decode_b{b}_itl_ms_p50']} ms, first tokens [earliest, median, last] "
                  f"{out[f'decode_b{b}_first_token_ms']} ms", flush=True)  # fmt: skip
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=("qwen3", "deepseek"), default="qwen3")
    parser.add_argument("--layers", type=int, default=None)
    parser.add_argument("--batches", default="1,16,64,256")
    parser.add_argument("--prompt", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--prefill-prompts", type=int, default=16)
    parser.add_argument("--prefill-len", type=int, default=1024)
    parser.add_argument("--prefill-bursts", type=int, default=5, help="measured prefill bursts (the median counts)")
    parser.add_argument("--prefill-chunk", type=int, default=8192,
                        help="pd serve's --chunked-prefill-size; transformers' prefill then also runs forwards of as "
                             "many prompts as one chunk holds (beside 8), the faster being the reference")
    parser.add_argument("--decode-runs", type=int, default=3, help="measured runs per decode batch (the median counts)")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--tiny", action="store_true", help="small widths: a smoke run of the procedure")
    parser.add_argument("--out", default=None)
    parser.add_argument("--serve-args", default="", help="extra `pd serve` flags, e.g. --disable-overlap-schedule")
    parser.add_argument("--server-log", default=None, help="keep each server's log in this folder (serve.log, "
                        "fp8.log); with --serve-args '--log-level info' it holds the engine's step lines")
    parser.add_argument("--profile-prefill", default=None, metavar="DIR",
                        help="after the measured bursts, one batched burst under the server's profiler: its traces "
                        "go to DIR, each rank's device timeline to the JSON")  # fmt: skip
    parser.add_argument("--profile-stack", action="store_true",
                        help="--profile-prefill's traces with the host's Python calls (with_stack)")
    parser.add_argument("--skip-transformers", action="store_true", help="pd serve only (no ratios to transformers)")
    parser.add_argument("--fp8-batches", default="64",
                        help="decode batch sizes to serve again with --quantization fp8 in the same run ('' = none)")
    args = parser.parse_args()
    args.batches = [int(b) for b in args.batches.split(",")]
    args.fp8_batches = [int(b) for b in args.fp8_batches.split(",") if b]
    layers = args.layers or (8 if args.model == "qwen3" else 2)
    config = model_config(args.model, layers, args.tiny)
    bandwidth = copy_bandwidth(args.device)
    gemm_rate = matmul_rate(args.device)
    # the card's clocks while each figure is measured (a card that slows under sustained load would favour what
    # runs first)
    clocks = GpuClocks(gpu_uuid(), enabled=args.device == "cuda")
    try:
        with tempfile.TemporaryDirectory() as path:
            write_checkpoint(path, config, args.device)
            hf = {} if args.skip_transformers else bench_transformers(path, args.device, args, clocks)
            ours = bench_pd_serve(path, args.device, args, config.vocab_size, clocks)
            fp8 = {}
            if args.fp8_batches:  # the same checkpoint quantized at load, served after the bf16 server has exited
                fp8_args = argparse.Namespace(**{**vars(args), "batches": args.fp8_batches,
                                                 "serve_args": f"{args.serve_args} --quantization fp8"})  # fmt: skip
                fp8 = bench_pd_serve(path, args.device, fp8_args, config.vocab_size, clocks)
    finally:
        clocks.close()
    rows = []
    for b in args.batches:
        roof = b / (step_bytes(config, b, args.prompt + args.new_tokens // 2) / bandwidth)
        got, ref = ours[f"decode_b{b}_tok_s"], hf.get(f"decode_b{b}_tok_s", float("nan"))
        # The inter-token latency against the roofline's step time (batch 1's acceptance is stated on the ITL; the
        # out tok/s above also holds the time to the first token).
        roof_step_ms = 1e3 * b / roof
        itl_p50, itl_mean = ours[f"decode_b{b}_itl_ms_p50"], ours.get(f"decode_b{b}_itl_ms_mean")
        rows.append({"batch": b, "pd_tok_s": got, "hf_tok_s": ref, "x_hf": got / ref, "roofline_tok_s": roof,
                     "roofline_over_pd": roof / got, "itl_p50_ms": itl_p50,
                     "itl_p99_ms": ours[f"decode_b{b}_itl_ms_p99"], "itl_mean_ms": itl_mean,
                     "roofline_step_ms": roof_step_ms,
                     "itl_p50_over_roofline": itl_p50 / roof_step_ms if itl_p50 else None,
                     "itl_mean_over_roofline": itl_mean / roof_step_ms if itl_mean else None})  # fmt: skip
    print(f"\ncopy bandwidth {bandwidth / 1e9:.0f} GB/s; prefill: pd serve {ours['prefill_tok_s']:.0f} tok/s, "
          f"transformers {hf.get('prefill_tok_s', float('nan')):.0f} "
          f"({ours['prefill_tok_s'] / hf.get('prefill_tok_s', float('nan')):.2f}x; against transformers' plain "
          f"forward, every position's logits: {hf.get('prefill_tok_s_all_logits', float('nan')):.0f} tok/s, "
          f"{ours['prefill_tok_s'] / hf.get('prefill_tok_s_all_logits', float('nan')):.2f}x)")  # fmt: skip
    # The prefill's compute roofline: its matmul FLOPs at the rate of one large bf16 GEMM of this run.
    flops = prefill_flops(config, args.prefill_prompts, args.prefill_len)
    roof_tok_s = args.prefill_prompts * args.prefill_len / (flops / gemm_rate)
    print(f"prefill compute roofline: {flops / 1e12:.1f} TFLOP at {gemm_rate / 1e12:.0f} TFLOP/s (one "
          f"large square bf16 GEMM) = {roof_tok_s:.0f} tok/s; pd serve at "
          f"{ours['prefill_tok_s'] / roof_tok_s:.2f} of it (batched "
          f"{ours['prefill_batched_tok_s'] / roof_tok_s:.2f}), transformers at "
          f"{hf.get('prefill_tok_s', float('nan')) / roof_tok_s:.2f}: no server could be more than "
          f"{roof_tok_s / hf.get('prefill_tok_s', float('nan')):.2f}x transformers here")  # fmt: skip
    print(f"prefill as one batched /generate request per burst: {ours['prefill_batched_tok_s']:.0f} tok/s "
          f"({ours['prefill_batched_tok_s'] / hf.get('prefill_tok_s', float('nan')):.2f}x), bursts (ms) "
          f"{ours['prefill_batched_ms']}")  # fmt: skip
    print(f"prefill bursts (ms): {ours['prefill_burst_ms']}; first tokens [earliest, median, last] ms: "
          f"{ours['prefill_first_token_ms']}; the front's event loop: {ours['front_event_loop']}")  # fmt: skip
    print(f"the GPU during prefill: transformers {describe(hf.get('prefill_clocks'))}; pd serve concurrent "
          f"{describe(ours['prefill_clocks'])}, batched {describe(ours['prefill_batched_clocks'])}")  # fmt: skip
    print(f"{'batch':>5} {'pd tok/s':>10} {'hf tok/s':>10} {'x hf':>6} {'roofline':>10} {'roof/pd':>8} "
          f"{'ITL p50':>8} {'ITL p99':>8} {'ITL mean':>8} {'roof ms':>8} {'p50/roof':>8} {'mean/roof':>9}")  # fmt: skip
    for r in rows:
        print(f"{r['batch']:>5} {r['pd_tok_s']:>10.0f} {r['hf_tok_s']:>10.0f} {r['x_hf']:>6.2f} "
              f"{r['roofline_tok_s']:>10.0f} {r['roofline_over_pd']:>8.2f} {r['itl_p50_ms'] or 0:>8.2f} "
              f"{r['itl_p99_ms'] or 0:>8.2f} {r['itl_mean_ms'] or 0:>8.2f} {r['roofline_step_ms']:>8.3f} "
              f"{r['itl_p50_over_roofline'] or 0:>8.2f} {r['itl_mean_over_roofline'] or 0:>9.2f}")  # fmt: skip
    fp8_rows = []
    for b in args.fp8_batches:
        roof = b / (step_bytes(config, b, args.prompt + args.new_tokens // 2, fp8=True) / bandwidth)
        got, bf16 = fp8[f"decode_b{b}_tok_s"], ours.get(f"decode_b{b}_tok_s", float("nan"))
        fp8_rows.append({"batch": b, "fp8_tok_s": got, "bf16_tok_s": bf16, "fp8_over_bf16": got / bf16,
                         "fp8_roofline_tok_s": roof, "roofline_over_fp8": roof / got,
                         "itl_p50_ms": fp8[f"decode_b{b}_itl_ms_p50"]})  # fmt: skip
    if fp8_rows:
        print(f"\n--quantization fp8 (prefill {fp8['prefill_tok_s']:.0f} tok/s)")
        print(f"{'batch':>5} {'fp8 tok/s':>10} {'bf16 tok/s':>10} {'x bf16':>7} {'fp8 roofline':>13} {'roof/fp8':>8}")
        for r in fp8_rows:
            print(f"{r['batch']:>5} {r['fp8_tok_s']:>10.0f} {r['bf16_tok_s']:>10.0f} {r['fp8_over_bf16']:>7.2f} "
                  f"{r['fp8_roofline_tok_s']:>13.0f} {r['roofline_over_fp8']:>8.2f}")  # fmt: skip
    if args.out:
        device_name = torch.cuda.get_device_name() if args.device == "cuda" else "cpu"
        with open(args.out, "w") as f:
            json.dump({"device": device_name, "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                       "args": vars(args), "copy_bandwidth_GBps": bandwidth / 1e9,
                       "prefill_roofline": {"tflop": flops / 1e12, "gemm_tflop_s": gemm_rate / 1e12,
                                            "tok_s": roof_tok_s},
                       "transformers_version": transformers_version(), "transformers": hf,
                       "pd_serve": ours, "decode": rows, "pd_serve_fp8": fp8, "decode_fp8": fp8_rows}, f,
                      indent=1)  # fmt: skip


if __name__ == "__main__":
    main()
