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
    holds zeros instead (a row-parallel bias lives on one rank only, or the all-reduce would add it N times)."""

    dim: int
    start: int
    length: int
    zero: bool = False


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


def _mark(param: torch.Tensor, spec: ShardSpec) -> None:
    setattr(param, _SPEC_ATTR, spec)


@dataclass(frozen=True)
class TensorParallel:
    """Rank ``rank`` of a ``size``-rank tensor-parallel group (``group`` None when size == 1)."""

    rank: int = 0
    size: int = 1
    group: ProcessGroup | None = field(default=None, compare=False, hash=False, repr=False)

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
        _mark(linear.weight, ShardSpec(0, self.rank * local, local))
        if linear.bias is not None:
            _mark(linear.bias, ShardSpec(0, self.rank * local, local))
        return linear

    def row_linear(self, units: int, unit_size: int, out_features: int, bias: bool, what: str) -> nn.Linear:
        """A linear over this rank's share of ``units`` input blocks; its output is a partial sum (all_reduce
        it). The bias is held by rank 0 only."""
        local = self.split(units, what) * unit_size
        linear = nn.Linear(local, out_features, bias=bias)
        _mark(linear.weight, ShardSpec(1, self.rank * local, local))
        if linear.bias is not None and self.rank != 0:
            _mark(linear.bias, ShardSpec(0, 0, out_features, zero=True))
        return linear


SINGLE = TensorParallel()
