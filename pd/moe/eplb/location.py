"""Expert-location files: recorded expert load written by a running instance, read back as a start-up placement.

``--init-expert-location FILE`` takes JSON (or a torch-saved dict, ``.pt``) with one of
  ``physical_to_logical_map``: [L, P] the logical expert of every slot of every MoE layer (used as it is), or
  ``logical_count``: [..., L, E] recorded load per MoE layer and expert (leading dims, e.g. per step, are summed),
    from which the placement policy computes the placement, as a rebalance would.
L counts MoE layers in model order; P = E + --ep-num-redundant-experts. ``--expert-distribution-dir DIR`` makes
every EPLB rebalance write the load it used there, in the second form.
"""

from __future__ import annotations

import json
import os
import time

import torch


class ExpertLocationError(ValueError):
    """An expert-location file that cannot give this model's placement (the message says why)."""


def _load_file(path: str) -> object:
    try:
        if path.endswith(".pt"):
            return torch.load(path, map_location="cpu", weights_only=True)
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError, RuntimeError) as e:
        raise ExpertLocationError(f"{path}: cannot read it ({e})") from e


def _logical_count(value: object, where: str) -> torch.Tensor:
    """[L, E] float64 from a ``logical_count`` value [..., L, E] (leading dims, e.g. per step, summed)."""
    count = torch.as_tensor(value, dtype=torch.float64)
    if count.dim() < 2 or bool((count < 0).any()):
        raise ExpertLocationError(f"{where}: logical_count must be [..., MoE layers, experts] of counts >= 0, "
                                  f"got shape {tuple(count.shape)}")  # fmt: skip
    return count.reshape(-1, *count.shape[-2:]).sum(dim=0)


def read_load(path: str) -> torch.Tensor:
    """[L, E] float64: the ``logical_count`` of a load file (leading dims summed), whatever the model.

    Raises:
        ExpertLocationError: unreadable, no logical_count, or fewer than two dimensions.
    """
    data = _load_file(path)
    if not isinstance(data, dict) or "logical_count" not in data:
        raise ExpertLocationError(f"{path}: expected an object with logical_count [..., MoE layers, experts]")
    return _logical_count(data["logical_count"], path)


def write_map(path: str, phy2log_LP: torch.Tensor) -> None:
    """Writes a placement --init-expert-location reads (physical_to_logical_map)."""
    with open(path, "w") as f:
        json.dump({"physical_to_logical_map": phy2log_LP.tolist()}, f)


def read_location(path: str, num_layers: int, num_experts: int, num_physical: int) -> dict[str, torch.Tensor]:
    """{"physical_to_logical_map": [L, P]} or {"logical_count": [L, E]} (int64 / float64, CPU) from ``path``.

    Raises:
        ExpertLocationError: unreadable file, neither key, or shapes that do not fit the model.
    """
    try:
        data = _load_file(path)
    except ExpertLocationError as e:
        raise ExpertLocationError(f"--init-expert-location {e}") from e
    if not isinstance(data, dict):
        raise ExpertLocationError(f"--init-expert-location {path}: expected an object with physical_to_logical_map "
                                  "or logical_count")  # fmt: skip
    if "physical_to_logical_map" in data:
        phy2log = torch.as_tensor(data["physical_to_logical_map"], dtype=torch.int64)
        if tuple(phy2log.shape) != (num_layers, num_physical):
            raise ExpertLocationError(
                f"--init-expert-location {path}: physical_to_logical_map has shape {tuple(phy2log.shape)}, this "
                f"model needs [{num_layers} MoE layers, {num_physical} expert slots]"
            )
        if int(phy2log.min()) < 0 or int(phy2log.max()) >= num_experts:
            raise ExpertLocationError(f"--init-expert-location {path}: expert ids outside [0, {num_experts})")
        for layer in range(num_layers):
            held = set(phy2log[layer].tolist())
            if len(held) != num_experts:
                missing = sorted(set(range(num_experts)) - held)
                raise ExpertLocationError(f"--init-expert-location {path}: MoE layer {layer} gives no slot to "
                                          f"experts {missing[:8]}")  # fmt: skip
        return {"physical_to_logical_map": phy2log}
    if "logical_count" in data:
        count = _logical_count(data["logical_count"], f"--init-expert-location {path}")
        if tuple(count.shape) != (num_layers, num_experts):
            raise ExpertLocationError(
                f"--init-expert-location {path}: logical_count is for {count.shape[0]} MoE layers of "
                f"{count.shape[1]} experts, this model needs [..., {num_layers} MoE layers, {num_experts} experts]"
            )
        return {"logical_count": count}
    raise ExpertLocationError(f"--init-expert-location {path}: has neither physical_to_logical_map nor "
                              f"logical_count (keys: {sorted(data)[:8]})")  # fmt: skip


def write_load(directory: str, logical_count_LE: torch.Tensor, forwards: int, at_forward: int) -> str:
    """Writes a load record --init-expert-location reads: the load of the ``forwards`` forwards up to forward number
    ``at_forward`` (which names the file: one per rebalance, in order); returns its path (written atomically)."""
    os.makedirs(directory, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    path = os.path.join(directory, f"expert_distribution_{stamp}_forward{at_forward:010d}.json")
    record = {"logical_count": logical_count_LE.cpu().tolist(), "forwards": forwards}
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(record, f)
    os.replace(tmp, path)
    return path
