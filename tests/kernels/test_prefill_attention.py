"""Chunked prefill over the packed cache equals the fp32 PyTorch reference."""

from __future__ import annotations

import pytest
import torch
from transformers_kvquant.kernels.naive import packed_attention_naive
from transformers_kvquant.kernels.prefill import prefill_attention
from transformers_kvquant.kernels.synthetic import (
    query_rope,
    random_packed_kv,
    rope_inv_freq,
)

from tests.kernels.common import COMPILED, DEVICE, TOLERANCE, rel_err

# fp32 models use IEEE fp32 dots (no tf32); compiled sums run in another order.
FP32_TOL = 1e-4 if COMPILED else TOLERANCE[torch.float32]

# (batch, kv heads, query heads per kv head, head_dim, visible slots, chunk, bits, outlier slots)
GRID = [
    (1, 2, 1, 64, 37, 9, 3, 3),
    (3, 1, 4, 64, 21, 21, 2, 2),  # the whole context is the chunk
    (1, 2, 8, 128, 19, 5, 4, 0),
    (3, 3, 3, 64, 17, 4, 3, 1),
]


def case_id(c):
    b, h, g, d, n, t, bits, s = c
    return f"B{b}-H{h}x{g}-D{d}-L{n}-T{t}-b{bits}-o{s}"


def run(cache, groups, chunk, dtype=torch.float32, mask=None, window=0, seed=0):
    gen = torch.Generator().manual_seed(seed)
    b, h, d = cache.batch, cache.heads, cache.head_dim
    inv_freq = rope_inv_freq(d).to(DEVICE)
    q = torch.randn(b, h * groups, chunk, d, generator=gen).to(DEVICE, dtype)
    a = cache.begin - cache.offset
    qc, qs = query_rope(cache.positions[:, a + cache.total - chunk : a + cache.total], inv_freq, dtype)
    args = (q, qc, qs, cache, inv_freq, 1.0, d**-0.5)
    gp = 1 << (groups - 1).bit_length()
    out = prefill_attention(*args, mask=mask, sliding_window=window, block_t=max(1, 16 // gp), block_n=16)
    return out, packed_attention_naive(*args, mask=mask, sliding_window=window)


@pytest.mark.parametrize("c", GRID, ids=case_id)
def test_prefill_matches_reference(c):
    b, h, g, d, n, t, bits, s = c
    cache = random_packed_kv(b, h, d, bits, n, s, window=2, pads=[0, 3, 6][:b], spare=2, dtype=torch.float32, device=DEVICE, seed=n)
    out, ref = run(cache, g, t)
    assert out.shape == (b, t, h * g, d)
    assert rel_err(out, ref) < FP32_TOL


def test_padding_mask_sliding_window_and_fp16():
    pads = [5, 0]
    cache = random_packed_kv(2, 2, 64, 3, 24, 2, window=3, pads=pads, begin=2, dtype=torch.float16, device=DEVICE, seed=4)
    t = 7
    keep = torch.ones(2, 1, t, cache.total, dtype=torch.bool)
    keep[0, ..., : pads[0] - 2] = False  # two pad slots were evicted with the prefix
    out, ref = run(cache, 2, t, dtype=torch.float16, mask=keep.to(DEVICE), window=10)
    assert out.dtype == torch.float16
    assert rel_err(out, ref) < 4e-3
