"""Turn the GPU suite's results into ``docs/benchmarks.md`` and PNG plots (runs on CPU).

    python benchmarks/gpu_report.py OUT [OUT2 ...] [--doc docs/benchmarks.md] [--figures docs/figures]

Several result folders (one per device call) are merged stage by stage; a later folder's stage replaces an
earlier one's. The acceptance checks of the kernels issue are evaluated from the numbers and printed in the doc.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
GiB = 2**30
FORMATS = ["nuq4", "nuq4-1%", "nuq3", "nuq3-1%", "nuq2", "nuq2-1%"]


def load(folders: list[Path]) -> dict:
    merged = {"env": {}, "stages": {}, "sources": {}}
    for folder in folders:
        data = json.loads((folder / "results.json").read_text())
        merged["env"] = data.get("env", merged["env"])
        for name, rec in data.get("stages", {}).items():
            if not isinstance(rec, dict) or rec.get("status") is None:
                continue
            if rec["status"] == "running":
                if not rec.get("rows"):
                    continue
                # The device call's time limit stopped the stage: keep what it measured, say so.
                rec = dict(rec, status="cut short by the device call's time limit (rows measured so far)")
            merged["stages"][name] = rec
            merged["sources"][name] = str(folder)
    return merged


def us(r: dict | None) -> str:
    return f"{r['ms'] * 1e3:,.0f}" if r and "ms" in r else "–"


def human(n: int) -> str:
    return f"{n // 1024}K" if n < 2**20 else f"{n / 2**20:g}M"


def decode_tables(rec: dict) -> list[str]:
    out = []
    copy = rec.get("copy_GBps")
    out.append(f"Device-to-device copy bandwidth measured in the same run: **{copy:,.0f} GB/s** (read + write).\n" if copy else "")
    rows = [r for r in rec.get("rows", []) if "fp16" in r]
    for shape in sorted({r["shape"] for r in rows}):
        for batch in sorted({r["batch"] for r in rows if r["shape"] == shape}):
            sel = sorted((r for r in rows if r["shape"] == shape and r["batch"] == batch), key=lambda r: r["context"])
            out.append(f"\n#### {shape}, batch {batch}: µs per decode-attention call (one layer)\n")
            quanto = [k for k in ("quanto-int4", "quanto-int2") if any(k in r for r in sel)]
            head = ["context", "fp16 SDPA"] + quanto + FORMATS
            out.append("| " + " | ".join(head) + " |")
            out.append("|" + "---|" * len(head))
            for r in sel:
                cells = [human(r["context"]), us(r["fp16"]) + (f" ({r['fp16'].get('backend', '')})" if "ms" in r["fp16"] else "")]
                cells += [us(r.get(k)) for k in quanto]
                for f in FORMATS:
                    x = r.get(f, {})
                    cells.append(f"{us(x)} (×{x['speedup_vs_fp16']:.2f})" if "speedup_vs_fp16" in x else us(x))
                out.append("| " + " | ".join(cells) + " |")
            out.append("\nAchieved bandwidth of the bytes each call must read (GB/s, and fraction of the copy bandwidth):\n")
            head = ["context", "fp16 SDPA"] + FORMATS
            out.append("| " + " | ".join(head) + " |")
            out.append("|" + "---|" * len(head))
            for r in sel:
                cells = [human(r["context"]), f"{r['fp16']['GBps']:,.0f}" if "GBps" in r["fp16"] else "–"]
                for f in FORMATS:
                    x = r.get(f, {})
                    cells.append(f"{x['GBps']:,.0f} ({x['copy_fraction']:.0%})" if "GBps" in x and "copy_fraction" in x else "–")
                out.append("| " + " | ".join(cells) + " |")
    acc = rec.get("accuracy", [])
    if acc:
        worst = max(acc, key=lambda a: a["rel_err"])
        out.append(f"\nAccuracy spot check at 4K (every shape and format, fp16 in/out vs the fp32 reference): worst relative error "
                   f"{worst['rel_err']:.1e} ({worst['shape']}, {worst['format']}); all finite: {all(a['finite'] for a in acc)}.\n")
    if rec.get("tuning"):
        out.append("\nKernel configuration sweep (128K, batch 1, nuq3-1%; `slots per iteration x warps`: ms):\n")
        for shape, t in rec["tuning"].items():
            out.append(f"- {shape}: " + ", ".join(f"{k}: {v:.3f}" if isinstance(v, float) else f"{k}: {v}" for k, v in t.items()))
    qc = rec.get("quantized_cache", {})
    if qc and qc.get("status") not in (None, "ok"):
        out.append(f"\nHF QuantizedCache baseline: {qc.get('status')} {qc.get('error', '')}")
    return out


def acceptance(stages: dict) -> list[str]:
    out = []
    dec = stages.get("decode", {})
    rows = [r for r in dec.get("rows", []) if "fp16" in r]
    target = [r for r in rows if r["shape"].startswith("MHA") and r["batch"] == 1 and r["context"] == 131072]
    if target and "speedup_vs_fp16" in target[0].get("nuq3-1%", {}):
        x = target[0]["nuq3-1%"]
        out.append(f"- 128K, batch 1, MHA, nuq3-1%: **×{x['speedup_vs_fp16']:.2f}** over fp16 SDPA (need ≥ 2, goal > 3.5): "
                   f"{'PASS' if x['speedup_vs_fp16'] >= 2 else 'FAIL'}; **{x['copy_fraction']:.0%}** of copy bandwidth (need ≥ 50%): "
                   f"{'PASS' if x['copy_fraction'] >= 0.5 else 'FAIL'}")
    else:
        out.append("- 128K, batch 1, MHA, nuq3-1%: not measured")
    slower = [(r["shape"], r["batch"], r["context"], f) for r in rows if r["context"] >= 8192 for f in FORMATS
              if "speedup_vs_fp16" in r.get(f, {}) and r[f]["speedup_vs_fp16"] < 1]
    measured = sum(1 for r in rows if r["context"] >= 8192 for f in FORMATS if "speedup_vs_fp16" in r.get(f, {}))
    out.append(f"- faster than fp16 SDPA at every context ≥ 8K and bit width: {'PASS' if measured and not slower else 'FAIL' if slower else 'not measured'}"
               f" ({measured} cases measured" + (f"; slower: {slower[:8]}" if slower else "") + ")")
    vs_q = [(r["shape"], r["batch"], r["context"], f, k) for r in rows for f in FORMATS for k in ("quanto-int4", "quanto-int2")
            if f"speedup_vs_{k}" in r.get(f, {}) and r[f][f"speedup_vs_{k}"] < 1]
    nq = sum(1 for r in rows for f in FORMATS for k in ("quanto-int4", "quanto-int2") if f"speedup_vs_{k}" in r.get(f, {}))
    out.append(f"- faster than HF QuantizedCache at every length: {'PASS' if nq and not vs_q else 'FAIL' if vs_q else 'not measured'} ({nq} comparisons)")
    cap = stages.get("capacity", {}).get("rows", [])
    for model, fmt, need in (("llama2-7b", "nuq2", 1_000_000), ("llama2-7b", "nuq3-1%", 600_000)):
        r = next((c for c in cap if c.get("model") == model and c.get("format") == fmt and "context" in c), None)
        out.append(f"- capacity {model} {fmt}: " + (f"{r['context']:,} tokens (need ≥ {need:,}): {'PASS' if r['context'] >= need else 'FAIL'}" if r else "not measured"))
    e2e = stages.get("e2e", {}).get("rows", [])
    for length in (32768, 131072):
        base = next((r for r in e2e if r.get("kind") == "fp16-dynamic" and r.get("context") == length and r.get("batch") == 1), None)
        for bits in (4, 3, 2):
            r = next((x for x in e2e if x.get("kind") == f"kvquant-{bits}" and x.get("context") == length and x.get("batch") == 1), None)
            if not r or "ms_per_token" not in r:
                out.append(f"- e2e {human(length)} KVQuant {bits}-bit: not measured")
                continue
            if base and "ms_per_token" in base:
                verdict = "PASS" if r["ms_per_token"] <= base["ms_per_token"] * 1.02 else "FAIL"
                cmp = f"{r['ms_per_token']:.1f} vs fp16 {base['ms_per_token']:.1f} ms/token: {verdict}"
            else:
                cmp = f"{r['ms_per_token']:.1f} ms/token; fp16 DynamicCache: {base.get('status', 'not measured') if base else 'not measured'}"
            extra = r["peak_bytes"] - r["weight_bytes"] - r["cache_bytes"]
            out.append(f"- e2e {human(length)} KVQuant {bits}-bit: {cmp}; peak {r['peak_bytes'] / GiB:.2f} GiB = weights "
                       f"{r['weight_bytes'] / GiB:.2f} + cache (own accounting) {r['cache_bytes'] / GiB:.2f} + {extra / GiB:.2f} GiB other")
    return out


def e2e_table(rec: dict) -> list[str]:
    out = ["| cache | context | batch | ms/token | peak GiB | cache GiB (own accounting) | weights GiB | status |", "|---|---|---|---|---|---|---|---|"]
    for r in sorted(rec.get("rows", []), key=lambda r: (r.get("batch_mode", ""), r.get("context", 0), r.get("kind", ""))):
        out.append(f"| {r.get('kind')} | {human(r.get('context', 0))} | {r.get('batch')} | {r['ms_per_token']:.1f} | " if "ms_per_token" in r
                   else f"| {r.get('kind')} | {human(r.get('context', 0))} | {r.get('batch')} | – | ")
        out[-1] += (f"{r['peak_bytes'] / GiB:.2f} | " if r.get("peak_bytes") else "– | ") + (f"{r['cache_bytes'] / GiB:.2f} | " if r.get("cache_bytes") else "– | ")
        out[-1] += (f"{r['weight_bytes'] / GiB:.2f} | " if r.get("weight_bytes") else "– | ") + f"{r.get('status', 'ok')} |"
    return out


def capacity_table(rec: dict) -> list[str]:
    out = ["| model | format | longest context | bytes/token (all layers) | cache GiB | decode ms/token there | peak GiB | status |", "|---|---|---|---|---|---|---|---|"]
    for r in rec.get("rows", []):
        out.append(f"| {r.get('model')} | {r.get('format', '')} | {r['context']:,} | " if "context" in r else f"| {r.get('model')} | {r.get('format', '')} | – | ")
        out[-1] += f"{r.get('bytes_per_token', 0):,.0f} | " + (f"{r['cache_bytes'] / GiB:.2f} | " if r.get("cache_bytes") else "– | ")
        out[-1] += (f"{r['ms_per_token']:.0f} | " if "ms_per_token" in r else "– | ") + (f"{r['peak_bytes'] / GiB:.2f} | " if r.get("peak_bytes") else "– | ")
        out[-1] += f"{r.get('status', 'ok')}" + (f" (OOM at {r['out_of_memory_at']})" if r.get("out_of_memory_at") else "") + " |"
    return out


def plots(stages: dict, figures: Path) -> list[str]:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    figures.mkdir(parents=True, exist_ok=True)
    made = []
    rows = [r for r in stages.get("decode", {}).get("rows", []) if "fp16" in r]
    for shape in sorted({r["shape"] for r in rows}):
        fig, axes = plt.subplots(1, 2, figsize=(11, 4))
        for ax, batch in zip(axes, (1, 8)):
            sel = sorted((r for r in rows if r["shape"] == shape and r["batch"] == batch), key=lambda r: r["context"])
            for key in ["fp16", "quanto-int4", "quanto-int2"] + FORMATS:
                pts = [(r["context"], r[key]["ms"] * 1e3) for r in sel if "ms" in r.get(key, {})]
                if pts:
                    ax.plot(*zip(*pts), marker="o", label=key, linestyle="--" if key.startswith(("fp16", "quanto")) else "-")
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_xlabel("context (tokens)")
            ax.set_ylabel("µs per call")
            ax.set_title(f"{shape}, batch {batch}")
            ax.grid(True, which="both", alpha=0.3)
        axes[0].legend(fontsize=7)
        fig.tight_layout()
        path = figures / f"decode_{shape}.png"
        fig.savefig(path, dpi=120)
        plt.close(fig)
        made.append(path)
    cap = [r for r in stages.get("capacity", {}).get("rows", []) if "context" in r]
    if cap:
        fig, ax = plt.subplots(figsize=(8, 4))
        models = sorted({r["model"] for r in cap})
        fmts = ["fp16", "nuq4-1%", "nuq3-1%", "nuq2-1%", "nuq2"]
        width = 0.8 / len(models)
        for i, m in enumerate(models):
            vals = [next((r["context"] for r in cap if r["model"] == m and r["format"] == f), 0) / 1e6 for f in fmts]
            ax.bar([x + i * width for x in range(len(fmts))], vals, width, label=m)
        ax.set_xticks([x + width * (len(models) - 1) / 2 for x in range(len(fmts))], fmts)
        ax.set_ylabel("longest context (M tokens), one GPU")
        ax.legend()
        ax.grid(True, axis="y", alpha=0.3)
        fig.tight_layout()
        path = figures / "capacity.png"
        fig.savefig(path, dpi=120)
        plt.close(fig)
        made.append(path)
    return made


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("folders", nargs="+", type=Path)
    ap.add_argument("--doc", type=Path, default=REPO / "docs" / "benchmarks.md")
    ap.add_argument("--figures", type=Path, default=REPO / "docs" / "figures")
    ap.add_argument("--note", action="append", default=[], help="a line added under the stage sources (e.g. which kernel commit a stage ran)")
    args = ap.parse_args()
    data = load(args.folders)
    env, st = data["env"], data["stages"]
    lines = ["# GPU benchmarks of the KVQuant kernels", ""]
    lines.append(f"GPU **{env.get('gpu', '?')}** ({env.get('gpu_memory_gib', '?')} GiB, {env.get('sms', '?')} SMs), torch {env.get('torch')}, "
                 f"triton {env.get('triton')}, transformers {env.get('transformers')}, CUDA {env.get('cuda')}, optimum-quanto "
                 f"{env.get('optimum_quanto')}; run {env.get('date_utc')}.")
    lines.append("")
    lines.append("Produced by `python benchmarks/gpu_suite.py --out OUT` on the GPU machine and "
                 f"`python benchmarks/gpu_report.py OUT` here; raw numbers and logs are in `{', '.join(str(f) for f in args.folders)}`. "
                 "Timings are medians of CUDA-event timed calls with the L2 cache flushed in between; end-to-end numbers are "
                 "synchronized wall-clock ms per generated token. Weights are random (fp16): only speed and memory are measured.")
    lines += ["", "Where each stage's numbers come from:", ""]
    lines += [f"- {name}: `{src}`" + (f" ({st[name]['status']})" if str(st[name].get("status", "ok")).startswith("cut short") else "")
              for name, src in data["sources"].items()]
    lines += [f"- {n}" for n in args.note]
    lines += ["", "## Acceptance checks", ""] + acceptance(st)
    t = st.get("tests")
    if t:
        lines += ["", "## Kernel tests on the GPU (compiled)", "", f"`KVQUANT_TEST_COMPILED=1 pytest tests/kernels`: {t.get('pytest', {}).get('summary', t.get('status'))}"]
        for f in t.get("pytest", {}).get("failures", []):
            lines.append(f"- {f}")
        for g in t.get("generate", []):
            lines.append(f"- generate, {g.get('model')}: same greedy tokens as the reference path: **{g.get('same_tokens')}**; teacher-forced "
                         f"max |Δlogit| {g.get('max_abs_logit_diff', float('nan')):.3g} (logit scale {g.get('logit_scale', float('nan')):.3g}), "
                         f"top-1 agreement {g.get('teacher_forced_top1_agreement', float('nan')):.1%}" if "same_tokens" in g else f"- generate, {g.get('model')}: {g.get('status')}")
    if "decode" in st:
        lines += ["", "## (a) Decode attention, one layer", ""] + decode_tables(st["decode"])
    if "e2e" in st:
        lines += ["", "## (b) End-to-end decode, LLaMA-2-7B shape (random weights)", "",
                  "Contexts are filled with synthetic K/V (KVQuant: pre-RoPE K/V appended through the append kernel), then the whole "
                  "model decodes. CUDA graphs / torch.compile were not used for any cache.", ""] + e2e_table(st["e2e"])
    if "capacity" in st:
        lines += ["", "## (c) Capacity on one GPU", "",
                  "The longest context whose cache fits beside the model, filled with synthetic pre-RoPE K/V through the append kernel "
                  "(fp16: a DynamicCache), proven by real decode steps of the whole model at that length.", ""] + capacity_table(st["capacity"])
    made = plots(st, args.figures)
    if made:
        lines += ["", "## Plots", ""] + [f"![{p.stem}]({p.relative_to(args.doc.parent) if p.is_relative_to(args.doc.parent) else p})" for p in made]
    failed = {n: r.get("error") for n, r in st.items() if isinstance(r, dict) and r.get("status") == "failed"}
    if failed:
        lines += ["", "## Stages that failed", ""] + [f"- {n}: {e}" for n, e in failed.items()]
    args.doc.parent.mkdir(parents=True, exist_ok=True)
    args.doc.write_text("\n".join(lines) + "\n")
    print("\n".join(lines[:12] + ["..."] + acceptance(st)))


if __name__ == "__main__":
    main()
