"""The prefix tree (pd.engine.radix_cache) against a brute-force oracle: a dict from every cached whole-page prefix
to the page holding its last page's KV. Matches must return the oracle's longest prefix and its pages, inserts must
hand back exactly the pages the oracle already had, eviction must drop least recently used unreferenced leaves
only, and the page counts must add up (pool free + cached == all pages) after every operation."""

from __future__ import annotations

import random

import numpy as np
import pytest

from pd.engine.kv_cache import PagePool
from pd.engine.radix_cache import Node, RadixCache

NUM_PAGES = 4096


def _oracle_match(oracle: dict[tuple[int, ...], int], tokens: list[int], ps: int) -> list[int]:
    pages = []
    for k in range(1, len(tokens) // ps + 1):
        page = oracle.get(tuple(tokens[: k * ps]))
        if page is None:
            break
        pages.append(page)
    return pages


def _prompt(rng: random.Random, history: list[list[int]]) -> list[int]:
    """A prompt that often shares a prefix (of any length, page-aligned or not) with an earlier one."""
    tail = [rng.randrange(3) for _ in range(rng.randrange(0, 24))]
    if history and rng.random() < 0.8:
        base = rng.choice(history)
        return base[: rng.randrange(len(base) + 1)] + tail
    return tail


def _check_counts(cache: RadixCache, pool: PagePool) -> None:
    nodes = cache._nodes()
    assert cache.num_cached == sum(len(n.pages) for n in nodes)
    assert cache.num_evictable == sum(len(n.pages) for n in nodes if n.ref == 0)
    assert pool.num_free + cache.num_cached == pool.num_pages  # no request is live here
    assert cache._num_nodes == len(nodes) and len(cache._evictable) <= 2 * len(nodes) + 64  # the heap stays bounded


def _serve(cache: RadixCache, pool: PagePool, oracle: dict[tuple[int, ...], int], tokens: list[int]) -> None:
    """One request's life against the oracle: match, lock, allocate the rest, compute, insert, unlock."""
    ps = cache.page_size
    # the engine matches a prompt from its int64 array (its Python ints are made later), tests' own lists too
    prefix, node = cache.match(np.asarray(tokens, dtype=np.int64) if len(tokens) % 2 else tokens)
    assert prefix == _oracle_match(oracle, tokens, ps)
    cache.lock(node)
    fresh = pool.alloc(-(-len(tokens) // ps) - len(prefix) + 1)  # one page more than the tokens need
    assert fresh is not None
    pages = prefix + fresh
    known = [oracle.get(tuple(tokens[: (k + 1) * ps])) for k in range(len(tokens) // ps)]
    expected_dups = [p for p, q in zip(pages, known, strict=False) if q is not None and q != p]
    for k in range(len(tokens) // ps):
        oracle.setdefault(tuple(tokens[: (k + 1) * ps]), pages[k])
    freed = cache.release(tokens, pages, node)
    assert sorted(freed) == sorted(expected_dups + pages[len(tokens) // ps :])
    pool.free(freed)
    _check_counts(cache, pool)


@pytest.mark.parametrize("page_size", [1, 2, 4])
def test_matches_and_inserts_equal_the_brute_force_oracle(page_size: int) -> None:
    rng = random.Random(page_size * 1000 + random.randrange(1 << 30))
    pool = PagePool(NUM_PAGES)
    cache = RadixCache(page_size, pool)
    oracle: dict[tuple[int, ...], int] = {}
    history: list[list[int]] = []
    for _ in range(300):
        tokens = _prompt(rng, history)
        history.append(tokens)
        _serve(cache, pool, oracle, tokens)
    for tokens in history:  # every inserted prefix is now found whole, with the pages the oracle recorded
        assert cache.match(tokens)[0] == _oracle_match(oracle, tokens, page_size)
        assert cache.match(np.asarray(tokens, dtype=np.int64))[0] == _oracle_match(oracle, tokens, page_size)


@pytest.mark.parametrize("page_size", [1, 4])
def test_eviction_takes_unreferenced_leaves_only_and_the_oracle_still_matches(page_size: int) -> None:
    rng = random.Random(page_size + random.randrange(1 << 30))
    pool = PagePool(NUM_PAGES)
    cache = RadixCache(page_size, pool)
    oracle: dict[tuple[int, ...], int] = {}
    history: list[list[int]] = []
    for _ in range(120):
        tokens = _prompt(rng, history)
        history.append(tokens)
        _serve(cache, pool, oracle, tokens)
    for _ in range(30):
        # Live requests hold some prefixes; eviction may not take a page of theirs.
        held = [cache.match(rng.choice(history)) for _ in range(rng.randrange(4))]
        for _, node in held:
            cache.lock(node)
        locked = {p for pages, _ in held for p in pages}
        before = set(oracle.values())
        free_before = pool.num_free
        want = rng.randrange(1, 12)
        freed = cache.evict(want)
        assert pool.num_free - free_before == freed
        assert freed >= want or cache.num_evictable == 0
        gone = {p for p in before if pool._in_use[p] == 0}
        assert len(gone) == freed and not gone & locked
        oracle = {k: p for k, p in oracle.items() if p not in gone}
        # Leaves first: a kept prefix's shorter prefixes are all kept.
        assert all(k[:-page_size] in oracle for k in oracle if len(k) > page_size)
        for tokens in history:
            assert cache.match(tokens)[0] == _oracle_match(oracle, tokens, page_size)
        for _, node in held:
            cache.unlock(node)
        _check_counts(cache, pool)
        _serve(cache, pool, oracle, _prompt(rng, history))
    assert cache.flush() > 0 and cache.num_cached == 0 and pool.num_free == NUM_PAGES


def test_eviction_order_is_least_recently_used() -> None:
    pool = PagePool(16)
    cache = RadixCache(2, pool)
    seqs = {name: [i, i, i, i] for i, name in enumerate("abc")}  # two pages each, disjoint
    for tokens in seqs.values():
        pages = pool.alloc(2)
        assert pages is not None and cache.insert(tokens, pages) == []
    cache.match(seqs["a"])  # a is used again: b is now the oldest
    assert cache.evict(1) == 2
    assert cache.match(seqs["b"])[0] == [] and len(cache.match(seqs["a"])[0]) == 2
    assert len(cache.match(seqs["c"])[0]) == 2


def test_a_split_edge_keeps_its_lock_on_the_whole_path() -> None:
    pool = PagePool(16)
    cache = RadixCache(1, pool)
    pages = pool.alloc(4)
    assert pages is not None
    cache.insert([1, 2, 3, 4], pages)
    _, node = cache.match([1, 2, 3, 4])
    cache.lock(node)
    assert cache.num_evictable == 0
    prefix, upper = cache.match([1, 2, 9])  # splits the edge after two pages
    assert prefix == pages[:2] and isinstance(upper, Node) and upper.ref == 1
    assert cache.evict(4) == 0
    cache.unlock(node)
    assert cache.num_evictable == 4 and cache.evict(4) == 4 and pool.num_free == 16


def test_each_eviction_drops_a_least_recently_used_unreferenced_leaf() -> None:
    """Against a brute-force walk of the tree before every eviction: with prefixes shared, used again, locked and
    unlocked at random (so the eviction heap holds many stale entries), each evict(1) drops exactly one leaf, an
    unreferenced one, of the least last use among them; and none is left while an unreferenced leaf remains."""
    rng = random.Random(random.randrange(1 << 30))
    pool = PagePool(NUM_PAGES)
    cache = RadixCache(2, pool)
    oracle: dict[tuple[int, ...], int] = {}
    history: list[list[int]] = []
    held: list[Node] = []
    for step in range(400):
        tokens = _prompt(rng, history)
        history.append(tokens)
        _serve(cache, pool, oracle, tokens)
        if rng.random() < 0.5:
            cache.match(rng.choice(history))  # used again, unlocked: its leaf's last use moves
        if rng.random() < 0.2:
            _, node = cache.match(rng.choice(history))
            cache.lock(node)
            held.append(node)
        if held and rng.random() < 0.2:
            cache.unlock(held.pop(rng.randrange(len(held))))
        if step % 4 == 3:
            for _ in range(rng.randrange(1, 4)):
                before = cache._nodes()
                candidates = [n for n in before if n.ref == 0 and not n.children]
                freed = cache.evict(1)
                gone = set(map(id, before)) - set(map(id, cache._nodes()))
                if not candidates:
                    assert freed == 0 and not gone
                    continue
                oldest = min(n.last_use for n in candidates)
                assert len(gone) == 1, len(gone)
                (leaf,) = [n for n in candidates if id(n) in gone]
                assert leaf.last_use == oldest and freed == len(leaf.pages)
            oracle = {k: p for k, p in oracle.items() if pool._in_use[p]}
    for node in held:
        cache.unlock(node)
    cache.flush()
    assert cache.num_cached == 0 and pool.num_free == NUM_PAGES


def test_eviction_does_not_walk_the_tree() -> None:
    """An eviction costs the leaves it drops: a thousand single-leaf evictions from a tree of 2,000 leaves never
    list the tree's nodes (the old eviction walked all of them each time)."""
    pool = PagePool(NUM_PAGES)
    cache = RadixCache(1, pool)
    for i in range(2000):
        pages = pool.alloc(2)
        assert pages is not None and cache.insert([i, i + 1], pages) == []
    walks = 0
    real_nodes = cache._nodes

    def counted() -> list[Node]:
        nonlocal walks
        walks += 1
        return real_nodes()

    cache._nodes = counted  # type: ignore[method-assign]
    for _ in range(1000):
        assert cache.evict(1) == 2
    assert walks == 0 and cache.num_cached == 2000


def test_heap_eviction_frees_the_pages_the_tree_walk_frees() -> None:
    """benchmarks/bench_radix_evict.py's reference (the walk of the whole tree the heap replaced) on a twin cache:
    the same pages leave, eviction after eviction (every leaf has its own last use, so the order is defined)."""
    from benchmarks.bench_radix_evict import full_cache, walk_evict

    seed = random.randrange(1 << 30)
    cache, twin = full_cache(200, 64, seed), full_cache(200, 64, seed)
    for _ in range(60):
        want = random.randrange(1, 9)
        free_before = set(cache.pool._free)
        assert cache.evict(want) == walk_evict(twin, want)
        assert set(cache.pool._free) - free_before == set(twin.pool._free) - free_before
