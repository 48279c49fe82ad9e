"""Host time per call of each piece of the torch backend's normal mode over symmetric memory, and of a whole
dispatch + combine pair, at 128 tokens per rank (hidden 7168 bf16, top-8 of 256 experts), EP = every visible GPU.

Each piece is called 300 times in a row (100 for the host sync and the pair) after 20 untimed calls, on every
rank at once; the table prints microseconds per call, one column per rank. Diagnosis, not a benchmark: see
benchmarks/results/README.md (EP=4 section).

Usage: python3 benchmarks/symm_host_times.py   (from the repository root, on a machine with >= 2 GPUs)
"""

import os
import socket
import sys
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import triton

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from pd.moe.context import MoeContext  # noqa: E402
from pd.moe.dispatcher import get_dispatcher  # noqa: E402
from pd.moe.dispatcher import symm_kernels as sk  # noqa: E402
from pd.moe.dispatcher.base import CombineInput  # noqa: E402
from pd.moe.dispatcher.payload import row_layout  # noqa: E402
from pd.moe.topk import TopKOutput  # noqa: E402


def worker(rank: int, world: int, port: int) -> None:
    torch.cuda.set_device(rank)
    dist.init_process_group("nccl", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            device_id=torch.device("cuda", rank))  # fmt: skip
    g, dev = dist.group.WORLD, torch.device("cuda", rank)
    T, H, K, E = 128, 7168, 8, 256
    L, dt = E // world, torch.bfloat16
    x = torch.randn(T, H, device=dev).to(dt)
    ids = torch.rand(T, E, device=dev).topk(K, dim=-1).indices
    w = torch.rand(T, K, device=dev)
    ctx = MoeContext(ep_rank=rank, ep_size=world, group=g)  # the dispatcher below reuses these buffers
    meta = ctx.comm.symmetric_meta(g, dev)
    ids_at, rb = row_layout(H, dt, K)
    ex = ctx.comm.symmetric_exchange(g, 256, rb, H, dt, dev)
    pos = sk.route(ids, meta.peer_ptrs, rank, L)
    meta.barrier()
    torch.cuda.synchronize()
    counts = meta.buffer[:, 0].clone()
    N = int(counts.sum())
    P = triton.next_power_of_2(K)
    res: dict[str, float] = {}

    def host(name: str, fn, n: int = 300) -> None:  # noqa: ANN001
        for _ in range(20):
            fn()
        torch.cuda.synchronize()
        dist.barrier()
        t0 = time.perf_counter()
        for _ in range(n):
            fn()
        t1 = time.perf_counter()
        torch.cuda.synchronize()
        res[name] = (t1 - t0) / n * 1e6

    host("route wrapper", lambda: sk.route(ids, meta.peer_ptrs, rank, L))
    args = (ids, pos, meta.peer_ptrs, T, rank, L)
    host("route jit", lambda: sk._route_kernel[(world,)](*args, TOP_K=K, SLOTS=P, BLOCK_T=128))
    compiled = sk._route_kernel[(world,)](*args, TOP_K=K, SLOTS=P, BLOCK_T=128)
    runner = compiled[(world, 1, 1)]  # the compiled kernel's own launcher: no argument binding
    host("route compiled runner", lambda: runner(*args, K, P, 128))
    host("send wrapper", lambda: sk.send_rows(x, ids, w, pos, ex.dispatch_peer_ptrs, 256, rank, L, ids_at, rb,
                                              all_rows=False))  # fmt: skip
    host("unpack wrapper", lambda: sk.unpack_rows(ex.dispatch_buffer, counts, N, H, dt, K, rank, L, ids_at))
    xN = torch.randn(N, H, device=dev).to(dt)
    host("send_back wrapper", lambda: sk.send_back(xN, counts, ex.combine_peer_ptrs, 256, rank))
    host("reduce wrapper", lambda: sk.reduce_partials(ex.combine_buffer, pos))
    host("barrier", lambda: meta.barrier())
    host("torch.empty", lambda: torch.empty(N, H, dtype=dt, device=dev))
    host("clone col", lambda: meta.buffer[:, 0].clone())
    host("tolist (sync)", lambda: meta.buffer.tolist(), n=100)
    host("add_", lambda: w.add_(0))
    d = get_dispatcher("torch", ctx, num_experts=E, mode="normal")

    def pair() -> None:
        out = d.dispatch(x, TopKOutput(ids, w, None))
        d.combine(CombineInput(out.hidden_states, out.handle))

    host("normal pair", pair, n=100)
    everyone: list = [None] * world
    dist.all_gather_object(everyone, res)
    if rank == 0:
        for k in res:
            print(f"{k:24s} " + " ".join(f"{r[k]:7.1f}" for r in everyone))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    n = torch.cuda.device_count()
    mp.spawn(worker, args=(n, port), nprocs=n)
