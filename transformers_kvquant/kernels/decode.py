"""Decode attention over the packed cache: one query per row.

Three launches, fixed shapes whatever the length (the length is read on the device, so a CUDA graph replays them):

1. ``_decode_packed_kernel``, a grid of (split, row x KV head): the packed slots of each split, in two passes. Pass 1
   decodes each block of keys (byte-permute codebook lookup, per-channel scale and zero in fp16), rotates them by a
   fixed table of in-block offsets while the query is rotated once per block to the block's base position, and
   scores the G query heads of the KV head in one tensor-core dot; key outliers enter as score corrections. Pass 2
   takes ``p = exp2(s - max)`` with the split's final max, folds the per-token value scale into ``p`` and the zero
   point into a running sum, and accumulates ``V^T p`` in one dot; value outliers are added in the same loop, with
   atomics. What a block needs first is loaded a block ahead; the split count fills one wave of programs.
2. ``_decode_exact_kernel``: the recent-window ring and the sink tokens, exact.
3. ``_combine_kernel``: merges the partial softmaxes.

The PyTorch reference is :func:`~.naive.decode_reference`.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from .layout import KernelConstants, PackedCache, on_input_device
from .triton_common import (
    dot_position,
    interpreting,
    lane_tables,
    load_words,
    load_words_dot,
    lookup,
    pad16,
    selectors,
    selectors_dot,
    sincos,
    tile,
    tile_dot,
)


@triton.jit
def _key_words(kc_row, cap, t0, BITS: tl.constexpr, BN: tl.constexpr, D: tl.constexpr, DOT_A: tl.constexpr, USE_ASM: tl.constexpr):
    """A block's key code words, for the tile :func:`_key_tile` builds."""
    if DOT_A:
        return load_words_dot(kc_row, cap, t0, BITS, BN, D // 32, USE_ASM)
    else:
        return load_words(kc_row, cap, t0, BITS, BN, D // 8)


@triton.jit
def _key_tile(kw, tab, t16_ptr, s_lo_a, z_lo_a, s_hi_a, z_hi_a, s_lo_b, z_lo_b, s_hi_b, z_hi_b, oca, osa, ocb, osb,
              BITS: tl.constexpr, BN: tl.constexpr, D: tl.constexpr, DOT_A: tl.constexpr, USE_ASM: tl.constexpr):
    """The ``[BN, D]`` fp16 key tile of a block: codebook lookup, per-channel scale and zero, rotation by the in-block
    offsets; in the tensor-core operand's layout with ``DOT_A`` (columns as :func:`dot_position` maps them)."""
    if DOT_A:
        sel = selectors_dot(kw, BITS, BN, D // 32)
    else:
        sel = selectors(kw, BITS, BN, D // 8)
    lo_a, hi_a, lo_b, hi_b = lookup(sel, tab, t16_ptr, BITS, USE_ASM)
    k_lo_a = lo_a * s_lo_a + z_lo_a
    k_hi_a = hi_a * s_hi_a + z_hi_a
    k_lo_b = lo_b * s_lo_b + z_lo_b
    k_hi_b = hi_b * s_hi_b + z_hi_b
    r_lo_a = k_lo_a * oca - k_hi_a * osa
    r_hi_a = k_hi_a * oca + k_lo_a * osa
    r_lo_b = k_lo_b * ocb - k_hi_b * osb
    r_hi_b = k_hi_b * ocb + k_lo_b * osb
    if DOT_A:
        return tile_dot(r_lo_a, r_hi_a, r_lo_b, r_hi_b, BN, D)
    else:
        return tile(r_lo_a, r_hi_a, r_lo_b, r_hi_b, BN, D)


@triton.jit
def _outlier_query(idx, theta_ptr, qbase, gq, greal, D: tl.constexpr, HALF: tl.constexpr):
    """What a key outlier's score correction reads at its channel (``idx`` ``[BN, SP]``, pre-RoPE channels): the
    RoPE frequency ``[BN, SP]`` and the G query heads' components of the pair, low and high ``[BN, SP, GR]``."""
    j = idx.to(tl.int32) % HALF
    th = tl.load(theta_ptr + j)
    ql = tl.load(qbase + gq * D + j[:, :, None], mask=greal[None, None, :], other=0.0)
    qh = tl.load(qbase + gq * D + HALF + j[:, :, None], mask=greal[None, None, :], other=0.0)
    return th, ql, qh


@triton.jit
def _decode_packed_kernel(
    qrot_ptr, pchan_ptr, vchan_ptr, theta_ptr, offc_ptr, offs_ptr,
    kc_ptr, vc_ptr, ktab_ptr, vtab_ptr, kt16_ptr, vt16_ptr, kz_ptr, ks_ptr, vz_ptr, vs_ptr,
    kov_ptr, koi_ptr, vov_ptr, voi_ptr, pos_ptr, len_ptr, mask_ptr, sink_ptr,
    part_m_ptr, part_l_ptr, part_o_ptr, uscr_ptr,
    H, cap, m_sb, max_split_blocks, n_splits, n_window, window,
    G: tl.constexpr, GR: tl.constexpr, D: tl.constexpr, BITS: tl.constexpr, S: tl.constexpr, SP: tl.constexpr, N_SINK: tl.constexpr,
    BN: tl.constexpr, MASK_KIND: tl.constexpr, USE_ASM: tl.constexpr, FAST: tl.constexpr, SLOW_PATH: tl.constexpr = True,
    PF: tl.constexpr = 1, PFV: tl.constexpr = 1, DOT_A: tl.constexpr = False, KQA: tl.constexpr = False,
):
    split = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    HALF: tl.constexpr = D // 2
    NS: tl.constexpr = D // 8
    W: tl.constexpr = D * BITS // 32
    HQ = H * G
    length = tl.sum(tl.load(len_ptr + tl.arange(0, 1)), 0)
    packed_end = tl.maximum(length - n_window, 0)
    # the splits share the written blocks (the length is a device value: the grid covers the capacity)
    split_blocks = tl.cdiv(tl.cdiv(packed_end, BN), n_splits - 1)
    lo = split * (split_blocks * BN)
    hi = tl.minimum(lo + split_blocks * BN, packed_end)
    part = (bh * n_splits + split) * GR
    gr = tl.arange(0, GR)
    n = tl.arange(0, BN)
    dd = tl.arange(0, D)
    greal = gr < G
    # ---- per program constants
    if DOT_A:  # keys decoded straight into the tensor-core operand (load_words_dot): the tile's columns are permuted
        pchan = tl.load(pchan_ptr + dot_position(dd))
    else:
        pchan = tl.load(pchan_ptr + dd)  # channel of each tile position
    pj = pchan % HALF
    py = pchan >= HALF
    # the frequencies as [GR, D], like the query: the per-block rotation of the query then needs no layout change
    ptheta = tl.load(theta_ptr + tl.broadcast_to(pj[None, :], (GR, D)))
    py = tl.broadcast_to(py[None, :], (GR, D))
    qbase = qrot_ptr + (b * HQ + h * G) * D
    q_lo = tl.load(qbase + gr[:, None] * D + pj[None, :], mask=greal[:, None], other=0.0)  # [GR, D] position order
    q_hi = tl.load(qbase + gr[:, None] * D + HALF + pj[None, :], mask=greal[:, None], other=0.0)
    # RoPE pairs of selector w: a = pairs 4w + z, b = pairs 4w + 2 + z
    NG: tl.constexpr = D // 32
    if DOT_A:  # [slot, group, selector of the group, z]
        ws = (tl.arange(0, NG)[:, None] * 4 + tl.arange(0, 4)[None, :])[None, :, :, None]
        zz = tl.arange(0, 2)[None, None, None, :]
    else:  # [slot, selector, z]
        ws = tl.arange(0, NS)[None, :, None]
        zz = tl.arange(0, 2)[None, None, :]
    ja = ws * 4 + zz
    jb = ja + 2
    kzb = kz_ptr + h * D
    ksb = ks_ptr + h * D
    s_lo_a = tl.load(ksb + ja).to(tl.float16); s_hi_a = tl.load(ksb + HALF + ja).to(tl.float16)
    s_lo_b = tl.load(ksb + jb).to(tl.float16); s_hi_b = tl.load(ksb + HALF + jb).to(tl.float16)
    z_lo_a = tl.load(kzb + ja).to(tl.float16); z_hi_a = tl.load(kzb + HALF + ja).to(tl.float16)
    z_lo_b = tl.load(kzb + jb).to(tl.float16); z_hi_b = tl.load(kzb + HALF + jb).to(tl.float16)
    if DOT_A:
        nn = n[:, None, None, None]
    else:
        nn = n[:, None, None]
    oca = tl.load(offc_ptr + nn * HALF + ja); osa = tl.load(offs_ptr + nn * HALF + ja)  # fp16 [BN, NS, 2]
    ocb = tl.load(offc_ptr + nn * HALF + jb); osb = tl.load(offs_ptr + nn * HALF + jb)
    if DOT_A:
        kt = lane_tables(ktab_ptr, tl.zeros((BN, NG, 4, 2), tl.int32), BITS, USE_ASM)
    else:
        kt = lane_tables(ktab_ptr, tl.zeros((BN, NS, 2), tl.int32), BITS, USE_ASM)
    like = tl.zeros((BN, NS, 2), tl.int32)
    ns = tl.arange(0, max(4, N_SINK))
    sinks = tl.load(sink_ptr + b * N_SINK + ns, mask=ns < N_SINK, other=-1)
    kc_row = kc_ptr + bh.to(tl.int64) * W * cap
    vc_row = vc_ptr + bh.to(tl.int64) * W * cap
    sbase = uscr_ptr + (bh * n_splits + split).to(tl.int64) * (max_split_blocks * BN) * GR  # per-program score scratch
    # ---------------------------------------------------------------- pass 1: keys -> raw scores (scratch)
    # Two passes instead of an online softmax: the key pass keeps a per-lane running max (no cross-warp reduction per
    # block), the value pass uses the final max (no rescaling), and each pass holds only its own working set.
    m_lane = tl.full((BN, GR), float("-inf"), tl.float32)
    last = cap - BN  # the next block's prefetch never reads past the buffers
    kw_next = _key_words(kc_row, cap, tl.minimum(lo, last), BITS, BN, D, DOT_A, USE_ASM)
    kw_next2 = _key_words(kc_row, cap, tl.minimum(lo + BN, last), BITS, BN, D, DOT_A, USE_ASM)  # PF = 2: two blocks in flight
    pos_next = tl.load(pos_ptr + b * cap + lo + n, mask=lo + n < hi, other=0)
    ee = tl.arange(0, SP)[None, :]
    if S > 0:
        koi_next = tl.load(koi_ptr + (bh * S + ee) * cap + (lo + n)[:, None], mask=((lo + n) < hi)[:, None] & (ee < S), other=0)
        kov_next = tl.load(kov_ptr + (bh * S + ee) * cap + (lo + n)[:, None], mask=((lo + n) < hi)[:, None] & (ee < S), other=0.0)
    gq = gr[None, None, :]
    if S > 0 and KQA:  # the query components at the outliers' channels gathered a block ahead (see the end of the loop)
        th_next, ql_next, qh_next = _outlier_query(koi_next, theta_ptr, qbase, gq, greal, D, HALF)
    else:  # never read: Triton 3.9 wants every name the loop assigns (even in a pruned branch) defined before it
        th_next = tl.zeros((BN, SP), tl.float32)
        ql_next = tl.zeros((BN, SP, GR), tl.float32)
        qh_next = ql_next
    if MASK_KIND != 0:  # the attention mask by slot (a compiled static cache always has one), a block ahead too
        mk_next = tl.load(mask_ptr + b * m_sb + lo + n, mask=lo + n < hi, other=0)
    # the block's RoPE base is taken from its last written slot (a scalar load, no reduction across the block)
    t_last_next = tl.maximum(tl.minimum(lo + BN, hi) - 1, 0)
    base_next = tl.load(pos_ptr + b * cap + t_last_next) - (t_last_next - lo)
    for t0 in range(lo, hi, BN):
        # software prefetch: this iteration's words and positions were loaded during the previous one (every load
        # the block needs first is in flight a whole iteration ahead: the loop is latency-bound, not issue-bound)
        kw = kw_next
        if PF == 2:
            kw_next = kw_next2
            kw_next2 = _key_words(kc_row, cap, tl.minimum(t0 + 2 * BN, last), BITS, BN, D, DOT_A, USE_ASM)
        else:
            kw_next = _key_words(kc_row, cap, tl.minimum(t0 + BN, last), BITS, BN, D, DOT_A, USE_ASM)
        pos = pos_next
        pos_next = tl.load(pos_ptr + b * cap + t0 + BN + n, mask=t0 + BN + n < hi, other=0)
        if S > 0:
            koi = koi_next
            kov = kov_next
            em_next = ((t0 + BN + n) < hi)[:, None] & (ee < S)
            koi_next = tl.load(koi_ptr + (bh * S + ee) * cap + (t0 + BN + n)[:, None], mask=em_next, other=0)
            kov_next = tl.load(kov_ptr + (bh * S + ee) * cap + (t0 + BN + n)[:, None], mask=em_next, other=0.0)
        if MASK_KIND != 0:
            mk = mk_next
            mk_next = tl.load(mask_ptr + b * m_sb + t0 + BN + n, mask=t0 + BN + n < hi, other=0)
        base = base_next
        t_last_next = tl.minimum(t0 + 2 * BN, hi) - 1
        base_next = tl.load(pos_ptr + b * cap + t_last_next) - (t_last_next - (t0 + BN))
        t = t0 + n
        live = t < hi
        allowed = live & (t >= length - window)
        for i in tl.static_range(N_SINK):
            allowed = allowed & (t != tl.sum(tl.where(ns == i, sinks, 0)))
        if MASK_KIND == 1:
            allowed = allowed & (mk != 0)
        bias = tl.where(allowed, 0.0, float("-inf"))
        if MASK_KIND == 2:
            bias = bias + tl.maximum(mk.to(tl.float32), -1e30) * 1.4426950408889634
        # RoPE: the keys are rotated by a fixed table of in-block offsets n and the query once per block to the base,
        # so a slot's score is right when its position is base + n: always, unless positions jump inside the block
        # (a slot whose rel = pos - n differs from the base is scored again below with its own base)
        rel = pos - n
        cq, sq = sincos(base.to(tl.float32) * ptheta, FAST)
        u = tl.where(py, q_hi * cq - q_lo * sq, q_lo * cq + q_hi * sq)  # [GR, D]
        uT = pad16(tl.trans(u), GR, D).to(tl.float16)  # [D, 16]
        kr = _key_tile(kw, kt, kt16_ptr, s_lo_a, z_lo_a, s_hi_a, z_hi_a, s_lo_b, z_lo_b, s_hi_b, z_hi_b, oca, osa, ocb, osb,
                       BITS, BN, D, DOT_A, USE_ASM)
        sacc = tl.zeros((BN, 16), tl.float32)
        if S > 0:
            # key outliers as score corrections: a residual r at channel j of the pre-RoPE key adds r times the
            # query's component there rotated to the slot's position (one sin/cos per item, none per element); fed to
            # the dot as its accumulator
            idx = koi.to(tl.int32)  # [BN, SP], loaded a block ahead (masked slots: residual 0)
            res = kov.to(tl.float32)
            hh = idx >= HALF
            if KQA:
                th = th_next
                ql = ql_next
                qh = qh_next
            else:
                th, ql, qh = _outlier_query(idx, theta_ptr, qbase, gq, greal, D, HALF)
            c1, s1 = sincos(pos.to(tl.float32)[:, None] * th, FAST)
            c3 = c1[:, :, None]
            s3 = s1[:, :, None]
            sacc = pad16(tl.sum(res[:, :, None] * tl.where(hh[:, :, None], qh * c3 - ql * s3, ql * c3 + qh * s3), 1), GR, BN)
        sT = tl.dot(kr, uT, sacc)  # [BN, 16]
        sR = tl.sum(tl.reshape(sT, (BN, GR, 16 // GR)), 2)
        if SLOW_PATH:
            # positions that jump inside the block (custom position ids): one more query rotation and dot per
            # distinct base among the attended slots, never per-slot angles (their tables would cost registers in
            # every block for a case that is rare)
            pending = allowed & (rel != base)
            n_pending = tl.sum(pending.to(tl.int32))
            while n_pending > 0:
                base2 = tl.max(tl.where(pending, rel, -2147483647))
                cq2, sq2 = sincos(base2.to(tl.float32) * ptheta, FAST)
                u2 = tl.where(py, q_hi * cq2 - q_lo * sq2, q_lo * cq2 + q_hi * sq2)
                s2 = tl.sum(tl.reshape(tl.dot(kr, pad16(tl.trans(u2), GR, D).to(tl.float16), sacc), (BN, GR, 16 // GR)), 2)
                hit = pending & (rel == base2)
                sR = tl.where(hit[:, None], s2, sR)
                pending = pending & (rel != base2)
                n_pending = tl.sum(pending.to(tl.int32))
        sR = sR + bias[:, None]
        tl.store(sbase + (t - lo)[:, None] * GR + gr[None, :], sR)
        m_lane = tl.maximum(m_lane, sR)
        if S > 0:
            if KQA:
                # the next block's gathers, issued once its indices (loaded at this iteration's start) have had the
                # whole block to arrive: with GQA the gather loaded and used in one iteration was the key loop's
                # hottest stall (Nsight Compute, docs/kernels.md)
                th_next, ql_next, qh_next = _outlier_query(koi_next, theta_ptr, qbase, gq, greal, D, HALF)
    m_i = tl.max(m_lane, 0)
    m_safe = tl.where(m_i == float("-inf"), 0.0, m_i)
    tl.debug_barrier()
    # ---------------------------------------------------------------- pass 2: values with the final max
    vt = lane_tables(vtab_ptr, like, BITS, USE_ASM)  # loaded here: nothing of pass 2 is live during pass 1
    l_acc = tl.zeros((BN, GR), tl.float32)
    z_acc = tl.zeros((BN, GR), tl.float32)
    acc = tl.zeros((D, 16), tl.float32)
    vw_next = load_words(vc_row, cap, tl.minimum(lo, last), BITS, BN, NS)
    vw_next2 = load_words(vc_row, cap, tl.minimum(lo + BN, last), BITS, BN, NS)
    sc_next = tl.load(sbase + n[:, None] * GR + gr[None, :], mask=(lo + n < hi)[:, None], other=float("-inf"))
    vs_next = tl.load(vs_ptr + b * cap + lo + n, mask=lo + n < hi, other=0.0)
    vz_next = tl.load(vz_ptr + b * cap + lo + n, mask=lo + n < hi, other=0.0)
    e3 = tl.arange(0, SP)[None, :, None]
    g3 = gr[None, None, :]
    if S > 0:
        voi_next = tl.load(voi_ptr + (bh * S + e3) * cap + (lo + n)[:, None, None], mask=((lo + n) < hi)[:, None, None] & (e3 < S), other=0)
        vov_next = tl.load(vov_ptr + (bh * S + e3) * cap + (lo + n)[:, None, None], mask=((lo + n) < hi)[:, None, None] & (e3 < S), other=0.0)
    for t0 in range(lo, hi, BN):
        vw = vw_next
        if PFV == 2:
            # two blocks in flight: the words loaded here are first read a whole iteration later (with one, the copy
            # into the loop-carried registers at the iteration's end waits on them: the value loop's largest stall in
            # Nsight Compute; taking it away did not make the loop faster, docs/kernels.md)
            vw_next = vw_next2
            vw_next2 = load_words(vc_row, cap, tl.minimum(t0 + 2 * BN, last), BITS, BN, NS)
        else:
            vw_next = load_words(vc_row, cap, tl.minimum(t0 + BN, last), BITS, BN, NS)
        tn = t0 + n + BN  # the next block's slots
        sc = sc_next
        vsc = vs_next.to(tl.float32)
        vzr = vz_next.to(tl.float32)
        sc_next = tl.load(sbase + (tn - lo)[:, None] * GR + gr[None, :], mask=(tn < hi)[:, None], other=float("-inf"))
        vs_next = tl.load(vs_ptr + b * cap + tn, mask=tn < hi, other=0.0)
        vz_next = tl.load(vz_ptr + b * cap + tn, mask=tn < hi, other=0.0)
        pR = tl.exp2(sc - m_safe[None, :])  # [BN, GR]
        if S > 0:
            # value outliers: each adds p[t, g] * residual at its channel of the partial output. Few (S per token and
            # head), so fire-and-forget atomic adds (the partial starts at zero) cost far less than any per-element
            # work in the dense dot; their indices and residuals were loaded a block ahead.
            vidx = voi_next.to(tl.int32)  # [BN, SP, 1]
            vres = vov_next.to(tl.float32)
            em3 = (tn < hi)[:, None, None] & (e3 < S)
            voi_next = tl.load(voi_ptr + (bh * S + e3) * cap + tn[:, None, None], mask=em3, other=0)
            vov_next = tl.load(vov_ptr + (bh * S + e3) * cap + tn[:, None, None], mask=em3, other=0.0)
            tl.atomic_add(part_o_ptr + (part + g3) * D + vidx, pR[:, None, :] * vres, mask=(vres != 0.0) & (g3 < G), sem="relaxed")
        l_acc += pR
        z_acc += pR * vzr[:, None]
        pv = pad16((pR * vsc[:, None]).to(tl.float16), GR, BN)  # [BN, 16]
        vsel = selectors(vw, BITS, BN, NS)
        v0, v1, v2, v3 = lookup(vsel, vt, vt16_ptr, BITS, USE_ASM)
        v = tile(v0, v1, v2, v3, BN, D)
        acc = tl.dot(tl.trans(v), pv, acc)
    l_i = tl.sum(l_acc, 0)
    zs = tl.sum(z_acc, 0)
    tl.store(part_m_ptr + part + gr, m_i)
    tl.store(part_l_ptr + part + gr, l_i)
    # acc: [D positions, 16 columns]; column g*(16//GR) is query head g
    cols = tl.arange(0, 16)
    col_g = cols // (16 // GR)
    col_real = (cols % (16 // GR) == 0) & (col_g < G)
    z16 = tl.sum(tl.where(tl.arange(0, GR)[None, :] == col_g[:, None], zs[None, :], 0.0), 1)
    vchan = tl.load(vchan_ptr + dd)
    out_ptrs = part_o_ptr + (part + col_g[None, :]) * D + vchan[:, None]
    if S > 0:
        tl.atomic_add(out_ptrs, acc + z16[None, :], mask=col_real[None, :], sem="relaxed")  # the outliers added theirs
    else:
        tl.store(out_ptrs, acc + z16[None, :], mask=col_real[None, :])


@triton.jit
def _decode_exact_kernel(
    qrot_ptr, theta_ptr, wk_ptr, wv_ptr, sk_ptr, sv_ptr, sink_ptr, pos_ptr, len_ptr, mask_ptr,
    part_m_ptr, part_l_ptr, part_o_ptr,
    H, cap, m_sb, n_window, window, WR, n_splits,
    G: tl.constexpr, GR: tl.constexpr, D: tl.constexpr, N_SINK: tl.constexpr, NSP: tl.constexpr, BW: tl.constexpr,
    MASK_KIND: tl.constexpr, FAST: tl.constexpr,
):
    """The exact tokens of one (row, KV head): the recent window (ring buffer [B, H, WR, D], slot t at t % WR) and the
    sink tokens (sink_k/v [B, H, N, D] at their slots). Writes partial number ``n_splits`` of the row/head."""
    bh = tl.program_id(0)
    b = bh // H
    h = bh % H
    HALF: tl.constexpr = D // 2
    HQ = H * G
    length = tl.sum(tl.load(len_ptr + tl.arange(0, 1)), 0)
    win_lo = tl.maximum(length - n_window, 0)
    gr = tl.arange(0, GR)
    greal = gr < G
    dd = tl.arange(0, D)
    jj = dd % HALF
    upper = dd >= HALF
    theta = tl.load(theta_ptr + jj)
    qbase = qrot_ptr + (b * HQ + h * G) * D
    q = tl.load(qbase + gr[:, None] * D + dd[None, :], mask=greal[:, None], other=0.0)  # [GR, D]
    m_i = tl.full((GR,), float("-inf"), tl.float32)
    l_i = tl.zeros((GR,), tl.float32)
    acc = tl.zeros((GR, D), tl.float32)
    # sink tokens that are not in the window
    si = tl.arange(0, NSP)
    sslot = tl.load(sink_ptr + b * N_SINK + si, mask=si < N_SINK, other=-1)
    svalid = (sslot >= 0) & (sslot < win_lo) & (sslot >= length - window)
    if MASK_KIND == 1:
        svalid = svalid & (tl.load(mask_ptr + b * m_sb + sslot, mask=svalid, other=0) != 0)
    sbias = tl.where(svalid, 0.0, float("-inf"))
    if MASK_KIND == 2:
        sbias = sbias + tl.maximum(tl.load(mask_ptr + b * m_sb + sslot, mask=svalid, other=0.0).to(tl.float32), -1e30) * 1.4426950408889634
    spos = tl.load(pos_ptr + b * cap + sslot, mask=svalid, other=0).to(tl.float32)
    skey = tl.load(sk_ptr + ((bh * N_SINK + si[:, None]) * D + dd[None, :]), mask=(si < N_SINK)[:, None], other=0.0).to(tl.float32)
    sval = tl.load(sv_ptr + ((bh * N_SINK + si[:, None]) * D + dd[None, :]), mask=(si < N_SINK)[:, None], other=0.0).to(tl.float32)
    cs, ss = sincos(spos[:, None] * theta[None, :], FAST)
    spartner = tl.load(sk_ptr + ((bh * N_SINK + si[:, None]) * D + (dd[None, :] + HALF) % D), mask=(si < N_SINK)[:, None], other=0.0).to(tl.float32)
    skrot = skey * cs + tl.where(upper[None, :], spartner, -spartner) * ss
    ssc = tl.sum(q[:, None, :] * skrot[None, :, :], 2) + sbias[None, :]  # [GR, NSP]
    m_i = tl.max(ssc, 1)
    m_s = tl.where(m_i == float("-inf"), 0.0, m_i)
    sp = tl.exp2(ssc - m_s[:, None])
    l_i = tl.sum(sp, 1)
    acc = tl.sum(sp[:, :, None] * sval[None, :, :], 1)
    for w0 in range(win_lo, length, BW):
        t = w0 + tl.arange(0, BW)
        live = t < length
        allowed = live & (t >= length - window)
        if MASK_KIND == 1:
            allowed = allowed & (tl.load(mask_ptr + b * m_sb + t, mask=live, other=0) != 0)
        bias = tl.where(allowed, 0.0, float("-inf"))
        if MASK_KIND == 2:
            bias = bias + tl.maximum(tl.load(mask_ptr + b * m_sb + t, mask=live, other=0.0).to(tl.float32), -1e30) * 1.4426950408889634
        ring = t % WR
        kp = wk_ptr + ((bh * WR + ring[:, None]) * D)
        key = tl.load(kp + dd[None, :], mask=live[:, None], other=0.0).to(tl.float32)
        partner = tl.load(kp + (dd[None, :] + HALF) % D, mask=live[:, None], other=0.0).to(tl.float32)
        val = tl.load(wv_ptr + ((bh * WR + ring[:, None]) * D) + dd[None, :], mask=live[:, None], other=0.0).to(tl.float32)
        pw = tl.load(pos_ptr + b * cap + t, mask=live, other=0).to(tl.float32)
        c, s = sincos(pw[:, None] * theta[None, :], FAST)
        krot = key * c + tl.where(upper[None, :], partner, -partner) * s
        sc = tl.sum(q[:, None, :] * krot[None, :, :], 2) + bias[None, :]
        m_new = tl.maximum(m_i, tl.max(sc, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2(m_i - m_safe)
        p = tl.exp2(sc - m_safe[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.sum(p[:, :, None] * val[None, :, :], 1)
        m_i = m_new
    part = (bh * (n_splits + 1) + n_splits) * GR
    tl.store(part_m_ptr + part + gr, m_i)
    tl.store(part_l_ptr + part + gr, l_i)
    tl.store(part_o_ptr + (part + gr[:, None]) * D + dd[None, :], acc, mask=greal[:, None])


@triton.jit
def _combine_kernel(part_m_ptr, part_l_ptr, part_o_ptr, out_ptr, n_parts, H, o_sb, o_sh,
                    G: tl.constexpr, GR: tl.constexpr, D: tl.constexpr, NP: tl.constexpr):
    bh = tl.program_id(0)
    g = tl.program_id(1)
    b = bh // H
    h = bh % H
    p = tl.arange(0, NP)
    valid = p < n_parts
    base = (bh * n_parts + p) * GR + g
    m = tl.load(part_m_ptr + base, mask=valid, other=float("-inf"))
    l = tl.load(part_l_ptr + base, mask=valid, other=0.0)
    mx = tl.max(m, 0)
    wgt = tl.where(m == float("-inf"), 0.0, tl.exp2(m - mx))
    dd = tl.arange(0, D)
    o = tl.load(part_o_ptr + base[:, None] * D + dd[None, :], mask=(valid & (m > float("-inf")))[:, None], other=0.0)
    out = tl.sum(o * wgt[:, None], 0) / tl.sum(l * wgt, 0)
    tl.store(out_ptr + b * o_sb + (h * G + g) * o_sh + dd, out.to(out_ptr.dtype.element_ty))




@functools.cache
def _device_limits(index: int) -> tuple[int, int, int, int]:
    """(SMs, registers, shared bytes, threads) per SM of a CUDA device."""
    p = torch.cuda.get_device_properties(index)
    return (p.multi_processor_count, getattr(p, "regs_per_multiprocessor", 65536),
            getattr(p, "shared_memory_per_multiprocessor", 228 * 1024), getattr(p, "max_threads_per_multi_processor", 2048))


_RESIDENT: dict[tuple, int] = {}  # compiled variant -> programs that fit on one SM at once


def programs_per_sm(registers: int, shared: int, warps: int, limits: tuple[int, int, int, int]) -> int:
    """How many programs of a kernel are resident on one SM: registers are allocated per warp in units of 256,
    shared memory per program with 1 KiB reserved; at most 32 programs."""
    _, regs_sm, smem_sm, threads_sm = limits
    per_warp = -(-registers * 32 // 256) * 256
    by_regs = regs_sm // (per_warp * warps)
    by_smem = smem_sm // (shared + 1024) if shared else 32
    return max(1, min(by_regs, by_smem, threads_sm // (32 * warps), 32))


VALUE_PREFETCH = 1  # blocks of value code words in flight in the value loop (2: no faster on an H200, docs/kernels.md)
QUERY_AHEAD = False  # the key outliers' query gathers a block ahead (an option until measured on the GPU)


def default_warps(bits: int) -> int:
    return 4  # with block_size(bits): 8 warps (and 128-slot blocks) were slower on an H200 (docs/kernels.md)


def _variant(cache: PackedCache, groups: int, block_n: int, warps: int, unmasked: bool, prefetch: int = 1,
             maxnreg: int | None = None, direct: bool = True, value_prefetch: int = VALUE_PREFETCH,
             query_ahead: bool = QUERY_AHEAD) -> tuple:
    """What one compiled packed kernel is specialized to (its registers decide how many programs fit an SM)."""
    dev = cache.key_codes.device
    return (dev.index, cache.bits, cache.key_outlier_index.shape[2], groups, cache.head_dim, block_n, warps, unmasked,
            cache.sink_slot.shape[1], prefetch, value_prefetch, maxnreg, query_ahead, direct and _direct(cache.head_dim, block_n, warps))


def planned_splits(cache: PackedCache, groups: int, block_n: int, *, masked: bool = False) -> int:
    """The split count :func:`decode_attention` uses for ``cache`` (after the first launch of its variant)."""
    variant = _variant(cache, groups, block_n, default_warps(cache.bits), not masked)
    return default_splits(cache, block_n, _RESIDENT.get(variant, 2))


def _direct(head_dim: int, block_n: int, warps: int) -> bool:
    """Whether the keys can be decoded straight into the tensor-core operand: the layout of load_words_dot (64-slot
    blocks, 4 warps, four 32-code groups); other shapes build the tile in registers and pass it through shared
    memory."""
    return head_dim == 128 and block_n == 64 and warps == 4


def default_splits(cache: PackedCache, block_n: int, resident: int = 4) -> int:
    """Splits of the sequence per (row, KV head): one wave of programs, ``resident`` per SM (a second, partial wave
    would double the time of the last programs), at most one split per block."""
    dev = cache.key_codes.device
    sms = _device_limits(dev.index if dev.index is not None else torch.cuda.current_device())[0] if dev.type == "cuda" else 4
    programs = cache.batch * cache.heads
    return max(1, min(cache.capacity // block_n, (sms * resident) // programs))


@on_input_device
def decode_attention(q_rot: torch.Tensor, cache: PackedCache, consts: KernelConstants, *, mask: torch.Tensor | None = None,
                     sliding_window: int = 0, n_splits: int | None = None, num_warps: int | None = None,
                     prefetch: int = 1, maxnreg: int | None = None, direct_keys: bool = True,
                     value_prefetch: int = VALUE_PREFETCH, query_ahead: bool = QUERY_AHEAD) -> torch.Tensor:
    """Attention of one query per row over ``cache``.

    ``q_rot``: fp32 ``[B, Hq, D]``, RoPE'd at the query position and scaled by ``softmax_scale * log2(e)`` (and the
    rotary's attention scaling). ``mask``: ``[B, >= length]`` bool (True: attend) or additive float, by slot, or None.
    ``sliding_window``: attend to the newest that many slots only (0: all). ``maxnreg``: a register cap for the
    packed kernel (more resident programs per SM, paid in spills; None: the compiler's choice). ``direct_keys``:
    decode the keys straight into the tensor-core operand where the shape allows (False: the earlier tile, for
    comparison). ``prefetch`` / ``value_prefetch``: blocks of code words in flight in the key / value loop (1 or 2).
    ``query_ahead``: gather the query components that the key outliers' corrections read a block ahead.
    Returns fp32 ``[B, Hq, D]``.
    """
    b, hq, d = q_rot.shape
    h, cap, bn = cache.heads, cache.capacity, consts.block_n
    g = hq // h
    gr = max(2, triton.next_power_of_2(g))  # GR=1 (MHA) hit a Triton 3.6 shared-memory fault with head_dim 128
    if cap % bn:
        raise ValueError(f"capacity {cap} is not a whole number of {bn}-slot blocks")
    dev = q_rot.device
    use_asm = not interpreting()
    s = cache.key_outlier_index.shape[2]
    warps = num_warps or default_warps(cache.bits)
    variant = _variant(cache, g, bn, warps, mask is None, prefetch, maxnreg, direct_keys, value_prefetch, query_ahead)
    dot_a = variant[-1]
    splits = n_splits or default_splits(cache, bn, _RESIDENT.get(variant, 2))
    max_split_blocks = triton.cdiv(cap // bn, splits)
    parts = b * h * (splits + 1) * gr
    part_m = torch.empty(parts, device=dev, dtype=torch.float32)
    part_l = torch.empty_like(part_m)
    part_o = torch.zeros(parts * d, device=dev, dtype=torch.float32)
    scratch = torch.empty(b * h * (splits + 1) * max_split_blocks * bn * gr, device=dev, dtype=torch.float32)
    mask_kind = 0 if mask is None else (1 if mask.dtype == torch.bool else 2)
    m = q_rot if mask is None else (mask.view(torch.uint8) if mask.dtype == torch.bool else mask)
    m_sb = m.stride(0) if mask is not None else 0
    n_sink = cache.sink_slot.shape[1]
    window = sliding_window if sliding_window else 1 << 30
    if cache.value_outlier_index.shape[2] != s:
        raise ValueError("the decode kernel takes as many value outliers as key outliers per (token, head)")
    # empty tensors (no sink, no outliers) are never read: any valid pointer stands in for them
    sink_slot = cache.sink_slot if n_sink else cache.positions
    ring = cache.window_keys.shape[2]
    window_k, window_v = (cache.window_keys, cache.window_values) if ring else (cache.value_zero, cache.value_zero)
    sink_k, sink_v = (cache.sink_keys, cache.sink_values) if n_sink else (cache.value_zero, cache.value_zero)
    kov, koi, vov, voi = ((cache.key_outlier_values, cache.key_outlier_index, cache.value_outlier_values, cache.value_outlier_index)
                          if s else (cache.value_zero, cache.key_codes, cache.value_zero, cache.key_codes))
    compiled = _decode_packed_kernel[(splits, b * h)](
        q_rot, consts.key_tile_channels, consts.value_tile_channels, consts.inv_freq, consts.offset_cos, consts.offset_sin,
        cache.key_codes, cache.value_codes, consts.key_lanes, consts.value_lanes, consts.key_table16, consts.value_table16,
        cache.key_zero, cache.key_scale, cache.value_zero, cache.value_scale,
        kov, koi, vov, voi, cache.positions, cache.length, m, sink_slot,
        part_m, part_l, part_o, scratch,
        h, cap, m_sb, max_split_blocks, splits + 1, cache.recent_window, window,
        G=g, GR=gr, D=d, BITS=cache.bits, S=s, SP=max(1, triton.next_power_of_2(s)), N_SINK=n_sink, BN=bn, MASK_KIND=mask_kind, USE_ASM=use_asm, FAST=use_asm,
        PF=prefetch, PFV=value_prefetch, DOT_A=dot_a, KQA=query_ahead, num_warps=warps, num_stages=1, **({"maxnreg": maxnreg} if maxnreg else {}),
    )
    if variant not in _RESIDENT and dev.type == "cuda" and getattr(compiled, "n_regs", None):
        # the first launch of a variant uses 2 programs per SM; later ones how many its registers and shared
        # memory really allow (an uneven last wave costs up to half the time: docs/kernels.md)
        _RESIDENT[variant] = programs_per_sm(compiled.n_regs, compiled.metadata.shared, warps, _device_limits(dev.index))
    _decode_exact_kernel[(b * h,)](
        q_rot, consts.inv_freq, window_k, window_v, sink_k, sink_v,
        sink_slot, cache.positions, cache.length, m, part_m, part_l, part_o,
        h, cap, m_sb, cache.recent_window, window, max(ring, 1), splits,
        G=g, GR=gr, D=d, N_SINK=n_sink, NSP=max(2, triton.next_power_of_2(max(n_sink, 1))), BW=16, MASK_KIND=mask_kind,
        FAST=use_asm, num_warps=4,
    )
    out = torch.empty(b, hq, d, device=dev, dtype=torch.float32)
    _combine_kernel[(b * h, g)](part_m, part_l, part_o, out, splits + 1, h, out.stride(0), out.stride(1),
                                G=g, GR=gr, D=d, NP=triton.next_power_of_2(splits + 1))
    return out
