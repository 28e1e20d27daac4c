"""Which models the KVQuant cache supports, checked by what the model is (no transformers import).

KVQuant quantizes keys before RoPE and rotates them at attention time, so a model must be a LLaMA- or
Mistral-family decoder whose RoPE covers the whole head with frequencies that do not depend on the sequence
length. :func:`check_supported` raises :class:`UnsupportedModelError` naming what is supported; calibration and the
cache both call it before anything else.
"""

from __future__ import annotations

import torch

SUPPORTED_ATTENTION_CLASSES = ("LlamaAttention", "MistralAttention")
SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3", "yarn")
SUPPORTED_LAYER_TYPES = ("full_attention", "sliding_attention")


class UnsupportedModelError(ValueError):
    """The model's architecture or attention variant cannot run with the KVQuant cache."""


def find_rotary(model) -> torch.nn.Module:
    """The model's rotary embedding module: ``rotary(x, position_ids) -> (cos, sin)``, with ``inv_freq``."""
    for name, module in model.named_modules():
        if name.endswith("rotary_emb"):
            return module
    raise UnsupportedModelError(
        f"{type(model).__name__} has no rotary embedding module: KVQuant quantizes keys before RoPE and needs a "
        f"RoPE model; supported are LLaMA- and Mistral-family models ({', '.join(SUPPORTED_ATTENTION_CLASSES)})"
    )


def check_supported(model) -> list[torch.nn.Module]:
    """Return the attention modules, or raise :class:`UnsupportedModelError` naming what is supported."""
    config = model.config.get_text_config(decoder=True) if hasattr(model.config, "get_text_config") else model.config
    attention_like = [m for m in model.modules() if type(m).__name__.endswith("Attention")]
    modules = [m for m in attention_like if hasattr(m, "k_proj")]
    names = sorted({type(m).__name__ for m in attention_like})  # all of them, so the error names the real class
    unsupported = [n for n in names if n not in SUPPORTED_ATTENTION_CLASSES]
    if not modules or unsupported:
        raise UnsupportedModelError(
            f"{type(model).__name__} uses {', '.join(names or ['no recognised attention'])}; the KVQuant cache supports "
            f"LLaMA- and Mistral-family models ({', '.join(SUPPORTED_ATTENTION_CLASSES)})"
        )
    rope = getattr(config, "rope_parameters", None) or {}
    if isinstance(rope, dict) and "rope_type" not in rope and all(isinstance(v, dict) for v in rope.values()):
        raise UnsupportedModelError("per-layer-type RoPE parameters are not supported by the KVQuant cache")
    rope_type = (rope.get("rope_type") if isinstance(rope, dict) else None) or "default"
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise UnsupportedModelError(
            f"RoPE type {rope_type!r} is not supported: its frequencies change with the sequence length, so keys "
            f"re-rotated at attention time would differ from the model's; supported: {', '.join(SUPPORTED_ROPE_TYPES)}"
        )
    partial = getattr(config, "partial_rotary_factor", 1.0) or 1.0
    if partial != 1.0:
        raise UnsupportedModelError(f"partial rotary embeddings (partial_rotary_factor={partial}) are not supported")
    if getattr(config, "attention_chunk_size", None):
        raise UnsupportedModelError("chunked attention (attention_chunk_size) is not supported by the KVQuant cache")
    other_types = sorted(set(getattr(config, "layer_types", None) or ()) - set(SUPPORTED_LAYER_TYPES))
    if other_types:
        raise UnsupportedModelError(
            f"layer types {other_types} are not supported by the KVQuant cache; supported: {', '.join(SUPPORTED_LAYER_TYPES)}"
        )
    rotary = find_rotary(model)
    # Judge partial rotary by what the rotary module computes, wherever the config keeps the factor.
    inv_freq = getattr(rotary, "inv_freq", None)
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    if inv_freq is not None and 2 * inv_freq.numel() != head_dim:
        raise UnsupportedModelError(
            f"the rotary embedding rotates {2 * inv_freq.numel()} of {head_dim} channels per head (partial rotary); "
            "the KVQuant cache supports RoPE over the whole head only"
        )
    return modules
