"""Presets: ``cache_config={"preset": ...}`` and the evaluation's ``preset`` fill the runtime settings a calibrated
config leaves open (recent window, outlier layout), and explicit keys win."""

from __future__ import annotations

import pytest
import torch

from tests.helpers import quick_config
from transformers_kvquant import KVQuantCache
from transformers_kvquant.config import KVQuantConfig
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
    assert set(PRESETS) == {"default", "long-context", "paper"} and preset_options("default") == {}


def test_evaluation_presets(stories):
    model, _ = stories
    config = quick_config(model, bits=3).with_runtime(recent_window=6)
    paper = make_method("kvquant", model, config=config, preset="paper")
    default = make_method("kvquant", model, config=config)
    assert (paper.outliers, paper.window) == ("uncapped", 0) and "paper" in paper.name
    assert (default.outliers, default.window) == ("bounded", 6)
    with pytest.raises(ValueError, match="unknown preset"):
        make_method("kvquant", model, config=config, preset="nope")
