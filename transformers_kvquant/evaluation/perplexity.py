"""Perplexity with teacher forcing over non-overlapping windows, for fp and simulated KV quantization."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from ..integration.compat import cache_argument
from .simulation import (
    IntMethod,
    KiviMethod,
    KVQuantMethod,
    SimulatedMethod,
    SimulationCache,
)

METHODS = ("fp", "kvquant", "int", "kivi")
ABLATIONS = ("post-rope", "uniform", "no-fisher", "no-sink")


@dataclass
class PerplexityResult:
    method: str
    ppl: float
    tokens: int
    windows: int
    seqlen: int
    avg_bits: float
    seconds: float
    config: str | None = None


def token_windows(tokenizer, text: str, seqlen: int, windows: int | None = None) -> torch.Tensor:
    """The first ``windows`` non-overlapping windows of ``seqlen`` tokens (all of them when None)."""
    ids = tokenizer(text, return_tensors="pt", add_special_tokens=False)["input_ids"][0]
    available = ids.numel() // seqlen
    if available == 0:
        raise ValueError(f"the text has {ids.numel()} tokens, fewer than one window of {seqlen}; lower --seqlen")
    if windows is not None:
        if windows < 1:
            raise ValueError(f"--windows must be >= 1, got {windows}")
        if windows > available:
            raise ValueError(
                f"--windows {windows} needs {windows * seqlen} tokens but the text has {ids.numel()} "
                f"({available} windows of {seqlen}); use --windows {available} or less"
            )
        available = windows
    return ids[: available * seqlen].view(available, seqlen)


@torch.no_grad()
def evaluate_perplexity(model, windows: torch.Tensor, method: SimulatedMethod | None = None, *, progress: bool = True, batch_size: int = 1) -> PerplexityResult:
    """Perplexity of ``model`` on ``windows`` [N, L] with K/V (fake-)quantized by ``method`` (None: fp)."""
    start = time.time()
    device = model.get_input_embeddings().weight.device
    total_nll, total = 0.0, 0
    label = method.name if method else "fp"
    for i in tqdm(range(0, windows.shape[0], batch_size), desc=f"perplexity {label}", disable=not progress, unit="window"):
        ids = windows[i : i + batch_size].to(device)
        if method is None:
            logits = model(input_ids=ids, use_cache=False).logits
        else:
            logits = model(input_ids=ids, use_cache=True, **cache_argument(model, SimulationCache(model, method))).logits
        nll = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1).float(), ids[:, 1:].flatten(), reduction="sum")
        total_nll += float(nll)
        total += ids[:, 1:].numel()
    text = model.config.get_text_config(decoder=True)
    heads = text.num_key_value_heads
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
    bits = method.avg_bits(heads, head_dim, windows.shape[1]) if method else 16.0
    return PerplexityResult(label, math.exp(total_nll / total), total, windows.shape[0], windows.shape[1], bits, time.time() - start)


def make_method(kind: str, model=None, *, bits: int | None = None, outlier_fraction: float | None = None, config=None,
                ablation: str | None = None, recent_window: int | None = None, sink_tokens: int | None = None,
                outliers: str | None = None, preset: str = "default", outlier_slots: int | None = None) -> SimulatedMethod | None:
    """Build an evaluation method. ``kvquant`` takes a config (object, path or repo) or finds the shipped one;
    ``preset`` fills ``recent_window``, ``outliers`` and ``outlier_slots`` where they are not given."""
    if kind == "fp":
        return None
    if kind in ("int", "kivi"):
        if bits is None:
            raise ValueError(f"--method {kind} needs --bits")
        if bits not in (2, 3, 4):
            raise ValueError(f"--bits must be 2, 3 or 4, got {bits}")
        return IntMethod(bits) if kind == "int" else KiviMethod(bits)
    if kind != "kvquant":
        raise ValueError(f"--method must be one of {METHODS}, got {kind!r}")
    if bits is not None and bits not in (2, 3, 4):
        raise ValueError(f"--bits must be 2, 3 or 4, got {bits}")
    if ablation is not None and ablation not in ABLATIONS:
        raise ValueError(f"--ablation must be one of {ABLATIONS}, got {ablation!r}")
    from ..config.discovery import find_config, load_for_model
    from ..config.presets import preset_options, preset_window

    chosen = preset_options(preset)
    outliers = outliers or chosen.get("outliers", "bounded")
    outlier_slots = chosen.get("outlier_slots") if outlier_slots is None else outlier_slots
    window_rule = chosen.get("recent_window")
    variant = ablation if ablation in ("post-rope", "no-fisher") else None
    flag = {"post-rope": "--key-rope post", "no-fisher": "--no-fisher"}.get(variant)
    if variant and config is None:
        raise ValueError(
            f"--ablation {ablation} needs a config calibrated for it: `kvquant calibrate MODEL --bits B {flag} -o DIR`, "
            "then pass --kvquant-config DIR"
        )
    if config is not None:
        cfg, source = load_for_model(model, config)
    else:
        cfg, source = find_config(model, bits=bits, outlier_fraction=outlier_fraction)
    if variant and not _is_variant(cfg, variant):
        raise ValueError(f"--ablation {ablation} needs a config calibrated with {flag}; {source} is not")
    if ablation == "uniform":
        from ..config.calibrate import with_uniform_codebooks

        cfg = with_uniform_codebooks(cfg)
    recent_window = preset_window(window_rule, cfg) if recent_window is None else recent_window
    label = cfg.name + (f" ({ablation})" if ablation else "") + (f" ({preset} preset)" if preset != "default" else "")
    sink = 0 if ablation == "no-sink" else sink_tokens
    if outliers != "bounded" and preset == "default":
        label += f" ({outliers} outliers)"
    method = KVQuantMethod(cfg, sink_tokens=sink, recent_window=recent_window, label=label, outliers=outliers,
                           outlier_slots=outlier_slots)
    method.source = source
    return method


def _is_variant(cfg, variant: str) -> bool:
    return (variant == "post-rope" and cfg.key_rope == "post") or (variant == "no-fisher" and cfg.codebook_kind == "nuq-unweighted")
