"""Prefill over the packed cache: a chunk of queries attends to the quantized prefix and to itself.

The chunk's own tokens are already appended (quantized, or exact in the recent window), so the whole context is
read from the packed buffers tile by tile and the full-precision K/V of the context never exists in memory.
Grid ``(query blocks, B * H)``: a program holds ``BLOCK_T`` query tokens times the ``G`` query heads of one KV
head (GQA rows share every dequantized tile), loops over key tiles up to its causal limit with an online
softmax, and computes ``q . k`` and ``p . v`` with ``tl.dot``. A key tile is used by a whole block of queries,
so outliers are applied densely: each value-outlier slot of a token, and each CSR key-outlier entry of a token (one
entry of every slot of the tile at a time, up to the tile's largest count), is compared against the tile's channels.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .layout import PackedKV, next_pow2, on_input_device, same_strides
from .triton_common import LOG2E, fast_trig, sincos, unpack_half


@triton.jit
def _dense_outliers(x, oi_ptr, ov_ptr, token_rows, rmask, n_outliers, channel0, S_MAX: tl.constexpr, HALF: tl.constexpr):
    """Replace elements of a ``[BLOCK_N, HALF]`` tile whose channel (``channel0 + j``) is a token's outlier."""
    j = tl.arange(0, HALF)
    for s in range(n_outliers):
        idx = tl.load(oi_ptr + token_rows * n_outliers + s, mask=rmask, other=-1).to(tl.int32)
        val = tl.load(ov_ptr + token_rows * n_outliers + s, mask=rmask, other=0.0).to(tl.float32)
        hit = idx[:, None] == channel0 + j[None, :]
        x = tl.where(hit, val[:, None], x)
    return x


@triton.jit
def _dense_key_outliers(x, kbeg_ptr, kev_ptr, kec_ptr, knnz_ptr, b, ke_sb, token_rows, rel, rmask, packed_len, channel0, HALF: tl.constexpr):
    """Replace elements of a ``[BLOCK_N, HALF]`` key tile that are CSR key outliers of their slot (channels
    ``channel0 + j``): one entry of every slot at a time, up to the tile's largest count."""
    j = tl.arange(0, HALF)
    ent0 = tl.load(kbeg_ptr + token_rows, mask=rmask, other=0)
    ent1 = tl.load(kbeg_ptr + token_rows + 1, mask=rmask & (rel + 1 < packed_len), other=0)
    ent1 = tl.where(rel + 1 >= packed_len, tl.load(knnz_ptr + b).to(tl.int32), ent1)
    ent1 = tl.where(rmask, ent1, ent0)
    for i in range(0, tl.max(ent1 - ent0, axis=0)):
        ent = ent0 + i
        ok = ent < ent1
        idx = tl.load(kec_ptr + b * ke_sb + ent, mask=ok, other=-1).to(tl.int32)
        val = tl.load(kev_ptr + b * ke_sb + ent, mask=ok, other=0.0).to(tl.float32)
        x = tl.where(idx[:, None] == channel0 + j[None, :], val[:, None], x)
    return x


@triton.jit
def _prefill_kernel(
    q_ptr, qc_ptr, qs_ptr, inv_freq_ptr,
    kc_ptr, vc_ptr, ktab_ptr, vtab_ptr, kzero_ptr, kscale_ptr, vzero_ptr, vscale_ptr,
    kbeg_ptr, kev_ptr, kec_ptr, knnz_ptr, vov_ptr, voi_ptr, pos_ptr,
    sink_k_ptr, sink_v_ptr, sink_slot_ptr, win_k_ptr, win_v_ptr, mask_ptr, out_ptr,
    q_sb, q_sh, q_st, c_sb, c_st, ke_sb, sk_sb, sk_sh, sk_sn, wk_sb, wk_sh, wk_sn, m_sb, m_st, o_sb, o_st, o_sh,
    T, cap, first, packed_len, n_window, begin, n_outliers, window,
    scale, rope_scale,
    H: tl.constexpr, G: tl.constexpr, GP: tl.constexpr, D: tl.constexpr, BITS: tl.constexpr, W: tl.constexpr,
    HAS_KEY_OUTLIERS: tl.constexpr, N_SINK: tl.constexpr, MASK_KIND: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_N: tl.constexpr, DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr, FAST_TRIG: tl.constexpr,
):
    HALF: tl.constexpr = D // 2
    BLOCK_M: tl.constexpr = BLOCK_T * GP
    qb = tl.program_id(0)
    bh = tl.program_id(1)
    b = (bh // H).to(tl.int64)
    h = bh % H
    total = packed_len + n_window
    r = tl.arange(0, BLOCK_M)
    t = qb * BLOCK_T + r // GP
    g = r % GP
    rmask = (t < T) & (g < G)
    q_slot = total - T + t  # relative slot of each row's query
    j = tl.arange(0, HALF)
    # Rotated, pre-scaled queries [BLOCK_M, HALF] x 2 (fp32), as in HF: q*cos + rotate_half(q)*sin.
    qbase = q_ptr + b * q_sb + (h * G + g)[:, None] * q_sh + t[:, None] * q_st + j[None, :]
    q_lo = tl.load(qbase, mask=rmask[:, None], other=0.0).to(tl.float32)
    q_hi = tl.load(qbase + HALF, mask=rmask[:, None], other=0.0).to(tl.float32)
    cbase = b * c_sb + t[:, None] * c_st + j[None, :]
    c_lo = tl.load(qc_ptr + cbase, mask=rmask[:, None], other=0.0).to(tl.float32)
    c_hi = tl.load(qc_ptr + cbase + HALF, mask=rmask[:, None], other=0.0).to(tl.float32)
    s_lo = tl.load(qs_ptr + cbase, mask=rmask[:, None], other=0.0).to(tl.float32)
    s_hi = tl.load(qs_ptr + cbase + HALF, mask=rmask[:, None], other=0.0).to(tl.float32)
    qscale = scale * rope_scale
    qr_lo = ((q_lo * c_lo - q_hi * s_lo) * qscale).to(DOT_DTYPE)
    qr_hi = ((q_hi * c_hi + q_lo * s_hi) * qscale).to(DOT_DTYPE)
    inv_freq = tl.load(inv_freq_ptr + j)
    kz_lo = tl.load(kzero_ptr + h * D + j)
    kz_hi = tl.load(kzero_ptr + h * D + HALF + j)
    ks_lo = tl.load(kscale_ptr + h * D + j)
    ks_hi = tl.load(kscale_ptr + h * D + HALF + j)
    m_i = tl.full((BLOCK_M,), float("-inf"), tl.float32)
    l_i = tl.zeros((BLOCK_M,), tl.float32)
    acc_lo = tl.zeros((BLOCK_M, HALF), tl.float32)
    acc_hi = tl.zeros((BLOCK_M, HALF), tl.float32)
    # Key tiles from the first slot the block's first query may see (sliding window) to the last query's slot.
    end = total - T + (qb + 1) * BLOCK_T  # past the last query of the block (masked beyond the chunk)
    start = total - T + qb * BLOCK_T - window + 1
    start = (start > 0).to(tl.int32) * start
    start = (start // BLOCK_N) * BLOCK_N
    n = tl.arange(0, BLOCK_N)
    for k0 in range(start, end, BLOCK_N):
        rel = k0 + n
        in_packed = rel < packed_len
        in_window = (rel >= packed_len) & (rel < total)
        phys = first + rel
        pos = tl.load(pos_ptr + b * cap + phys, mask=rel < total, other=0).to(tl.float32)
        token_rows = b * cap + phys
        rows = kc_ptr + ((b * H + h) * cap + phys) * W
        # --- keys: packed dequantization, dense outliers, exact sink and window rows, RoPE at stored positions
        k_lo = tl.load(ktab_ptr + unpack_half(rows, in_packed, 0, BITS, HALF, BLOCK_N)) * ks_lo[None, :] + kz_lo[None, :]
        k_hi = tl.load(ktab_ptr + unpack_half(rows, in_packed, W // 2, BITS, HALF, BLOCK_N)) * ks_hi[None, :] + kz_hi[None, :]
        if HAS_KEY_OUTLIERS:
            k_lo = _dense_key_outliers(k_lo, kbeg_ptr, kev_ptr, kec_ptr, knnz_ptr, b, ke_sb, token_rows, rel, in_packed, packed_len, h * D, HALF)
            k_hi = _dense_key_outliers(k_hi, kbeg_ptr, kev_ptr, kec_ptr, knnz_ptr, b, ke_sb, token_rows, rel, in_packed, packed_len, h * D + HALF, HALF)
        vrows = vc_ptr + ((b * H + h) * cap + phys) * W
        vz = tl.load(vzero_ptr + token_rows, mask=in_packed, other=0.0).to(tl.float32)[:, None]
        vs = tl.load(vscale_ptr + token_rows, mask=in_packed, other=0.0).to(tl.float32)[:, None]
        v_lo = tl.load(vtab_ptr + unpack_half(vrows, in_packed, 0, BITS, HALF, BLOCK_N)) * vs + vz
        v_hi = tl.load(vtab_ptr + unpack_half(vrows, in_packed, W // 2, BITS, HALF, BLOCK_N)) * vs + vz
        v_lo = _dense_outliers(v_lo, voi_ptr, vov_ptr, token_rows, in_packed, n_outliers, h * D, 0, HALF)
        v_hi = _dense_outliers(v_hi, voi_ptr, vov_ptr, token_rows, in_packed, n_outliers, h * D + HALF, 0, HALF)
        wrow = (rel - packed_len)[:, None]
        wbase = b * wk_sb + h * wk_sh + wrow * wk_sn + j[None, :]
        wm = in_window[:, None]
        k_lo = tl.where(wm, tl.load(win_k_ptr + wbase, mask=wm, other=0.0).to(tl.float32), k_lo)
        k_hi = tl.where(wm, tl.load(win_k_ptr + wbase + HALF, mask=wm, other=0.0).to(tl.float32), k_hi)
        v_lo = tl.where(wm, tl.load(win_v_ptr + wbase, mask=wm, other=0.0).to(tl.float32), v_lo)
        v_hi = tl.where(wm, tl.load(win_v_ptr + wbase + HALF, mask=wm, other=0.0).to(tl.float32), v_hi)
        for i in tl.static_range(N_SINK):
            srel = tl.load(sink_slot_ptr + b * N_SINK + i) - begin
            hit = ((rel == srel) & (srel < packed_len))[:, None]
            sbase = b * sk_sb + h * sk_sh + i * sk_sn + j[None, :]
            k_lo = tl.where(hit, tl.load(sink_k_ptr + sbase).to(tl.float32), k_lo)
            k_hi = tl.where(hit, tl.load(sink_k_ptr + sbase + HALF).to(tl.float32), k_hi)
            v_lo = tl.where(hit, tl.load(sink_v_ptr + sbase).to(tl.float32), v_lo)
            v_hi = tl.where(hit, tl.load(sink_v_ptr + sbase + HALF).to(tl.float32), v_hi)
        cos, sin = sincos(pos[:, None] * inv_freq[None, :], FAST_TRIG)
        kr_lo = (k_lo * cos - k_hi * sin).to(DOT_DTYPE)
        kr_hi = (k_hi * cos + k_lo * sin).to(DOT_DTYPE)
        s = tl.dot(qr_lo, tl.trans(kr_lo), input_precision=PRECISION) + tl.dot(qr_hi, tl.trans(kr_hi), input_precision=PRECISION)  # [BLOCK_M, BLOCK_N], log2 domain
        ok = (rel[None, :] <= q_slot[:, None]) & (rel[None, :] > q_slot[:, None] - window) & (rel < total)[None, :]
        s = tl.where(ok, s, float("-inf"))
        if MASK_KIND == 1:
            keep = tl.load(mask_ptr + b * m_sb + t[:, None] * m_st + rel[None, :], mask=rmask[:, None] & (rel < total)[None, :], other=0)
            s = tl.where(keep != 0, s, float("-inf"))
        elif MASK_KIND == 2:
            add = tl.load(mask_ptr + b * m_sb + t[:, None] * m_st + rel[None, :], mask=rmask[:, None] & (rel < total)[None, :], other=0.0)
            s = s + tl.maximum(add.to(tl.float32), -1e30) * 1.4426950408889634
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2(m_i - m_safe)
        p = tl.exp2(s - m_safe[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        pd = p.to(DOT_DTYPE)
        acc_lo = acc_lo * alpha[:, None] + tl.dot(pd, v_lo.to(DOT_DTYPE), input_precision=PRECISION)
        acc_hi = acc_hi * alpha[:, None] + tl.dot(pd, v_hi.to(DOT_DTYPE), input_precision=PRECISION)
        m_i = m_new
    denom = tl.where(l_i > 0, l_i, 1.0)[:, None]
    obase = out_ptr + b * o_sb + t[:, None] * o_st + (h * G + g)[:, None] * o_sh + j[None, :]
    tl.store(obase, (acc_lo / denom).to(out_ptr.dtype.element_ty), mask=rmask[:, None])
    tl.store(obase + HALF, (acc_hi / denom).to(out_ptr.dtype.element_ty), mask=rmask[:, None])


_DOT = {torch.float16: tl.float16, torch.bfloat16: tl.bfloat16, torch.float32: tl.float32}


@on_input_device
def prefill_attention(
    query: torch.Tensor,
    query_cos: torch.Tensor,
    query_sin: torch.Tensor,
    cache: PackedKV,
    inv_freq: torch.Tensor,
    attention_scaling: float,
    softmax_scale: float,
    mask: torch.Tensor | None = None,
    sliding_window: int = 0,
    block_t: int | None = None,
    block_n: int = 32,
    num_warps: int | None = None,
) -> torch.Tensor:
    """Attention of ``T`` queries ``[B, Hq, T, D]`` (un-rotated, at the last ``T`` visible slots) over the cache.

    ``query_cos/sin``: ``[B or 1, T, D]``; ``mask``: None, bool or additive ``[B, 1, T, total]``. Causal order and
    the sliding window come from slot numbers. ``q . k`` and ``p . v`` run in the query's dtype on tensor cores
    (exact fp32 products for fp32 models). Returns ``[B, T, Hq, D]`` in the query's dtype.
    """
    cache.check()
    b, hq, t, d = query.shape
    h = cache.heads
    g = hq // h
    gp = next_pow2(g)
    block_t = block_t or max(1, 64 // gp)
    num_warps = num_warps or (8 if d >= 128 else 4)
    total = cache.total
    if t > total:
        raise ValueError(f"{t} queries but only {total} visible slots (the chunk must be appended first)")
    mask_kind, mask_arg, m_sb, m_st = 0, query, 0, 0
    if mask is not None:
        m4 = mask if mask.dim() == 4 else mask[:, None]
        m3 = m4[:, 0, -t:, -total:]
        if m3.shape[-1] != total:
            raise ValueError(f"mask covers {m3.shape[-1]} slots, the cache shows {total}")
        mask_kind, mask_arg = (1, m3.view(torch.uint8)) if m3.dtype == torch.bool else (2, m3)
        if mask_arg.stride(-1) != 1:
            mask_arg = mask_arg.contiguous()
        m_sb, m_st = mask_arg.stride(0), mask_arg.stride(1)
    qc = query_cos.expand(b, t, d) if query_cos.shape[0] == 1 else query_cos
    qs = query_sin.expand(b, t, d) if query_sin.shape[0] == 1 else query_sin
    if qc.stride() != qs.stride() or qc.stride(-1) != 1:
        qc, qs = qc.contiguous(), qs.contiguous()
    wk, wv = same_strides(cache.window_keys, cache.window_values)
    sk, sv = same_strides(cache.sink_keys, cache.sink_values)
    out = torch.empty(b, t, hq, d, device=query.device, dtype=query.dtype)
    window = sliding_window if sliding_window else total + 1
    grid = (triton.cdiv(t, block_t), b * h)
    _prefill_kernel[grid](
        query, qc, qs, inv_freq.float().contiguous(),
        cache.key_codes, cache.value_codes, cache.key_table.float().contiguous(), cache.value_table.float().contiguous(),
        cache.key_zero.float().contiguous(), cache.key_scale.float().contiguous(), cache.value_zero, cache.value_scale,
        cache.key_outlier_begin, cache.key_entry_values, cache.key_entry_channels, cache.key_nnz,
        cache.value_outlier_values, cache.value_outlier_index,
        cache.positions, sk, sv, cache.sink_slot.contiguous(), wk, wv, mask_arg, out,
        query.stride(0), query.stride(1), query.stride(2), qc.stride(0), qc.stride(1), cache.key_entry_values.stride(0),
        sk.stride(0), sk.stride(1), sk.stride(2), wk.stride(0), wk.stride(1), wk.stride(2), m_sb, m_st,
        out.stride(0), out.stride(1), out.stride(2),
        t, cache.key_codes.shape[2], cache.begin - cache.offset, cache.packed_len, wk.shape[2], cache.begin,
        cache.outlier_slots, window, softmax_scale * LOG2E, attention_scaling,
        H=h, G=g, GP=gp, D=d, BITS=cache.bits, W=cache.key_codes.shape[3], HAS_KEY_OUTLIERS=cache.has_key_outliers, N_SINK=cache.sink_slot.shape[1],
        MASK_KIND=mask_kind, BLOCK_T=block_t, BLOCK_N=block_n, DOT_DTYPE=_DOT[query.dtype], PRECISION="ieee" if query.dtype == torch.float32 else "tf32", FAST_TRIG=fast_trig(), num_warps=num_warps,
    )
    return out
