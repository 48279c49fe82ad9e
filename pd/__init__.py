"""Prefill/decode disaggregated serving for Mixture-of-Experts models."""

import os

# The Triton kernels were tuned, and their tolerances set, with FP fusion (fused multiply-adds) on: Triton's default
# up to 3.9, which 3.10 turns off. Keep it on unless the operator chose (TRITON_DEFAULT_FP_FUSION, or Triton's
# TRITON_FORCE_DISABLE_FP_FUSION, which still wins).
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
