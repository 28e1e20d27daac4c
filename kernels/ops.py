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


_MUTATED = ("key_codes", "value_codes", "value_zero", "value_scale", "key_outlier_values", "key_outlier_index",
            "value_outlier_values", "value_outlier_index", "positions", "window_keys", "window_values", "sink_keys",
            "sink_values", "sink_slot")


@torch.library.custom_op("kvquant::append", mutates_args=("mutated",))
def _append(keys: torch.Tensor, values: torch.Tensor, positions: torch.Tensor, mutated: list[torch.Tensor],
            others: list[torch.Tensor], bits: int, recent_window: int) -> None:
    from .append import append_slots

    named = dict(zip(_MUTATED, mutated))
    named.update(zip([n for n in _CACHE_TENSORS if n not in _MUTATED], others))
    append_slots(PackedCache(bits=bits, recent_window=recent_window, **named), keys, values, positions)


@_append.register_fake
def _(keys, values, positions, mutated, others, bits, recent_window):
    return None


def decode(q_rot: torch.Tensor, cache: PackedCache, consts: KernelConstants, mask: torch.Tensor | None = None,
           sliding_window: int = 0) -> torch.Tensor:
    """:func:`~.decode.decode_attention` as one operator."""
    return _decode(q_rot, [getattr(cache, n) for n in _CACHE_TENSORS], [getattr(consts, n) for n in _CONSTANTS], mask,
                   cache.bits, cache.recent_window, sliding_window, consts.block_n)


def append(cache: PackedCache, keys: torch.Tensor, values: torch.Tensor, positions: torch.Tensor) -> None:
    """:func:`~.append.append_packed` with the launch as one operator and the length advanced as a tensor op."""
    if keys.shape[2] == 0:
        return
    _append(keys, values, positions, [getattr(cache, n) for n in _MUTATED],
            [getattr(cache, n) for n in _CACHE_TENSORS if n not in _MUTATED], cache.bits, cache.recent_window)
    cache.length.add_(keys.shape[2])
