"""Bad input gets a clear error naming the problem and the fix; the cache never stores post-RoPE keys."""

from __future__ import annotations

import pytest
import torch

from tests.helpers import quick_config, tiny_llama, tiny_mistral
from transformers_kvquant import (
    KVQuantCache,
    KVQuantConfigError,
    UnsupportedModelError,
    calibrate,
    patch_model,
    unpatch_model,
)

PROMPT = torch.tensor([[5, 6, 7, 8]])
SUPPORTED = r"supports LLaMA- and Mistral-family models \(LlamaAttention, MistralAttention\)"


def tiny_gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel

    return GPT2LMHeadModel(
        GPT2Config(n_layer=2, n_embd=32, n_head=4, vocab_size=128, bos_token_id=1, eos_token_id=2)
    ).eval()


def tiny_gpt_neox():
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    config = GPTNeoXConfig(
        num_hidden_layers=2,
        hidden_size=32,
        num_attention_heads=4,
        intermediate_size=64,
        vocab_size=128,
        rotary_pct=0.25,
    )
    return GPTNeoXForCausalLM(config).eval()


# ------------------------------------------------------------------------------------------------ architectures
@pytest.mark.parametrize(
    "build,attention",
    [(tiny_gpt2, "GPT2Attention"), (tiny_gpt_neox, "GPTNeoXAttention")],
    ids=["gpt2-no-rope", "gpt-neox-partial-rotary"],
)
def test_other_architectures_are_refused(build, attention):
    model = build()
    with pytest.raises(UnsupportedModelError, match=rf"uses {attention}; the KVQuant cache {SUPPORTED}"):
        KVQuantCache(model, bits=16)
    for cache_config in ({"bits": 16}, {"bits": 3}, {"bits": 3, "outlier_fraction": 0.01}, {}):
        # Refused for what it is, not for lack of a config it could never have.
        with pytest.raises(UnsupportedModelError, match=SUPPORTED):
            model.generate(PROMPT, max_new_tokens=2, cache_implementation="kvquant", cache_config=cache_config)
    with pytest.raises(UnsupportedModelError, match=SUPPORTED):
        KVQuantCache(model, bits=2)
    with pytest.raises(UnsupportedModelError, match=SUPPORTED):
        calibrate(model, torch.randint(3, 100, (1, 16)), bits=3, progress=False)


def test_partial_rotary_is_refused():
    """A rotary embedding over part of the head (judged from the module, not a config field) is refused."""
    model = tiny_llama(head_dim=16)
    rotary = model.model.rotary_emb
    rotary.register_buffer("inv_freq", rotary.inv_freq[:4].clone(), persistent=False)  # 8 of 16 channels rotate
    with pytest.raises(UnsupportedModelError, match=r"rotates 8 of 16 channels per head \(partial rotary\)"):
        KVQuantCache(model, bits=16)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (
            {"layer_types": ["chunked_attention", "full_attention"]},
            r"layer types \['chunked_attention'\] are not supported.*full_attention, sliding_attention",
        ),
        ({"attention_chunk_size": 4}, r"chunked attention \(attention_chunk_size\) is not supported"),
    ],
    ids=["layer-types", "chunk-size"],
)
def test_chunked_attention_is_refused(kwargs, match):
    model = tiny_llama()
    for name, value in kwargs.items():
        setattr(model.config, name, value)
    with pytest.raises(UnsupportedModelError, match=match):
        KVQuantCache(model, bits=16)


def test_length_dependent_rope_is_refused():
    model = tiny_llama(rope_parameters={"rope_type": "dynamic", "factor": 2.0, "rope_theta": 10000.0})
    with pytest.raises(
        UnsupportedModelError, match=r"RoPE type 'dynamic' is not supported.*supported: default, linear, llama3, yarn"
    ):
        KVQuantCache(model, bits=16)


def test_unsupported_attention_implementation_is_refused():
    model = tiny_llama()
    model.config._attn_implementation = "flex_attention"
    with pytest.raises(
        UnsupportedModelError, match=r"'flex_attention' is not supported.*attn_implementation='sdpa' or 'eager'"
    ):
        KVQuantCache(model, bits=16)


def test_unsupported_dtype_is_refused():
    model = tiny_llama()
    config = quick_config(model, bits=3)
    model = model.to(torch.float64)
    with pytest.raises(
        TypeError, match=r"supports float32, float16 and bfloat16 models, got torch.float64; load the model with"
    ):
        KVQuantCache(model, config)


# ------------------------------------------------------------------------------------------------ cache_config
@pytest.mark.parametrize(
    "cache_config,error,match",
    [
        ({"bits": 16, "nbits": 3}, ValueError, r"unknown cache_config key\(s\) \['nbits'\]\. Accepted keys: bits: "),
        ({"bits": 8}, ValueError, r"cache_config\['bits'\] must be 2, 3, 4 or 16, got 8"),
        ({"bits": 1}, ValueError, r"must be 2, 3, 4 or 16, got 1"),
        ({"bits": "3"}, ValueError, r"must be 2, 3, 4 or 16, got '3'"),
        ({"bits": 16, "sink_tokens": -1}, ValueError, r"cache_config\['sink_tokens'\] must be a non-negative integer"),
        ({"bits": 16, "backend": "cuda"}, ValueError, r"backend must be one of \('auto', 'reference', 'triton'\)"),
        ({"bits": 3, "outlier_fraction": 0.7}, ValueError, r"outlier_fraction'\] must be a number in \[0, 0.5\)"),
    ],
)
def test_bad_cache_config(cache_config, error, match):
    model = tiny_llama()
    with pytest.raises(error, match=match):
        KVQuantCache(model, **cache_config)
    with pytest.raises(error, match=match):
        model.generate(PROMPT, max_new_tokens=2, cache_implementation="kvquant", cache_config=cache_config)


def test_cache_config_must_be_a_dict():
    with pytest.raises(TypeError, match="must be a dict"):
        tiny_llama().generate(PROMPT, max_new_tokens=2, cache_implementation="kvquant", cache_config=3)


# ------------------------------------------------------------------------------------------------ configs
@pytest.mark.parametrize("cache_config", [{}, {"bits": 2}, {"bits": 4, "outlier_fraction": 0.0}])
def test_no_config_found_says_how_to_calibrate(cache_config, tmp_path):
    model = tiny_llama()  # random weights: no shipped config can match it
    model.config._name_or_path = str(tmp_path)  # a local folder without kvquant_config.json
    bits = cache_config.get("bits", 3)
    with pytest.raises(
        KVQuantConfigError,
        match=rf"no KVQuant config for .* at {bits} bits.*`kvquant calibrate .* --bits {bits} .*cache_config=\{{'bits': 16\}}",
    ):
        KVQuantCache(model, **cache_config)


def test_config_for_another_model_is_refused():
    source = tiny_llama(seed=0)
    config = quick_config(source, bits=3)
    with pytest.raises(KVQuantConfigError, match=r"fingerprint.*calibrated for a different model.*weights differ"):
        KVQuantCache(tiny_llama(seed=1), config)  # same shapes, other weights
    with pytest.raises(
        KVQuantConfigError, match=r"calibrated for a different model.*num_layers: config has 2, model has 3"
    ):
        KVQuantCache(tiny_llama(layers=3), config)


def test_config_bits_must_match_the_request():
    model = tiny_llama()
    config = quick_config(model, bits=3)
    with pytest.raises(KVQuantConfigError, match=r"field 'bits': the config has 3 bits but cache_config asks for 4"):
        KVQuantCache(model, config, bits=4)
    with pytest.raises(ValueError, match=r"bits=16 runs without quantization; do not pass a KVQuant config"):
        KVQuantCache(model, config, bits=16)


def test_post_rope_config_is_refused():
    model = tiny_llama()
    with pytest.raises(KVQuantConfigError, match=r"field 'key_rope': this config quantizes keys after RoPE"):
        KVQuantCache(model, quick_config(model, bits=3, key_rope="post"))


# ------------------------------------------------------------------------------------------------ guard rails
@pytest.mark.parametrize("build", [tiny_llama, tiny_mistral], ids=["llama", "mistral"])
def test_unpatched_model_never_stores_post_rope_keys(build):
    model = build()
    cache = KVQuantCache(model, bits=16)
    unpatch_model(model)
    with pytest.raises(
        RuntimeError, match=r"without the KVQuant attention hook: the keys would be post-RoPE.*patch_model"
    ):
        model.generate(PROMPT, max_new_tokens=2, past_key_values=cache)
    assert cache.get_seq_length() == 0 and all(layer.store is None for layer in cache.layers)


def test_attention_implementation_changed_after_patching():
    model = tiny_llama()
    cache = KVQuantCache(model, bits=16)
    model.set_attn_implementation("eager")
    with pytest.raises(RuntimeError, match=r"changed to 'eager' after patching.*patch_model\(model\) again"):
        model.generate(PROMPT, max_new_tokens=2, past_key_values=cache)
    assert cache.get_seq_length() == 0
    patch_model(model)  # the documented fix
    assert model.config._attn_implementation == "kvquant_eager"
    out = model.generate(PROMPT, max_new_tokens=2, past_key_values=cache, do_sample=False)
    assert out.shape == (1, 6) and cache.get_seq_length() == 5


def test_crop_with_a_positive_length_is_refused():
    model = tiny_llama()
    cache = KVQuantCache(model, bits=16)
    model.generate(PROMPT, max_new_tokens=2, past_key_values=cache)
    with pytest.raises(ValueError, match="negative number of tokens"):
        cache.crop(3)


@pytest.mark.parametrize("bits", [16, 3])
def test_reusing_a_cache_for_another_batch_size_says_reset(bits):
    model = tiny_llama()
    cache = KVQuantCache(model, quick_config(model, bits=3)) if bits == 3 else KVQuantCache(model, bits=16)
    model.generate(torch.tensor([[5, 6, 7]] * 3), max_new_tokens=2, past_key_values=cache)
    with pytest.raises(
        ValueError, match=r"holds 3 rows but the model was called with a batch of 2; call cache.reset\(\)"
    ):
        model.generate(torch.tensor([[5, 6, 7, 8, 9]] * 2), max_new_tokens=2, past_key_values=cache)
    cache.reset()
    out = model.generate(torch.tensor([[5, 6, 7, 8, 9]] * 2), max_new_tokens=2, past_key_values=cache)
    assert out.shape == (2, 7) and cache.get_seq_length() == 6
