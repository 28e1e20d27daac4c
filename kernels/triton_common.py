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


@triton.jit
def group_codes(word_ptrs, mask, BITS: tl.constexpr, MASKED: tl.constexpr = True):
    """Codes ``[32, N]`` (int32, code index first) of the 32-code groups whose ``BITS`` words start at ``word_ptrs``
    ``[N]``.

    A group of 32 codes is exactly ``BITS`` words at every width (3-bit codes 10 and 21 straddle words). The code
    index is the *leading* axis so that Triton's default layouts put the ``N`` groups on the lanes and keep a whole
    group in one thread: the word choice and shift of every code are then compile-time constants (no selects) and
    sums over codes need no shuffles. ``MASKED=False`` leaves the bits above each code in place (only the low
    ``BITS`` bits are the code): :func:`lane_table_lookup` ignores them.
    """
    i = tl.arange(0, 32)
    bit = i * BITS
    widx = (bit >> 5)[:, None]
    shift = (bit & 31)[:, None].to(tl.uint32)
    w0 = tl.load(word_ptrs, mask=mask, other=0).to(tl.uint32, bitcast=True)[None, :]
    w1 = tl.load(word_ptrs + 1, mask=mask, other=0).to(tl.uint32, bitcast=True)[None, :]
    if BITS == 2:
        codes = tl.where(widx == 0, w0, w1) >> shift
    elif BITS == 3:
        w2 = tl.load(word_ptrs + 2, mask=mask, other=0).to(tl.uint32, bitcast=True)[None, :]
        lo = tl.where(widx == 0, w0, tl.where(widx == 1, w1, w2))
        nxt = tl.where(widx == 0, w1, w2)
        spill = tl.where(shift > 29, nxt << ((32 - shift) & 31), 0)
        codes = (lo >> shift) | spill
    else:
        w2 = tl.load(word_ptrs + 2, mask=mask, other=0).to(tl.uint32, bitcast=True)[None, :]
        w3 = tl.load(word_ptrs + 3, mask=mask, other=0).to(tl.uint32, bitcast=True)[None, :]
        lo = tl.where(widx < 2, tl.where(widx == 0, w0, w1), tl.where(widx == 2, w2, w3))
        codes = lo >> shift
    if MASKED:
        codes = codes & ((1 << BITS) - 1)
    return codes.to(tl.int32)


@triton.jit
def chunk_codes(word_ptrs, chunk, mask, BITS: tl.constexpr, MASKED: tl.constexpr = True):
    """Codes ``[16, N]`` (int32, code index first) of 16-code chunk ``chunk`` ``[N]`` of the packed vectors whose
    words start at ``word_ptrs`` ``[N]``.

    Like :func:`group_codes` (a thread decodes its whole chunk with compile-time shifts), for half a 32-code group:
    16 codes are one word at 2 bits, two at 4 bits, and 48 bits at 3 bits, where an odd chunk starts at bit 16 of
    its group's second word: it is realigned once (two funnel-style shifts) so that every code's shift is constant.
    ``MASKED=False`` leaves the bits above each code in place (see :func:`lane_table_lookup`).
    """
    i = tl.arange(0, 16)[:, None]
    if BITS == 2:
        w = tl.load(word_ptrs + chunk, mask=mask, other=0).to(tl.uint32, bitcast=True)[None, :]
        codes = w >> (i * 2).to(tl.uint32)
    elif BITS == 4:
        w0 = tl.load(word_ptrs + chunk * 2, mask=mask, other=0).to(tl.uint32, bitcast=True)[None, :]
        w1 = tl.load(word_ptrs + chunk * 2 + 1, mask=mask, other=0).to(tl.uint32, bitcast=True)[None, :]
        codes = tl.where(i < 8, w0, w1) >> ((i * 4) & 31).to(tl.uint32)
    else:
        odd = (chunk % 2) == 1
        p = word_ptrs + (chunk // 2) * 3 + (chunk % 2)
        wa = tl.load(p, mask=mask, other=0).to(tl.uint32, bitcast=True)
        wb = tl.load(p + 1, mask=mask, other=0).to(tl.uint32, bitcast=True)
        lo = tl.where(odd, (wa >> 16) | (wb << 16), wa)[None, :]  # bits 0..31 of the chunk
        hi = tl.where(odd, wb >> 16, wb)[None, :]  # bits 32..47
        bit = i * 3
        codes = tl.where(bit < 32, lo >> (bit & 31).to(tl.uint32), hi >> ((bit - 32) & 31).to(tl.uint32))
        codes = tl.where(bit == 30, codes | (hi << 2), codes)  # code 10 straddles the two words
    if MASKED:
        codes = codes & ((1 << BITS) - 1)
    return codes.to(tl.int32)


def shuffle_lookup() -> bool:
    """Codebook lookups through warp shuffles (compiled only: the interpreter has no inline assembly).
    ``KVQUANT_SHUFFLE_LOOKUP=0`` turns them off (table loads instead)."""
    return fast_trig() and os.environ.get("KVQUANT_SHUFFLE_LOOKUP", "1") != "0"


@triton.jit
def lane_table(table_ptr, like, BITS: tl.constexpr):
    """Each thread's entry of a codebook spread over the lanes: lane ``l`` holds ``table[l % 2**BITS]`` (fp32 bits
    as int32), shaped like ``like`` (e.g. ``[1, N]``); computed once, outside the loops."""
    lane = tl.inline_asm_elementwise("mov.u32 $0, %laneid;", "=r,r", [like], dtype=tl.int32, is_pure=True, pack=1)
    return tl.load(table_ptr + (lane & ((1 << BITS) - 1))).to(tl.int32, bitcast=True)


@triton.jit
def lane_table_lookup(lane_values, codes):
    """``table[code]`` (fp32) by one warp shuffle per element: ``shfl.idx`` reads lane ``code & 31``, which holds
    ``table[code % 2**BITS]`` (:func:`lane_table`), so bits above the code need no masking and no address is formed.
    Every lane of the warp must execute it (the kernels' loops are uniform)."""
    got = tl.inline_asm_elementwise("shfl.sync.idx.b32 $0, $1, $2, 0x1f, 0xffffffff;", "=r,r,r", [lane_values, codes],
                                    dtype=tl.int32, is_pure=True, pack=1)
    return got.to(tl.float32, bitcast=True)
