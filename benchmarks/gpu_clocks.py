"""The GPU's state while a benchmark runs: SM clock, power and temperature, sampled by nvidia-smi.

A card under sustained load may lower its clocks (power or heat), and then what a benchmark measures later runs
slower than what it measured first: transformers' forwards, timed first, and pd serve's, timed after, would not be
compared at the same clocks. GpuClocks samples the card in the background; `span(t0, t1)` summarizes the samples
between two time.monotonic() readings, so each figure can carry the clocks it was measured at.
"""

from __future__ import annotations

import shutil
import statistics
import subprocess
import threading
import time
from typing import Any

QUERY = "clocks.sm,power.draw,temperature.gpu"


class GpuClocks:
    """Samples every `interval_ms` until close(). `gpu`: nvidia-smi's --id (an index or a UUID; None: GPU 0).
    `command` replaces nvidia-smi (tests). Not `enabled`, or without nvidia-smi, nothing is sampled and every span
    is None."""

    def __init__(self, gpu: str | None = None, interval_ms: int = 100, command: list[str] | None = None,
                 enabled: bool = True) -> None:  # fmt: skip
        self.samples: list[tuple[float, float, float, float]] = []  # (monotonic s, SM MHz, W, deg C)
        self._proc: subprocess.Popen[str] | None = None
        if not enabled:
            return
        if command is None:
            if shutil.which("nvidia-smi") is None:
                return
            command = ["nvidia-smi", f"--query-gpu={QUERY}", "--format=csv,noheader,nounits", f"--loop-ms={interval_ms}"]
            if gpu is not None:
                command.append(f"--id={gpu}")
        self._proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self._proc is not None and self._proc.stdout is not None
        for line in self._proc.stdout:
            try:
                sm, watts, temp = (float(x) for x in line.split(","))
            except ValueError:  # "[N/A]", a header or an error line: not a sample
                continue
            self.samples.append((time.monotonic(), sm, watts, temp))

    def span(self, start: float, end: float) -> dict[str, Any] | None:
        """The samples taken between two time.monotonic() readings: median SM clock (MHz) and power (W), lowest
        clock, highest temperature; None without samples there."""
        got = [s for s in list(self.samples) if start <= s[0] <= end]
        if not got:
            return None
        return {"sm_mhz_median": statistics.median(s[1] for s in got), "sm_mhz_min": min(s[1] for s in got),
                "power_w_median": statistics.median(s[2] for s in got), "temp_c_max": max(s[3] for s in got),
                "samples": len(got)}  # fmt: skip

    def close(self) -> None:
        if self._proc is not None:
            self._proc.terminate()
            self._proc.wait()
            self._reader.join(timeout=5)


def describe(span: dict[str, Any] | None) -> str:
    """A span as one short phrase for a printed line."""
    if span is None:
        return "clocks not sampled"
    return (f"SM {span['sm_mhz_median']:.0f} MHz (min {span['sm_mhz_min']:.0f}), {span['power_w_median']:.0f} W, "
            f"up to {span['temp_c_max']:.0f} C")  # fmt: skip


def gpu_uuid() -> str | None:
    """nvidia-smi's name for the GPU torch uses (CUDA_VISIBLE_DEVICES may renumber them); None without CUDA."""
    import torch

    if not torch.cuda.is_available():
        return None
    uuid = str(torch.cuda.get_device_properties(torch.cuda.current_device()).uuid)
    return uuid if uuid.startswith("GPU-") else f"GPU-{uuid}"
