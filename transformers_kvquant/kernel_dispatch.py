"""When the Triton kernels attend over the packed cache, and the adapter from a cache layer to them.

The reference path (dequantize, rotate, the model's own attention) runs unless ``kernels_enabled`` says
otherwise; the kernels issue fills in ``fused_attention``.
"""

from __future__ import annotations


def kernels_enabled(settings, store) -> bool:
    """True when this layer's attention should run in the Triton kernels."""
    return False


def fused_attention(layer, module, query, attention_mask, ctx, **kwargs):
    raise NotImplementedError("the Triton attention path is not available yet")
