"""The packed format, owned here: the bit packing of codes and one layer's packed KV cache (:class:`PackedKV`).

Everything that stores or reads codes (the quantization core's store, the kernels and their references) packs and
unpacks them with :func:`pack` / :func:`unpack` and sizes buffers with :func:`packed_words`.

Bit packing: the codes of one vector form a little-endian bit stream; code ``i`` occupies bits ``[b*i, b*i + b)``.
For 2 and 4 bits a word holds 16 or 8 whole codes. For 3 bits, 32 codes fill exactly 3 words and codes 10 and 21
straddle a word boundary (the KVQuant layout). Vectors are zero-padded to a whole group (:func:`group_size`
codes), so any length packs and unpacks exactly.

Cache layout (all tensors on one device; ``B`` rows, ``H`` KV heads, head dim ``D``, ``S`` value-outlier slots per token):

- ``key_codes`` / ``value_codes``: int32 ``[B, H, cap, W]``, ``W = packed_words(D, bits)``; the ``D`` codes of a
  (row, head, slot) form a little-endian bit stream (code ``i`` at bits ``[bits*i, bits*i + bits)``; 3-bit codes
  10 and 21 of every 32 straddle a word boundary).
- keys are pre-RoPE: ``key = key_table[code] * key_scale[h, d] + key_zero[h, d]`` (fp32, ``[H, D]`` ranges);
  values: ``value = value_table[code] * value_scale[b, s] + value_zero[b, s]`` (16-bit ``[B, cap]`` ranges).
- key outliers (every element outside its channel's calibrated range, uncapped): a row-wise CSR over slots.
  ``key_outlier_begin`` int32 ``[B, cap]`` is where slot ``s``'s entries begin in the row's entry buffers
  ``key_entry_values`` (16-bit) / ``key_entry_channels`` (int16, ``c = h*D + d``) ``[B, E]``; they end at the next
  packed slot's begin, the last packed slot's at ``key_nnz[b]`` (int64 ``[B]``). Entries are sorted by slot, then
  channel. The dense code of an outlier element is the saturated nearest centroid.
- value outliers: exactly ``S`` per token, ``value_outlier_values`` 16-bit and ``value_outlier_index`` int16
  ``[B, cap, S]`` (``-1`` = empty).
- An outlier *replaces* the dequantized element.
- ``positions``: int32 ``[B, cap]`` RoPE position of every slot.

A :class:`PackedKV` is a *view* of the slots a query may see: packed slots ``[begin, packed_end)`` at physical
index ``slot - offset`` of the buffers, then the exact recent window (slots ``[packed_end, length)``), and the exact
sink tokens that replace the packed vector of their slot. Slots are numbered relative to ``begin`` inside the
kernels (``0 .. total-1``), which is also the last axis of an attention mask.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch


def on_input_device(launcher):
    """Run ``launcher`` with the current CUDA device set to that of its first (tensor) argument.

    Triton launches on the current device, so without this a layer on ``cuda:1`` (a model split by ``device_map``)
    would be launched on ``cuda:0`` with pointers into the other GPU's memory.
    """

    @functools.wraps(launcher)
    def wrapper(first, *args, **kwargs):
        if first.is_cuda and first.device.index is not None and first.device.index != torch.cuda.current_device():
            with torch.cuda.device(first.device):
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
    """The kernels split a head into its two RoPE halves; each half must hold whole packing groups."""
    return bits in SUPPORTED_BITS and head_dim % 2 == 0 and (head_dim // 2) % group_size(bits) == 0 and _pow2(head_dim // 2)


def _pow2(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


def next_pow2(n: int) -> int:
    return 1 if n <= 1 else 1 << (n - 1).bit_length()


@dataclass
class PackedKV:
    """One layer's cache as the kernels see it (see the module docstring for the layout)."""

    bits: int
    key_codes: torch.Tensor  # [B, H, cap, W] int32
    value_codes: torch.Tensor
    key_table: torch.Tensor  # [2**bits] fp32
    value_table: torch.Tensor
    key_zero: torch.Tensor  # [H, D] fp32
    key_scale: torch.Tensor
    value_zero: torch.Tensor  # [B, cap] 16-bit
    value_scale: torch.Tensor
    key_outlier_begin: torch.Tensor  # [B, cap] int32: first entry of each slot (CSR over slots)
    key_entry_values: torch.Tensor  # [B, E] 16-bit
    key_entry_channels: torch.Tensor  # [B, E] int16 (h * D + d)
    key_nnz: torch.Tensor  # [B] int64: end of the last packed slot's entries
    value_outlier_values: torch.Tensor  # [B, cap, S]
    value_outlier_index: torch.Tensor
    positions: torch.Tensor  # [B, cap] int32
    window_keys: torch.Tensor  # [B, H, n_w, D] exact, slots [packed_end, length)
    window_values: torch.Tensor
    sink_keys: torch.Tensor  # [B, H, N, D] exact
    sink_values: torch.Tensor
    sink_slot: torch.Tensor  # [B, N] absolute slot, -1 = none
    begin: int  # first visible slot
    packed_end: int  # packed slots are [begin, packed_end)
    offset: int = 0  # physical index of slot s is s - offset

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
    def packed_len(self) -> int:
        """Visible packed slots."""
        return max(0, self.packed_end - self.begin)

    @property
    def total(self) -> int:
        """Visible slots: packed then window."""
        return self.packed_len + self.window_keys.shape[2]

    @property
    def outlier_slots(self) -> int:
        """Value-outlier slots per token (keys have a variable count, see :meth:`key_outlier_ranges`)."""
        return self.value_outlier_index.shape[-1]

    @property
    def has_key_outliers(self) -> bool:
        """Whether the key-outlier entry buffers can hold anything (a static hint: no device sync)."""
        return self.key_entry_values.shape[-1] > 0

    def key_outlier_ranges(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(begin, end)`` int64 ``[B, packed_len]``: the entry range of every visible packed slot."""
        a, e = self.begin - self.offset, self.packed_end - self.offset
        starts = self.key_outlier_begin[:, a:e].long()
        ends = torch.cat([starts[:, 1:], self.key_nnz.view(-1, 1).long()], dim=1)
        return starts, ends

    def check(self) -> None:
        b, h, cap, w = self.key_codes.shape
        d = self.head_dim
        if self.bits not in SUPPORTED_BITS:
            raise ValueError(f"bits must be one of {SUPPORTED_BITS}, got {self.bits}")
        if w != packed_words(d, self.bits):
            raise ValueError(f"key_codes has {w} words per vector, expected {packed_words(d, self.bits)} for D={d}")
        if not supported_head_dim(d, self.bits):
            raise ValueError(f"head_dim {d} is not supported by the kernels at {self.bits} bits")
        if self.packed_end - self.offset > cap or self.begin < self.offset:
            raise ValueError("packed slots lie outside the buffers")
        for name in ("key_codes", "value_codes"):
            if not getattr(self, name).is_contiguous():
                raise ValueError(f"{name} must be contiguous (pass the whole buffer and an offset)")
