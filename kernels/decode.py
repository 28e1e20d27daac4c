"""Decode attention (one query per row) directly on the packed cache, split over the sequence.

Grid ``(splits + 1, B)``. A *packed* program owns a range of packed slots for **all** KV heads of its row, so
the per-slot work that does not depend on the head is done once: the RoPE sin/cos of the slot's position, and the
token's sparse outliers (stored per token over all heads), which each program reads exactly once. It makes two
passes over its slots:

1. keys: unpack codes, codebook lookup, per-channel scale/zero, rotate by the stored position, ``q . k`` for every
   query head of the KV head (GQA: a KV head is dequantized once for its query heads); scores go to a scratch
   buffer; key outliers are then added to them as sparse corrections (one CSR entry per thread, atomics), and the
   split's max is read back from the scores;
2. values: ``p = exp(score - max)`` with the split's final max, dense ``p . v``, and value outliers added to the
   split's partial output with atomics (they land on data-dependent channels).

The last program (index ``splits``) attends to the exact tokens: the sink (in place of its packed slot) and the
recent window. :func:`_combine_kernel` merges the partial (max, sum, output) of all programs. All math is fp32.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from .layout import PackedKV, next_pow2, on_input_device, same_strides
from .triton_common import LOG2E, chunk_codes, code_at, fast_trig, group_codes, lane_table, lane_table_lookup, shuffle_lookup, sincos


@triton.jit
def _rotated_query(q_ptr, qc_ptr, qs_ptr, b, q_sb, q_sh, c_sb, h_rows, g_cols, HALF: tl.constexpr, G: tl.constexpr, qmask, scale):
    """The query rotated at its own position (HF rotate-half), pre-multiplied by ``scale``: two [HP, GP, HALF]."""
    j = tl.arange(0, HALF)[None, None, :]
    hq = (h_rows[:, None] * G + g_cols[None, :])[:, :, None]
    base = q_ptr + b * q_sb + hq * q_sh
    m = qmask[:, :, None]
    q_lo = tl.load(base + j, mask=m, other=0.0).to(tl.float32)
    q_hi = tl.load(base + HALF + j, mask=m, other=0.0).to(tl.float32)
    c_lo = tl.load(qc_ptr + b * c_sb + j).to(tl.float32)
    c_hi = tl.load(qc_ptr + b * c_sb + HALF + j).to(tl.float32)
    s_lo = tl.load(qs_ptr + b * c_sb + j).to(tl.float32)
    s_hi = tl.load(qs_ptr + b * c_sb + HALF + j).to(tl.float32)
    return (q_lo * c_lo - q_hi * s_lo) * scale, (q_hi * c_hi + q_lo * s_hi) * scale


@triton.jit
def _rotated_query_at(q_ptr, qc_ptr, qs_ptr, b, q_sb, q_sh, c_sb, hq, j, mask, scale, HALF: tl.constexpr):
    """Both RoPE halves of the scaled rotated query at (query head ``hq``, pair ``j``), element-wise."""
    base = q_ptr + b * q_sb + hq * q_sh
    q_lo = tl.load(base + j, mask=mask, other=0.0).to(tl.float32)
    q_hi = tl.load(base + HALF + j, mask=mask, other=0.0).to(tl.float32)
    c_lo = tl.load(qc_ptr + b * c_sb + j, mask=mask, other=0.0).to(tl.float32)
    c_hi = tl.load(qc_ptr + b * c_sb + HALF + j, mask=mask, other=0.0).to(tl.float32)
    s_lo = tl.load(qs_ptr + b * c_sb + j, mask=mask, other=0.0).to(tl.float32)
    s_hi = tl.load(qs_ptr + b * c_sb + HALF + j, mask=mask, other=0.0).to(tl.float32)
    return (q_lo * c_lo - q_hi * s_lo) * scale, (q_hi * c_hi + q_lo * s_hi) * scale


@triton.jit
def _slot_allowed(mask_ptr, b, m_sb, rel, total, window, MASK_KIND: tl.constexpr):
    """Additive log2-domain bias of a visible slot: 0, or -inf when masked or outside the sliding window."""
    bias = tl.where(rel > total - 1 - window, 0.0, float("-inf"))
    if MASK_KIND == 1:
        keep = tl.load(mask_ptr + b * m_sb + rel)
        bias = tl.where(keep != 0, bias, float("-inf"))
    elif MASK_KIND == 2:
        bias = bias + tl.maximum(tl.load(mask_ptr + b * m_sb + rel).to(tl.float32), -1e30) * 1.4426950408889634
    return bias


@triton.jit
def _slot_bias(mask_ptr, b, m_sb, rel, live, total, window, MASK_KIND: tl.constexpr):
    """``_slot_allowed`` for a block of slots; slots past the range get -inf."""
    bias = tl.where(live & (rel > total - 1 - window), 0.0, float("-inf"))
    if MASK_KIND == 1:
        keep = tl.load(mask_ptr + b * m_sb + rel, mask=live, other=0)
        bias = tl.where(keep != 0, bias, float("-inf"))
    elif MASK_KIND == 2:
        bias = bias + tl.maximum(tl.load(mask_ptr + b * m_sb + rel, mask=live, other=0.0).to(tl.float32), -1e30) * 1.4426950408889634
    return bias


@triton.jit
def _decode_kernel(
    q_ptr, qc_ptr, qs_ptr, inv_freq_ptr,
    kc_ptr, vc_ptr, ktab_ptr, vtab_ptr, kzero_ptr, kscale_ptr, vzero_ptr, vscale_ptr,
    kbeg_ptr, kev_ptr, kec_ptr, knnz_ptr, vov_ptr, voi_ptr, pos_ptr,
    sink_k_ptr, sink_v_ptr, sink_slot_ptr, win_k_ptr, win_v_ptr, mask_ptr,
    scores_ptr, part_m_ptr, part_l_ptr, part_acc_ptr, trig_ptr,
    q_sb, q_sh, c_sb, ke_sb, sk_sb, sk_sh, sk_sn, wk_sb, wk_sh, wk_sn, m_sb,
    cap, first, packed_len, n_window, begin, n_outliers, split_len, n_splits, window,
    scale, rope_scale,
    H: tl.constexpr, HP: tl.constexpr, G: tl.constexpr, GP: tl.constexpr, D: tl.constexpr, BITS: tl.constexpr,
    W: tl.constexpr, S_PAD: tl.constexpr, HAS_OUTLIERS: tl.constexpr, HAS_KEY_OUTLIERS: tl.constexpr, N_SINK: tl.constexpr, NS_PAD: tl.constexpr, MASK_KIND: tl.constexpr, BLOCK_N: tl.constexpr,
    FAST_TRIG: tl.constexpr, VBN: tl.constexpr, SHFL: tl.constexpr, KBN: tl.constexpr, MBN: tl.constexpr,
):
    split = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    HALF: tl.constexpr = D // 2
    HQ: tl.constexpr = H * G
    total = packed_len + n_window
    hr = tl.arange(0, HP)
    gc = tl.arange(0, GP)
    hmask = hr < H
    qmask = hmask[:, None] & (gc < G)[None, :]
    j = tl.arange(0, HALF)
    inv_freq = tl.load(inv_freq_ptr + j)
    q_lo, q_hi = _rotated_query(q_ptr, qc_ptr, qs_ptr, b, q_sb, q_sh, c_sb, hr, gc, HALF, G, qmask, scale * rope_scale)
    hq_rows = hr[:, None] * G + gc[None, :]  # [HP, GP] query head of each (kv head, group) cell
    m_i = tl.full((HP, GP), float("-inf"), tl.float32)
    l_i = tl.zeros((HP, GP), tl.float32)
    acc_lo = tl.zeros((HP, GP, HALF), tl.float32)
    acc_hi = tl.zeros((HP, GP, HALF), tl.float32)
    part = (b * (n_splits + 1) + split) * HQ
    ns = tl.arange(0, NS_PAD)
    sink_slot = tl.load(sink_slot_ptr + b * N_SINK + ns, mask=ns < N_SINK, other=-1) - begin  # relative slots
    if split < n_splits:
        # ------------------------------------------------------------------ packed slots [lo, hi)
        lo = split * split_len
        hi = tl.minimum(lo + split_len, packed_len)
        e = tl.arange(0, S_PAD)
        nb = tl.arange(0, BLOCK_N)  # slots per iteration of the value-outlier loop
        # Zero this program's partial output now: value outliers are added to it with atomics in pass 2.
        acc_ptrs = part_acc_ptr + (part + hq_rows)[:, :, None] * D + j[None, None, :]
        tl.store(acc_ptrs, acc_lo, mask=qmask[:, :, None])
        tl.store(acc_ptrs + HALF, acc_hi, mask=qmask[:, :, None])
        score_ptrs = scores_ptr + (b * HQ + hq_rows) * packed_len  # [HP, GP]
        cell3 = qmask[:, :, None]
        # ---------------------------------------------------------------- pass 1: keys
        # One thread per (KV head, slot, chunk of CH RoPE pairs: channels j and HALF + j for CH consecutive j):
        # both halves' codes are decoded in registers, dequantized with the per-channel range, rotated by the slot's
        # position and dotted with every query head of the group; the chunks of a slot meet in one shuffle reduction.
        # CH = 16 (not a whole 32-code group) keeps the thread's loop constants (scale, zero, query per pair) in
        # registers without spills.
        CH: tl.constexpr = 16
        NCH: tl.constexpr = HALF // CH
        KU: tl.constexpr = HP * KBN * NCH
        u = tl.arange(0, KU)
        kc = u % NCH
        kn = (u // NCH) % KBN
        kh = u // (NCH * KBN)
        kmask = kh < H
        # Pair index of each element, [CH, KU]. Multiplied by a runtime 1: addresses that the compiler knows to be
        # contiguous along the chunk would make it vectorize these loads across lanes and lay the whole loop out
        # with a unit's chunk spread over 4 threads (cross-lane sums, shuffles); unknown strides keep a unit's chunk
        # in one thread, as the codes are.
        one = (n_splits + 1) // (n_splits + 1)
        jj = (kc[None, :] * CH + tl.arange(0, CH)[:, None]) * one
        m2 = kmask[None, :]
        ks_lo = tl.load(kscale_ptr + kh[None, :] * D + jj, mask=m2, other=0.0)
        ks_hi = tl.load(kscale_ptr + kh[None, :] * D + HALF + jj, mask=m2, other=0.0)
        kz_lo = tl.load(kzero_ptr + kh[None, :] * D + jj, mask=m2, other=0.0)
        kz_hi = tl.load(kzero_ptr + kh[None, :] * D + HALF + jj, mask=m2, other=0.0)
        hq_k = (kh * G)[None, None, :] + gc[:, None, None]  # [GP, 1, KU]
        qk_mask = (gc < G)[:, None, None] & kmask[None, None, :]
        qu_lo, qu_hi = _rotated_query_at(q_ptr, qc_ptr, qs_ptr, b, q_sb, q_sh, c_sb, hq_k, jj[None, :, :], qk_mask, scale * rope_scale, HALF)
        if G == 1:
            # MHA: fold scale, zero point and query into six constants per pair, so that a pair's score term
            # c * (q_lo k_lo + q_hi k_hi) + s * (q_hi k_lo - q_lo k_hi), with k = code value * scale + zero, costs four
            # FMAs on the code values plus the two of the rotation (instead of dequantize, rotate, then dot).
            qa = tl.reshape(qu_lo, (CH, KU))
            qb = tl.reshape(qu_hi, (CH, KU))
            fa = qa * ks_lo
            fb = qb * ks_hi
            fc = qb * ks_lo
            fd = -qa * ks_hi
            z1 = qa * kz_lo + qb * kz_hi
            z2 = qb * kz_lo - qa * kz_hi
        if SHFL:
            k_lanes = lane_table(ktab_ptr, u[None, :], BITS)
        # Slot-level index of the [GP, HP * KBN] scores of an iteration.
        sn = tl.arange(0, HP * KBN)
        h_s = sn // KBN
        hq_s = (h_s * G)[None, :] + gc[:, None]
        cn = tl.arange(0, KBN)
        trig_base = trig_ptr + (b * (n_splits + 1) + split) * (4 * KBN * HALF)  # [2 buffers][cos, sin][KBN, HALF]
        trig_off = kn[None, :] * HALF + jj  # [CH, KU]: this unit's slot and pairs (jj: no vectorized layout)
        for k0 in range(lo, lo + split_len, KBN):  # slots past `hi` are masked
            rel = k0 + kn  # [KU]
            live = (rel < hi) & kmask
            phys = first + rel
            # sin/cos depend on (slot, pair) only: computed once per iteration on a compact [KBN, HALF] tile, not
            # once per head. The tile goes through this program's scratch (L1) to the units: left to the compiler,
            # the conversion is rematerialized in the unit layout, i.e. recomputed by every head. Two buffers by
            # iteration parity: one barrier per iteration orders this iteration's writes before its reads and the
            # previous reads of a buffer before its next writes.
            rel_c = k0 + cn
            pos_c = tl.load(pos_ptr + b * cap + first + rel_c, mask=rel_c < hi, other=0).to(tl.float32)
            cos_c, sin_c = sincos(pos_c[:, None] * inv_freq[None, :], FAST_TRIG)  # [KBN, HALF]
            buf = trig_base + ((k0 - lo) // KBN % 2) * (2 * KBN * HALF)
            tl.store(buf + cn[:, None] * HALF + j[None, :], cos_c)
            tl.store(buf + KBN * HALF + cn[:, None] * HALF + j[None, :], sin_c)
            tl.debug_barrier()
            cos = tl.load(buf + trig_off)
            sin = tl.load(buf + KBN * HALF + trig_off)
            row = kc_ptr + ((b * H + kh) * cap + phys) * W
            c_lo = chunk_codes(row, kc, live, BITS, not SHFL)
            c_hi = chunk_codes(row + W // 2, kc, live, BITS, not SHFL)
            if SHFL:
                e_lo = lane_table_lookup(k_lanes, c_lo)
                e_hi = lane_table_lookup(k_lanes, c_hi)
            else:
                e_lo = tl.load(ktab_ptr + c_lo)
                e_hi = tl.load(ktab_ptr + c_hi)
            if G == 1:
                x = tl.fma(e_hi, fb, tl.fma(e_lo, fa, z1))  # explicit FMAs: the compiler does not contract a sum of products
                y = tl.fma(e_hi, fd, tl.fma(e_lo, fc, z2))
                part_s = tl.reshape(tl.sum(tl.fma(cos, x, sin * y), axis=0), (GP, KU))
            else:
                k_lo = e_lo * ks_lo + kz_lo
                k_hi = e_hi * ks_hi + kz_hi
                r_lo = k_lo * cos - k_hi * sin
                r_hi = k_hi * cos + k_lo * sin
                part_s = tl.sum(qu_lo * r_lo[None, :, :] + qu_hi * r_hi[None, :, :], axis=1)  # [GP, KU]
            s_slot = tl.sum(tl.reshape(part_s, (GP, HP * KBN, NCH)), axis=2)  # [GP, HP * KBN]
            # Bias (mask, window, sink slots: the last program attends to the sink exactly) per (head, slot).
            rel_s = k0 + sn % KBN
            live_s = (rel_s < hi) & (h_s < H)
            bias = _slot_bias(mask_ptr, b, m_sb, rel_s, live_s, total, window, MASK_KIND)
            is_sink = tl.sum((sink_slot[None, :] == rel_s[:, None]).to(tl.int32), axis=1) > 0
            bias = tl.where(is_sink, float("-inf"), bias)
            tl.store(scores_ptr + (b * HQ + hq_s) * packed_len + rel_s[None, :], s_slot + bias[None, :],
                     mask=(gc < G)[:, None] & live_s[None, :])
        if HAS_KEY_OUTLIERS:
            tl.debug_barrier()  # the dense scores are in place before the corrections are added to them
            # Key outliers (CSR): replacing element (h, d) of a dequantized key adds (value - dequantized) times the
            # rotated query's weight of that channel at the slot's position to that score. The split's entries are
            # one contiguous CSR range: taken EB at a time, one per thread (not per slot: a slot has few), each
            # finds its slot by a binary search of the row pointers, and the corrections land with atomics (entries
            # of one slot and head share a score).
            e_beg = tl.load(kbeg_ptr + b * cap + first + lo)
            e_end = tl.load(kbeg_ptr + b * cap + first + tl.minimum(hi, packed_len - 1), mask=hi < packed_len, other=0)
            e_end = tl.where(hi < packed_len, e_end, tl.load(knnz_ptr + b).to(tl.int32))
            EB: tl.constexpr = KU  # one entry per thread
            ei = tl.arange(0, EB)
            for i0 in range(e_beg, e_end, EB):
                ent = i0 + ei
                ok = ent < e_end
                # Largest slot r in [lo, hi) whose first entry is <= ent (empty slots share their successor's).
                base = tl.zeros((EB,), tl.int32) + lo
                n = hi - lo
                while n > 1:
                    half = n // 2
                    probe = tl.load(kbeg_ptr + b * cap + first + base + half, mask=ok, other=0)
                    base = tl.where(probe <= ent, base + half, base)
                    n -= half
                phys_e = first + base
                pos_e = tl.load(pos_ptr + b * cap + phys_e, mask=ok, other=0).to(tl.float32)
                idx = tl.load(kec_ptr + b * ke_sb + ent, mask=ok, other=0).to(tl.int32)
                val = tl.load(kev_ptr + b * ke_sb + ent, mask=ok, other=0.0).to(tl.float32)
                he = tl.where(ok, idx // D, 0)
                de = tl.where(ok, idx % D, 0)
                je = de % HALF
                code = code_at(kc_ptr + ((b * H + he) * cap + phys_e) * W, de, ok, BITS)
                deq = tl.load(ktab_ptr + code, mask=ok, other=0.0) * tl.load(kscale_ptr + he * D + de, mask=ok, other=0.0)
                deq += tl.load(kzero_ptr + he * D + de, mask=ok, other=0.0)
                delta = tl.where(ok, val - deq, 0.0)
                ce, se = sincos(pos_e * tl.load(inv_freq_ptr + je, mask=ok, other=0.0), FAST_TRIG)
                first_half = de < HALF
                for gi in tl.static_range(G):
                    qe_lo, qe_hi = _rotated_query_at(q_ptr, qc_ptr, qs_ptr, b, q_sb, q_sh, c_sb, he * G + gi, je, ok, scale * rope_scale, HALF)
                    weight = tl.where(first_half, ce * qe_lo + se * qe_hi, ce * qe_hi - se * qe_lo)
                    tl.atomic_add(scores_ptr + (b * HQ + he * G + gi) * packed_len + base, delta * weight, mask=ok)
        tl.debug_barrier()  # every score of the split is final
        # The split's max per query head: one read per (head, slot). Loads of scores bypass L1 (.cg): the outlier
        # corrections were added at L2 by atomics, which do not update lines this SM may hold.
        # Element-wise max in the loop, one reduction after it (Triton 3.6's thread-locality pass fails to compile a
        # reduction combined with a loop-carried value here).
        m_blk = tl.full((HP, GP, MBN), float("-inf"), tl.float32)
        for k0 in range(lo, lo + split_len, MBN):
            rel = k0 + tl.arange(0, MBN)
            st = tl.load(score_ptrs[:, :, None] + rel[None, None, :], mask=cell3 & (rel < hi)[None, None, :], other=float("-inf"), cache_modifier=".cg")
            m_blk = tl.maximum(m_blk, st)
        m_i = tl.max(m_blk, axis=2)
        # The split's final max is known: publish it (pass 2 reads it back per thread layout, value outliers too).
        tl.store(part_m_ptr + part + hq_rows, m_i, mask=qmask)
        tl.debug_barrier()  # scores, the max and the zeroed partial output are visible to every thread of the program
        # ---------------------------------------------------------------- pass 2: values
        # One thread per (KV head, slot, group of 32 channels): the group's BITS words are decoded in registers and
        # weighted by p * value_scale (the per-token scale folded into the weight; the zero point adds p * zero once
        # per slot), accumulated per thread over the loop and reduced over slots once at the end: no shuffles.
        NGRP: tl.constexpr = D // 32
        VU: tl.constexpr = HP * VBN * NGRP
        u = tl.arange(0, VU)
        ug = u % NGRP
        un = (u // NGRP) % VBN
        uh = u // (NGRP * VBN)
        # Unit tensors put the units last ([GP, VU], [GP, 32, VU]): Triton's default layouts then spread the units
        # over the lanes and keep a unit's 32 channels (and its query heads) in one thread.
        hq_u = gc[:, None] + uh[None, :] * G  # [GP, VU]
        cell_u = (gc < G)[:, None] & (uh < H)[None, :]
        first_group = (ug == 0)[None, :]
        m_u = tl.load(part_m_ptr + part + hq_u, mask=cell_u, other=0.0)
        m_u = tl.where(m_u == float("-inf"), 0.0, m_u)
        score_u = scores_ptr + (b * HQ + hq_u) * packed_len  # [GP, VU]
        if SHFL:
            v_lanes = lane_table(vtab_ptr, u[None, :], BITS)  # [1, VU]: this lane's codebook entry
        vacc = tl.zeros((GP, 32, VU), tl.float32)
        zacc = tl.zeros((GP, VU), tl.float32)
        lacc = tl.zeros((GP, VU), tl.float32)
        for k0 in range(lo, lo + split_len, VBN):  # slots past `hi` are masked
            rel = k0 + un
            live = (rel < hi) & (uh < H)
            phys = first + rel
            p = tl.exp2(tl.load(score_u + rel[None, :], mask=cell_u & live[None, :], other=float("-inf"), cache_modifier=".cg") - m_u)  # [GP, VU]
            vz = tl.load(vzero_ptr + b * cap + phys, mask=live, other=0.0).to(tl.float32)
            vs = tl.load(vscale_ptr + b * cap + phys, mask=live, other=0.0).to(tl.float32)
            lacc += tl.where(first_group, p, 0.0)
            zacc += tl.where(first_group, p * vz[None, :], 0.0)
            if SHFL:
                codes = group_codes(vc_ptr + ((b * H + uh) * cap + phys) * W + ug * BITS, live, BITS, False)  # [32, VU]
                vals = lane_table_lookup(v_lanes, codes)
            else:
                vals = tl.load(vtab_ptr + group_codes(vc_ptr + ((b * H + uh) * cap + phys) * W + ug * BITS, live, BITS))
            vacc += (p * vs[None, :])[:, None, :] * vals[None, :, :]
        # Reduce over the slots of each (head, group); lay the groups out along the head dimension.
        dense = tl.sum(tl.reshape(vacc, (GP, 32, HP, VBN, NGRP)), axis=3)  # [GP, 32, HP, NGRP]
        dense = tl.reshape(tl.permute(dense, (2, 0, 3, 1)), (HP, GP, D))
        zsum = tl.trans(tl.sum(tl.reshape(zacc, (GP, HP, VBN * NGRP)), axis=2))  # [HP, GP]
        l_i = tl.trans(tl.sum(tl.reshape(lacc, (GP, HP, VBN * NGRP)), axis=2))
        dense = dense + zsum[:, :, None]
        dd = tl.arange(0, D)
        tl.atomic_add(part_acc_ptr + (part + hq_rows)[:, :, None] * D + dd[None, None, :], dense, mask=qmask[:, :, None])
        if HAS_OUTLIERS:
            # Value outliers: (value - dequantized) * p, with p = 2^(score - final max) of that token and query head,
            # added to the partial output at their channel (data-dependent: atomics).
            for k0 in range(lo, lo + split_len, BLOCK_N):
                rel = k0 + nb
                live = rel < hi
                phys = first + rel
                vz = tl.load(vzero_ptr + b * cap + phys, mask=live, other=0.0).to(tl.float32)
                vs = tl.load(vscale_ptr + b * cap + phys, mask=live, other=0.0).to(tl.float32)
                tok = (b * cap + phys)[:, None] * n_outliers + e[None, :]
                emask = live[:, None] & (e < n_outliers)[None, :]
                idx = tl.load(voi_ptr + tok, mask=emask, other=-1).to(tl.int32)
                val = tl.load(vov_ptr + tok, mask=emask, other=0.0).to(tl.float32)
                ok = idx >= 0
                he = tl.where(ok, idx // D, 0)
                de = tl.where(ok, idx % D, 0)
                code = code_at(vc_ptr + ((b * H + he) * cap + phys[:, None]) * W, de, ok, BITS)
                delta = tl.where(ok, val - (tl.load(vtab_ptr + code, mask=ok, other=0.0) * vs[:, None] + vz[:, None]), 0.0)
                for gi in tl.static_range(G):
                    hq_e = he * G + gi
                    m_e = tl.load(part_m_ptr + part + hq_e, mask=ok, other=0.0)
                    m_e = tl.where(m_e == float("-inf"), 0.0, m_e)
                    s_e = tl.load(scores_ptr + (b * HQ + hq_e) * packed_len + rel[:, None], mask=ok, other=float("-inf"), cache_modifier=".cg")
                    tl.atomic_add(part_acc_ptr + (part + hq_e) * D + de, tl.exp2(s_e - m_e) * delta, mask=ok)
    else:
        # ------------------------------------------------------------------ exact tokens: sink, then window
        for i in range(N_SINK):
            rel = tl.sum(tl.where(ns == i, sink_slot, 0))
            use = (rel >= 0) & (rel < packed_len)
            relc = tl.where(use, rel, 0)
            pos = tl.load(pos_ptr + b * cap + first + relc).to(tl.float32)
            base_k = sink_k_ptr + b * sk_sb + hr[:, None] * sk_sh + i * sk_sn + j[None, :]
            base_v = sink_v_ptr + b * sk_sb + hr[:, None] * sk_sh + i * sk_sn + j[None, :]
            bias = _slot_allowed(mask_ptr, b, m_sb, relc, total, window, MASK_KIND)
            bias = tl.where(use, bias, float("-inf"))
            m_i, l_i, acc_lo, acc_hi = _exact_update(base_k, base_v, pos, bias, inv_freq, hmask, q_lo, q_hi,
                                                     m_i, l_i, acc_lo, acc_hi, HALF, FAST_TRIG)
        for w in range(n_window):
            rel = packed_len + w
            pos = tl.load(pos_ptr + b * cap + first + rel).to(tl.float32)
            base_k = win_k_ptr + b * wk_sb + hr[:, None] * wk_sh + w * wk_sn + j[None, :]
            base_v = win_v_ptr + b * wk_sb + hr[:, None] * wk_sh + w * wk_sn + j[None, :]
            bias = _slot_allowed(mask_ptr, b, m_sb, rel, total, window, MASK_KIND)
            m_i, l_i, acc_lo, acc_hi = _exact_update(base_k, base_v, pos, bias, inv_freq, hmask, q_lo, q_hi,
                                                     m_i, l_i, acc_lo, acc_hi, HALF, FAST_TRIG)
        acc_ptrs = part_acc_ptr + (part + hq_rows)[:, :, None] * D + j[None, None, :]
        tl.store(acc_ptrs, acc_lo, mask=qmask[:, :, None])
        tl.store(acc_ptrs + HALF, acc_hi, mask=qmask[:, :, None])
    tl.store(part_m_ptr + part + hq_rows, m_i, mask=qmask)
    tl.store(part_l_ptr + part + hq_rows, l_i, mask=qmask)


@triton.jit
def _exact_update(base_k, base_v, pos, bias, inv_freq, hmask, q_lo, q_hi, m_i, l_i, acc_lo, acc_hi, HALF: tl.constexpr, FAST_TRIG: tl.constexpr):
    """Online-softmax step with one exact (model dtype) token for all heads."""
    cos, sin = sincos(pos * inv_freq, FAST_TRIG)
    k_lo = tl.load(base_k, mask=hmask[:, None], other=0.0).to(tl.float32)
    k_hi = tl.load(base_k + HALF, mask=hmask[:, None], other=0.0).to(tl.float32)
    r_lo = (k_lo * cos[None, :] - k_hi * sin[None, :])[:, None, :]
    r_hi = (k_hi * cos[None, :] + k_lo * sin[None, :])[:, None, :]
    s = tl.sum(q_lo * r_lo + q_hi * r_hi, axis=2) + bias
    m_new = tl.maximum(m_i, s)
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = tl.exp2(m_i - m_safe)
    p = tl.exp2(s - m_safe)
    v_lo = tl.load(base_v, mask=hmask[:, None], other=0.0).to(tl.float32)
    v_hi = tl.load(base_v + HALF, mask=hmask[:, None], other=0.0).to(tl.float32)
    acc_lo = acc_lo * alpha[:, :, None] + p[:, :, None] * v_lo[:, None, :]
    acc_hi = acc_hi * alpha[:, :, None] + p[:, :, None] * v_hi[:, None, :]
    return m_new, l_i * alpha + p, acc_lo, acc_hi


@triton.jit
def _combine_kernel(part_m_ptr, part_l_ptr, part_acc_ptr, out_ptr, n_parts, o_sb, o_sh,
                    HQ: tl.constexpr, D: tl.constexpr, P_PAD: tl.constexpr):
    """Merge the partial results of all programs of a row: out = sum_k 2^(m_k - M) acc_k / sum_k 2^(m_k - M) l_k."""
    hq = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    k = tl.arange(0, P_PAD)
    kmask = k < n_parts
    rows = (b * n_parts + k) * HQ + hq
    m = tl.load(part_m_ptr + rows, mask=kmask, other=float("-inf"))
    l = tl.load(part_l_ptr + rows, mask=kmask, other=0.0)
    big = tl.max(m, axis=0)
    big = tl.where(big == float("-inf"), 0.0, big)
    w = tl.where(kmask, tl.exp2(m - big), 0.0)
    denom = tl.sum(w * l, axis=0)
    d = tl.arange(0, D)
    acc = tl.load(part_acc_ptr + rows[:, None] * D + d[None, :], mask=kmask[:, None], other=0.0)
    out = tl.sum(w[:, None] * acc, axis=0) / tl.where(denom > 0, denom, 1.0)
    tl.store(out_ptr + b * o_sb + hq * o_sh + d, out.to(out_ptr.dtype.element_ty))



TUNED: dict[tuple[int, int, int], tuple[int, int]] = {}  # (heads, groups, head_dim) -> (block_n, warps), set by a sweep


def decode_config(heads: int, groups: int, head_dim: int) -> tuple[int, int]:
    """(slots per iteration, warps) of the decode kernel: a configuration measured by ``benchmarks/gpu_suite.py``
    when one was recorded in ``TUNED``, else a guess bounded by register use (``benchmarks/compile_check.py``
    reports registers and spills for sm_90 without a GPU)."""
    if (heads, groups, head_dim) in TUNED:
        return TUNED[(heads, groups, head_dim)]
    cells = next_pow2(heads) * next_pow2(groups) * head_dim // 2
    tile = next_pow2(heads) * head_dim // 2
    block_n = max(1, min(16, 2048 // tile, 4096 // cells))
    block_n = 1 << (block_n.bit_length() - 1)
    warps = 8 if next_pow2(heads) * head_dim >= 2048 else 4
    return block_n, warps


def value_block(heads: int, head_dim: int, warps: int) -> int:
    """Slots per iteration of the value pass: one (head, slot, 32-channel group) unit per thread."""
    return max(1, (32 * warps) // (next_pow2(heads) * (head_dim // 32)))


def key_block(heads: int, head_dim: int, warps: int) -> int:
    """Slots per iteration of the key pass: one (head, slot, chunk of 16 RoPE pairs) unit per thread."""
    return max(1, (32 * warps) // (next_pow2(heads) * (head_dim // 32)))


PROGRAMS_PER_SM = 2  # decode programs per SM over all rows; benchmarks/gpu_suite.py may set a measured value


def default_splits(batch: int, packed_len: int, device: torch.device) -> int:
    """Enough programs to fill the GPU ``PROGRAMS_PER_SM`` times, none shorter than 64 slots."""
    if packed_len == 0:
        return 0
    if device.type == "cuda":
        sms = torch.cuda.get_device_properties(device).multi_processor_count
        want = max(1, (PROGRAMS_PER_SM * sms) // max(batch, 1))
    else:
        want = 2
    return max(1, min(want, math.ceil(packed_len / 64)))


@on_input_device
def decode_attention(
    query: torch.Tensor,
    query_cos: torch.Tensor,
    query_sin: torch.Tensor,
    cache: PackedKV,
    inv_freq: torch.Tensor,
    attention_scaling: float,
    softmax_scale: float,
    mask: torch.Tensor | None = None,
    sliding_window: int = 0,
    num_splits: int | None = None,
    num_warps: int | None = None,
    block_n: int | None = None,
) -> torch.Tensor:
    """Attention of one query per row over the packed cache (see :func:`~.naive.packed_attention_naive`).

    ``query``: ``[B, Hq, 1, D]`` un-rotated; ``query_cos/sin``: ``[B or 1, 1, D]``; ``mask``: None, or bool /
    additive ``[B, 1, 1, total]`` (or ``[B, total]``) over the visible slots. Returns ``[B, 1, Hq, D]`` in the
    query's dtype.
    """
    cache.check()
    b, hq, t, d = query.shape
    if t != 1:
        raise ValueError(f"decode_attention takes one query per row, got {t}")
    h = cache.heads
    if hq % h:
        raise ValueError(f"{hq} query heads are not a multiple of {h} KV heads")
    g = hq // h
    dev = query.device
    length = cache.packed_len
    splits = default_splits(b, length, dev) if num_splits is None else max(1, min(num_splits, length)) if length else 0
    split_len = math.ceil(length / splits) if splits else 1
    splits = math.ceil(length / split_len) if splits else 0
    total = cache.total
    mask_kind, mask_arg, m_sb = 0, query, 0
    if mask is not None:
        mask2 = mask if mask.dim() == 2 else mask[:, 0, -1, :]
        if mask2.shape[-1] != total:
            raise ValueError(f"mask covers {mask2.shape[-1]} slots, the cache shows {total}")
        if mask2.dtype == torch.bool:
            mask_kind, mask_arg = 1, mask2.view(torch.uint8)
        else:
            mask_kind, mask_arg = 2, mask2
        m_sb = mask_arg.stride(0)
        if mask_arg.stride(-1) != 1:
            mask_arg = mask_arg.contiguous()
            m_sb = mask_arg.stride(0)
    s = cache.outlier_slots
    n_sink = cache.sink_slot.shape[1]
    parts = splits + 1
    scores = torch.empty(b, hq, max(length, 1), device=dev, dtype=torch.float32)
    part_m = torch.empty(b, parts, hq, device=dev, dtype=torch.float32)
    part_l = torch.empty_like(part_m)
    part_acc = torch.empty(b, parts, hq, d, device=dev, dtype=torch.float32)
    hp, gp = next_pow2(h), next_pow2(g)
    auto_n, auto_warps = decode_config(h, g, d)
    block_n, warps = block_n or auto_n, num_warps or auto_warps
    if s:
        # Slots per iteration of the value-outlier loop (its only use now): ~1024 entries at a time. Its iterations
        # are chains of dependent loads (index, code, table, score) ending in atomics: latency-bound, so few and wide.
        block_n = max(block_n, 1024 // next_pow2(s))
    kbn = key_block(h, d, warps)
    trig = torch.empty(b, parts, 4 * kbn * (d // 2), device=dev, dtype=torch.float32)  # per-program sin/cos scratch
    q = query[:, :, 0]
    qc = query_cos[:, 0].expand(b, d) if query_cos.shape[0] == 1 else query_cos[:, 0]
    qs = query_sin[:, 0].expand(b, d) if query_sin.shape[0] == 1 else query_sin[:, 0]
    if qc.stride(-1) != 1 or qs.stride(-1) != 1 or qs.stride(0) != qc.stride(0):
        qc, qs = qc.contiguous(), qs.contiguous()
    wk, wv = same_strides(cache.window_keys, cache.window_values)
    sk, sv = same_strides(cache.sink_keys, cache.sink_values)
    window = sliding_window if sliding_window else total + 1
    _decode_kernel[(parts, b)](
        q, qc, qs, inv_freq.float().contiguous(),
        cache.key_codes, cache.value_codes, cache.key_table.float().contiguous(), cache.value_table.float().contiguous(),
        cache.key_zero.float().contiguous(), cache.key_scale.float().contiguous(), cache.value_zero, cache.value_scale,
        cache.key_outlier_begin, cache.key_entry_values, cache.key_entry_channels, cache.key_nnz,
        cache.value_outlier_values, cache.value_outlier_index,
        cache.positions, sk, sv, cache.sink_slot.contiguous(), wk, wv, mask_arg,
        scores, part_m, part_l, part_acc, trig,
        q.stride(0), q.stride(1), qc.stride(0), cache.key_entry_values.stride(0), sk.stride(0), sk.stride(1), sk.stride(2), wk.stride(0), wk.stride(1), wk.stride(2), m_sb,
        cache.key_codes.shape[2], cache.begin - cache.offset, length, wk.shape[2], cache.begin, s, split_len, splits, window,
        softmax_scale * LOG2E, attention_scaling,
        H=h, HP=hp, G=g, GP=gp, D=d, BITS=cache.bits, W=cache.key_codes.shape[3],
        S_PAD=next_pow2(s), HAS_OUTLIERS=s > 0, HAS_KEY_OUTLIERS=cache.has_key_outliers, N_SINK=n_sink, NS_PAD=next_pow2(max(n_sink, 1)), MASK_KIND=mask_kind, BLOCK_N=block_n, FAST_TRIG=fast_trig(),
        VBN=value_block(h, d, warps), SHFL=shuffle_lookup(), KBN=kbn, MBN=max(1, 1024 // (hp * gp)),
        num_warps=warps,
    )
    out = torch.empty(b, 1, hq, d, device=dev, dtype=query.dtype)
    _combine_kernel[(hq, b)](part_m, part_l, part_acc, out, parts, out.stride(0), out.stride(2), HQ=hq, D=d, P_PAD=next_pow2(parts))
    return out
