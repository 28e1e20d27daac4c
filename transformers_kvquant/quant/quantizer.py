"""KVQuant quantizers for one layer: keys per channel with calibrated ranges, values per token with online ranges.

Tensors use the cache layout ``[batch, kv_heads, tokens, head_dim]``. A token's *vector* is its
``kv_heads * head_dim`` channels (channel ``h * head_dim + d``). Outliers are kept exactly in 16 bits:

- keys: every element outside its channel's calibrated range (the paper's per-channel thresholds, uncapped), in
  a row-wise CSR layout (:class:`SparseOutliers`: a count per token, entries sorted by token then channel);
- values: exactly ``slots`` per token (the split into low and high ones minimizes the remaining range), in a
  fixed-width layout ``[B, T, S]`` of values and channel indices.

Everything is deterministic and works on any device.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .codebook import Codebook


def outlier_slots(fraction: float, vector_size: int) -> int:
    """Outlier slots per token vector for a target fraction (rounded up, so 1% of 192 channels is 2 slots)."""
    if not 0.0 <= fraction < 0.5:
        raise ValueError(f"outlier fraction must be in [0, 0.5), got {fraction}")
    if fraction == 0.0:
        return 0
    return max(1, math.ceil(fraction * vector_size - 1e-9))


def half_dtype(dtype: torch.dtype) -> torch.dtype:
    """16-bit dtype for outliers and per-token ranges: bf16 for bf16 models, fp16 otherwise."""
    return torch.bfloat16 if dtype == torch.bfloat16 else torch.float16


@dataclass
class SparseOutliers:
    """Variable-count outliers of ``[B, T, C]`` vectors: entries sorted by (row, token, channel)."""

    counts: torch.Tensor  # [B, T] int32 entries per token
    values: torch.Tensor  # [nnz] 16-bit
    channels: torch.Tensor  # [nnz] int16/int32 channel index h * head_dim + d

    def row_counts(self) -> torch.Tensor:
        return self.counts.sum(1)

    def dense_mask_scatter(self, vectors: torch.Tensor) -> torch.Tensor:
        """``vectors`` [B, T, C] with the outlier entries written in."""
        if self.values.numel() == 0:
            return vectors
        b, t, c = vectors.shape
        token = torch.repeat_interleave(torch.arange(b * t, device=vectors.device), self.counts.flatten().long())
        flat = vectors.reshape(-1).clone()
        flat[token * c + self.channels.long()] = self.values.to(vectors.dtype)
        return flat.view(b, t, c)


@dataclass
class QuantizedVectors:
    """Quantized ``[B, H, T, D]`` tensor before bit packing."""

    codes: torch.Tensor  # [B, H, T, D] uint8
    outlier_values: torch.Tensor  # [B, T, S] 16-bit (fixed-width outliers: values)
    outlier_index: torch.Tensor  # [B, T, S] int16/int32 channel index, -1 = empty slot
    zero: torch.Tensor | None = None  # [B, T] 16-bit, per-token ranges only
    scale: torch.Tensor | None = None  # [B, T]
    sparse: SparseOutliers | None = None  # variable-count outliers (keys)


def _to_vectors(x: torch.Tensor) -> torch.Tensor:
    """[B, H, T, D] -> [B, T, H*D]."""
    b, h, t, d = x.shape
    return x.permute(0, 2, 1, 3).reshape(b, t, h * d)


def _from_vectors(v: torch.Tensor, heads: int) -> torch.Tensor:
    """[B, T, H*D] -> [B, H, T, D]."""
    b, t, c = v.shape
    return v.reshape(b, t, heads, c // heads).permute(0, 2, 1, 3)


def _index_dtype(channels: int) -> torch.dtype:
    return torch.int16 if channels < 2**15 else torch.int32


def scatter_outliers(vectors: torch.Tensor, values: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """Write outlier values into ``[B, T, C]`` vectors at their channel index (slots with -1 are skipped)."""
    if index.shape[-1] == 0:
        return vectors
    c = vectors.shape[-1]
    idx = index.long()
    idx = torch.where(idx < 0, torch.full_like(idx, c), idx)  # empty slots go to a scratch column
    padded = torch.nn.functional.pad(vectors, (0, 1))
    padded = padded.scatter(-1, idx, values.to(vectors.dtype))
    return padded[..., :c]


class ChannelKeyQuantizer:
    """Keys: per-channel ranges fixed at calibration (unrounded zero point), per-channel outlier thresholds.

    ``zero`` and ``scale`` have shape ``[H, D]`` (pre-RoPE channels). With ``outliers``, every value outside its
    channel's range (normalized |x_hat| > 1) is kept exactly as a sparse entry, as in the paper; without, such
    values saturate to the outermost centroid.
    """

    def __init__(self, codebook: Codebook, zero: torch.Tensor, scale: torch.Tensor, outliers: bool):
        if zero.shape != scale.shape or zero.ndim != 2:
            raise ValueError(f"key zero/scale must both be [kv_heads, head_dim], got {tuple(zero.shape)}, {tuple(scale.shape)}")
        if (scale <= 0).any() or not torch.isfinite(scale).all() or not torch.isfinite(zero).all():
            raise ValueError("key scales must be finite and positive, key zero points finite")
        self.codebook = codebook
        self.zero = zero.float()
        self.scale = scale.float()
        self.outliers = bool(outliers)
        self._device_cache: dict = {}

    def _params(self, device):
        key = str(device)
        if key not in self._device_cache:
            self._device_cache[key] = (
                self.zero.to(device)[None, :, None, :],
                self.scale.to(device)[None, :, None, :],
                self.codebook.decode_table(device),
            )
        return self._device_cache[key]

    def normalize(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Normalized values (float32) and the mask of values outside the calibrated range (|x_hat| > 1)."""
        zero, scale, _ = self._params(x.device)
        normalized = (x.float() - zero) / scale
        return normalized, normalized.abs() > 1.0

    def quantize(self, x: torch.Tensor) -> QuantizedVectors:
        b, h, t, d = x.shape
        normalized, outside = self.normalize(x)
        codes = self.codebook.encode(normalized)
        hd, idt = half_dtype(x.dtype), _index_dtype(h * d)
        empty = torch.empty(b, t, 0, device=x.device)
        if not self.outliers:
            return QuantizedVectors(codes, empty.to(hd), empty.to(idt))
        mask = _to_vectors(outside)  # [B, T, C]
        flat_mask = mask.reshape(-1, h * d)
        entries = flat_mask.nonzero()  # row-major: sorted by (b, t), then channel
        values = _to_vectors(x).reshape(-1, h * d)[entries[:, 0], entries[:, 1]]
        sparse = SparseOutliers(mask.sum(-1, dtype=torch.int32), values.to(hd), entries[:, 1].to(idt))
        return QuantizedVectors(codes, empty.to(hd), empty.to(idt), sparse=sparse)

    def dequantize(self, q: QuantizedVectors, dtype: torch.dtype) -> torch.Tensor:
        zero, scale, table = self._params(q.codes.device)
        x = table[q.codes.long()] * scale + zero
        if q.sparse is not None and q.sparse.values.numel():
            x = _from_vectors(q.sparse.dense_mask_scatter(_to_vectors(x)), x.shape[1])
        return x.to(dtype)


class TokenQuantizer:
    """Per-token ranges computed online over the whole token vector (all KV heads), per-vector outliers.

    With ``slots`` outliers per token, the split into low and high outliers is the one that leaves the smallest
    range for the remaining values (so a token with one huge negative value spends its slot there). Used for
    values (KVQuant) and, with a uniform codebook and no outliers, for the per-token ``int`` baseline.
    """

    def __init__(self, codebook: Codebook, slots: int):
        self.codebook = codebook
        self.slots = slots
        self._tables: dict = {}

    def _table(self, device):
        key = str(device)
        if key not in self._tables:
            self._tables[key] = self.codebook.decode_table(device)
        return self._tables[key]

    def _ranges(self, v: torch.Tensor, hd: torch.dtype):
        """Per-token (zero, scale) rounded to ``hd`` and outlier channel indices, for vectors ``[B, T, C]``."""
        b, t, c = v.shape
        s = min(self.slots, max(0, (c - 2) // 2))
        if s == 0:
            vmax, vmin = v.amax(-1), v.amin(-1)
            idx = torch.empty(b, t, 0, dtype=torch.long, device=v.device)
        else:
            top_v, top_i = torch.topk(v, s + 1, dim=-1, largest=True)  # descending
            bot_v, bot_i = torch.topk(v, s + 1, dim=-1, largest=False)  # ascending
            j = torch.arange(s + 1, device=v.device)
            # Remove j smallest and s-j largest: remaining range is top[s-j] - bot[j].
            ranges = top_v[..., s - j] - bot_v[..., j]
            low = ranges.argmin(-1, keepdim=True)  # [B, T, 1] number of low outliers
            high = s - low
            vmax = torch.gather(top_v, -1, high).squeeze(-1)
            vmin = torch.gather(bot_v, -1, low).squeeze(-1)
            slot = torch.arange(s, device=v.device)
            from_top = slot < high
            top_pos = slot.expand(b, t, s)
            bot_pos = (slot - high).clamp(min=0)
            idx = torch.where(from_top, torch.gather(top_i, -1, top_pos), torch.gather(bot_i, -1, bot_pos))
        zero = ((vmax + vmin) / 2).to(hd)
        scale = ((vmax - vmin) / 2).to(hd)
        scale = torch.where(scale > 0, scale, torch.ones_like(scale))
        return zero, scale, idx

    def normalize(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Normalized values ``[B, H, T, D]`` (float32) and the mask of elements stored as outliers."""
        b, h, t, d = x.shape
        v = _to_vectors(x.float())
        zero, scale, idx = self._ranges(v, half_dtype(x.dtype))
        normalized = (v - zero.float().unsqueeze(-1)) / scale.float().unsqueeze(-1)
        outlier = torch.zeros_like(v, dtype=torch.bool).scatter_(-1, idx, True)
        return _from_vectors(normalized, h), _from_vectors(outlier, h)

    def token_scales(self, x: torch.Tensor) -> torch.Tensor:
        """Per-token scales ``[B, T]`` (float32, as stored) that :meth:`normalize` divides by."""
        return self._ranges(_to_vectors(x.float()), half_dtype(x.dtype))[1].float()

    def quantize(self, x: torch.Tensor) -> QuantizedVectors:
        b, h, t, d = x.shape
        hd = half_dtype(x.dtype)
        idt = _index_dtype(h * d)
        v = _to_vectors(x.float())
        zero, scale, idx = self._ranges(v, hd)
        normalized = (v - zero.float().unsqueeze(-1)) / scale.float().unsqueeze(-1)
        codes = _from_vectors(self.codebook.encode(normalized), h)
        values = torch.gather(v, -1, idx).to(hd)
        return QuantizedVectors(codes.contiguous(), values, idx.to(idt), zero, scale)

    def dequantize(self, q: QuantizedVectors, dtype: torch.dtype) -> torch.Tensor:
        table = self._table(q.codes.device)
        heads = q.codes.shape[1]
        v = _to_vectors(table[q.codes.long()])
        v = v * q.scale.float().unsqueeze(-1) + q.zero.float().unsqueeze(-1)
        v = scatter_outliers(v, q.outlier_values.float(), q.outlier_index)
        return _from_vectors(v, heads).to(dtype)


def fake_quantize(quantizer, x: torch.Tensor) -> torch.Tensor:
    """Quantize then dequantize (simulated quantization), in the dtype of ``x``."""
    return quantizer.dequantize(quantizer.quantize(x), x.dtype)
