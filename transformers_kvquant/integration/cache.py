"""`KVQuantCache`: a `transformers.Cache` holding packed 2/3/4-bit pre-RoPE keys and values.

One layer object per decoder layer; each owns a store (:mod:`transformers_kvquant.quant.store`) created on the first
update, on the device of that layer's tensors, so Accelerate ``device_map`` splits put every layer's cache beside its
layer. A *growing* cache (the default of ``KVQuantCache(model)``) reports lengths and mask sizes like transformers'
``DynamicLayer`` / ``DynamicSlidingWindowLayer``; a *static* one (``max_cache_len``, and what ``generate`` makes) like
``StaticLayer``: a fixed capacity, the length on the device, ``is_compileable``, so ``generate`` compiles its decode
step and ``torch.compile(mode="reduce-overhead")`` captures it in a CUDA graph. Masks, position ids and generation
utilities (beam reorder, crop, batch select) behave as with the corresponding transformers cache.
"""

from __future__ import annotations

import torch
from transformers.cache_utils import CacheLayerMixin

from ..calibration.support import check_supported, find_rotary
from ..quant.memory import MemoryReport, store_report
from ..quant.store import SharedPositions, shared_positions_bytes
from ..kernels.rope import apply_rope
from . import chunk_window, kernel_dispatch
from .chunk_window import ChunkWindow
from .patch import patch_model
from .prerope import PreRopeCache, PreRopeLayer, key_rotation
from .settings import CacheSettings, resolve_settings


class KVQuantLayer(PreRopeLayer, CacheLayerMixin):
    """Full-attention layer: every token is kept (quantized)."""

    is_sliding = False
    _layer_type = None  # never register in transformers' global layer mappings
    missing_hook_error = (
        "KVQuantCache.update was called without the KVQuant attention hook: the keys would be post-RoPE. "
        "Create the cache with KVQuantCache(model, ...) (it patches the model) or call "
        "transformers_kvquant.patch_model(model) first."
    )

    def __init__(self, settings: CacheSettings, layer_idx: int, rotary=None):
        super().__init__()
        self.settings = settings
        self.layer_idx = layer_idx
        self.rotary = rotary  # the model's rotary embedding (its frequencies go into the kernels' tables)
        self.kernel_tables = None  # (the codebook they were made for, kernels.layout.KernelConstants)
        self.store = None
        self._staged = None
        self._chunk = None  # the exact window of a prefill chunk, from update to attention (chunk_window)
        self._returned_begin = 0  # first slot of the keys returned by the last update
        self._kernels = None
        self.shared_positions = None  # the cache's SharedPositions (KVQuantCache sets it)

    # ----------------------------------------------------------------------------- transformers contract
    @property
    def is_compileable(self) -> bool:
        """Static caches only: a growing one reallocates and keeps lengths on the host."""
        return self.settings.static

    @property
    def static(self) -> bool:
        return self.settings.static

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.dtype, self.device = key_states.dtype, key_states.device
        self.store = self.settings.make_store(self.layer_idx, key_states.dtype, self.shared_positions)
        self.store.initialize(key_states, value_states)
        if self.settings.max_length and not self.static:
            self.store.reserve(self.settings.max_length)
        self.is_initialized = True
        try:
            use = self.uses_kernels
        except kernel_dispatch.KernelUnavailableError:
            self._kernels = None  # raised again, where it belongs, when attention asks for the kernels
            use = False
        if use and self.rotary is not None:
            # the kernels' tables now, outside any compiled step (a CUDA graph must not allocate what outlives it)
            kernel_dispatch.prepare(self, self.rotary, key_states.device)

    def update(self, key_states, value_states, *args, **kwargs):
        positions = self.take_staged_positions(key_states.shape[-2])
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        elif key_states.shape[0] != self.store.batch:
            raise ValueError(
                f"this KVQuantCache holds {self.store.batch} rows but the model was called with a batch of "
                f"{key_states.shape[0]}; call cache.reset() or create a new cache for a new batch"
            )
        self._before_append()
        # a chunk's queries read their own W newest slots exactly, as decode steps do (the ring's copies of the slots
        # before the chunk are taken now: the append may overwrite them)
        if key_states.shape[-2] > 1 or self._chunk is not None:  # a decode step stores no attribute (compiled steps)
            self._chunk = ChunkWindow.capture(self.store, self.store.start, key_states, value_states)
        self.store.append(key_states, value_states, positions)
        self._returned_begin = self._visible_begin(key_states.shape[-2])
        if self.uses_kernels:
            # The Triton path attends over the packed store directly; nothing is dequantized here.
            return key_states, value_states
        return self.store.keys_values(self._returned_begin)

    def _before_append(self) -> None:
        """Hook for sliding layers to evict before new tokens arrive."""

    def _visible_begin(self, query_length: int) -> int:
        """First slot the queries of this forward may attend to."""
        return self.store.start

    @property
    def uses_kernels(self) -> bool:
        """Whether attention runs in the Triton kernels over the packed store (decided once per layer)."""
        if self._kernels is None:
            self._kernels = kernel_dispatch.kernels_enabled(self.settings, self.store)
        return self._kernels

    @property
    def returned_begin(self) -> int:
        """First slot of the keys the last update returned (the first slot this forward's queries may see)."""
        return self._returned_begin

    def returned_positions(self) -> torch.Tensor:
        """RoPE positions of the keys the last update returned (their slots ``[returned begin, length)``)."""
        return self.store.positions(self._returned_begin)

    @property
    def is_croppable(self) -> bool:
        """Whether ``crop`` restores the exact earlier state (transformers' contract for rollbacks).

        The packed layout packs every token and keeps the exact window in a ring with spare room, so a crop (of up to
        ``PackedStore.RING_SLACK`` tokens at once) leaves no trace. Not so the uncapped store with a recent window:
        the tokens that a later append pushed out of its window were quantized, and stay so. ``crop`` still works.
        """
        return self.settings.bits == 16 or self.settings.outliers == "bounded" or self.settings.recent_window == 0

    def get_seq_length(self) -> int:
        if self.store is None:
            return 0
        if self.static:  # a device value (no synchronization), like StaticLayer's
            return self.store.device_length[0] if self.settings.bits == 16 else self.store.cache.device_length(self.uses_kernels)
        return self.store.length

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        if self.static:
            return self.settings.capacity, 0
        return self.get_seq_length() + query_length, 0

    def get_max_length(self) -> int:
        return self.settings.capacity if self.static else -1

    def crop(self, tokens_to_remove: int) -> None:
        tokens_to_remove = int(tokens_to_remove)  # transformers < 5.24's assisted decoding passes a 0-d tensor
        if tokens_to_remove > 0:
            raise ValueError(f"crop takes a negative number of tokens to remove, got {tokens_to_remove}")
        if tokens_to_remove and self.store is not None:
            self.store.crop(-tokens_to_remove)

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self._map_rows(lambda t: t.index_select(0, beam_idx.to(t.device)))

    def batch_repeat_interleave(self, repeats: int) -> None:
        self._map_rows(lambda t: t.repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self._map_rows(lambda t: t[indices.to(t.device)])

    def _map_rows(self, fn):
        if self.store is not None:
            self.store.map_rows(fn)

    def offload(self):
        self._map_rows(lambda t: t.to("cpu", non_blocking=True))

    def prefetch(self):
        if self.store is not None:
            self._map_rows(lambda t: t.to(self.device, non_blocking=True))

    def reset(self) -> None:
        self.store = None
        self._staged = None
        self._chunk = None
        self._kernels = None
        self.kernel_tables = None
        self.is_initialized = False

    # ----------------------------------------------------------------------------- attention
    def attend(self, module, query, key, value, attention_mask, ctx, inner, **kwargs):
        """Rotate queries and the returned pre-RoPE keys, then the model's own attention (reference path), or
        attend over the packed store with the Triton kernels."""
        if self.uses_kernels:
            return kernel_dispatch.fused_attention(self, module, query, attention_mask, ctx, inner, **kwargs)
        chunk = self.take_chunk()
        if chunk is not None:
            cos_k, sin_k = self.key_rotation(key, ctx)
            ek = apply_rope(chunk.keys, *key_rotation(ctx.rotary, chunk.keys, chunk.positions(self.store)))
            return chunk_window.attend(module, self.rotate_query(query, ctx), apply_rope(key, cos_k, sin_k), value, ek,
                                       chunk.values, attention_mask, chunk, self._returned_begin, inner, **kwargs)
        return super().attend(module, query, key, value, attention_mask, ctx, inner, **kwargs)

    def take_chunk(self) -> ChunkWindow | None:
        """The exact window of the chunk the last update stored (once), or None."""
        chunk = self._chunk
        if chunk is not None:
            self._chunk = None
        return chunk

    @property
    def batch_size(self) -> int:
        return self.store.batch if self.store is not None else -1


class KVQuantSlidingWindowLayer(KVQuantLayer):
    """Sliding-window layer: keeps the last ``sliding_window - 1`` tokens, like ``DynamicSlidingWindowLayer``."""

    is_sliding = True

    def __init__(self, settings: CacheSettings, layer_idx: int, sliding_window: int, rotary=None):
        super().__init__(settings, layer_idx, rotary)
        self.sliding_window = sliding_window
        self.record_past = False

    def activate_past_recording(self, **kwargs):
        # transformers 5.25 passes recurrent_states_to_keep (for linear-attention layers; nothing to keep here)
        self.record_past = True

    def _before_append(self) -> None:
        # Evict before appending, not after attending: the queries of this forward still need the tokens that
        # fall out of the window (DynamicSlidingWindowLayer returns them, then trims). A static layer keeps every slot
        # (the sliding mask and the kernels' window hide the old ones).
        if not self.record_past and not self.static:
            self.store.evict_before(self.store.length - self.sliding_window + 1)

    def _visible_begin(self, query_length: int) -> int:
        store = self.store
        if self.static:
            return 0
        if self.record_past:
            return max(store.start, store.length - (self.sliding_window - 1 + query_length))
        return store.start

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        if self.static:
            return self.settings.capacity, 0
        seen = self.get_seq_length()
        kv_offset = max(seen - self.sliding_window + 1, 0)
        if seen >= self.sliding_window:
            return self.sliding_window - 1 + query_length, kv_offset
        return seen + query_length, kv_offset

    def get_max_length(self) -> int:
        return self.settings.capacity if self.static else self.sliding_window

    def crop(self, tokens_to_remove: int) -> None:
        tokens_to_remove = int(tokens_to_remove)
        if self.store is None:
            return
        if self.static:
            return KVQuantLayer.crop(self, tokens_to_remove)
        if self.get_seq_length() >= self.sliding_window:
            if not self.record_past:
                raise RuntimeError(
                    "crop was called on a sliding-window layer that already reached its window without past recording; "
                    "call activate_past_recording() first"
                )
            if tokens_to_remove > 0:
                raise ValueError(f"crop takes a negative number of tokens to remove, got {tokens_to_remove}")
            self.store.crop(-tokens_to_remove)
            self.store.evict_before(self.store.length - self.sliding_window + 1)
        else:
            super().crop(tokens_to_remove)


class KVQuantCache(PreRopeCache):
    """A KV cache that stores pre-RoPE keys and values with KVQuant (2/3/4 bits), or exactly with ``bits=16``.

    Args:
        model: the LLaMA/Mistral-family model it will be used with (it is patched: see :func:`patch_model`).
        config: a :class:`~transformers_kvquant.KVQuantConfig`, a folder, a file or a Hub repo id. If omitted, the
            config is looked up beside the model, then in the shipped ``hub_configs/``.
        **cache_config: ``bits``, ``outlier_fraction``, ``sink_tokens``, ``recent_window``, ``backend``
            (``"auto"``, ``"reference"`` or ``"triton"``), ``max_cache_len`` (a static cache of this capacity),
            ``static``, ``outliers`` (``"bounded"`` or ``"uncapped"``), ``max_length`` (preallocate a growing
            cache), and ``revision`` / ``local_files_only`` for Hub lookups. See docs/usage.md.
    """

    def __init__(self, model, config=None, **cache_config):
        check_supported(model)  # before looking for a config: an unsupported model has none to find
        settings = resolve_settings(model, config, cache_config)
        patch_model(model)
        text = model.config.get_text_config(decoder=True)
        rotary = find_rotary(model)
        layers = []
        for idx, (layer_type, kwargs) in enumerate(_layer_types(text)):
            if layer_type == "full_attention":
                layers.append(KVQuantLayer(settings, idx, rotary))
            elif layer_type == "sliding_attention":
                layers.append(KVQuantSlidingWindowLayer(settings, idx, kwargs["sliding_window"], rotary))
            else:
                raise ValueError(f"layer {idx} has type {layer_type!r}; the KVQuant cache supports full and sliding attention")
        super().__init__(layers=layers)
        self.settings = settings
        # the RoPE positions of the slots, the same in every layer: kept once per device instead of once per layer
        self.shared_positions = SharedPositions()
        for layer in layers:
            layer.shared_positions = self.shared_positions

    def reset(self) -> None:
        super().reset()
        self.shared_positions.reset()

    def memory_report(self) -> MemoryReport:
        """Real bytes of every stored tensor over all layers (the shared positions once), and average bits per cached
        K/V element."""
        total = MemoryReport()
        stores = [layer.store for layer in self.layers if layer.store is not None]
        for store in stores:
            total = total + store_report(store)
        shared = shared_positions_bytes(stores)
        if shared:
            total = total + MemoryReport({"positions": shared}, 0)
        return total

    @property
    def is_compileable(self) -> bool:
        return self.settings.static

    @classmethod
    def for_generate(cls, model, generate_length: int, /, **cache_config):
        """The cache ``generate(cache_implementation="kvquant")`` makes: static unless ``cache_config`` sets
        ``static=False``, with ``cache_config["max_cache_len"]`` as its capacity if given, else the largest of
        generate's maximum length and the capacity of this model's previous such cache.

        Like transformers' static cache, the capacity never shrinks from one call to the next: a compiled decode
        step is specialized to it, so a call with a longer prompt or more new tokens would otherwise recompile
        (and after a few such calls, TorchDynamo gives up and runs eagerly)."""
        # positional-only: cache_config may hold its own max_cache_len
        opts = dict(cache_config)
        if opts.get("static") is not False and not opts.get("max_cache_len") and opts.get("outliers") != "uncapped":
            length = max(generate_length, getattr(model, _PREVIOUS_CAPACITY, 0))
            setattr(model, _PREVIOUS_CAPACITY, length)
            opts["max_cache_len"] = length
        return cls(model, **opts)

    def __repr__(self):
        return f"KVQuantCache({self.settings.describe()}, layers={len(self.layers)})"


# The attribute transformers' own static cache keeps on the model (5.17 to 5.25 at least): shared, so "static" and
# "kvquant" calls size their caches alike; if a release drops it, this one is still ours to keep.
_PREVIOUS_CAPACITY = "_previous_max_cache_length"


def _layer_types(text_config):
    """(layer_type, kwargs) per layer, as transformers' DynamicCache would build them."""
    from transformers.cache_utils import get_layer_types_and_kwargs

    types, kwargs = get_layer_types_and_kwargs(text_config)
    if isinstance(kwargs, dict):  # transformers < 5.2x returns one dict for all layers
        kwargs = [kwargs] * len(types)
    return list(zip(types, kwargs))
