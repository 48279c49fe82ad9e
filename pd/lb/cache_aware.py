"""The cache-aware policy (sglang-router's `cache_aware`): route a request to the instance most likely to hold
its prompt's prefix in its KV cache, unless the load is too uneven for that.

The balancer cannot see the instances' caches, so it keeps its own approximation: per instance, a radix tree of
the request texts it sent there (characters, not tokens: no tokenizer in the balancer). A choice is

1. imbalanced load (max - min > balance_abs_threshold and max > balance_rel_threshold * min, load = requests in
   flight at the balancer): the least-loaded instance (shortest queue);
2. else the instance whose tree matches the longest prefix of the text, if that match covers more than
   cache_threshold of the text;
3. else the instance with the smallest tree (most room in its cache).

The text then goes into the chosen instance's tree. Every eviction_interval_secs each tree is trimmed to
max_tree_size characters, least recently used leaves first, as the instances' own caches evict. Trees live only
for the current candidates: an instance removed or out of rotation loses its tree (its cache is gone, or will
be cold, by the time it is back).
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import logging
import random
from collections.abc import Sequence
from dataclasses import dataclass

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class CacheAwareConfig:
    """sglang-router's parameters and defaults (its current ones; older releases used 0.5 / 32 / 1.0001 / 60 /
    2**24). Ranges are checked where the flags are parsed (pd.lb.args)."""

    cache_threshold: float = 0.3  # in [0, 1]: minimum matched fraction of the text for affinity routing
    balance_abs_threshold: int = 64  # >= 0 requests
    balance_rel_threshold: float = 1.5  # >= 1.0
    eviction_interval_secs: float = 120.0  # > 0
    max_tree_size: int = 2**26  # >= 1 characters per instance


def _common_len(text: str, pos: int, key: str) -> int:
    """Length of the common prefix of text[pos:] and key, by string comparisons in C: the whole key first (the
    usual case), else a binary search over its prefixes."""
    if text.startswith(key, pos):
        return len(key)
    lo, hi = 0, min(len(key) - 1, len(text) - pos)  # the answer lies in [lo, hi]: key[:lo] matches
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if text.startswith(key[:mid], pos):
            lo = mid
        else:
            hi = mid - 1
    return lo


class _Node:
    __slots__ = ("children", "parent", "key", "last_use")

    def __init__(self, parent: _Node | None, key: str, last_use: int) -> None:
        self.children: dict[str, _Node] = {}  # by the first character of the child's key
        self.parent = parent
        self.key = key
        self.last_use = last_use


class ApproxRadixTree:
    """The texts sent to one instance, as a radix tree of characters. `size`: characters held (edge lengths)."""

    def __init__(self) -> None:
        self.root = _Node(None, "", 0)
        self.size = 0
        self._clock = itertools.count(1)

    def match(self, text: str) -> int:
        """Length of the longest prefix of `text` held in the tree (read-only: the insert that follows a choice
        refreshes the path)."""
        node, pos = self.root, 0
        while pos < len(text):
            child = node.children.get(text[pos])
            if child is None:
                break
            n = _common_len(text, pos, child.key)
            pos += n
            if n < len(child.key):
                break
            node = child
        return pos

    def insert(self, text: str) -> None:
        """Add `text`, marking its whole path as used now."""
        now = next(self._clock)
        node, pos = self.root, 0
        while pos < len(text):
            child = node.children.get(text[pos])
            if child is None:
                node.children[text[pos]] = _Node(node, text[pos:], now)
                self.size += len(text) - pos
                return
            n = _common_len(text, pos, child.key)
            if n < len(child.key):
                child = self._split(child, n)
            child.last_use = now
            node, pos = child, pos + n

    def _split(self, child: _Node, n: int) -> _Node:
        """Cut child's edge after n characters; returns the new upper node."""
        assert child.parent is not None and 0 < n < len(child.key)
        upper = _Node(child.parent, child.key[:n], child.last_use)
        child.parent.children[upper.key[0]] = upper
        child.key, child.parent = child.key[n:], upper
        upper.children[child.key[0]] = child
        return upper

    def evict(self, max_size: int) -> None:
        """Drop least recently used leaves until at most `max_size` characters remain. A node is never used
        later than the nodes above it, so leaves in last-use order are the LRU order of the whole tree."""
        if self.size <= max_size:
            return
        leaves: list[tuple[int, int, _Node]] = []
        stack = [self.root]
        while stack:
            node = stack.pop()
            stack.extend(node.children.values())
            if not node.children and node is not self.root:
                leaves.append((node.last_use, id(node), node))
        heapq.heapify(leaves)
        while self.size > max_size and leaves:
            _, _, leaf = heapq.heappop(leaves)
            parent = leaf.parent
            assert parent is not None
            del parent.children[leaf.key[0]]
            self.size -= len(leaf.key)
            if not parent.children and parent is not self.root:
                heapq.heappush(leaves, (parent.last_use, id(parent), parent))


def is_imbalanced(loads: Sequence[int], abs_threshold: int, rel_threshold: float) -> bool:
    """sglang-router's test: both the absolute and the relative gap between the busiest and idlest candidate
    exceed their thresholds."""
    hi, lo = max(loads), min(loads)
    return hi - lo > abs_threshold and hi > lo * rel_threshold


class CacheAwarePolicy:
    """Holds one ApproxRadixTree per candidate URL; see the module doc for the choice."""

    name = "cache_aware"
    needs_text = True

    def __init__(self, config: CacheAwareConfig | None = None, rng: random.Random | None = None) -> None:
        self.config = config or CacheAwareConfig()
        self.trees: dict[str, ApproxRadixTree] = {}

    def select(self, loads: Sequence[int], urls: Sequence[str] = (), text: str = "") -> int:
        """Index into `loads`/`urls` (the candidates, len >= 1) of the chosen instance; `text` goes into its tree."""
        assert loads and len(urls) == len(loads), "cache_aware needs each candidate's URL"
        if self.trees.keys() != set(urls):  # candidates changed: new ones start empty, gone ones are forgotten
            self.trees = {u: self.trees.get(u) or ApproxRadixTree() for u in urls}
        trees = [self.trees[u] for u in urls]
        c, n = self.config, len(loads)
        if is_imbalanced(loads, c.balance_abs_threshold, c.balance_rel_threshold):
            i = min(range(n), key=loads.__getitem__)
        else:
            matched = [t.match(text) for t in trees]
            # Equal matches go to the less loaded instance.
            best = max(range(n), key=lambda j: (matched[j], -loads[j]))
            if text and matched[best] / len(text) > c.cache_threshold:
                i = best
            else:
                i = min(range(n), key=lambda j: (trees[j].size, loads[j]))
        trees[i].insert(text)
        return i

    def evict(self) -> None:
        """Trim every tree to max_tree_size characters."""
        for tree in self.trees.values():
            tree.evict(self.config.max_tree_size)


async def evict_periodically(policy: CacheAwarePolicy) -> None:
    """Run policy.evict() every eviction_interval_secs until cancelled."""
    while True:
        await asyncio.sleep(policy.config.eviction_interval_secs)
        try:
            policy.evict()
        except Exception:  # a bug here must not stop eviction for good
            logger.exception("cache_aware tree eviction failed")
