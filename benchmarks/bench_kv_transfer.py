"""KV transfer throughput: the Mooncake backend moving one prompt's KV pages from a prefill to a decode manager,
against a raw loopback TCP socket moving the same bytes, measured in the same run.

Both managers live in this process (Mooncake's TCP transport moves the bytes on its own threads, through the
kernel's loopback, as between two processes). Buffers are laid out like pd's KV cache: for every layer a K and
a V buffer of fp32 [num_pages * page_size, kv_heads, head_dim]. The prompt's pages go once into contiguous
decode pages (one region per buffer) and once into shuffled ones (one region per page per buffer, like a
decode pool fragmented by churn). Mooncake time: sender.send() to the receiver's Success (the status message
with the first token included). TCP time: first sendall() to the receiver's 1-byte ack. MB = 1e6 bytes.

Usage: python benchmarks/bench_kv_transfer.py [--tokens 4096] [--layers 4] [--kv-heads 2] [--head-dim 64]
"""

from __future__ import annotations

import argparse
import os
import random
import socket
import statistics
import sys
import threading
import time
from typing import Any

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from kvtransfer.base import FirstToken, KVArgs, KVPoll  # noqa: E402

HOST = "127.0.0.1"
LAYOUTS = ("contiguous", "shuffled")


def _kv_args(bufs: list[torch.Tensor], page_size: int, num_layers: int) -> KVArgs:
    nbytes = [b.numel() * b.element_size() for b in bufs]
    item_lens = [b[0].numel() * b.element_size() for b in bufs]
    fingerprint = {"architecture": "Qwen3MoeForCausalLM", "num_layers": num_layers, "dtype": "float32"}
    return KVArgs(0, [b.data_ptr() for b in bufs], item_lens, page_size, fingerprint, nbytes)


def mooncake_mbps(src: list[torch.Tensor], dst: list[torch.Tensor], num_tokens: int, page_size: int,
                  layout: str, repeats: int) -> list[float]:
    """MB/s of `repeats` timed transfers (after one untimed) of the first num_tokens slots' pages of every src
    buffer [slots, heads, dim] into dst pages (`layout`: contiguous or shuffled). Raises AssertionError if a
    transfer fails or the bytes land in the wrong place."""
    from kvtransfer.mooncake import MooncakeKVManager, MooncakeKVReceiver, MooncakeKVSender

    pages, pool_pages = -(-num_tokens // page_size), src[0].shape[0] // page_size
    nbytes = sum(b[0].numel() * b.element_size() for b in src) * pages * page_size
    pre = MooncakeKVManager(_kv_args(src, page_size, len(src) // 2), "prefill", HOST, (HOST, 0), serve_bootstrap=True)
    dec = MooncakeKVManager(_kv_args(dst, page_size, len(dst) // 2), "decode", HOST)
    out = []
    try:
        assert pre.bootstrap is not None
        for i in range(repeats + 1):
            dst_pages = list(range(pages)) if layout == "contiguous" else random.sample(range(pool_pages), pages)
            room = random.getrandbits(63)
            sender, receiver = MooncakeKVSender(pre, room), MooncakeKVReceiver(dec, HOST, pre.bootstrap[1], room)
            receiver.init(dst_pages, num_tokens)
            while sender.poll() == KVPoll.Bootstrapping:  # decode's registration, not part of the timing
                time.sleep(0.0005)
            t0 = time.perf_counter()
            sender.send(list(range(pages)), num_tokens, FirstToken(1, num_tokens))
            while receiver.poll() not in (KVPoll.Success, KVPoll.Failed):
                time.sleep(0.0001)
            seconds = time.perf_counter() - t0
            assert receiver.poll() == KVPoll.Success, receiver.failure_reason
            if i:
                out.append(nbytes / seconds / 1e6)
        last = dst_pages[-1] * page_size  # spot check: the prompt's last page in every buffer
        for s, d in zip(src, dst, strict=True):
            assert torch.equal(d[last:last + page_size], s[(pages - 1) * page_size:pages * page_size])
    finally:
        pre.close()
        dec.close()
    return out


def raw_tcp_mbps(src: list[torch.Tensor], dst: list[torch.Tensor], repeats: int) -> list[float]:
    """MB/s of sendall() of every (contiguous) src tensor into the matching dst tensor over one loopback TCP
    connection with TCP_NODELAY; `repeats` timed rounds after one untimed."""
    views_in = [memoryview(b.numpy()).cast("B") for b in dst]
    listener = socket.create_server((HOST, 0))

    def serve() -> None:
        conn, _ = listener.accept()
        with conn:
            for _ in range(repeats + 1):
                for view in views_in:
                    got = 0
                    while got < len(view):
                        got += conn.recv_into(view[got:])
                conn.sendall(b"k")

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    out, nbytes = [], sum(len(v) for v in views_in)
    with socket.create_connection(listener.getsockname()) as sock:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        for i in range(repeats + 1):
            t0 = time.perf_counter()
            for b in src:
                sock.sendall(memoryview(b.numpy()).cast("B"))
            assert sock.recv(1) == b"k"
            if i:
                out.append(nbytes / (time.perf_counter() - t0) / 1e6)
    thread.join(10)
    listener.close()
    assert all(torch.equal(s, d) for s, d in zip(src, dst, strict=True)), "TCP bytes differ"
    return out


def bench_kv(num_layers: int, kv_heads: int, head_dim: int, num_tokens: int = 4096, page_size: int = 16,
             repeats: int = 20) -> dict[str, Any]:
    """Median MB/s of Mooncake (per layout) and raw TCP moving one num_tokens prompt's KV, and their ratios."""
    pages = -(-num_tokens // page_size)
    # The decode pool has twice the prompt's pages, so shuffled destinations are spread over a larger pool.
    src = [torch.randn(pages * page_size, kv_heads, head_dim) for _ in range(2 * num_layers)]
    dst = [torch.zeros(2 * pages * page_size, kv_heads, head_dim) for _ in range(2 * num_layers)]
    result: dict[str, Any] = {"num_tokens": num_tokens, "page_size": page_size, "repeats": repeats,
                              "bytes": sum(b[:pages * page_size].numel() * 4 for b in src)}  # fmt: skip
    for layout in LAYOUTS:
        result[f"mooncake_{layout}_MBps"] = statistics.median(
            mooncake_mbps(src, dst, num_tokens, page_size, layout, repeats))
    prompt = pages * page_size
    result["raw_tcp_MBps"] = statistics.median(raw_tcp_mbps([b[:prompt] for b in src],
                                                            [b[:prompt] for b in dst], repeats))
    for layout in LAYOUTS:
        result[f"{layout}_vs_tcp"] = result[f"mooncake_{layout}_MBps"] / result["raw_tcp_MBps"]
    return result


def format_kv(kv: dict[str, Any]) -> str:
    return (f"KV transfer of {kv['num_tokens']} tokens ({kv['bytes'] / 2**20:.1f} MiB): mooncake "
            f"{kv['mooncake_contiguous_MBps']:.0f} MB/s into contiguous pages, {kv['mooncake_shuffled_MBps']:.0f} "
            f"MB/s into shuffled pages; raw TCP {kv['raw_tcp_MBps']:.0f} MB/s; mooncake / TCP "
            f"{kv['contiguous_vs_tcp']:.3f} (contiguous), {kv['shuffled_vs_tcp']:.3f} (shuffled)")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", type=int, default=4096, help="prompt length (default: 4096)")
    p.add_argument("--layers", type=int, default=4, help="layers, each with a K and a V buffer (default: 4)")
    p.add_argument("--kv-heads", type=int, default=2, help="KV heads (default: 2)")
    p.add_argument("--head-dim", type=int, default=64, help="head dim (default: 64)")
    p.add_argument("--page-size", type=int, default=16, help="tokens per KV page (default: 16)")
    p.add_argument("--repeats", type=int, default=20, help="timed transfers per measurement (default: 20)")
    a = p.parse_args()
    print(format_kv(bench_kv(a.layers, a.kv_heads, a.head_dim, a.tokens, a.page_size, a.repeats)))


if __name__ == "__main__":
    main()
