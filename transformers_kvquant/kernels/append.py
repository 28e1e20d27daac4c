"""Append: quantize new tokens and pack them into the cache.

One program per (token, row, KV head): keys with the calibrated per-channel ranges; values with the token's range,
which spans every head after each head drops its outliers; codes by counting decision boundaries (what
``torch.bucketize`` does), the bounded outliers by repeated arg-max, the codes packed into the reader layout in
registers; then what is kept exactly (position, recent-window ring, sink: :func:`~.naive.write_exact`'s work). The
slot is the device length plus the token's index, so no host value is needed; slots past the capacity are never
written. Only the length is advanced by a tensor op after the launch (the programs read it).

A decode step (one token) is one launch: each program of the token finds the token's value range itself (a second
launch would cost more than the repeated reductions). That made the decode append cheap: one program per token and
row walked every head in turn, and write_exact's dozen small tensor ops each cost a launch. A prefill chunk (many
tokens) takes two launches, the value ranges (a program per token and row), then the rest (each program reading
only its head): one launch would read every head's values once per head, which made the append 30% of a 32K
prefill of LLaMA-2-7B on an H200 (docs/e2e.md). The PyTorch reference is :func:`~.naive.append_reference`.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from .layout import PackedCache, nibble_channels, on_input_device


@triton.jit
def _pack_words(code, HP: tl.constexpr, NS: tl.constexpr, BITS: tl.constexpr):
    """Codes ``[HP, D]`` in nibble order (position ``8w + n`` = nibble ``n`` of selector ``w``) -> int32 words
    ``[HP, NW]`` (``NW`` = 4 per 3-bit group, the 4th unused; bits that do not overlap, so sums are ORs)."""
    nib = tl.arange(0, 8)
    if BITS == 4:
        c = tl.reshape(code, (HP, NS, 8))
        return tl.sum(c << (4 * nib)[None, None, :], 2)
    elif BITS == 2:
        c = tl.reshape(code, (HP, NS // 2, 2, 8))
        j = tl.arange(0, 2)
        return tl.sum(tl.sum(c << (4 * nib[None, None, None, :] + 2 * j[None, None, :, None]), 3), 2)
    else:
        c = tl.reshape(code, (HP, NS // 4, 4, 8))
        k = tl.arange(0, 4)[None, None, :, None]
        sp = tl.sum(tl.where(k == 3, c, 0), 2)  # [HP, NS/4, 8] the spare selector
        parts = (c & 7) | (((sp[:, :, None, :] >> k) & 1) << 3)
        return tl.reshape(tl.sum(parts << (4 * nib)[None, None, None, :], 3), (HP, NS))


@triton.jit
def _store_words(ptr, words, hh, hmask, slot, ok, H, cap, b, W: tl.constexpr, NW: tl.constexpr, BITS: tl.constexpr):
    """Store ``[HP, NW]`` words at ``ptr[b, h, w, slot]``; 3 bits: entry ``4g + k`` is word ``3g + k`` (k < 3)."""
    q = tl.arange(0, NW)
    if BITS == 3:
        w = (q // 4) * 3 + q % 4
        real = (q % 4) < 3
    else:
        w = q
        real = q < NW
    addr = ptr + ((b * H + hh[:, None]) * W + w[None, :]).to(tl.int64) * cap + slot
    tl.store(addr, words, mask=(hmask & ok)[:, None] & real[None, :])


@triton.jit
def _pick(x, pos, col):
    """``x[h, pos[h]]`` for every head ``h``."""
    return tl.sum(tl.where(col[None, :] == pos[:, None], x, 0.0), 1)


@triton.jit
def _append_kernel(
    k_ptr, v_ptr, p_ptr, k_sb, k_sh, k_st, v_sb, v_sh, v_st,
    kchan_ptr, kz_ptr, ks_ptr, kb_ptr, ktab_ptr, vb_ptr, vtab_ptr,
    kc_ptr, vc_ptr, vz_ptr, vs_ptr, kov_ptr, koi_ptr, vov_ptr, voi_ptr, len_ptr,
    pos_ptr, wk_ptr, wv_ptr, sk_ptr, sv_ptr, sslot_ptr,
    H, cap, n_new, ring,
    VR: tl.constexpr, D: tl.constexpr, BITS: tl.constexpr, SK: tl.constexpr, SV: tl.constexpr,
    N_SINK: tl.constexpr, EXACT: tl.constexpr, PHASE: tl.constexpr,
):
    # PHASE 0: everything in one launch (every program finds its token's value range over all heads). PHASE 1: only
    # the token's value range (a program per token and row). PHASE 2: the rest, the range read back from the cache,
    # each program reading only its own head's values. VR value rows: the heads padded to a power of two in phases
    # 0 and 1, 2 in phase 2 (its head and an unused row).
    i = tl.program_id(0)
    b = tl.program_id(1)
    h = tl.program_id(2)
    slot = tl.sum(tl.load(len_ptr + tl.arange(0, 1)), 0) + i
    one = tl.arange(0, 1)
    NB: tl.constexpr = (1 << BITS) - 1
    NS: tl.constexpr = D // 8
    W: tl.constexpr = D * BITS // 32
    NW: tl.constexpr = NS if BITS == 3 else (NS // 2 if BITS == 2 else NS)
    pk = tl.arange(0, D)  # nibble-order position

    # ---------------------------------------------------------------- keys of head h
    ok1 = (slot + 0 * one) < cap  # [1]
    if PHASE != 1:
        _append_keys(k_ptr, k_sb, k_sh, k_st, kchan_ptr, kz_ptr, ks_ptr, kb_ptr, ktab_ptr, kc_ptr, kov_ptr, koi_ptr,
                     i, b, h, H, cap, slot, ok1, D, BITS, SK, NB, NS, W, NW)

    # ---------------------------------------------------------------- values: the token's range spans every head
    # (in phase 0 every program of the token finds it again: cheaper than a second launch for a decode step, and
    # the heads' codes run in parallel; a prefill's many tokens take phases 1 and 2 instead)
    vr = tl.arange(0, VR)
    if PHASE == 2:
        vhead = h + vr
        vmask = vr == 0
    else:
        vhead = vr
        vmask = vr < H
    mine = vmask & (vhead == h)
    x = tl.load(v_ptr + b * v_sb + vhead[:, None] * v_sh + i * v_st + pk[None, :], mask=vmask[:, None], other=0.0).to(tl.float32)
    SV1: tl.constexpr = SV + 1
    SVP: tl.constexpr = 2 if SV1 <= 2 else (4 if SV1 <= 4 else (8 if SV1 <= 8 else 16))
    col = tl.arange(0, SVP)
    top_v = tl.zeros((VR, SVP), tl.float32)
    top_i = tl.zeros((VR, SVP), tl.int32)
    bot_v = tl.zeros((VR, SVP), tl.float32)
    bot_i = tl.zeros((VR, SVP), tl.int32)
    hi_work = x
    lo_work = x
    for j in tl.static_range(SV1):
        m = tl.max(hi_work, 1)
        p = tl.min(tl.where(hi_work == m[:, None], pk[None, :], D), 1)
        top_v = tl.where(col[None, :] == j, m[:, None], top_v)
        top_i = tl.where(col[None, :] == j, p[:, None], top_i)
        hi_work = tl.where(pk[None, :] == p[:, None], float("-inf"), hi_work)
        m = tl.min(lo_work, 1)
        p = tl.min(tl.where(lo_work == m[:, None], pk[None, :], D), 1)
        bot_v = tl.where(col[None, :] == j, m[:, None], bot_v)
        bot_i = tl.where(col[None, :] == j, p[:, None], bot_i)
        lo_work = tl.where(pk[None, :] == p[:, None], float("inf"), lo_work)
    # j low and SV - j high ones dropped; the first smallest remaining range wins (torch's argmin)
    best = tl.full((VR,), float("inf"), tl.float32)
    low = tl.zeros((VR,), tl.int32)
    for j in tl.static_range(SV1):
        r = _pick(top_v, tl.full((VR,), SV - j, tl.int32), col) - _pick(bot_v, tl.full((VR,), j, tl.int32), col)
        better = r < best
        best = tl.where(better, r, best)
        low = tl.where(better, j, low)
    high = SV - low
    if PHASE == 2:
        zero = tl.sum(tl.load(vz_ptr + b * cap + slot + one, mask=slot + one < cap, other=0.0), 0)
        scale = tl.sum(tl.load(vs_ptr + b * cap + slot + one, mask=slot + one < cap, other=1.0), 0)
    else:
        vmax = tl.max(tl.where(vmask, _pick(top_v, high, col), float("-inf")), 0)
        vmin = tl.min(tl.where(vmask, _pick(bot_v, low, col), float("inf")), 0)
        zero = ((vmax + vmin) / 2).to(vz_ptr.dtype.element_ty)
        scale = ((vmax - vmin) / 2).to(vs_ptr.dtype.element_ty)
        scale = tl.where(scale > 0, scale, 1.0).to(vs_ptr.dtype.element_ty)
        first = (h + one == 0) & (slot + one < cap)  # one program of the token writes what is per token
        tl.store(vz_ptr + b * cap + slot + one, zero + tl.zeros((1,), zero.dtype), mask=first)
        tl.store(vs_ptr + b * cap + slot + one, scale + tl.zeros((1,), scale.dtype), mask=first)
    if PHASE != 1:
        _append_values_and_exact(
            x, mine, high, top_i, bot_i, zero, scale, col, pk, vb_ptr, vtab_ptr, vc_ptr, vov_ptr, voi_ptr,
            k_ptr, v_ptr, p_ptr, k_sb, k_sh, k_st, v_sb, v_sh, v_st, pos_ptr, wk_ptr, wv_ptr, sk_ptr, sv_ptr, sslot_ptr,
            i, b, h, H, cap, n_new, ring, slot, ok1, D, BITS, SV, NB, NS, W, NW, N_SINK, EXACT)


@triton.jit
def _append_keys(k_ptr, k_sb, k_sh, k_st, kchan_ptr, kz_ptr, ks_ptr, kb_ptr, ktab_ptr, kc_ptr, kov_ptr, koi_ptr,
                 i, b, h, H, cap, slot, ok1, D: tl.constexpr, BITS: tl.constexpr, SK: tl.constexpr,
                 NB: tl.constexpr, NS: tl.constexpr, W: tl.constexpr, NW: tl.constexpr):
    """Codes and bounded outliers of head ``h``'s key (calibrated per-channel ranges)."""
    one_h = tl.arange(0, 1)
    chk = tl.load(kchan_ptr + tl.arange(0, D))  # the channel at each nibble position
    x = tl.load(k_ptr + b * k_sb + h * k_sh + i * k_st + chk[None, :]).to(tl.float32)  # [1, D]: the helpers' [heads, D]
    z = tl.load(kz_ptr + h * D + chk[None, :])
    s = tl.load(ks_ptr + h * D + chk[None, :])
    xn = tl.math.div_rn(x - z, s)
    code = tl.zeros((1, D), tl.int32)
    for j in tl.static_range(NB):
        code += (xn > tl.load(kb_ptr + j)).to(tl.int32)
    cent = tl.load(ktab_ptr + code)
    _store_words(kc_ptr, _pack_words(code, 1, NS, BITS), h + one_h, ok1, slot, ok1, H, cap, b, W, NW, BITS)
    err = tl.abs(xn - cent)
    approx = cent * s + z
    for e in tl.static_range(SK):
        # the largest error; among equal ones the lowest channel (the reference's stable sort)
        m = tl.max(err, 1)
        ch = tl.min(tl.where(err == m[:, None], chk[None, :], D), 1)
        hit = chk[None, :] == ch[:, None]
        res = tl.sum(tl.where(hit, x - approx, 0.0), 1)
        o = ((b * H + h + one_h) * SK + e).to(tl.int64) * cap + slot
        tl.store(kov_ptr + o, res.to(kov_ptr.dtype.element_ty), mask=ok1)
        tl.store(koi_ptr + o, ch.to(tl.uint8), mask=ok1)
        err = tl.where(hit, -1.0, err)


@triton.jit
def _append_values_and_exact(
    x, mine, high, top_i, bot_i, zero, scale, col, pk, vb_ptr, vtab_ptr, vc_ptr, vov_ptr, voi_ptr,
    k_ptr, v_ptr, p_ptr, k_sb, k_sh, k_st, v_sb, v_sh, v_st, pos_ptr, wk_ptr, wv_ptr, sk_ptr, sv_ptr, sslot_ptr,
    i, b, h, H, cap, n_new, ring, slot, ok1, D: tl.constexpr, BITS: tl.constexpr, SV: tl.constexpr, NB: tl.constexpr,
    NS: tl.constexpr, W: tl.constexpr, NW: tl.constexpr, N_SINK: tl.constexpr, EXACT: tl.constexpr,
):
    """Head ``h``'s value codes and bounded outliers with the token's range, then what is kept exactly (position,
    recent-window ring, sink: :func:`~.naive.write_exact`'s work). ``x`` ``[VR, D]``: the value rows, ``mine`` the
    row of head ``h``."""
    one = tl.arange(0, 1)
    z32 = zero.to(tl.float32)
    s32 = scale.to(tl.float32)
    xh = tl.sum(tl.where(mine[:, None], x, 0.0), 0)[None, :]  # [1, D] this head's values
    xn = tl.math.div_rn(xh - z32, s32)
    code = tl.zeros((1, D), tl.int32)
    for j in tl.static_range(NB):
        code += (xn > tl.load(vb_ptr + j)).to(tl.int32)
    _store_words(vc_ptr, _pack_words(code, 1, NS, BITS), h + one, ok1, slot, ok1, H, cap, b, W, NW, BITS)
    approx = tl.load(vtab_ptr + code) * s32 + z32
    high_h = tl.sum(tl.where(mine, high, 0), 0) + 0 * one
    top_h = tl.sum(tl.where(mine[:, None], top_i, 0), 0)[None, :]  # [1, SVP]
    bot_h = tl.sum(tl.where(mine[:, None], bot_i, 0), 0)[None, :]
    for e in tl.static_range(SV):
        from_top = e < high_h
        ti = tl.sum(tl.where(col[None, :] == e, top_h, 0), 1)
        bi = tl.sum(tl.where(col[None, :] == (e - high_h)[:, None], bot_h, 0), 1)
        pos = tl.where(from_top, ti, bi)
        res = _pick(xh, pos, pk) - _pick(approx, pos, pk)
        o = ((b * H + h + one) * SV + e).to(tl.int64) * cap + slot
        tl.store(vov_ptr + o, res.to(vov_ptr.dtype.element_ty), mask=ok1)
        tl.store(voi_ptr + o, pos.to(tl.uint8), mask=ok1)

    # ---------------------------------------------------------------- what is kept exactly (naive.write_exact)
    p_tok = tl.load(p_ptr + b * n_new + i)
    tl.store(pos_ptr + b * cap + slot + one, p_tok + 0 * one, mask=(h + one == 0) & ok1)
    if EXACT:
        # the recent-window ring: only the newest `ring` tokens of this append fit (the others would collide)
        kx = tl.load(k_ptr + b * k_sb + h * k_sh + i * k_st + pk)  # channel order
        vx = tl.load(v_ptr + b * v_sb + h * v_sh + i * v_st + pk)
        dst = ((b * H + h) * ring + slot % ring).to(tl.int64) * D + pk
        keep = (i + 0 * pk) >= n_new - ring  # [D]
        tl.store(wk_ptr + dst, kx.to(wk_ptr.dtype.element_ty), mask=keep)
        tl.store(wv_ptr + dst, vx.to(wv_ptr.dtype.element_ty), mask=keep)
    if N_SINK > 0:
        # the sink: a token at position p < N is copied, unless a later token of this append has the same position
        # (left padding gives pad slots position 0 before the real first token: the last one wins)
        is_sink = (p_tok >= 0) & (p_tok < N_SINK)
        later = p_tok * 0
        if is_sink:
            for j0 in range(i + 1, n_new, 128):
                jj = j0 + tl.arange(0, 128)
                pj = tl.load(p_ptr + b * n_new + jj, mask=jj < n_new, other=-1)
                later += tl.sum((pj == p_tok).to(tl.int32), 0)
        take = ((p_tok + 0 * pk) >= 0) & ((p_tok + 0 * pk) < N_SINK) & ((later + 0 * pk) == 0)  # [D]
        kx = tl.load(k_ptr + b * k_sb + h * k_sh + i * k_st + pk)
        vx = tl.load(v_ptr + b * v_sb + h * v_sh + i * v_st + pk)
        dst = ((b * H + h) * N_SINK + p_tok).to(tl.int64) * D + pk
        tl.store(sk_ptr + dst, kx.to(sk_ptr.dtype.element_ty), mask=take)
        tl.store(sv_ptr + dst, vx.to(sv_ptr.dtype.element_ty), mask=take)
        tl.store(sslot_ptr + b * N_SINK + p_tok + one, slot.to(tl.int64) + 0 * one, mask=(h + one == 0) & (tl.max(take.to(tl.int32), 0) + one > 0))


PREFILL_WARPS = 1  # warps of a prefill chunk's per-head programs (a [2, D] tile each; benchmarks/append_prefill.py)
STEP_WARPS = 0  # warps of a decode step's programs; 0: by the size of the value tile (step_warps)


def step_warps(heads: int, head_dim: int) -> int:
    """Warps of a decode step's one launch: each program holds every head's values ``[heads, head_dim]``. Measured
    on an H200 (docs/kernels.md, µs of the launch at 1/2/4/8 warps): 32 x 128 35.5/16.2/13.9/12.2, 8 x 128
    10.7/10.9/10.2/9.9, SmolLM2's 3 x 64 7.5/7.7/7.5/8.2."""
    return STEP_WARPS or (8 if heads * head_dim >= 1024 else 4)


@functools.cache
def _channels(head_dim: int, device: str) -> torch.Tensor:
    return torch.tensor(nibble_channels(head_dim, True), dtype=torch.int32, device=device)


def prepare(head_dim: int, device) -> None:
    """Make the kernel's device tables for ``head_dim`` now (call outside compiled or captured code)."""
    _channels(head_dim, str(device))


@on_input_device
def append_slots(cache: PackedCache, keys: torch.Tensor, values: torch.Tensor, positions: torch.Tensor) -> None:
    """Quantize and pack ``keys``/``values`` ``[B, H, T, D]`` into slots ``length .. length + T``: codes, ranges,
    outliers, positions, the recent-window ring and the sink: one launch of a program per (token, row, KV head) for a
    decode step, two for more tokens (the value ranges, then the rest). The length is not advanced (the programs
    read it)."""
    b, h, n, d = keys.shape
    if n == 0:
        return
    sk = cache.key_outlier_index.shape[2]
    sv = cache.value_outlier_index.shape[2]
    kov, koi = (cache.key_outlier_values, cache.key_outlier_index) if sk else (cache.value_zero, cache.key_codes)
    vov, voi = (cache.value_outlier_values, cache.value_outlier_index) if sv else (cache.value_zero, cache.key_codes)
    ring = cache.window_keys.shape[2] if cache.recent_window else 0
    rows = max(2, triton.next_power_of_2(h))  # every head's value row, padded to a power of two
    args = (
        keys, values, positions.to(torch.int32).contiguous(), *keys.stride()[:3], *values.stride()[:3],
        _channels(d, str(keys.device)), cache.key_zero, cache.key_scale, cache.key_bounds, cache.key_table,
        cache.value_bounds, cache.value_table,
        cache.key_codes, cache.value_codes, cache.value_zero, cache.value_scale, kov, koi, vov, voi, cache.length,
        cache.positions, cache.window_keys, cache.window_values, cache.sink_keys, cache.sink_values, cache.sink_slot,
        h, cache.capacity, n, max(ring, 1),
    )
    meta = dict(D=d, BITS=cache.bits, SK=sk, SV=sv, N_SINK=cache.sink_slot.shape[1], EXACT=ring > 0)
    if n == 1:  # a decode step: one launch, each program finding the token's value range itself
        _append_kernel[(n, b, h)](*args, **meta, PHASE=0, VR=rows, num_warps=step_warps(h, d))
    else:
        # many tokens (a prefill chunk): their value ranges first, a program per token, then the rest, each program
        # reading only its own head (one launch per token would read every head once per head: H times the bytes)
        _append_kernel[(n, b, 1)](*args, **meta, PHASE=1, VR=rows, num_warps=4 if h * d <= 4096 else 8)
        _append_kernel[(n, b, h)](*args, **meta, PHASE=2, VR=2, num_warps=PREFILL_WARPS)


def append_packed(cache: PackedCache, keys: torch.Tensor, values: torch.Tensor, positions: torch.Tensor) -> None:
    """The whole append of new tokens (the Triton path of :func:`~.naive.append_reference`): one launch, then the
    device length advanced."""
    if keys.shape[2] == 0:
        return
    append_slots(cache, keys, values, positions)
    cache.length.add_(keys.shape[2])
