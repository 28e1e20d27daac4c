"""The Triton launchers as PyTorch custom operators, so ``torch.compile`` (and the CUDA graphs of
``mode="reduce-overhead"``) treat each as one opaque call with declared shapes and mutations instead of tracing into
the launchers' Python. :func:`decode` and :func:`append` take a :class:`~.layout.PackedCache` and flatten it.
"""


import torch

from .layout import KernelConstants, PackedCache

_CACHE_TENSORS = (
    "key_codes", "value_codes", "key_table", "value_table", "key_bounds", "value_bounds", "key_zero", "key_scale",
    "value_zero", "value_scale", "key_outlier_values", "key_outlier_index", "value_outlier_values",
    "value_outlier_index", "positions", "length", "window_keys", "window_values", "sink_keys", "sink_values", "sink_slot",
)
_CONSTANTS = ("key_tile_channels", "value_tile_channels", "offset_cos", "offset_sin", "key_lanes", "value_lanes",
              "key_table16", "value_table16", "inv_freq")


# no `from __future__ import annotations` here: custom_op reads the annotations to build the operator schema


def _cache(tensors, bits: int, recent_window: int) -> PackedCache:
    return PackedCache(bits=bits, recent_window=recent_window, **dict(zip(_CACHE_TENSORS, tensors)))


@torch.library.custom_op("kvquant::decode", mutates_args=())
def _decode(q_rot: torch.Tensor, cache_tensors: list[torch.Tensor], constants: list[torch.Tensor], mask: torch.Tensor | None,
            bits: int, recent_window: int, sliding_window: int, block_n: int) -> torch.Tensor:
    from .decode import decode_attention

    consts = KernelConstants(block_n, **dict(zip(_CONSTANTS, constants)))
    return decode_attention(q_rot, _cache(cache_tensors, bits, recent_window), consts, mask=mask, sliding_window=sliding_window)


@_decode.register_fake
def _(q_rot, cache_tensors, constants, mask, bits, recent_window, sliding_window, block_n):
    return torch.empty_like(q_rot)


@torch.library.custom_op(
    "kvquant::append_codes",
    mutates_args=("key_codes", "value_codes", "value_zero", "value_scale", "key_outlier_values", "key_outlier_index",
                  "value_outlier_values", "value_outlier_index"),
)
def _append_codes(keys: torch.Tensor, values: torch.Tensor, key_codes: torch.Tensor, value_codes: torch.Tensor,
                  value_zero: torch.Tensor, value_scale: torch.Tensor, key_outlier_values: torch.Tensor,
                  key_outlier_index: torch.Tensor, value_outlier_values: torch.Tensor, value_outlier_index: torch.Tensor,
                  others: list[torch.Tensor], bits: int, recent_window: int) -> None:
    from .append import append_codes

    named = dict(zip(_CACHE_TENSORS, [None] * len(_CACHE_TENSORS)))
    named.update(key_codes=key_codes, value_codes=value_codes, value_zero=value_zero, value_scale=value_scale,
                 key_outlier_values=key_outlier_values, key_outlier_index=key_outlier_index,
                 value_outlier_values=value_outlier_values, value_outlier_index=value_outlier_index)
    rest = [n for n in _CACHE_TENSORS if named[n] is None]
    named.update(zip(rest, others))
    append_codes(PackedCache(bits=bits, recent_window=recent_window, **named), keys, values)


@_append_codes.register_fake
def _(keys, values, key_codes, value_codes, value_zero, value_scale, key_outlier_values, key_outlier_index,
      value_outlier_values, value_outlier_index, others, bits, recent_window):
    return None


_MUTATED = ("key_codes", "value_codes", "value_zero", "value_scale", "key_outlier_values", "key_outlier_index",
            "value_outlier_values", "value_outlier_index")


def decode(q_rot: torch.Tensor, cache: PackedCache, consts: KernelConstants, mask: torch.Tensor | None = None,
           sliding_window: int = 0) -> torch.Tensor:
    """:func:`~.decode.decode_attention` as one operator."""
    return _decode(q_rot, [getattr(cache, n) for n in _CACHE_TENSORS], [getattr(consts, n) for n in _CONSTANTS], mask,
                   cache.bits, cache.recent_window, sliding_window, consts.block_n)


def append(cache: PackedCache, keys: torch.Tensor, values: torch.Tensor, positions: torch.Tensor) -> None:
    """:func:`~.append.append_packed` with the Triton part as one operator (the rest is plain tensor ops)."""
    from .naive import write_exact

    if keys.shape[2] == 0:
        return
    others = [getattr(cache, n) for n in _CACHE_TENSORS if n not in _MUTATED]
    _append_codes(keys, values, *[getattr(cache, n) for n in _MUTATED], others, cache.bits, cache.recent_window)
    write_exact(cache, keys, values, positions)
