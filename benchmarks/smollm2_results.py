"""Every SmolLM2-135M-Instruct quality number in docs/: perplexity table, long-context fidelity, passkey.

    python benchmarks/smollm2_results.py --out runs/results              # all stages (GPU: minutes; CPU: hours)
    python benchmarks/smollm2_results.py --out runs/results --stages ppl --windows 40
    python benchmarks/make_results_doc.py runs/results                   # -> docs/results.md, docs/fidelity.md, PNGs
    python benchmarks/smollm2_results.py --out docs/cpu_runs/mixed-8windows --stages ppl --rows mixed --windows 8

``--rows mixed``: mixed precision across layers against the shipped single-width configs. The mixed configs are
read from ``OUT/configs`` when there, else calibrated into it first (one statistics pass, then
``fit_mixed_config`` at each budget of MIXED_BUDGETS, as ``kvquant calibrate --mixed-precision`` does).

Perplexity: fp32, 2048-token non-overlapping windows of WikiText-2 raw test and of the C4 sample (documents 150 on;
0-149 are the calibration text), every method through the harness's simulated quantization (identical to the
cache for teacher forcing; see tests/evaluation). Fidelity: C4 documents (150 on) concatenated into 8,192-token
documents, fed in 512-token chunks through the real KVQuantCache. Passkey: generate() through the real cache.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
import traceback
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "data"


def environment() -> dict:
    import torch
    import transformers

    info = {
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else f"CPU ({platform.processor() or platform.machine()})",
    }
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError:
        pass
    return info


def outlier_rows(model):
    """(label, method): fp and every 1% config with the bounded outliers the cache stores and the paper's uncapped."""
    from transformers_kvquant.evaluation.perplexity import make_method

    rows = [("fp", None)]
    for bits in (4, 3, 2):
        for layout in ("bounded", "uncapped"):
            rows.append((f"kvquant {bits}-bit 1% {layout}", make_method("kvquant", model, bits=bits, outlier_fraction=0.01, outliers=layout)))
    return rows


def no_outlier_rows(model):
    """(label, method): the shipped 2-bit config without outliers in the layout the cache stores (bounded: every key
    clamped to its calibrated range), the KVQuant point at int2's bytes; no fp row (the long-context run's fp is the
    same 40 windows)."""
    from transformers_kvquant.evaluation.perplexity import make_method

    return [("kvquant 2-bit bounded (no outliers)", make_method("kvquant", model, bits=2, outlier_fraction=0.0, outliers="bounded"))]


def long_window_rows(model):
    """(label, method): the shipped 4-bit 1% config with exact windows longer than the long-context preset's 128 (256
    and 512: 0.02 and 0.05 bits more at 128K), for the 4-bit budget; no fp row (the presets run's fp is the same 8
    windows)."""
    from transformers_kvquant.evaluation.perplexity import make_method

    rows = [(f"kvquant 4-bit 1% + window {w}", make_method("kvquant", model, bits=4, outlier_fraction=0.01, recent_window=w))
            for w in (256, 512)]
    # two outliers per (token, head) for keys and values on the 1% ranges (outlier_slots): toward KIVI-4's WikiText-2
    # point (+0.30% at 5.01 bits at 128K) with fewer bits (8 windows: +0.33% at 4.91)
    rows.append(("kvquant 4-bit 1% + window 512, 2 outliers per head",
                 make_method("kvquant", model, bits=4, outlier_fraction=0.01, recent_window=512, outlier_slots=2)))
    return rows


def window_rows(model):
    """(label, method): fp and the shipped 3- and 2-bit 1% configs (bounded outliers) with an exact recent window of
    0-128 tokens beside the sink: what a window buys at each width, for choosing presets."""
    from transformers_kvquant.evaluation.perplexity import make_method

    rows = [("fp", None)]
    for bits in (3, 2):
        for window in (0, 16, 32, 64, 128):
            rows.append((f"kvquant {bits}-bit 1% + window {window}", make_method("kvquant", model, bits=bits, outlier_fraction=0.01, recent_window=window)))
    return rows


# (folder, average stored bits, outlier fraction): the mixed-precision configs of ``--rows mixed``
MIXED_BUDGETS = [("mixed-3.55-1pct", 3.55, 0.01), ("mixed-3.00-1pct", 3.00, 0.01), ("mixed-2.55", 2.55, 0.0)]


def calibrate_mixed(model, tokenizer, folder: Path, log) -> None:
    """Calibrate every missing config of MIXED_BUDGETS into ``folder`` (statistics shared by all of them)."""
    from transformers_kvquant.calibration import calibration_windows, collect_statistics
    from transformers_kvquant.config.calibrate import fit_mixed_config
    from transformers_kvquant.evaluation.datasets import default_calibration_path, load_text

    missing = [b for b in MIXED_BUDGETS if not (folder / b[0] / "kvquant_config.json").exists()]
    if not missing:
        return
    start = time.time()
    samples = calibration_windows(tokenizer, load_text(default_calibration_path()), 16, 2048, 0)
    stats = collect_statistics(model, samples)
    log(f"mixed: statistics of 16 x 2048 tokens in {time.time() - start:.0f} s")
    stats_seconds = time.time() - start
    for name, avg, frac in missing:
        began = time.time()
        config = fit_mixed_config(stats, average_bits=avg, outlier_fraction=frac)
        config.calibration["dataset"] = "C4 validation sample, documents 0-149 (transformers_kvquant/data/calibration_c4.jsonl)"
        config.calibration["duration_s"] = round(stats_seconds + time.time() - began, 1)
        config.save_pretrained(folder / name)
        meta = config.calibration["mixed_precision"]
        log(f"mixed: {name} fitted in {time.time() - began:.0f} s (with statistics {config.calibration['duration_s']:.0f} s): "
            f"{meta['stored_bits']:.3f} stored bits, widths {config.layer_bits}")
    del stats


def mixed_rows(model, out: Path):
    """(label, method): fp, the shipped 3- and 2-bit configs, and the mixed configs in ``out/configs``."""
    from transformers_kvquant.evaluation.perplexity import make_method

    hub = REPO / "hub_configs" / "smollm2-135m-instruct"
    rows = [("fp", None)]
    rows.append(("shipped nuq3-1%", make_method("kvquant", model, config=str(hub / "nuq3-1pct"))))
    for name, avg, frac in MIXED_BUDGETS:
        label = f"mixed <= {avg:.2f}" + (f" {frac * 100:g}%" if frac else " no outliers")
        rows.append((label, make_method("kvquant", model, config=str(out / "configs" / name))))
    rows.append(("shipped nuq2-1%", make_method("kvquant", model, config=str(hub / "nuq2-1pct"))))
    rows.append(("shipped nuq2", make_method("kvquant", model, config=str(hub / "nuq2"))))
    return rows


MIXED_CONFIGS = REPO / "docs" / "cpu_runs" / "mixed-8windows" / "configs"


def preset_rows(model):
    """(label, method): candidates for the presets of each budget, an exact recent window beside the sink on the
    shipped 4-bit config and on the mixed-precision configs (the 3- and 2-bit shipped configs' windows are the
    ``windows`` rows)."""
    from transformers_kvquant.evaluation.perplexity import make_method

    rows = [("fp", None)]
    for window in (0, 64, 128):
        rows.append((f"kvquant 4-bit 1% + window {window}", make_method("kvquant", model, bits=4, outlier_fraction=0.01, recent_window=window)))
    for name, avg, frac, windows in (("mixed-3.00-1pct", 3.00, 0.01, (128,)), ("mixed-2.55", 2.55, 0.0, (128,))):
        for window in windows:
            label = f"mixed <= {avg:.2f}" + (f" {frac * 100:g}%" if frac else " no outliers") + f" + window {window}"
            rows.append((label, make_method("kvquant", model, config=str(MIXED_CONFIGS / name), recent_window=window)))
    return rows


def long_context_rows(model):
    """(label, method): the long-context preset (an exact window of the newest 128 tokens) on the shipped 1% configs
    of every width, and on the mixed-precision config without outliers (the 2.6-bit candidate): the acceptance rows
    of the presets, with bits counted at 128K too."""
    from transformers_kvquant.evaluation.perplexity import make_method

    rows = [("fp", None)]
    for bits in (4, 3, 2):
        rows.append((f"kvquant {bits}-bit 1% (long-context preset)",
                     make_method("kvquant", model, bits=bits, outlier_fraction=0.01, preset="long-context")))
    rows.append(("mixed <= 2.55 no outliers (long-context preset)",
                 make_method("kvquant", model, config=str(MIXED_CONFIGS / "mixed-2.55"), preset="long-context")))
    return rows


def ppl_rows(model):
    """(label, method) for every row of the table."""
    from transformers_kvquant.evaluation.perplexity import make_method
    from transformers_kvquant.evaluation.simulation import IntMethod, KiviMethod

    hub = REPO / "hub_configs" / "smollm2-135m-instruct"
    rows = [("fp", None)]
    for bits in (4, 3, 2):
        for frac in (0.0, 0.01):
            rows.append((f"kvquant {bits}-bit" + (" 1%" if frac else ""), make_method("kvquant", model, bits=bits, outlier_fraction=frac)))
    for bits in (4, 3, 2):
        rows.append((f"int{bits}", IntMethod(bits)))
    for bits in (4, 2):
        rows.append((f"kivi{bits}", KiviMethod(bits)))
    rows += [
        ("ablation: post-RoPE keys", make_method("kvquant", model, config=str(hub / "nuq3-1pct-post-rope"), ablation="post-rope")),
        ("ablation: uniform codebooks", make_method("kvquant", model, bits=3, outlier_fraction=0.01, ablation="uniform")),
        ("ablation: no Fisher weighting", make_method("kvquant", model, config=str(hub / "nuq3-1pct-no-fisher"), ablation="no-fisher")),
        ("ablation: no sink", make_method("kvquant", model, bits=3, outlier_fraction=0.01, ablation="no-sink")),
        ("kvquant 2-bit 1% + window 128", make_method("kvquant", model, bits=2, outlier_fraction=0.01, recent_window=128)),
        ("kvquant 2-bit + window 128", make_method("kvquant", model, bits=2, outlier_fraction=0.0, recent_window=128)),
    ]
    return rows


def stage_ppl(model, tokenizer, args, log) -> dict:
    from dataclasses import asdict

    from transformers_kvquant.evaluation.datasets import load_text, parse_documents
    from transformers_kvquant.evaluation.perplexity import (
        evaluate_perplexity,
        token_windows,
    )

    datasets = {
        "wikitext2": load_text(args.wikitext),
        "c4": load_text(args.c4, parse_documents("150:")),
    }
    out = {}
    if args.rows == "mixed":
        calibrate_mixed(model, tokenizer, Path(args.out) / "configs", log)
        rows = mixed_rows(model, Path(args.out))
    else:
        rows = {"outliers": outlier_rows, "windows": window_rows, "table": ppl_rows, "presets": preset_rows,
                "long-context": long_context_rows, "no-outliers": no_outlier_rows, "long-windows": long_window_rows}[args.rows](model)
    if args.only:
        rows = [(label, m) for label, m in rows if args.only in label]
    fp = model.config
    heads, head_dim = fp.num_key_value_heads, getattr(fp, "head_dim", None) or fp.hidden_size // fp.num_attention_heads
    bits_128k = {}  # label -> bits at 128K: a store of 131,072 tokens per layer, built once, not once per dataset
    partial = Path(args.out) / "ppl.partial.json"
    done = json.loads(partial.read_text()) if partial.exists() else {}  # a cut run goes on where it stopped
    for name, text in datasets.items():
        windows = token_windows(tokenizer, text, 2048, args.windows)
        out[name] = []
        for label, method in rows:
            kept = [r for r in done.get(name, []) if r["label"] == label and r["windows"] == args.windows]
            if kept:
                out[name].append(kept[0])
                log(f"{name:9s} {label:34s} ppl {kept[0]['ppl']:9.4f}  (kept from {partial})")
                continue
            r = evaluate_perplexity(model, windows, method, batch_size=args.batch, progress=False)
            row = asdict(r)
            row["label"] = label
            row["config"] = getattr(method, "source", None)
            if args.rows in ("presets", "long-context", "no-outliers", "long-windows"):  # the exact ring is a constant there
                if label not in bits_128k:
                    bits_128k[label] = round(method.avg_bits(heads, head_dim, 131072), 3) if method else 16.0
                row["avg_bits_128k"] = bits_128k[label]
            out[name].append(row)
            partial.write_text(json.dumps(out, indent=1))  # nothing finished is lost if the run is cut short
            log(f"{name:9s} {label:34s} ppl {r.ppl:9.4f}  bits {r.avg_bits:6.3f}  ({r.seconds:.0f} s)")
    return out


def stage_fidelity(model, tokenizer, args, log) -> dict:
    from transformers_kvquant.evaluation.datasets import load_text, parse_documents
    from transformers_kvquant.evaluation.fidelity import (
        default_methods,
        documents_from_text,
        evaluate_fidelity,
    )

    text = load_text(args.c4, parse_documents("150:"))
    docs = documents_from_text(tokenizer, text, args.context, args.documents)
    if args.fidelity_methods == "presets":  # the long-context preset at every width (the shipped defaults)
        from transformers_kvquant.evaluation.fidelity import CacheMethod

        methods = [CacheMethod(f"kvquant {b}-bit 1% (long-context preset)", {"bits": b, "outlier_fraction": 0.01, "preset": "long-context"})
                   for b in (4, 3, 2)]
    else:
        methods = default_methods(model)
    for m in methods:
        if hasattr(m, "cache_config"):
            m.cache_config["backend"] = args.backend
    res = evaluate_fidelity(model, docs, methods, chunk=args.fidelity_chunk, bucket=1024, progress=True)
    res["dataset"] = "C4 sample, documents 150 on, concatenated"
    res["backend"] = args.backend
    for name, m in res["methods"].items():
        log(f"fidelity {name:28s} bits {m['avg_bits']:5.2f} KL " + " ".join(f"{b['kl']:.4f}" for b in m["buckets"]))
    return res


def stage_passkey(model, tokenizer, args, log) -> dict:
    from transformers_kvquant.evaluation.passkey import evaluate_passkey

    if args.passkey_methods == "presets":  # the long-context preset at the 3- and 2-bit budgets
        methods = {
            "fp": None,
            "kvquant 3-bit 1% (long-context preset)": {"bits": 3, "outlier_fraction": 0.01, "preset": "long-context"},
            "kvquant 2-bit 1% (long-context preset)": {"bits": 2, "outlier_fraction": 0.01, "preset": "long-context"},
            "mixed <= 2.55 no outliers (long-context preset)": {"config": str(MIXED_CONFIGS / "mixed-2.55"), "preset": "long-context"},
        }
    else:
        methods = {
            "fp": None,
            "kvquant 3-bit 1%": {"bits": 3, "outlier_fraction": 0.01},
            "kvquant 2-bit 1%": {"bits": 2, "outlier_fraction": 0.01},
            "kvquant 2-bit": {"bits": 2, "outlier_fraction": 0.0},
        }
    for m in methods.values():
        if m is not None:
            m["backend"] = args.backend
    res = evaluate_passkey(model, tokenizer, methods, samples=args.passkey_samples, progress=False)
    for name, acc in res.items():
        log(f"passkey {name:20s} " + " ".join(f"{k}:{v:.2f}" for k, v in acc.items()))
    return {"samples": args.passkey_samples, "accuracy": res}


def main(argv=None) -> int:
    sys.path.insert(0, str(REPO))
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True)
    parser.add_argument("--stages", default="ppl,fidelity,passkey")
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--wikitext", default=str(SHARED / "wikitext-2-raw" / "wiki.test.raw"))
    parser.add_argument("--c4", default=str(SHARED / "c4" / "c4-validation-sample-2k.jsonl"))
    parser.add_argument("--windows", type=int, default=80)
    parser.add_argument("--rows", default="table", choices=("table", "outliers", "windows", "mixed", "presets", "long-context",
                                                            "no-outliers", "long-windows"),
                        help="ppl stage: the results table, bounded vs uncapped outliers at every width, exact windows, "
                             "mixed precision across layers (calibrated into OUT/configs first when missing), or the preset "
                             "candidates (windows on the 4-bit and mixed configs; with average bits at 128K), or the long-context preset at "
                             "every width (with average bits at 128K), the 2-bit config without outliers, or the 4-bit 1% "
                             "config with 256- and 512-token windows (bits at 128K)")
    parser.add_argument("--only", default="", help="ppl stage: only the rows whose label contains this text")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--context", type=int, default=8192)
    parser.add_argument("--documents", type=int, default=8)
    parser.add_argument("--passkey-samples", type=int, default=20)
    parser.add_argument("--passkey-methods", default="widths", choices=("widths", "presets"),
                        help="passkey stage: the shipped configs by width, or the long-context preset at 3 and 2 bits")
    parser.add_argument("--fidelity-methods", default="widths", choices=("widths", "presets"),
                        help="fidelity stage: the widths with and without outliers and the baselines, or the long-context preset at 4, 3 and 2 bits")
    parser.add_argument("--fidelity-chunk", type=int, default=512,
                        help="fidelity stage: tokens fed per forward (each query reads its recent window exactly)")
    parser.add_argument("--backend", default="reference", choices=("reference", "auto", "triton"))
    parser.add_argument("--budget", type=float, default=0, help="seconds; skip stages that start after this (0: none)")
    args = parser.parse_args(argv)

    import transformers_kvquant  # noqa: F401
    from transformers_kvquant.models import load_model

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    logf = open(out / "results.log", "a")

    def log(msg):
        print(msg, flush=True)
        logf.write(msg + "\n")
        logf.flush()

    env = environment()
    log(json.dumps(env))
    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    model, tokenizer = load_model(args.model, device_map=device if device == "cuda" else None)
    began = time.time()
    for stage in args.stages.split(","):
        fn = {"ppl": stage_ppl, "fidelity": stage_fidelity, "passkey": stage_passkey}[stage]
        if args.budget and time.time() - began > args.budget:
            log(f"== {stage} skipped: the time budget of {args.budget:.0f} s is spent")
            continue
        start = time.time()
        try:
            result = fn(model, tokenizer, args, log)
            result_env = dict(env, seconds=round(time.time() - start, 1), args=vars(args))
            (out / f"{stage}.json").write_text(json.dumps({"environment": result_env, "result": result}, indent=1))
            log(f"== {stage} done in {time.time() - start:.0f} s")
        except Exception:
            log(f"== {stage} FAILED\n{traceback.format_exc()}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
