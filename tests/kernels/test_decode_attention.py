"""Decode attention on the packed cache equals the fp32 PyTorch reference (run under the Triton interpreter on CPU,
compiled on a GPU with KVQUANT_TEST_COMPILED=1)."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from transformers_kvquant.kernels.decode import decode_attention
from transformers_kvquant.kernels.naive import packed_attention_naive
from transformers_kvquant.kernels.synthetic import (
    query_rope,
    random_packed_kv,
    rope_inv_freq,
)

from tests.kernels.common import DEVICE, TOLERANCE, rel_err

# (batch, kv heads, query heads per kv head, head_dim, visible slots, bits, outlier slots): MHA, GQA 4:1 and 8:1,
# head_dim 64 and 128, odd lengths, every bit width with and without outliers. Outlier slots s: s value outliers per
# token and CSR key outliers with 0..2s per slot (every 7th slot of a row up to a quarter of its channels).
GRID = [
    (1, 2, 1, 64, 21, 3, 3),
    (3, 2, 1, 64, 7, 2, 0),
    (1, 2, 4, 64, 15, 4, 5),
    (3, 1, 4, 128, 7, 3, 2),
    (1, 1, 8, 128, 13, 2, 4),
    (3, 2, 8, 64, 5, 4, 0),
    (1, 4, 1, 128, 9, 4, 7),
    (1, 3, 3, 64, 11, 3, 1),  # non-power-of-two heads and groups (SmolLM2: 3 KV heads, 9 query heads)
]


def case_id(c):
    b, h, g, d, n, bits, s = c
    return f"B{b}-H{h}x{g}-D{d}-L{n}-b{bits}-o{s}"


def run(cache, groups=1, dtype=torch.float32, mask=None, window=0, splits=3, attention_scaling=1.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    b, h, d = cache.batch, cache.heads, cache.head_dim
    inv_freq = rope_inv_freq(d).to(DEVICE)
    q = (torch.randn(b, h * groups, 1, d, generator=g) * 2).to(DEVICE, dtype)
    pos = cache.positions[:, cache.begin - cache.offset + cache.total - 1][:, None]
    qc, qs = query_rope(pos, inv_freq, dtype)
    args = (q, qc, qs, cache, inv_freq, attention_scaling, d**-0.5)
    out = decode_attention(*args, mask=mask, sliding_window=window, num_splits=splits)
    ref = packed_attention_naive(*args, mask=mask, sliding_window=window)
    return out, ref


@pytest.mark.parametrize("c", GRID, ids=case_id)
def test_decode_matches_reference(c):
    b, h, g, d, n, bits, s = c
    cache = random_packed_kv(b, h, d, bits, n, s, sink_tokens=1, window=2, pads=[0, 2, 5][:b], spare=3, dtype=torch.float32, device=DEVICE, seed=n)
    out, ref = run(cache, groups=g)
    assert out.shape == (b, 1, h * g, d)
    assert rel_err(out, ref) < TOLERANCE[torch.float32]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_half_precision_inputs_and_output(dtype):
    cache = random_packed_kv(2, 2, 64, 3, 9, 2, window=1, dtype=dtype, device=DEVICE, seed=3)
    out, ref = run(cache, groups=2, dtype=dtype, attention_scaling=0.9)
    assert out.dtype == dtype
    assert rel_err(out, ref) < TOLERANCE[dtype]


@pytest.mark.parametrize("kind", ["bool", "additive"])
def test_left_padding_mask(kind):
    pads = [0, 4]
    cache = random_packed_kv(2, 2, 64, 4, 10, 2, window=1, pads=pads, dtype=torch.float32, device=DEVICE, seed=5)
    keep = torch.ones(2, 1, 1, cache.total, dtype=torch.bool)
    keep[1, ..., : pads[1]] = False
    mask = keep if kind == "bool" else torch.zeros(keep.shape).masked_fill(~keep, torch.finfo(torch.float32).min)
    out, ref = run(cache, mask=mask.to(DEVICE))
    assert rel_err(out, ref) < TOLERANCE[torch.float32]
    unmasked, _ = run(cache)
    assert rel_err(unmasked, ref) > 1e-3  # the padded slots really were hidden


def test_sliding_window_and_evicted_prefix():
    cache = random_packed_kv(1, 2, 64, 2, 16, 3, window=2, begin=5, spare=2, dtype=torch.float32, device=DEVICE, seed=7)
    out, ref = run(cache, groups=2, window=9)
    assert rel_err(out, ref) < TOLERANCE[torch.float32]


def test_only_exact_tokens_and_sink_in_window():
    # Everything in the recent window: no packed slot at all; the sink's slot is a window slot.
    cache = random_packed_kv(2, 1, 64, 3, 5, 2, window=5, dtype=torch.float32, device=DEVICE, seed=9)
    out, ref = run(cache, groups=4)
    assert rel_err(out, ref) < TOLERANCE[torch.float32]


def test_split_count_does_not_change_the_result():
    cache = random_packed_kv(1, 2, 64, 3, 17, 3, dtype=torch.float32, device=DEVICE, seed=11)
    one, ref = run(cache, splits=1)
    many, _ = run(cache, splits=5)
    assert rel_err(one, ref) < TOLERANCE[torch.float32] and rel_err(many, ref) < TOLERANCE[torch.float32]
    assert rel_err(one, many) < 1e-5


def test_outliers_and_sink_change_the_output():
    """The comparison can fail: dropping the outliers or the sink moves the result far beyond the tolerance."""
    cache = random_packed_kv(1, 2, 64, 2, 12, 4, dtype=torch.float32, device=DEVICE, seed=13)
    out, ref = run(cache)
    no_outliers = dataclasses.replace(
        cache, key_outlier_begin=torch.zeros_like(cache.key_outlier_begin), key_entry_values=cache.key_entry_values[:, :0],
        key_entry_channels=cache.key_entry_channels[:, :0], key_nnz=torch.zeros_like(cache.key_nnz),
        value_outlier_index=torch.full_like(cache.value_outlier_index, -1))
    no_sink = dataclasses.replace(cache, sink_slot=torch.full_like(cache.sink_slot, -1))
    for other in (no_outliers, no_sink):
        changed, changed_ref = run(other)
        assert rel_err(changed, changed_ref) < TOLERANCE[torch.float32]
        assert rel_err(changed, out) > 1e-3
