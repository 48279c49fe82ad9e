"""What a CUDA-graph capture costs in device memory, as the start-up log reports it."""

from __future__ import annotations

import torch


def free_before_capture(device: torch.device) -> int:
    """Free device bytes with this process's cached blocks handed back first. torch.cuda.graph empties the
    allocator's cache when a capture begins, so a figure taken while blocks were still cached (the temporaries of
    quantizing weights at load: gigabytes) counted them as freed by the capture: the graphs' memory came out
    negative in the log."""
    torch.cuda.empty_cache()
    return torch.cuda.mem_get_info(device)[0]


def used_since(device: torch.device, free_before: int) -> float:
    """MiB of device memory taken since free_before_capture."""
    return (free_before - torch.cuda.mem_get_info(device)[0]) / 2**20
