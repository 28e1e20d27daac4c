"""Test utilities shared across the suite (not shipped with the package)."""

from __future__ import annotations

from pathlib import Path

import torch

from transformers_kvquant.config import (
    KVQuantConfig,
    LayerCalibration,
    ModelFingerprint,
)
from transformers_kvquant.quant.codebook import Codebook, uniform_codebook
from transformers_kvquant.quant.kmeans import weighted_kmeans_1d

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
STORIES = SHARED / "models" / "stories260K"
WIKITEXT = SHARED / "data" / "wikitext-2-raw" / "wiki.test.raw"
C4 = SHARED / "data" / "c4" / "c4-validation-sample-2k.jsonl"


def tiny_llama(layers=2, heads=8, kv_heads=2, head_dim=16, vocab=128, seed=0, dtype=torch.float32, **kw):
    """A small random LlamaForCausalLM (GQA by default)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=vocab,
        hidden_size=heads * head_dim,
        intermediate_size=2 * heads * head_dim,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        head_dim=head_dim,
        max_position_embeddings=512,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
        **kw,
    )
    return LlamaForCausalLM(cfg).to(dtype).eval()


def tiny_mistral(layers=2, heads=8, kv_heads=2, head_dim=16, vocab=128, sliding_window=8, seed=0, dtype=torch.float32, **kw):
    """A small random MistralForCausalLM with a sliding window."""
    from transformers import MistralConfig, MistralForCausalLM

    torch.manual_seed(seed)
    cfg = MistralConfig(
        vocab_size=vocab,
        hidden_size=heads * head_dim,
        intermediate_size=2 * heads * head_dim,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        head_dim=head_dim,
        max_position_embeddings=512,
        sliding_window=sliding_window,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
        **kw,
    )
    return MistralForCausalLM(cfg).to(dtype).eval()


@torch.no_grad()
def quick_config(model, bits=3, outlier_fraction=0.01, tokens=None, nuq=True, seed=0, **kw) -> KVQuantConfig:
    """A KVQuantConfig fitted from one forward pass (percentile key ranges, unweighted k-means codebooks).

    Not the real calibration (no Fisher weighting); enough to exercise quantized caches in tests.
    """
    text = model.config.get_text_config(decoder=True)
    heads = text.num_key_value_heads
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
    if tokens is None:
        g = torch.Generator().manual_seed(seed)
        tokens = torch.randint(3, text.vocab_size, (2, 64), generator=g)
    keys, values = {}, {}
    hooks = []

    def record(store, name):
        # Returns None: a forward hook that returns a tensor replaces the module's output (bf16 -> fp32 here).
        def hook(module, args, output):
            store.setdefault(name, output.detach().float())

        return hook

    for name, mod in model.named_modules():
        if name.endswith("k_proj"):
            hooks.append(mod.register_forward_hook(record(keys, name)))
        if name.endswith("v_proj"):
            hooks.append(mod.register_forward_hook(record(values, name)))
    model(tokens.to(model.device))
    for h in hooks:
        h.remove()
    t = 1 - outlier_fraction / 2
    layers = []
    for kname, vname in zip(sorted(keys, key=_layer_no), sorted(values, key=_layer_no)):
        k = keys[kname][:, 1:].reshape(-1, heads * head_dim)  # drop the sink token
        hi = k.quantile(t, dim=0) if outlier_fraction else k.amax(0)
        lo = k.quantile(1 - t, dim=0) if outlier_fraction else k.amin(0)
        zero, scale = (hi + lo) / 2, ((hi - lo) / 2).clamp_min(1e-4)
        kn = ((k - zero) / scale).flatten()
        kn = kn[kn.abs() <= 1]
        v = values[vname][:, 1:].reshape(-1, heads * head_dim)
        vn = ((v - (v.amax(1, keepdim=True) + v.amin(1, keepdim=True)) / 2) / ((v.amax(1, keepdim=True) - v.amin(1, keepdim=True)) / 2).clamp_min(1e-6)).flatten()
        if nuq:
            kb, vb = Codebook(weighted_kmeans_1d(kn, None, 2**bits)), Codebook(weighted_kmeans_1d(vn, None, 2**bits))
        else:
            kb, vb = uniform_codebook(bits), uniform_codebook(bits)
        layers.append(LayerCalibration(kb, vb, zero.reshape(heads, head_dim), scale.reshape(heads, head_dim)))
    fp = ModelFingerprint.from_model(model)
    return KVQuantConfig(bits=bits, outlier_fraction=outlier_fraction, layers=layers, fingerprint=fp, **kw)


def _layer_no(name: str) -> int:
    return int(next(p for p in name.split(".") if p.isdigit()))
