"""The Triton launchers as PyTorch custom operators, so ``torch.compile`` (and the CUDA graphs of
``mode="reduce-overhead"``) treat each as one opaque call with declared shapes and mutations instead of tracing into
the launchers' Python. :func:`decode` and :func:`append` take a :class:`~.layout.PackedCache` and flatten it; a
consolidated one (a static cache's, :func:`~.layout.consolidate`) goes in as its one buffer and a layout id (the
positions beside it: the layers of a cache may share them), with the kernel tables likewise, because TorchDynamo
guards every tensor a compiled step reads (about 1 ms per step of a 32-layer model for the thirty tensors per layer
that the flattened form hands it: docs/e2e.md).
"""


import torch

from .layout import KernelConstants, PackedCache, arena_views

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


@torch.library.custom_op("kvquant::decode_arena", mutates_args=())
def _decode_arena(q_rot: torch.Tensor, arena: torch.Tensor, spec: int, slot_positions: torch.Tensor, constants: torch.Tensor,
                  constants_spec: int, mask: torch.Tensor | None, bits: int, recent_window: int, sliding_window: int,
                  block_n: int) -> torch.Tensor:
    from .decode import decode_attention

    cache = PackedCache(bits=bits, recent_window=recent_window, positions=slot_positions, **arena_views(arena, spec))
    consts = KernelConstants(block_n, **arena_views(constants, constants_spec))
    return decode_attention(q_rot, cache, consts, mask=mask, sliding_window=sliding_window)


@_decode_arena.register_fake
def _(q_rot, arena, spec, slot_positions, constants, constants_spec, mask, bits, recent_window, sliding_window, block_n):
    return torch.empty_like(q_rot)


@torch.library.custom_op("kvquant::append_arena", mutates_args=("arena", "slot_positions"))
def _append_arena(keys: torch.Tensor, values: torch.Tensor, positions: torch.Tensor, arena: torch.Tensor, spec: int,
                  slot_positions: torch.Tensor, bits: int, recent_window: int) -> None:
    from .append import append_slots

    cache = PackedCache(bits=bits, recent_window=recent_window, positions=slot_positions, **arena_views(arena, spec))
    append_slots(cache, keys, values, positions)
    cache.length.add_(keys.shape[2])  # in the operator: the length is a view into the arena


@_append_arena.register_fake
def _(keys, values, positions, arena, spec, slot_positions, bits, recent_window):
    return None


def decode(q_rot: torch.Tensor, cache: PackedCache, consts: KernelConstants, mask: torch.Tensor | None = None,
           sliding_window: int = 0) -> torch.Tensor:
    """:func:`~.decode.decode_attention` as one operator."""
    if cache.arena is not None and consts.arena is not None:
        return _decode_arena(q_rot, cache.arena, cache.arena_spec, cache.positions, consts.arena, consts.arena_spec, mask, cache.bits,
                             cache.recent_window, sliding_window, consts.block_n)
    return _decode(q_rot, [getattr(cache, n) for n in _CACHE_TENSORS], [getattr(consts, n) for n in _CONSTANTS], mask,
                   cache.bits, cache.recent_window, sliding_window, consts.block_n)


def append(cache: PackedCache, keys: torch.Tensor, values: torch.Tensor, positions: torch.Tensor) -> None:
    """:func:`~.append.append_packed` with the launch as one operator and the length advanced as a tensor op."""
    if keys.shape[2] == 0:
        return
    if cache.arena is not None:
        _append_arena(keys, values, positions, cache.arena, cache.arena_spec, cache.positions, cache.bits, cache.recent_window)
        return
    _append(keys, values, positions, [getattr(cache, n) for n in _MUTATED],
            [getattr(cache, n) for n in _CACHE_TENSORS if n not in _MUTATED], cache.bits, cache.recent_window)
    cache.length.add_(keys.shape[2])
