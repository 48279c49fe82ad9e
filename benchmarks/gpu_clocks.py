"""The GPU's state while a benchmark runs: SM clock, power and temperature, sampled by nvidia-smi.

A card under sustained load may lower its clocks (power or heat), and then what a benchmark measures later runs
slower than what it measured first: transformers' forwards, timed first, and pd serve's, timed after, would not be
compared at the same clocks. GpuClocks samples the card in the background; `span(t0, t1)` summarizes the samples
between two time.monotonic() readings, so each figure can carry the clocks it was measured at.
"""

from __future__ import annotations

import math
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
            command = ["nvidia-smi", f"--query-gpu={QUERY}", "--format=csv,noheader,nounits",
                       f"--loop-ms={interval_ms}"]  # fmt: skip
            if gpu is not None:
                command.append(f"--id={gpu}")
        self._proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self._proc is not None and self._proc.stdout is not None
        for line in self._proc.stdout:
            fields = [_number(x) for x in line.split(",")]
            if len(fields) != 3 or fields[0] != fields[0]:  # a header, an error line, or no clock: not a sample
                continue
            self.samples.append((time.monotonic(), *fields))

    def span(self, start: float, end: float) -> dict[str, Any] | None:
        """The samples taken between two time.monotonic() readings: median SM clock (MHz) and power (W), lowest
        clock, highest temperature; None without samples there."""
        got = [s for s in list(self.samples) if start <= s[0] <= end]
        if not got:
            return None
        watts, temps = [s[2] for s in got if s[2] == s[2]], [s[3] for s in got if s[3] == s[3]]
        return {"sm_mhz_median": statistics.median(s[1] for s in got), "sm_mhz_min": min(s[1] for s in got),
                "power_w_median": statistics.median(watts) if watts else None,
                "temp_c_max": max(temps) if temps else None, "samples": len(got)}  # fmt: skip

    def close(self) -> None:
        if self._proc is not None:
            self._proc.terminate()
            self._proc.wait()
            self._reader.join(timeout=5)


def _number(field: str) -> float:
    """One CSV field as a number; NaN where nvidia-smi could not read it ("[N/A]", "[Not Supported]")."""
    try:
        return float(field)
    except ValueError:
        return math.nan


def describe(span: dict[str, Any] | None) -> str:
    """A span as one short phrase for a printed line."""
    if span is None:
        return "clocks not sampled"
    watts, temp = span["power_w_median"], span["temp_c_max"]
    return (f"SM {span['sm_mhz_median']:.0f} MHz (min {span['sm_mhz_min']:.0f}), "
            f"{'?' if watts is None else f'{watts:.0f}'} W, up to {'?' if temp is None else f'{temp:.0f}'} C")


def gpu_uuid() -> str | None:
    """nvidia-smi's name for the GPU torch uses (CUDA_VISIBLE_DEVICES may renumber them); None without CUDA."""
    import torch

    if not torch.cuda.is_available():
        return None
    uuid = str(torch.cuda.get_device_properties(torch.cuda.current_device()).uuid)
    return uuid if uuid.startswith("GPU-") else f"GPU-{uuid}"
