"""The slots' RoPE positions are kept once per cache (and device), not once per layer: every layer stores the same
tokens at the same slots. Generation is the same as with a positions tensor per layer through growth, beam reorders
and resets, on the growing and the static cache, eager and compiled; the memory report counts the positions once."""

from __future__ import annotations

import pytest
import torch

from tests.helpers import quick_config
from transformers_kvquant import KVQuantCache, unpatch_model

from .common import BEAM, generate, left_padded


def own_positions(cache):
    """The cache with a positions tensor per layer, as before the positions were shared."""
    for layer in cache.layers:
        layer.shared_positions = None
    return cache


def positions_tensors(cache) -> set[int]:
    return {layer.store.cache.positions.data_ptr() for layer in cache.layers}


@pytest.mark.parametrize("static", [False, True], ids=["growing", "static"])
@pytest.mark.parametrize("mode", ["greedy", "beam"])
def test_generation_is_the_same_with_shared_or_per_layer_positions(mode, static, stories):
    model, tok = stories
    config = quick_config(model, bits=3, outlier_fraction=0.05)
    batch = left_padded(tok)
    extra = BEAM if mode == "beam" else {}
    opts = {"max_cache_len": 256} if static else {}
    runs = []
    for share in (True, False):
        cache = KVQuantCache(model, config, **opts)
        if not share:
            own_positions(cache)
        # 130 new tokens: the growing cache's buffers grow past their first capacity (128 slots) on the way
        runs.append((cache, generate(model, batch, max_new_tokens=130, min_new_tokens=130, past_key_values=cache, **extra)))
    (shared, a), (per_layer, b) = runs
    assert shared.layers[0].store.capacity > 128
    assert torch.equal(a.sequences, b.sequences)
    assert all(torch.equal(x, y) for x, y in zip(a.scores, b.scores))
    assert len(positions_tensors(shared)) == 1 and len(positions_tensors(per_layer)) == len(model.model.layers)
    layers = len(model.model.layers)
    rows, slots = shared.layers[0].store.batch, shared.layers[0].store.length
    saved = per_layer.memory_report().total_bytes - shared.memory_report().total_bytes
    assert saved == (layers - 1) * rows * slots * 4  # the int32 positions of every further layer
    assert shared.memory_report().bytes_by_component["positions"] == rows * slots * 4
    unpatch_model(model)


def test_compiled_decode_steps_write_the_shared_positions(stories):
    """A compiled step (the static cache's custom operators on a GPU, the reference path here) appends every layer's
    position into the one shared tensor: the logits of eager steps, and the positions of each new slot."""
    from .test_static import decode_steps

    model, tok = stories
    ids = tok(["Once upon a time"], return_tensors="pt").input_ids
    config = quick_config(model, bits=4)
    eager_cache = own_positions(KVQuantCache(model, config, max_cache_len=64))
    eager = decode_steps(model, eager_cache, ids, 5, compiled=False)
    torch._dynamo.reset()
    cache = KVQuantCache(model, config, max_cache_len=64)
    compiled = decode_steps(model, cache, ids, 5, compiled=True)
    assert torch.equal(compiled.argmax(-1), eager.argmax(-1)) and float((compiled - eager).abs().max()) < 1e-4
    assert len(positions_tensors(cache)) == 1
    n = ids.shape[1] + 5
    assert torch.equal(cache.layers[0].store.cache.positions[0, :n], torch.arange(n, dtype=torch.int32))
    unpatch_model(model)


def test_reset_with_another_batch_shares_again(stories):
    model, tok = stories
    config = quick_config(model, bits=2)
    cache = KVQuantCache(model, config)
    generate(model, left_padded(tok), max_new_tokens=4, past_key_values=cache)
    cache.reset()
    two = left_padded(tok, ["Tom had a red ball", "The sun"])
    again = generate(model, two, max_new_tokens=6, past_key_values=cache)
    fresh = generate(model, two, max_new_tokens=6, past_key_values=KVQuantCache(model, config))
    assert torch.equal(again.sequences, fresh.sequences)
    assert len(positions_tensors(cache)) == 1 and cache.layers[0].store.batch == 2
    unpatch_model(model)
