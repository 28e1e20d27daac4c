"""Shared pieces of the kernel tests: device choice, error ratio, tolerances."""

from __future__ import annotations

import os

import torch

# Under the Triton interpreter (CPU) the kernels run on CPU tensors; compiled runs (KVQUANT_TEST_COMPILED=1) on CUDA.
COMPILED = os.environ.get("KVQUANT_TEST_COMPILED") == "1"
DEVICE = "cuda" if COMPILED else "cpu"

# Relative error ||out - ref|| / ||ref|| allowed against the fp32 reference, by output dtype. fp32: fp32 math in a
# different order (and approximate sin/cos/exp2 on the GPU); 16-bit: one rounding of the output.
TOLERANCE = {torch.float32: 2e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    out, ref = out.float().cpu(), ref.float().cpu()
    assert out.shape == ref.shape, f"{tuple(out.shape)} vs {tuple(ref.shape)}"
    assert torch.isfinite(out).all(), "non-finite output"
    return float((out - ref).norm() / ref.norm().clamp_min(1e-30))
