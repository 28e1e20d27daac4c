"""docs/benchmarks.{md,json} (decode kernel) and docs/e2e.{md,json} (end to end) from the raw GPU results.

    python benchmarks/report.py docs/gpu_runs/h200-2026-12-01 docs/gpu_runs/h200-2026-12-01b

Reads, root after root and call after call, ``call*/decode.json`` (benchmarks/decode.py), ``call*/e2e.json`` and
the ``rows`` lines of ``call*/e2e.log`` (benchmarks/e2e.py; a call cut short leaves its rows in the log),
``call*/gpu_checks.json``, ``call*/checks.log``, ``call*/kernel_tests.log`` and ``sass.json``
(benchmarks/sass_count.py). A later measurement of the same case replaces an earlier one (a decode row by shape,
batch, context and format; an end-to-end row by shape, cache, compiled, context, batch and kind); capacity runs
accumulate. Writes the documents with their plots into docs/.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DOCS = REPO / "docs"
FORMATS = ("nuq4", "nuq3", "nuq3-1%", "nuq2")


def load_runs(roots: list[Path]):
    decode_rows, appends, env, e2e, capacity, checks, versions, extra = {}, {}, {}, {}, [], None, "", {}
    for root in roots:
        for call in sorted(root.glob("call*")):
            source = f"{root.name}/{call.name}"
            if (call / "decode.json").exists():
                data = json.loads((call / "decode.json").read_text())
                env = dict(data["environment"], source=source)
                for r in data["decode"]:
                    decode_rows[(r["shape"], r["batch"], r["context"], r["format"])] = dict(r, source=source)
                for a in data["append"]:
                    appends[(a["shape"], a["batch"])] = dict(a, source=source)
            if (call / "gpu_checks.json").exists():
                # a later call may run only some of the checks: each check keeps its latest result
                new = json.loads((call / "gpu_checks.json").read_text())
                checks = dict(checks or {}, **new, source=source)
                if "exactness" in new:
                    checks["exactness_source"] = source
            if (call / "checks.log").exists():  # the kernel-vs-reference generations print their rows as they go
                extra["generations"] = [line for line in (call / "checks.log").read_text().splitlines() if " triton-" in line]
                extra["generations_source"] = source
            if (call / "kernel_tests.log").exists():
                tail = [ln for ln in (call / "kernel_tests.log").read_text().strip().splitlines()
                        if " passed" in ln or " failed" in ln or " error" in ln]
                extra["kernel_tests"] = (tail[-1] if tail else "", source)
            if (call / "versions.txt").exists():
                versions = (call / "versions.txt").read_text().strip()
            rows, caps = [], []
            nested = sorted(call.glob("*/e2e.json"))  # a call's further runs, each in a folder of its own
            if (call / "e2e.json").exists() or nested:
                for f in [call / "e2e.json"] * (call / "e2e.json").exists() + nested:
                    data = json.loads(f.read_text())
                    rows, caps = rows + data["rows"], caps + data["capacity"]
            elif (call / "e2e.log").exists():
                for line in (call / "e2e.log").read_text().splitlines():
                    if line.startswith("rows {"):
                        rows.append(json.loads(line[5:]))
                    elif line.startswith("capacity {"):
                        caps.append(json.loads(line[9:]))
            ttft_here = {(r.get("shape"), r.get("context")) for r in rows if r.get("ttft_s") or r.get("ttft_error")}
            for key in [k for k, r in e2e.items() if k[-2] == "ttft" and (k[0], k[3]) in ttft_here]:
                del e2e[key]  # a prompt length's TTFT rows all come from the latest call that timed it (same code)
            for r in rows:
                kind = "ttft" if r.get("ttft_s") or r.get("ttft_error") else ("throughput" if r.get("throughput_error") else "decode")
                variant = r.get("prefill") if kind == "ttft" else None  # TTFT rows differ by chunk size too
                e2e[(r.get("shape"), r.get("cache"), r.get("compiled"), r.get("context"), r.get("batch") or 1, kind, variant)] = dict(r, source=source)
            capacity += [dict(c, source=source) for c in caps]
            for f in sorted(call.glob("trace_*.json")) + sorted(call.glob("*/trace_*.json")):
                TRACES.append(dict(json.loads(f.read_text()), source=f"{source}/{f.relative_to(call)}"))
    decode = {"decode": list(decode_rows.values()), "append": list(appends.values())} if decode_rows else None
    return decode, env, list(e2e.values()), capacity, checks, versions, extra


# ------------------------------------------------------------------------------------------------ decode
def decode_doc(root: Path, decode: dict, env: dict, checks, versions: str, extra: dict) -> None:
    rows = decode["decode"]
    appends = decode["append"]
    (DOCS / "benchmarks.json").write_text(json.dumps({
        "environment": {**env, "versions": versions, "root": str(root.relative_to(REPO))},
        "decode": [{k: r[k] for k in ("shape", "batch", "context", "format", "fp16_us", "kvquant_us", "speedup", "kvquant_GBps",
                                      "kvquant_copy_fraction", "fp16_backend", "source")} for r in rows],
        "append": appends,
    }, indent=1))
    by = {(r["shape"], r["batch"], r["context"], r["format"]): r for r in rows}
    shapes = list(dict.fromkeys(r["shape"] for r in rows))
    lines = [
        "# Decode attention: the packed-cache kernel against fp16 SDPA",
        "",
        f"GPU **{env.get('gpu')}**, {versions}; copy bandwidth measured in the same run: {env.get('copy_GBps')} GB/s "
        "(a 4 GiB device-to-device copy, bytes read plus written).",
        "",
        "Reproduce: `bash benchmarks/device_session.sh` on the GPU (its decode stage is `python benchmarks/decode.py --out OUT "
        f"--contexts 4096,8192,32768,131072,524288`), then `{REPORT_CMD}` here. Raw results and logs: "
        "`docs/gpu_runs/<root>/<call>/`; every row names its root and call in docs/benchmarks.json.",
        "",
        "One attention layer, one query per row, each call captured in a CUDA graph and timed alone after an L2 flush "
        "(median of 15). fp16: `scaled_dot_product_attention` over fp16 K/V, the fastest backend that runs the shape "
        "(cuDNN everywhere here). KVQuant: the three decode launches over a packed cache of that context (the layout "
        "of docs/format.md; random codes, ranges and outliers). `×` is fp16 time / KVQuant time (above 1: KVQuant "
        "faster); GB/s counts the bytes the call must read (codes, ranges, outliers, positions).",
        "",
        "## Acceptance (issue: decode attention at memory speed)",
        "",
    ]
    for shape in shapes:
        if shape.startswith(("MHA", "GQA")):
            r = by.get((shape, 1, 131072, "nuq3-1%"))
            if r:
                lines.append(f"- 128K, batch 1, nuq3-1%, {shape}: **×{r['speedup']:.2f}** ({r['kvquant_us']:.0f} µs vs fp16 "
                             f"{r['fp16_us']:.0f} µs; need ≥ ×2.5): **FAIL**")
    slow = [r for r in rows if r["context"] >= 8192 and r["speedup"] < 1]
    lines.append(f"- faster than fp16 SDPA at every width, batch 1 and 8, every context ≥ 8K: **FAIL** ({len(slow)} of "
                 f"{sum(r['context'] >= 8192 for r in rows)} cases slower; the best is ×{max(r['speedup'] for r in rows):.2f})")
    for a in appends:
        lines.append(f"- append at 32K, {a['shape']}, batch {a['batch']}: {a['append_us']:.0f} µs = "
                     f"{100 * a['append_fraction']:.0f}% of the decode ({a['decode_us']:.0f} µs; need < 10%): "
                     f"{'PASS' if a['append_fraction'] < 0.1 else 'FAIL'}")
    morning_file = DOCS / "gpu_runs" / "h200-2026-12-01" / "call1" / "decode.json"
    morning = ({(r["shape"], r["batch"], r["context"], r["format"]): r["kvquant_us"] for r in json.loads(morning_file.read_text())["decode"]}
               if morning_file.exists() else {})
    issue = {("MHA", "nuq3-1%"): 2286, ("GQA", "nuq3-1%"): 1608, ("MHA", "nuq3"): 1363, ("GQA", "nuq3"): 1059}  # the issue's table
    old = {k: (v, morning.get((next(s for s in shapes if s.startswith(k[0])), 1, 131072, k[1]), float("nan"))) for k, v in issue.items()}
    lines += ["", "Against the kernels this replaces (same GPU model, 128K, batch 1): the issue's table (CSR outliers), and "
              "the v2-layout kernel of the morning of 2026-12-01 (docs/gpu_runs/h200-2026-12-01/call1, before the "
              "one-wave split rule, the prefetches and the outlier changes of docs/kernels.md):", "",
              "| shape | format | issue µs | morning µs | now µs | change since the issue |", "|---|---|---|---|---|---|"]
    for (kind, fmt), (before, morning) in old.items():
        shape = next(s for s in shapes if s.startswith(kind))
        r = by.get((shape, 1, 131072, fmt))
        if r:
            lines.append(f"| {shape} | {fmt} | {before} | {morning:.0f} | {r['kvquant_us']:.0f} | ×{before / r['kvquant_us']:.2f} faster |")
    lines += ["", "![speed-up over fp16 SDPA](figures/decode_speedup.png)", ""]
    for shape in shapes:
        lines += [f"## {shape}", "", "| batch | context | fp16 µs | " + " | ".join(f"{f} µs (×, GB/s, % copy)" for f in FORMATS) + " |",
                  "|---|---|---|" + "---|" * len(FORMATS)]
        for batch in sorted({r["batch"] for r in rows if r["shape"] == shape}):
            for ctx in sorted({r["context"] for r in rows if r["shape"] == shape}):
                cells = []
                fp = None
                for f in FORMATS:
                    r = by.get((shape, batch, ctx, f))
                    if r is None:
                        cells.append("—")
                        continue
                    fp = r["fp16_us"]
                    cells.append(f"{r['kvquant_us']:.1f} (×{r['speedup']:.2f}, {r['kvquant_GBps']:.0f}, {100 * r['kvquant_copy_fraction']:.0f}%)")
                if fp is not None:
                    lines.append(f"| {batch} | {ctx // 1024}K | {fp:.1f} | " + " | ".join(cells) + " |")
        lines.append("")
    if checks:
        lines += ["## Correctness on the GPU (same session)", "",
                  f"`python benchmarks/gpu_checks.py` (docs/gpu_runs/{checks.get('exactness_source', checks['source'])}/gpu_checks.json): bits=16 against "
                  "transformers' caches on CUDA, max |Δlogit| per comparison:", ""]
        for name, v in (checks.get("exactness") or {}).items():
            if isinstance(v, dict) and "max_abs_dlogit" in v:
                lines.append(f"- {name}: same tokens {v['same_tokens']}, max |Δlogit| {v['max_abs_dlogit']:g}")
        gens = extra.get("generations") or []
        if gens:
            lines += ["", f"Quantized generation, Triton kernels against the PyTorch reference path (same config and model; "
                      f"`{extra['generations_source']}/checks.log`):", ""] + [f"- `{g.strip()}`" for g in gens
                                                                               if not g.startswith("quantized ")]
            if any("first_divergent_step" in g for g in gens):
                lines += ["", "Where the tokens differ, the logits agree up to the first divergent step as closely as "
                          "elsewhere and the reference's top-2 margin there is below that difference: a greedy near-tie "
                          "that the compiled fp16 rounding flips (after it the two runs continue from different tokens, "
                          "hence the large later difference), not a wrong kernel."]
        tests = extra.get("kernel_tests")
        if tests:
            lines += ["", f"Compiled kernel tests, `KVQUANT_TEST_COMPILED=1 pytest tests/kernels` (what gpu_checks.py runs): "
                      f"**{tests[0].strip('= ')}** (`{tests[1]}/kernel_tests.log`)."]
        lines.append("")
    sass = next((r / "sass.json" for r in reversed(ROOTS) if (r / "sass.json").exists()), None)
    if sass:
        data = json.loads(sass.read_text())
        lines += ["## SASS instructions per element (offline, sm_90)", "",
                  f"`python benchmarks/sass_count.py --quick --out {sass.relative_to(REPO)}` (Triton {data['triton']}, no GPU). "
                  "Per element of K (key pass) or V (value pass) a thread decodes in one loop iteration; the key pass "
                  "also with its branch for blocks whose positions jump (one more query rotation and dot per distinct "
                  "base, taken only with custom position ids) compiled in. See docs/kernels.md for the budget.", "",
                  "| bits | outliers/head | G | D | warps | regs | key pass | (with branch) | value pass |", "|---|---|---|---|---|---|---|---|---|"]
        for r in data["rows"]:
            if r["kernel"] == "decode":
                lines.append(f"| {r['bits']} | {r['outliers']} | {r['groups']} | {r['head_dim']} | {r['warps']} | {r['registers']} | "
                             f"{r.get('key_pass_per_element')} | {r.get('key_pass_per_element_static')} | {r.get('value_pass_per_element')} |")
        lines.append("")
    (DOCS / "benchmarks.md").write_text("\n".join(lines))
    plot_decode(rows, shapes)


def plot_decode(rows, shapes) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(shapes), figsize=(5 * len(shapes), 4), sharey=True)
    for ax, shape in zip(axes, shapes):
        for f in FORMATS:
            for batch, style in ((1, "-o"), (8, "--s")):
                pts = sorted((r["context"], r["speedup"]) for r in rows if r["shape"] == shape and r["format"] == f and r["batch"] == batch)
                if pts:
                    ax.plot([p[0] for p in pts], [p[1] for p in pts], style, label=f"{f} B{batch}", markersize=3)
        ax.axhline(1.0, color="k", lw=0.8)
        ax.axhline(2.5, color="r", lw=0.8, ls=":")
        ax.set_xscale("log", base=2)
        ax.set_title(shape)
        ax.set_xlabel("context (tokens)")
    axes[0].set_ylabel("fp16 SDPA time / KVQuant time")
    axes[-1].legend(fontsize=7)
    fig.suptitle("Decode attention on an H200: above 1 KVQuant is faster (red: the issue's 2.5×)")
    fig.tight_layout()
    (DOCS / "figures").mkdir(exist_ok=True)
    fig.savefig(DOCS / "figures" / "decode_speedup.png", dpi=110)


# ------------------------------------------------------------------------------------------------ end to end
def e2e_doc(root: Path, e2e: list, capacity: list, versions: str) -> None:
    measured = [r for r in e2e if "error" not in r and "ttft_error" not in r and "throughput_error" not in r]
    failed = [r for r in e2e if r not in measured]
    for r in measured:
        if r.get("compiled"):
            cudagraphs = r["source"] in ("h200-2026-12-01/call2", "h200-2026-12-01/call3")  # the two short calls of that session
            r["compile"] = ("torch.compile(backend='cudagraphs', fullgraph=True)" if cudagraphs
                            else "torch.compile(mode='reduce-overhead', fullgraph=True)")
    fields = ("shape", "cache", "compiled", "context", "batch", "ms_per_token", "tokens_per_s", "ttft_s", "peak_gib", "cache_gib", "source")
    (DOCS / "e2e.json").write_text(json.dumps({
        "rows": [{k: r.get(k) for k in fields} | ({"compile": r["compile"]} if "compile" in r else {})
                 | ({"prefill": r["prefill"]} if "prefill" in r else {}) for r in measured],
        "capacity": [dict(c, shape=_shape(c)) for c in capacity],
        "not_measured": [{k: r.get(k) for k in ("shape", "cache", "compiled", "context", "source")} | {"reason": _reason(r)} for r in failed],
    }, indent=1))
    dec = [r for r in measured if r.get("ms_per_token")]
    ttft = [r for r in measured if r.get("ttft_s")]
    get = lambda shape, cache, compiled, ctx: next((r for r in dec if r["shape"] == shape and r["cache"] == cache
                                                    and r["compiled"] == compiled and r["context"] == ctx
                                                    and (r.get("batch") or 1) == 1 and not r.get("equal_memory")), None)
    lines = [
        "# End to end: decode speed, time to first token and capacity (LLaMA-2-7B and Llama-3-8B shapes, random fp16 weights)",
        "",
        f"H200, {versions}. Reproduce: `python benchmarks/e2e.py --out OUT --stages decode --contexts 32768,131072 "
        "--compile-backend inductor [--shapes Llama-3-8B]` on the GPU (the TTFT and capacity rows: `--stages ttft,capacity`), "
        f"then `{REPORT_CMD}`. Every row names the "
        "call it comes from; the LLaMA-2-7B capacity rows were measured in an earlier session (h200-2026-12-01: the layout "
        "has not changed since; the decode kernel has); the Llama-3-8B capacity and its latest decode rows by "
        "`bash benchmarks/call_d.sh` (h200-2026-12-01d); the TTFT rows by `bash benchmarks/call_j.sh` (h200-2026-12-02b: "
        "call3 for 128K), after the prefill changes of that session (call1 is the "
        "before: the append 31% of a 32K prefill's GPU time, TTFT 2.85 s in 16K chunks and 2.44 s in one), the 32K ones "
        "by `bash benchmarks/call_w.sh` (h200-2026-12-03d/call1, with the exact window's prefill attending only the "
        "columns each query block can read; h200-2026-12-02d/call2 before that: x3.62 with the window, x1.27 without, "
        "x1.15 in one 32K chunk); the 256K and "
        "512K prompts by `bash benchmarks/call_l.sh` (h200-2026-12-02c: call2, where 512K ran out of memory in the "
        "mask check fixed since, and call3).",
        "",
        "Decode: a context written into each cache directly (random fp16 K/V, or random packed codes: the cost does not "
        "depend on the values), then greedy decode steps of the whole model, median ms per token after warm-up. "
        "*Eager*: `model.forward` per step. *Compiled*: `torch.compile(model.forward, mode=\"reduce-overhead\", "
        "fullgraph=True)` (inductor, CUDA graphs) over the static caches: the gpt-fast loop, and what generate does for "
        "a compileable cache. Batch 1, except the equal-memory rows (`--stages throughput`: fp16 at batch 4 against "
        "the KVQuant-3 batch whose cache fits in the same bytes). *Cache GiB* is what the cache allocated: a compiled "
        "KVQuant cache is sized once for the run's longest context (one graph serves every context), so its shorter "
        "rows show the longer context's bytes. The same code measured on different machines gives KVQuant-3 against fp16 "
        "at 32K x0.77 (h200-2026-12-03/call3, where fp16 took 9.5 ms), x0.81 (h200-2026-12-03/call2) and x0.87 "
        "(h200-2026-12-03b/call2; fp16 10.7 ms), and with the keys decoded straight into the tensor-core operand x0.84 "
        "(h200-2026-12-03d/call1, `bash benchmarks/call_w.sh`, the rows shown; fp16 11.0 ms): compare within a call. "
        "The one-buffer static cache "
        "(h200-2026-12-03 on) has the same layout and bytes as before.",
        "",
        "## Acceptance (issue: compiled decoding)",
        "",
    ]
    for shape in dict.fromkeys(r["shape"] for r in dec):
        for ctx, need, label in ((32768, 1.0, "no slower"), (131072, 1.5, "≥ 1.5× faster")):
            k, f = get(shape, "kvquant-3", True, ctx), get(shape, "fp16-static", True, ctx)
            if k and f:
                x = f["ms_per_token"] / k["ms_per_token"]
                lines.append(f"- {shape}, {ctx // 1024}K, batch 1: KVQuant-3 compiled {k['ms_per_token']:.1f} ms/token vs fp16 "
                             f"StaticCache compiled {f['ms_per_token']:.1f} = ×{x:.2f} (need {label}): "
                             f"**{'PASS' if x >= need else 'FAIL'}**" + ("" if shape == "LLaMA-2-7B" else " (the issue's bar is for LLaMA-2-7B)"))
    equal = {r["cache"]: r for r in dec if r.get("equal_memory") and r["shape"] == "LLaMA-2-7B"}
    if "fp16-static" in equal and "kvquant-3" in equal:
        f, k = equal["fp16-static"], equal["kvquant-3"]
        x = k["tokens_per_s"] / f["tokens_per_s"]
        lines.append(f"- throughput at equal memory, LLaMA-2-7B, 32K: fp16 StaticCache batch {f['batch']} ({f['cache_gib']:.1f} "
                     f"GiB of cache) {f['tokens_per_s']:.0f} tokens/s; KVQuant-3 at the batch that fits in those bytes, "
                     f"{k['batch']} ({k['cache_gib']:.1f} GiB), {k['tokens_per_s']:.0f} tokens/s = ×{x:.2f} (need ≥ 3): "
                     f"**{'PASS' if x >= 3 else 'FAIL'}** ({k['source']})")
    else:
        lines.append("- throughput at equal memory (batch 4 fp16 at 32K vs the KVQuant batch that fits): **not measured**")
    for shape in dict.fromkeys(_shape(c) for c in capacity):
        for fmt, need in (("nuq2", 2_000_000), ("nuq3-1%", 1_100_000)):
            best = max((c for c in capacity if c["format"] == fmt and _shape(c) == shape), key=lambda c: c["context"], default=None)
            if best:
                bar = (f"need ≥ {need:,}): {'PASS' if best['context'] >= need else 'FAIL'}" if shape == "LLaMA-2-7B"
                       else "the issue sets no bar for this shape)")
                lines.append(f"- H200 capacity, {shape} shape, {fmt}: **{best['context']:,} tokens** proven by decode steps "
                             f"({best['decode_ms']:.0f} ms/step, peak {best['peak_gib']:.1f} GiB; {bar}")
    fp_of = {(r["shape"], r["context"]): r for r in ttft if r["cache"] == "fp16-dynamic"}
    for r in ttft:
        fp_ttft = fp_of.get((r["shape"], r["context"]))
        if r["cache"] != "fp16-dynamic" and fp_ttft and r["context"] == 32768:
            ratio = r["ttft_s"] / fp_ttft["ttft_s"]
            label = "KVQuant-3" + (f" with an exact window of {r['cache'].split('window')[1]} (long-context preset)"
                                   if "window" in r["cache"] else "")
            lines.append(f"- TTFT, 32K prompt, {label} ({r['prefill']}): {r['ttft_s']:.2f} s vs fp16 {fp_ttft['ttft_s']:.2f} s = "
                         f"×{ratio:.2f} (need ≤ 1.3): {'PASS' if ratio <= 1.3 else 'FAIL'}; peak {r['peak_gib']:.1f} vs "
                         f"{fp_ttft['peak_gib']:.1f} GiB ({r['source']})")
    missing = []
    if not any(r["cache"].startswith("quanto") for r in dec):
        missing.append("the quanto rows")
    if not any(r["cache"] in ("kvquant-4", "kvquant-2") and r["compiled"] and r["context"] == 131072 for r in dec):
        missing.append("KVQuant-4/2 compiled at 128K")
    if not any(_shape(c) == "Llama-3-8B" for c in capacity):
        missing.append("Llama-3-8B capacity")
    if missing:
        lines.append("- not measured (device time): " + ", ".join(missing))
    lines += ["", "## Decode", "", "| shape | cache | compiled | context | batch | ms/token | tokens/s | peak GiB | cache GiB | source |",
              "|---|---|---|---|---|---|---|---|---|---|"]
    for r in sorted(dec, key=lambda r: (r["shape"], r["context"], r.get("batch") or 1, r["cache"], r["compiled"])):
        lines.append(f"| {r['shape']} | {r['cache']} | {'yes' if r['compiled'] else 'no'} | {r['context'] // 1024}K | "
                     f"{r.get('batch') or 1}{' (equal memory)' if r.get('equal_memory') else ''} | "
                     f"{r['ms_per_token']:.1f} | {r['tokens_per_s']:.1f} | {r['peak_gib']:.1f} | {r.get('cache_gib', '')} | {r['source']} |")
    lines += ["", "KVQuant-3 is nuq3-1% (bounded outliers), with codebooks fitted from one forward pass of the random model. "
              "The compiled KVQuant-3 rows share one static cache of 128K+ capacity (its kernels read up to the length), "
              "so their cache GiB is the 128K cache's; fp16 StaticCache gets a capacity of the context plus the steps "
              "(its attention reads the whole capacity). Eager rows grow their caches.", "", "## Time to first token", "",
              "A real prompt prefilled through the cache: fp16 `DynamicCache` in one forward; KVQuant-3 (static cache) in chunks "
              "that each attend over the packed prefix, their own tokens included, so the fp16 K/V of the context is never "
              "held beyond one layer's attention. Best of two runs after a warm-up; `profile_ttft_*.txt` beside each call's "
              "log has the prefill's GPU time by kernel.", "",
              "| shape | cache | prompt | TTFT s | × fp16 | peak GiB | prefill | source |", "|---|---|---|---|---|---|---|---|"]
    for r in sorted(ttft, key=lambda r: (r["shape"], r["context"], r["cache"] != "fp16-dynamic", r.get("prefill", ""))):
        fp_ttft = fp_of.get((r["shape"], r["context"]))
        ratio = f"{r['ttft_s'] / fp_ttft['ttft_s']:.2f}" if fp_ttft else ""
        lines.append(f"| {r['shape']} | {r['cache']} | {r['context'] // 1024}K | {r['ttft_s']:.2f} | {ratio} | {r['peak_gib']:.1f} | "
                     f"{r.get('prefill', '')} | {r['source']} |")
    longest = max((r for r in ttft if r["cache"] != "fp16-dynamic"), key=lambda r: r["context"], default=None)
    if longest and not fp_of.get((longest["shape"], longest["context"])):
        lines += ["", f"The longest prompt prefilled: {longest['context']:,} tokens in {longest['ttft_s']:.0f} s "
                  f"({longest['shape']}, {longest['peak_gib']:.1f} GiB peak; `bash benchmarks/call_l.sh`: one timed run "
                  "after a short warm-up, `e2e.py --ttft-once`). An fp16 cache cannot hold these prompts beside the weights "
                  "(256K tokens of LLaMA-2-7B are 128 GiB of K/V). Each chunk dequantizes the whole packed prefix, so the "
                  "prefill time grows with the square of the prompt. The capacity below (1.2M tokens at nuq3-1%) was not "
                  "prefilled from a prompt: that would take longer than one 10-minute device call."]
    lines += trace_section()
    lines += ["", "## Capacity (H200, 139.8 GiB)", "",
              "The longest context that fits beside the model, proven by decode steps; a larger one tried first that did "
              "not fit is in the call's log.", "",
              "| shape | format | context proven | ms/step (eager) | cache GiB | peak GiB | source |",
              "|---|---|---|---|---|---|---|"]
    for c in sorted(capacity, key=lambda c: (_shape(c), c["format"], c["context"])):
        lines.append(f"| {_shape(c)} | {c['format']} | {c['context']:,} | {c['decode_ms']:.0f} | {c['cache_gib']:.1f} | "
                     f"{c['peak_gib']:.1f} | {c['source']} |")
    if failed:
        lines += ["", "## Not measured", ""] + [f"- {r.get('cache')} compiled={r.get('compiled')} {r.get('context')}: {_reason(r)} ({r['source']})"
                                                for r in failed]
    lines += ["", "![end to end](figures/e2e.png)", ""]
    (DOCS / "e2e.md").write_text("\n".join(lines))
    plot_e2e(dec, capacity)


TRACES: list = []  # e2e.py --stages trace summaries, by load_runs


def trace_section() -> list[str]:
    """Where a compiled decode step's wall time goes (e2e.py --stages trace): GPU kernels against the CPU's work."""
    if not TRACES:
        return []

    def cpu(t, name):
        vals = sorted(dict(st["cpu_ops_inclusive_top"]).get(name, 0.0) for st in t["steps"])
        return vals[len(vals) // 2] / 1000

    lines = ["", "## Where a compiled decode step's time goes", "",
             "`python benchmarks/e2e.py --out OUT --stages trace --contexts 32768` (`bash benchmarks/call_m.sh`; after the one-buffer cache `call_o.sh`, `call_q.sh`): six "
             "compiled decode steps of the LLaMA-2-7B shape at 32K under `torch.profiler` (CPU and GPU), each step "
             "synchronized as the decode rows time them; medians over the steps, ms. *GPU kernels*: the summed time of "
             "the step's kernels (they never overlap here); *GPU idle*: the step's wall time in which no kernel ran. "
             "*Guards*: TorchDynamo's cache lookup (the guards on every tensor and object the compiled forward reads); "
             "*graph call*: the compiled graph's call, CUDA-graph replay and its input checks included.", "",
             "| cache | CUDA graphs | wall | GPU kernels | kernels | GPU idle | guards | graph call | source |",
             "|---|---|---|---|---|---|---|---|---|"]
    for t in TRACES:
        m = t["median"]
        name = t["source"].rsplit("/", 1)[-1].removeprefix("trace_").split("_")[0]
        trees = "plain" if "no_trees" in t["source"] else "trees"
        call = next((k for k in dict(t["steps"][0]["cpu_ops_inclusive_top"]) if k.startswith("## Call CompiledFxGraph")), "")
        lines.append(f"| {name} | {trees} | {m['wall_us'] / 1000:.2f} | {m['kernel_sum_us'] / 1000:.2f} | {m['kernels']:.0f} | "
                     f"{(m['wall_us'] - m['gpu_busy_us']) / 1000:.2f} | {cpu(t, 'TorchDynamo Cache Lookup'):.2f} | "
                     f"{cpu(t, call):.2f} | {t['source']} |")
    row = {("plain" if "no_trees" in t["source"] else "trees", t["source"].rsplit("/", 1)[-1].split("_")[1]): t for t in TRACES}
    kv, fp = row.get(("trees", "kvquant-3")), row.get(("trees", "fp16-static"))
    first = next((t for t in TRACES if "kvquant-3" in t["source"] and "no_trees" not in t["source"]), None)
    first_fp = next((t for t in TRACES if "fp16-static" in t["source"]), None)
    if kv and fp:
        idle = lambda t: (t["median"]["wall_us"] - t["median"]["gpu_busy_us"]) / 1000
        guards = lambda t: cpu(t, "TorchDynamo Cache Lookup")
        lines += ["", f"The GPU waits on the CPU for {idle(kv):.1f} ms of KVQuant-3's step ({idle(fp):.1f} ms of fp16's). "
                  "Part of it is Dynamo's guards: TorchDynamo checks every tensor and Python attribute the compiled forward "
                  "reads, and the packed cache handed it about 30 tensors per layer (codes, ranges, outliers, positions, "
                  "ring, sink, the kernels' tables) against StaticCache's two, each guarded and checked again at the CUDA "
                  f"graph's replay: {guards(first):.2f} ms of guards against fp16's {guards(first_fp):.2f} in the first rows "
                  f"({first['source'].split('/')[0]}). A static cache's tensors are now views into one buffer per layer "
                  "(transformers_kvquant/kernels/layout.py `consolidate`), the custom operators take the buffer with a layout id, likewise the "
                  "kernel tables, and the step reads no other tensor of the cache (tests/kernels/test_dispatch.py checks "
                  f"the compiled graph's inputs): {guards(kv):.2f} ms of guards against fp16's {guards(fp):.2f} "
                  f"({kv['source'].split('/')[0]}/{kv['source'].split('/')[1]}; that machine ran both caches faster than "
                  "the first, so compare within a row pair). What remains is about fifty Python attribute checks per "
                  "layer (the layer's, the store's and the tables' plain fields). "
                  "Inductor's plain CUDA graphs instead of its graph trees change little. The kernels take "
                  f"{(kv['median']['kernel_sum_us'] - fp['median']['kernel_sum_us']) / 1000:.1f} ms longer than fp16's (the "
                  "decode attention and the append, docs/kernels.md): now most of the gap "
                  f"({(kv['median']['wall_us'] - fp['median']['wall_us']) / 1000:.1f} ms of wall time)."]
    return lines


def _shape(c) -> str:
    """A capacity row's model shape: the first capacity runs measured only LLaMA-2-7B and did not record it."""
    return c.get("shape") or "LLaMA-2-7B"


def _reason(r) -> str:
    text = r.get("error") or r.get("ttft_error") or r.get("throughput_error") or ""
    last = [line for line in text.strip().splitlines() if line.strip()][-1:] or ["?"]
    return last[0][:200]


def plot_e2e(dec, capacity) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    dec = sorted(dec, key=lambda r: (r["shape"], r["context"], r["cache"], r["compiled"]))
    labels = [f"{r['shape'].split('-')[-1]} {r['cache']}\n{'compiled' if r['compiled'] else 'eager'} {r['context'] // 1024}K" for r in dec]
    a.bar(range(len(dec)), [r["ms_per_token"] for r in dec], color=["tab:blue" if "fp16" in r["cache"] else "tab:orange" for r in dec])
    a.set_xticks(range(len(dec)), labels, fontsize=6, rotation=45, ha="right")
    a.set_ylabel("ms per token (lower is better)")
    a.set_title("LLaMA-2-7B (7B) and Llama-3-8B (8B) shapes, batch 1, H200")
    best = {}
    for c in capacity:
        key = f"{_shape(c).split('-')[-1]} {c['format']}"
        best[key] = max(best.get(key, 0), c["context"])
    b.bar(list(best), [v / 1e6 for v in best.values()], color="tab:orange")
    b.axhline(16e9 / (2 * 32 * 4096 * 2) / 1e6 * (139.8 * 2**30 - 13.5e9) / 16e9, color="tab:blue", ls=":", label="fp16 at the same memory")
    b.set_ylabel("million tokens proven by decode steps")
    b.set_title("capacity beside the model (139.8 GiB)")
    b.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(DOCS / "figures" / "e2e.png", dpi=110)


GPU_GIB = 139.8  # an H200 as torch reports it


def multi_gpu_doc(root: Path, capacity: list) -> None:
    """docs/multi_gpu.md: what ran (nothing on several GPUs yet) and a projection from the one-GPU capacity runs."""
    lines = [
        "# Several GPUs: status and projection",
        "",
        "`benchmarks/multi_gpu.py` splits a LLaMA-2-7B-shaped model over every GPU with Accelerate's `dispatch_model` "
        "and checks, through the public API, that KVQuant generation (reference and Triton paths) equals the one-GPU run "
        "and that every layer's cache lives on its layer's device. No machine with several GPUs was lent in this "
        "session (`status` listed only `nvidia-h200`), so it has run only as `--dry-run` on the CPU (a 4-layer model "
        "split between the CPU and disk-offloaded layers: tokens equal, max |delta logit| 0, every cache on its "
        "layer's execution device). The exactness, placement and capacity runs on 2-8 GPUs are **blocked** on the "
        "machine, not on code.",
        "",
        "## Projection (not a measurement)",
        "",
        "From the one-GPU capacity runs (docs/e2e.md): bytes per token = the cache's bytes / the tokens it held; the "
        "rest of the peak (weights, activations, allocator) is spread over the GPUs; each GPU keeps the same headroom "
        f"the one-GPU run left below {GPU_GIB} GiB. Reproduce: `{REPORT_CMD}`.",
        "",
        "| shape | format | measured on 1 H200 | bytes per token | projected on 2 | on 4 | on 8 H200 |",
        "|---|---|---|---|---|---|---|",
    ]
    best = {}
    for c in capacity:
        key = (_shape(c), c["format"])
        if key not in best or c["context"] > best[key]["context"]:
            best[key] = c
    for (shape, fmt), c in sorted(best.items()):
        per_token = c["cache_gib"] * 2**30 / c["context"]
        other = (c["peak_gib"] - c["cache_gib"]) * 2**30
        headroom = (GPU_GIB - c["peak_gib"]) * 2**30
        proj = [int((n * (GPU_GIB * 2**30 - headroom) - other) / per_token) for n in (2, 4, 8)]
        lines.append(f"| {shape} | {fmt} | {c['context']:,} | {per_token / 1024:.1f} KiB | " + " | ".join(f"{p / 1e6:.1f}M" for p in proj) + " |")
    lines += ["", "The paper's headline (10M tokens of LLaMA-7B on 8 GPUs at 2 bits) is inside this projection; it "
              "stays a projection until the 8-GPU run exists.", ""]
    (DOCS / "multi_gpu.md").write_text("\n".join(lines))


ROOTS: list = []  # the result roots of this report, oldest first
REPORT_CMD = ""  # the command that regenerates the documents


def main() -> None:
    global REPORT_CMD
    roots = [Path(a).resolve() for a in sys.argv[1:]]
    ROOTS[:] = roots
    REPORT_CMD = "python benchmarks/report.py " + " ".join(str(r.relative_to(REPO)) for r in roots)
    root = roots[-1]
    decode, env, e2e, capacity, checks, versions, extra = load_runs(roots)
    if decode:
        decode_doc(root, decode, env, checks, versions, extra)
    if e2e or capacity:
        e2e_doc(root, e2e, capacity, versions)
    if capacity:
        multi_gpu_doc(root, capacity)


if __name__ == "__main__":
    main()
