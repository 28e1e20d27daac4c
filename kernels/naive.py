"""Pure-PyTorch references of the kernels (fp32 math, no Triton): what each kernel must compute.

- :func:`append_naive`: quantize and pack new tokens (keys with calibrated per-channel ranges, values with
  per-token ranges, nearest-centroid codes, per-token outliers).
- :func:`packed_attention_naive`: attention of queries over a :class:`~.layout.PackedKV` (decode when there is
  one query, prefill of a chunk otherwise): dequantize, apply outliers and the exact sink/window, RoPE the keys at
  their stored positions, softmax, values.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from .layout import PackedKV, pack, unpack
from .rope import apply_rope, rope_at


class KeyOutliers(NamedTuple):
    """New tokens' key outliers, CSR over tokens: ``counts`` int32 ``[B, T]``, then ``values`` (16-bit) and
    ``channels`` (``h * D + d``) ``[nnz]`` sorted by (row, token, channel): what the store appends to its rows."""

    counts: torch.Tensor
    values: torch.Tensor
    channels: torch.Tensor


# ------------------------------------------------------------------------------------------------ append
def select_outliers(keys, values, key_zero, key_scale, key_outliers: bool, value_slots: int):
    """Per-token outlier choice and value ranges (shared by the naive and the Triton append).

    Keys: every element whose normalized value ``(k - zero) / scale`` exceeds 1 in magnitude, as CSR entries sorted
    by (row, token, channel) (``key_outliers=False``: none). Values: ``s`` extreme channels split into low and high
    ones so that the remaining range is smallest; the remaining extremes give the token's zero point and scale
    (16-bit). Returns fp32 ``[B, T, C]`` vectors and the choices.
    """
    b, h, t, d = keys.shape
    c = h * d
    half = torch.bfloat16 if keys.dtype == torch.bfloat16 else torch.float16
    idt = torch.int16 if c < 2**15 else torch.int32
    kv = keys.float().permute(0, 2, 1, 3).reshape(b, t, c)
    vv = values.float().permute(0, 2, 1, 3).reshape(b, t, c)
    if key_outliers:
        outside = ((kv - key_zero.float().reshape(1, 1, c)) / key_scale.float().reshape(1, 1, c)).abs() > 1.0
        entries = outside.reshape(-1, c).nonzero()  # row-major: sorted by (b, t), then channel
        key_sparse = KeyOutliers(outside.sum(-1, dtype=torch.int32), kv.reshape(-1, c)[entries[:, 0], entries[:, 1]].to(half), entries[:, 1].to(idt))
    else:
        key_sparse = None
    s = min(value_slots, max(0, (c - 2) // 2))
    if s == 0:
        vmax, vmin = vv.amax(-1), vv.amin(-1)
        vidx = torch.zeros(b, t, 0, dtype=torch.long, device=kv.device)
    else:
        top_v, top_i = torch.topk(vv, s + 1, dim=-1, largest=True)
        bot_v, bot_i = torch.topk(vv, s + 1, dim=-1, largest=False)
        j = torch.arange(s + 1, device=kv.device)
        low = (top_v[..., s - j] - bot_v[..., j]).argmin(-1, keepdim=True)
        high = s - low
        vmax = torch.gather(top_v, -1, high).squeeze(-1)
        vmin = torch.gather(bot_v, -1, low).squeeze(-1)
        slot = torch.arange(s, device=kv.device)
        vidx = torch.where(slot < high, torch.gather(top_i, -1, slot.expand(b, t, s)), torch.gather(bot_i, -1, (slot - high).clamp(min=0)))
    vzero = ((vmax + vmin) / 2).to(half)
    vscale = ((vmax - vmin) / 2).to(half)
    vscale = torch.where(vscale > 0, vscale, torch.ones_like(vscale))
    vval = torch.gather(vv, -1, vidx)
    # Slots a small fraction leaves unused (value_slots > s) stay empty.
    pad = value_slots - vidx.shape[-1]
    if pad > 0:
        vval = torch.nn.functional.pad(vval, (0, pad))
        vidx = torch.nn.functional.pad(vidx, (0, pad), value=-1)
    return {
        "key_vectors": kv,
        "value_vectors": vv,
        "key_outliers": key_sparse,
        "value_outlier_values": vval.to(half),
        "value_outlier_index": vidx.to(idt),
        "value_zero": vzero,
        "value_scale": vscale,
    }


def append_naive(keys, values, key_zero, key_scale, key_bounds, value_bounds, key_outliers: bool, value_slots: int, bits: int) -> dict:
    """Quantize and pack ``[B, H, T, D]`` keys (pre-RoPE) and values.

    ``key_bounds`` / ``value_bounds``: the ``2**bits - 1`` decision thresholds of each codebook (midpoints of its
    centroids); a code is the number of thresholds strictly below the normalized value. Returns the packed codes
    ``[B, H, T, W]``, the per-token tensors ``[B, T, ...]`` under the store's buffer names and ``key_outliers``
    (:class:`KeyOutliers` or None).
    """
    b, h, t, d = keys.shape
    out = select_outliers(keys, values, key_zero, key_scale, key_outliers, value_slots)
    kn = (out.pop("key_vectors") - key_zero.reshape(1, 1, -1).float()) / key_scale.reshape(1, 1, -1).float()
    vn = (out.pop("value_vectors") - out["value_zero"].float().unsqueeze(-1)) / out["value_scale"].float().unsqueeze(-1)
    kcodes = torch.bucketize(kn.contiguous(), key_bounds.float().contiguous())
    vcodes = torch.bucketize(vn.contiguous(), value_bounds.float().contiguous())
    as_heads = lambda x: x.reshape(b, t, h, d).permute(0, 2, 1, 3)
    out["key_codes"] = pack(as_heads(kcodes), bits)
    out["value_codes"] = pack(as_heads(vcodes), bits)
    return out


# ------------------------------------------------------------------------------------------------ attention
def _scatter_outliers(vec: torch.Tensor, values: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    if index.shape[-1] == 0:
        return vec
    c = vec.shape[-1]
    idx = index.long()
    idx = torch.where(idx < 0, torch.full_like(idx, c), idx)
    out = torch.nn.functional.pad(vec, (0, 1)).scatter(-1, idx, values.float())
    return out[..., :c]


def dequantize_packed(cache: PackedKV) -> tuple[torch.Tensor, torch.Tensor]:
    """fp32 pre-RoPE keys and values ``[B, H, L, D]`` of the visible packed slots (outliers applied, no sink)."""
    a, e = cache.begin - cache.offset, cache.packed_end - cache.offset
    b, h = cache.batch, cache.heads
    d = cache.head_dim
    kc = unpack(cache.key_codes[:, :, a:e], cache.bits, d).long()
    vc = unpack(cache.value_codes[:, :, a:e], cache.bits, d).long()
    k = cache.key_table.float()[kc] * cache.key_scale.float()[None, :, None] + cache.key_zero.float()[None, :, None]
    v = cache.value_table.float()[vc] * cache.value_scale[:, a:e].float()[:, None, :, None] + cache.value_zero[:, a:e].float()[:, None, :, None]
    n = e - a

    def with_outliers(x, values, index):
        vec = x.permute(0, 2, 1, 3).reshape(b, n, h * d)
        vec = _scatter_outliers(vec, values[:, a:e], index[:, a:e])
        return vec.reshape(b, n, h, d).permute(0, 2, 1, 3)

    k = with_key_outliers(cache, k)
    v = with_outliers(v, cache.value_outlier_values, cache.value_outlier_index)
    return k, v


def with_key_outliers(cache: PackedKV, k: torch.Tensor) -> torch.Tensor:
    """Replace the CSR key-outlier elements of ``k`` ``[B, H, L, D]`` (the visible packed slots) by their values."""
    b, h, n, d = k.shape
    if n == 0 or not cache.has_key_outliers:
        return k
    starts, ends = cache.key_outlier_ranges()
    vec = k.permute(0, 2, 1, 3).reshape(b, n, h * d).clone()
    for row in range(b):
        first, last = int(starts[row, 0]), int(ends[row, -1])
        counts = (ends[row] - starts[row]).clamp(min=0)
        slot = torch.repeat_interleave(torch.arange(n, device=k.device), counts)
        chan = cache.key_entry_channels[row, first:last].long()
        vec[row, slot, chan] = cache.key_entry_values[row, first:last].float()
    return vec.reshape(b, n, h, d).permute(0, 2, 1, 3)


def visible_kv(cache: PackedKV) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """fp32 pre-RoPE keys, values ``[B, H, total, D]`` and positions ``[B, total]`` of every visible slot."""
    k, v = dequantize_packed(cache)
    k = torch.cat([k, cache.window_keys.float()], 2)
    v = torch.cat([v, cache.window_values.float()], 2)
    for row in range(cache.batch):
        for i in range(cache.sink_slot.shape[1]):
            rel = int(cache.sink_slot[row, i]) - cache.begin
            if 0 <= rel < cache.packed_len:  # a sink inside the window is already exact there
                k[row, :, rel] = cache.sink_keys[row, :, i].float()
                v[row, :, rel] = cache.sink_values[row, :, i].float()
    a = cache.begin - cache.offset
    positions = cache.positions[:, a : a + cache.total]
    return k, v, positions


def packed_attention_naive(
    query: torch.Tensor,
    query_cos: torch.Tensor,
    query_sin: torch.Tensor,
    cache: PackedKV,
    inv_freq: torch.Tensor,
    attention_scaling: float,
    softmax_scale: float,
    mask: torch.Tensor | None = None,
    sliding_window: int = 0,
) -> torch.Tensor:
    """Attention of ``query`` ``[B, Hq, T, D]`` (un-rotated; the ``T`` queries hold the last ``T`` visible slots)
    over ``cache``. ``query_cos/sin``: ``[B or 1, T, D]`` RoPE of the queries. ``mask``: ``None``, bool (True =
    attend) or additive float, ``[B, T, total]`` or ``[B, 1, T, total]``. Causal order and the sliding window are
    applied from slot numbers. Returns ``[B, T, Hq, D]`` fp32."""
    b, hq, t, d = query.shape
    k, v, positions = visible_kv(cache)
    total = k.shape[2]
    groups = hq // cache.heads
    q = apply_rope(query.float(), query_cos.float(), query_sin.float())
    k = rope_at(k, positions, inv_freq, attention_scaling).repeat_interleave(groups, 1)
    v = v.repeat_interleave(groups, 1)
    scores = torch.einsum("bhtd,bhsd->bhts", q, k) * softmax_scale
    q_slot = torch.arange(total - t, total, device=query.device)[:, None]
    k_slot = torch.arange(total, device=query.device)[None, :]
    allowed = k_slot <= q_slot
    if sliding_window:
        allowed = allowed & (k_slot > q_slot - sliding_window)
    scores = scores.masked_fill(~allowed, float("-inf"))
    if mask is not None:
        m = mask.reshape(b, 1, t, total) if mask.dim() == 3 else mask
        scores = scores.masked_fill(~m, float("-inf")) if m.dtype == torch.bool else scores + m.float()
    probs = torch.softmax(scores, -1)
    return torch.einsum("bhts,bhsd->bthd", probs, v)
