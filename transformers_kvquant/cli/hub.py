"""``kvquant push``, ``kvquant pull`` and ``kvquant info``: configs on the Hub from the command line (docs/hub.md)."""

from __future__ import annotations

import json

from huggingface_hub import get_token
from huggingface_hub.errors import HfHubHTTPError, LocalTokenNotFoundError

from ..calibration.fingerprint import ModelFingerprint
from ..config.format import CONFIG_NAME
from ..config.kvquant_config import KVQuantConfig, pull_config, push_config
from ..models import load_model
from .errors import UserError


def register(subparsers) -> None:
    p = subparsers.add_parser("push", help="upload a calibrated config folder to a Hub repo (one commit, two files)")
    p.add_argument("folder", metavar="DIR", help="folder holding kvquant_config.json (what `kvquant calibrate -o` wrote)")
    p.add_argument("repo", metavar="REPO", help="Hub repo id (org/name); created if missing; may be the model's own repo")
    p.add_argument("--revision", help="branch to commit to (created if missing)")
    p.add_argument("--create-pr", action="store_true", help="open a pull request instead of committing to the branch")
    p.add_argument("--private", action="store_true", default=None, help="make the repo private if it is created now")
    p.add_argument("--path-in-repo", help="sub-folder of the repo to put the files in")
    p.add_argument("--commit-message")
    p.add_argument("--token", help="Hub token (default: HF_TOKEN or the saved login)")
    p.set_defaults(func=_push)

    p = subparsers.add_parser("pull", help="download and validate a config from a Hub repo")
    p.add_argument("repo", metavar="REPO", help="Hub repo id (org/name)")
    p.add_argument("-o", "--output", metavar="DIR", help="copy the two files into DIR (default: leave them in the Hub cache)")
    _hub_options(p)
    p.set_defaults(func=_pull)

    p = subparsers.add_parser("info", help="describe a config (folder, file or Hub repo); check it against a model")
    p.add_argument("source", metavar="PATH_OR_REPO", help="folder, kvquant_config.json path or Hub repo id")
    p.add_argument("--model", help="check the config belongs to this model: 'smollm2', a model folder or a Hub id")
    p.add_argument("--json", action="store_true", help="print the description as JSON")
    _hub_options(p)
    p.set_defaults(func=_info)


def _hub_options(p) -> None:
    p.add_argument("--revision", help="branch, tag or commit of the Hub repo")
    p.add_argument("--subfolder", help="sub-folder of the Hub repo holding the config")
    p.add_argument("--cache-dir", help="huggingface_hub cache folder (default: HF_HUB_CACHE)")
    p.add_argument("--offline", action="store_true", help="use the local Hub cache only (like HF_HUB_OFFLINE=1)")
    p.add_argument("--token", help="Hub token (default: HF_TOKEN or the saved login)")


def _hub_errors(action: str):
    """Turn huggingface_hub's network/permission errors into one-line CLI errors."""

    class _Guard:
        def __enter__(self):
            return self

        def __exit__(self, kind, error, tb):
            if isinstance(error, LocalTokenNotFoundError):
                raise UserError(f"{action} needs a Hub token: log in with `hf auth login` or set HF_TOKEN") from error
            if isinstance(error, HfHubHTTPError):
                first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
                raise UserError(f"{action} failed: {first} (check the repo id, your token's write access and HF_ENDPOINT)") from error
            return False

    return _Guard()


def _push(args) -> int:
    if not args.token and not get_token():
        raise UserError("pushing needs a Hub token with write access: log in with `hf auth login`, set HF_TOKEN or pass --token")
    with _hub_errors(f"pushing to {args.repo}"):
        info = push_config(
            args.folder,
            args.repo,
            revision=args.revision,
            token=args.token,
            commit_message=args.commit_message,
            create_pr=args.create_pr,
            private=args.private,
            path_in_repo=args.path_in_repo,
        )
    print(f"pushed {CONFIG_NAME} to {args.repo}: {info}")
    if getattr(info, "pr_url", None):
        print(f"pull request: {info.pr_url}")
    return 0


def _load_args(args) -> dict:
    return {
        "revision": args.revision,
        "subfolder": args.subfolder,
        "cache_dir": args.cache_dir,
        "token": args.token,
        "local_files_only": args.offline,
    }


def _pull(args) -> int:
    with _hub_errors(f"downloading from {args.repo}"):
        config, path = pull_config(args.repo, args.output, **_load_args(args))
    print(f"{config.name} for {_model_name(config)}: {path}")
    return 0


def _info(args) -> int:
    with _hub_errors(f"reading {args.source}"):
        config = KVQuantConfig.from_pretrained(args.source, **_load_args(args))
    description = describe(config)
    problems = None
    if args.model:
        model, _ = load_model(args.model)
        problems = config.fingerprint.mismatches(ModelFingerprint.from_model(model))
        description["matches_model"] = {"model": args.model, "matches": not problems, "mismatches": problems}
    if args.json:
        print(json.dumps(description, indent=1))
    else:
        print(_format(args.source, description))
    return 1 if problems else 0


def _model_name(config: KVQuantConfig) -> str:
    fp = config.fingerprint
    return fp.model_id or f"a {fp.architecture}"


def describe(config: KVQuantConfig) -> dict:
    """What ``kvquant info`` shows: settings, fingerprint and calibration metadata (JSON-ready)."""
    widths = {"layer_bits": list(config.layer_bits)} if config.layer_bits else {}  # mixed precision only
    return {
        "name": config.name,
        "format_version": config.format_version,
        "bits": config.bits,
        **widths,
        "outlier_fraction": config.outlier_fraction,
        "codebook_kind": config.codebook_kind,
        "key_rope": config.key_rope,
        "qnorm": config.qnorm,
        "sink_tokens": config.sink_tokens,
        "recent_window": config.recent_window,
        "fingerprint": config.fingerprint.to_dict(),
        "calibration": config.calibration,
    }


def _widths(d: dict) -> list[str]:
    """The per-layer widths of a mixed-precision config (nothing for a single-width one)."""
    if "layer_bits" not in d:
        return []
    widths = d["layer_bits"]
    counts = ", ".join(f"{widths.count(b)} at {b}" for b in (2, 3, 4) if b in widths)
    line = f"layer bits:   {' '.join(map(str, widths))} (layers 0-{len(widths) - 1}; {counts})"
    mixed = d["calibration"].get("mixed_precision")
    if isinstance(mixed, dict) and "stored_bits" in mixed:
        line += f"; {mixed['stored_bits']:.3f} stored bits per element at {mixed.get('tokens')} tokens (budget {mixed.get('budget_bits')})"
    return [line]


def _format(source: str, d: dict) -> str:
    fp, cal = d["fingerprint"], d["calibration"]
    rope = ", ".join(f"{k}={v}" for k, v in sorted(fp["rope"].items()))
    model = fp["model_id"] or "(model id unknown)"
    if fp["revision"]:
        model += f" @ {fp['revision']}"
    lines = [
        f"config:       {source}",
        f"format:       version {d['format_version']}",
        (
            f"datatype:     {d['name']}: {d['bits']} bits, outlier fraction {d['outlier_fraction']:g}, "
            f"{d['codebook_kind']} codebooks, keys quantized {d['key_rope']}-RoPE, Q-Norm {'on' if d['qnorm'] else 'off'}"
        ),
        *_widths(d),
        f"runtime:      sink_tokens={d['sink_tokens']}, recent_window={d['recent_window']}",
        f"model:        {model} ({fp['architecture']}, model_type {fp['model_type']})",
        (
            f"geometry:     {fp['num_layers']} layers, {fp['num_attention_heads']} query heads, "
            f"{fp['num_key_value_heads']} KV heads, head_dim {fp['head_dim']}, hidden {fp['hidden_size']}"
        ),
        f"rope:         {rope}",
        "weights:      " + (f"signature of {len(fp['weights_signature'])} k_proj head norms" if fp["weights_signature"] else "no signature"),
    ]
    other = {k: v for k, v in cal.items() if k not in ("ppl", "mixed_precision")}
    lines.append("calibration:  " + (", ".join(f"{k}={v}" for k, v in other.items()) or "(no metadata)"))
    ppl = cal.get("ppl")
    if ppl:
        where = ", ".join(str(x) for x in (ppl.get("dataset"), ppl.get("windows") and f"{ppl['windows']} windows", ppl.get("seqlen") and f"seqlen {ppl['seqlen']}") if x)
        lines.append(f"perplexity:   {ppl['fp']:.4g} (fp) -> {ppl['quantized']:.4g} (quantized), {ppl['change_pct']:+.2f}%" + (f" on {where}" if where else ""))
    else:
        lines.append("perplexity:   not measured")
    match = d.get("matches_model")
    if match is not None:
        if match["matches"]:
            lines.append(f"model check:  matches {match['model']}")
        else:
            lines.append(f"model check:  DOES NOT MATCH {match['model']}: " + "; ".join(match["mismatches"]))
    return "\n".join(lines)
