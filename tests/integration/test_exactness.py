"""Exactness: with ``cache_config={"bits": 16}`` the whole KVQuant path (pre-RoPE storage, RoPE at attention time,
sink, positions, eviction, crop, beam reorder) reproduces the default ``DynamicCache`` bit for bit.

Every case runs ``generate`` twice, on the unpatched model with the default cache and with the KVQuant cache, and
asserts equal tokens and max |Δlogit| == 0.0 for every step's logits and scores.
"""

from __future__ import annotations

import pytest
import torch

from tests.helpers import tiny_llama, tiny_mistral
from transformers_kvquant import KVQuantCache
from transformers_kvquant.integration.cache import KVQuantSlidingWindowLayer

from .common import (
    BEAM,
    EXACT,
    SAMPLING,
    assert_exact,
    generate,
    left_padded,
    random_batch,
    reference,
)

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
ATTN = ("sdpa", "eager")
MODES = ("greedy", "sampling", "beam", "assisted", "continue")


def check_mode(mode, model, batch, single, assistant, crop_calls, new_tokens=20):
    """Run one generation mode with the default cache and with ``bits=16``; assert they agree exactly."""
    kvq = {"cache_implementation": "kvquant", "cache_config": dict(EXACT)}
    if mode in ("greedy", "sampling", "beam"):
        extra = {"greedy": {}, "sampling": SAMPLING, "beam": BEAM}[mode]
        kwargs = dict(max_new_tokens=new_tokens, **extra)
        assert_exact(reference(model, batch, **kwargs), generate(model, batch, **kwargs, **kvq))
    elif mode == "assisted":
        # Assisted decoding runs batch 1; the drafter is weaker, so some drafts are rejected and the cache cropped.
        kwargs = {"max_new_tokens": new_tokens, "assistant_model": assistant}
        assert_exact(reference(model, single, **kwargs), generate(model, single, **kwargs, **kvq))
        assert any(n < 0 for n in crop_calls), f"assisted decoding never cropped the KVQuant cache: {crop_calls}"
    elif mode == "continue":
        half = new_tokens // 2
        ref1 = reference(model, batch, max_new_tokens=half)
        out1 = generate(model, batch, max_new_tokens=half, **kvq)
        assert_exact(ref1, out1)
        assert isinstance(out1.past_key_values, KVQuantCache)
        follow = torch.tensor([[7, 8, 9]] * batch["input_ids"].shape[0])  # a user turn appended to each row
        ids = torch.cat([out1.sequences, follow], dim=1)
        mask = torch.cat(
            [
                batch["attention_mask"],
                torch.ones(ids.shape[0], ids.shape[1] - batch["attention_mask"].shape[1], dtype=torch.long),
            ],
            dim=1,
        )
        nxt = {"input_ids": ids, "attention_mask": mask}
        ref2 = generate(model, nxt, max_new_tokens=half, past_key_values=ref1.past_key_values)
        out2 = generate(model, nxt, max_new_tokens=half, past_key_values=out1.past_key_values)
        assert_exact(ref2, out2)
        assert out2.past_key_values is out1.past_key_values
        assert out2.past_key_values.get_seq_length() == out2.sequences.shape[1] - 1
    else:
        raise AssertionError(mode)


# ------------------------------------------------------------------------------------------------ stories260K
@pytest.fixture
def stories_drafter(stories_variant):
    # The first 3 of the 5 layers: a real but weaker drafter with the same tokenizer.
    return stories_variant(torch.float32, "sdpa", num_hidden_layers=3)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("attn", ATTN)
@pytest.mark.parametrize("mode", MODES)
def test_stories260k_matches_dynamic_cache(mode, attn, dtype, stories, stories_variant, stories_drafter, crop_calls):
    """stories260K (real GQA LLaMA), left-padded batch of 3, generating longer than the shortest prompts."""
    _, tok = stories
    model = stories_variant(DTYPES[dtype], attn)
    batch = left_padded(tok)
    assert (batch["attention_mask"] == 0).any(), "the batch must be left-padded"
    single = tok(["Lily and Ben went to the park"], return_tensors="pt")
    check_mode(mode, model, batch, single, stories_drafter, crop_calls)


# ------------------------------------------------------------------------------------------------ Mistral, sliding window
@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
@pytest.mark.parametrize("attn", ATTN)
@pytest.mark.parametrize("mode", MODES)
def test_mistral_sliding_window_matches_dynamic_cache(mode, attn, dtype, crop_calls):
    """Random Mistral with sliding window 6: 20 new tokens evict most of every row's history."""
    model = tiny_mistral(sliding_window=6, dtype=DTYPES[dtype], attn_implementation=attn)
    drafter = tiny_mistral(layers=1, sliding_window=6, seed=1, dtype=DTYPES[dtype])
    batch = random_batch(model.config.vocab_size, lengths=(9, 5, 2))
    single = random_batch(model.config.vocab_size, lengths=(8,), seed=3)
    check_mode(mode, model, batch, single, drafter, crop_calls)


def test_mistral_cache_layers_are_sliding_and_evict():
    model = tiny_mistral(sliding_window=6)
    batch = random_batch(model.config.vocab_size, lengths=(9, 4))
    out = generate(model, batch, max_new_tokens=12, cache_implementation="kvquant", cache_config=EXACT)
    cache = out.past_key_values
    assert all(isinstance(layer, KVQuantSlidingWindowLayer) for layer in cache.layers)
    for layer in cache.layers:
        assert layer.get_seq_length() == 9 + 12 - 1
        # The last forward attended to W-1 = 5 older tokens plus its own; eviction happens before the next append
        # (so a fused kernel sees the whole window), hence W = 6 retained: positions 14..19 of the longest row.
        assert layer.store.retained == 6
        assert layer.store.positions()[0].tolist() == list(range(14, 20))
        assert layer.get_mask_sizes(1) == (6, 15)


# ------------------------------------------------------------------------------------------------ GQA Llama, fp16
@pytest.mark.parametrize("mode", ["greedy", "beam", "continue"])
def test_tiny_gqa_llama_fp16_matches_dynamic_cache(mode, crop_calls):
    """Random LLaMA with 8 query heads sharing 2 KV heads, in fp16."""
    model = tiny_llama(heads=8, kv_heads=2, dtype=torch.float16)
    batch = random_batch(model.config.vocab_size, lengths=(7, 3, 11))
    check_mode(mode, model, batch, None, None, crop_calls, new_tokens=14)


# ------------------------------------------------------------------------------------------------ activation routes
def test_routes_to_the_cache_are_equivalent(stories):
    """cache_implementation=..., generation_config.cache_implementation and past_key_values=KVQuantCache(...)."""
    model, tok = stories
    batch = left_padded(tok)
    expected = reference(model, batch, max_new_tokens=12)

    explicit = generate(model, batch, max_new_tokens=12, past_key_values=KVQuantCache(model, bits=16))
    assert_exact(expected, explicit)

    saved = (model.generation_config.cache_implementation, model.generation_config.cache_config)
    try:
        model.generation_config.cache_implementation = "kvquant"
        model.generation_config.cache_config = dict(EXACT)
        via_config = generate(model, batch, max_new_tokens=12)
    finally:
        (model.generation_config.cache_implementation, model.generation_config.cache_config) = saved
    assert isinstance(via_config.past_key_values, KVQuantCache)
    assert_exact(expected, via_config)


def test_patched_model_with_default_cache_is_stock(stories):
    """Once patched, a model used with the default cache gives exactly the unpatched results."""
    model, tok = stories
    batch = left_padded(tok)
    expected = reference(model, batch, max_new_tokens=8)
    KVQuantCache(model, bits=16)  # patches the model
    assert model.config._attn_implementation == "kvquant_sdpa"
    again = generate(model, batch, max_new_tokens=8)
    assert not isinstance(again.past_key_values, KVQuantCache)
    assert_exact(expected, again)


# ------------------------------------------------------------------------------------------------ SmolLM2
def test_smollm2_greedy_left_padded(smollm2):
    model, tok = smollm2
    batch = tok(["The capital of France is", "Hi"], return_tensors="pt", padding=True, padding_side="left")
    kwargs = {"max_new_tokens": 10}
    assert_exact(
        reference(model, batch, **kwargs),
        generate(model, batch, cache_implementation="kvquant", cache_config=EXACT, **kwargs),
    )


def test_smollm2_beam_search(smollm2):
    model, tok = smollm2
    batch = tok(["Water boils at"], return_tensors="pt")
    kwargs = dict(max_new_tokens=6, **BEAM)
    assert_exact(
        reference(model, batch, **kwargs),
        generate(model, batch, cache_implementation="kvquant", cache_config=EXACT, **kwargs),
    )


# ------------------------------------------------------------------------------------------------ more ways to drive it
@pytest.mark.parametrize(
    "case", ["chunked-prefill", "unpadded-batch", "sampling-num-return-sequences", "preallocated", "eager-attentions"]
)
def test_more_generation_options(case, stories, stories_variant):
    model, tok = stories
    batch = left_padded(tok)
    kwargs = {"max_new_tokens": 10}
    cache_config = dict(EXACT)
    if case == "chunked-prefill":
        kwargs["prefill_chunk_size"] = 3
    elif case == "unpadded-batch":
        batch = tok(["Once upon a time"] * 2, return_tensors="pt")  # no padding: generate drops the 2-D mask
    elif case == "sampling-num-return-sequences":
        kwargs.update(SAMPLING, num_return_sequences=3)
    elif case == "preallocated":
        cache_config["max_length"] = 64
    elif case == "eager-attentions":
        model = stories_variant(torch.float32, "eager")
        kwargs["output_attentions"] = True
    expected = reference(model, batch, **kwargs)
    actual = generate(model, batch, cache_implementation="kvquant", cache_config=cache_config, **kwargs)
    assert_exact(expected, actual)
    if case == "eager-attentions":
        pairs = [(x, y) for a, b in zip(expected.attentions, actual.attentions) for x, y in zip(a, b)]
        assert pairs and all(torch.equal(x, y) for x, y in pairs)


def test_reset_cache_is_reusable(stories):
    model, tok = stories
    first, second = left_padded(tok), left_padded(tok, ["A big dog", "Sue"])
    expected = reference(model, second, max_new_tokens=6)
    cache = KVQuantCache(model, bits=16)
    generate(model, first, max_new_tokens=6, past_key_values=cache)
    cache.reset()
    assert cache.get_seq_length() == 0
    assert_exact(expected, generate(model, second, max_new_tokens=6, past_key_values=cache))


@pytest.mark.parametrize(
    "build", [tiny_llama, lambda: tiny_mistral(sliding_window=6)], ids=["llama", "mistral-window-6"]
)
def test_manual_forward_loop_in_chunks(build):
    """Teacher-forced forwards of 4 tokens at a time, without generate (position ids from the cache length)."""
    from transformers import DynamicCache

    from transformers_kvquant import unpatch_model

    model = build()
    ids = torch.randint(3, model.config.vocab_size, (2, 23), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        unpatch_model(model)
        default = DynamicCache(config=model.config)
        expected = [model(ids[:, i : i + 4], past_key_values=default).logits for i in range(0, ids.shape[1], 4)]
        cache = KVQuantCache(model, bits=16)
        actual = [model(ids[:, i : i + 4], past_key_values=cache).logits for i in range(0, ids.shape[1], 4)]
    assert all(torch.equal(a, b) for a, b in zip(expected, actual))
    assert cache.get_seq_length() == default.get_seq_length() == 23


ROPE_SCALINGS = {
    "linear": {"rope_type": "linear", "factor": 2.0},
    "llama3": {
        "rope_type": "llama3",
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 64,
    },
    "yarn": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 128},  # attention_scaling != 1
}


@pytest.mark.parametrize("rope", ROPE_SCALINGS)
def test_scaled_rope_types_match_dynamic_cache(rope):
    """Keys are rotated at attention time with the model's own rotary module, scaling included."""
    model = tiny_llama(rope_parameters={"rope_theta": 10000.0, **ROPE_SCALINGS[rope]})
    batch = random_batch(model.config.vocab_size, lengths=(9, 5, 2))
    kwargs = {"max_new_tokens": 12}
    assert_exact(
        reference(model, batch, **kwargs),
        generate(model, batch, cache_implementation="kvquant", cache_config=EXACT, **kwargs),
    )
