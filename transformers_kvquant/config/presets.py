"""Presets: named bundles of the runtime settings that sit beside a calibrated config.

A calibrated config fixes the codebooks, key ranges, widths and outlier fraction; a preset says how the cache uses
them. ``default`` is the config as shipped: bounded outliers (a constant number per token, so the cache can be
static and the fused kernels read a fixed layout) with the config's own ``sink_tokens`` and ``recent_window``
(the shipped SmolLM2 configs keep a window of exact recent tokens, chosen by measurement: docs/results.md).
``paper`` is the recipe of Hooper et al. as published: every out-of-range key element kept (the uncapped CSR, a
growing cache on the reference path), the sink exact, no recent window; it keeps the comparison with the paper
reproducible.
"""

from __future__ import annotations

PRESETS: dict[str, dict] = {
    "default": {},
    "paper": {"recent_window": 0, "outliers": "uncapped", "static": False},
}


def preset_options(name: str) -> dict:
    """The settings ``name`` stands for (keys of ``cache_config``); explicit keys given beside it win."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; the presets are {sorted(PRESETS)} (see docs/usage.md)")
    return dict(PRESETS[name])
