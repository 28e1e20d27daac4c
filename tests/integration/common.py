"""Shared pieces of the integration tests: generation runs against the default cache and exact comparisons."""

from __future__ import annotations

import torch

from transformers_kvquant import unpatch_model

EXACT = {"bits": 16, "static": False}  # a growing cache: DynamicCache is its reference (static: test_static.py)
SAMPLING = {"do_sample": True, "top_k": 20, "temperature": 0.9}
BEAM = {"num_beams": 3, "num_return_sequences": 2}
PROMPTS = ["Once upon a time, there was a little dog", "Tom had a red ball", "The sun"]


def left_padded(tokenizer, prompts=PROMPTS):
    """Token ids of ``prompts`` as one left-padded batch."""
    return tokenizer(list(prompts), return_tensors="pt", padding=True, padding_side="left")


def random_batch(vocab: int, lengths=(9, 5, 1), seed: int = 0, pad_id: int = 0) -> dict:
    """Left-padded random prompts of the given real lengths (ids >= 3 so no special token appears)."""
    g = torch.Generator().manual_seed(seed)
    width = max(lengths)
    ids = torch.full((len(lengths), width), pad_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, n in enumerate(lengths):
        ids[row, width - n :] = torch.randint(3, vocab, (n,), generator=g)
        mask[row, width - n :] = 1
    return {"input_ids": ids, "attention_mask": mask}


def generate(model, inputs: dict, *, seed: int = 0, **kwargs):
    """``model.generate`` with every logit returned; the seed makes sampling reproducible."""
    kwargs.setdefault("return_dict_in_generate", True)
    kwargs.setdefault("output_logits", True)
    kwargs.setdefault("output_scores", True)
    kwargs.setdefault("do_sample", False)
    torch.manual_seed(seed)
    with torch.no_grad():
        return model.generate(**inputs, **kwargs)


def reference(model, inputs: dict, **kwargs):
    """The same generation with transformers' default cache on the *unpatched* model."""
    unpatch_model(model)
    return generate(model, inputs, **kwargs)


def max_abs_diff(a: tuple, b: tuple) -> float:
    """Largest |x - y| over all steps; equal entries (including matching -inf of filtered scores) count as 0."""
    assert len(a) == len(b), f"{len(a)} steps vs {len(b)}"
    worst = 0.0
    for x, y in zip(a, b):
        assert x.shape == y.shape
        same = (x == y) | (x.isnan() & y.isnan())
        diff = torch.where(
            same, torch.zeros_like(x, dtype=torch.float32), (x.float() - y.float()).abs().nan_to_num(nan=float("inf"))
        )
        worst = max(worst, float(diff.max()))
    return worst


def assert_exact(expected, actual) -> None:
    """Tokens equal and every returned logit/score bit-identical (max |Δ| == 0.0)."""
    assert expected.sequences.shape == actual.sequences.shape
    assert torch.equal(expected.sequences, actual.sequences)
    assert len(expected.logits) == len(actual.logits) > 0
    assert max_abs_diff(expected.logits, actual.logits) == 0.0
    assert max_abs_diff(expected.scores, actual.scores) == 0.0
    for name in ("sequences_scores", "beam_indices"):
        a, b = getattr(expected, name, None), getattr(actual, name, None)
        assert (a is None) == (b is None), name
        if a is not None:
            assert torch.equal(a, b), name


def cache_devices(cache) -> list[set[str]]:
    """Per layer: the devices of every tensor its store holds."""
    out = []
    for layer in cache.layers:
        store = layer.store
        if getattr(store, "cache", None) is not None:  # the packed layout: every tensor of the PackedCache
            tensors = list(store.cache.tensors().values())
        else:
            tensors = list(store.buffers.tensors.values())
            for name in ("window_keys", "window_values", "sink_keys", "sink_values", "sink_slot"):
                if hasattr(store, name):
                    tensors.append(getattr(store, name))
        out.append({str(t.device) for t in tensors})
    return out
