"""Non-uniform datatypes: a codebook of 2**bits centroids on the normalized range [-1, 1].

Encoding snaps a normalized value to its nearest centroid. Decoding looks the code up in the *decode table*,
which is the centroids after the optional Q-Norm correction (``centroid * qnorm_scale + qnorm_offset``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Codebook:
    """Sorted centroids in [-1, 1] plus an optional Q-Norm affine correction applied when decoding."""

    centroids: torch.Tensor  # [2**bits] float32, ascending
    qnorm_scale: float = 1.0
    qnorm_offset: float = 0.0

    def __post_init__(self):
        c = self.centroids
        if c.ndim != 1 or c.numel() not in (4, 8, 16):
            raise ValueError(f"a codebook needs 4, 8 or 16 centroids (2/3/4 bits), got shape {tuple(c.shape)}")
        if not torch.isfinite(c).all():
            raise ValueError("codebook centroids must be finite")
        if (c[1:] < c[:-1]).any():
            raise ValueError("codebook centroids must be sorted ascending")

    @property
    def bits(self) -> int:
        return self.centroids.numel().bit_length() - 1

    @property
    def boundaries(self) -> torch.Tensor:
        """Decision thresholds between neighbouring centroids (midpoints)."""
        c = self.centroids
        return (c[1:] + c[:-1]) / 2

    def decode_table(self, device=None) -> torch.Tensor:
        """Float32 values that codes decode to (Q-Norm applied)."""
        return (self.centroids.float() * self.qnorm_scale + self.qnorm_offset).to(device)

    def encode(self, normalized: torch.Tensor) -> torch.Tensor:
        """Nearest-centroid codes (uint8) of normalized values; values beyond the range saturate."""
        bounds = self.boundaries.to(device=normalized.device, dtype=torch.float32)
        # Ties go to the upper centroid (right=False), deterministic on every device.
        return torch.bucketize(normalized.float().contiguous(), bounds).to(torch.uint8)

    def snap(self, normalized: torch.Tensor) -> torch.Tensor:
        """Raw centroid values that normalized values snap to (no Q-Norm)."""
        return self.centroids.to(normalized.device).float()[self.encode(normalized).long()]

    def with_qnorm(self, scale: float, offset: float) -> Codebook:
        return Codebook(self.centroids, float(scale), float(offset))


def uniform_codebook(bits: int) -> Codebook:
    """Evenly spaced centroids spanning [-1, 1]: plain asymmetric integer quantization of the range."""
    n = 2**bits
    return Codebook(torch.linspace(-1.0, 1.0, n, dtype=torch.float32))


def qnorm_parameters(normalized: torch.Tensor, codebook: Codebook) -> tuple[float, float]:
    """Q-Norm: the affine map that gives the snapped values the mean and std of the unsnapped ones.

    Rounding to few centroids shrinks the spread of the data (most visibly at 2 bits); matching the first two
    moments corrects that shift. Returns ``(scale, offset)`` with decode ``c * scale + offset``.
    """
    x = normalized.float().flatten()
    snapped = codebook.snap(x)
    m1, s1 = x.mean(), x.std()
    m2, s2 = snapped.mean(), snapped.std()
    if s2 <= 0 or not torch.isfinite(s1 / s2):
        return 1.0, 0.0
    scale = s1 / s2
    return float(scale), float(m1 - m2 * scale)
