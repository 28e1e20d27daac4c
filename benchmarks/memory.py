"""KV-cache bytes against context length on SmolLM2-135M: fp16 DynamicCache, HF QuantizedCache, KVQuant 4/3/2.

Every number is the real size of the tensors a filled cache holds: for ``KVQuantCache`` its ``memory_report()``
(packed codes, per-token value ranges, bounded outliers, int32 positions, the device length, the exact sink
copies), checked against the bytes of every tensor reachable from each layer store (its ``PackedCache``, the
calibration constants aside); for transformers' caches the bytes of their key, value and quantized tensors.
Nothing is estimated from a formula.

Outliers (the cache's bounded layout): S = ceil(fraction x head_dim) per token and KV head, for keys and for values
(a 16-bit residual and a uint8 channel each), so bytes per token are a constant of the config; the share of key
elements kept exactly is S / head_dim whatever the text.

How the caches are filled: the pre-RoPE keys and values of SmolLM2 on the first ``--capture`` tokens of the
shipped C4 calibration slice are taken from a ``bits=16`` KVQuantCache, cast to fp16 (the KV dtype of an fp16
model) and tiled along the sequence up to each context length; every layer then receives one prefill-sized
update of that length (batch 1). The KVQuant configs are by default the shipped SmolLM2 configs (``hub_configs``,
Fisher-weighted, calibrated on 16 windows of 2,048 tokens of the same slice); ``--configs calibrate`` fits new ones
on ``--calib-samples`` x ``--calib-seqlen`` tokens instead. Where the calibration windows start is recorded, to show
whether they overlap the captured tokens. The measured key-outlier share is therefore real for that text and
config; since the captured tokens are tiled, it is their share at every length that is a multiple of them.

Writes ``docs/memory.png``, ``docs/memory.json`` and the tables between the GENERATED markers of
``docs/memory.md``, including the 8,192-token ratios against the issue's ceilings (pass or FAIL).
Rerun (about 2 to 5 minutes on 2 CPU cores with the shipped configs; ``--configs calibrate`` adds a few)::

    python benchmarks/memory.py
    python benchmarks/memory.py --lengths 512 8192 --no-write   # quick look, prints only
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
DOC = REPO / "docs" / "memory.md"
PLOT = REPO / "docs" / "memory.png"
BEGIN, END = "<!-- BEGIN GENERATED: benchmarks/memory.py -->", "<!-- END GENERATED: benchmarks/memory.py -->"
LENGTHS = (512, 2048, 8192, 32768)
KVQUANT_VARIANTS = ((4, 0.01), (3, 0.01), (2, 0.01), (4, 0.0), (3, 0.0), (2, 0.0))
QUANTO_BITS = (4, 2)  # the quanto backend of transformers' QuantizedCache offers 2 and 4 bits
# The ceilings at 8,192 tokens (1% outliers), and the paper's accounting for comparison.
CEILINGS = {4: 0.29, 3: 0.23, 2: 0.17}
PAPER = {4: 0.27, 3: 0.21, 2: 0.15}


# --------------------------------------------------------------------------------------------- byte counting
def tensor_bytes(t) -> int:
    """Bytes of a tensor, following tensor subclasses (quanto's packed/quantized tensors) to their storage."""
    if type(t) is torch.Tensor or not hasattr(t, "__tensor_flatten__"):
        return t.numel() * t.element_size()
    names, _ = t.__tensor_flatten__()
    return sum(tensor_bytes(getattr(t, n)) for n in names)


CONSTANTS = {"key_table", "value_table", "key_bounds", "value_bounds", "key_zero", "key_scale"}  # the config's, per layer


def storage_bytes(obj, seen=None) -> int:
    """Bytes of the distinct storages of every tensor among ``obj``'s attributes (one level of containers).

    Independent of ``memory_report``: it finds tensors by walking the store object, so a component the report
    forgot would show up as a difference.
    """
    seen = set() if seen is None else seen
    total = 0
    values = []
    for value in vars(obj).values():
        values.extend(value.values() if isinstance(value, dict) else [value])
    for value in values:
        if hasattr(value, "tensors") and isinstance(value.tensors, dict):  # slot buffers
            values.extend(value.tensors.values())
        elif hasattr(value, "key_codes") and callable(getattr(value, "tensors", None)):  # a PackedCache
            values.extend(t for n, t in value.tensors().items() if n not in CONSTANTS)
    for value in values:
        if isinstance(value, torch.Tensor):
            storage = value.untyped_storage()
            if storage.nbytes() and storage.data_ptr() not in seen:
                seen.add(storage.data_ptr())
                total += storage.nbytes()
    return total


def dynamic_cache_bytes(text_config, keys, values, length) -> int:
    """Bytes of transformers' default DynamicCache holding ``length`` fp16 tokens per layer."""
    from transformers import DynamicCache

    cache = DynamicCache(config=text_config)
    for i, (k, v) in enumerate(zip(keys, values, strict=True)):
        cache.update(_tile(k, length), _tile(v, length), i)
    return sum(tensor_bytes(layer.keys) + tensor_bytes(layer.values) for layer in cache.layers)


def quanto_cache_bytes(text_config, keys, values, length, bits) -> int:
    """Bytes of transformers' QuantizedCache (quanto backend, its defaults: axis 0, group 64, residual 128)."""
    from transformers.cache_utils import QuantizedCache

    cache = QuantizedCache(backend="quanto", config=text_config, nbits=bits)
    for i, (k, v) in enumerate(zip(keys, values, strict=True)):
        cache.update(_tile(k, length), _tile(v, length), i)
    total = 0
    for layer in cache.layers:
        # After a prefill everything is quantized; the fp residual (keys/values) is empty until decoding starts.
        total += tensor_bytes(layer._quantized_keys) + tensor_bytes(layer._quantized_values)
        total += tensor_bytes(layer.keys) + tensor_bytes(layer.values)
    return total


def kvquant_cache_bytes(model, config, keys, values, length) -> tuple[int, int, dict, list]:
    """(memory_report bytes, bytes found by walking the stores, bytes by component, per layer (key entries kept
    exactly, packed key elements)) of a filled KVQuantCache."""
    from transformers_kvquant import KVQuantCache

    cache = KVQuantCache(model, config)
    positions = torch.arange(length).unsqueeze(0)
    for layer, k, v in zip(cache.layers, keys, values, strict=True):
        k, v = _tile(k, length), _tile(v, length)
        # The store alone: `cache.update` would also dequantize the whole layer for attention, which the byte
        # count does not need. This is the same append the cache makes during a prefill.
        layer.lazy_initialization(k, v)
        layer.store.append(k, v, positions)
    report = cache.memory_report()
    seen = set()  # a storage the layers share (the slots' positions) counts once
    walked = sum(storage_bytes(layer.store, seen) for layer in cache.layers)
    return report.total_bytes, walked, dict(report.bytes_by_component), [key_outlier_count(layer.store) for layer in cache.layers]


def key_outlier_count(store) -> tuple[int, int]:
    """(key elements kept exactly, key elements stored) of one layer store: S per token and head."""
    c = store.cache
    tokens = store.length
    return store.batch * store.heads * c.key_outlier_index.shape[2] * tokens, store.batch * store.heads * store.head_dim * tokens


def constant_bytes(config) -> int:
    """Bytes of a config's per-layer constants the cache reads (fp32 key ranges, codebook centroids): fixed per
    model, independent of context length and batch, so not part of the per-token accounting."""
    total = 0
    for layer in config.layers:
        total += tensor_bytes(layer.key_zero) + tensor_bytes(layer.key_scale)
        total += tensor_bytes(layer.key_codebook.centroids) + tensor_bytes(layer.value_codebook.centroids)
    return total


def _tile(x: torch.Tensor, length: int) -> torch.Tensor:
    reps = math.ceil(length / x.shape[2])
    return x.repeat(1, 1, reps, 1)[:, :, :length].contiguous()


# --------------------------------------------------------------------------------------------- inputs
def capture_kv(model, tokenizer, tokens: int) -> tuple[list, list]:
    """Pre-RoPE keys and values of every layer on ``tokens`` tokens of the C4 slice, as fp16 ``[1, H, T, D]``."""
    from transformers_kvquant import KVQuantCache
    from transformers_kvquant.evaluation.datasets import (
        default_calibration_path,
        load_text,
    )

    text = load_text(default_calibration_path())
    ids = tokenizer(text, return_tensors="pt")["input_ids"][:, :tokens]
    cache = KVQuantCache(model, bits=16)
    with torch.no_grad():
        model(input_ids=ids, past_key_values=cache)
    keys, values = [], []
    for layer in cache.layers:
        k, v = layer.store.keys_values()
        keys.append(k.to(torch.float16).clone())
        values.append(v.to(torch.float16).clone())
    return keys, values


def kvquant_configs(model, tokenizer, samples: int, seqlen: int, source: str = "shipped") -> tuple[dict, dict]:
    """Configs for every (bits, outlier fraction) variant, and where their calibration windows start in the slice.

    ``shipped``: the SmolLM2 configs shipped in ``hub_configs`` (what ``KVQuantCache`` finds for the model;
    calibrated on 16 windows of 2,048 tokens of the same C4 slice). ``calibrate``: a fresh Fisher pass on
    ``samples`` windows of ``seqlen`` tokens (fast but small: with few calibration tokens per channel, more real
    keys fall outside the percentile ranges, so the key-outlier share and bytes come out higher).
    """
    from transformers_kvquant.calibration import calibration_windows, collect_statistics
    from transformers_kvquant.config.calibrate import fit_config
    from transformers_kvquant.evaluation.datasets import (
        default_calibration_path,
        load_text,
    )

    text = load_text(default_calibration_path())
    if source == "shipped":
        from transformers_kvquant.config.discovery import find_config

        configs = {(b, f): find_config(model, bits=b, outlier_fraction=f, local_files_only=True)[0] for b, f in KVQUANT_VARIANTS}
        meta = configs[(3, 0.01)].calibration
        samples, seqlen, seed = meta["num_samples"], meta["seqlen"], meta.get("seed", 0)
        windows = calibration_windows(tokenizer, text, samples, seqlen, seed=seed)
        label = f"the shipped hub_configs ({meta.get('dataset', 'C4 slice')}, {samples} x {seqlen} tokens)"
    else:
        windows = calibration_windows(tokenizer, text, samples, seqlen)
        stats = collect_statistics(model, windows, progress=False)
        configs = {(b, f): fit_config(stats, bits=b, outlier_fraction=f, progress=False) for b, f in KVQUANT_VARIANTS}
        label = f"calibrated by this run ({samples} x {seqlen} tokens)"
    return configs, {"source": source, "label": label, "starts": window_starts(tokenizer, text, windows), "tokens": seqlen}


def window_starts(tokenizer, text: str, windows: torch.Tensor) -> list:
    """Where each calibration window starts in the tokenized slice (found by matching its tokens), None if not
    found; compared with the captured tokens to say whether the keys measured were calibration data."""
    ids = tokenizer(text, return_tensors="pt", add_special_tokens=False)["input_ids"][0]
    starts = []
    for w in windows:
        n = w.numel()
        hits = (ids.unfold(0, n, 1) == w).all(1).nonzero() if ids.numel() >= n else torch.empty(0, 1)
        starts.append(int(hits[0, 0]) if hits.numel() else None)
    return starts


def quanto_available() -> str | None:
    """None when transformers' quanto backend runs here, else why not."""
    try:
        from transformers.utils import is_optimum_quanto_available

        if not is_optimum_quanto_available():
            return "optimum-quanto is not installed (`pip install optimum-quanto`)"
        import optimum.quanto  # noqa: F401
    except Exception as e:  # noqa: BLE001 (an installed but broken backend is reported in the doc, not fatal)
        return f"optimum-quanto does not import: {e}"
    return None


# --------------------------------------------------------------------------------------------- run
def measure(lengths, capture_tokens, calib_samples, calib_seqlen, config_source="shipped") -> dict:
    from transformers_kvquant.models import load_model

    model, tokenizer = load_model("smollm2")
    text = model.config.get_text_config(decoder=True)
    keys, values = capture_kv(model, tokenizer, capture_tokens)
    configs, windows = kvquant_configs(model, tokenizer, calib_samples, calib_seqlen, config_source)
    quanto_problem = quanto_available()
    rows = []
    for length in lengths:
        start = time.time()
        row = {"tokens": length, "fp16": dynamic_cache_bytes(text, keys, values, length)}
        if quanto_problem is None:
            for bits in QUANTO_BITS:
                row[f"quanto{bits}"] = quanto_cache_bytes(text, keys, values, length, bits)
        for (bits, fraction), config in configs.items():
            name = _variant(bits, fraction)
            reported, walked, parts, counts = kvquant_cache_bytes(model, config, keys, values, length)
            if reported != walked:
                raise AssertionError(f"{name} at {length}: memory_report {reported} B, stores hold {walked} B")
            row[name] = reported
            row[name + ":components"] = parts
            row[name + ":key_exact"] = sum(c[0] for c in counts)
            row[name + ":key_elements"] = sum(c[1] for c in counts)
            row[name + ":key_exact_by_layer"] = [c[0] / c[1] for c in counts]
        rows.append(row)
        print(f"{length:>6} tokens: " + ", ".join(f"{k}={v / 2**20:.2f} MiB" for k, v in row.items() if isinstance(v, int) and k != "tokens" and ":" not in k) + f" ({time.time() - start:.0f} s)", flush=True)
    return {
        "model": "SmolLM2-135M-Instruct",
        "shape": {
            "layers": text.num_hidden_layers,
            "kv_heads": text.num_key_value_heads,
            "head_dim": getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads,
        },
        "sink_tokens": configs[(3, 0.01)].sink_tokens,
        "capture_tokens": keys[0].shape[2],
        "calibration_windows": windows,
        "calibration_constant_bytes": {_variant(b, f): constant_bytes(c) for (b, f), c in configs.items()},
        "outlier_slots": {str(f): configs[(3, f)].head_slots for f in (0.01, 0.0)},  # str: the keys survive JSON
        "quanto": quanto_problem,
        "torch": torch.__version__,
        "rows": rows,
    }


def _variant(bits, fraction) -> str:
    return f"kvquant{bits}" + ("-1%" if fraction else "")


# --------------------------------------------------------------------------------------------- output
def table(result: dict) -> str:
    rows = result["rows"]
    names = ["fp16"] + [f"quanto{b}" for b in QUANTO_BITS if f"quanto{b}" in rows[0]] + [_variant(b, f) for b, f in KVQUANT_VARIANTS]
    labels = {
        "fp16": "fp16 DynamicCache",
        **{f"quanto{b}": f"QuantizedCache quanto int{b}" for b in QUANTO_BITS},
        **{_variant(b, f): f"KVQuant {b}-bit" + (" + 1% outliers" if f else "") for b, f in KVQUANT_VARIANTS},
    }
    lines = ["| tokens | " + " | ".join(labels[n] for n in names) + " |", "|---:|" + "---:|" * len(names)]
    for row in rows:
        cells = [f"{row[n] / 2**20:.2f} MiB" + ("" if n == "fp16" else f" ({row[n] / row['fp16']:.1%})") for n in names]
        lines.append(f"| {row['tokens']:,} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def key_exact(row: dict, name: str) -> float | None:
    """Share of the packed key elements kept exactly (outlier slots), None for results saved before it was kept."""
    elements = row.get(name + ":key_elements")
    return row[name + ":key_exact"] / elements if elements else (0.0 if elements == 0 else None)


def _share(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.2%}"


def verdicts(result: dict) -> dict | None:
    """bits -> (ratio to fp16 at 8,192 tokens with 1% outliers, passes the issue's ceiling), None without 8,192."""
    row = next((r for r in result["rows"] if r["tokens"] == 8192), None)
    if row is None:
        return None
    return {b: (row[_variant(b, 0.01)] / row["fp16"], row[_variant(b, 0.01)] / row["fp16"] <= CEILINGS[b]) for b in (4, 3, 2)}


def headline(result: dict) -> str:
    """The 8,192-token ratios against the issue's ceilings and the paper's accounting."""
    row = next((r for r in result["rows"] if r["tokens"] == 8192), None)
    if row is None:
        return "(8,192 tokens was not among the measured lengths)"
    layers = result["shape"]["layers"]
    lines = [
        "| bits, 1% outliers | measured / fp16 | ceiling | verdict | paper | key elements kept exactly | bytes per token and layer |",
        "|---|---:|---:|---|---:|---:|---:|",
    ]
    for bits, (ratio, ok) in verdicts(result).items():
        name = _variant(bits, 0.01)
        per_token = row[name] / (8192 * layers)
        lines.append(
            f"| {bits} | {ratio:.1%} | {CEILINGS[bits]:.0%} | {'pass' if ok else '**FAIL**'} | {PAPER[bits]:.0%} | "
            f"{_share(key_exact(row, name))} | {per_token:.1f} B (fp16: {row['fp16'] / (8192 * layers):.0f} B) |"
        )
    failed = [f"{b}-bit ({r:.1%} > {CEILINGS[b]:.0%})" for b, (r, ok) in verdicts(result).items() if not ok]
    ratios = ", ".join(f"{b}-bit {r:.1%} (ceiling {CEILINGS[b]:.0%})" for b, (r, _) in verdicts(result).items())
    lines += ["", (f"**Ceilings: all pass** — {ratios}." if not failed else f"**Ceilings: FAIL** for {', '.join(failed)}; measured {ratios}.")]
    shares = [(b, key_exact(row, _variant(b, 0.01)), row.get(_variant(b, 0.01) + ":key_exact_by_layer")) for b in (4, 3, 2)]
    if all(x is not None for _, x, _ in shares):
        per_layer = [y for _, _, by in shares if by for y in by]
        lines += [
            "",
            "Key elements kept exactly at 1% (outlier slots over all packed key elements, all layers): "
            + ", ".join(f"{_share(x)} at {b} bits" for b, x, _ in shares)
            + (f"; by layer from {min(per_layer):.2%} to {max(per_layer):.2%}" if per_layer else "")
            + ". The count is fixed: ceil(1% x head_dim) slots per token and KV head whatever the text (the largest"
            " out-of-range elements; the rest are clipped to the calibrated ranges).",
        ]
    lines += ["", "Bytes per token and layer by component, at 8,192 tokens:", ""]
    variants = [_variant(b, f) for b, f in KVQUANT_VARIANTS]
    components = list(dict.fromkeys(part for v in variants for part in row[v + ":components"]))
    lines.append("| component | " + " | ".join(variants) + " |")
    lines.append("|---|" + "---:|" * len(variants))
    for part in components:
        cells = [f"{row[v + ':components'].get(part, 0) / (8192 * layers):.2f}" for v in variants]
        lines.append(f"| {part} | " + " | ".join(cells) + " |")
    lines.append("| **total** | " + " | ".join(f"**{row[v] / (8192 * layers):.2f}**" for v in variants) + " |")
    return "\n".join(lines)


def key_table(result: dict) -> str:
    """Share of key elements kept exactly, by context length (the variants without outliers clip, so keep none)."""
    variants = [_variant(b, f) for b, f in KVQUANT_VARIANTS if f]
    lines = ["| tokens | " + " | ".join(variants) + " |", "|---:|" + "---:|" * len(variants)]
    for row in result["rows"]:
        lines.append(f"| {row['tokens']:,} | " + " | ".join(_share(key_exact(row, v)) for v in variants) + " |")
    return "\n".join(lines)


def calibration_note(result: dict) -> str:
    windows, capture = result.get("calibration_windows"), result.get("capture_tokens")
    if not windows or capture is None:
        return ""
    starts, n = windows["starts"], windows["tokens"]
    spans = ", ".join("not found" if s is None else f"{s:,}-{s + n - 1:,}" for s in starts)
    overlap = [s for s in starts if s is not None and s < capture]
    return (
        f"KVQuant configs: {windows.get('label', 'calibrated by this run')}; calibration windows at tokens {spans} of the slice. "
        f"The keys stored are tokens 0-{capture - 1}, tiled. "
        + (
            f"{len(overlap)} calibration window(s) overlap them, so the key-outlier share is partly in-sample."
            if overlap
            else "No calibration window overlaps them, so the key-outlier share is measured out of sample."
        )
    )


def plot(result: dict, path: Path) -> None:
    """Left: bytes against context length (log-log). Right: the same as a fraction of the fp16 DynamicCache."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["rows"]
    x = [r["tokens"] for r in rows]
    colors = {4: "tab:blue", 3: "tab:green", 2: "tab:red"}
    # quanto first, wide and pale, so the KVQuant lines drawn on top of it stay visible where they coincide.
    series = [(f"quanto{b}", f"HF QuantizedCache quanto int{b}", colors[b], ":", 6, 0.35) for b in QUANTO_BITS]
    series += [
        (_variant(b, f), f"KVQuant {b}-bit" + (" + 1% outliers" if f else ""), colors[b], "-" if f else "--", 1.6, 1.0)
        for b, f in KVQUANT_VARIANTS
    ]
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.8))
    left.plot(x, [r["fp16"] / 2**20 for r in rows], "-", color="k", marker="o", markersize=3, label="fp16 DynamicCache")
    for key, label, color, line, width, alpha in series:
        if key not in rows[0]:
            continue
        for ax, ys in ((left, [r[key] / 2**20 for r in rows]), (right, [100 * r[key] / r["fp16"] for r in rows])):
            ax.plot(x, ys, line, color=color, lw=width, alpha=alpha, marker="o", markersize=3, label=label)
    for bits, ceiling in CEILINGS.items():
        right.plot([8192], [100 * ceiling], "v", color=colors[bits], markersize=8)
        right.annotate(f"{bits}-bit ceiling", (8192, 100 * ceiling), textcoords="offset points", xytext=(6, 4), fontsize=7)
    left.set_xscale("log", base=2)
    left.set_yscale("log", base=2)
    left.set_ylabel("KV cache size (MiB)")
    left.set_title("bytes held")
    left.legend(fontsize=7)
    right.set_xscale("log", base=2)
    right.set_ylabel("% of the fp16 DynamicCache")
    right.set_ylim(0, 35)
    right.set_title("relative to fp16 (triangles: the issue's ceilings at 8,192 tokens)")
    for ax in (left, right):
        ax.set_xlabel("context length (tokens, batch 1)")
        ax.grid(True, which="both", alpha=0.3)
    shape = result["shape"]
    fig.suptitle(f"{result['model']} KV cache ({shape['layers']} layers, {shape['kv_heads']} KV heads x {shape['head_dim']})")
    fig.text(0.99, 0.01, result.get("command", "python benchmarks/memory.py"), ha="right", va="bottom", fontsize=7, color="gray")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_doc(result: dict) -> None:
    generated = "\n".join(
        [
            BEGIN,
            (
                f"Generated by `{result['command']}` (torch {result['torch']}; batch 1; fp16 keys and values; "
                f"sink {result['sink_tokens']} token; outliers per token and KV head, for keys and for values: "
                f"{result['outlier_slots']['0.01']} at 1%, {result['outlier_slots']['0.0']} without, where keys are "
                "clipped to the ranges)."
            ),
            "",
            "**At 8,192 tokens**",
            "",
            headline(result),
            "",
            "**Against context length** (percentages are of the fp16 DynamicCache)",
            "",
            table(result),
            "",
            "**Key elements kept exactly** (key outlier slots over the packed key elements, all layers)",
            "",
            key_table(result),
            "",
            calibration_note(result),
            "",
            "HF QuantizedCache (quanto): " + (result["quanto"] or "measured with optimum-quanto's CPU backend."),
            "",
            (
                "Not included above: the calibration constants the KVQuant cache reads (per-channel key ranges and "
                f"codebooks, all layers): {result['calibration_constant_bytes'][_variant(3, 0.01)] / 1024:.1f} KiB "
                "at 3 bits, fixed per model."
            ),
            "",
            "Raw numbers: `docs/memory.json`.",
            END,
        ]
    )
    text = DOC.read_text() if DOC.exists() else f"# KV cache memory\n\n{BEGIN}\n{END}\n"
    if BEGIN not in text or END not in text:
        raise SystemExit(f"{DOC} has no {BEGIN} ... {END} block to replace")
    text = re.sub(re.escape(BEGIN) + ".*?" + re.escape(END), lambda _: generated, text, flags=re.DOTALL)
    DOC.write_text(text)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--lengths", type=int, nargs="+", default=list(LENGTHS))
    p.add_argument("--capture", type=int, default=256, help="tokens of real K/V captured and tiled (default 256)")
    p.add_argument("--configs", choices=("shipped", "calibrate"), default="shipped", help="KVQuant configs: the shipped SmolLM2 ones (default) or calibrated now on --calib-samples x --calib-seqlen tokens")
    p.add_argument("--calib-samples", type=int, default=2, help="calibration windows with --configs calibrate (default 2)")
    p.add_argument("--calib-seqlen", type=int, default=128, help="tokens per calibration window with --configs calibrate (default 128)")
    p.add_argument("--no-write", action="store_true", help="print only; leave docs/ unchanged")
    p.add_argument("--from-json", type=Path, help="redraw docs/memory.md and the plot from a saved result, measuring nothing")
    args = p.parse_args(argv)
    if args.from_json:
        result = json.loads(args.from_json.read_text())
        result.setdefault("command", "python benchmarks/memory.py")
    else:
        torch.manual_seed(0)
        result = measure(args.lengths, args.capture, args.calib_samples, args.calib_seqlen, args.configs)
        result["command"] = " ".join(["python benchmarks/memory.py", *(sys.argv[1:] if argv is None else argv)])
    print(headline(result))
    if not args.no_write:
        write_doc(result)
        if not args.from_json:
            (DOC.parent / "memory.json").write_text(json.dumps(result, indent=1) + "\n")
        plot(result, PLOT)
        print(f"wrote {DOC.relative_to(REPO)}, {PLOT.relative_to(REPO)}" + ("" if args.from_json else ", docs/memory.json"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
