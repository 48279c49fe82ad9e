"""Loaded at start-up by any Python whose PYTHONPATH holds this folder: when TRITON_INTERPRET=1, applies the
fixes that make Triton's interpreter compute like compiled Triton (tests.triton_interpreter), so
server processes started by tests can run the Triton MoE runner on a CPU."""

import os
import sys

if os.environ.get("TRITON_INTERPRET") == "1":
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
    from tests.triton_interpreter import patch_interpreter

    patch_interpreter()
