"""What evicting one request's worth of pages from a full prefix cache costs, against walking the tree for it.

The scheduler evicts for each request it admits once the KV pool is full of cached prefixes (a busy server's
normal state). pd.engine.radix_cache keeps the evictable leaves in a heap as they appear; the reference here is
the walk it replaced (list every node, heap the unreferenced leaves, drop the oldest), timed in the same run on
trees of the same shape: --leaves cached prompts of --prompt tokens (random, so no prefixes are shared), page 16.

Usage: python benchmarks/bench_radix_evict.py [--leaves 500,4000,40000] [--prompt 128] [--out FILE]
"""

from __future__ import annotations

import argparse
import heapq
import json
import os
import random
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from pd.engine.kv_cache import PagePool  # noqa: E402
from pd.engine.radix_cache import RadixCache  # noqa: E402

PAGE = 16


def full_cache(leaves: int, prompt: int, seed: int) -> RadixCache:
    pool = PagePool(leaves * prompt // PAGE)
    cache = RadixCache(PAGE, pool)
    rng = random.Random(seed)
    for _ in range(leaves):
        pages = pool.alloc(prompt // PAGE)
        assert pages is not None
        cache.insert([rng.randrange(1 << 20) for _ in range(prompt)], pages)
    return cache


def walk_evict(cache: RadixCache, num_pages: int) -> int:
    """The reference: the whole tree listed for every eviction."""
    leaves = [(n.last_use, id(n), n) for n in cache._nodes() if not n.children and n.ref == 0]
    heapq.heapify(leaves)
    freed = 0
    while freed < num_pages and leaves:
        _, _, leaf = heapq.heappop(leaves)
        parent = leaf.parent
        assert parent is not None
        del parent.children[leaf.key[:PAGE]]
        leaf.parent = None
        cache.pool.free(leaf.pages)
        freed += len(leaf.pages)
        cache.num_cached -= len(leaf.pages)
        cache.num_evictable -= len(leaf.pages)
    return freed


def per_eviction_ms(cache: RadixCache, evict, pages: int, count: int) -> float:  # noqa: ANN001
    start = time.perf_counter()
    for _ in range(count):
        assert evict(pages) == pages
    return (time.perf_counter() - start) / count * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--leaves", default="500,4000,40000")
    parser.add_argument("--prompt", type=int, default=128)
    parser.add_argument("--evictions", type=int, default=50)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    rows = []
    pages = args.prompt // PAGE
    for leaves in map(int, args.leaves.split(",")):
        heap_ms = per_eviction_ms(cache := full_cache(leaves, args.prompt, leaves), cache.evict, pages, args.evictions)
        ref = full_cache(leaves, args.prompt, leaves)
        walk_ms = per_eviction_ms(ref, lambda n, c=ref: walk_evict(c, n), pages, args.evictions)
        rows.append({"leaves": leaves, "prompt": args.prompt, "heap_ms": heap_ms, "walk_ms": walk_ms,
                     "walk_over_heap": walk_ms / heap_ms})  # fmt: skip
        print(f"{leaves} cached prompts of {args.prompt} tokens: one admission's eviction {heap_ms:.4f} ms, the tree "
              f"walk {walk_ms:.3f} ms ({walk_ms / heap_ms:.0f}x)", flush=True)  # fmt: skip
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "args": vars(args), "rows": rows},
                      f, indent=1)  # fmt: skip


if __name__ == "__main__":
    main()
