"""When the Triton kernels attend over the packed cache, and the adapter from a cache layer to them.

``kernels_enabled`` decides once per layer: backend ``"reference"`` never; ``"triton"`` always (and says why not
when it cannot); ``"auto"`` for a quantized store on CUDA when Triton imports and the head size is supported.
``fused_attention`` describes the layer's store as a :class:`~transformers_kvquant.kernels.layout.PackedKV` and
runs decode attention (one query per row) or chunked prefill attention on it.
"""

from __future__ import annotations

import os

import torch

from ..kernels.layout import PackedKV, supported_head_dim
from ..quant.store import PackedStore


class KernelUnavailableError(RuntimeError):
    """backend='triton' was asked for but the kernels cannot run here."""


def _triton_importable() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def kernels_enabled(settings, store) -> bool:
    """True when this layer's attention should run in the Triton kernels."""
    backend = getattr(settings, "backend", "auto")
    if backend == "reference":
        return False
    packed = isinstance(store, PackedStore)
    device = getattr(store, "device", torch.device("cpu"))
    if backend == "triton":
        if not packed:
            raise KernelUnavailableError("backend='triton' needs a quantized cache (bits 2, 3 or 4); bits=16 has no kernels")
        if not _triton_importable():
            raise KernelUnavailableError("backend='triton' needs the `triton` package (pip install triton)")
        # The model's geometry first: no device makes an unsupported head_dim work.
        if not supported_head_dim(store.head_dim, store.bits):
            raise KernelUnavailableError(
                f"the kernels need each RoPE half of a head to hold whole {store.bits}-bit packing groups "
                f"(head_dim 64, 128 or 256); this model has head_dim {store.head_dim}"
            )
        if device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
            raise KernelUnavailableError(
                f"backend='triton' runs on CUDA tensors; this layer is on {device}. Use backend='auto' or 'reference', "
                "or set TRITON_INTERPRET=1 before importing triton to run the kernels in Triton's (slow) CPU interpreter"
            )
        return True
    return packed and device.type == "cuda" and _triton_importable() and supported_head_dim(store.head_dim, store.bits)


def packed_view(store, begin: int):
    """The slots ``[begin, length)`` of a ``PackedStore`` as the kernels' ``PackedKV`` (no copies)."""
    begin = max(begin, store.start)
    tensors = store.buffers.tensors
    window_first = store.length - store.window_keys.shape[2]
    skip = max(0, begin - window_first)
    zero, scale, key_table = store.key_quantizer._params(store.device)
    value_table = store.value_quantizer._table(store.device)
    return PackedKV(
        bits=store.bits,
        key_codes=tensors["key_codes"],
        value_codes=tensors["value_codes"],
        key_table=key_table,
        value_table=value_table,
        key_zero=zero[0, :, 0, :],
        key_scale=scale[0, :, 0, :],
        value_zero=tensors["value_zero"],
        value_scale=tensors["value_scale"],
        key_outlier_begin=tensors["key_outlier_begin"],
        key_entry_values=store.key_entry_values,
        key_entry_channels=store.key_entry_channels,
        key_nnz=store.key_nnz,
        value_outlier_values=tensors["value_outlier_values"],
        value_outlier_index=tensors["value_outlier_index"],
        positions=tensors["positions"],
        window_keys=store.window_keys[:, :, skip:],
        window_values=store.window_values[:, :, skip:],
        sink_keys=store.sink_keys,
        sink_values=store.sink_values,
        sink_slot=store.sink_slot,
        begin=begin,
        packed_end=store.packed_length,
        offset=store._offset,
    )


def fused_attention(layer, module, query, attention_mask, ctx, **kwargs):
    """Attention of the (un-rotated) ``query`` ``[B, Hq, q, D]`` over ``layer.store`` in the Triton kernels.

    Returns ``(attn_output [B, q, Hq, D] contiguous in query.dtype, None)`` like transformers' attention functions.
    """
    # The Triton launchers are imported on first use (see transformers_kvquant.kernels).
    from ..kernels.decode import decode_attention
    from ..kernels.prefill import prefill_attention

    store = layer.store
    cache = packed_view(store, layer._returned_begin)
    rotary = ctx.rotary
    inv_freq = rotary.inv_freq.to(query.device)
    attention_scaling = float(getattr(rotary, "attention_scaling", 1.0))
    scaling = kwargs.get("scaling")
    scaling = float(module.scaling if scaling is None else scaling)
    window = int(layer.sliding_window) if getattr(layer, "is_sliding", False) else 0
    cos, sin = ctx.cos.to(query.device), ctx.sin.to(query.device)
    mask = attention_mask
    if mask is not None:
        mask = mask[..., : cache.total]
    run = decode_attention if query.shape[2] == 1 else prefill_attention
    out = run(query, cos, sin, cache, inv_freq, attention_scaling, scaling, mask=mask, sliding_window=window)
    return out.contiguous(), None
