"""Mixed precision across layers: a width (2, 3 or 4 bits) per layer that minimizes the total sensitivity-weighted
error at a given average of stored bits.

For every candidate width, the codebooks of every layer are fitted as usual (:func:`.fit.fit_calibration`); each
layer's error at that width is then measured on the calibration data through the quantizers the cache uses
(bounded outliers, sink tokens exact): ``sum F * (x - Q(x))**2`` over its keys and values, with ``F`` the Fisher
information, the same objective the codebooks minimize. The cost of a width is the real bytes a layer's store holds
for ``tokens`` tokens (codes, ranges, outliers, sink), the accounting ``kvquant eval-ppl`` reports, so the budget
means what the results tables show. The allocation is an exact knapsack (:func:`allocate_bits`).
"""

from __future__ import annotations

import torch
from tqdm.auto import tqdm

from ..quant.memory import store_report
from ..quant.quantizer import fake_quantize
from ..quant.store import PackedStore, SharedPositions
from .fit import CalibrationResult, LayerCalibration, fit_calibration, layer_quantizers
from .statistics import CalibrationStatistics

WIDTHS = (2, 3, 4)


def stored_bytes(layer: LayerCalibration, width: int, outlier_fraction: float, heads: int, head_dim: int, tokens: int,
                 sink_tokens: int = 1) -> int:
    """Bytes one layer's store holds for ``tokens`` tokens of a 16-bit model (batch 1), everything included but the
    slots' positions, which the cache keeps once for all layers (:func:`positions_bytes`).

    The bounded layout stores a fixed number of outliers per token, so the bytes do not depend on the values.
    """
    kq, vq = layer_quantizers(layer, outlier_fraction, head_dim)
    store = PackedStore(kq, vq, width, sink_tokens=sink_tokens, shared_positions=SharedPositions())
    x = torch.zeros(1, heads, tokens, head_dim, dtype=torch.float16)
    store.append(x, x, torch.arange(tokens)[None])
    return store_report(store).total_bytes


def positions_bytes(tokens: int) -> int:
    """Bytes of the slots' int32 RoPE positions that a cache of ``tokens`` tokens (batch 1) keeps for all layers."""
    return 4 * tokens


@torch.no_grad()
def layer_error(stats: CalibrationStatistics, layer_idx: int, layer: LayerCalibration, outlier_fraction: float,
                sink_tokens: int = 1) -> float:
    """Fisher-weighted squared error of one layer's keys and values quantized with ``layer``'s datatypes."""
    fp = stats.fingerprint
    heads, head_dim = fp.num_key_value_heads, fp.head_dim
    kq, vq = layer_quantizers(layer, outlier_fraction, head_dim)
    total = 0.0
    for quantizer, x, grad in ((kq, stats.keys[layer_idx], stats.key_grads[layer_idx]),
                               (vq, stats.values[layer_idx], stats.value_grads[layer_idx])):
        n, length, _ = x.shape
        # [N, L, C] -> [N, H, L', D] without the sink tokens (stored exactly)
        x4 = x[:, sink_tokens:].reshape(n, -1, heads, head_dim).transpose(1, 2)
        g4 = grad[:, sink_tokens:].reshape(n, -1, heads, head_dim).transpose(1, 2)
        for i in range(n):  # one window at a time bounds the temporary memory
            err = x4[i : i + 1] - fake_quantize(quantizer, x4[i : i + 1])
            total += float((g4[i : i + 1].float().square() * err.float().square()).sum())
    return total


def allocate_bits(errors: list[dict[int, float]], costs: list[dict[int, int]], budget: int) -> list[int]:
    """The width of each layer that minimizes ``sum(errors[i][w_i])`` subject to ``sum(costs[i][w_i]) <= budget``.

    Exact: dynamic programming over layers on the set of reachable total costs, keeping only Pareto-optimal
    (cost, error) partial allocations (a partial allocation that costs more and errs no less can never complete
    a better one). Ties go to the cheaper allocation. Raises ValueError when even the cheapest widths exceed the
    budget.
    """
    if len(errors) != len(costs) or not errors:
        raise ValueError("errors and costs need one entry per layer")
    states = [(0, 0.0, ())]  # (cost, error, widths) sorted by cost, errors strictly decreasing
    for err, cost in zip(errors, costs):
        grown = sorted(
            ((c + cost[w], e + err[w], ws + (w,)) for c, e, ws in states for w in sorted(err) if c + cost[w] <= budget),
            key=lambda s: (s[0], s[1]),
        )
        states = []
        for s in grown:
            if not states or s[1] < states[-1][1]:
                states.append(s)
        if not states:
            cheapest = sum(min(c.values()) for c in costs)
            raise ValueError(f"the budget of {budget} bytes is below the cheapest allocation ({cheapest} bytes)")
    return list(min(states, key=lambda s: (s[1], s[0]))[2])


def fit_mixed_precision(
    stats: CalibrationStatistics,
    *,
    average_bits: float,
    outlier_fraction: float,
    widths: tuple[int, ...] = WIDTHS,
    tokens: int | None = None,
    sink_tokens: int = 1,
    progress: bool = True,
    **options,
) -> CalibrationResult:
    """Fit codebooks at every width in ``widths`` and keep, per layer, the width the knapsack picks.

    ``average_bits``: the budget, average stored bits per cached K/V element (everything included) of a cache
    holding ``tokens`` tokens (default: the calibration windows' length). ``options`` go to
    :func:`~.fit.fit_calibration` (``qnorm``, ``fisher``, ``codebook``, ``seed``); keys are pre-RoPE (what the cache
    stores).
    """
    if options.get("key_rope", "pre") != "pre":
        raise ValueError("mixed precision serves the cache, which stores pre-RoPE keys: key_rope must be 'pre'")
    if not widths or any(w not in WIDTHS for w in widths):
        raise ValueError(f"widths must be a non-empty subset of {WIDTHS}, got {widths}")
    fp = stats.fingerprint
    heads, head_dim = fp.num_key_value_heads, fp.head_dim
    tokens = tokens or stats.keys[0].shape[1]
    fits = {w: fit_calibration(stats, bits=w, outlier_fraction=outlier_fraction, sink_tokens=sink_tokens, progress=progress, **options)
            for w in sorted(widths)}
    errors, costs = [], []
    bar = tqdm(total=stats.num_layers * len(fits), desc="Layer errors per width", disable=not progress, unit="fit")
    for i in range(stats.num_layers):
        errors.append({})
        costs.append({})
        for w, r in fits.items():
            errors[i][w] = layer_error(stats, i, r.layers[i], outlier_fraction, sink_tokens)
            costs[i][w] = stored_bytes(r.layers[i], w, outlier_fraction, heads, head_dim, tokens, sink_tokens)
            bar.update(1)
    bar.close()
    elements = 2 * heads * head_dim * tokens * stats.num_layers
    shared = positions_bytes(tokens)
    budget = int(average_bits * elements / 8) - shared  # whole bytes: never above the requested average
    try:
        chosen = allocate_bits(errors, costs, budget)
    except ValueError as e:
        lowest = 8 * (sum(min(c.values()) for c in costs) + shared) / elements
        raise ValueError(f"--mixed-precision {average_bits:g} is below the lowest average these widths reach "
                         f"({lowest:.3f} stored bits per element at {tokens} tokens)") from e
    stored = 8 * (sum(c[w] for c, w in zip(costs, chosen)) + shared) / elements
    base = fits[max(chosen)]
    meta = dict(base.metadata)
    meta["mixed_precision"] = {
        "budget_bits": average_bits,
        "stored_bits": round(stored, 6),
        "tokens": tokens,
        "widths": list(sorted(fits)),
        "layer_errors": [{str(w): e[w] for w in sorted(e)} for e in errors],
        "total_error": sum(e[w] for e, w in zip(errors, chosen)),
    }
    return CalibrationResult(
        bits=max(chosen),
        outlier_fraction=outlier_fraction,
        layers=[fits[w].layers[i] for i, w in enumerate(chosen)],
        fingerprint=fp,
        sink_tokens=sink_tokens,
        qnorm=any(fits[w].qnorm for w in set(chosen)),
        key_rope="pre",
        codebook_kind=base.codebook_kind,
        metadata=meta,
        layer_bits=chosen,
    )
