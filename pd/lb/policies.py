"""Worker-choice policies of the load balancer, registered by name.

A policy sees the outstanding-request counts of the candidate instances (healthy ones of one side, in
registry order), their URLs and, if it asks for it (`needs_text`), the request's text, and returns the index of
its choice; it knows nothing about HTTP or health. The prefill and the decode side each have their own policy
object, so round robin advances independently per side. `cache_aware` lives in cache_aware.py, imported when
it is made.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from pd.lb.cache_aware import CacheAwareConfig


class Policy(Protocol):
    name: str
    needs_text: bool  # False: select ignores `text`, so the balancer need not build it

    def select(self, loads: Sequence[int], urls: Sequence[str] = (), text: str = "") -> int:
        """Index into `loads` (outstanding requests per candidate, len >= 1) of the chosen candidate; `urls` are
        the candidates' URLs, `text` the request's prompt as the balancer sees it (see request.routing_text)."""
        ...


class RandomPolicy:
    """Uniform choice."""

    name = "random"
    needs_text = False

    def __init__(self, rng: random.Random | None = None) -> None:
        self._rng = rng or random.Random()

    def select(self, loads: Sequence[int], urls: Sequence[str] = (), text: str = "") -> int:
        assert loads, "select needs at least one candidate"
        return self._rng.randrange(len(loads))


class RoundRobinPolicy:
    """Candidates in turn: the i-th call picks i mod n (n may change between calls as instances come and go)."""

    name = "round_robin"
    needs_text = False

    def __init__(self, rng: random.Random | None = None) -> None:
        self._next = 0

    def select(self, loads: Sequence[int], urls: Sequence[str] = (), text: str = "") -> int:
        assert loads, "select needs at least one candidate"
        i = self._next % len(loads)
        self._next += 1
        return i


class PowerOfTwoPolicy:
    """Power of two choices: two distinct random candidates, the one with fewer outstanding requests wins
    (a tie goes to either at random). Close to least-loaded, without herding every request onto the one instance
    that looked idle a moment ago."""

    name = "power_of_two"
    needs_text = False

    def __init__(self, rng: random.Random | None = None) -> None:
        self._rng = rng or random.Random()

    def select(self, loads: Sequence[int], urls: Sequence[str] = (), text: str = "") -> int:
        assert loads, "select needs at least one candidate"
        if len(loads) == 1:
            return 0
        a, b = self._rng.sample(range(len(loads)), 2)
        return a if loads[a] <= loads[b] else b


POLICIES: dict[str, Callable[[random.Random | None], Policy]] = {
    RandomPolicy.name: RandomPolicy,
    RoundRobinPolicy.name: RoundRobinPolicy,
    PowerOfTwoPolicy.name: PowerOfTwoPolicy,
}
POLICY_NAMES = frozenset({*POLICIES, "cache_aware"})


def make_policy(name: str, rng: random.Random | None = None, cache_aware: CacheAwareConfig | None = None) -> Policy:
    """A fresh policy by name; `rng` seeds the random ones (tests), `cache_aware` configures cache_aware (default:
    sglang-router's defaults). Raises KeyError for an unknown name."""
    if name == "cache_aware":
        from pd.lb.cache_aware import CacheAwarePolicy

        return CacheAwarePolicy(cache_aware, rng)
    if name not in POLICIES:
        raise KeyError(f"unknown load-balancing policy {name!r}; choose one of {sorted(POLICY_NAMES)}")
    return POLICIES[name](rng)
