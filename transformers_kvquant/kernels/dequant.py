"""Dequantize a range of packed slots into pre-RoPE keys and values (the prefill path's read of the packed prefix).

A chunk of queries attends over the whole packed prefix with the model's own attention (SDPA / flash), so the
prefix is decoded here, one layer at a time, into the model dtype: codes through the codebook, scale and zero,
outlier residuals added; the exact window and sink are written in by :func:`~.naive.apply_exact`. The PyTorch
reference is :func:`~.naive.dequantize`.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from .layout import PackedCache, nibble_channels, on_input_device
from .naive import apply_exact


@functools.cache
def _bit_sources(head_dim: int, bits: int, keys: bool) -> tuple:
    """Per channel, up to three (word, shift, mask, destination bit) pieces whose OR is its code."""
    by_nibble = nibble_channels(head_dim, keys)
    where = {ch: divmod(i, 8) for i, ch in enumerate(by_nibble)}  # channel -> (selector, nibble)
    rows = []
    for ch in range(head_dim):
        w, n = where[ch]
        if bits == 4:
            parts = [(w, 4 * n, 15, 0)]
        elif bits == 2:
            parts = [(w // 2, 4 * n + 2 * (w % 2), 3, 0)]
        else:
            g, k = divmod(w, 4)
            parts = [(3 * g + k, 4 * n, 7, 0)] if k < 3 else [(3 * g + j, 4 * n + 3, 1, j) for j in range(3)]
        parts += [(0, 0, 0, 0)] * (3 - len(parts))
        rows.append(parts)
    return tuple(tuple(p) for p in rows)


@functools.cache
def _bit_sources_on(head_dim: int, bits: int, keys: bool, device: str) -> torch.Tensor:
    return torch.tensor(_bit_sources(head_dim, bits, keys), dtype=torch.int32, device=device)


def bit_sources(head_dim: int, bits: int, keys: bool, device) -> torch.Tensor:
    """:func:`_bit_sources` as int32 ``[D, 3, 4]`` on ``device`` (made once per device)."""
    return _bit_sources_on(head_dim, bits, keys, str(device))


@triton.jit
def _dequant_kernel(codes_ptr, src_ptr, table_ptr, scale_ptr, zero_ptr, ov_ptr, oi_ptr, out_ptr,
                    H, cap, begin, end, o_sb, o_sh, o_st,
                    W: tl.constexpr, D: tl.constexpr, S: tl.constexpr, BT: tl.constexpr, PER_CHANNEL: tl.constexpr):
    pid_t = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    t = begin + pid_t * BT + tl.arange(0, BT)
    live = t < end
    dd = tl.arange(0, D)
    code = tl.zeros((BT, D), tl.int32)
    row = codes_ptr + bh.to(tl.int64) * W * cap
    for p in tl.static_range(3):
        word = tl.load(src_ptr + dd * 12 + p * 4)
        shift = tl.load(src_ptr + dd * 12 + p * 4 + 1)
        mask = tl.load(src_ptr + dd * 12 + p * 4 + 2)
        dst = tl.load(src_ptr + dd * 12 + p * 4 + 3)
        w = tl.load(row + word[None, :] * cap + t[:, None], mask=live[:, None] & (mask[None, :] != 0), other=0)
        code = code | (((w >> shift[None, :]) & mask[None, :]) << dst[None, :])
    x = tl.load(table_ptr + code)
    if PER_CHANNEL:  # keys: calibrated [H, D] ranges
        x = x * tl.load(scale_ptr + h * D + dd)[None, :] + tl.load(zero_ptr + h * D + dd)[None, :]
    else:  # values: per-token [B, cap] ranges
        sc = tl.load(scale_ptr + b * cap + t, mask=live, other=0.0).to(tl.float32)
        zr = tl.load(zero_ptr + b * cap + t, mask=live, other=0.0).to(tl.float32)
        x = x * sc[:, None] + zr[:, None]
    for e in tl.static_range(S):
        idx = tl.load(oi_ptr + (bh * S + e) * cap + t, mask=live, other=0).to(tl.int32)
        res = tl.load(ov_ptr + (bh * S + e) * cap + t, mask=live, other=0.0).to(tl.float32)
        x += tl.where(dd[None, :] == idx[:, None], res[:, None], 0.0)
    out = out_ptr + b * o_sb + h * o_sh + (t - begin)[:, None] * o_st + dd[None, :]
    tl.store(out, x.to(out_ptr.dtype.element_ty), mask=live[:, None])


@on_input_device
def dequantize_packed(cache: PackedCache, begin: int, end: int, dtype: torch.dtype, length: int | None = None, block: int = 64):
    """Triton version of :func:`~.naive.dequantize` (same arguments, same result up to fp32 rounding)."""
    b, h, d, n = cache.batch, cache.heads, cache.head_dim, end - begin
    dev = cache.key_codes.device
    out = []
    for keys in (True, False):
        codes = cache.key_codes if keys else cache.value_codes
        x = torch.empty(b, h, n, d, device=dev, dtype=dtype)
        if n > 0:
            ov, oi = (cache.key_outlier_values, cache.key_outlier_index) if keys else (cache.value_outlier_values, cache.value_outlier_index)
            s = oi.shape[2]
            table = cache.key_table if keys else cache.value_table
            scale, zero = (cache.key_scale, cache.key_zero) if keys else (cache.value_scale, cache.value_zero)
            _dequant_kernel[(triton.cdiv(n, block), b * h)](
                codes, bit_sources(d, cache.bits, keys, dev), table, scale, zero, ov if s else table, oi if s else table, x,
                h, cache.capacity, begin, end, x.stride(0), x.stride(1), x.stride(2),
                W=codes.shape[2], D=d, S=s, BT=block, PER_CHANNEL=keys, num_warps=4,
            )
        out.append(x)
    return apply_exact(cache, out[0], out[1], begin, end, length)
