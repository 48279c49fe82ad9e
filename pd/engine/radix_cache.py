"""Prefix cache: a radix tree over token ids at page granularity, whose nodes own KV pages.

An edge holds whole pages: its key is k * page_size token ids and it owns the k pages whose KV they produced.
A request that starts with a cached prefix maps those pages into its own page-table row and computes only the
rest of its prompt. Pages are append-only (a cached page is full and never written again), so sharing needs no
copy-on-write: a node's reference count is the number of live requests whose prefix passes through it, and only
unreferenced leaves are evicted, least recently used first, when an allocation needs room.

The evictable leaves are kept in a heap as they appear (a leaf inserted, unlocked or used, a parent left childless),
so an eviction costs the pages it frees, not a walk of the tree: the scheduler evicts for each request it admits,
and a full pool of short cached prompts holds thousands of leaves (benchmarks/bench_radix_evict.py: 4,000 of them
made each admission walk the tree for milliseconds). Entries go stale when their node is used, locked, grown or
dropped, and are skipped when they surface.
"""

from __future__ import annotations

import heapq
import itertools
from collections.abc import Sequence

import numpy as np

from pd.engine.kv_cache import PagePool


def _ints(tokens: Sequence[int] | np.ndarray, start: int, end: int) -> tuple[int, ...]:
    """tokens[start:end] as a tuple of Python ints (a match reads a prompt's int64 array a page at a time: only the
    pages it looks at become Python ints)."""
    part = tokens[start:end]
    return tuple(part.tolist() if isinstance(part, np.ndarray) else part)


class Node:
    """One edge of the tree: `key` (token ids, a multiple of page_size) and the `pages` holding their KV."""

    __slots__ = ("children", "parent", "key", "pages", "ref", "last_use")

    def __init__(self, parent: Node | None, key: tuple[int, ...], pages: tuple[int, ...]) -> None:
        self.children: dict[tuple[int, ...], Node] = {}  # by the first page of the child's key
        self.parent = parent
        self.key = key
        # tuples, not lists: a tuple of ints leaves the garbage collector's tracking, and a full pool's tree has
        # tens of thousands of nodes for every full collection to visit otherwise
        self.pages = pages
        self.ref = 0  # live requests whose matched prefix ends at or below this node
        self.last_use = 0


def _evictable(node: Node) -> bool:
    """In the tree, held by no request, and a leaf."""
    return node.parent is not None and node.ref == 0 and not node.children


class RadixCache:
    """The prefix tree of one scheduler (one per DP-attention group). Pages it evicts go back to `pool`.

    Counters: `num_cached` pages are owned by the tree, `num_evictable` of them are held by no request.
    """

    def __init__(self, page_size: int, pool: PagePool) -> None:
        self.page_size = page_size
        self.pool = pool
        self.root = Node(None, (), ())
        self.root.ref = 1  # never evicted, never counted
        self.num_cached = 0
        self.num_evictable = 0
        self._num_nodes = 0  # below the root
        self._clock = itertools.count(1)
        # (last_use, order, node) of each leaf when it became evictable or was last used; stale entries stay until
        # they surface (see _offer)
        self._evictable: list[tuple[int, int, Node]] = []
        self._order = itertools.count()

    def match(self, tokens: Sequence[int] | np.ndarray) -> tuple[list[int], Node]:
        """The pages of the longest cached prefix of `tokens` made of whole pages, and the node it ends at
        (lock it before allocating, or eviction may take the pages). Splits an edge where the match ends inside
        it, so the returned node covers exactly the matched prefix."""
        node, pages, now = self.root, [], next(self._clock)
        num_pages = len(tokens) // self.page_size
        while len(pages) < num_pages:
            child = node.children.get(self._page(tokens, len(pages)))
            if child is None:
                break
            n = self._common_pages(child, tokens, len(pages))
            if n < len(child.pages):
                child = self._split(child, n)
            self._use(child, now)
            pages.extend(child.pages)
            node = child
        return pages, node

    def lock(self, node: Node) -> None:
        """Protects the path from the root to `node` from eviction (one live request holds it)."""
        while node is not self.root:
            if node.ref == 0:
                self.num_evictable -= len(node.pages)
            node.ref += 1
            node = node.parent  # type: ignore[assignment]

    def unlock(self, node: Node) -> None:
        while node is not self.root:
            assert node.ref > 0, "unlock without lock"
            node.ref -= 1
            if node.ref == 0:
                self.num_evictable += len(node.pages)
                self._offer(node)
            node = node.parent  # type: ignore[assignment]

    def insert(self, tokens: Sequence[int], pages: list[int]) -> list[int]:
        """Caches the KV of `tokens` (whole pages only: len(tokens) // page_size of `pages`).

        Returns the given pages the tree did not take because it already caches the same tokens in other pages
        (computed by another request meanwhile); the caller frees them. Pages past the whole-page prefix are not
        looked at."""
        node, i, now = self.root, 0, next(self._clock)
        num_pages = len(tokens) // self.page_size
        assert len(pages) >= num_pages, (len(pages), num_pages)
        duplicates: list[int] = []
        while i < num_pages:
            child = node.children.get(self._page(tokens, i))
            if child is None:
                leaf = Node(node, tuple(tokens[i * self.page_size : num_pages * self.page_size]),
                            tuple(pages[i:num_pages]))  # fmt: skip
                node.children[self._page(tokens, i)] = leaf
                self._num_nodes += 1
                self.num_cached += len(leaf.pages)
                self.num_evictable += len(leaf.pages)
                self._use(leaf, now)
                break
            n = self._common_pages(child, tokens, i)
            if n < len(child.pages):
                child = self._split(child, n)
            self._use(child, now)
            duplicates.extend(p for p, q in zip(pages[i : i + n], child.pages, strict=True) if p != q)
            i += n
            node = child
        return duplicates

    def release(self, tokens: Sequence[int], pages: list[int], node: Node) -> list[int]:
        """A request's end: caches the whole pages of `tokens` (its computed tokens; at least the prefix it
        matched, whose pages the tree owns), unlocks its matched `node`, and returns the pages the caller frees
        (the request's own pages past the cached ones, and duplicates of pages the tree already had)."""
        num_pages = len(tokens) // self.page_size
        free = self.insert(tokens, pages)
        self.unlock(node)
        return free + pages[num_pages:]

    def evict(self, num_pages: int) -> int:
        """Frees at least `num_pages` pages (fewer if not enough are evictable) by dropping unreferenced leaves,
        least recently used first; a parent left childless and unreferenced becomes a candidate. Returns how
        many pages went back to the pool."""
        freed = 0
        while freed < num_pages and self._evictable:
            last_use, _, leaf = heapq.heappop(self._evictable)
            if not _evictable(leaf) or leaf.last_use != last_use:
                continue  # stale: dropped already, locked, grown children, or used since
            parent = leaf.parent
            del parent.children[leaf.key[: self.page_size]]
            leaf.parent = None
            self._num_nodes -= 1
            self.pool.free(leaf.pages)
            freed += len(leaf.pages)
            self.num_cached -= len(leaf.pages)
            self.num_evictable -= len(leaf.pages)
            if parent is not self.root:
                self._offer(parent)
        self._bound_heap()
        return freed

    def _use(self, node: Node, now: int) -> None:
        node.last_use = now
        self._offer(node)

    def _offer(self, node: Node) -> None:
        """Records `node` as an eviction candidate at its current last_use if it is one now (an unreferenced leaf).
        The heap is rebuilt from the tree when its entries outnumber twice the nodes (checked here and after each
        eviction), so it stays within a few entries per node (each one more object for the garbage collector)."""
        if _evictable(node):
            heapq.heappush(self._evictable, (node.last_use, next(self._order), node))
            self._bound_heap()

    def _bound_heap(self) -> None:
        if len(self._evictable) > 2 * self._num_nodes + 64:
            self._evictable = [(n.last_use, next(self._order), n) for n in self._nodes() if _evictable(n)]
            heapq.heapify(self._evictable)

    def flush(self) -> int:
        """Drops every unreferenced cached page; returns how many were freed."""
        return self.evict(self.num_evictable)

    def _page(self, tokens: Sequence[int] | np.ndarray, index: int) -> tuple[int, ...]:
        return _ints(tokens, index * self.page_size, (index + 1) * self.page_size)

    def _common_pages(self, child: Node, tokens: Sequence[int], start: int) -> int:
        """How many leading pages of `child`'s key equal tokens' pages from page `start` on (at least one: the
        child was found by its first page)."""
        ps, n = self.page_size, 1
        limit = min(len(child.pages), len(tokens) // ps - start)
        while n < limit and child.key[n * ps : (n + 1) * ps] == _ints(tokens, (start + n) * ps, (start + n + 1) * ps):
            n += 1
        return n

    def _split(self, child: Node, n: int) -> Node:
        """Cuts `child` after its first n pages; returns the new upper node. The lower part stays the same object,
        so requests that locked it still unlock the whole path."""
        parent, ps = child.parent, self.page_size
        assert parent is not None and 0 < n < len(child.pages)
        upper = Node(parent, child.key[: n * ps], child.pages[:n])
        self._num_nodes += 1
        upper.ref, upper.last_use = child.ref, child.last_use
        parent.children[child.key[:ps]] = upper
        child.key, child.pages, child.parent = child.key[n * ps :], child.pages[n:], upper
        upper.children[child.key[:ps]] = child
        return upper

    def _nodes(self) -> list[Node]:
        out, stack = [], list(self.root.children.values())
        while stack:
            node = stack.pop()
            out.append(node)
            stack.extend(node.children.values())
        return out
