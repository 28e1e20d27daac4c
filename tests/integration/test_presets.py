"""Presets: ``cache_config={"preset": ...}`` and the evaluation's ``preset`` fill the runtime settings a calibrated
config leaves open (recent window, outlier layout), and explicit keys win."""

from __future__ import annotations

import pytest
import torch

from tests.helpers import quick_config
from transformers_kvquant import KVQuantCache
from transformers_kvquant.config import KVQuantConfig, KVQuantConfigError
from transformers_kvquant.config.presets import LONG_CONTEXT_WINDOW, PRESETS, preset_options, preset_window
from transformers_kvquant.evaluation.perplexity import make_method
from transformers_kvquant.quant.uncapped_store import UncappedPackedStore


def test_default_preset_is_the_config_as_calibrated(stories):
    model, _ = stories
    config = quick_config(model, bits=3).with_runtime(recent_window=5)
    cache = KVQuantCache(model, config)
    assert (cache.settings.recent_window, cache.settings.outliers) == (5, "bounded")
    assert KVQuantCache(model, config, preset="default").settings == cache.settings


def test_paper_preset_is_the_papers_recipe(stories):
    model, tok = stories
    config = quick_config(model, bits=3).with_runtime(recent_window=5)
    cache = KVQuantCache(model, config, preset="paper", max_cache_len=64)  # generate's length does not make it static
    s = cache.settings
    assert (s.recent_window, s.outliers, s.static, s.sink_tokens) == (0, "uncapped", False, config.sink_tokens)
    ids = tok("Once upon a time", return_tensors="pt").input_ids
    with torch.no_grad():
        model(ids, past_key_values=cache, use_cache=True)
    assert isinstance(cache.layers[0].store, UncappedPackedStore)


def test_long_context_preset_window_follows_the_width(stories):
    """128 exact tokens at 2 and 3 bits, 512 at 4; a mixed config gets its narrowest layer's window."""
    model, _ = stories
    for bits, window in ((2, 128), (3, 128), (4, 512)):
        config = quick_config(model, bits=bits)
        s = KVQuantCache(model, config, preset="long-context").settings
        assert (s.recent_window, s.outliers, config.recent_window) == (window, "bounded", 0)
        assert make_method("kvquant", model, config=config, preset="long-context").window == window
    four, three = quick_config(model, bits=4), quick_config(model, bits=3)
    layers = [three.layers[i] if i == 2 else layer for i, layer in enumerate(four.layers)]
    mixed = KVQuantConfig(**{**four.__dict__, "layers": layers, "layer_bits": [4, 4, 3, 4, 4]})
    assert KVQuantCache(model, mixed, preset="long-context").settings.recent_window == 128
    assert preset_window(LONG_CONTEXT_WINDOW) == 512  # no config (bits=16): the widest entry
    assert KVQuantCache(model, four, preset="long-context", recent_window=7).settings.recent_window == 7


def test_explicit_keys_win_over_the_preset(stories):
    model, _ = stories
    config = quick_config(model, bits=3)
    s = KVQuantCache(model, config, preset="paper", recent_window=4, outliers="bounded").settings
    assert (s.recent_window, s.outliers) == (4, "bounded")


def test_bad_presets_are_clear_errors(stories):
    model, _ = stories
    config = quick_config(model, bits=3)
    with pytest.raises(ValueError, match="unknown preset 'fast'.*default.*paper"):
        KVQuantCache(model, config, preset="fast")
    with pytest.raises(ValueError, match="static.*'paper' preset"):
        KVQuantCache(model, config, preset="paper", static=True, max_cache_len=64)
    assert set(PRESETS) == {"default", "long-context", "quality", "paper"} and preset_options("default") == {}


def test_evaluation_presets(stories):
    model, _ = stories
    config = quick_config(model, bits=3).with_runtime(recent_window=6)
    paper = make_method("kvquant", model, config=config, preset="paper")
    default = make_method("kvquant", model, config=config)
    assert (paper.outliers, paper.window) == ("uncapped", 0) and "paper" in paper.name
    assert (default.outliers, default.window) == ("bounded", 6)
    with pytest.raises(ValueError, match="unknown preset"):
        make_method("kvquant", model, config=config, preset="nope")


def test_outlier_slots_keep_more_outliers_per_token(stories):
    """``outlier_slots``: a runtime number of bounded outliers per (token, KV head) on the calibrated ranges. The
    cache's layout holds that many for keys and values, the stored keys and values come closer to the exact ones
    than with the config's one slot, the bits grow by the slots' bytes, and the simulation matches."""
    model, tok = stories
    config = quick_config(model, bits=2, outlier_fraction=0.01)  # 2 bits: many elements compete for the slots
    ids = tok("Once upon a time there was a little girl who liked to play in the park with her dog", return_tensors="pt").input_ids
    errors, bytes_ = {}, {}
    for slots in (None, 3):
        cache = KVQuantCache(model, config, outlier_slots=slots)
        exact = KVQuantCache(model, bits=16)
        with torch.no_grad():
            model(ids, past_key_values=cache, use_cache=True)
            model(ids, past_key_values=exact, use_cache=True)
        store = cache.layers[1].store
        assert store.cache.key_outlier_index.shape[2] == store.cache.value_outlier_index.shape[2] == (slots or config.head_slots)
        k, v = store.keys_values()
        ek, ev = exact.layers[1].store.keys_values()
        errors[slots] = ((k.float() - ek.float()).norm() / ek.float().norm(), (v.float() - ev.float()).norm() / ev.float().norm())
        bytes_[slots] = sum(store.nbytes().values())
        assert f"{slots or 1} per token and head" in cache.settings.describe() or slots is None
    assert config.head_slots == 1
    assert errors[3][0] < errors[None][0] and errors[3][1] < errors[None][1]
    assert bytes_[3] > bytes_[None]
    one = make_method("kvquant", model, config=config)
    three = make_method("kvquant", model, config=config, outlier_slots=3)
    geometry = (config.fingerprint.num_key_value_heads, config.fingerprint.head_dim, 4096)
    assert three.avg_bits(*geometry) > one.avg_bits(*geometry)


@pytest.mark.parametrize("opts, message", [
    ({"outlier_slots": 0}, "outlier_slots'\\] must be a positive integer, got 0"),
    ({"outlier_slots": "2"}, "must be a positive integer"),
    ({"outlier_slots": 2, "outliers": "uncapped"}, "uncapped outliers have no fixed count"),
    ({"outlier_slots": 64}, "keeps at most"),
])
def test_bad_outlier_slots_are_clear_errors(stories, opts, message):
    model, _ = stories
    with pytest.raises(ValueError, match=message):
        KVQuantCache(model, quick_config(model, bits=3), **opts)


def test_outlier_slots_need_a_config_with_outliers(stories):
    model, _ = stories
    with pytest.raises(KVQuantConfigError, match="calibrated with outliers"):
        KVQuantCache(model, quick_config(model, bits=3, outlier_fraction=0.0), outlier_slots=2)


def test_quality_preset_adds_outlier_slots_to_the_long_context_window(stories):
    model, _ = stories
    four = quick_config(model, bits=4)
    s = KVQuantCache(model, four, preset="quality").settings
    assert (s.recent_window, s.outlier_slots) == (512, 2)
    assert KVQuantCache(model, four, preset="quality", outlier_slots=3).settings.outlier_slots == 3
    m = make_method("kvquant", model, config=four, preset="quality")
    assert (m.window, m.outlier_slots) == (512, 2) and "quality" in m.name
    with pytest.raises(KVQuantConfigError, match="calibrated with outliers"):
        KVQuantCache(model, quick_config(model, bits=4, outlier_fraction=0.0), preset="quality")
