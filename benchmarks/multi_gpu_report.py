"""Turn ``benchmarks/multi_gpu.py``'s ``results.json`` into the markdown section ``docs/multi_gpu.md``.

    python benchmarks/multi_gpu_report.py runs/multi_gpu/results.json [--out docs/multi_gpu.md]

The page has the environment, the exactness checks (split vs one GPU, cache placement, kernel launch devices),
the capacity table (format, longest context, bytes per token, per-GPU memory, decode ms/token) and a clearly
labelled projection of the paper's "10M tokens on 8 GPUs" from the measured bytes per token.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

GiB = 2**30
GPU_80GB_CLASS_GIB = 79.2  # what torch reports as total_memory for an 80 GB A100 / H100
H200_FALLBACK_GIB = 139.8  # what torch reports for a 141 GB H200, when the run recorded no GPU
PAPER_TOKENS = 10_000_000


def gib(x) -> str:
    return "–" if x is None else f"{x / GiB:.2f}"


def per_device(d: dict | None) -> str:
    """'cuda:0 1.23 / cuda:1 4.56' for a {device: bytes} dict."""
    if not d:
        return "–"
    return " / ".join(f"{k} {v / GiB:.2f}" for k, v in sorted(d.items()))


def yes(v) -> str:
    return {True: "yes", False: "**no**", None: "–"}.get(v, str(v))


def environment(res: dict) -> list[str]:
    env = res.get("env", {})
    gpus = env.get("gpus", [])
    names = ", ".join(f"{g['name']} ({g['memory_bytes'] / GiB:.1f} GiB)" for g in gpus) or "none (CPU dry run)"
    versions = " · ".join(f"{k} {env[k]}" for k in ("torch", "cuda", "triton", "transformers", "accelerate", "python") if env.get(k))
    return [f"- GPUs: {len(gpus)} × {names}" if gpus else f"- GPUs: {names}", f"- Versions: {versions}",
            f"- Date (UTC): {res.get('date_utc', env.get('date_utc', '?'))}; whole run {res.get('total_s', '?')} s (budget {res.get('budget_s', '?')} s)",
            f"- Command: `{res.get('command', '?')}`"]


def split_line(rec: dict) -> str:
    sp = rec.get("split", {})
    if not sp:
        return "- Split: –"
    extra = f"; device_map entries {sp.get('layers_per_map_entry')}" if sp.get("layers_per_map_entry") != sp.get("layers_per_device") else ""
    return (f"- Split ({sp.get('load', '?')}, max_memory {', '.join(f'{k}: {v / GiB:.2f} GiB' for k, v in sp.get('max_memory', {}).items())}): "
            f"decoder layers per device {sp.get('layers_per_device')}{extra}; embeddings on {sp.get('embed_device')}, lm_head on "
            f"{sp.get('lm_head_device')}; weights GiB per device {per_device(sp.get('weights_bytes_per_device'))}")


def exactness(res: dict) -> list[str]:
    out = ["## Same tokens on two GPUs as on one", ""]
    secs = [(n, r) for n, r in res["sections"].items() if n.startswith("exactness")]
    if not secs:
        return out + ["Not run.", ""]
    for name, rec in secs:
        setup = rec.get("setup", {})
        title = "Shipped library" if name == "exactness" else "With a benchmark-side device guard (workaround, not the shipped library)"
        out += [f"### {title}", ""]
        if rec.get("device_guard"):
            out += [f"Workaround: {rec['device_guard']}.", ""]
        if setup:
            out += [f"{setup.get('model')}; {setup.get('batch')} rows of {setup.get('prompt_tokens')} prompt tokens (row 1 left-padded by "
                    f"{setup.get('left_padding_row1')}), {setup.get('new_tokens')} new tokens, {setup.get('decoding')}; KVQuant format "
                    f"{setup.get('format')}. Reference: the same seeded weights on {setup.get('single_device')}.", ""]
        out += [split_line(rec), ""]
        checks = rec.get("checks", [])
        if checks:
            out += ["| path | cache | tokens equal one GPU | max \\|Δlogit\\| | cache tensors on their layer's device | kernel calls on their tensors' device | result |",
                    "|---|---|---|---|---|---|---|"]
            for c in checks:
                place = c.get("placement")
                place_s = "–" if place is None else (f"yes ({place['tensors_checked']} tensors)" if place["ok"] else f"**no**: {place['misplaced']}")
                launch = c.get("kernel_launch_devices")
                launch_s = "–" if launch is None else ("yes" if launch["all_on_query_device"] else "**no**: " + "; ".join(f"{k}: {v}" for k, v in launch["calls"].items()))
                diff = c.get("max_abs_logit_diff")
                why = "the process died during this check" if c.get("status") == "running" else c.get("error") or c.get("status")
                result = "pass" if c.get("ok") else "**FAIL**" + (f" ({why})" if why else "")
                out.append(f"| {c['path']} | {c.get('cache', '')} | {yes(c.get('tokens_equal_single_device'))} | "
                           f"{'–' if diff is None else f'{diff:.3g}'} | {place_s} | {launch_s} | {result} |")
            out.append("")
        if "single_triton_equals_reference_tokens" in rec:
            out += [f"On one device, the Triton path's tokens {'equal' if rec['single_triton_equals_reference_tokens'] else 'differ from'} "
                    "the reference path's (random weights give near-tied logits; the split is compared path by path).", ""]
        if rec.get("status") != "ok" or rec.get("error"):
            out += [f"Section status: {rec.get('status')} {rec.get('error', '')}", ""]
    return out


def capacity_rows(rec: dict) -> list[dict]:
    return [r for r in rec.get("rows", []) if "context" in r]


def capacity(res: dict) -> list[str]:
    rec = res["sections"].get("capacity")
    out = ["## Capacity across the two GPUs", ""]
    if not rec:
        return out + ["Not run.", ""]
    out += [split_line(rec), ""]
    if rec.get("device_guard"):
        out += ["Run with the benchmark-side device guard (see above): the shipped Triton path failed on the split.", ""]
    rows = capacity_rows(rec)
    fp16 = next((r for r in rows if r["format"] == "fp16"), None)
    out += ["| format | max context (tokens) | vs fp16 | KV bytes/token (measured) | per-GPU peak memory GiB | of which KV cache GiB | "
            "decode ms/token | out-of-memory back-offs |", "|---|---|---|---|---|---|---|---|"]
    for r in rec.get("rows", []):
        if "context" not in r:
            status = "the process died during this measurement" if r.get("status") == "running" else r.get("status", "–")
            out.append(f"| {r['format']} | {status} | | | | | | |")
            continue
        ratio = f"{r['context'] / fp16['context']:.2f}×" if fp16 else "–"
        out.append(f"| {r['format']} | {r['context']:,} | {ratio} | {r['bytes_per_token_measured']:,.0f} | {per_device(r.get('peak_bytes_per_device'))} | "
                   f"{per_device(r.get('cache_bytes_per_device'))} | {r['ms_per_token']:.1f} | {', '.join(f'{x:,}' for x in r.get('out_of_memory_at', [])) or 'none'} |")
    out.append("")
    notes = ["Each context was filled with synthetic K/V (fp16: random tensors in a DynamicCache; KVQuant: pre-RoPE keys and "
             "values appended through the real append path, keys drawn so that the calibrated 1% format stores about 1% of key "
             "entries as outliers), then proven by real decode steps of the whole split model (1 warm-up + 3 timed, batch 1; "
             "the median is shown, finite logits checked). Peak memory is `torch.cuda.max_memory_allocated` per GPU over the decode "
             "steps; the candidate length came from each GPU's free memory and the bytes per token of the layers it holds, "
             "backing off 0.9× on out-of-memory."]
    for r in rows:
        if "key_outlier_fraction" in r:
            notes.append(f"{r['format']}: {r['key_outlier_fraction']:.2%} of key entries stored as outliers; {r.get('avg_bits', 0):.2f} bits per "
                         f"K/V element on average; kernels used: {yes(r.get('uses_kernels'))}; finite logits: {yes(r.get('finite_logits'))}.")
    out += [f"- {n}" for n in notes] + [""]
    return out


def projection(res: dict) -> list[str]:
    rec = res["sections"].get("capacity", {})
    rows = capacity_rows(rec)
    out = ["## Projection, not a measurement: the paper's 10M tokens on 8 GPUs", ""]
    if not rows:
        return out + ["No capacity measurement to project from.", ""]
    weights = rec.get("weight_bytes") or sum(rec.get("split", {}).get("weights_bytes_per_device", {}).values())
    gpus = res.get("env", {}).get("gpus", [])
    h200 = max((g["memory_bytes"] for g in gpus if "H200" in g["name"]), default=H200_FALLBACK_GIB * GiB)
    out += [
        "KVQuant's paper reports 10M tokens of LLaMA-7B context on 8 A100-80GB GPUs with nuq2. From the bytes per token measured "
        "above (the real stored bytes, all layers), the tokens 8 GPUs would hold with the 7B weights split evenly over them:",
        "",
        "`tokens_8gpu = 8 × (M − W/8 − R) / bytes_per_token`",
        "",
        f"- M: memory per GPU as torch reports it: {GPU_80GB_CLASS_GIB} GiB for an 80 GB A100/H100 (assumed), "
        f"{h200 / GiB:.1f} GiB for a 141 GB H200{' (measured here)' if any('H200' in g['name'] for g in gpus) else ' (assumed)'}.",
        f"- W: the model's weights, {weights / GiB:.2f} GiB (fp16), one eighth per GPU.",
        "- R: per-GPU workspace besides weights and cache, taken from this run: the largest (peak − weights − cache) over the "
        "GPUs in that format's row (activations, attention scratch, allocator slack).",
        "- Assumes the split scales to 8 GPUs (layers spread evenly, a pipeline as here: one GPU works at a time) and that "
        "positions up to 10M behave like the measured ones; nothing here ran on 8 GPUs or at 10M tokens.",
        "",
        f"| format | bytes/token | R (GiB) | tokens, 8 × 80 GB | tokens, 8 × 141 GB | KV for {PAPER_TOKENS / 1e6:.0f}M tokens (10⁹ B) |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        bpt = r["bytes_per_token_measured"]
        weights_dev = rec.get("split", {}).get("weights_bytes_per_device", {})
        peaks = r.get("peak_bytes_per_device", {})
        cache = r.get("cache_bytes_per_device", {})
        reserve = max((peaks[d] - weights_dev.get(d, 0) - cache.get(d, 0) for d in peaks), default=0)
        cells = []
        for mem in (GPU_80GB_CLASS_GIB * GiB, h200):
            tokens = 8 * (mem - weights / 8 - reserve) / bpt
            cells.append(f"{tokens / 1e6:.2f}M" + (" (≥10M)" if tokens >= PAPER_TOKENS else ""))
        bold = "**" if r["format"] == "nuq2" else ""
        out.append(f"| {bold}{r['format']}{bold} | {bpt:,.0f} | {reserve / GiB:.2f} | {cells[0]} | {cells[1]} | {PAPER_TOKENS * bpt / 1e9:,.0f} GB |")
    out.append("")
    return out


def render(res: dict) -> str:
    lines = ["# Multi-GPU: a LLaMA-2-7B-shaped model split over two GPUs", ""]
    if res.get("dry_run"):
        lines += ["> **DRY RUN on the CPU with a tiny model: these numbers are not measurements.** They only show that the script "
                  "and this report run end to end.", ""]
    lines += ["Produced by `benchmarks/multi_gpu.py` and rendered by `benchmarks/multi_gpu_report.py`. Rerun on a 2-GPU machine:", "",
              "```", "PYTHONPATH=$PWD python benchmarks/multi_gpu.py --out runs/multi_gpu",
              "python benchmarks/multi_gpu_report.py runs/multi_gpu/results.json --out docs/multi_gpu.md", "```", ""]
    lines += environment(res) + [""]
    lines += exactness(res) + capacity(res) + projection(res)
    return "\n".join(lines).rstrip() + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("results", type=Path)
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parents[1] / "docs" / "multi_gpu.md")
    args = ap.parse_args(argv)
    text = render(json.loads(args.results.read_text()))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
