"""Device time of each kernel of the torch backend's symmetric-memory transport, without host cost.

128 tokens per rank, hidden 7168 bf16, top-8 of 256 experts, EP = every visible GPU (one process each). Each
kernel (and each block size / warp count tried) is captured 20 times in one CUDA graph, replayed 5 times; the
table prints microseconds per launch, the largest over the ranks. Every rank runs the same sequence, so the
peer writes contend as they do in a real exchange. Diagnosis, not a benchmark: see
benchmarks/results/README.md (EP=4 section).

Usage: python3 benchmarks/symm_kernel_times.py   (from the repository root, on a machine with >= 2 GPUs)
"""
# ruff: noqa: B023 - each lambda is captured and timed within its own loop turn

import itertools
import os
import socket
import sys

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import triton

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from pd.moe.dispatcher import symm_kernels as sk  # noqa: E402
from pd.moe.dispatcher.comm_resources import CommResources  # noqa: E402
from pd.moe.dispatcher.payload import row_layout  # noqa: E402


def worker(rank: int, world: int, port: int) -> None:
    torch.cuda.set_device(rank)
    dist.init_process_group("nccl", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            device_id=torch.device("cuda", rank))  # fmt: skip
    g, dev = dist.group.WORLD, torch.device("cuda", rank)
    T, H, K, E = 128, 7168, 8, 256
    L, dt = E // world, torch.bfloat16
    torch.manual_seed(rank)
    x = torch.randn(T, H, device=dev).to(dt)
    ids = torch.rand(T, E, device=dev).topk(K, dim=-1).indices
    w = torch.rand(T, K, device=dev)
    comm = CommResources()
    meta = comm.symmetric_meta(g, dev)
    ids_at, rb = row_layout(H, dt, K)
    exn, exl = comm.symmetric_exchange(g, 256, rb, H, dt, dev), comm.symmetric_exchange(g, 128, rb, H, dt, dev)
    pos = sk.route(ids, meta.peer_ptrs, rank, L)
    meta.barrier()
    torch.cuda.synchronize()
    counts = meta.buffer[:, 0].clone()
    N = int(counts.sum())
    words, hw = x.view(torch.int64), H * 2 // 8
    xN = torch.randn(N, H, device=dev).to(dt)
    res: dict[str, float] = {}

    def timeit(name: str, fn, n: int = 20) -> None:  # noqa: ANN001
        fn()
        torch.cuda.synchronize()
        dist.barrier()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            for _ in range(n):
                fn()
        graph.replay()
        torch.cuda.synchronize()
        dist.barrier()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(5):
            graph.replay()
        end.record()
        torch.cuda.synchronize()
        res[name] = start.elapsed_time(end) * 1e3 / (5 * n)

    P = triton.next_power_of_2(K)
    for bt, nw in itertools.product((32, 64, 128), (1, 2, 4)):
        timeit(f"route BT{bt} w{nw}", lambda: sk._route_kernel[(world,)](
            ids, pos, meta.peer_ptrs, T, rank, L, TOP_K=K, SLOTS=P, BLOCK_T=bt, num_warps=nw))  # fmt: skip
    for blk, nw in itertools.product((256, 512, 1024, 2048), (2, 4, 8, 16)):
        timeit(f"send_normal B{blk} w{nw}", lambda: sk._send_rows_kernel[(T, world)](
            words, ids, w, pos, exn.dispatch_peer_ptrs, T, 256, rank, L, hw, ids_at, rb, ALL_ROWS=False, TOP_K=K,
            SLOTS=P, BLOCK=blk, num_warps=nw))  # fmt: skip
        timeit(f"send_ll B{blk} w{nw}", lambda: sk._send_rows_kernel[(128, world)](
            words, ids, w, pos, exl.dispatch_peer_ptrs, T, 128, rank, L, hw, ids_at, rb, ALL_ROWS=True, TOP_K=K,
            SLOTS=P, BLOCK=blk, num_warps=nw))  # fmt: skip
        hN = torch.empty(N, H, dtype=dt, device=dev)
        iN = torch.empty(N, K, dtype=torch.int64, device=dev)
        wN = torch.empty(N, K, device=dev)
        vN = torch.empty(N, dtype=torch.bool, device=dev)
        timeit(f"unpack B{blk} w{nw}", lambda: sk._unpack_rows_kernel[(N,)](
            exn.dispatch_buffer.view(torch.int64), counts, hN.view(torch.int64), iN, wN, vN, 256, rank, L, hw, ids_at,
            rb, RANKS=world, TOP_K=K, SLOTS=P, BLOCK=blk, num_warps=nw))  # fmt: skip
        xw = xN.view(torch.int64)
        timeit(f"send_back B{blk} w{nw}", lambda: sk._send_back_kernel[(N,)](
            xw, counts, exn.combine_peer_ptrs, 256, rank, xw.shape[1], RANKS=world, BLOCK=blk, num_warps=nw))
        out = torch.empty(T, H, dtype=dt, device=dev)
        timeit(f"reduce B{blk} w{nw}", lambda: sk._reduce_partials_kernel[(T,)](
            exn.combine_buffer, pos, out, T, 256, H, RANKS=world, BLOCK=blk, num_warps=nw))  # fmt: skip
    timeit("barrier", lambda: exn.barrier())
    timeit("meta_barrier", lambda: meta.barrier())
    everyone: list = [None] * world
    dist.all_gather_object(everyone, res)
    if rank == 0:
        print(f"N rows on rank0 {N}; us per launch, max over ranks")
        for k in res:
            print(f"{k:28s} {max(r[k] for r in everyone):8.1f}")
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    n = torch.cuda.device_count()
    mp.spawn(worker, args=(n, port), nprocs=n)
