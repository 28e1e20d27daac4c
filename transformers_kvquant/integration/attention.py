"""Pre-RoPE keys for LLaMA/Mistral attention through public extension points (no modeling code is copied).

How a layer's forward runs once a model is patched (:func:`~.patch.patch_model`) and gets a cache that stores
pre-RoPE keys (a :class:`~.prerope.PreRopeCache`, e.g. :class:`~.cache.KVQuantCache`):

1. A forward pre-hook on the attention module swaps ``position_embeddings`` for ``(1, 0)``, so the model's own
   ``apply_rotary_pos_emb`` is the identity (``x*1 + rotate_half(x)*0 == x`` exactly) and the cache receives
   *pre-RoPE* keys. It stages the row-wise ``position_ids`` on the cache layer (``layer.stage``) and passes the
   real ``(cos, sin)`` and the layer through a kwarg.
2. The attention implementation is ``kvquant_sdpa`` / ``kvquant_eager`` (registered in both ``AttentionInterface``
   and ``AttentionMaskInterface``, the latter with the inner implementation's mask function). It hands the call to
   the layer (``layer.attend``, :class:`~.prerope.PreRopeLayer`), which rotates the queries with the real
   ``(cos, sin)`` and the returned keys with the positions stored for them, then calls the inner implementation;
   on CUDA a KVQuant layer may instead attend directly over the packed cache with the Triton kernels.

With any other cache (or none) the hook and the attention function do nothing: the model behaves as stock.
"""

from __future__ import annotations

import sys
import weakref

import torch

from ..calibration.support import (
    SUPPORTED_ATTENTION_CLASSES,
    UnsupportedModelError,
    find_rotary,
)

SUPPORTED_INNER = ("sdpa", "eager")
CONTEXT_KWARG = "kvquant_context"
PREFIX = "kvquant_"


class AttentionContext:
    """What the attention function needs beyond its arguments. A plain object: accelerate never moves it."""

    __slots__ = ("cos", "layer", "rotary", "sin")

    def __init__(self, cos, sin, layer, rotary):
        self.cos, self.sin, self.layer, self.rotary = cos, sin, layer, rotary


# --------------------------------------------------------------------------------------------- registration
def _inner_function(inner: str, module):
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    if inner == "eager":
        # The eager function lives in each modeling file (it handles GQA with repeat_kv there).
        return sys.modules[type(module).__module__].eager_attention_forward
    return ALL_ATTENTION_FUNCTIONS[inner]


def _make_attention_function(inner: str):
    def kvquant_attention(module, query, key, value, attention_mask, **kwargs):
        ctx = kwargs.pop(CONTEXT_KWARG, None)
        fn = _inner_function(inner, module)
        if ctx is None:
            return fn(module, query, key, value, attention_mask, **kwargs)
        return ctx.layer.attend(module, query, key, value, attention_mask, ctx, fn, **kwargs)

    kvquant_attention.__name__ = f"kvquant_{inner}_attention"
    return kvquant_attention


def register_attention_functions() -> None:
    """Register ``kvquant_sdpa`` and ``kvquant_eager`` (idempotent; each name always wraps the same inner)."""
    from transformers.masking_utils import (
        ALL_MASK_ATTENTION_FUNCTIONS,
        AttentionMaskInterface,
    )
    from transformers.modeling_utils import AttentionInterface

    for inner in SUPPORTED_INNER:
        name = PREFIX + inner
        if name not in AttentionInterface._global_mapping:
            AttentionInterface.register(name, _make_attention_function(inner))
        if name not in AttentionMaskInterface._global_mapping:
            # Without a mask function transformers builds no mask at all for an unknown name: silently wrong.
            AttentionMaskInterface.register(name, ALL_MASK_ATTENTION_FUNCTIONS[inner])


# --------------------------------------------------------------------------------------------- the hook
_PATCHED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def find_pre_rope_cache(args, kwargs):
    """The cache among a call's arguments that stores pre-RoPE keys, or None (whatever the argument is called)."""
    for value in (*kwargs.values(), *args):
        if getattr(value, "stores_pre_rope_keys", False) is True:
            return value
    return None


def _pre_hook(rotary):
    def hook(module, args, kwargs):
        # Found by what it is, not by the argument's name: transformers 5.24 renamed `past_key_values` to `cache`.
        # Caches that store pre-RoPE keys say so (KVQuantCache and the evaluation's simulated cache).
        cache = find_pre_rope_cache(args, kwargs)
        if cache is None:
            return None
        impl = module.config._attn_implementation or ""
        if not impl.startswith(PREFIX):
            raise RuntimeError(
                f"the model's attention implementation was changed to {impl!r} after patching; a KVQuantCache needs "
                "`kvquant_sdpa` or `kvquant_eager` (call transformers_kvquant.patch_model(model) again)"
            )
        if "position_embeddings" not in kwargs:
            raise UnsupportedModelError(f"{type(module).__name__} was called without position_embeddings")
        cos, sin = kwargs["position_embeddings"]
        layer = cache.layers[module.layer_idx]
        position_ids = kwargs.get("position_ids")
        layer.stage(position_ids, cos.shape[-2])
        kwargs["position_embeddings"] = (torch.ones_like(cos), torch.zeros_like(sin))
        kwargs[CONTEXT_KWARG] = AttentionContext(cos, sin, layer, rotary)
        return args, kwargs

    return hook


def install_hooks(model) -> None:
    """The hooks and the attention implementation, without the checks of
    :func:`~transformers_kvquant.integration.patch.patch_model` (idempotent)."""
    if model in _PATCHED:
        _ensure_attn_implementation(model)
        return
    register_attention_functions()
    hook = _pre_hook(find_rotary(model))
    modules = [m for m in model.modules() if type(m).__name__ in SUPPORTED_ATTENTION_CLASSES]
    _PATCHED[model] = [m.register_forward_pre_hook(hook, with_kwargs=True) for m in modules]
    _ensure_attn_implementation(model)


def _ensure_attn_implementation(model) -> None:
    current = model.config._attn_implementation or "eager"
    if current.startswith(PREFIX):
        return
    if current not in SUPPORTED_INNER:
        raise UnsupportedModelError(
            f"attention implementation {current!r} is not supported by the KVQuant cache; load the model with "
            f"attn_implementation='sdpa' or 'eager'"
        )
    model.set_attn_implementation(PREFIX + current)


def unpatch_model(model) -> None:
    """Remove the hooks and restore the inner attention implementation."""
    handles = _PATCHED.pop(model, None)
    if handles is None:
        return
    for h in handles:
        h.remove()
    current = model.config._attn_implementation or ""
    if current.startswith(PREFIX):
        model.set_attn_implementation(current[len(PREFIX) :])


def is_patched(model) -> bool:
    """Whether the KVQuant hooks are installed on ``model``."""
    return model in _PATCHED
