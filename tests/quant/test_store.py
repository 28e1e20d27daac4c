import pytest
import torch

from transformers_kvquant.quant.codebook import uniform_codebook
from transformers_kvquant.quant.memory import store_report
from transformers_kvquant.quant.quantizer import (
    ChannelKeyQuantizer,
    TokenQuantizer,
    fake_quantize,
)
from transformers_kvquant.quant.store import (
    CapacityError,
    FullPrecisionStore,
    PackedStore,
    StaticFullPrecisionStore,
)
from transformers_kvquant.quant.uncapped_store import UncappedPackedStore


def make_store(bits=3, h=2, d=32, slots=2, sink=1, window=0, uncapped=False, **kwargs):
    """A packed store with bounded outliers (``slots`` per token and head), or the uncapped one."""
    g = torch.Generator().manual_seed(0)
    zero = torch.randn(h, d, generator=g) * 0.1
    scale = torch.rand(h, d, generator=g) + 0.5
    if uncapped:
        kq = ChannelKeyQuantizer(uniform_codebook(bits), zero, scale, outliers=slots > 0)
        vq = TokenQuantizer(uniform_codebook(bits), slots)
        return UncappedPackedStore(kq, vq, bits, sink_tokens=sink, recent_window=window), kq, vq
    kq = ChannelKeyQuantizer(uniform_codebook(bits), zero, scale, outliers=slots > 0, head_slots=slots)
    vq = TokenQuantizer(uniform_codebook(bits), slots, per_head=True)
    return PackedStore(kq, vq, bits, sink_tokens=sink, recent_window=window, **kwargs), kq, vq


def data(b=2, h=2, t=23, d=32, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, h, t, d, generator=g) * 1.5, torch.randn(b, h, t, d, generator=g), torch.arange(t).expand(b, t)


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_chunked_appends_equal_one_append_and_fake_quant(bits):
    k, v, pos = data()
    one, kq, vq = make_store(bits, sink=0)
    one.append(k, v, pos)
    many, _, _ = make_store(bits, sink=0)
    for a, b in [(0, 5), (5, 6), (6, 23)]:
        many.append(k[:, :, a:b], v[:, :, a:b], pos[:, a:b])
    k1, v1 = one.keys_values()
    k2, v2 = many.keys_values()
    assert torch.equal(k1, k2) and torch.equal(v1, v2)
    assert torch.equal(k1, fake_quantize(kq, k)) and torch.equal(v1, fake_quantize(vq, v))
    assert torch.equal(one.positions(), pos.int())


def test_sink_is_exact_and_follows_the_last_position_zero_under_left_padding():
    k, v, _ = data(b=2, t=10)
    pos = torch.tensor([[0, 0, 0, 0, 1, 2, 3, 4, 5, 6], list(range(10))])  # row 0: 3 pads then the real token
    store, _, _ = make_store(sink=1)
    store.append(k, v, pos)
    kd, vd = store.keys_values()
    assert torch.equal(kd[0, :, 3], k[0, :, 3]) and torch.equal(vd[0, :, 3], v[0, :, 3])
    assert torch.equal(kd[1, :, 0], k[1, :, 0])
    assert not torch.equal(kd[0, :, 0], k[0, :, 0])  # a pad slot is quantized
    assert store.cache.sink_slot.tolist() == [[3], [0]]


def test_recent_window_keeps_newest_tokens_exact_and_quantizes_on_exit():
    k, v, pos = data(b=1, t=20)
    store, kq, vq = make_store(window=4, sink=0)
    for t in range(20):
        store.append(k[:, :, t : t + 1], v[:, :, t : t + 1], pos[:, t : t + 1])
        kd, _ = store.keys_values()
        n = t + 1
        exact = min(4, n)
        assert torch.equal(kd[:, :, n - exact :], k[:, :, n - exact : n])
        if n > 4:
            assert torch.equal(kd[:, :, : n - 4], fake_quantize(kq, k[:, :, : n - 4]))
    assert store.length == 20 and int(store.cache.length) == 20


def test_crop_then_append_matches_never_appended():
    k, v, pos = data()
    a, _, _ = make_store(window=3)
    a.append(k[:, :, :15], v[:, :, :15], pos[:, :15])
    a.append(k[:, :, 15:20] * 7, v[:, :, 15:20] * 7, pos[:, 15:20])
    a.crop(5)
    a.append(k[:, :, 15:], v[:, :, 15:], pos[:, 15:])
    b, _, _ = make_store(window=3)
    b.append(k[:, :, :15], v[:, :, :15], pos[:, :15])
    b.append(k[:, :, 15:], v[:, :, 15:], pos[:, 15:])
    # Both hold tokens 0..22, every one packed and the newest 3 exact: identical.
    ka, va = a.keys_values()
    kb, vb = b.keys_values()
    assert ka.shape == kb.shape == k.shape
    assert torch.equal(ka, kb) and torch.equal(va, vb)
    assert torch.equal(a.positions(), b.positions())


def test_crop_removes_sink_beyond_length():
    k, v, pos = data(t=4)
    s, _, _ = make_store()
    s.append(k, v, pos)
    s.crop(4)
    assert (s.cache.sink_slot == -1).all() and s.length == 0
    s.append(k, v, pos)
    kd, _ = s.keys_values()
    assert torch.equal(kd[:, :, 0], k[:, :, 0])


def test_map_rows_reorders_every_tensor():
    k, v, pos = data(b=3)
    s, _, _ = make_store(window=2)
    s.append(k, v, pos)
    before_k, before_v = s.keys_values()
    idx = torch.tensor([2, 0, 0])
    s.map_rows(lambda t: t.index_select(0, idx))
    after_k, after_v = s.keys_values()
    assert torch.equal(after_k, before_k[idx]) and torch.equal(after_v, before_v[idx])
    s.append(k[:, :, :1], v[:, :, :1], pos[:, :1] + 23)
    assert s.keys_values()[0].shape[2] == 24


def test_eviction_and_growth_keep_the_retained_slots():
    k, v, pos = data(b=1, t=200)
    s, _, _ = make_store(window=5)
    ref, _, _ = make_store(window=5)
    ref.append(k, v, pos)
    rk, rv = ref.keys_values()
    for t in range(0, 200, 7):
        s.append(k[:, :, t : t + 7], v[:, :, t : t + 7], pos[:, t : t + 7])
        s.evict_before(s.length - 30)
        kd, vd = s.keys_values()
        assert kd.shape[2] == min(30, s.length)
        assert torch.equal(s.positions(), pos[:, s.start : s.length].int())
    # Retained tokens equal the reference store's (the sink slot was evicted); the packed layout keeps evicted slots'
    # memory (a sliding layer's memory is that of its whole history; docs/format.md).
    kd, vd = s.keys_values()
    assert torch.equal(kd, rk[:, :, s.start :]) and torch.equal(vd, rv[:, :, s.start :])
    assert s.capacity >= 200


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_accounting_counts_every_tensor(bits):
    """Bytes per token are a constant of the config: codes, 16-bit ranges, bounded outliers (16-bit residual + 8-bit
    channel per slot), positions; plus the exact sink."""
    b, h, t, d, slots = 2, 3, 64, 64, 2
    k, v, pos = data(b=b, h=h, t=t, d=d)
    s, _, _ = make_store(bits=bits, h=h, d=d, slots=slots, sink=1)
    s.append(k, v, pos)
    rep = store_report(s)
    codes = 2 * b * h * t * d * bits // 8
    ranges = 2 * b * t * 2
    outliers = 2 * b * h * t * slots * (2 + 1)
    positions = b * t * 4
    sink = 2 * b * h * d * 4 + b * 8
    length = 4  # the int32 device length
    assert rep.total_bytes == codes + ranges + outliers + positions + sink + length
    assert rep.elements == 2 * b * t * h * d


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_uncapped_accounting_counts_every_tensor(bits):
    b, h, t, d, slots = 2, 3, 64, 64, 2
    k, v, pos = data(b=b, h=h, t=t, d=d)
    s, kq, _ = make_store(bits=bits, h=h, d=d, slots=slots, sink=1, uncapped=True)
    s.append(k, v, pos)
    rep = store_report(s)
    key_outliers = int((kq.normalize(k)[1]).sum())
    assert key_outliers > 0
    codes = 2 * b * h * t * d * bits // 8
    ranges = 2 * b * t * 2
    value_outliers = b * t * slots * (2 + 2)
    key_csr = b * t * 4 + key_outliers * (2 + 2) + b * 8  # begins, entries, each row's int64 entry count
    positions = b * t * 4
    sink = 2 * b * h * d * 4 + b * 8
    assert rep.total_bytes == codes + ranges + value_outliers + key_csr + positions + sink
    assert rep.elements == 2 * b * t * h * d


def test_key_outliers_survive_crop_reorder_and_eviction():
    k, v, pos = data(b=3, t=40)
    k[:, :, ::3] *= 6  # many out-of-range keys, unevenly spread over tokens and rows
    k[1] *= 2
    s, kq, _ = make_store(window=0, sink=0, uncapped=True)
    s.append(k[:, :, :25], v[:, :, :25], pos[:, :25])
    s.append(k[:, :, 25:] * 9, v[:, :, 25:], pos[:, 25:])
    s.crop(15)
    s.append(k[:, :, 25:], v[:, :, 25:], pos[:, 25:])
    ref, _, _ = make_store(window=0, sink=0, uncapped=True)
    ref.append(k, v, pos)
    assert torch.equal(s.keys_values()[0], ref.keys_values()[0])
    assert torch.equal(s.key_nnz, ref.key_nnz)
    idx = torch.tensor([2, 2, 0])
    s.map_rows(lambda t: t.index_select(0, idx))
    torch.testing.assert_close(s.keys_values()[0], ref.keys_values()[0][idx], rtol=0, atol=0)
    # Evict and keep appending: entries of evicted slots are dropped when the entry buffer grows.
    grow, _, _ = make_store(window=0, sink=0, uncapped=True)
    for a in range(0, 40, 5):
        grow.append(k[:, :, a : a + 5], v[:, :, a : a + 5], pos[:, a : a + 5])
        grow.evict_before(grow.length - 12)
    torch.testing.assert_close(grow.keys_values()[0], ref.keys_values()[0][:, :, grow.start :], rtol=0, atol=0)
    live = int((kq.normalize(k[:, :, grow.start :])[1]).sum())
    assert store_report(grow).bytes_by_component["key_outlier_entries"] == live * 4 + 3 * 8  # + int64 row counts


def test_full_precision_store_is_exact():
    k, v, pos = data()
    s = FullPrecisionStore()
    s.append(k[:, :, :9], v[:, :, :9], pos[:, :9])
    s.append(k[:, :, 9:], v[:, :, 9:], pos[:, 9:])
    kd, vd = s.keys_values()
    assert torch.equal(kd, k) and torch.equal(vd, v)
    s.crop(3)
    assert s.keys_values()[0].shape[2] == 20


# ------------------------------------------------------------------------------------------------ static stores
def test_static_store_reads_its_whole_capacity_and_matches_the_growing_one():
    k, v, pos = data(t=23)
    static, _, _ = make_store(window=3, capacity=100, static=True)
    growing, _, _ = make_store(window=3)
    for a, b in [(0, 9), (9, 10), (10, 11), (11, 23)]:
        static.append(k[:, :, a:b], v[:, :, a:b], pos[:, a:b])
        growing.append(k[:, :, a:b], v[:, :, a:b], pos[:, a:b])
    ks, vs = static.keys_values()
    kg, vg = growing.keys_values()
    assert ks.shape[2] == static.capacity == 128  # whole blocks
    assert torch.equal(ks[:, :, :23], kg) and torch.equal(vs[:, :, :23], vg)
    assert int(static.cache.length) == 23 and static.host_length == 23


def test_static_store_refuses_to_overflow_before_writing():
    k, v, pos = data(t=23)
    s, _, _ = make_store(capacity=128, static=True)
    s.append(k, v, pos)
    big = torch.randn(2, 2, 110, 32)
    before = s.cache.key_codes.clone()
    with pytest.raises(CapacityError, match="max_cache_len"):
        s.append(big, big, torch.arange(23, 133).expand(2, 110))
    assert torch.equal(s.cache.key_codes, before) and int(s.cache.length) == 23


def test_static_full_precision_store_is_exact_and_bounded():
    k, v, pos = data()
    s = StaticFullPrecisionStore(32)
    s.append(k[:, :, :9], v[:, :, :9], pos[:, :9])
    s.append(k[:, :, 9:], v[:, :, 9:], pos[:, 9:])
    kd, vd = s.keys_values()
    assert kd.shape[2] == 32 and torch.equal(kd[:, :, :23], k) and torch.equal(vd[:, :, :23], v)
    with pytest.raises(CapacityError):
        s.append(k, v, pos)
    s.crop(3)
    assert s.length == 20 and int(s.device_length) == 20


def test_packed_store_rejects_uncapped_quantizers():
    g = torch.Generator().manual_seed(0)
    kq = ChannelKeyQuantizer(uniform_codebook(3), torch.zeros(2, 32), torch.ones(2, 32), outliers=True)
    vq = TokenQuantizer(uniform_codebook(3), 2)
    with pytest.raises(ValueError, match="UncappedPackedStore"):
        PackedStore(kq, vq, 3)
    del g
