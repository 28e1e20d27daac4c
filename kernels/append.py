"""Append: quantize and pack new tokens straight into the cache buffers.

The per-token choices that need a sort or a variable-size output (key outliers: every element outside its channel's
calibrated range, as CSR entries; value outliers and the value range left after removing them: ``torch.topk``)
are made in PyTorch (:func:`~.naive.select_outliers`); the element-wise work (normalize, nearest centroid, bit
packing, storing into the buffers at the right slots) is one Triton kernel for keys and values together, so no
fp32 copy of the chunk's codes is ever materialized. Codes equal the PyTorch quantizer's bit for bit: the
normalization uses IEEE division (``div_rn``) and a code is the number of decision thresholds strictly below the
normalized value (``torch.bucketize``'s rule).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .layout import next_pow2, on_input_device, packed_words
from .naive import KeyOutliers, select_outliers

# The store's CUDA append path is enabled by this flag: the kernel writes its layout (row-wise CSR key outliers,
# returned for the store to append to its rows exactly like its PyTorch path).
CSR_KEY_OUTLIERS = True


@triton.jit
def _codes(x, bounds_ptr, NB: tl.constexpr):
    code = tl.zeros(x.shape, tl.int32)
    for i in tl.static_range(NB):
        code += (x > tl.load(bounds_ptr + i)).to(tl.int32)
    return code


@triton.jit
def _store_packed(codes, out_rows, row_mask, BT: tl.constexpr, D: tl.constexpr, BITS: tl.constexpr):
    """Pack ``[BT, D]`` codes into the int32 words at ``out_rows`` (``[BT]`` pointers to word 0)."""
    c = codes.to(tl.uint32)
    if BITS == 3:
        NG: tl.constexpr = D // 32
        c = tl.reshape(c, (BT, NG, 32))
        bit = tl.arange(0, 32) * 3
        word = (bit >> 5)[None, None, :]
        shift = (bit & 31)[None, None, :].to(tl.uint32)
        spill = shift > 29
        up = c << shift
        down = tl.where(spill, c >> ((32 - shift) & 31), 0)
        w0 = tl.sum(tl.where(word == 0, up, 0), axis=2)
        w1 = tl.sum(tl.where(word == 1, up, 0) + tl.where(word == 0, down, 0), axis=2)
        w2 = tl.sum(tl.where(word == 2, up, 0) + tl.where(word == 1, down, 0), axis=2)
        ptr = out_rows[:, None] + tl.arange(0, NG)[None, :] * 3
        m = row_mask[:, None]
        tl.store(ptr, w0.to(tl.int32, bitcast=True), mask=m)
        tl.store(ptr + 1, w1.to(tl.int32, bitcast=True), mask=m)
        tl.store(ptr + 2, w2.to(tl.int32, bitcast=True), mask=m)
    else:
        CPW: tl.constexpr = 32 // BITS
        NW: tl.constexpr = D // CPW
        c = tl.reshape(c, (BT, NW, CPW))
        shift = (tl.arange(0, CPW) * BITS)[None, None, :].to(tl.uint32)
        words = tl.sum(c << shift, axis=2)  # disjoint bit fields: the sum is a bitwise or
        ptr = out_rows[:, None] + tl.arange(0, NW)[None, :]
        tl.store(ptr, words.to(tl.int32, bitcast=True), mask=row_mask[:, None])


@triton.jit
def _append_kernel(
    k_ptr, v_ptr, kzero_ptr, kscale_ptr, kbounds_ptr, vbounds_ptr, vzero_ptr, vscale_ptr, kc_ptr, vc_ptr,
    k_sb, k_sh, k_st, v_sb, v_sh, v_st, vz_sb, vz_st, T, cap, at,
    H: tl.constexpr, D: tl.constexpr, BITS: tl.constexpr, W: tl.constexpr, BT: tl.constexpr,
):
    tb = tl.program_id(0)
    bh = tl.program_id(1)
    b = (bh // H).to(tl.int64)
    h = bh % H
    t = tb * BT + tl.arange(0, BT)
    tmask = t < T
    d = tl.arange(0, D)
    m2 = tmask[:, None]
    NB: tl.constexpr = (1 << BITS) - 1
    x = tl.load(k_ptr + b * k_sb + h * k_sh + t[:, None] * k_st + d[None, :], mask=m2, other=0.0).to(tl.float32)
    kz = tl.load(kzero_ptr + h * D + d)[None, :]
    ks = tl.load(kscale_ptr + h * D + d)[None, :]
    kcodes = _codes(tl.math.div_rn(x - kz, ks), kbounds_ptr, NB)
    rows = ((b * H + h) * cap + at + t) * W
    _store_packed(kcodes, kc_ptr + rows, tmask, BT, D, BITS)
    v = tl.load(v_ptr + b * v_sb + h * v_sh + t[:, None] * v_st + d[None, :], mask=m2, other=0.0).to(tl.float32)
    vz = tl.load(vzero_ptr + b * vz_sb + t * vz_st, mask=tmask, other=0.0).to(tl.float32)[:, None]
    vs = tl.load(vscale_ptr + b * vz_sb + t * vz_st, mask=tmask, other=1.0).to(tl.float32)[:, None]
    vcodes = _codes(tl.math.div_rn(v - vz, vs), vbounds_ptr, NB)
    _store_packed(vcodes, vc_ptr + rows, tmask, BT, D, BITS)


@on_input_device
def append_packed(
    keys: torch.Tensor,
    values: torch.Tensor,
    key_zero: torch.Tensor,
    key_scale: torch.Tensor,
    key_bounds: torch.Tensor,
    value_bounds: torch.Tensor,
    key_outliers: bool,
    value_slots: int,
    bits: int,
    buffers: dict[str, torch.Tensor],
    at: int,
    block_t: int | None = None,
) -> KeyOutliers | None:
    """Quantize ``[B, H, T, D]`` keys (pre-RoPE) and values into ``buffers`` at physical slot ``at``.

    ``buffers``: the store's tensors by name (``key_codes``/``value_codes`` ``[B, H, cap, W]`` contiguous int32;
    ``value_zero``/``value_scale`` ``[B, cap]``; ``value_outlier_values``/``value_outlier_index`` ``[B, cap, S]``).
    Writes exactly what :func:`~.naive.append_naive` returns and returns its key outliers (CSR over the new tokens,
    None without key outliers): the caller appends them to its rows' entry buffers and writes the slots' begins.
    """
    b, h, t, d = keys.shape
    if t == 0:
        return None
    kc, vc = buffers["key_codes"], buffers["value_codes"]
    if not (kc.is_contiguous() and vc.is_contiguous()) or kc.shape[3] != packed_words(d, bits):
        raise ValueError("code buffers must be contiguous [B, H, cap, packed_words(D, bits)]")
    key_zero = key_zero.float().contiguous()
    key_scale = key_scale.float().contiguous()
    chosen = select_outliers(keys, values, key_zero, key_scale, key_outliers, value_slots)
    del chosen["key_vectors"], chosen["value_vectors"]
    sparse = chosen.pop("key_outliers")
    for name, value in chosen.items():
        buffers[name].narrow(1, at, t).copy_(value)
    vz = buffers["value_zero"].narrow(1, at, t)
    vs = buffers["value_scale"].narrow(1, at, t)
    bt = block_t or max(1, min(next_pow2(t), 4096 // d))
    _append_kernel[(triton.cdiv(t, bt), b * h)](
        keys, values, key_zero, key_scale, key_bounds.float().contiguous(), value_bounds.float().contiguous(), vz, vs, kc, vc,
        keys.stride(0), keys.stride(1), keys.stride(2), values.stride(0), values.stride(1), values.stride(2),
        vz.stride(0), vz.stride(1), t, kc.shape[2], at,
        H=h, D=d, BITS=bits, W=kc.shape[3], BT=bt,
    )
    return sparse
