"""Sensitivity-weighted 1-D k-means (Lloyd's algorithm on sorted data), deterministic, CPU or GPU.

In one dimension the clusters of a Lloyd step are contiguous intervals of the sorted data, so after one sort
each iteration costs O(k log n) through prefix sums and ``searchsorted``: millions of calibration values take
milliseconds per iteration and need no sklearn.
"""

from __future__ import annotations

import torch


class SortedSamples:
    """1-D samples sorted once, with weighted prefix sums: fit many codebook sizes on the same data cheaply."""

    def __init__(self, values: torch.Tensor, weights: torch.Tensor | None):
        x = values.detach().flatten().to(torch.float64)
        w = torch.ones_like(x) if weights is None else weights.detach().flatten().to(torch.float64)
        if x.numel() != w.numel():
            raise ValueError(f"{x.numel()} values but {w.numel()} weights")
        keep = torch.isfinite(x) & torch.isfinite(w) & (w >= 0)
        x, w = x[keep], w[keep]
        if w.numel() and w.sum() <= 0:
            w = torch.ones_like(x)
        order = torch.argsort(x)
        self.x, self.w = x[order], w[order]
        zero = self.x.new_zeros(1)
        self.cw = torch.cat([zero, torch.cumsum(self.w, 0)])
        self.cwx = torch.cat([zero, torch.cumsum(self.w * self.x, 0)])
        self.cwxx = torch.cat([zero, torch.cumsum(self.w * self.x * self.x, 0)])

    def __len__(self) -> int:
        return self.x.numel()


def weighted_kmeans_1d(
    values: torch.Tensor | SortedSamples,
    weights: torch.Tensor | None = None,
    k: int = 8,
    *,
    max_iter: int = 100,
    tol: float = 1e-7,
    seed: int = 0,
    n_init: int = 3,
) -> torch.Tensor:
    """Centroids (ascending, float32) minimizing ``sum_i w_i (x_i - c(x_i))^2``.

    ``values`` may be a :class:`SortedSamples` (then ``weights`` is ignored). ``weights`` None means unit weights
    (plain k-means). Runs ``n_init`` initializations (weighted quantiles, an even grid, and random weighted draws
    from ``seed``) and keeps the lowest weighted error.
    """
    data = values if isinstance(values, SortedSamples) else SortedSamples(values, weights)
    x, w, cw, cwx, cwxx = data.x, data.w, data.cw, data.cwx, data.cwxx
    if x.numel() < k:
        raise ValueError(f"k-means needs at least {k} values, got {x.numel()}")

    gen = torch.Generator(device="cpu").manual_seed(seed)
    inits = [_weighted_quantiles(x, cw, k), torch.linspace(float(x[0]), float(x[-1]), k, dtype=x.dtype, device=x.device)]
    for _ in range(max(0, n_init - 2)):
        # Inverse-CDF draws: weighted random samples without materializing a multinomial over all values.
        u = torch.rand(k, generator=gen, dtype=torch.float64).to(x.device) * cw[-1]
        idx = torch.searchsorted(cw[1:], u).clamp(max=x.numel() - 1)
        inits.append(x[idx])

    best, best_err = None, float("inf")
    for init in inits[: max(1, n_init)]:
        c, err = _lloyd(x, cw, cwx, cwxx, torch.sort(init).values, max_iter, tol)
        if err < best_err:
            best, best_err = c, err
    return best.to(torch.float32)


def _weighted_quantiles(x, cw, k):
    targets = (torch.arange(k, dtype=x.dtype, device=x.device) + 0.5) / k * cw[-1]
    idx = torch.searchsorted(cw[1:], targets).clamp(max=x.numel() - 1)
    return x[idx]


def _lloyd(x, cw, cwx, cwxx, c, max_iter, tol):
    n = x.numel()
    for _ in range(max_iter):
        bounds = (c[1:] + c[:-1]) / 2
        # cut[j] = first index whose value belongs to cluster j+1.
        cut = torch.searchsorted(x, bounds)
        lo = torch.cat([cut.new_zeros(1), cut])
        hi = torch.cat([cut, cut.new_full((1,), n)])
        mass = cw[hi] - cw[lo]
        total = cwx[hi] - cwx[lo]
        # An empty cluster keeps its centroid; the others move to their weighted mean.
        new_c = torch.where(mass > 0, total / mass.clamp_min(1e-300), c)
        new_c = torch.sort(new_c).values
        shift = (new_c - c).abs().max()
        c = new_c
        if shift <= tol:
            break
    bounds = (c[1:] + c[:-1]) / 2
    cut = torch.searchsorted(x, bounds)
    lo = torch.cat([cut.new_zeros(1), cut])
    hi = torch.cat([cut, cut.new_full((1,), n)])
    mass = cw[hi] - cw[lo]
    s1 = cwx[hi] - cwx[lo]
    s2 = cwxx[hi] - cwxx[lo]
    err = float((s2 - 2 * c * s1 + c * c * mass).sum())
    return c, err
