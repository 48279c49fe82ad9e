"""Environment switches of the kernels (PD_FP8_GEMM, PD_MOE_TMA, ...): read at each use, a value outside the
switch's choices a clear error rather than a silent default."""

from __future__ import annotations

import os


def env_choice(name: str, default: str, choices: tuple[str, ...]) -> str:
    """Environment variable ``name`` (``default`` when unset), which must be one of ``choices``.

    Raises:
        ValueError: naming the variable, its value and the choices.
    """
    value = os.environ.get(name, default)
    if value not in choices:
        listed = " or ".join(choices) if len(choices) < 3 else f"{', '.join(choices[:-1])} or {choices[-1]}"
        raise ValueError(f"{name}={value!r}: expected {listed}")
    return value
