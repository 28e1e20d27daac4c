"""The packed format, owned here: how codes, ranges and outliers of one layer's KV cache are laid out in memory.

Everything that writes or reads the cache (the quantization core's stores, the Triton kernels and their references)
takes the layout from this module. The codes and codebooks are what calibration produced; only their placement is
chosen for the reader (the decode kernel), so ``kvquant_config.json`` does not depend on it.

**The reader layout** (default; ``B`` rows, ``H`` KV heads, head dim ``D``, ``cap`` slots, ``S = ceil(f * D)``
outliers per (token, head)):

- ``key_codes`` / ``value_codes``: int32 ``[B, H, W, cap]`` with ``W = D * bits / 32``, *slot-major*: word ``w`` of
  every slot is contiguous, so a block of slots loads in wide vectors. A vector's codes sit in *nibbles*: each
  32-bit *selector* holds 8 codes, one per 4-bit nibble, so one byte-permute instruction looks up four centroids.
  4-bit: a word is a selector. 2-bit: a word holds two selectors (its bits 0-1 and 2-3 of every nibble). 3-bit: three
  words hold four selectors of a 32-code group, three in their nibbles' low 3 bits and a fourth assembled from the
  nibbles' top bits (word a gives bit 0, b bit 1, c bit 2) — exactly 3 bits a code.
  Which channel a nibble holds is :func:`nibble_channels`: for keys a selector holds RoPE pairs ``(j, j + D/2)`` of
  four consecutive ``j`` (so both halves of a pair decode in the same thread); for values channels in order.
- keys are pre-RoPE: ``key = key_table[code] * key_scale[h, d] + key_zero[h, d]`` (fp32 ``[H, D]`` calibrated
  ranges); values ``value = value_table[code] * value_scale[b, t] + value_zero[b, t]`` (16-bit ``[B, cap]``
  per-token ranges over all heads).
- outliers, bounded: ``S`` per (token, head) for keys and for values, ``*_outlier_values`` (16-bit *residual*:
  exact value minus the dequantized one, so they add) and ``*_outlier_index`` (uint8 channel) ``[B, H, S, cap]``.
  Unused entries have a zero residual.
- ``positions``: int32 ``[B, cap]``, the RoPE position of every slot (rows differ under left padding); the same in
  every layer of a cache (each layer stores the same tokens at the same slots), so the layers of one cache on one
  device may share one tensor (:class:`~transformers_kvquant.quant.store.SharedPositions`); ``length``:
  int32 ``[1]`` on the device, the slots written (so a compiled decode step needs no host value).
- exact tokens: the recent window is a ring ``[B, H, WR, D]`` (slot ``t`` at ``t % WR``) holding the newest
  ``recent_window`` tokens exactly, and the sink ``[B, H, N, D]`` the first ``N`` positions of each row, at the
  slots ``sink_slot`` ``[B, N]`` (-1: none). Every token is also packed; the exact copies replace it when read.

:class:`PackedCache` is that view, as the kernels take it; :func:`pack_codes` / :func:`unpack_codes` are the
reference (de)interleaving, and :func:`kernel_constants` the per-layer tables the decode kernel reads.

**The bit stream** (:func:`pack` / :func:`unpack`) is the layout of the store with uncapped key outliers
(``key_outliers="uncapped"``, reference path only): a vector's codes as a little-endian bit stream, code ``i`` at bits
``[b*i, b*i + b)``, 3-bit codes 10 and 21 of every 32 straddling words.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch


def on_input_device(launcher):
    """Run ``launcher`` with the current CUDA device set to that of its first (tensor) argument.

    Triton launches on the current device, so without this a layer on ``cuda:1`` (a model split by ``device_map``)
    would be launched on ``cuda:0`` with pointers into the other GPU's memory.
    """

    @functools.wraps(launcher)
    def wrapper(first, *args, **kwargs):
        t = first.key_codes if isinstance(first, PackedCache) else first  # a tensor (or a PackedCache)
        if t.is_cuda and t.device.index is not None and t.device.index != torch.cuda.current_device():
            with torch.cuda.device(t.device):
                return launcher(first, *args, **kwargs)
        return launcher(first, *args, **kwargs)

    return wrapper

SUPPORTED_BITS = (2, 3, 4)


def same_strides(keys: torch.Tensor, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``keys, values`` with identical strides (copies only when they differ): the kernels index both with one set."""
    if keys.stride() != values.stride():
        return keys.contiguous(), values.contiguous()
    return keys, values


def group_size(bits: int) -> int:
    """Codes per packing group: a group is the smallest run of codes that fills whole int32 words."""
    _check_bits(bits)
    return 32 if bits == 3 else 32 // bits


def packed_words(num_codes: int, bits: int) -> int:
    """Number of int32 words that hold ``num_codes`` codes of ``bits`` bits."""
    g = group_size(bits)
    return -(-num_codes // g) * g * bits // 32


def pack(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack integer codes in ``[0, 2**bits)`` along the last dim into int32 words.

    ``codes``: any integer tensor ``[..., n]``. Returns ``[..., packed_words(n, bits)]`` int32.
    """
    _check_bits(bits)
    n = codes.shape[-1]
    g = group_size(bits)
    pad = (-n) % g
    c = codes.to(torch.int64)
    if pad:
        c = torch.nn.functional.pad(c, (0, pad))
    lead = c.shape[:-1]
    # [..., groups, g] codes -> bit offsets within the group's bit stream of g*bits bits.
    groups = c.shape[-1] // g
    c = c.reshape(*lead, groups, g)
    if bits == 3:
        # A 96-bit group as two overlapping 64-bit halves is awkward; build the three words directly.
        offsets = torch.arange(g, device=c.device) * 3
        word = offsets // 32
        shift = offsets % 32
        words = []
        for w in range(3):
            lo = torch.where(word == w, c << shift, torch.zeros_like(c))
            # Low bits of a code that starts in word w-1 and spills into word w.
            spill = (word == w - 1) & (shift > 29)
            hi = torch.where(spill, c >> (32 - shift), torch.zeros_like(c))
            words.append((lo | hi).sum(-1) & 0xFFFFFFFF)
        out = torch.stack(words, dim=-1)
    else:
        shift = torch.arange(g, device=c.device) * bits
        out = ((c << shift).sum(-1) & 0xFFFFFFFF).unsqueeze(-1)
    out = out.reshape(*lead, groups * g * bits // 32)  # explicit sizes: the leading dims may be empty
    # Reinterpret the unsigned 32-bit values as int32 (two's complement).
    out = torch.where(out >= 2**31, out - 2**32, out)
    return out.to(torch.int32)


def unpack(words: torch.Tensor, bits: int, num_codes: int) -> torch.Tensor:
    """Inverse of :func:`pack`: ``[..., words]`` int32 -> ``[..., num_codes]`` uint8 codes."""
    _check_bits(bits)
    g = group_size(bits)
    expected = packed_words(num_codes, bits)
    if words.shape[-1] != expected:
        raise ValueError(f"expected {expected} packed words for {num_codes} {bits}-bit codes, got {words.shape[-1]}")
    w = words.to(torch.int64) & 0xFFFFFFFF
    lead = w.shape[:-1]
    mask = (1 << bits) - 1
    if bits == 3:
        w = w.reshape(*lead, expected // 3, 3)
        # Two 64-bit windows cover every code: codes 0..20 lie in words 0-1, codes 21..31 in words 1-2.
        lo = w[..., 0] | (w[..., 1] << 32)
        hi = w[..., 1] | (w[..., 2] << 32)
        j = torch.arange(g, device=w.device)
        from_lo = (lo.unsqueeze(-1) >> (3 * j).clamp(max=62)) & mask
        from_hi = (hi.unsqueeze(-1) >> (3 * j - 32).clamp(min=0)) & mask
        codes = torch.where(j < 21, from_lo, from_hi)
    else:
        shift = torch.arange(g, device=w.device) * bits
        codes = (w.unsqueeze(-1) >> shift) & mask
    codes = codes.reshape(*lead, expected * 32 // bits)[..., :num_codes]
    return codes.to(torch.uint8)


def _check_bits(bits: int) -> None:
    if bits not in SUPPORTED_BITS:
        raise ValueError(f"bits must be one of {SUPPORTED_BITS} (got {bits}); use bits=16 for an unquantized cache")


def supported_head_dim(head_dim: int, bits: int) -> bool:
    """Whether the kernels run on this head size: whole 32-code groups and a power of two (their tile shapes). Other
    sizes are stored padded to whole groups and read by the reference path."""
    return bits in SUPPORTED_BITS and head_dim % 32 == 0 and _pow2(head_dim)


def _pow2(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


def next_pow2(n: int) -> int:
    return 1 if n <= 1 else 1 << (n - 1).bit_length()


# ---------------------------------------------------------------------------------------------- reader layout
def padded_dim(head_dim: int, bits: int) -> int:
    """Channels a vector occupies in the reader layout: whole words (8 codes at 4 bits, 16 at 2, 32-code groups
    at 3); the padding codes are zero."""
    unit = {4: 8, 2: 16, 3: 32}[bits]
    return -(-head_dim // unit) * unit


def words_per_vector(head_dim: int, bits: int) -> int:
    """int32 words of one (row, head, slot) vector in the reader layout."""
    _check_bits(bits)
    return padded_dim(head_dim, bits) * bits // 32


def outlier_slots(head_dim: int, fraction: float) -> int:
    """Outliers kept per (token, head): ``ceil(f * D)`` (0 without outliers)."""
    return math.ceil(round(fraction * head_dim, 9)) if fraction > 0 else 0


@functools.cache
def nibble_channels(head_dim: int, keys: bool, bits: int = 3) -> tuple[int, ...]:
    """The channel held by nibble ``n`` of selector ``w``, flattened as ``8 * w + n``.

    Keys: selector ``w`` holds RoPE pairs ``4w .. 4w + 3``: nibbles 0, 1 the low halves of pairs ``4w``, ``4w + 1``;
    2, 3 their high halves (channel ``j + D/2``); 4-7 the same for pairs ``4w + 2``, ``4w + 3``. Values, and keys of
    a head size that is not a multiple of 32 (padded, reference path only): nibble ``n`` of selector ``w`` is channel
    ``8w + n``."""
    half = head_dim // 2
    keys = keys and head_dim % 32 == 0
    out = []
    for w in range((head_dim if keys else padded_dim(head_dim, bits)) // 8):
        for nib in range(8):
            x, y, z = nib // 4, (nib // 2) % 2, nib % 2
            out.append(4 * w + 2 * x + z + y * half if keys else 8 * w + nib)
    return tuple(out)


@functools.cache
def tile_channels(head_dim: int, keys: bool) -> tuple[int, ...]:
    """The channel at each position of a tile the decode kernel builds: position ``8w + 4y + 2x + z`` is nibble
    ``4x + 2y + z`` of selector ``w`` (the kernel's lookup yields nibbles pairwise; the tile keeps pairs adjacent)."""
    by_nibble = nibble_channels(head_dim, keys)
    out = []
    for w in range(head_dim // 8):
        for y in range(2):
            for x in range(2):
                for z in range(2):
                    out.append(by_nibble[8 * w + 4 * x + 2 * y + z])
    return tuple(out)


def pack_codes(codes: torch.Tensor, bits: int, keys: bool) -> torch.Tensor:
    """codes ``[..., D]`` (channel order, integers in ``[0, 2**bits)``) -> int32 words ``[..., W]`` (one vector per
    row; the store transposes them to slot-major)."""
    _check_bits(bits)
    lead = codes.shape[:-1]
    chan = torch.tensor(nibble_channels(codes.shape[-1], keys, bits), device=codes.device)
    codes = torch.nn.functional.pad(codes.long(), (0, padded_dim(codes.shape[-1], bits) - codes.shape[-1]))
    d = codes.shape[-1]
    sel = codes[..., chan].reshape(*lead, d // 8, 8)  # code of each nibble
    nib = torch.arange(8, device=codes.device)
    if bits == 4:
        words = (sel << (4 * nib)).sum(-1)
    elif bits == 2:
        x, y = sel[..., 0::2, :], sel[..., 1::2, :]  # selectors 2k (bits 0-1 of the nibbles) and 2k + 1 (bits 2-3)
        words = ((x << (4 * nib)) | (y << (4 * nib + 2))).sum(-1)
    else:
        g = sel.reshape(*lead, d // 32, 4, 8)
        a, b, c, sp = g[..., 0, :], g[..., 1, :], g[..., 2, :], g[..., 3, :]
        wa = ((a | ((sp & 1) << 3)) << (4 * nib)).sum(-1)
        wb = ((b | (((sp >> 1) & 1) << 3)) << (4 * nib)).sum(-1)
        wc = ((c | (((sp >> 2) & 1) << 3)) << (4 * nib)).sum(-1)
        words = torch.stack([wa, wb, wc], -1).reshape(*lead, d // 32 * 3)
    words = words & 0xFFFFFFFF
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)


def unpack_codes(words: torch.Tensor, bits: int, keys: bool, head_dim: int) -> torch.Tensor:
    """Inverse of :func:`pack_codes`: int32 ``[..., W]`` -> int64 codes ``[..., D]`` in channel order."""
    _check_bits(bits)
    if words.shape[-1] != words_per_vector(head_dim, bits):
        raise ValueError(f"expected {words_per_vector(head_dim, bits)} words for D={head_dim} at {bits} bits, got {words.shape[-1]}")
    w = words.long() & 0xFFFFFFFF
    lead = w.shape[:-1]
    nib = torch.arange(8, device=w.device)
    dp = padded_dim(head_dim, bits)
    if bits == 4:
        sel = (w[..., None] >> (4 * nib)) & 15
    elif bits == 2:
        x = (w[..., None] >> (4 * nib)) & 3
        y = (w[..., None] >> (4 * nib + 2)) & 3
        sel = torch.stack([x, y], -2).reshape(*lead, dp // 8, 8)
    else:
        g = w.reshape(*lead, dp // 32, 3)
        parts = [(g[..., k, None] >> (4 * nib)) & 15 for k in range(3)]
        sp = ((parts[0] >> 3) & 1) | (((parts[1] >> 3) & 1) << 1) | (((parts[2] >> 3) & 1) << 2)
        sel = torch.stack([parts[0] & 7, parts[1] & 7, parts[2] & 7, sp], -2).reshape(*lead, dp // 8, 8)
    flat = sel.reshape(*lead, dp)
    out = torch.empty_like(flat)
    out[..., torch.tensor(nibble_channels(head_dim, keys, bits), device=w.device)] = flat
    return out[..., :head_dim]


def lane_table(table: torch.Tensor) -> torch.Tensor:
    """A codebook (fp16 values) as the byte-permute lookup reads it: int32 ``[32, 4]`` (``[32, 8]`` at 4 bits), the
    same row for every lane (loaded per lane so the values sit in ordinary registers): the low bytes of entries
    0-3, 4-7, then the high bytes; 4 bits repeat that for entries 8-15."""
    t = table.detach().to("cpu", torch.float16).view(torch.int16).long() & 0xFFFF
    n = t.numel()
    t = torch.nn.functional.pad(t, (0, max(0, 8 - n)))
    regs = []
    for base in range(0, max(8, n), 8):
        e = t[base : base + 8]
        lo, hi = e & 0xFF, e >> 8
        for part in (lo[:4], lo[4:], hi[:4], hi[4:]):
            regs.append(int((part << torch.tensor([0, 8, 16, 24])).sum()))
    r = torch.tensor(regs, dtype=torch.int64)
    r = torch.where(r >= 2**31, r - 2**32, r).to(torch.int32)
    return r.repeat(32, 1).contiguous()


@dataclass
class PackedCache:
    """One layer's cache in the reader layout, as the kernels take it (see the module docstring)."""

    bits: int
    key_codes: torch.Tensor  # [B, H, W, cap] int32
    value_codes: torch.Tensor
    key_table: torch.Tensor  # [2**bits] fp32 decode table (Q-Norm applied)
    value_table: torch.Tensor
    key_bounds: torch.Tensor  # [2**bits - 1] fp32 decision boundaries of the encoder
    value_bounds: torch.Tensor
    key_zero: torch.Tensor  # [H, D] fp32
    key_scale: torch.Tensor
    value_zero: torch.Tensor  # [B, cap] 16-bit
    value_scale: torch.Tensor
    key_outlier_values: torch.Tensor  # [B, H, S, cap] 16-bit residual
    key_outlier_index: torch.Tensor  # [B, H, S, cap] uint8 channel
    value_outlier_values: torch.Tensor
    value_outlier_index: torch.Tensor
    positions: torch.Tensor  # [B, cap] int32
    length: torch.Tensor  # [1] int32 on the device: slots written
    window_keys: torch.Tensor  # [B, H, WR, D] ring of exact tokens
    window_values: torch.Tensor
    recent_window: int  # exact newest tokens (<= WR)
    sink_keys: torch.Tensor  # [B, H, N, D]
    sink_values: torch.Tensor
    sink_slot: torch.Tensor  # [B, N] int64, -1 = none
    # A static cache's tensors are views into one buffer (:func:`consolidate`); the operators of ``ops`` then hand
    # a compiled step that buffer alone, so TorchDynamo guards one tensor per layer instead of twenty-one.
    arena: torch.Tensor | None = None
    arena_spec: int | None = None

    @property
    def batch(self) -> int:
        return self.key_codes.shape[0]

    @property
    def heads(self) -> int:
        return self.key_codes.shape[1]

    @property
    def head_dim(self) -> int:
        return self.key_zero.shape[1]

    @property
    def capacity(self) -> int:
        return self.key_codes.shape[-1]

    @property
    def outliers(self) -> int:
        return self.key_outlier_index.shape[2]

    def device_length(self, from_arena: bool) -> torch.Tensor:
        """The slots written, as a 0-d device tensor; ``from_arena``: read through the arena, for a compiled step
        whose operators take the arena (another input aliasing it, mutated with another dtype, is something
        torch.compile refuses), not for one that reads the tensors themselves (the reference path)."""
        if self.arena is None or not from_arena:
            return self.length[0]
        return arena_views(self.arena, self.arena_spec, ("length",))["length"][0]

    def tensors(self) -> dict[str, torch.Tensor]:
        """Every tensor field by name (the arena, when there is one, is their storage, not a field)."""
        return {k: v for k, v in self.__dict__.items() if isinstance(v, torch.Tensor) and k != "arena"}


BLOCK = 128  # capacities are whole blocks of slots: the decode kernel loads a block of codes unmasked

# slot axis of each tensor that has one (the others are per layer or per row)
SLOT_AXIS = {
    "key_codes": 3, "value_codes": 3, "value_zero": 1, "value_scale": 1, "key_outlier_values": 3,
    "key_outlier_index": 3, "value_outlier_values": 3, "value_outlier_index": 3, "positions": 1,
}


def round_capacity(slots: int) -> int:
    """The capacity that holds ``slots`` slots: whole blocks, at least one."""
    return max(BLOCK, -(-slots // BLOCK) * BLOCK)


def allocate(
    *, batch: int, heads: int, head_dim: int, bits: int, capacity: int, key_outliers: int, value_outliers: int,
    dtype: torch.dtype, device, key_table, value_table, key_bounds, value_bounds, key_zero, key_scale,
    recent_window: int = 0, sink_tokens: int = 0, positions: torch.Tensor | None = None,
) -> PackedCache:
    """An empty cache (length 0) of ``round_capacity(capacity)`` slots; ``dtype`` is the model's (exact copies).
    ``positions``: an int32 ``[batch, cap]`` tensor to use as the positions (shared with other layers), or None."""
    cap = round_capacity(capacity)
    if positions is not None:
        _check_positions(positions, batch, cap)
    half = torch.bfloat16 if dtype == torch.bfloat16 else torch.float16
    w = words_per_vector(head_dim, bits)
    z = dict(device=device)
    wr = recent_window  # the exact window's ring (none without a window)
    return PackedCache(
        bits=bits,
        key_codes=torch.zeros(batch, heads, w, cap, dtype=torch.int32, **z),
        value_codes=torch.zeros(batch, heads, w, cap, dtype=torch.int32, **z),
        key_table=key_table.float().to(device).contiguous(),
        value_table=value_table.float().to(device).contiguous(),
        key_bounds=key_bounds.float().to(device).contiguous(),
        value_bounds=value_bounds.float().to(device).contiguous(),
        key_zero=key_zero.float().to(device).contiguous(),
        key_scale=key_scale.float().to(device).contiguous(),
        value_zero=torch.zeros(batch, cap, dtype=half, **z),
        value_scale=torch.zeros(batch, cap, dtype=half, **z),
        key_outlier_values=torch.zeros(batch, heads, key_outliers, cap, dtype=half, **z),
        key_outlier_index=torch.zeros(batch, heads, key_outliers, cap, dtype=torch.uint8, **z),
        value_outlier_values=torch.zeros(batch, heads, value_outliers, cap, dtype=half, **z),
        value_outlier_index=torch.zeros(batch, heads, value_outliers, cap, dtype=torch.uint8, **z),
        positions=torch.zeros(batch, cap, dtype=torch.int32, **z) if positions is None else positions,
        length=torch.zeros(1, dtype=torch.int32, **z),
        window_keys=torch.zeros(batch, heads, wr, head_dim, dtype=dtype, **z),
        window_values=torch.zeros(batch, heads, wr, head_dim, dtype=dtype, **z),
        recent_window=recent_window,
        sink_keys=torch.zeros(batch, heads, sink_tokens, head_dim, dtype=dtype, **z),
        sink_values=torch.zeros(batch, heads, sink_tokens, head_dim, dtype=dtype, **z),
        sink_slot=torch.full((batch, sink_tokens), -1, dtype=torch.int64, **z),
    )


def _check_positions(positions: torch.Tensor, batch: int, cap: int) -> None:
    if positions.shape != (batch, cap) or positions.dtype != torch.int32:
        raise ValueError(f"positions must be int32 [{batch}, {cap}], got {positions.dtype} {list(positions.shape)}")


def regrow(cache: PackedCache, capacity: int, used: int, positions: torch.Tensor | None = None) -> PackedCache:
    """A copy of ``cache`` with room for ``capacity`` slots (whole blocks) and its first ``used`` slots copied;
    ``positions``: the grown positions to use (already holding those slots: shared with other layers), or None."""
    cap = round_capacity(capacity)
    fields = _fields(cache)
    if positions is not None:
        _check_positions(positions, cache.batch, cap)
        fields["positions"] = positions
    for name, axis in SLOT_AXIS.items():
        if name == "positions" and positions is not None:
            continue
        old = fields[name]
        shape = list(old.shape)
        shape[axis] = cap
        new = torch.zeros(shape, dtype=old.dtype, device=old.device)
        n = min(used, old.shape[axis], cap)
        new.narrow(axis, 0, n).copy_(old.narrow(axis, 0, n))
        fields[name] = new
    return PackedCache(**fields)


def map_rows(cache: PackedCache, fn, positions: torch.Tensor | None = None) -> PackedCache:
    """``cache`` with a batch-axis operation (beam reorder, select, repeat) applied to every per-row tensor;
    ``positions``: the positions with ``fn`` already applied (shared with other layers), or None to apply it here."""
    per_row = set(SLOT_AXIS) | {"window_keys", "window_values", "sink_keys", "sink_values", "sink_slot"}
    fields = _fields(cache)
    if positions is not None:
        per_row.discard("positions")
        fields["positions"] = positions
    for name in per_row:
        fields[name] = fn(fields[name]).contiguous()
    return PackedCache(**fields)


def _fields(cache: PackedCache) -> dict:
    """The fields of ``cache`` for a new one with new tensors (no arena: the new tensors are not views into it)."""
    return {k: v for k, v in cache.__dict__.items() if k not in ("arena", "arena_spec")}


# ---------------------------------------------------------------------------------------------- one buffer per layer
ARENA_ALIGN = 256  # bytes: every view starts aligned (Triton specializes pointers on 16-byte alignment)
_ARENA_SPECS: list[tuple] = []  # spec id -> ((name, dtype, shape, byte offset, bytes), ...)


def _spec_id(spec: tuple) -> int:
    """A small integer for a layout of views (one per distinct layout: a compiled graph keeps it as a constant)."""
    if spec not in _ARENA_SPECS:
        _ARENA_SPECS.append(spec)
    return _ARENA_SPECS.index(spec)


def arena_views(arena: torch.Tensor, spec_id: int, names=None) -> dict[str, torch.Tensor]:
    """The named tensors that ``arena`` (uint8) holds in the layout ``spec_id`` (views: writes go to the arena);
    ``names``: only those."""
    out = {}
    for name, dtype, shape, offset, size in _ARENA_SPECS[spec_id]:  # every operator call: no work beyond the views
        if names is None or name in names:
            out[name] = arena[offset : offset + size].view(dtype).view(shape)
    return out


def pack_arena(tensors: dict[str, torch.Tensor]) -> tuple[torch.Tensor, int, dict[str, torch.Tensor]]:
    """``tensors`` copied into one uint8 buffer: ``(arena, spec id, views in it by name)``."""
    spec, offset = [], 0
    for name, t in tensors.items():
        size = t.numel() * t.element_size()
        spec.append((name, t.dtype, tuple(t.shape), offset, size))
        offset += -(-size // ARENA_ALIGN) * ARENA_ALIGN
    device = next(iter(tensors.values())).device
    arena = torch.zeros(max(offset, ARENA_ALIGN), dtype=torch.uint8, device=device)
    spec_id = _spec_id(tuple(spec))
    views = arena_views(arena, spec_id)
    for name, t in tensors.items():
        views[name].copy_(t)
    return arena, spec_id, views


ARENA_EXCLUDES = ("positions",)  # a tensor the layers of a cache may share stays out of each layer's buffer


def consolidate(cache: PackedCache) -> PackedCache:
    """``cache`` with every tensor but the positions a view into one buffer (a static cache: its tensors never change
    size); the operators of :mod:`.ops` take the positions beside the buffer."""
    arena, spec_id, views = pack_arena({k: v for k, v in cache.tensors().items() if k not in ARENA_EXCLUDES})
    return PackedCache(**{**_fields(cache), **views}, arena=arena, arena_spec=spec_id)


def nbytes(cache: PackedCache, slots: int) -> dict[str, int]:
    """Bytes by component of ``slots`` stored slots (per-slot tensors counted for those slots only)."""
    out = {}
    for name, t in cache.tensors().items():
        if name in SLOT_AXIS:
            out[name] = t.numel() // t.shape[SLOT_AXIS[name]] * slots * t.element_size()
    out["sink"] = sum(t.numel() * t.element_size() for t in (cache.sink_keys, cache.sink_values, cache.sink_slot))
    if cache.window_keys.numel():
        out["recent_window"] = cache.window_keys.numel() * cache.window_keys.element_size() * 2
    out["length"] = cache.length.numel() * cache.length.element_size()
    return out


@dataclass
class KernelConstants:
    """Per-layer tables of the decode kernel, made once (:func:`kernel_constants`), never per step."""

    block_n: int
    key_tile_channels: torch.Tensor  # [D] int32
    value_tile_channels: torch.Tensor
    offset_cos: torch.Tensor  # [block_n, D/2] fp16: cos(o * inv_freq) for in-block offsets o
    offset_sin: torch.Tensor
    key_lanes: torch.Tensor  # lane_table of the key codebook
    value_lanes: torch.Tensor
    key_table16: torch.Tensor  # [2**bits] fp16 (interpreter path)
    value_table16: torch.Tensor
    inv_freq: torch.Tensor  # [D/2] fp32
    arena: torch.Tensor | None = None  # the buffer the tables are views into (:func:`pack_arena`)
    arena_spec: int | None = None


def block_size(bits: int) -> int:
    """Slots per block of the decode kernel: 64 at every width (with 4 warps; 32- and 128-slot blocks and 8 warps
    were slower on an H200 at 2, 3 and 4 bits: benchmarks/decode_variants.py, docs/kernels.md)."""
    return 64


def kernel_constants(cache: PackedCache, inv_freq: torch.Tensor, block_n: int) -> KernelConstants:
    dev = cache.key_codes.device
    d = cache.head_dim
    angle = torch.arange(block_n, device=dev, dtype=torch.float32)[:, None] * inv_freq.float().to(dev)[None, :]
    tables = dict(
        key_tile_channels=torch.tensor(tile_channels(d, True), device=dev, dtype=torch.int32),
        value_tile_channels=torch.tensor(tile_channels(d, False), device=dev, dtype=torch.int32),
        offset_cos=angle.cos().to(torch.float16).contiguous(),
        offset_sin=angle.sin().to(torch.float16).contiguous(),
        key_lanes=lane_table(cache.key_table).to(dev),
        value_lanes=lane_table(cache.value_table).to(dev),
        key_table16=cache.key_table.to(dev, torch.float16).contiguous(),
        value_table16=cache.value_table.to(dev, torch.float16).contiguous(),
        inv_freq=inv_freq.to(dev).float().contiguous(),
    )
    arena, spec_id, views = pack_arena(tables)
    return KernelConstants(block_n=block_n, **views, arena=arena, arena_spec=spec_id)
