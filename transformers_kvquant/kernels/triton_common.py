"""Triton building blocks of the kernels that read the packed layout: code words to selectors, the codebook lookup
by byte permutes, accurate sin/cos, tensor-core padding.

The layout (nibble selectors, 3-bit spare bits, RoPE pairs per selector) is described in :mod:`.layout`; these
functions are its reader side and are tested through the kernels against :mod:`.naive`.
"""

from __future__ import annotations

import os

import triton
import triton.language as tl
from triton.language.extra import libdevice

LOG2E = 1.4426950408889634


def interpreting() -> bool:
    """Triton's CPU interpreter: no inline assembly and no hardware sin/cos there."""
    return os.environ.get("TRITON_INTERPRET") == "1"


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


# Two selector halves ($4: nibbles 0-3 of the word, $5: nibbles 4-7) -> four fp16x2 registers:
# $0 = (n0, n1), $1 = (n2, n3), $2 = (n4, n5), $3 = (n6, n7). Table bytes: $6 low bytes of entries 0-3,
# $8 of entries 4-7, $10 high bytes of 0-3, $12 of 4-7 (each input is a pack of 2 registers: odd ones unused).
# One PRMT picks four table bytes by four nibbles: 8 instructions give 8 fp16 centroids.
LUT8 = tl.constexpr("""
{
 .reg .b32 l, h;
 prmt.b32 l, $6, $8, $4;
 prmt.b32 h, $10, $12, $4;
 prmt.b32 $0, l, h, 0x5140;
 prmt.b32 $1, l, h, 0x7362;
 prmt.b32 l, $6, $8, $5;
 prmt.b32 h, $10, $12, $5;
 prmt.b32 $2, l, h, 0x5140;
 prmt.b32 $3, l, h, 0x7362;
}
""")

# 16 entries: a nibble's bit 3 picks entries 8-15 (PRMT's selector bit 3 would mean sign replication, so the
# lookups use the low 3 bits and a second PRMT chooses, byte by byte, between the two 8-entry results).
LUT16 = tl.constexpr("""
{
 .reg .b32 s, m, l, l2, h, h2;
 and.b32 s, $4, 0x7777;
 shr.b32 m, $4, 1;
 and.b32 m, m, 0x4444;
 or.b32 m, m, 0x3210;
 prmt.b32 l, $6, $8, s;
 prmt.b32 l2, $14, $16, s;
 prmt.b32 l, l, l2, m;
 prmt.b32 h, $10, $12, s;
 prmt.b32 h2, $18, $20, s;
 prmt.b32 h, h, h2, m;
 prmt.b32 $0, l, h, 0x5140;
 prmt.b32 $1, l, h, 0x7362;
 and.b32 s, $5, 0x7777;
 shr.b32 m, $5, 1;
 and.b32 m, m, 0x4444;
 or.b32 m, m, 0x3210;
 prmt.b32 l, $6, $8, s;
 prmt.b32 l2, $14, $16, s;
 prmt.b32 l, l, l2, m;
 prmt.b32 h, $10, $12, s;
 prmt.b32 h2, $18, $20, s;
 prmt.b32 h, h, h2, m;
 prmt.b32 $2, l, h, 0x5140;
 prmt.b32 $3, l, h, 0x7362;
}
""")


@triton.jit
def lane_tables(tab_ptr, like, BITS: tl.constexpr, USE_ASM: tl.constexpr):
    """The byte tables of :func:`~.layout.lane_table` in ordinary registers of every lane: loaded at ``%laneid`` (a
    uniform load would keep them in uniform registers, which PRMT cannot read without copies)."""
    if USE_ASM:
        lane = tl.inline_asm_elementwise("mov.u32 $0, %laneid;", "=r,r", [like], dtype=tl.int32, is_pure=True, pack=1)
        TW: tl.constexpr = 8 if BITS == 4 else 4
        p = tab_ptr + lane * TW
        return (tl.load(p), tl.load(p + 1), tl.load(p + 2), tl.load(p + 3),
                tl.load(p + (4 % TW)), tl.load(p + (5 % TW)), tl.load(p + (6 % TW)), tl.load(p + (7 % TW)))
    else:
        return (0, 0, 0, 0, 0, 0, 0, 0)


@triton.jit
def lookup(sel, tab, t16_ptr, BITS: tl.constexpr, USE_ASM: tl.constexpr):
    """Centroids of the 8 nibbles of each selector ``sel`` ``[..., 2]`` (word, word >> 16): four fp16 ``[..., 2]``
    tensors for nibbles (0,1), (2,3), (4,5), (6,7). The interpreter path gathers from the fp16 table instead."""
    if USE_ASM:
        t0, t1, t2, t3, t4, t5, t6, t7 = tab
        if BITS == 4:
            return tl.inline_asm_elementwise(LUT16, "=r,=r,=r,=r,r,r,r,r,r,r,r,r,r,r,r,r,r,r,r,r,r,r", [sel, t0, t1, t2, t3, t4, t5, t6, t7],
                                             dtype=(tl.float16,) * 4, is_pure=True, pack=2)
        else:
            return tl.inline_asm_elementwise(LUT8, "=r,=r,=r,=r,r,r,r,r,r,r,r,r,r,r", [sel, t0, t1, t2, t3],
                                             dtype=(tl.float16,) * 4, is_pure=True, pack=2)
    else:
        s_lo, s_hi = tl.split(sel)
        mask = 15 if BITS == 4 else 7
        o0 = tl.join(tl.load(t16_ptr + (s_lo & mask)), tl.load(t16_ptr + ((s_lo >> 4) & mask)))
        o1 = tl.join(tl.load(t16_ptr + ((s_lo >> 8) & mask)), tl.load(t16_ptr + ((s_lo >> 12) & mask)))
        o2 = tl.join(tl.load(t16_ptr + (s_hi & mask)), tl.load(t16_ptr + ((s_hi >> 4) & mask)))
        o3 = tl.join(tl.load(t16_ptr + ((s_hi >> 8) & mask)), tl.load(t16_ptr + ((s_hi >> 12) & mask)))
        return o0, o1, o2, o3


@triton.jit
def load_words(c_ptr, cap, t0, BITS: tl.constexpr, BN: tl.constexpr, NS: tl.constexpr):
    """The code words of slots ``t0 .. t0 + BN`` of one (row, head) (word ``w`` of slot ``t`` at ``c_ptr + w * cap +
    t``), whole blocks unmasked (capacities are whole blocks; masked loads would not vectorize): the words a, b, c of
    each 32-code group for 3 bits, otherwise the words three times."""
    t = t0 + tl.arange(0, BN)
    if BITS == 3:
        gi = tl.arange(0, NS // 4)
        base = c_ptr + (gi[None, :] * 3) * cap + t[:, None]
        return tl.load(base), tl.load(base + cap), tl.load(base + 2 * cap)
    else:
        wi = tl.arange(0, NS // 2 if BITS == 2 else NS)
        w = tl.load(c_ptr + wi[None, :] * cap + t[:, None])
        return w, w, w


@triton.jit
def load_words_dot(c_ptr, cap, t0, BITS: tl.constexpr, BN: tl.constexpr, NG: tl.constexpr, USE_ASM: tl.constexpr):
    """The code words of slots ``t0 .. t0 + BN`` as :func:`load_words` reads them, but each kind ``[BN, NG, R]``
    (``NG`` 32-code groups, ``R`` words of a group: 1 for 3 bits, of which there are three kinds, 2 for 2 bits, 4 for 4
    bits) and loaded so that a thread holds one group of two slots eight apart: the tensor-core A-operand layout of a
    64-slot block with 4 warps (``NG = 4``), so the decoded key tile feeds the dot from registers, with no
    shared-memory round trip. The loads are shaped ``[NG, 8, BN // 8, R]`` with their contiguity hidden from the
    compiler (which would otherwise vectorize along the slots, the other layout); element ``(g, sl, sh, r)`` is slot
    ``sl + 8 (sh >> 2) + 16 (sh & 3)``, which is its row after :func:`_rows`, so rows are slots."""
    gg = tl.arange(0, NG)[:, None, None, None]
    sl = tl.arange(0, 8)[None, :, None, None]
    sh = tl.arange(0, BN // 8)[None, None, :, None]
    R: tl.constexpr = 4 if BITS == 4 else (2 if BITS == 2 else 1)
    rr = tl.arange(0, R)[None, None, None, :]
    step: tl.constexpr = 3 if BITS == 3 else R  # words per group
    off = (gg * step + rr) * cap + t0 + sl + 8 * (sh >> 2) + 16 * (sh & 3)
    if USE_ASM:
        off = tl.inline_asm_elementwise("mov.b32 $0, $1;", "=r,r", [off], dtype=tl.int32, is_pure=True, pack=1)
    wa = _rows(tl.load(c_ptr + off), BN, NG, R)
    if BITS == 3:
        return wa, _rows(tl.load(c_ptr + off + cap), BN, NG, R), _rows(tl.load(c_ptr + off + 2 * cap), BN, NG, R)
    else:
        return wa, wa, wa


@triton.jit
def _rows(w, BN: tl.constexpr, NG: tl.constexpr, R: tl.constexpr):
    """``[NG, 8, BN // 8, R]`` -> ``[BN, NG, R]``, row ``sl + 8 (sh >> 2) + 16 (sh & 3)`` (``BN = 64``)."""
    w = tl.reshape(w, (NG, 8, 2, BN // 16, R))
    return tl.reshape(tl.permute(w, (3, 2, 1, 0, 4)), (BN, NG, R))


@triton.jit
def selectors_dot(words, BITS: tl.constexpr, BN: tl.constexpr, NG: tl.constexpr):
    """:func:`selectors` of :func:`load_words_dot`'s words: ``[BN, NG, 4, 2]``, selector ``4 g + s`` as there."""
    wa, wb, wc = words
    if BITS == 3:
        wa = tl.reshape(wa, (BN, NG))
        wb = tl.reshape(wb, (BN, NG))
        wc = tl.reshape(wc, (BN, NG))
        sp = ((wa >> 3) & 0x11111111) | ((wb >> 2) & 0x22222222) | ((wc >> 1) & 0x44444444)
        s = tl.reshape(tl.join(tl.join(wa & 0x77777777, wc & 0x77777777), tl.join(wb & 0x77777777, sp)), (BN, NG, 4))
    elif BITS == 2:
        s = tl.reshape(tl.join(wa & 0x33333333, (wa >> 2) & 0x33333333), (BN, NG, 4))
    else:
        s = wa
    return tl.join(s, (s >> 16) & 0xFFFF)


@triton.jit
def tile_dot(x0, x1, x2, x3, BN: tl.constexpr, D: tl.constexpr):
    """The four lookup results ``[BN, NG, 4, 2]`` of :func:`selectors_dot` as one ``[BN, D]`` tile whose column
    ``z + 2 g + 8 k + 32 s`` is nibble ``2 k + z`` of selector ``4 g + s`` (:func:`dot_position` maps it to
    :func:`tile`'s position): each thread's values already sit where the tensor-core A operand wants them."""
    t = tl.join(tl.join(x0, x1), tl.join(x2, x3))  # [BN, NG, S, Z, KLO, KHI]
    return tl.reshape(tl.permute(t, (0, 2, 5, 4, 1, 3)), (BN, D))


@triton.jit
def dot_position(c):
    """The :func:`tile` position of :func:`tile_dot`'s column ``c`` (the same selector and nibble)."""
    w = 4 * ((c >> 1) & 3) + (c >> 5)
    k = (c >> 3) & 3
    return 8 * w + 4 * (k & 1) + 2 * (k >> 1) + (c & 1)


@triton.jit
def selectors(words, BITS: tl.constexpr, BN: tl.constexpr, NS: tl.constexpr):
    """Selector pairs ``[BN, NS, 2]`` (word, word >> 16) whose nibbles are the codes (see the layout)."""
    wa, wb, wc = words
    if BITS == 3:
        sp = ((wa >> 3) & 0x11111111) | ((wb >> 2) & 0x22222222) | ((wc >> 1) & 0x44444444)
        s = tl.reshape(tl.join(tl.join(wa & 0x77777777, wc & 0x77777777), tl.join(wb & 0x77777777, sp)), (BN, NS))
    elif BITS == 2:
        s = tl.reshape(tl.join(wa & 0x33333333, (wa >> 2) & 0x33333333), (BN, NS))
    else:
        s = wa
    return tl.join(s, (s >> 16) & 0xFFFF)


@triton.jit
def tile(x0, x1, x2, x3, BN: tl.constexpr, D: tl.constexpr):
    """The four lookup results ``[BN, NS, 2]`` as one ``[BN, D]`` tile in position order ``8w + 4y + 2x + z``."""
    return tl.reshape(tl.permute(tl.join(tl.join(x0, x1), tl.join(x2, x3)), (0, 1, 3, 4, 2)), (BN, D))


@triton.jit
def pad16(x, GR: tl.constexpr, BN: tl.constexpr):
    """``[BN, GR]`` -> ``[BN, 16]``: column ``g * (16 // GR)`` holds ``x[:, g]``, the others are zero (the N side of a
    tensor-core dot is at least 16 wide)."""
    y = x
    if GR < 16:
        y = tl.reshape(tl.join(y, tl.zeros_like(y)), (BN, 2 * GR))
    if 2 * GR < 16:
        y = tl.reshape(tl.join(y, tl.zeros_like(y)), (BN, 4 * GR))
    if 4 * GR < 16:
        y = tl.reshape(tl.join(y, tl.zeros_like(y)), (BN, 8 * GR))
    if 8 * GR < 16:
        y = tl.reshape(tl.join(y, tl.zeros_like(y)), (BN, 16 * GR))
    return y


@triton.jit
def pad_rows16(x, M: tl.constexpr, K: tl.constexpr):
    """``[M, K]`` -> ``[max(M, 16), K]``: row ``r`` moves to ``r * (16 // M)``, the others are zero."""
    if M >= 16:
        return x
    else:
        return tl.trans(pad16(tl.trans(x), M, K))
