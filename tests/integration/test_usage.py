"""The snippets of docs/usage.md, run on stories260K with the configs shipped in hub_configs/."""

from __future__ import annotations

import pytest

from transformers_kvquant import KVQuantCache, KVQuantConfig
from transformers_kvquant.config.discovery import hub_configs_dir

from .common import generate


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_cache_implementation_finds_the_shipped_config(bits, stories):
    model, tok = stories
    inputs = tok(["Once upon a time"], return_tensors="pt")
    out = generate(
        model,
        inputs,
        max_new_tokens=8,
        cache_implementation="kvquant",
        cache_config={"bits": bits, "outlier_fraction": 0.01},
    )
    cache = out.past_key_values
    assert isinstance(cache, KVQuantCache)
    assert cache.settings.source == f"hub_configs/stories260k/nuq{bits}-1pct"
    assert cache.settings.config.bits == bits and cache.layers[0].store.bits == bits


def test_generation_config_and_explicit_config_routes(stories):
    model, tok = stories
    inputs = tok(["Once upon a time"], return_tensors="pt")
    folder = hub_configs_dir() / "stories260k" / "nuq4-1pct"
    saved = (model.generation_config.cache_implementation, model.generation_config.cache_config)
    try:
        model.generation_config.cache_implementation = "kvquant"
        model.generation_config.cache_config = {"config": str(folder)}
        via_generation_config = generate(model, inputs, max_new_tokens=8)
    finally:
        (model.generation_config.cache_implementation, model.generation_config.cache_config) = saved
    # generate makes a static cache of its own maximum length (prompt + 8 - 1 tokens); the same by hand:
    capacity = inputs["input_ids"].shape[1] + 8 - 1
    via_object = generate(
        model, inputs, max_new_tokens=8,
        past_key_values=KVQuantCache(model, KVQuantConfig.from_pretrained(folder), max_cache_len=capacity),
    )
    assert via_generation_config.past_key_values.is_compileable and via_object.past_key_values.is_compileable
    assert via_generation_config.past_key_values.settings.config.name == "nuq4-1%"
    # Same config, same model: the two routes build the same cache and generate the same tokens.
    assert via_generation_config.sequences.tolist() == via_object.sequences.tolist()
    assert all((a == b).all() for a, b in zip(via_generation_config.logits, via_object.logits, strict=True))
