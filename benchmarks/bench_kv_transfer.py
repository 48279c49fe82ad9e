"""KV transfer throughput: the Mooncake backend moving one prompt's KV pages from a prefill to a decode manager,
against a raw loopback TCP socket moving the same bytes, measured in the same run.

Both managers live in this process (Mooncake's TCP transport moves the bytes on its own threads, through the
kernel's loopback, as between two processes). Buffers are laid out like pd's KV cache: for every layer a K and
a V buffer of fp32 [num_pages * page_size, kv_heads, head_dim]. The prompt's pages go from contiguous prefill
pages into contiguous decode pages (one region per buffer), into shuffled ones (like a decode pool fragmented
by churn: without staging one region per page per buffer), and from shuffled prefill pages into shuffled
decode pages (both pools fragmented). Mooncake time: sender.send() to the receiver's Success (the status message
with the first token included, and so decode's copy out of its staging area). TCP time: first sendall() to the
receiver's 1-byte ack. MB = 1e6 bytes. CPU: the process's CPU time (both ends, every thread) per timed transfer,
which says whether a transport is bound by the machine's cores.

Measures take turns in blocks (a block: one untimed transfer, BLOCK timed ones back to back, then one more with
the destination pages zeroed before and every byte compared with the prefill's after), in a rotated order, so that
other load on the machine slows every measure alike; the result is the median over the timed transfers.

Usage: python benchmarks/bench_kv_transfer.py [--tokens 4096] [--layers 4] [--kv-heads 2] [--head-dim 64]
       [--staging-bytes N (0: no staging, one region per run of pages)]
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
from collections.abc import Callable
from typing import Any

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from kvtransfer.base import FirstToken, KVArgs, KVPoll  # noqa: E402

HOST = "127.0.0.1"
BLOCK = 5  # timed transfers per turn
LAYOUTS = ("contiguous", "shuffled", "both_shuffled")  # prefill -> decode pages: in order -> in order, ...


def _kv_args(bufs: list[torch.Tensor], page_size: int, num_layers: int) -> KVArgs:
    nbytes = [b.numel() * b.element_size() for b in bufs]
    item_lens = [b[0].numel() * b.element_size() for b in bufs]
    fingerprint = {"architecture": "Qwen3MoeForCausalLM", "num_layers": num_layers, "dtype": "float32"}
    return KVArgs(0, [b.data_ptr() for b in bufs], item_lens, page_size, fingerprint, nbytes)


class MooncakePair:
    """A prefill and a decode manager over src and dst buffers [slots, heads, dim] (both with staging_bytes)."""

    def __init__(self, src: list[torch.Tensor], dst: list[torch.Tensor], page_size: int, staging_bytes: int) -> None:
        from kvtransfer.mooncake import MooncakeKVManager

        self.src, self.dst, self.page_size = src, dst, page_size
        self.pre = MooncakeKVManager(_kv_args(src, page_size, len(src) // 2), "prefill", HOST, (HOST, 0),
                                     serve_bootstrap=True, staging_bytes=staging_bytes)
        self.dec = MooncakeKVManager(_kv_args(dst, page_size, len(dst) // 2), "decode", HOST,
                                     staging_bytes=staging_bytes)

    def pages(self, layout: str, num_pages: int) -> tuple[list[int], list[int]]:
        """(prefill pages, decode pages) of a num_pages prompt in `layout`, fresh random ones when shuffled."""
        src_pool, dst_pool = self.src[0].shape[0] // self.page_size, self.dst[0].shape[0] // self.page_size
        src = random.sample(range(src_pool), num_pages) if layout == "both_shuffled" else list(range(num_pages))
        dst = list(range(num_pages)) if layout == "contiguous" else random.sample(range(dst_pool), num_pages)
        return src, dst

    def transfer(self, src_pages: list[int], dst_pages: list[int], num_tokens: int, check: bool = False) -> float:
        """Seconds from send() to the receiver's Success. Raises AssertionError if the transfer fails, or (check)
        if a byte of a destination page, zeroed before, differs from its source page."""
        from kvtransfer.mooncake import MooncakeKVReceiver, MooncakeKVSender

        ps = self.page_size
        for d in self.dst if check else []:
            d.unflatten(0, (-1, ps))[dst_pages] = 0
        room = random.getrandbits(63)
        assert self.pre.bootstrap is not None
        sender = MooncakeKVSender(self.pre, room)
        receiver = MooncakeKVReceiver(self.dec, HOST, self.pre.bootstrap[1], room)
        receiver.init(dst_pages, num_tokens)
        while sender.poll() == KVPoll.Bootstrapping:  # decode's registration, not part of the timing
            time.sleep(0.0005)
        t0 = time.perf_counter()
        sender.send(src_pages, num_tokens, FirstToken(1, num_tokens))
        while receiver.poll() not in (KVPoll.Success, KVPoll.Failed):
            time.sleep(0.0001)
        seconds = time.perf_counter() - t0
        assert receiver.poll() == KVPoll.Success, receiver.failure_reason
        for s, d in zip(self.src, self.dst, strict=True) if check else []:
            assert torch.equal(d.unflatten(0, (-1, ps))[dst_pages], s.unflatten(0, (-1, ps))[src_pages]), \
                "decode pages differ from prefill's"
        return seconds

    def close(self) -> None:
        self.pre.close()
        self.dec.close()


class TcpPair:
    """One loopback TCP connection (TCP_NODELAY) that moves every src tensor into the matching dst tensor."""

    def __init__(self, src: list[torch.Tensor], dst: list[torch.Tensor]) -> None:
        self.src, self.dst = src, dst
        self._views_in = [memoryview(b.numpy()).cast("B") for b in dst]
        self._listener = socket.create_server((HOST, 0))
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()
        self._sock = socket.create_connection(self._listener.getsockname())
        self._sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def _serve(self) -> None:
        conn, _ = self._listener.accept()
        with conn:
            while True:
                for view in self._views_in:
                    got = 0
                    while got < len(view):
                        n = conn.recv_into(view[got:])
                        if n == 0:
                            return
                        got += n
                conn.sendall(b"k")

    def transfer(self, check: bool = False) -> float:
        """Seconds from the first sendall() to the receiver's ack. Raises AssertionError if (check) the bytes, zeroed
        before, differ."""
        for d in self.dst if check else []:
            d.zero_()
        t0 = time.perf_counter()
        for b in self.src:
            self._sock.sendall(memoryview(b.numpy()).cast("B"))
        assert self._sock.recv(1) == b"k"
        seconds = time.perf_counter() - t0
        assert not check or all(torch.equal(s, d) for s, d in zip(self.src, self.dst, strict=True)), "TCP bytes differ"
        return seconds

    def close(self) -> None:
        self._sock.close()
        self._thread.join(10)
        self._listener.close()


def bench_kv(num_layers: int, kv_heads: int, head_dim: int, num_tokens: int = 4096, page_size: int = 16,
             repeats: int = 20, staging_bytes: int | None = None) -> dict[str, Any]:
    """Median MB/s of Mooncake (per layout) and raw TCP moving one num_tokens prompt's KV, at least `repeats`
    timed transfers each, and their ratios. staging_bytes: the managers' staging memory (None: the backend's
    default; 0: no staging)."""
    from kvtransfer.mooncake import STAGING_BYTES

    staging_bytes = STAGING_BYTES if staging_bytes is None else staging_bytes
    pages = -(-num_tokens // page_size)
    prompt = pages * page_size
    # The decode pool has twice the prompt's pages, so shuffled destinations are spread over a larger pool.
    src = [torch.randn(prompt, kv_heads, head_dim) for _ in range(2 * num_layers)]
    dst = [torch.zeros(2 * prompt, kv_heads, head_dim) for _ in range(2 * num_layers)]
    nbytes = sum(b.numel() * b.element_size() for b in src)
    mooncake = MooncakePair(src, dst, page_size, staging_bytes)
    tcp = TcpPair(src, [d[:prompt] for d in dst])
    measures: dict[str, Callable[[bool], float]] = {
        layout: (lambda check, layout=layout: mooncake.transfer(*mooncake.pages(layout, pages), num_tokens, check))
        for layout in LAYOUTS
    } | {"raw_tcp": tcp.transfer}
    seconds: dict[str, list[float]] = {name: [] for name in measures}
    cpu: dict[str, list[float]] = {name: [] for name in measures}  # process CPU seconds per transfer, per block
    try:
        for i in range(-(-repeats // BLOCK)):
            names = list(measures)
            for name in names[i % len(names):] + names[:i % len(names)]:
                measures[name](False)
                c0 = time.process_time()
                seconds[name] += [measures[name](False) for _ in range(BLOCK)]
                cpu[name].append((time.process_time() - c0) / BLOCK)
                measures[name](True)
    finally:
        tcp.close()
        mooncake.close()
    mbps = {name: statistics.median(nbytes / s / 1e6 for s in ss) for name, ss in seconds.items()}
    result: dict[str, Any] = {"num_tokens": num_tokens, "page_size": page_size, "repeats": repeats,
                              "bytes": nbytes, "staging_bytes": staging_bytes, "raw_tcp_MBps": mbps["raw_tcp"],
                              "raw_tcp_cpu_ms": statistics.median(cpu["raw_tcp"]) * 1e3}
    for layout in LAYOUTS:
        result[f"mooncake_{layout}_MBps"] = mbps[layout]
        result[f"{layout}_vs_tcp"] = mbps[layout] / mbps["raw_tcp"]
        result[f"mooncake_{layout}_cpu_ms"] = statistics.median(cpu[layout]) * 1e3
    return result


def format_kv(kv: dict[str, Any]) -> str:
    return (f"KV transfer of {kv['num_tokens']} tokens ({kv['bytes'] / 2**20:.1f} MiB, staging "
            f"{kv['staging_bytes'] / 2**20:.0f} MiB): mooncake {kv['mooncake_contiguous_MBps']:.0f} MB/s "
            f"into contiguous pages, {kv['mooncake_shuffled_MBps']:.0f} MB/s into shuffled pages, "
            f"{kv['mooncake_both_shuffled_MBps']:.0f} MB/s from shuffled into shuffled pages; raw TCP "
            f"{kv['raw_tcp_MBps']:.0f} MB/s; mooncake / TCP {kv['contiguous_vs_tcp']:.3f} (contiguous), "
            f"{kv['shuffled_vs_tcp']:.3f} (shuffled), {kv['both_shuffled_vs_tcp']:.3f} (both shuffled); CPU ms per "
            f"transfer (both ends, all threads): mooncake {kv['mooncake_contiguous_cpu_ms']:.1f} / "
            f"{kv['mooncake_shuffled_cpu_ms']:.1f} / {kv['mooncake_both_shuffled_cpu_ms']:.1f}, raw TCP "
            f"{kv['raw_tcp_cpu_ms']:.1f}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", type=int, default=4096, help="prompt length (default: 4096)")
    p.add_argument("--layers", type=int, default=4, help="layers, each with a K and a V buffer (default: 4)")
    p.add_argument("--kv-heads", type=int, default=2, help="KV heads (default: 2)")
    p.add_argument("--head-dim", type=int, default=64, help="head dim (default: 64)")
    p.add_argument("--page-size", type=int, default=16, help="tokens per KV page (default: 16)")
    p.add_argument("--repeats", type=int, default=20, help="timed transfers per measure, at least (default: 20)")
    p.add_argument("--staging-bytes", type=int, default=None,
                   help="each manager's staging memory (default: the backend's; 0: no staging)")
    a = p.parse_args()
    print(format_kv(bench_kv(a.layers, a.kv_heads, a.head_dim, a.tokens, a.page_size, a.repeats, a.staging_bytes)))


if __name__ == "__main__":
    main()
