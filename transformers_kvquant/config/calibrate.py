"""``calibrate(model, samples)``: run the calibration layer and return a :class:`KVQuantConfig`.

:func:`fit_config` turns collected statistics into one config (the expensive statistics pass is shared by every
bit width and outlier fraction: ``hub_configs/recreate.py`` fits all shipped configs from one pass);
:func:`calibrate` does both; :func:`with_uniform_codebooks` is the uniform-codebook ablation of a config.
"""

from __future__ import annotations

import time

import torch

from ..calibration.fit import LayerCalibration, fit_calibration
from ..calibration.mixed import fit_mixed_precision
from ..calibration.statistics import (
    CalibrationStatistics,
    calibration_windows,
    collect_statistics,
)
from ..quant.codebook import uniform_codebook
from .kvquant_config import KVQuantConfig


def fit_config(stats: CalibrationStatistics, **options) -> KVQuantConfig:
    """Fit one config from collected statistics; ``options`` are :func:`~.calibration.fit.fit_calibration`'s
    (``bits``, ``outlier_fraction``, ``qnorm``, ``fisher``, ``codebook``, ``key_rope``, ``sink_tokens``, ``seed``)."""
    return KVQuantConfig.from_calibration(fit_calibration(stats, **options))


def fit_mixed_config(stats: CalibrationStatistics, *, average_bits: float, **options) -> KVQuantConfig:
    """Fit one mixed-precision config (a width per layer at ``average_bits`` stored bits); ``options`` are
    :func:`~.calibration.mixed.fit_mixed_precision`'s."""
    return KVQuantConfig.from_calibration(fit_mixed_precision(stats, average_bits=average_bits, **options))


def calibrate(
    model,
    samples,
    *,
    bits: int = 3,
    outlier_fraction: float = 0.01,
    tokenizer=None,
    nsamples: int = 16,
    seqlen: int = 2048,
    seed: int = 0,
    qnorm: bool | None = None,
    fisher: bool = True,
    key_rope: str = "pre",
    sink_tokens: int = 1,
    progress: bool = True,
    dataset_name: str | None = None,
    mixed_precision: float | None = None,
) -> KVQuantConfig:
    """Calibrate KVQuant datatypes for ``model``.

    ``mixed_precision=AVG``: a width (2, 3 or 4) per layer instead of ``bits``, chosen to minimize the total
    Fisher-weighted error at an average of ``AVG`` stored bits per element (see :mod:`.calibration.mixed`).

    ``samples``: token ids ``[N, L]``, or texts (a string or a list of strings, then ``tokenizer`` is required and
    ``nsamples`` random windows of ``seqlen`` tokens are drawn with ``seed``).
    """
    start = time.time()
    if isinstance(samples, str) or (isinstance(samples, (list, tuple)) and samples and isinstance(samples[0], str)):
        if tokenizer is None:
            raise ValueError("calibrating from text needs the tokenizer: calibrate(model, texts, tokenizer=tok, ...)")
        text = samples if isinstance(samples, str) else "\n\n".join(samples)
        samples = calibration_windows(tokenizer, text, nsamples, seqlen, seed)
    elif not isinstance(samples, torch.Tensor):
        raise TypeError("samples must be token ids [N, L] or text(s) with a tokenizer")
    stats = collect_statistics(model, samples, progress=progress)
    options = dict(outlier_fraction=outlier_fraction, qnorm=qnorm, fisher=fisher, key_rope=key_rope, sink_tokens=sink_tokens,
                   seed=seed, progress=progress)
    if mixed_precision is not None:
        config = fit_mixed_config(stats, average_bits=mixed_precision, **options)
    else:
        config = fit_config(stats, bits=bits, **options)
    config.calibration["dataset"] = dataset_name or "token ids"
    config.calibration["duration_s"] = round(time.time() - start, 1)
    return config


def with_uniform_codebooks(config: KVQuantConfig) -> KVQuantConfig:
    """Ablation: the same ranges with uniform codebooks (plain integer grids)."""
    books = [uniform_codebook(config.layer_width(i)) for i in range(len(config.layers))]
    layers = [LayerCalibration(b, b, l.key_zero, l.key_scale) for b, l in zip(books, config.layers)]
    data = dict(config.__dict__)
    data.update(layers=layers, codebook_kind="uniform", qnorm=False)
    return KVQuantConfig(**data)
