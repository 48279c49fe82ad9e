"""Loaded at start-up by any Python whose PYTHONPATH holds this folder: when TRITON_INTERPRET=1, applies the
fixes that make Triton's interpreter compute like compiled Triton (tests.test_moe_triton.patch_interpreter), so
server processes started by tests can run the Triton MoE runner on a CPU."""

import os
import sys

if os.environ.get("TRITON_INTERPRET") == "1":
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
    from tests.test_moe_triton import patch_interpreter

    patch_interpreter()
