"""Presets: named bundles of the runtime settings that sit beside a calibrated config.

A calibrated config fixes the codebooks, key ranges, widths and outlier fraction; a preset says how the cache uses
them. ``default`` is the config as shipped: bounded outliers (a constant number per token, so the cache can be
static and the fused kernels read a fixed layout) with the config's own ``sink_tokens`` and ``recent_window``
(0 in the shipped configs: compression at every length). ``long-context`` adds an exact window of the newest
tokens, the lever that measured best for its bytes (docs/results.md, "Presets": on SmolLM2 3-bit 1% from about +10%
to +2.8% perplexity): 128 tokens at 2 and 3 bits, 512 at 4 bits, where the budget leaves room for it and it halves
the error (docs/results.md, "Longer exact windows at 4 bits"). Its ring (W + 64 fp16 slots per layer) is a constant
at long contexts (0.02 bits per element at 128K for 128, 0.07 for 512) but outweighs the packed tokens below about
1K (128) or 2K (512) tokens. ``quality`` is ``long-context`` with two outliers per (token, KV head) for keys and
values on the calibrated ranges (``outlier_slots``): more bytes for less error where the budget allows it (SmolLM2
4-bit 1%: WikiText-2 +0.26% at 4.91 bits at 128K, under KIVI-4's +0.30% at 5.01; docs/results.md, "The long-context
preset at every budget"). ``paper`` is the recipe of Hooper et al. as published: every out-of-range key element
kept (the uncapped CSR, a growing cache on the reference path), the sink exact, no recent window; it keeps the
comparison with the paper reproducible.
"""

from __future__ import annotations

# The long-context window by the config's narrowest layer width (a mixed-precision config with any layer below 4
# bits gets the narrow widths' window: its budget was spent on the widths).
LONG_CONTEXT_WINDOW = {2: 128, 3: 128, 4: 512}

PRESETS: dict[str, dict] = {
    "default": {},
    "long-context": {"recent_window": LONG_CONTEXT_WINDOW},
    "quality": {"recent_window": LONG_CONTEXT_WINDOW, "outlier_slots": 2},
    "paper": {"recent_window": 0, "outliers": "uncapped", "static": False},
}


def preset_options(name: str) -> dict:
    """The settings ``name`` stands for (keys of ``cache_config``); explicit keys given beside it win. A
    ``recent_window`` may be a table by width: resolve it with :func:`preset_window` once the config is known."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; the presets are {sorted(PRESETS)} (see docs/usage.md)")
    return dict(PRESETS[name])


def preset_window(rule, config=None) -> int | None:
    """A preset's ``recent_window`` for ``config``: an int as is, a table by the config's narrowest layer width
    (without a config, e.g. bits=16, the widest entry: an unquantized cache keeps everything exact anyway)."""
    if not isinstance(rule, dict):
        return rule
    if config is None:
        return max(rule.values())
    width = min(config.layer_width(i) for i in range(len(config.layers)))
    return rule[width]
