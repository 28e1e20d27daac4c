"""Accelerate ``device_map``: each layer's cache lives on that layer's execution device.

This machine has no GPU, so the split is CPU-only: odd layers are offloaded to disk (their weights sit on the
``meta`` device between forwards and are streamed in by Accelerate's hooks; they execute on the CPU). A cache
that took its device from a layer's parameters would land on ``meta``; the KVQuant layers must follow the tensors
that reach them. The real multi-GPU split is covered by the GPU issue.
"""

from __future__ import annotations

import pytest
import torch

from tests.helpers import STORIES, quick_config
from transformers_kvquant import KVQuantCache

from .common import EXACT, assert_exact, cache_devices, generate, left_padded, reference

LAYERS = 5


@pytest.fixture(scope="module")
def offloaded(tmp_path_factory):
    from transformers import AutoModelForCausalLM

    device_map = {"model.embed_tokens": "cpu", "model.rotary_emb": "cpu", "model.norm": "cpu", "lm_head": "cpu"}
    device_map.update({f"model.layers.{i}": "cpu" if i % 2 == 0 else "disk" for i in range(LAYERS)})
    folder = tmp_path_factory.mktemp("offload")
    model = AutoModelForCausalLM.from_pretrained(STORIES, device_map=device_map, offload_folder=str(folder)).eval()
    return model


def execution_devices(model) -> list[str]:
    out = []
    for layer in model.model.layers:
        hook = layer.self_attn.k_proj._hf_hook if hasattr(layer.self_attn.k_proj, "_hf_hook") else layer._hf_hook
        out.append(str(torch.device(hook.execution_device)))
    return out


def test_split_really_offloads(offloaded):
    stored = [str(next(layer.parameters()).device) for layer in offloaded.model.layers]
    assert stored == ["cpu", "meta", "cpu", "meta", "cpu"]
    assert execution_devices(offloaded) == ["cpu"] * LAYERS


def test_exact_with_offloaded_layers(offloaded, stories):
    _, tok = stories
    batch = left_padded(tok)
    expected = reference(offloaded, batch, max_new_tokens=10)
    actual = generate(offloaded, batch, max_new_tokens=10, cache_implementation="kvquant", cache_config=EXACT)
    assert_exact(expected, actual)
    assert cache_devices(actual.past_key_values) == [{d} for d in execution_devices(offloaded)]


def test_quantized_with_offloaded_layers(offloaded, stories):
    _, tok = stories
    config = quick_config(offloaded, bits=3)
    batch = left_padded(tok)
    out = generate(offloaded, batch, max_new_tokens=10, past_key_values=KVQuantCache(offloaded, config))
    cache = out.past_key_values
    assert cache.get_seq_length() == out.sequences.shape[1] - 1
    assert cache_devices(cache) == [{d} for d in execution_devices(offloaded)]
    assert all(torch.isfinite(step).all() for step in out.logits)
