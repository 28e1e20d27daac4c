"""The dequantize kernel (the prefill path's read of the packed prefix) equals the PyTorch reference."""

from __future__ import annotations

import pytest
import torch
from transformers_kvquant.kernels.dequant import dequantize_packed
from transformers_kvquant.kernels.naive import dequantize
from transformers_kvquant.kernels.synthetic import random_cache

from tests.kernels.common import DEVICE

FP32_TOL = dict(rtol=2**-20, atol=2**-20)  # ~1e-6: a wrong code or range moves values by far more


@pytest.mark.parametrize("b,h,d,bits,s,window,dtype,begin,length", [
    (2, 2, 64, 3, 1, 3, torch.float16, 0, 70),
    (1, 3, 64, 2, 2, 0, torch.bfloat16, 5, 37),
    (3, 1, 128, 4, 3, 2, torch.float32, 17, 100),
    (1, 2, 128, 3, 0, 0, torch.float16, 0, 1),
])
def test_dequantize_matches_reference(b, h, d, bits, s, window, dtype, begin, length):
    cache = random_cache(b, h, d, bits, length, outliers=s, recent_window=window, pads=[0, 3, 1][:b], dtype=dtype, device=DEVICE, seed=length)
    k, v = dequantize_packed(cache, begin, length, dtype, length)
    kr, vr = dequantize(cache, begin, length, dtype, length)
    assert k.shape == (b, h, length - begin, d) and k.dtype == dtype
    # the same fp32 values rounded to the model dtype (the interpreter rounds bf16 by truncation: one unit); in fp32
    # a compiled kernel contracts x * scale + zero into one FMA (one rounding, torch rounds twice): a few ulps
    tol = {torch.bfloat16: dict(rtol=2**-7, atol=0), torch.float32: FP32_TOL}.get(dtype, dict(rtol=0, atol=0))
    assert torch.allclose(k.float(), kr.float(), **tol) and torch.allclose(v.float(), vr.float(), **tol)


def test_static_read_to_the_capacity_uses_the_device_length():
    """A static cache reads every slot; the exact window sits at the device length, not at the end of the read."""
    cache = random_cache(1, 2, 64, 3, 40, outliers=1, recent_window=4, capacity=256, device=DEVICE, seed=1)
    k_all, _ = dequantize(cache, 0, cache.capacity, torch.float32, None)
    k_len, _ = dequantize(cache, 0, 40, torch.float32, 40)
    assert torch.equal(k_all[:, :, :40], k_len)
    k_kernel, _ = dequantize_packed(cache, 0, cache.capacity, torch.float32, None)
    assert torch.allclose(k_kernel, k_all, **FP32_TOL)
