"""Bit packing of 2/3/4-bit codes into int32 words along the last dimension.

Layout: the codes of one vector form a little-endian bit stream; code ``i`` occupies bits ``[b*i, b*i + b)``.
For 2 and 4 bits a word holds 16 or 8 whole codes. For 3 bits, 32 codes fill exactly 3 words and codes 10 and
21 straddle a word boundary (the KVQuant layout). Vectors are zero-padded to a whole group
(:func:`group_size` codes), so any length packs and unpacks exactly.
"""

from __future__ import annotations

import torch

SUPPORTED_BITS = (2, 3, 4)


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
    c = c.reshape(*lead, -1, g)
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
    out = out.reshape(*lead, -1)
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
        w = w.reshape(*lead, -1, 3)
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
    codes = codes.reshape(*lead, -1)[..., :num_codes]
    return codes.to(torch.uint8)


def _check_bits(bits: int) -> None:
    if bits not in SUPPORTED_BITS:
        raise ValueError(f"bits must be one of {SUPPORTED_BITS} (got {bits}); use bits=16 for an unquantized cache")
