"""Re-create the calibrated configs shipped in hub_configs/ (run from the repository root).

    python hub_configs/recreate.py                      # SmolLM2-135M-Instruct and stories260K
    python hub_configs/recreate.py --models smollm2     # one model
    python hub_configs/recreate.py --eval-windows 8     # also measure each config's WikiText-2 perplexity change
    python hub_configs/recreate.py --skip-existing      # resume: only the configs not yet written

For each model: one Fisher/activation pass over the calibration windows (shared by every config), then
4/3/2-bit codebooks with 0% and 1% outliers, plus (SmolLM2 only) the two ablations that need their own
calibration at 3 bits / 1%: keys quantized after RoPE, and codebooks without Fisher weighting. Each config is
written to hub_configs/<model>/<name>/ and listed in hub_configs/index.json.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
WIKITEXT = REPO.parent / "shared" / "data" / "wikitext-2-raw" / "wiki.test.raw"

MODELS = {
    # alias -> (model path or alias, folder name, Hub model id (None: not on the Hub), calibration seqlen, ablations?)
    "smollm2": ("smollm2", "smollm2-135m-instruct", "HuggingFaceTB/SmolLM2-135M-Instruct", 2048, True),
    "stories260k": (str(REPO.parent / "shared" / "models" / "stories260K"), "stories260k", None, 512, False),
}
GRID = [(bits, frac) for bits in (4, 3, 2) for frac in (0.0, 0.01)]
ABLATIONS = {"post-rope": {"key_rope": "post"}, "no-fisher": {"fisher": False}}


def config_dir_name(bits: int, frac: float, variant: str | None = None) -> str:
    name = f"nuq{bits}" + ("-1pct" if frac else "")
    return f"{name}-{variant}" if variant else name


def main(argv=None) -> int:
    sys.path.insert(0, str(REPO))
    import torch

    from transformers_kvquant.calibration import calibration_windows, collect_statistics
    from transformers_kvquant.config.calibrate import fit_config
    from transformers_kvquant.config.discovery import update_index
    from transformers_kvquant.evaluation.datasets import (
        default_calibration_path,
        load_text,
    )
    from transformers_kvquant.evaluation.perplexity import (
        evaluate_perplexity,
        token_windows,
    )
    from transformers_kvquant.evaluation.simulation import KVQuantMethod
    from transformers_kvquant.models import load_model

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--nsamples", type=int, default=16)
    parser.add_argument("--eval-windows", type=int, default=0, help="WikiText-2 test windows for the ppl change (0: skip)")
    parser.add_argument("--skip-existing", action="store_true", help="keep configs already written (resume a run)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)

    calibration_text = load_text(default_calibration_path())
    for alias in args.models:
        path, folder, model_id, seqlen, ablations = MODELS[alias]
        model, tokenizer = load_model(path, device_map=args.device if args.device != "cpu" else None)
        start = time.time()
        samples = calibration_windows(tokenizer, calibration_text, args.nsamples, seqlen, seed=0)
        stats = collect_statistics(model, samples)
        stats_seconds = time.time() - start
        print(f"{alias}: statistics of {args.nsamples} x {seqlen} tokens in {stats_seconds:.0f} s", flush=True)
        windows = None
        fp = None
        if args.eval_windows:
            windows = token_windows(tokenizer, load_text(WIKITEXT), seqlen, args.eval_windows)
            fp = evaluate_perplexity(model, windows).ppl
        jobs = [(bits, frac, None, {}) for bits, frac in GRID]
        if ablations:
            jobs += [(3, 0.01, name, opts) for name, opts in ABLATIONS.items()]
        if args.skip_existing:
            jobs = [job for job in jobs if not (HERE / folder / config_dir_name(*job[:3]) / "kvquant_config.json").exists()]
            if not jobs:
                continue
        for bits, frac, variant, opts in jobs:
            t0 = time.time()
            cfg = fit_config(stats, bits=bits, outlier_fraction=frac, **opts)
            fit_seconds = time.time() - t0
            cfg.fingerprint.model_id = model_id
            cfg.calibration.update(
                {
                    "dataset": "C4 validation sample, documents 0-149 (transformers_kvquant/data/calibration_c4.jsonl)",
                    "duration_s": round(stats_seconds + fit_seconds, 1),
                    "device": str(args.device),
                }
            )
            if windows is not None:
                q = evaluate_perplexity(model, windows, KVQuantMethod(cfg)).ppl
                cfg.calibration["ppl"] = {
                    "dataset": "WikiText-2 raw test",
                    "windows": int(windows.shape[0]),
                    "seqlen": seqlen,
                    "fp": round(fp, 4),
                    "quantized": round(q, 4),
                    "change_pct": round(100 * (q / fp - 1), 3),
                }
            rel = f"{folder}/{config_dir_name(bits, frac, variant)}"
            cfg.save_pretrained(HERE / rel)
            update_index(HERE / rel, HERE, model_id=model_id or folder, require_ppl=windows is not None)
            change = cfg.calibration.get("ppl", {}).get("change_pct")
            print(f"  {rel}: {cfg.name}" + (f", ppl change {change:+.2f}%" if change is not None else ""), flush=True)
        del stats, model
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
