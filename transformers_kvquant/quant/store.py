"""Storage of one layer's keys and values for a batch: packed KVQuant codes or full precision.

Tokens live in *slots* ``0, 1, 2, ...`` (the cache index, shared by all rows; each row's RoPE position is stored per
slot). :class:`PackedStore` holds them in the packed layout of :mod:`transformers_kvquant.kernels.layout` (bounded
outliers) and writes and reads them through the kernels or their PyTorch references; it is *dynamic* (buffers grow,
lengths also kept on the host) or *static* (a fixed capacity, the length only on the device, nothing synchronizes
the host: what ``torch.compile`` and CUDA graphs need). :class:`FullPrecisionStore` and
:class:`StaticFullPrecisionStore` keep exact tensors (``bits=16``). The paper's uncapped outliers are
:class:`~.uncapped_store.UncappedPackedStore`.
"""

from __future__ import annotations

import weakref

import torch

_TOKEN_DIM = {  # dimension of the slot axis in each packed buffer
    "key_codes": 2,
    "value_codes": 2,
    "value_zero": 1,
    "value_scale": 1,
    "key_outlier_begin": 1,
    "value_outlier_values": 1,
    "value_outlier_index": 1,
    "positions": 1,
}


class SlotBuffers:
    """Named tensors that share a growable slot axis (amortized O(1) appends, in-place writes)."""

    def __init__(self):
        self.tensors: dict[str, torch.Tensor] = {}
        self.capacity = 0

    def allocate(self, specs: dict, capacity: int) -> None:
        """specs: name -> (shape with None at the slot axis, dtype, device)."""
        self._specs = specs
        self.capacity = capacity
        self.tensors = {n: self._empty(n, capacity) for n in specs}

    def _empty(self, name, capacity):
        shape, dtype, device = self._specs[name]
        shape = tuple(capacity if s is None else s for s in shape)
        return torch.empty(shape, dtype=dtype, device=device)

    def reserve(self, needed: int, used: int, offset: int = 0) -> None:
        """Ensure room for ``needed`` slots; keeps physical slots [offset, used) moved to the front."""
        if needed <= self.capacity and offset == 0:
            return
        cap = max(needed, self.capacity + self.capacity // 2, 16) if needed > self.capacity else self.capacity
        for name, old in self.tensors.items():
            new = self._empty(name, cap)
            dim = _TOKEN_DIM[name]
            if used > offset:
                new.narrow(dim, 0, used - offset).copy_(old.narrow(dim, offset, used - offset))
            self.tensors[name] = new
        self.capacity = cap

    def write(self, name: str, at: int, value: torch.Tensor) -> None:
        self.tensors[name].narrow(_TOKEN_DIM[name], at, value.shape[_TOKEN_DIM[name]]).copy_(value)

    def read(self, name: str, begin: int, end: int) -> torch.Tensor:
        return self.tensors[name].narrow(_TOKEN_DIM[name], begin, end - begin)

    def map_rows(self, fn) -> None:
        self.tensors = {n: fn(t) for n, t in self.tensors.items()}


class KVStore:
    """Common bookkeeping of a layer store: slots, positions, eviction, batch operations."""

    def __init__(self):
        self.batch = 0
        if not isinstance(getattr(type(self), "length", None), property):
            self.length = 0  # slots written (the next slot index); a property where the device keeps it
        self.start = 0  # first retained slot
        self.initialized = False

    @property
    def retained(self) -> int:
        return self.length - self.start

    @property
    def stored(self) -> int:
        """Slots whose bytes the store holds (what memory reports count)."""
        return self.retained


class FullPrecisionStore(KVStore):
    """Unquantized storage (``bits=16``): the whole KVQuant path with exact tensors, for exactness tests."""

    bits = 16

    def __init__(self):
        super().__init__()
        self.buffers = SlotBuffers()
        self._offset = 0  # physical index of slot `start` is (start - _offset)

    def initialize(self, keys, values):
        """Allocate for the batch, heads, dtype and device of ``keys``/``values`` (no tokens are stored)."""
        if self.initialized:
            return
        b, h, _, d = keys.shape
        self.batch, self.heads, self.head_dim = b, h, d
        self.dtype, self.device = keys.dtype, keys.device
        specs = {
            "key_codes": ((b, h, None, d), keys.dtype, keys.device),
            "value_codes": ((b, h, None, values.shape[-1]), values.dtype, values.device),
            "positions": ((b, None), torch.int32, keys.device),
        }
        self.buffers.allocate(specs, 0)
        self.initialized = True

    def append(self, keys: torch.Tensor, values: torch.Tensor, positions: torch.Tensor) -> None:
        self.initialize(keys, values)
        n = keys.shape[2]
        self._ensure(n)
        at = self.length - self._offset
        self.buffers.write("key_codes", at, keys)
        self.buffers.write("value_codes", at, values)
        self.buffers.write("positions", at, positions.to(torch.int32).expand(self.batch, n))
        self.length += n

    def _ensure(self, n):
        used = self.length - self._offset
        dead = self.start - self._offset
        if used + n > self.buffers.capacity and dead > 0:
            # Drop evicted slots while growing.
            self.buffers.reserve(used - dead + n, used, dead)
            self._offset = self.start
        else:
            self.buffers.reserve(used + n, used)

    def keys_values(self, begin: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        begin = self.start if begin is None else begin
        a, b = begin - self._offset, self.length - self._offset
        return self.buffers.read("key_codes", a, b), self.buffers.read("value_codes", a, b)

    def positions(self, begin: int | None = None) -> torch.Tensor:
        begin = self.start if begin is None else begin
        return self.buffers.read("positions", begin - self._offset, self.length - self._offset)

    def crop(self, n: int) -> None:
        self.length = max(self.start, self.length - n)

    def evict_before(self, slot: int) -> None:
        self.start = max(self.start, min(slot, self.length))

    def map_rows(self, fn) -> None:
        if self.initialized:
            self.buffers.map_rows(fn)
            self.batch = self.buffers.tensors["positions"].shape[0]

    def reserve(self, total_slots: int) -> None:
        if self.initialized:
            self.buffers.reserve(total_slots - self._offset, self.length - self._offset)

    def nbytes(self) -> dict[str, int]:
        if not self.initialized:
            return {}
        k, v = self.keys_values()
        return {"keys": tensor_bytes(k), "values": tensor_bytes(v), "positions": tensor_bytes(self.positions())}




def _compiling() -> bool:
    return torch.compiler.is_compiling()


class CapacityError(RuntimeError):
    """A static cache was asked to hold more tokens than its capacity."""


def capacity_error(capacity: int, length: int, new: int) -> CapacityError:
    return CapacityError(
        f"the static KVQuant cache holds {capacity} tokens and already has {length}; {new} more do not fit. Create it "
        "with a larger cache_config['max_cache_len'] (or generate with a smaller max_new_tokens); nothing was written"
    )


class StaticFullPrecisionStore(KVStore):
    """Exact storage (``bits=16``) of a fixed capacity, written by index at the device length, like transformers'
    ``StaticLayer``: reads return every slot (the attention mask hides the unwritten ones)."""

    bits = 16
    static = True

    def __init__(self, capacity: int):
        super().__init__()
        self.capacity = capacity
        self.host_length: int | None = 0  # known on the host until a compiled step appends

    def initialize(self, keys, values):
        if self.initialized:
            return
        b, h, _, d = keys.shape
        self.batch, self.heads, self.head_dim = b, h, d
        self.dtype, self.device = keys.dtype, keys.device
        self.keys = torch.zeros(b, h, self.capacity, d, dtype=keys.dtype, device=keys.device)
        self.values = torch.zeros(b, h, self.capacity, values.shape[-1], dtype=values.dtype, device=values.device)
        self.slot_positions = torch.zeros(b, self.capacity, dtype=torch.int32, device=keys.device)
        self.device_length = torch.zeros(1, dtype=torch.int32, device=keys.device)
        _mark_static(self.keys, self.values, self.slot_positions, self.device_length)
        self.initialized = True

    @property
    def length(self):
        return self.host_length if self.host_length is not None else int(self.device_length)

    def append(self, keys, values, positions):
        self.initialize(keys, values)
        n = keys.shape[2]
        _check_room(self, n)
        slots = self.device_length.long() + torch.arange(n, device=self.device)
        self.keys.index_copy_(2, slots, keys)
        self.values.index_copy_(2, slots, values)
        self.slot_positions.index_copy_(1, slots, positions.to(torch.int32).expand(self.batch, n))
        self.device_length.add_(n)
        _advance(self, n)

    def keys_values(self, begin=None):
        return self.keys, self.values

    def positions(self, begin=None):
        return self.slot_positions

    def crop(self, n: int) -> None:
        self.device_length.sub_(n)
        if self.host_length is not None:
            self.host_length = max(0, self.host_length - n)

    def map_rows(self, fn) -> None:
        if self.initialized:
            self.keys, self.values = fn(self.keys).contiguous(), fn(self.values).contiguous()
            self.slot_positions = fn(self.slot_positions).contiguous()
            self.batch = self.keys.shape[0]
            _mark_static(self.keys, self.values, self.slot_positions)

    def reserve(self, total_slots: int) -> None:
        pass

    def nbytes(self) -> dict[str, int]:
        if not self.initialized:
            return {}
        n = self.length
        per = self.batch * self.heads * self.head_dim * self.keys.element_size()
        return {"keys": n * per, "values": n * per, "positions": n * self.batch * 4}

    @property
    def retained(self) -> int:
        return self.length


def _mark_static(*tensors) -> None:
    """Fixed addresses for CUDA graphs (what transformers' StaticLayer does; not while tracing)."""
    if not _compiling():
        for t in tensors:
            torch._dynamo.mark_static_address(t)


def _check_room(store, n: int) -> None:
    """Capacity overflow is an error before any write; checked whenever the host knows the length (eager calls). A
    compiled step cannot look (that would synchronize); its appends stop at the capacity instead of wrapping."""
    if _compiling() or store.host_length is None:
        return
    if store.host_length + n > store.capacity:
        raise capacity_error(store.capacity, store.host_length, n)


def _advance(store, n: int) -> None:
    if _compiling():
        store.host_length = None  # a compiled step appended: only the device knows the length now
    elif store.host_length is not None:
        store.host_length += n


class SharedPositions:
    """The RoPE positions of a cache's slots, one ``[B, capacity]`` int32 tensor per device for all of its packed
    layers: every layer stores the same tokens at the same slots, so keeping the positions once instead of per layer
    saves 32 bits per token and row in each further layer (0.08 bits per cached element for SmolLM2's 3 KV heads x 64,
    0.016 for Llama-3-8B's 8 x 128).

    The layers write the same positions at the same slots (a repeated write changes nothing), grow and reorder in
    step; :meth:`grown` and :meth:`mapped` hand the second and later layers the tensor the first one made. A layer whose
    shape does not match what the others hold gets a tensor of its own (correct, just not shared).
    """

    def __init__(self):
        self._by_device: dict[torch.device, torch.Tensor] = {}
        self._last_map = None  # (weak reference to the tensor mapped last, its mapped tensor)

    def get(self, batch: int, capacity: int, device) -> torch.Tensor:
        """The positions tensor of ``device`` for ``batch`` rows and ``capacity`` slots. When the one held has another
        shape (a growing cache's first layer has already grown it), a tensor of the layer's own; its growth
        (:meth:`grown`) then finds the shared one again."""
        device = torch.device(device)
        t = self._by_device.get(device)
        if t is not None and t.shape == (batch, capacity):
            return t
        own = torch.zeros(batch, capacity, dtype=torch.int32, device=device)
        if t is None:
            self._by_device[device] = own
        return own

    def reset(self) -> None:
        """Forget the tensors (the cache was reset: its layers start again, perhaps with another batch)."""
        self._by_device.clear()
        self._last_map = None

    def grown(self, old: torch.Tensor, capacity: int, used: int) -> torch.Tensor:
        """``old`` grown to ``capacity`` slots with its first ``used`` copied (once: later layers get the same)."""
        t = self._by_device.get(old.device)
        if t is not None and t is not old and t.shape == (old.shape[0], capacity):
            return t
        t = torch.zeros(old.shape[0], capacity, dtype=old.dtype, device=old.device)
        n = min(used, old.shape[1], capacity)
        t[:, :n].copy_(old[:, :n])
        self._by_device[old.device] = t
        return t

    def mapped(self, old: torch.Tensor, fn) -> torch.Tensor:
        """``fn(old)`` (a batch-axis operation or a move), computed once for the layers that share ``old``."""
        if self._last_map is not None and self._last_map[0]() is old:
            return self._last_map[1]
        new = fn(old).contiguous()
        self._last_map = (weakref.ref(old), new)
        self._by_device[new.device] = new
        return new


class PackedStore(KVStore):
    """KVQuant storage in the packed layout: codes, per-channel key and per-token value ranges, bounded outliers,
    exact sink and recent window.

    ``capacity=None``: dynamic (the buffers grow geometrically). ``capacity=N`` and ``static=True``: a fixed
    capacity, written by index at the device length, no host synchronization (compileable).
    ``kernels``: None decides per device (Triton on CUDA), True/False forces.
    """

    RING_SLACK = 64  # extra ring slots, so crops of up to this many tokens keep the recent window exact

    def __init__(self, key_quantizer, value_quantizer, bits: int, sink_tokens: int = 1, recent_window: int = 0,
                 capacity: int | None = None, static: bool = False, kernels: bool | None = None,
                 shared_positions: SharedPositions | None = None):
        super().__init__()
        if not getattr(key_quantizer, "bounded", False) or not getattr(value_quantizer, "per_head", False):
            raise ValueError("PackedStore stores bounded outliers; use UncappedPackedStore for the paper's uncapped layout")
        if static and not capacity:
            raise ValueError("a static store needs a capacity")
        self.key_quantizer = key_quantizer
        self.value_quantizer = value_quantizer
        self.bits = bits
        self.sink_tokens = sink_tokens
        self.recent_window = recent_window
        self.static = static
        self.requested_capacity = capacity
        self.kernels = kernels
        self.host_length: int | None = 0
        self.cache = None  # the kernels.layout.PackedCache
        self.shared_positions = shared_positions  # the cache's positions, when its layers share them

    # ------------------------------------------------------------------------------------------ setup
    def initialize(self, keys, values):
        """Allocate for the batch, heads, dtype and device of ``keys``/``values`` (no tokens are stored)."""
        if self.initialized:
            return
        from ..kernels.layout import allocate, round_capacity

        b, h, _, d = keys.shape
        self.batch, self.heads, self.head_dim = b, h, d
        self.dtype, self.device = keys.dtype, keys.device
        kq, vq = self.key_quantizer, self.value_quantizer
        book_k, book_v = kq.codebook, vq.codebook
        ring = self.recent_window + self.RING_SLACK if self.recent_window else 0
        self.cache = allocate(
            batch=b, heads=h, head_dim=d, bits=self.bits, capacity=self.requested_capacity or 0,
            key_outliers=min(kq.head_slots, d), value_outliers=vq.head_slots(d), dtype=keys.dtype, device=keys.device,
            key_table=book_k.decode_table(), value_table=book_v.decode_table(), key_bounds=book_k.boundaries,
            value_bounds=book_v.boundaries, key_zero=kq.zero, key_scale=kq.scale, recent_window=self.recent_window,
            sink_tokens=self.sink_tokens,
            positions=None if self.shared_positions is None else self.shared_positions.get(
                b, round_capacity(self.requested_capacity or 0), keys.device),
        )
        if ring:
            self.cache.window_keys = keys.new_zeros(b, h, ring, d)
            self.cache.window_values = values.new_zeros(b, h, ring, d)
        if self.static:
            self._fix_buffers()
        self.initialized = True

    def _fix_buffers(self) -> None:
        """A static store's tensors become views into one buffer with a fixed address (a compiled step reads and
        CUDA graphs capture that one buffer per layer: kernels.layout.consolidate)."""
        from ..kernels.layout import consolidate

        self.cache = consolidate(self.cache)
        self._static_capacity = self.cache.capacity
        _mark_static(self.cache.arena, *self.cache.tensors().values())

    @property
    def capacity(self) -> int:
        if self.static and self.cache is not None:
            return self._static_capacity  # a Python int: a compiled step reads no tensor for it
        return self.cache.capacity if self.cache is not None else 0

    @property
    def length(self) -> int:
        """Slots written (a host value; in a static store after compiled steps this synchronizes)."""
        return self.host_length if self.host_length is not None else int(self.cache.length)

    def uses_kernels(self) -> bool:
        if self.kernels is not None:
            return self.kernels
        from ..kernels.layout import supported_head_dim

        return self.device.type == "cuda" and _triton_importable() and supported_head_dim(self.head_dim, self.bits)

    def reserve(self, total_slots: int) -> None:
        """Room for ``total_slots`` slots (dynamic stores; avoids growth copies for known lengths)."""
        if self.initialized and not self.static and total_slots > self.capacity:
            from ..kernels.layout import regrow, round_capacity

            shared = self.shared_positions
            positions = None if shared is None else shared.grown(self.cache.positions, round_capacity(total_slots), self.length)
            self.cache = regrow(self.cache, total_slots, self.length, positions)

    # ------------------------------------------------------------------------------------------ writing
    def append(self, keys: torch.Tensor, values: torch.Tensor, positions: torch.Tensor) -> None:
        """Store new tokens ``[B, H, T, D]`` (pre-RoPE keys) with their positions ``[B or 1, T]``."""
        self.initialize(keys, values)
        n = keys.shape[2]
        if n == 0:
            return
        positions = positions.to(device=self.device, dtype=torch.int32).expand(self.batch, n)
        if self.static:
            _check_room(self, n)
        elif self.host_length + n > self.capacity:
            self.reserve(max(self.host_length + n, self.capacity + self.capacity // 2))
        if self.uses_kernels():
            from ..kernels import (
                ops,  # the Triton append as one custom operator (torch.compile does not trace it)
            )

            ops.append(self.cache, keys, values, positions)
        else:
            from ..kernels.naive import append_reference

            append_reference(self.cache, keys, values, positions)
        _advance(self, n)

    # ------------------------------------------------------------------------------------------ reading
    def read_end(self) -> int:
        """Last slot + 1 that reads cover: the length (dynamic) or the whole capacity (static: no host length)."""
        return self.capacity if self.static else self.length

    def read(self, begin: int, end: int, length: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Dequantized pre-RoPE keys and values of slots [begin, end) in the model dtype (``length``: the host length
        when known; None reads it on the device)."""
        if self.uses_kernels() and not _compiling():
            from ..kernels.dequant import dequantize_packed

            return dequantize_packed(self.cache, begin, end, self.dtype, length)
        from ..kernels.naive import dequantize

        return dequantize(self.cache, begin, end, self.dtype, length)

    def keys_values(self, begin: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Dequantized pre-RoPE keys and values of slots [begin, :meth:`read_end`) in the model dtype."""
        begin = self.start if begin is None else begin
        if self.static:
            return self.read(begin, self.capacity, None)
        return self.read(begin, self.length, self.length)

    def positions(self, begin: int | None = None) -> torch.Tensor:
        begin = self.start if begin is None else begin
        return self.cache.positions[:, begin : self.read_end()]

    def exact_tail(self, count: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The exact pre-RoPE keys and values of the newest ``count`` slots (at most the recent window), from the
        window's ring: what a prefill chunk's first queries read exactly before the chunk's append overwrites it."""
        if count > self.recent_window or count > self.length:
            raise ValueError(f"the exact tail holds at most {min(self.recent_window, self.length)} tokens, asked for {count}")
        c = self.cache
        ring = torch.arange(self.length - count, self.length, device=self.device) % c.window_keys.shape[2]
        return c.window_keys[:, :, ring].to(self.dtype), c.window_values[:, :, ring].to(self.dtype)

    # ------------------------------------------------------------------------------------------ edits
    def crop(self, n: int) -> None:
        """Forget the newest ``n`` tokens (packed tokens stay packed: each token is quantized on its own)."""
        if n <= 0 or not self.initialized:
            return
        if self.recent_window and n > self.RING_SLACK:
            raise ValueError(
                f"a cache with a recent window can forget at most {self.RING_SLACK} tokens at once (asked for {n}): the "
                "exact copies of older tokens were overwritten"
            )
        c = self.cache
        n = min(n, self.length - self.start) if self.host_length is not None else n
        c.length.sub_(n)
        c.sink_slot.copy_(torch.where(c.sink_slot >= c.length.long(), torch.full_like(c.sink_slot, -1), c.sink_slot))
        if self.host_length is not None:
            self.host_length -= n

    def evict_before(self, slot: int) -> None:
        """Slots below ``slot`` are no longer read (sliding-window layers); their memory is not reclaimed."""
        self.start = max(self.start, min(slot, self.length))

    def map_rows(self, fn) -> None:
        """Apply a batch-axis operation (beam reorder, select, repeat) to every per-row tensor."""
        if not self.initialized:
            return
        from ..kernels.layout import map_rows

        shared = self.shared_positions
        self.cache = map_rows(self.cache, fn, None if shared is None else shared.mapped(self.cache.positions, fn))
        self.batch = self.cache.batch
        if self.static:
            self._fix_buffers()

    # ------------------------------------------------------------------------------------------ accounting
    @property
    def retained(self) -> int:
        return self.length - self.start

    @property
    def stored(self) -> int:
        """Every written slot: evicted ones keep their memory (the layout never compacts)."""
        return self.length

    def nbytes(self) -> dict[str, int]:
        """Bytes of every stored tensor over the written slots, by component."""
        if not self.initialized:
            return {}
        from ..kernels.layout import nbytes

        out = nbytes(self.cache, self.length)
        if self.shared_positions is not None:
            del out["positions"]  # the cache counts its shared positions once (shared_positions_bytes)
        return out


def _triton_importable() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def tensor_bytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def shared_positions_bytes(stores) -> int:
    """Bytes of the written slots of the positions that ``stores`` share, each shared tensor counted once."""
    seen, total = set(), 0
    for store in stores:
        if getattr(store, "shared_positions", None) is not None and store.initialized:
            t = store.cache.positions
            if t.data_ptr() not in seen:
                seen.add(t.data_ptr())
                total += t.shape[0] * store.length * t.element_size()
    return total
