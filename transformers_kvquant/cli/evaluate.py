"""``kvquant eval-ppl`` and ``kvquant eval-fidelity``: the evaluation harnesses from the command line."""

from __future__ import annotations

import json
from dataclasses import asdict

import torch

from ..calibration.support import check_supported
from ..config.presets import PRESETS
from ..evaluation.datasets import load_text, parse_documents
from ..evaluation.fidelity import (
    default_methods,
    documents_from_text,
    evaluate_fidelity,
)
from ..evaluation.perplexity import (
    ABLATIONS,
    METHODS,
    evaluate_perplexity,
    make_method,
    token_windows,
)
from ..models import load_model


def register(subparsers) -> None:
    _register_ppl(subparsers)
    _register_fidelity(subparsers)


def _register_ppl(subparsers) -> None:
    p = subparsers.add_parser("eval-ppl", help="teacher-forced perplexity with fp or (simulated) quantized K/V")
    p.add_argument("model", help="model folder, Hub id, or the alias 'smollm2'")
    p.add_argument("--method", choices=METHODS, required=True)
    p.add_argument("--kvquant-config", default=None, help="config folder/file/Hub repo (default: the shipped hub_configs/ one)")
    p.add_argument("--bits", type=int, default=None)
    p.add_argument("--outliers", type=float, default=None, help="outlier fraction of the kvquant config (default 0.01)")
    p.add_argument("--preset", choices=tuple(PRESETS), default="default",
                   help="kvquant: 'long-context' = the newest 128 tokens exact (512 at 4 bits); 'quality' = long-context + 2 outliers per token and head; 'paper' = no window, uncapped outliers")
    p.add_argument("--outlier-layout", choices=("bounded", "uncapped"), default=None,
                   help="kvquant: ceil(f*head_dim) outliers per token and head (the cache's), or the paper's uncapped ones")
    p.add_argument("--ablation", choices=ABLATIONS, default=None, help="kvquant ablation")
    p.add_argument("--recent-window", type=int, default=None, help="kvquant: newest tokens kept exact (streaming)")
    p.add_argument("--dataset", required=True, help="WikiText .raw, .jsonl (text field) or .txt file")
    p.add_argument("--documents", default=None, help="START:END slice of .jsonl documents (e.g. 150: skips calibration docs)")
    p.add_argument("--seqlen", type=int, default=2048)
    p.add_argument("--windows", type=int, default=None)
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))
    p.add_argument("--device", default=None)
    p.add_argument("--json", default=None, help="write the result as JSON here")
    p.set_defaults(func=_run_ppl)


def _run_ppl(args) -> int:
    if args.bits is not None and args.bits not in (2, 3, 4):
        raise ValueError(f"--bits must be 2, 3 or 4, got {args.bits}")
    text = load_text(args.dataset, parse_documents(args.documents))
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    model, tokenizer = load_model(args.model, dtype=args.dtype, device_map=device if device != "cpu" else None)
    check_supported(model)
    windows = token_windows(tokenizer, text, args.seqlen, args.windows)
    method = make_method(
        args.method,
        model,
        bits=args.bits,
        outlier_fraction=args.outliers,
        config=args.kvquant_config,
        ablation=args.ablation,
        recent_window=args.recent_window,
        outliers=args.outlier_layout,
        preset=args.preset,
    )
    if getattr(method, "source", None):
        print(f"kvquant config: {method.source}")
    result = evaluate_perplexity(model, windows, method)
    if getattr(method, "source", None):
        result.config = method.source
    print(f"{result.method}: perplexity {result.ppl:.4f} over {result.tokens} tokens ({result.windows} x {result.seqlen}), "
          f"average {result.avg_bits:.3f} bits/element")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(asdict(result), f, indent=1)
    return 0


def _register_fidelity(subparsers) -> None:
    p = subparsers.add_parser("eval-fidelity", help="KL divergence and top-1 agreement vs fp through the real cache")
    p.add_argument("model", help="model folder, Hub id, or the alias 'smollm2'")
    p.add_argument("--dataset", required=True, help="WikiText .raw, .jsonl or .txt (documents are cut from it)")
    p.add_argument("--skip-documents", default=None, help="START:END slice of .jsonl documents to use (e.g. 150:)")
    p.add_argument("--context", type=int, default=8192)
    p.add_argument("--chunk", type=int, default=512)
    p.add_argument("--documents", type=int, default=8)
    p.add_argument("--bucket", type=int, default=1024)
    p.add_argument("--bits", type=int, nargs="+", default=[4, 3, 2], choices=(2, 3, 4))
    p.add_argument("--no-baselines", action="store_true")
    p.add_argument("--device", default=None)
    p.add_argument("--json", default=None)
    p.set_defaults(func=_run_fidelity)


def _run_fidelity(args) -> int:
    if args.context < 2 or args.chunk < 1 or args.documents < 1:
        raise ValueError("--context must be >= 2, --chunk and --documents >= 1")
    text = load_text(args.dataset, parse_documents(args.skip_documents))
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    model, tokenizer = load_model(args.model, device_map=device if device != "cpu" else None)
    check_supported(model)
    max_pos = getattr(model.config.get_text_config(decoder=True), "max_position_embeddings", None)
    if max_pos and args.context > max_pos:
        raise ValueError(f"--context {args.context} is longer than the model's {max_pos} positions; use --context {max_pos} or less")
    docs = documents_from_text(tokenizer, text, args.context, args.documents)
    methods = default_methods(model, bits=tuple(args.bits), include_baselines=not args.no_baselines)
    result = evaluate_fidelity(model, docs, methods, chunk=args.chunk, bucket=args.bucket)
    for name, m in result["methods"].items():
        kls = " ".join(f"{b['kl']:.4f}" for b in m["buckets"])
        top = " ".join(f"{b['top1']:.3f}" for b in m["buckets"])
        print(f"{name:28s} bits {m['avg_bits']:5.2f}  KL {kls}  top1 {top}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    return 0
