"""Pure-PyTorch references of the kernels (fp32 math, no Triton): what each kernel must compute.

They are also the cache's path wherever the kernels do not run (CPU, ``backend="reference"``), so the reference
and the kernels share one definition of the format (:mod:`.layout`) and of the quantization of a token:

- :func:`quantize_keys` / :func:`quantize_values`: codes and bounded outliers of new tokens;
- :func:`append_reference`: quantize, pack and write new tokens at the cache's device length (what
  :mod:`.append` does in one launch), with :func:`write_exact` (positions, recent window, sink, length);
- :func:`dequantize`: pre-RoPE keys and values of a slot range, exact copies applied (:mod:`.dequant`);
- :func:`decode_reference`: one query per row over the whole cache (:mod:`.decode`).
"""

from __future__ import annotations

import math

import torch

from .layout import PackedCache, pack_codes, unpack_codes
from .rope import rope_at

LOG2E = 1.4426950408889634


# ------------------------------------------------------------------------------------------------ quantization
def encode(normalized: torch.Tensor, boundaries: torch.Tensor) -> torch.Tensor:
    """Nearest-centroid codes: the number of decision boundaries strictly below each value (uint8)."""
    return torch.bucketize(normalized.float().contiguous(), boundaries.float().to(normalized.device)).to(torch.uint8)


def split_extremes(v: torch.Tensor, s: int):
    """Drop ``s`` extremes of each vector (last dim): the split into low and high ones that leaves the smallest range.

    Returns the remaining max and min ``[...]`` and the dropped indices ``[..., s]`` (high ones first). Ties go to the
    lower channel, and between splits to the fewest low ones (what the append kernel does).
    """
    top_v, top_i = torch.sort(v, dim=-1, descending=True, stable=True)
    bot_v, bot_i = torch.sort(v, dim=-1, stable=True)
    top_v, top_i, bot_v, bot_i = top_v[..., : s + 1], top_i[..., : s + 1], bot_v[..., : s + 1], bot_i[..., : s + 1]
    j = torch.arange(s + 1, device=v.device)
    ranges = top_v[..., s - j] - bot_v[..., j]  # j low and s - j high ones dropped
    low = ranges.argmin(-1, keepdim=True)
    high = s - low
    vmax = torch.gather(top_v, -1, high).squeeze(-1)
    vmin = torch.gather(bot_v, -1, low).squeeze(-1)
    slot = torch.arange(s, device=v.device)
    top_pos = slot.expand(*v.shape[:-1], s)
    bot_pos = (slot - high).clamp(min=0)
    idx = torch.where(slot < high, torch.gather(top_i, -1, top_pos), torch.gather(bot_i, -1, bot_pos))
    return vmax, vmin, idx


def half_dtype(dtype: torch.dtype) -> torch.dtype:
    """16-bit dtype of outliers and per-token ranges: bf16 for bf16 models, fp16 otherwise."""
    return torch.bfloat16 if dtype == torch.bfloat16 else torch.float16


def _residuals(x, approx, idx, hd):
    return (torch.gather(x, -1, idx) - torch.gather(approx, -1, idx)).to(hd)


def quantize_keys(x, zero, scale, boundaries, table, slots: int):
    """Pre-RoPE keys ``[B, H, T, D]`` with calibrated per-channel ``zero``/``scale`` ``[H, D]``.

    Returns codes (uint8), and per (token, head) the ``slots`` channels of largest normalized error (out-of-range
    elements saturate, so they come first; ties to the lower channel) with their residuals ``x - dequantized``
    (16-bit) ``[B, H, T, S]``.
    """
    xf = x.float()
    z = zero.float().to(x.device)[None, :, None, :]
    s = scale.float().to(x.device)[None, :, None, :]
    normalized = (xf - z) / s
    codes = encode(normalized, boundaries)
    centroid = table.float().to(x.device)[codes.long()]
    k = min(slots, x.shape[-1])
    error = (normalized - centroid).abs()
    idx = torch.sort(error, dim=-1, descending=True, stable=True).indices[..., :k]
    return codes, _residuals(xf, centroid * s + z, idx, half_dtype(x.dtype)), idx.to(torch.uint8)


def quantize_values(x, boundaries, table, slots: int):
    """Values ``[B, H, T, D]``: per (token, head) the ``slots`` extremes whose removal leaves the smallest range are
    outliers; the token's range (``zero``, ``scale`` ``[B, T]``, 16-bit) spans every head's remaining values.

    Returns codes, residuals and channels ``[B, H, T, S]``, zero and scale.
    """
    xf = x.float()
    hd = half_dtype(x.dtype)
    s = min(slots, max(0, (x.shape[-1] - 2) // 2))
    if s:
        vmax, vmin, idx = split_extremes(xf, s)
    else:
        vmax, vmin = xf.amax(-1), xf.amin(-1)
        idx = torch.empty(*x.shape[:3], 0, dtype=torch.long, device=x.device)
    vmax, vmin = vmax.amax(1), vmin.amin(1)
    zero = ((vmax + vmin) / 2).to(hd)
    scale = ((vmax - vmin) / 2).to(hd)
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    z, sc = zero.float()[:, None, :, None], scale.float()[:, None, :, None]
    codes = encode((xf - z) / sc, boundaries)
    approx = table.float().to(x.device)[codes.long()] * sc + z
    return codes, _residuals(xf, approx, idx, hd), idx.to(torch.uint8), zero, scale


# ------------------------------------------------------------------------------------------------ append
def new_slots(cache: PackedCache, n: int) -> torch.Tensor:
    """Slots of ``n`` new tokens: from the device length on (no host value needed)."""
    return cache.length.long() + torch.arange(n, device=cache.length.device)


def write_exact(cache: PackedCache, keys, values, positions) -> None:
    """The parts of an append besides the packed codes: positions, the recent-window ring, the sink copies, and the
    length. ``positions`` ``[B, T]`` int32. Device tensors only: no host synchronization."""
    n = keys.shape[2]
    slots = new_slots(cache, n)
    cache.positions.index_copy_(1, slots, positions.to(cache.positions.dtype))
    if cache.recent_window:
        keep = min(n, cache.window_keys.shape[2])  # only the newest fit the ring (a repeated index is undefined)
        ring = slots[n - keep :] % cache.window_keys.shape[2]
        cache.window_keys.index_copy_(2, ring, keys[:, :, n - keep :].to(cache.window_keys.dtype))
        cache.window_values.index_copy_(2, ring, values[:, :, n - keep :].to(cache.window_values.dtype))
    capture_sink(cache, keys, values, positions, slots)
    cache.length.add_(n)


def capture_sink(cache: PackedCache, keys, values, positions, slots) -> None:
    """Exact copies of the tokens at positions ``< N`` (the attention sink); a later token of a position wins (left
    padding gives pad slots position 0 before the real first token)."""
    n_sink = cache.sink_slot.shape[1]
    if n_sink == 0:
        return
    b, h, t, d = keys.shape
    hit = positions.unsqueeze(-1) == torch.arange(n_sink, device=positions.device)  # [B, T, N]
    order = torch.arange(t, device=positions.device).view(1, t, 1)
    last = torch.where(hit, order, torch.full_like(order, -1)).amax(dim=1)  # [B, N]
    rows = last >= 0
    idx = last.clamp(min=0)
    gather = idx.view(b, 1, n_sink, 1).expand(b, h, n_sink, d)
    take = rows.view(b, 1, n_sink, 1)
    cache.sink_keys.copy_(torch.where(take, torch.gather(keys, 2, gather).to(cache.sink_keys.dtype), cache.sink_keys))
    cache.sink_values.copy_(torch.where(take, torch.gather(values, 2, gather).to(cache.sink_values.dtype), cache.sink_values))
    cache.sink_slot.copy_(torch.where(rows, slots[idx], cache.sink_slot))


def append_reference(cache: PackedCache, keys, values, positions) -> None:
    """Quantize new tokens ``[B, H, T, D]`` (pre-RoPE keys) and write them at slots ``length ..`` of ``cache``."""
    n = keys.shape[2]
    if n == 0:
        return
    slots = new_slots(cache, n)
    kc, kr, ki = quantize_keys(keys, cache.key_zero, cache.key_scale, cache.key_bounds, cache.key_table, cache.key_outlier_index.shape[2])
    vc, vr, vi, vz, vs = quantize_values(values, cache.value_bounds, cache.value_table, cache.value_outlier_index.shape[2])
    cache.key_codes.index_copy_(3, slots, pack_codes(kc, cache.bits, True).permute(0, 1, 3, 2))
    cache.value_codes.index_copy_(3, slots, pack_codes(vc, cache.bits, False).permute(0, 1, 3, 2))
    cache.value_zero.index_copy_(1, slots, vz)
    cache.value_scale.index_copy_(1, slots, vs)
    for dst, src in ((cache.key_outlier_values, kr), (cache.key_outlier_index, ki), (cache.value_outlier_values, vr), (cache.value_outlier_index, vi)):
        if src.shape[-1]:
            dst.index_copy_(3, slots, src.permute(0, 1, 3, 2).to(dst.dtype))
    write_exact(cache, keys, values, positions)


# ------------------------------------------------------------------------------------------------ reading
def dequantize(cache: PackedCache, begin: int, end: int, dtype: torch.dtype, length: int | None = None):
    """Pre-RoPE keys and values ``[B, H, end - begin, D]`` in ``dtype`` of slots ``[begin, end)``, with the exact
    window and sink copies in place. ``length``: the cache's length when the host knows it (then ``end`` is at most
    that); None reads it on the device (a static cache read to its capacity)."""
    d = cache.head_dim
    words_k = cache.key_codes[..., begin:end].permute(0, 1, 3, 2)
    words_v = cache.value_codes[..., begin:end].permute(0, 1, 3, 2)
    k = cache.key_table.float()[unpack_codes(words_k, cache.bits, True, d)]
    k = k * cache.key_scale.float()[None, :, None, :] + cache.key_zero.float()[None, :, None, :]
    v = cache.value_table.float()[unpack_codes(words_v, cache.bits, False, d)]
    v = v * cache.value_scale[:, begin:end].float()[:, None, :, None] + cache.value_zero[:, begin:end].float()[:, None, :, None]
    for x, res, idx in ((k, cache.key_outlier_values, cache.key_outlier_index), (v, cache.value_outlier_values, cache.value_outlier_index)):
        if idx.shape[2]:
            x.scatter_add_(3, idx[..., begin:end].permute(0, 1, 3, 2).long(), res[..., begin:end].permute(0, 1, 3, 2).float())
    return apply_exact(cache, k.to(dtype), v.to(dtype), begin, end, length)


def apply_exact(cache: PackedCache, k, v, begin: int, end: int, length: int | None):
    """``k``, ``v`` (slots ``[begin, end)``) with the recent-window ring and the sink copies written in."""
    dtype = k.dtype
    wr = cache.window_keys.shape[2]
    # the sink first: a sink token inside the recent window is read from the window (the same token)
    n_sink = cache.sink_slot.shape[1]
    if n_sink:
        b, h, _, d = k.shape
        rel = cache.sink_slot - begin  # [B, N]
        valid = (cache.sink_slot >= 0) & (rel >= 0) & (rel < end - begin)
        col = torch.where(valid, rel, torch.full_like(rel, end - begin))  # invalid ones go to a scratch slot
        idx = col.view(b, 1, n_sink, 1).expand(b, h, n_sink, d)
        pad = lambda x: torch.nn.functional.pad(x, (0, 0, 0, 1))
        k = pad(k).scatter(2, idx, cache.sink_keys.to(dtype))[:, :, : end - begin]
        v = pad(v).scatter(2, idx, cache.sink_values.to(dtype))[:, :, : end - begin]
    if cache.recent_window:
        if length is not None:  # the window is the last slots before the length: slice
            exact_from = max(length - cache.recent_window, begin)
            if exact_from < end:
                ring = torch.arange(exact_from, end, device=k.device) % wr
                k[:, :, exact_from - begin :] = cache.window_keys[:, :, ring].to(dtype)
                v[:, :, exact_from - begin :] = cache.window_values[:, :, ring].to(dtype)
        else:
            t = torch.arange(begin, end, device=k.device)
            n = cache.length.long()
            inside = ((t >= n - cache.recent_window) & (t < n)).view(1, 1, -1, 1)
            k = torch.where(inside, cache.window_keys[:, :, t % wr].to(dtype), k)
            v = torch.where(inside, cache.window_values[:, :, t % wr].to(dtype), v)
    return k, v


def decode_reference(q_rot, cache: PackedCache, inv_freq, length: int, mask=None, sliding_window: int = 0):
    """One query per row over slots ``[0, length)``. ``q_rot`` fp32 ``[B, Hq, D]`` is RoPE'd at its position and scaled
    by ``softmax_scale * log2(e)``; ``mask`` ``[B, >= length]`` (bool: allowed, or additive float). fp32 ``[B, Hq, D]``."""
    k, v = dequantize(cache, 0, length, torch.float32, length)
    kr = rope_at(k, cache.positions[:, :length], inv_freq)
    b, hq, d = q_rot.shape
    g = hq // k.shape[1]
    kr = kr.repeat_interleave(g, 1)
    v = v.repeat_interleave(g, 1)
    scores = torch.einsum("bhd,bhtd->bht", q_rot.float(), kr)
    allowed = torch.ones(b, length, dtype=torch.bool, device=q_rot.device)
    if sliding_window:
        allowed &= torch.arange(length, device=q_rot.device)[None, :] >= length - sliding_window
    if mask is not None:
        if mask.dtype == torch.bool:
            allowed &= mask[:, :length]
        else:
            scores = scores + mask[:, None, :length].float() * LOG2E
    scores = scores.masked_fill(~allowed[:, None, :], float("-inf"))
    p = torch.softmax(scores * math.log(2), -1)
    return torch.einsum("bht,bhtd->bhd", p, v)
