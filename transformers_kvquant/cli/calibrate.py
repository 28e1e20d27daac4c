"""``kvquant calibrate``: fit KVQuant codebooks for a model and write (optionally push) its config."""

from __future__ import annotations

import torch

from ..calibration import CODEBOOKS, calibration_windows
from ..config.calibrate import calibrate, with_uniform_codebooks
from ..config.kvquant_config import push_config
from ..evaluation.datasets import default_calibration_path, load_text
from ..models import load_model
from .errors import UserError


def register(subparsers) -> None:
    p = subparsers.add_parser("calibrate", help="calibrate KVQuant codebooks for a model and write kvquant_config.json")
    p.add_argument("model", help="model folder, Hub id, or the alias 'smollm2'")
    width = p.add_mutually_exclusive_group(required=True)
    width.add_argument("--bits", type=int, choices=(2, 3, 4))
    width.add_argument("--mixed-precision", type=float, metavar="AVG", default=None,
                       help="a width (2/3/4) per layer minimizing the Fisher-weighted error at AVG average stored bits "
                            "per element (codes, ranges, outliers, sink; at --seqlen tokens)")
    p.add_argument("--outliers", type=float, default=0.01, help="fraction of values kept exactly (default 0.01; 0 = none)")
    p.add_argument("--nsamples", type=int, default=16)
    p.add_argument("--seqlen", type=int, default=2048)
    p.add_argument("--dataset", default=None, help="a .txt/.jsonl/.raw file (default: the shipped C4 slice)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--qnorm", choices=("auto", "on", "off"), default="auto", help="Q-Norm (auto: on at 2 bits)")
    p.add_argument("--no-fisher", action="store_true", help="ablation: unweighted k-means")
    p.add_argument("--codebook", choices=CODEBOOKS, default="nuq", help="ablation: 'uniform' codebooks")
    p.add_argument("--key-rope", choices=("pre", "post"), default="pre", help="ablation: 'post' quantizes keys after RoPE")
    p.add_argument("--sink-tokens", type=int, default=1)
    p.add_argument("--device", default=None, help="e.g. cuda (default: cuda if available, else cpu)")
    p.add_argument("-o", "--output", required=True, help="output folder")
    p.add_argument("--push-to-hub", metavar="REPO", default=None)
    p.set_defaults(func=_run)


def _run(args) -> int:
    if not 0 <= args.outliers < 0.5:
        raise UserError(f"--outliers must be in [0, 0.5), got {args.outliers}")
    if args.mixed_precision is not None and (args.key_rope != "pre" or args.codebook != "nuq"):
        raise UserError("--mixed-precision serves the cache: it takes neither --key-rope post nor --codebook uniform")
    if args.nsamples < 1 or args.seqlen < 2:
        raise UserError("--nsamples must be >= 1 and --seqlen >= 2")
    dataset = args.dataset or str(default_calibration_path())
    text = load_text(dataset)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    model, tokenizer = load_model(args.model, device_map=device if device != "cpu" else None)
    max_pos = getattr(model.config.get_text_config(decoder=True), "max_position_embeddings", None)
    if max_pos and args.seqlen > max_pos:
        raise UserError(f"--seqlen {args.seqlen} exceeds the model's {max_pos} positions; use --seqlen {max_pos} or less")
    samples = calibration_windows(tokenizer, text, args.nsamples, args.seqlen, args.seed)
    qnorm = None if args.qnorm == "auto" else args.qnorm == "on"
    config = calibrate(
        model,
        samples,
        bits=args.bits,
        outlier_fraction=args.outliers,
        seed=args.seed,
        qnorm=qnorm,
        fisher=not args.no_fisher,
        key_rope=args.key_rope,
        sink_tokens=args.sink_tokens,
        mixed_precision=args.mixed_precision,
        dataset_name=dataset if args.dataset else "transformers_kvquant/data/calibration_c4.jsonl (C4 documents 0-149)",
    )
    if args.codebook == "uniform":
        config = with_uniform_codebooks(config)
    path = config.save_pretrained(args.output)
    print(f"wrote {path} ({config.name}, calibrated in {config.calibration['duration_s']:.0f} s)")
    if config.layer_bits:
        stored = config.calibration["mixed_precision"]["stored_bits"]
        print(f"layer bits: {' '.join(map(str, config.layer_bits))} ({stored:.3f} stored bits per element)")
    if args.push_to_hub:
        url = push_config(args.output, args.push_to_hub)
        print(f"pushed to {url}")
    return 0
