"""The append kernel writes exactly the codes, ranges and outliers of the PyTorch quantizers."""

from __future__ import annotations

import pytest
import torch
from transformers_kvquant.kernels.append import append_packed
from transformers_kvquant.kernels.layout import pack, packed_words
from transformers_kvquant.kernels.naive import append_naive

from tests.kernels.common import DEVICE
from transformers_kvquant.quant.codebook import Codebook
from transformers_kvquant.quant.quantizer import ChannelKeyQuantizer, TokenQuantizer
from transformers_kvquant.quant.store import PackedStore

NAMES = ["key_codes", "value_codes", "value_zero", "value_scale", "value_outlier_values", "value_outlier_index"]


def quantizers(h, d, bits, key_outliers, value_slots, seed=0):
    g = torch.Generator().manual_seed(seed)
    zero = torch.randn(h, d, generator=g) * 0.2
    scale = torch.rand(h, d, generator=g) + 0.5
    kb = Codebook(torch.sort(torch.rand(2**bits, generator=g) * 2 - 1).values)
    vb = Codebook(torch.sort(torch.rand(2**bits, generator=g) * 2 - 1).values)
    return ChannelKeyQuantizer(kb, zero, scale, bool(key_outliers)), TokenQuantizer(vb, value_slots)


def params(kq, vq):
    return [x.to(DEVICE) for x in (kq.zero, kq.scale, kq.codebook.boundaries, vq.codebook.boundaries)]


def data(b, h, t, d, dtype, seed=1):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(b, h, t, d, generator=g) * 1.5).to(dtype), torch.randn(b, h, t, d, generator=g).to(dtype)


def empty_buffers(b, h, cap, d, bits, vs, half, idt=torch.int16):
    w = packed_words(d, bits)
    return {
        "key_codes": torch.full((b, h, cap, w), 7, dtype=torch.int32),
        "value_codes": torch.full((b, h, cap, w), 7, dtype=torch.int32),
        "value_zero": torch.zeros(b, cap, dtype=half),
        "value_scale": torch.zeros(b, cap, dtype=half),
        "value_outlier_values": torch.zeros(b, cap, vs, dtype=half),
        "value_outlier_index": torch.zeros(b, cap, vs, dtype=idt),
    }


def same_key_outliers(got, want):
    if want is None:
        return got is None
    return all(torch.equal(getattr(got, n).cpu(), getattr(want, n).cpu()) for n in ("counts", "values", "channels"))


@pytest.mark.parametrize("bits", [2, 3, 4], ids=lambda b: f"b{b}")
@pytest.mark.parametrize("shape", [(1, 2, 5, 64, 0), (3, 1, 9, 128, 3), (2, 3, 1, 64, 2)], ids=lambda s: "B{}-H{}-T{}-D{}-o{}".format(*s))
def test_append_kernel_equals_the_reference_and_the_core_quantizers(bits, shape):
    b, h, t, d, slots = shape
    kq, vq = quantizers(h, d, bits, slots > 0, slots, seed=bits)
    k, v = data(b, h, t, d, torch.float32, seed=t)
    ref = append_naive(k, v, kq.zero, kq.scale, kq.codebook.boundaries, vq.codebook.boundaries, slots > 0, slots, bits)
    # The reference is the core quantizers' result (codes, ranges, outlier choice and order).
    qk, qv = kq.quantize(k), vq.quantize(v)
    assert torch.equal(ref["key_codes"], pack(qk.codes, bits)) and torch.equal(ref["value_codes"], pack(qv.codes, bits))
    assert same_key_outliers(ref["key_outliers"], qk.sparse)
    assert slots == 0 or int(qk.sparse.counts.sum()) > 0  # the data has key outliers to find
    assert torch.equal(ref["value_outlier_index"], qv.outlier_index)
    assert torch.equal(ref["value_zero"], qv.zero) and torch.equal(ref["value_scale"], qv.scale)
    at, cap = 2, t + 5
    bufs = {n: x.to(DEVICE) for n, x in empty_buffers(b, h, cap, d, bits, slots, torch.float16).items()}
    sparse = append_packed(k.to(DEVICE), v.to(DEVICE), *params(kq, vq), slots > 0, slots, bits, bufs, at)
    assert same_key_outliers(sparse, ref["key_outliers"])
    for name in NAMES:
        dim = 2 if name.endswith("codes") else 1
        assert torch.equal(bufs[name].narrow(dim, at, t).cpu(), ref[name]), name
        before = bufs[name].narrow(dim, 0, at).cpu()
        assert torch.equal(before, empty_buffers(b, h, cap, d, bits, slots, torch.float16)[name].narrow(dim, 0, at)), f"{name} written outside its slots"


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_half_precision_inputs(dtype):
    b, h, t, d, bits = 2, 2, 6, 64, 3
    kq, vq = quantizers(h, d, bits, True, 2)
    k, v = data(b, h, t, d, dtype)
    ref = append_naive(k, v, kq.zero, kq.scale, kq.codebook.boundaries, vq.codebook.boundaries, True, 2, bits)
    assert same_key_outliers(ref["key_outliers"], kq.quantize(k).sparse)
    bufs = {n: x.to(DEVICE) for n, x in empty_buffers(b, h, t, d, bits, 2, ref["value_zero"].dtype).items()}
    sparse = append_packed(k.to(DEVICE), v.to(DEVICE), *params(kq, vq), True, 2, bits, bufs, 0)
    assert same_key_outliers(sparse, ref["key_outliers"])
    for name in NAMES:
        assert torch.equal(bufs[name].cpu(), ref[name]), name


def test_store_with_append_kernel_equals_torch_store():
    """PackedStore._pack through the kernel (forced on CPU under the interpreter) stores the same bytes, CSR key
    outliers included."""
    h, d, bits = 2, 64, 3
    kq, vq = quantizers(h, d, bits, True, 2)
    k, v = data(2, h, 9, d, torch.float32)
    pos = torch.arange(9).expand(2, 9)
    stores = []
    for use in (False, True):
        store = PackedStore(kq, vq, bits, sink_tokens=1, recent_window=2)
        store.append_kernel = use
        for a, e in [(0, 4), (4, 5), (5, 9)]:
            store.append(k[:, :, a:e].to(DEVICE), v[:, :, a:e].to(DEVICE), pos[:, a:e].to(DEVICE))
        stores.append(store)
    for name in NAMES + ["key_outlier_begin"]:
        assert torch.equal(stores[0].packed_view(name).cpu(), stores[1].packed_view(name).cpu()), name
    a, b = stores
    assert torch.equal(a.key_nnz.cpu(), b.key_nnz.cpu()) and int(a.key_nnz.min()) > 0
    n = int(a.key_nnz.max())
    assert torch.equal(a.key_entry_values[:, :n].cpu(), b.key_entry_values[:, :n].cpu())
    assert torch.equal(a.key_entry_channels[:, :n].cpu(), b.key_entry_channels[:, :n].cpu())
