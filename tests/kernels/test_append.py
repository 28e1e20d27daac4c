"""The append kernel writes what the PyTorch reference writes (codes, ranges, outliers, window, sink, length), under
the Triton interpreter on CPU or compiled on a GPU (KVQUANT_TEST_COMPILED=1)."""

from __future__ import annotations

import pytest
import torch
from transformers_kvquant.kernels.append import append_packed
from transformers_kvquant.kernels.naive import append_reference, dequantize
from transformers_kvquant.kernels.synthetic import random_cache

from tests.kernels.common import DEVICE

# (batch, kv heads, head_dim, bits, outliers, recent window, model dtype, new tokens)
GRID = [
    (2, 2, 64, 3, 1, 0, torch.float16, 5),
    (1, 3, 64, 2, 2, 4, torch.float16, 3),  # SmolLM2's 3 KV heads (padded to 4 in the kernel)
    (2, 2, 128, 4, 2, 0, torch.bfloat16, 2),
    (1, 4, 128, 3, 0, 0, torch.float32, 7),
    (3, 8, 64, 4, 3, 2, torch.float16, 1),  # a decode step of a batch; 3 outliers (not a power of two)
    (1, 1, 128, 2, 1, 0, torch.float16, 9),
]


def inputs(b, h, d, n, dtype, seed=5):
    g = torch.Generator().manual_seed(seed)
    k = (torch.randn(b, h, n, d, generator=g) * 2).to(dtype)
    v = torch.randn(b, h, n, d, generator=g).to(dtype)
    k[0, 0, 0, 3] = 40.0  # a key far outside its range and a value outlier in the last head
    v[0, -1, -1, 5] = -30.0
    pos = torch.arange(10, 10 + n).expand(b, n).to(torch.int32)
    return k.to(DEVICE), v.to(DEVICE), pos.to(DEVICE)


@pytest.mark.parametrize("c", GRID, ids=lambda c: f"B{c[0]}-H{c[1]}-D{c[2]}-b{c[3]}-o{c[4]}-w{c[5]}-{str(c[6])[6:]}-T{c[7]}")
def test_append_matches_reference(c):
    b, h, d, bits, s, window, dtype, n = c
    ref = random_cache(b, h, d, bits, 10, outliers=s, recent_window=window, dtype=dtype, device=DEVICE, seed=2)
    out = random_cache(b, h, d, bits, 10, outliers=s, recent_window=window, dtype=dtype, device=DEVICE, seed=2)
    k, v, pos = inputs(b, h, d, n, dtype)
    append_reference(ref, k, v, pos)
    append_packed(out, k, v, pos)
    exact = {"key_codes", "value_codes", "value_zero", "value_scale", "key_outlier_index", "value_outlier_index",
             "positions", "length", "window_keys", "window_values", "sink_keys", "sink_values", "sink_slot"}
    for name, t in ref.tensors().items():
        if name in exact:
            assert torch.equal(t, out.tensors()[name]), name
    # residuals: fp32 differences rounded to 16 bits (the interpreter rounds bf16 differently): one unit at most
    for name in ("key_outlier_values", "value_outlier_values"):
        a, e = ref.tensors()[name].float(), out.tensors()[name].float()
        assert torch.allclose(a, e, rtol=2 ** -7, atol=1e-6), name
    k1, v1 = dequantize(ref, 0, 10 + n, torch.float32, 10 + n)
    k2, v2 = dequantize(out, 0, 10 + n, torch.float32, 10 + n)
    assert torch.allclose(k1, k2, rtol=1e-2, atol=1e-2) and torch.allclose(v1, v2, rtol=1e-2, atol=1e-2)


def test_outliers_are_kept():
    """The far-out key and value come back (nearly) exactly; without outliers they saturate."""
    for s, close in ((1, True), (0, False)):
        cache = random_cache(1, 2, 64, 3, 10, outliers=s, device=DEVICE, seed=2)
        k, v, pos = inputs(1, 2, 64, 3, torch.float16)
        append_packed(cache, k, v, pos)
        kd, vd = dequantize(cache, 10, 13, torch.float32, 13)
        assert (abs(float(kd[0, 0, 0, 3]) - 40.0) < 0.1) == close
        assert (abs(float(vd[0, -1, -1, 5]) + 30.0) < 0.1) == close


def test_slots_past_the_capacity_are_never_written():
    cache = random_cache(1, 2, 64, 3, 126, outliers=1, capacity=128, device=DEVICE, seed=2)
    before = {n: t.clone() for n, t in cache.tensors().items()}
    k, v, pos = inputs(1, 2, 64, 4, torch.float16)
    from transformers_kvquant.kernels.append import append_slots

    append_slots(cache, k, v, pos)  # slots 126..129 of 128: two fit
    assert not torch.equal(cache.key_codes[..., 126:], before["key_codes"][..., 126:])
    assert cache.key_codes.shape == before["key_codes"].shape
    assert torch.equal(cache.key_codes[..., :126], before["key_codes"][..., :126])


def test_ties_go_to_the_lower_channel_in_both():
    """Keys exactly at their range's edge (equal errors) and repeated values (equal extremes): the kernel and the
    reference break ties alike (lower channel), so they store the same outliers."""
    ref = random_cache(1, 2, 64, 3, 10, outliers=2, device=DEVICE, seed=4)
    out = random_cache(1, 2, 64, 3, 10, outliers=2, device=DEVICE, seed=4)
    k = (ref.key_zero + ref.key_scale)[None, :, None, :].repeat(1, 1, 2, 1).clone()  # every key at +1: all tie
    k[:, :, 1, ::3] = (ref.key_zero - ref.key_scale)[None, :, ::3]
    v = torch.zeros(1, 2, 2, 64)
    v[..., 5] = v[..., 9] = v[..., 40] = 3.0  # three equal maxima per head
    v[..., 7] = v[..., 8] = -2.0
    k, v = k.to(DEVICE, torch.float16), v.to(DEVICE, torch.float16)
    pos = torch.tensor([[10, 11]], dtype=torch.int32, device=DEVICE)
    append_reference(ref, k, v, pos)
    append_packed(out, k, v, pos)
    for name in ("key_outlier_index", "value_outlier_index", "key_codes", "value_codes", "value_zero", "value_scale"):
        assert torch.equal(ref.tensors()[name], out.tensors()[name]), name
    assert ref.value_outlier_index[0, 0, :, 10].tolist() == [7, 8]  # dropping both lows leaves the smallest range


@pytest.mark.parametrize("n, window", [(3, 0), (133, 4)], ids=["decode-batch", "long-chunk"])
def test_sink_and_window_under_left_padding(n, window):
    """Left padding gives several slots position 0 before the real first token: the last of them is the sink in the
    kernel as in the reference, in an append longer than one scan of the later positions (128); the ring keeps the
    newest tokens only."""
    b, h, d = 2, 3, 64
    ref = random_cache(b, h, d, 3, 0, outliers=1, recent_window=window, sink_tokens=2, capacity=256, device=DEVICE, seed=3)
    out = random_cache(b, h, d, 3, 0, outliers=1, recent_window=window, sink_tokens=2, capacity=256, device=DEVICE, seed=3)
    k, v, _ = inputs(b, h, d, n, torch.float16)
    pad = torch.tensor([2, 0])  # row 0: two pad tokens at position 0 before the real ones
    pos = torch.stack([torch.clamp(torch.arange(n) - int(p), min=0) for p in pad]).to(torch.int32).to(DEVICE)
    append_reference(ref, k, v, pos)
    append_packed(out, k, v, pos)
    for name in ("sink_keys", "sink_values", "sink_slot", "positions", "length", "window_keys", "window_values", "key_codes"):
        assert torch.equal(ref.tensors()[name], out.tensors()[name]), name
    assert out.sink_slot[0].tolist() == ([2, 3] if n > 3 else [2, -1]) and out.sink_slot[1].tolist() == [0, 1]
