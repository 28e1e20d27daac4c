"""Triton building blocks shared by the attention kernels: code unpacking, codebook lookup, accurate sin/cos."""

from __future__ import annotations

import os

import triton
import triton.language as tl
from triton.language.extra import libdevice

LOG2E = 1.4426950408889634


def fast_trig() -> bool:
    """Hardware sin/cos (``sin.approx``) when compiled; the interpreter has no such op."""
    return os.environ.get("TRITON_INTERPRET") != "1"


@triton.jit
def sincos(angle, FAST: tl.constexpr):
    """cos and sin of fp32 angles of any size: reduce to [-pi, pi] first (2-term Cody-Waite with FMA), then the
    hardware approximations (abs. error ~5e-7 there), instead of libdevice's precise versions whose own reduction
    (with a Payne-Hanek path for large angles) costs tens of instructions per value."""
    k = tl.floor(angle * 0.15915494309189535 + 0.5)
    r = tl.fma(-k, 6.2831854820251465, angle)
    r = tl.fma(-k, -1.7484555314695172e-07, r)
    if FAST:
        return libdevice.fast_cosf(r), libdevice.fast_sinf(r)
    else:
        return tl.cos(r), tl.sin(r)


@triton.jit
def unpack_half(row_ptrs, row_mask, WORD_OFFSET: tl.constexpr, BITS: tl.constexpr, HALF: tl.constexpr, ROWS: tl.constexpr):
    """Codes ``[ROWS, HALF]`` (int32) of the ``HALF`` channels starting at word ``WORD_OFFSET`` of each row.

    ``row_ptrs``: ``[ROWS]`` int32 pointers to word 0 of each packed vector. Words are loaded whole (one load per
    word, not per code) and split with constant shifts; a 3-bit group of 32 codes spans 3 words.
    """
    if BITS == 3:
        NG: tl.constexpr = HALF // 32
        grp = tl.arange(0, NG)
        base = row_ptrs[:, None] + WORD_OFFSET + grp[None, :] * 3
        w0 = tl.load(base, mask=row_mask[:, None], other=0).to(tl.uint32, bitcast=True)[:, :, None]
        w1 = tl.load(base + 1, mask=row_mask[:, None], other=0).to(tl.uint32, bitcast=True)[:, :, None]
        w2 = tl.load(base + 2, mask=row_mask[:, None], other=0).to(tl.uint32, bitcast=True)[:, :, None]
        bit = tl.arange(0, 32) * 3
        word = (bit >> 5)[None, None, :]
        shift = (bit & 31)[None, None, :].to(tl.uint32)
        lo = tl.where(word == 0, w0, tl.where(word == 1, w1, w2))
        nxt = tl.where(word == 0, w1, w2)
        spill = tl.where(shift > 29, nxt << ((32 - shift) & 31), 0)
        codes = ((lo >> shift) | spill) & 7
        return tl.reshape(codes, (ROWS, HALF)).to(tl.int32)
    else:
        CPW: tl.constexpr = 32 // BITS
        NW: tl.constexpr = HALF // CPW
        wi = tl.arange(0, NW)
        w = tl.load(row_ptrs[:, None] + WORD_OFFSET + wi[None, :], mask=row_mask[:, None], other=0)
        w = w.to(tl.uint32, bitcast=True)[:, :, None]
        shift = (tl.arange(0, CPW) * BITS)[None, None, :].to(tl.uint32)
        codes = (w >> shift) & ((1 << BITS) - 1)
        return tl.reshape(codes, (ROWS, HALF)).to(tl.int32)


@triton.jit
def code_at(word_ptrs, channel, mask, BITS: tl.constexpr):
    """The code of ``channel`` in the packed vectors at ``word_ptrs`` (element-wise gather, for sparse outliers)."""
    bit = channel * BITS
    shift = (bit & 31).to(tl.uint32)
    ptr = word_ptrs + (bit >> 5)
    lo = tl.load(ptr, mask=mask, other=0).to(tl.uint32, bitcast=True)
    code = lo >> shift
    if BITS == 3:
        nxt = tl.load(ptr + 1, mask=mask & (shift > 29), other=0).to(tl.uint32, bitcast=True)
        code = code | tl.where(shift > 29, nxt << ((32 - shift) & 31), 0)
    return (code & ((1 << BITS) - 1)).to(tl.int32)
