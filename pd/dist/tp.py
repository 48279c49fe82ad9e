"""Tensor parallelism inside a model: which slice of a checkpoint tensor a rank holds, and the all-reduce.

Model code asks for its linears here and stays unaware of ranks: a column-parallel linear holds a block of
output rows (whole heads), a row-parallel linear a block of input columns whose partial products the owner
sums with ``TensorParallel.all_reduce``. The loader reads each parameter's ``ShardSpec`` and copies only that
slice of the checkpoint tensor, so a rank never keeps more than its shard.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist
from torch import nn

if TYPE_CHECKING:
    from torch.distributed import ProcessGroup

_SPEC_ATTR = "pd_shard_spec"


@dataclass(frozen=True)
class ShardSpec:
    """This rank holds ``tensor.narrow(dim, start, length)`` of the checkpoint tensor; ``zero`` means the rank
    holds zeros instead (a row-parallel bias lives on one rank only, or the all-reduce would add it N times).
    ``total``: the checkpoint tensor's size along ``dim`` (0: length x the group size), which FP8 scale blocks are
    cut by; a KV head replicated over several ranks is not length x ranks."""

    dim: int
    start: int
    length: int
    zero: bool = False
    total: int = 0


def shard_spec(param: torch.Tensor) -> ShardSpec | None:
    return getattr(param, _SPEC_ATTR, None)


def take_shard(param: torch.Tensor, tensor: torch.Tensor) -> torch.Tensor:
    """The part of checkpoint ``tensor`` that ``param`` holds (``tensor`` itself for replicated params)."""
    spec = shard_spec(param)
    if spec is None:
        return tensor
    if spec.zero:
        return torch.zeros_like(param)
    if tensor.shape[spec.dim] < spec.start + spec.length:
        return tensor  # the loader's shape check reports it with the tensor's name
    return tensor.narrow(spec.dim, spec.start, spec.length)


def kv_head_range(num_kv_heads: int, tp_size: int, tp_rank: int) -> tuple[int, int]:
    """(first, count) of the KV heads tensor-parallel rank ``tp_rank`` of ``tp_size`` computes and caches.

    With at least as many KV heads as ranks each rank holds num_kv_heads / tp_size contiguous heads; with fewer,
    each holds one, head tp_rank * num_kv_heads // tp_size, shared by tp_size / num_kv_heads ranks (the heads its
    query heads attend with). Raises ValueError when neither count divides the other.
    """
    if num_kv_heads % tp_size and tp_size % num_kv_heads:
        raise ValueError(f"{num_kv_heads} KV heads cannot be split over {tp_size} tensor-parallel ranks; use a --tp "
                         "that divides or is a multiple of it")
    if num_kv_heads >= tp_size:
        per_rank = num_kv_heads // tp_size
        return tp_rank * per_rank, per_rank
    return tp_rank * num_kv_heads // tp_size, 1


def _mark(param: torch.Tensor, spec: ShardSpec) -> None:
    setattr(param, _SPEC_ATTR, spec)


@dataclass(frozen=True)
class TensorParallel:
    """Rank ``rank`` of a ``size``-rank tensor-parallel group (``group`` None when size == 1)."""

    rank: int = 0
    size: int = 1
    group: ProcessGroup | None = field(default=None, compare=False, hash=False, repr=False)
    # False: every rank computes and caches all KV heads (kv_heads gives the whole range)
    shard_kv_heads: bool = True

    def split(self, total: int, what: str) -> int:
        """This rank's share of ``total`` units. Raises ValueError unless size divides total."""
        if total % self.size:
            raise ValueError(f"{what} ({total}) is not divisible by the tensor-parallel size {self.size}; "
                             "choose a --tp (or --dp-size with DP attention) that divides it")
        return total // self.size

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        """Sum of ``x`` over the group, in place (no-op for one rank)."""
        if self.group is not None:
            dist.all_reduce(x, group=self.group)
        return x

    def column_linear(self, in_features: int, units: int, unit_size: int, bias: bool, what: str) -> nn.Linear:
        """A linear with ``units`` output blocks of ``unit_size`` rows (e.g. heads x head_dim), this rank's
        contiguous share of the blocks."""
        local = self.split(units, what) * unit_size
        linear = nn.Linear(in_features, local, bias=bias)
        _mark(linear.weight, ShardSpec(0, self.rank * local, local, total=units * unit_size))
        if linear.bias is not None:
            _mark(linear.bias, ShardSpec(0, self.rank * local, local, total=units * unit_size))
        return linear

    def kv_heads(self, num_kv_heads: int) -> tuple[int, int]:
        """(first, count) of the KV heads this rank computes and caches: kv_head_range, or all of them when
        shard_kv_heads is off. Raises ValueError when neither the head count nor the group size divides the other."""
        first, count = kv_head_range(num_kv_heads, self.size, self.rank)  # validates even when not sharding
        return (first, count) if self.shard_kv_heads else (0, num_kv_heads)

    def kv_linear(self, in_features: int, num_kv_heads: int, head_dim: int, bias: bool) -> nn.Linear:
        """A K or V projection over this rank's KV heads (kv_heads): a column block of whole heads, replicated on the
        ranks that share a head when there are fewer heads than ranks."""
        first, count = self.kv_heads(num_kv_heads)
        linear = nn.Linear(in_features, count * head_dim, bias=bias)
        for param in (linear.weight, linear.bias):
            if param is not None:
                _mark(param, ShardSpec(0, first * head_dim, count * head_dim, total=num_kv_heads * head_dim))
        return linear

    def row_linear(self, units: int, unit_size: int, out_features: int, bias: bool, what: str) -> nn.Linear:
        """A linear over this rank's share of ``units`` input blocks; its output is a partial sum (all_reduce
        it). The bias is held by rank 0 only."""
        local = self.split(units, what) * unit_size
        linear = nn.Linear(local, out_features, bias=bias)
        _mark(linear.weight, ShardSpec(1, self.rank * local, local, total=units * unit_size))
        if linear.bias is not None and self.rank != 0:
            _mark(linear.bias, ShardSpec(0, 0, out_features, zero=True))
        return linear


SINGLE = TensorParallel()
