"""Quantized caches (2/3/4 bits): batch and length edits keep every stored component consistent.

The caches here are filled by direct layer updates (``layer.stage(positions)`` then ``layer.update(k, v)``, what
the attention hook does) with synthetic pre-RoPE keys around the calibrated per-channel ranges, a few large
outliers, and left-padding positions. An edited cache (beam reorder, batch select, repeat, crop) must hold exactly
what a cache built directly from the edited rows holds: codes, value ranges, outliers, sink, recent window, slot
positions and the dequantized keys/values.
"""

from __future__ import annotations

import pytest
import torch

from tests.helpers import quick_config, tiny_mistral
from transformers_kvquant import KVQuantCache
from transformers_kvquant.quant.store import PackedStore

BITS = (2, 3, 4)
ROWS = 3


@pytest.fixture(scope="module")
def calibrated(stories_module):
    model, _ = stories_module
    return {bits: quick_config(model, bits=bits, outlier_fraction=0.05) for bits in BITS}


@pytest.fixture(scope="module")
def stories_module():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tests.helpers import STORIES

    return AutoModelForCausalLM.from_pretrained(STORIES).eval(), AutoTokenizer.from_pretrained(STORIES)


def synthetic_kv(config, rows=ROWS, tokens=24, pads=(0, 3, 6), seed=0):
    """Pre-RoPE-like keys/values ``[rows, H, T, D]`` for layer 0 and left-padded positions ``[rows, T]``."""
    g = torch.Generator().manual_seed(seed)
    layer = config.layers[0]
    heads, dim = layer.key_zero.shape
    keys = (
        layer.key_zero[None, :, None]
        + layer.key_scale[None, :, None] * torch.randn(rows, heads, tokens, dim, generator=g) * 0.6
    )
    values = torch.randn(rows, heads, tokens, dim, generator=g)
    spikes = torch.rand(rows, heads, tokens, dim, generator=g) < 0.02
    keys = torch.where(spikes, keys * 8, keys)
    values = torch.where(spikes, values * 8, values)
    positions = torch.zeros(rows, tokens, dtype=torch.long)
    for r, p in enumerate(pads):
        positions[r, p:] = torch.arange(tokens - p)  # pads keep position 0, as generate sets them
    return keys, values, positions


def feed(cache, keys, values, positions, chunks, layer_idx=0):
    """Append tokens to one layer in chunks (prefill, then decode steps) exactly as the attention hook does."""
    layer = cache.layers[layer_idx]
    t = 0
    for n in chunks:
        layer.stage(positions[:, t : t + n], n)
        returned = layer.update(keys[:, :, t : t + n], values[:, :, t : t + n])
        t += n
    return returned


def state(store: PackedStore) -> dict:
    """Every live component of a packed store, by name: per-slot tensors over the retained slots, the exact window's
    live ring entries, the captured sink tokens, the dequantized keys/values and the counters."""
    from transformers_kvquant.kernels.layout import SLOT_AXIS

    if not isinstance(store, PackedStore):  # the uncapped store: what it reads back
        keys, values = store.keys_values()
        return {"dequantized_keys": keys, "dequantized_values": values}
    c = store.cache
    out = {name: getattr(c, name).narrow(axis, store.start, store.retained) for name, axis in SLOT_AXIS.items()}
    live = torch.arange(max(store.length - c.recent_window, 0), store.length)
    ring = live % c.window_keys.shape[2]
    out["window_keys"], out["window_values"] = c.window_keys[:, :, ring], c.window_values[:, :, ring]
    captured = (c.sink_slot >= 0)[:, None, :, None]
    out["sink_keys"] = torch.where(captured, c.sink_keys, 0)
    out["sink_values"] = torch.where(captured, c.sink_values, 0)
    out["sink_slot"] = c.sink_slot
    keys, values = store.keys_values()
    out["dequantized_keys"], out["dequantized_values"] = keys, values
    out["counters"] = torch.tensor([store.batch, store.start, store.length, int(c.length)])
    return out


def assert_same_state(a: PackedStore, b: PackedStore) -> None:
    sa, sb = state(a), state(b)
    assert sa.keys() == sb.keys()
    for name in sa:
        assert sa[name].dtype == sb[name].dtype, name
        assert torch.equal(sa[name], sb[name]), f"{name} differs"


def make(model, config, **options):
    return KVQuantCache(
        model,
        config,
        sink_tokens=options.pop("sink_tokens", 2),
        recent_window=options.pop("recent_window", 3),
        **options,
    )


CHUNKS = [14, 1, 1, 1, 4, 1, 1, 1]  # a prefill, decode steps and a 4-token verification step: 24 tokens


@pytest.mark.parametrize("window", [0, 3])
@pytest.mark.parametrize("bits", BITS)
def test_beam_reorder_equals_cache_of_reordered_rows(bits, window, stories_module, calibrated):
    model, _ = stories_module
    keys, values, positions = synthetic_kv(calibrated[bits])
    beam_idx = torch.tensor([2, 0, 0])
    edited = make(model, calibrated[bits], recent_window=window)
    feed(edited, keys, values, positions, CHUNKS[:4])  # 17 tokens, then reorder, then 7 more of the new rows
    edited.reorder_cache(beam_idx)
    k2, v2, p2 = keys[beam_idx], values[beam_idx], positions[beam_idx]
    feed_from(edited, k2, v2, p2, start=17, chunks=CHUNKS[4:])
    direct = make(model, calibrated[bits], recent_window=window)
    feed(direct, k2, v2, p2, CHUNKS)
    assert_same_state(edited.layers[0].store, direct.layers[0].store)


def feed_from(cache, keys, values, positions, start, chunks, layer_idx=0):
    return feed(cache, keys[:, :, start:], values[:, :, start:], positions[:, start:], chunks, layer_idx)


@pytest.mark.parametrize("bits", BITS)
def test_batch_select_and_repeat_equal_direct_caches(bits, stories_module, calibrated):
    model, _ = stories_module
    keys, values, positions = synthetic_kv(calibrated[bits])
    selected = make(model, calibrated[bits])
    feed(selected, keys, values, positions, CHUNKS)
    selected.batch_select_indices(torch.tensor([0, 2]))
    direct = make(model, calibrated[bits])
    feed(direct, keys[[0, 2]], values[[0, 2]], positions[[0, 2]], CHUNKS)
    assert_same_state(selected.layers[0].store, direct.layers[0].store)

    repeated = make(model, calibrated[bits])
    feed(repeated, keys, values, positions, CHUNKS)
    repeated.batch_repeat_interleave(2)
    idx = torch.arange(ROWS).repeat_interleave(2)
    direct = make(model, calibrated[bits])
    feed(direct, keys[idx], values[idx], positions[idx], CHUNKS)
    assert_same_state(repeated.layers[0].store, direct.layers[0].store)


@pytest.mark.parametrize("window", [0, 3])
@pytest.mark.parametrize("bits", BITS)
def test_crop_forgets_exactly_the_newest_tokens(bits, window, stories_module, calibrated):
    model, _ = stories_module
    keys, values, positions = synthetic_kv(calibrated[bits])
    cache = make(model, calibrated[bits], recent_window=window)
    feed(cache, keys, values, positions, [14, 1, 1])
    store = cache.layers[0].store
    before_k, before_v = store.keys_values()
    before_pos = store.positions().clone()
    feed_from(cache, keys, values, positions, start=16, chunks=[5])  # 5 drafted tokens ...
    cache.crop(-5)  # ... all rejected
    assert cache.get_seq_length() == 16
    after_k, after_v = store.keys_values()
    assert torch.equal(store.positions(), before_pos)
    # Every token is packed and the exact window is a ring with room to spare: the cache is exactly what it was
    # before the drafts, window included.
    assert torch.equal(after_k, before_k) and torch.equal(after_v, before_v)
    assert int(store.cache.length) == store.length == 16
    # Appending after the crop continues from slot 16 with the right positions.
    feed_from(cache, keys, values, positions, start=16, chunks=[2])
    assert store.positions()[:, 16:].tolist() == positions[:, 16:18].tolist()
    assert store.length == 18 and int(store.cache.length) == 18


@pytest.mark.parametrize("bits", BITS)
def test_crop_into_the_sink_recaptures_it(bits, stories_module, calibrated):
    """Cropping back over the sink positions drops the sink copies; re-appending restores them exactly."""
    model, _ = stories_module
    keys, values, positions = synthetic_kv(calibrated[bits], pads=(0, 0, 0))
    cache = make(model, calibrated[bits], sink_tokens=2, recent_window=0)
    feed(cache, keys, values, positions, [8])
    cache.crop(-7)
    assert cache.layers[0].store.cache.sink_slot[:, 1].tolist() == [-1] * ROWS  # position 1 was cropped away
    feed_from(cache, keys, values, positions, start=1, chunks=[5, 1, 1])
    direct = make(model, calibrated[bits], sink_tokens=2, recent_window=0)
    feed(direct, keys, values, positions, [1, 5, 1, 1])
    assert_same_state(cache.layers[0].store, direct.layers[0].store)


@pytest.mark.parametrize("bits", BITS)
def test_sink_tokens_are_exact_and_pads_never_win(bits, stories_module, calibrated):
    model, _ = stories_module
    keys, values, positions = synthetic_kv(calibrated[bits], pads=(0, 3, 6))
    cache = make(model, calibrated[bits], sink_tokens=2, recent_window=0)
    feed(cache, keys, values, positions, [14, 1])
    k, v = cache.layers[0].store.keys_values()
    for row, pad in enumerate((0, 3, 6)):
        for pos in range(2):  # the real tokens at positions 0 and 1 are exact
            assert torch.equal(k[row, :, pad + pos], keys[row, :, pad + pos])
            assert torch.equal(v[row, :, pad + pos], values[row, :, pad + pos])
        if pad:  # pad slots (position 0 too) stay quantized
            assert not torch.equal(k[row, :, 0], keys[row, :, 0])


@pytest.mark.parametrize("bits", BITS)
def test_sliding_layer_reorder_after_eviction(bits, calibrated_mistral):
    model, config = calibrated_mistral[bits]
    keys, values, positions = synthetic_kv(config)
    window = model.config.sliding_window
    beam_idx = torch.tensor([1, 1, 0])
    edited = make(model, config, recent_window=2)
    feed(edited, keys, values, positions, CHUNKS[:4])
    edited.reorder_cache(beam_idx)
    returned = feed_from(edited, keys[beam_idx], values[beam_idx], positions[beam_idx], start=17, chunks=CHUNKS[4:])
    direct = make(model, config, recent_window=2)
    feed(direct, keys[beam_idx], values[beam_idx], positions[beam_idx], CHUNKS)
    assert_same_state(edited.layers[0].store, direct.layers[0].store)
    layer = edited.layers[0]
    assert returned[0].shape[2] == window  # W-1 older tokens plus the new one, as DynamicSlidingWindowLayer returns
    assert layer.returned_positions()[0].tolist() == positions[beam_idx][0, -window:].tolist()


@pytest.fixture(scope="module")
def calibrated_mistral():
    model = tiny_mistral(sliding_window=6, heads=4, kv_heads=2, head_dim=8)
    return {bits: (model, quick_config(model, bits=bits, outlier_fraction=0.05)) for bits in BITS}


@pytest.mark.parametrize("window,outliers,croppable", [(0, "bounded", True), (3, "bounded", True), (0, "uncapped", True), (3, "uncapped", False)])
def test_is_croppable_tells_whether_crop_restores_the_state(window, outliers, croppable, stories_module, calibrated):
    """transformers' rollback contract: ``is_croppable`` promises crop leaves no trace. The packed layout keeps every
    token packed and the exact window in a ring with room to spare, so crops leave none; the uncapped store moves
    tokens out of its window, which a crop cannot undo."""
    model, _ = stories_module
    cache = make(model, calibrated[3], recent_window=window, outliers=outliers)
    assert cache.is_croppable is croppable
    assert KVQuantCache(model, bits=16, recent_window=window).is_croppable
    keys, values, positions = synthetic_kv(calibrated[3])
    feed(cache, keys, values, positions, [14])
    before = state(cache.layers[0].store)
    feed_from(cache, keys, values, positions, start=14, chunks=[4])
    cache.crop(-4)
    after = state(cache.layers[0].store)
    same = all(torch.equal(before[n], after[n]) for n in ("dequantized_keys", "dequantized_values"))
    assert same is croppable


def test_crop_past_the_ring_slack_is_a_clear_error(stories_module, calibrated):
    model, _ = stories_module
    cache = make(model, calibrated[3], recent_window=3)
    keys, values, positions = synthetic_kv(calibrated[3], tokens=80)
    feed(cache, keys, values, positions, [80])
    with pytest.raises(ValueError, match="at most 64 tokens"):
        cache.crop(-70)
    assert cache.get_seq_length() == 80  # nothing changed
