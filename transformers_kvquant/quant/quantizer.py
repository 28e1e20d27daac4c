"""KVQuant quantizers for one layer: keys per channel with calibrated ranges, values per token with online ranges.

Tensors use the cache layout ``[batch, kv_heads, tokens, head_dim]``. A token's *vector* is its
``kv_heads * head_dim`` channels (channel ``h * head_dim + d``). Outliers come in two layouts:

- *bounded* (the cache's default; ``head_slots`` / ``per_head``): ``S = ceil(f * head_dim)`` per (token, KV head)
  for keys and for values, as 16-bit *residuals* (exact value minus the dequantized one) with their channel
  ``[B, H, T, S]``, so bytes per token are a constant of the config. Keys keep the ``S`` elements of largest
  normalized quantization error (out-of-range ones first: they saturate); values drop, per head, the ``S``
  extremes whose removal leaves the smallest range, and the token's range spans every head's remaining values.
- *uncapped* (the paper's; evaluation and ``outliers="uncapped"``): every key element outside its channel's range
  kept exactly in a row-wise CSR (:class:`SparseOutliers`), and ``slots`` value outliers per token chosen over the
  whole vector, ``[B, T, S]`` exact values and channel indices.

Everything is deterministic and works on any device.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..kernels.naive import quantize_keys, quantize_values, split_extremes
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
    outlier_values: torch.Tensor  # bounded: [B, H, T, S] 16-bit residuals; uncapped values: [B, T, S] exact values
    outlier_index: torch.Tensor  # bounded: [B, H, T, S] uint8 channel in the head; uncapped: [B, T, S] int16/32, -1 = empty
    zero: torch.Tensor | None = None  # [B, T] 16-bit, per-token ranges only
    scale: torch.Tensor | None = None  # [B, T]
    sparse: SparseOutliers | None = None  # variable-count outliers (uncapped keys)
    per_head: bool = False  # bounded layout


def add_residuals(x: torch.Tensor, residuals: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``x`` [B, H, T, D] (float32) plus bounded outlier residuals ``[B, H, T, S]`` at their channels."""
    if index.shape[-1] == 0:
        return x
    return x.scatter_add(-1, index.long(), residuals.float())


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

    ``zero`` and ``scale`` have shape ``[H, D]`` (pre-RoPE channels). ``head_slots=S`` (bounded): the ``S``
    elements of largest normalized quantization error per (token, KV head) keep a residual. ``head_slots=None``
    (uncapped, the paper's): with ``outliers`` every value outside its channel's range (normalized |x_hat| > 1) is
    kept exactly as a sparse entry; without, such values saturate to the outermost centroid.
    """

    def __init__(self, codebook: Codebook, zero: torch.Tensor, scale: torch.Tensor, outliers: bool, head_slots: int | None = None):
        if zero.shape != scale.shape or zero.ndim != 2:
            raise ValueError(f"key zero/scale must both be [kv_heads, head_dim], got {tuple(zero.shape)}, {tuple(scale.shape)}")
        if (scale <= 0).any() or not torch.isfinite(scale).all() or not torch.isfinite(zero).all():
            raise ValueError("key scales must be finite and positive, key zero points finite")
        self.codebook = codebook
        self.zero = zero.float()
        self.scale = scale.float()
        self.outliers = bool(outliers)
        if head_slots is not None and head_slots < 0:
            raise ValueError(f"head_slots must be >= 0 (or None: uncapped), got {head_slots}")
        # Bounded layout: head_slots per (token, KV head) (0 without outliers). None: the uncapped CSR.
        self.head_slots = (head_slots if self.outliers else 0) if head_slots is not None else None
        self._device_cache: dict = {}

    @property
    def bounded(self) -> bool:
        return self.head_slots is not None

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
        if self.bounded:  # the kernels' reference is the definition (one source for the cache and evaluation)
            _, _, table = self._params(x.device)
            codes, res, idx = quantize_keys(x, self.zero, self.scale, self.codebook.boundaries, table, self.head_slots)
            return QuantizedVectors(codes, res, idx, per_head=True)
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
        if q.per_head:
            return add_residuals(x, q.outlier_values, q.outlier_index).to(dtype)
        if q.sparse is not None and q.sparse.values.numel():
            x = _from_vectors(q.sparse.dense_mask_scatter(_to_vectors(x)), x.shape[1])
        return x.to(dtype)


class TokenQuantizer:
    """Per-token ranges computed online over the whole token vector (all KV heads), with outliers.

    The split of outliers into low and high ones is the one that leaves the smallest range for the remaining
    values (so a token with one huge negative value spends its slot there). ``per_head=False``: ``slots`` outliers
    per token chosen over the whole vector, stored exactly. ``per_head=True`` (the bounded layout): ``slots`` per
    (token, KV head) chosen in each head, stored as residuals; the token's range spans all heads' remaining
    values. Used for values (KVQuant) and, with a uniform codebook and no outliers, for the ``int`` baseline.
    """

    def __init__(self, codebook: Codebook, slots: int, per_head: bool = False):
        self.codebook = codebook
        self.slots = slots
        self.per_head = bool(per_head)
        self._tables: dict = {}

    def _table(self, device):
        key = str(device)
        if key not in self._tables:
            self._tables[key] = self.codebook.decode_table(device)
        return self._tables[key]

    def head_slots(self, head_dim: int) -> int:
        """Outliers per (token, head) of the bounded layout (at most ``(head_dim - 2) // 2``)."""
        return min(self.slots, max(0, (head_dim - 2) // 2))

    def _ranges(self, x: torch.Tensor, hd: torch.dtype):
        """Per-token (zero, scale) ``[B, T]`` rounded to ``hd`` and the outlier channels of ``x`` ``[B, H, T, D]``
        (float32): ``[B, H, T, S]`` channels in the head (``per_head``) or ``[B, T, S]`` vector channels."""
        b, h, t, d = x.shape
        if self.per_head:
            s = self.head_slots(d)
            if s == 0:
                vmax, vmin = x.amax(-1), x.amin(-1)
                idx = torch.empty(b, h, t, 0, dtype=torch.long, device=x.device)
            else:
                vmax, vmin, idx = split_extremes(x, s)
            vmax, vmin = vmax.amax(1), vmin.amin(1)
        else:
            v = _to_vectors(x)
            s = min(self.slots, max(0, (h * d - 2) // 2))
            if s == 0:
                vmax, vmin = v.amax(-1), v.amin(-1)
                idx = torch.empty(b, t, 0, dtype=torch.long, device=x.device)
            else:
                vmax, vmin, idx = split_extremes(v, s)
        zero = ((vmax + vmin) / 2).to(hd)
        scale = ((vmax - vmin) / 2).to(hd)
        scale = torch.where(scale > 0, scale, torch.ones_like(scale))
        return zero, scale, idx

    def _normalized(self, x: torch.Tensor, zero: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        return (x - zero.float()[:, None, :, None]) / scale.float()[:, None, :, None]

    def normalize(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Normalized values ``[B, H, T, D]`` (float32) and the mask of elements stored as outliers."""
        h = x.shape[1]
        xf = x.float()
        zero, scale, idx = self._ranges(xf, half_dtype(x.dtype))
        normalized = self._normalized(xf, zero, scale)
        if self.per_head:
            return normalized, torch.zeros_like(xf, dtype=torch.bool).scatter_(-1, idx, True)
        outlier = torch.zeros_like(_to_vectors(xf), dtype=torch.bool).scatter_(-1, idx, True)
        return normalized, _from_vectors(outlier, h)

    def token_scales(self, x: torch.Tensor) -> torch.Tensor:
        """Per-token scales ``[B, T]`` (float32, as stored) that :meth:`normalize` divides by."""
        return self._ranges(x.float(), half_dtype(x.dtype))[1].float()

    def quantize(self, x: torch.Tensor) -> QuantizedVectors:
        b, h, t, d = x.shape
        if self.per_head:
            codes, res, idx, zero, scale = quantize_values(x, self.codebook.boundaries, self._table(x.device), self.head_slots(d))
            return QuantizedVectors(codes, res, idx, zero, scale, per_head=True)
        hd = half_dtype(x.dtype)
        xf = x.float()
        zero, scale, idx = self._ranges(xf, hd)
        codes = self.codebook.encode(self._normalized(xf, zero, scale))
        values = torch.gather(_to_vectors(xf), -1, idx).to(hd)
        return QuantizedVectors(codes.contiguous(), values, idx.to(_index_dtype(h * d)), zero, scale)

    def dequantize(self, q: QuantizedVectors, dtype: torch.dtype) -> torch.Tensor:
        table = self._table(q.codes.device)
        x = table[q.codes.long()] * q.scale.float()[:, None, :, None] + q.zero.float()[:, None, :, None]
        if q.per_head:
            return add_residuals(x, q.outlier_values, q.outlier_index).to(dtype)
        v = scatter_outliers(_to_vectors(x), q.outlier_values.float(), q.outlier_index)
        return _from_vectors(v, q.codes.shape[1]).to(dtype)


def fake_quantize(quantizer, x: torch.Tensor) -> torch.Tensor:
    """Quantize then dequantize (simulated quantization), in the dtype of ``x``."""
    return quantizer.dequantize(quantizer.quantize(x), x.dtype)
