"""The probe that replaces a version warning: the attention hook must receive the cache and the position embeddings,
and the cache the keys as ``k_proj`` made them, or patching refuses with the versions and what changed."""

from __future__ import annotations

import inspect
import sys

import pytest
import torch
import transformers

from tests.helpers import tiny_llama, tiny_mistral
from transformers_kvquant import (
    IncompatibleTransformersError,
    KVQuantCache,
    __version__,
    unpatch_model,
)
from transformers_kvquant.integration import attention, compat

PROMPT = torch.tensor([[5, 6, 7, 8]])


@pytest.fixture(autouse=True)
def _fresh_probe(monkeypatch):
    """Each test probes anew (the result is cached per model class)."""
    monkeypatch.setattr(compat, "_CHECKED", {})


@pytest.mark.parametrize("build", [tiny_llama, tiny_mistral], ids=["llama", "mistral"])
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_probe_passes_on_the_installed_transformers(build, attn):
    model = build()
    model.set_attn_implementation(attn)
    compat.check_hook_contract(model)
    assert compat._CHECKED == {(type(model), type(model.config), attn): ""}


def test_the_probe_runs_once_per_model_class(monkeypatch):
    calls = []
    original = compat._probe
    monkeypatch.setattr(compat, "_probe", lambda *a: calls.append(a) or original(*a))
    for seed in (0, 1):
        KVQuantCache(tiny_llama(seed=seed), bits=16)
    assert len(calls) == 1


def _assert_refused(model, what: str):
    with pytest.raises(IncompatibleTransformersError) as info:
        KVQuantCache(model, bits=16)
    message = str(info.value)
    assert f"transformers {transformers.__version__} with transformers-kvquant {__version__}" in message
    assert what in message
    assert not attention.is_patched(model)  # refused before any hook was installed


def test_a_hook_that_no_longer_sees_the_cache_is_refused(monkeypatch):
    """What 5.24 did to a hook that looked the cache up by its old argument name."""
    monkeypatch.setattr(attention, "find_pre_rope_cache", lambda args, kwargs: kwargs.get("an_old_name"))
    _assert_refused(tiny_llama(), "did not receive the cache")


def test_keys_that_reach_the_cache_rotated_are_refused(monkeypatch):
    """A modeling file whose RoPE no longer goes through the (cos, sin) the hook neutralises."""
    modeling = sys.modules[type(tiny_llama().model.layers[0].self_attn).__module__]
    original = modeling.apply_rotary_pos_emb

    def rope_from_elsewhere(q, k, cos, sin, *args, **kwargs):
        q, k = original(q, k, cos, sin, *args, **kwargs)
        return q, torch.flip(k, dims=[-1])  # anything but the identity at (cos, sin) = (1, 0)

    monkeypatch.setattr(modeling, "apply_rotary_pos_emb", rope_from_elsewhere)
    _assert_refused(tiny_llama(), "did not receive the keys as k_proj made them")


def test_position_embeddings_the_hook_cannot_see_are_refused(monkeypatch):
    """A decoder layer that passes the position embeddings positionally: the hook cannot swap them."""
    attention_class = type(tiny_llama().model.layers[0].self_attn)

    def call(self, *args, **kwargs):
        if "position_embeddings" in kwargs:
            args = (kwargs.pop("hidden_states"), kwargs.pop("position_embeddings"), *args)
        return torch.nn.Module.__call__(self, *args, **kwargs)

    monkeypatch.setattr(attention_class, "__call__", call)
    _assert_refused(tiny_llama(), "without position_embeddings")


def test_cache_argument_names_what_the_forward_takes():
    model = tiny_llama()
    name = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    cache = KVQuantCache(model, bits=16)
    assert compat.cache_argument(model, cache) == {name: cache}
    out = model(PROMPT, use_cache=True, **compat.cache_argument(model, cache))
    assert cache.get_seq_length() == PROMPT.shape[1] and out.logits.shape[:2] == PROMPT.shape
    unpatch_model(model)
