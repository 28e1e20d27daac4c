"""Quantized caches (2/3/4 bits, configs from ``tests.helpers.quick_config``) in every generation mode.

The exact tokens depend on the quantization, so these tests check that each mode runs through the packed store
with consistent bookkeeping, that 16-bit side tensors follow the model dtype, and that the error against the
default cache shrinks as bits grow.
"""

from __future__ import annotations

import weakref

import pytest
import torch
from transformers_kvquant.kernels.layout import words_per_vector

from tests.helpers import quick_config, tiny_mistral
from transformers_kvquant import KVQuantCache, unpatch_model
from transformers_kvquant.quant.store import PackedStore

from .common import BEAM, SAMPLING, generate, left_padded, random_batch

BITS = (2, 3, 4)
_CONFIGS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def config_for(model, bits, outlier_fraction=0.01):
    """quick_config for ``model``, computed once per model (the session-wide stories models are reused)."""
    per_model = _CONFIGS.setdefault(model, {})
    if (bits, outlier_fraction) not in per_model:
        per_model[bits, outlier_fraction] = quick_config(model, bits=bits, outlier_fraction=outlier_fraction)
    return per_model[bits, outlier_fraction]


def check_cache(cache, bits, model_dtype, rows, tokens_seen):
    """Every layer holds a packed store of ``bits`` with 16-bit side tensors of the model's half type."""
    assert isinstance(cache, KVQuantCache)
    half = torch.bfloat16 if model_dtype == torch.bfloat16 else torch.float16
    for layer in cache.layers:
        store = layer.store
        assert isinstance(store, PackedStore) and store.bits == bits
        assert store.batch == rows and layer.get_seq_length() == tokens_seen
        c = store.cache
        assert store.positions().dtype == torch.int32
        assert c.key_codes.dtype == c.value_codes.dtype == torch.int32
        for name in ("value_zero", "value_scale", "value_outlier_values", "key_outlier_values"):
            assert getattr(c, name).dtype == half, name
        assert c.key_outlier_index.dtype == torch.uint8 and c.length.dtype == torch.int32
        assert c.sink_keys.dtype == c.window_keys.dtype == model_dtype
        assert int(c.length) == tokens_seen  # the device length agrees with the host's
    report = cache.memory_report()
    # Codes are packed per (head, token) vector in whole words: stories260K's head_dim of 8 takes 3 words (12 bits
    # per element) at 3 bits. Ranges, outliers, positions and the exact sink add bits on top, many at these short
    # lengths, yet the cache stays smaller than the model's own-dtype cache.
    code_bits = words_per_vector(store.head_dim, bits) * 32 / store.head_dim
    assert code_bits < report.avg_bits < torch.finfo(model_dtype).bits


def run_quantized(mode, model, batch, single, drafter, bits, crop_calls):
    config = config_for(model, bits)
    if mode == "assisted":
        out = generate(
            model, single, max_new_tokens=16, assistant_model=drafter, past_key_values=KVQuantCache(model, config)
        )
        assert any(n < 0 for n in crop_calls), "assisted decoding never cropped the cache"
        return out, single["input_ids"].shape[0], out.sequences.shape[1] - 1
    if mode == "continue":
        first = generate(model, batch, max_new_tokens=8, past_key_values=KVQuantCache(model, config))
        ids = torch.cat([first.sequences, torch.full((first.sequences.shape[0], 2), 7)], dim=1)
        mask = torch.ones_like(ids)
        mask[:, : batch["attention_mask"].shape[1]] = batch["attention_mask"]
        out = generate(
            model, {"input_ids": ids, "attention_mask": mask}, max_new_tokens=8, past_key_values=first.past_key_values
        )
        assert out.past_key_values is first.past_key_values
        assert torch.equal(out.sequences[:, : ids.shape[1]], ids)
        return out, ids.shape[0], out.sequences.shape[1] - 1
    extra = {"greedy": {}, "sampling": SAMPLING, "beam": BEAM}[mode]
    out = generate(model, batch, max_new_tokens=16, past_key_values=KVQuantCache(model, config), **extra)
    rows = batch["input_ids"].shape[0] * (BEAM["num_beams"] if mode == "beam" else 1)
    return out, rows, batch["input_ids"].shape[1] + len(out.logits) - 1


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("mode", ["greedy", "sampling", "beam", "assisted", "continue"])
def test_stories260k_quantized_modes(mode, bits, stories, stories_variant, crop_calls):
    model, tok = stories
    unpatch_model(model)
    drafter = stories_variant(torch.float32, "sdpa", num_hidden_layers=3)
    out, rows, seen = run_quantized(
        mode,
        model,
        left_padded(tok),
        tok(["Lily and Ben went to the park"], return_tensors="pt"),
        drafter,
        bits,
        crop_calls,
    )
    assert all(torch.isfinite(step).all() for step in out.logits)
    check_cache(out.past_key_values, bits, torch.float32, rows, seen)


@pytest.mark.parametrize("mode", ["greedy", "beam", "assisted", "continue"])
def test_mistral_sliding_window_quantized_modes(mode, crop_calls):
    model = tiny_mistral(sliding_window=6)
    drafter = tiny_mistral(layers=1, sliding_window=6, seed=1)
    batch = random_batch(model.config.vocab_size, lengths=(9, 5, 2))
    single = random_batch(model.config.vocab_size, lengths=(8,), seed=3)
    out, rows, seen = run_quantized(mode, model, batch, single, drafter, 3, crop_calls)
    check_cache(out.past_key_values, 3, torch.float32, rows, seen)
    for layer in out.past_key_values.layers:
        assert layer.store.retained <= model.config.sliding_window  # old tokens were evicted


@pytest.mark.parametrize(
    "dtype,attn",
    [(torch.float32, "eager"), (torch.bfloat16, "sdpa"), (torch.float16, "sdpa"), (torch.bfloat16, "eager")],
    ids=["fp32-eager", "bf16-sdpa", "fp16-sdpa", "bf16-eager"],
)
def test_dtypes_and_attention_implementations(dtype, attn, stories, stories_variant):
    _, tok = stories
    model = stories_variant(dtype, attn)
    batch = left_padded(tok)
    # 4 bits: stories260K's head_dim of 8 packs exactly at 2 and 4 bits (3-bit rows round up to 32 codes, which
    # on this toy geometry costs more than a 16-bit cache; real head dims are multiples of 32).
    out = generate(model, batch, max_new_tokens=12, past_key_values=KVQuantCache(model, config_for(model, 4)))
    assert out.logits[0].dtype == torch.float32 or out.logits[0].dtype == dtype
    assert all(torch.isfinite(step).all() for step in out.logits)
    check_cache(out.past_key_values, 4, dtype, 3, batch["input_ids"].shape[1] + 11)


def test_error_shrinks_with_bits(stories):
    """Teacher-forced on a 125-token story: logit error vs the default cache falls from 2 to 3 to 4 bits."""
    model, tok = stories
    unpatch_model(model)
    torch.manual_seed(0)
    with torch.no_grad():
        text = model.generate(
            **tok(["Once upon a time"], return_tensors="pt"), max_new_tokens=120, do_sample=True, top_k=40
        )
        expected = model(text).logits
        errors, agreement = {}, {}
        for bits in BITS:
            got = model(text, past_key_values=KVQuantCache(model, config_for(model, bits))).logits
            errors[bits] = float((got - expected).abs().mean())
            agreement[bits] = float((got.argmax(-1) == expected.argmax(-1)).float().mean())
            unpatch_model(model)
    assert errors[2] > errors[3] > errors[4] > 0, errors
    assert agreement[4] >= 0.8, agreement
