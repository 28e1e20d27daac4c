"""The static cache: what ``generate(cache_implementation="kvquant")`` makes, and what ``torch.compile`` captures.

- ``bits=16`` static reproduces transformers' ``StaticCache`` (``cache_implementation="static"``) bit for bit in
  every generation mode, as the growing cache reproduces ``DynamicCache`` (test_exactness.py);
- a compiled decode step (``fullgraph=True``: no graph break, no recompilation from step to step) gives the eager
  step's logits exactly, unquantized and quantized (the reference path on CPU; the kernels on a GPU, as custom
  operators: benchmarks/gpu_checks.py);
- the quantized static cache generates the growing cache's tokens; capacity overflow is an error before any write.
"""

from __future__ import annotations

import pytest
import torch

from tests.helpers import quick_config, tiny_mistral
from transformers_kvquant import KVQuantCache, unpatch_model
from transformers_kvquant.quant.store import CapacityError

from .common import (
    BEAM,
    SAMPLING,
    assert_exact,
    generate,
    left_padded,
    random_batch,
    reference,
)

STATIC16 = {"cache_implementation": "kvquant", "cache_config": {"bits": 16}}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("mode", ["greedy", "sampling", "beam"])
def test_bits16_static_matches_static_cache(mode, attn, dtype, stories, stories_variant):
    _, tok = stories
    model = stories_variant(dtype, attn)
    batch = left_padded(tok)
    extra = {"greedy": {}, "sampling": SAMPLING, "beam": BEAM}[mode]
    expected = reference(model, batch, max_new_tokens=20, cache_implementation="static", **extra)
    actual = generate(model, batch, max_new_tokens=20, **STATIC16, **extra)
    assert_exact(expected, actual)
    cache = actual.past_key_values
    assert cache.is_compileable and cache.settings.static
    assert int(cache.get_seq_length()) == actual.sequences.shape[1] - 1


def test_bits16_static_sliding_window_matches_static_cache():
    """transformers' static sliding layer keeps a ring of the window; ours keeps every slot and masks the old ones:
    the same tokens, and logits equal up to the softmax's summation order over the wider (masked) rows."""
    model = tiny_mistral(sliding_window=6)
    batch = random_batch(model.config.vocab_size, lengths=(9, 5, 2))
    expected = reference(model, batch, max_new_tokens=16, cache_implementation="static")
    actual = generate(model, batch, max_new_tokens=16, **STATIC16)
    assert torch.equal(expected.sequences, actual.sequences)
    assert max(float((a - b).abs().max()) for a, b in zip(expected.logits, actual.logits)) < 1e-5


def decode_steps(model, cache, ids, steps, compiled):
    """Prefill eagerly, then ``steps`` greedy decode steps through ``model.forward`` (compiled or not)."""
    forward = torch.compile(model.forward, fullgraph=True, backend="aot_eager") if compiled else model.forward
    logits = []
    with torch.no_grad():
        out = model(ids, past_key_values=cache, use_cache=True)
        token = out.logits[:, -1:].argmax(-1)
        pos = ids.shape[1]
        for _ in range(steps):
            where = torch.tensor([pos])
            out = forward(input_ids=token, past_key_values=cache, cache_position=where, position_ids=where[None], use_cache=True)
            logits.append(out.logits[:, -1])
            token = out.logits[:, -1:].argmax(-1)
            pos += 1
    return torch.stack(logits)


@pytest.mark.parametrize("quantized", [False, True], ids=["bits16", "nuq4"])
def test_compiled_decode_step_is_one_graph_and_matches_eager(quantized, stories):
    """gpt-fast style: ``torch.compile(model.forward, fullgraph=True)`` over the static cache. Dynamo would raise on a
    graph break; the frame counter shows the step was compiled once (no recompilation as the length grows)."""
    import torch._dynamo

    model, tok = stories
    ids = tok(["Once upon a time"], return_tensors="pt").input_ids
    options = {"config": quick_config(model, bits=4)} if quantized else {"bits": 16}
    eager = decode_steps(model, KVQuantCache(model, max_cache_len=64, **options), ids, 6, compiled=False)
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    compiled = decode_steps(model, KVQuantCache(model, max_cache_len=64, **options), ids, 6, compiled=True)
    assert torch.equal(compiled.argmax(-1), eager.argmax(-1))
    assert float((compiled - eager).abs().max()) < 1e-4  # aot_eager runs the decomposed ops: float-order differences
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 1
    unpatch_model(model)


def test_generate_auto_compiles_the_static_cache(stories):
    """generate compiles the decode step of a compileable cache (here on CPU, asked for explicitly): same tokens and
    logits as the eager static cache."""
    from transformers import CompileConfig

    model, tok = stories
    batch = left_padded(tok)
    eager = generate(model, batch, max_new_tokens=8, **STATIC16, disable_compile=True)
    config = CompileConfig(fullgraph=True, backend="aot_eager", mode=None)
    config._compile_all_devices = True
    compiled = generate(model, batch, max_new_tokens=8, **STATIC16, compile_config=config)
    assert hasattr(model, "_compiled_call")  # generate really went through its compiled forward
    assert torch.equal(eager.sequences, compiled.sequences)
    assert max(float((a - b).abs().max()) for a, b in zip(eager.logits, compiled.logits)) < 1e-4
    del model._compiled_call
    unpatch_model(model)


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_quantized_static_generates_the_growing_caches_tokens(bits, stories):
    model, tok = stories
    config = quick_config(model, bits=bits)
    batch = left_padded(tok)
    growing = generate(model, batch, max_new_tokens=12, past_key_values=KVQuantCache(model, config))
    static = generate(model, batch, max_new_tokens=12, cache_implementation="kvquant", cache_config={"config": config})
    assert static.past_key_values.is_compileable and not growing.past_key_values.is_compileable
    assert torch.equal(static.sequences, growing.sequences)
    worst = max(float((a - b).abs().max()) for a, b in zip(static.logits, growing.logits))
    assert worst < 5e-3  # the same keys and values; attention runs over the whole (masked) capacity


def test_generate_keeps_the_largest_capacity_across_calls(stories, monkeypatch):
    """As for transformers' "static": a later call with fewer tokens keeps the earlier, larger capacity (a compiled
    step is specialized to it), and ``max_cache_len`` sizes the cache for the worst case up front."""
    model, tok = stories
    config = quick_config(model, bits=3)
    batch = left_padded(tok)
    prompt = batch["input_ids"].shape[1]
    monkeypatch.setattr(model, "_previous_max_cache_length", -1, raising=False)
    kv = {"cache_implementation": "kvquant", "cache_config": {"config": config}}
    long = generate(model, batch, max_new_tokens=140, **kv)
    capacity = long.past_key_values.layers[0].settings.capacity
    assert capacity == 128 * -(-(prompt + 140) // 128) > 128
    short = generate(model, batch, max_new_tokens=4, **kv)
    assert short.past_key_values.layers[0].settings.capacity == capacity
    assert torch.equal(short.sequences, long.sequences[:, : prompt + 4])
    sized = generate(model, batch, max_new_tokens=4, max_cache_len=600, **kv)
    assert sized.past_key_values.layers[0].settings.capacity == 640
    with pytest.raises(ValueError, match="max_cache_len=600 sizes a static cache"):
        generate(model, batch, max_new_tokens=4, max_cache_len=600, cache_implementation="kvquant",
                 cache_config={"config": config, "static": False})
    # an explicit capacity in cache_config is taken as it is
    fixed = generate(model, batch, max_new_tokens=4, cache_implementation="kvquant", cache_config={"config": config, "max_cache_len": 64})
    assert fixed.past_key_values.layers[0].settings.capacity == 128
    unpatch_model(model)


def test_capacity_overflow_is_a_clear_error_before_any_write(stories):
    model, tok = stories
    config = quick_config(model, bits=3)
    ids = tok(["Once upon a time there was a dog"], return_tensors="pt").input_ids
    cache = KVQuantCache(model, config, max_cache_len=ids.shape[1] + 2)  # rounded up to whole blocks: 128
    assert cache.layers[0].settings.capacity == 128
    with torch.no_grad():
        model(ids, past_key_values=cache, use_cache=True)
        store = cache.layers[0].store
        before = store.cache.key_codes.clone()
        long = torch.randint(3, 500, (1, 125))
        with pytest.raises(CapacityError, match="max_cache_len"):
            model(long, past_key_values=cache, use_cache=True)
    assert torch.equal(store.cache.key_codes, before) and int(store.cache.length) == ids.shape[1]
    unpatch_model(model)


def test_static_needs_a_capacity_and_uncapped_outliers_cannot_be_static(stories):
    model, _ = stories
    config = quick_config(model, bits=3)
    with pytest.raises(ValueError, match="max_cache_len"):
        KVQuantCache(model, config, static=True)
    with pytest.raises(ValueError, match="static"):
        KVQuantCache(model, config, max_cache_len=64, outliers="uncapped")
    assert not KVQuantCache(model, config, outliers="uncapped").is_compileable
