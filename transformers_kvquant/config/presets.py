"""Presets: named bundles of the runtime settings that sit beside a calibrated config.

A calibrated config fixes the codebooks, key ranges, widths and outlier fraction; a preset says how the cache uses
them. ``default`` is the config as shipped: bounded outliers (a constant number per token, so the cache can be
static and the fused kernels read a fixed layout) with the config's own ``sink_tokens`` and ``recent_window``
(0 in the shipped configs: compression at every length). ``long-context`` adds an exact window of the newest 128
tokens, the lever that measured best for its bytes (docs/results.md, "Presets": on SmolLM2 3-bit 1% from about
+10% to +2.8% perplexity) at 0.01-0.02 bits per element at 128K, but a ring of 192 fp16 slots per layer that
outweighs the packed tokens below about 1K tokens. ``paper`` is the recipe of Hooper et al. as published: every out-of-range key element kept (the uncapped CSR, a
growing cache on the reference path), the sink exact, no recent window; it keeps the comparison with the paper
reproducible.
"""

from __future__ import annotations

PRESETS: dict[str, dict] = {
    "default": {},
    "long-context": {"recent_window": 128},
    "paper": {"recent_window": 0, "outliers": "uncapped", "static": False},
}


def preset_options(name: str) -> dict:
    """The settings ``name`` stands for (keys of ``cache_config``); explicit keys given beside it win."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; the presets are {sorted(PRESETS)} (see docs/usage.md)")
    return dict(PRESETS[name])
