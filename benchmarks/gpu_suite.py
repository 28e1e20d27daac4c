"""The GPU suite: compiled kernel tests, decode-attention micro-benchmarks, end-to-end decode, capacity.

    python benchmarks/gpu_suite.py --out OUT [--stages tests,decode,e2e,capacity] [--budget-scale 1.0]

Every stage runs in a try/except with its own time box and writes what it got: ``OUT/results.json`` (merged over
calls into the same folder), ``OUT/log.txt`` and per-stage files. ``benchmarks/gpu_report.py OUT...`` turns the
JSON into ``docs/benchmarks.md`` and plots. Timings are medians of CUDA-event timed repetitions with the L2 cache
flushed between repetitions (``triton.testing.do_bench``); end-to-end steps are wall-clock per generated token
(synchronized), since the CPU side of a decode step is part of its cost.

Stages:
- ``tests``: ``KVQUANT_TEST_COMPILED=1 pytest tests/kernels`` (the interpreter tests, compiled), then generation
  with the kernels against the reference path on random fp16 LLaMA models (MHA and GQA, head_dim 128).
- ``decode``: one layer's decode attention at 4K-512K, batch 1 and 8, LLaMA-2-7B (32x128 MHA) and Llama-3-8B
  (32 q / 8 KV heads) shapes: our kernel at 4/3/2 bits with and without 1% outliers, fp16 SDPA (fastest backend),
  and HF ``QuantizedCache`` (quanto int4/int2, in a child process with a time limit) when optimum-quanto imports.
- ``e2e``: a LLaMA-2-7B-shaped model with random fp16 weights, decode ms/token and peak memory at 8K/32K/128K for
  DynamicCache fp16, QuantizedCache (quanto) and KVQuant 4/3/2-bit 1%; contexts are filled with synthetic K/V
  (KVQuant: pre-RoPE K/V appended through the real append kernel), then real decode steps of the whole model run.
- ``capacity``: the longest context that fits for fp16, nuq4-1%, nuq3-1%, nuq2-1% and nuq2 (LLaMA-2-7B and
  Llama-3-8B shapes), each proven by decode steps of the whole model at that length.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import math
import os
import platform
import subprocess
import sys
import time
import traceback
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ.pop("TRITON_INTERPRET", None)

import torch

GiB = 2**30
SHAPES = {"MHA-32x128": (32, 32, 128), "GQA-32q-8kv-128": (32, 8, 128)}  # (query heads, KV heads, head_dim)
FORMATS = [(4, 0.0), (4, 0.01), (3, 0.0), (3, 0.01), (2, 0.0), (2, 0.01)]


def fmt_name(bits: int, fraction: float) -> str:
    return f"nuq{bits}" + (f"-{fraction * 100:g}%" if fraction else "")


def outlier_slots(fraction: float, channels: int) -> int:
    return 0 if fraction == 0 else max(1, math.ceil(fraction * channels - 1e-9))


class Suite:
    def __init__(self, out: Path):
        self.out = out
        out.mkdir(parents=True, exist_ok=True)
        path = out / "results.json"
        self.results = json.loads(path.read_text()) if path.exists() else {"stages": {}}
        self.results["env"] = environment()
        self.log_file = open(out / "log.txt", "a")

    def say(self, msg: str) -> None:
        line = f"[{datetime.datetime.now(datetime.timezone.utc).strftime('%H:%M:%S')}] {msg}"
        print(line, flush=True)
        self.log_file.write(line + "\n")
        self.log_file.flush()

    def save(self) -> None:
        (self.out / "results.json").write_text(json.dumps(self.results, indent=1, default=str))

    def run(self, name: str, fn, budget: float, **kw) -> None:
        t0 = time.time()
        record = self.results["stages"].setdefault(name, {})
        record.update(status="running", started=datetime.datetime.now(datetime.timezone.utc).isoformat(), budget_s=budget)
        self.save()
        self.say(f"== stage {name} (time box {budget:.0f}s)")
        try:
            fn(self, record, deadline=t0 + budget, **kw)
            record["status"] = "ok" if record.get("status") == "running" else record["status"]
        except Exception as e:  # noqa: BLE001 - a stage failure must not lose the other stages
            record["status"] = "failed"
            record["error"] = f"{type(e).__name__}: {e}"
            record["traceback"] = traceback.format_exc()[-4000:]
            self.say(f"stage {name} FAILED: {record['error']}")
        finally:
            record["elapsed_s"] = round(time.time() - t0, 1)
            free_cuda()
            self.save()
            self.say(f"== stage {name}: {record['status']} in {record['elapsed_s']}s")


def environment() -> dict:
    import transformers
    import triton

    env = {
        "date_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "triton": triton.__version__,
        "transformers": transformers.__version__,
        "cuda": torch.version.cuda,
    }
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        env.update(gpu=p.name, gpu_memory_gib=round(p.total_memory / GiB, 2), sms=p.multi_processor_count, capability=f"{p.major}.{p.minor}")
    try:
        import optimum.quanto as q

        env["optimum_quanto"] = getattr(q, "__version__", "installed")
    except Exception as e:  # noqa: BLE001
        env["optimum_quanto"] = f"unavailable ({type(e).__name__})"
    return env


def free_cuda() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def bench(fn, rep_ms: int = 200) -> float:
    """Median milliseconds of ``fn`` (CUDA events, L2 flushed between repetitions)."""
    import triton.testing

    return float(triton.testing.do_bench(fn, warmup=25, rep=rep_ms, return_mode="median"))


def copy_bandwidth() -> float:
    """Device-to-device copy bandwidth in GB/s (bytes read + bytes written), 1 GiB buffers."""
    a = torch.empty(GiB // 2, dtype=torch.float16, device="cuda").normal_()
    b = torch.empty_like(a)
    ms = bench(lambda: b.copy_(a))
    del a, b
    return 2 * GiB / (ms * 1e-3) / 1e9


# ============================================================================================== tests
def stage_tests(s: Suite, rec: dict, deadline: float) -> None:
    env = dict(os.environ, KVQUANT_TEST_COMPILED="1")
    env.pop("TRITON_INTERPRET", None)
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/kernels", f"--junitxml={s.out / 'kernel_tests.xml'}"]
    limit = max(60, deadline - time.time() - 70)  # leave time for the generate checks
    try:
        r = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=limit)
        text, code = r.stdout + r.stderr, r.returncode
    except subprocess.TimeoutExpired as e:
        text, code = f"{e.stdout or ''}{e.stderr or ''}\nTIMEOUT after {limit:.0f}s", "timeout"
    (s.out / "kernel_tests.log").write_text(text if isinstance(text, str) else text.decode())
    tail = [ln for ln in str(text).splitlines() if ln.strip()][-1:] or [""]
    rec["pytest"] = {"returncode": code, "summary": tail[0], "failures": [ln for ln in str(text).splitlines() if ln.startswith("FAILED")][:30]}
    s.say(f"compiled kernel tests: {tail[0]}")
    rec["generate"] = []
    for name, heads, kv_heads in (("MHA 8x128", 8, 8), ("GQA 16q-4kv-128", 16, 4)):
        if time.time() > deadline - 20:
            rec["generate"].append({"model": name, "status": "skipped (time box)"})
            continue
        try:
            rec["generate"].append(generate_check(name, heads, kv_heads))
            s.say(f"generate check {rec['generate'][-1]}")
        except Exception as e:  # noqa: BLE001
            rec["generate"].append({"model": name, "status": f"failed: {type(e).__name__}: {e}"})
            s.say(f"generate check {name} failed: {e}")
    ok = rec["pytest"]["returncode"] == 0 and all(g.get("same_tokens") or g.get("teacher_forced_max_abs_logit_diff", 1) < 0.02 * g.get("logit_scale", 0) for g in rec["generate"])
    rec["status"] = "ok" if ok else "failed"


@torch.no_grad()
def teacher_forced_logits(model, cache, ids, mask, continuation) -> list:
    """Logits of the prompt's last position and of each fed continuation token (left padding as in generate)."""
    mask = mask.clone()
    pos = (mask.long().cumsum(-1) - 1).clamp(min=0)
    out = model(input_ids=ids, attention_mask=mask, position_ids=pos, past_key_values=cache, use_cache=True, logits_to_keep=1)
    logits = [out.logits[:, -1].float()]
    for t in range(continuation.shape[1] - 1):
        mask = torch.cat([mask, mask.new_ones(mask.shape[0], 1)], 1)
        pos = mask.long().sum(-1, keepdim=True) - 1
        out = model(input_ids=continuation[:, t : t + 1], attention_mask=mask, position_ids=pos, past_key_values=cache, use_cache=True)
        logits.append(out.logits[:, -1].float())
    return logits


@torch.no_grad()
def generate_check(name: str, heads: int, kv_heads: int) -> dict:
    """Random fp16 LLaMA, left-padded batch: kernels (backend='triton') vs the reference path.

    Free-running greedy tokens are compared, and (since random models have near-tied logits) also the logits of
    both paths teacher-forced on the reference's tokens: prefill with the prefill kernel, then decode steps.
    """
    from tests.helpers import quick_config, tiny_llama
    from transformers_kvquant import KVQuantCache

    model = tiny_llama(layers=4, heads=heads, kv_heads=kv_heads, head_dim=128, vocab=512, seed=1).to("cuda", torch.float16)
    model.config.max_position_embeddings = 4096
    cfg = quick_config(model, bits=3, outlier_fraction=0.01, tokens=torch.randint(3, 512, (2, 256), generator=torch.Generator().manual_seed(0)))
    g = torch.Generator().manual_seed(2)
    lengths = (300, 170)
    ids = torch.zeros(2, max(lengths), dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, n in enumerate(lengths):
        ids[row, -n:] = torch.randint(3, 512, (n,), generator=g)
        mask[row, -n:] = 1
    ids, mask = ids.cuda(), mask.cuda()
    seqs = {}
    for backend in ("reference", "triton"):
        cache = KVQuantCache(model, cfg, backend=backend)
        seqs[backend] = model.generate(input_ids=ids, attention_mask=mask, past_key_values=cache, max_new_tokens=32, do_sample=False, pad_token_id=0)
    continuation = seqs["reference"][:, ids.shape[1]:]
    forced = {b: teacher_forced_logits(model, KVQuantCache(model, cfg, backend=b), ids, mask, continuation) for b in ("reference", "triton")}
    diff = max(float((a - b).abs().max()) for a, b in zip(forced["reference"], forced["triton"]))
    scale = max(float(a.abs().max()) for a in forced["reference"])
    top1 = sum(int((a.argmax(-1) == b.argmax(-1)).sum()) for a, b in zip(forced["reference"], forced["triton"]))
    total = sum(a.shape[0] for a in forced["reference"])
    same = bool(torch.equal(seqs["reference"], seqs["triton"]))
    return {"model": name, "same_tokens": same, "teacher_forced_max_abs_logit_diff": diff, "logit_scale": scale,
            "teacher_forced_top1_agreement": top1 / total, "max_abs_logit_diff": diff}


# ============================================================================================== decode
def stage_decode(s: Suite, rec: dict, deadline: float, quick: bool = False) -> None:
    from transformers_kvquant.kernels import decode as da
    from transformers_kvquant.kernels.naive import packed_attention_naive
    from transformers_kvquant.kernels.synthetic import (
        cache_bytes,
        fast_random_packed_kv,
        query_rope,
        rope_inv_freq,
    )

    rec["copy_GBps"] = copy_bw = copy_bandwidth()
    s.say(f"device-to-device copy: {copy_bw:.0f} GB/s")
    contexts = [4096, 32768] if quick else [4096, 8192, 32768, 131072, 524288]
    batches = [1, 8]
    inv_freq = rope_inv_freq(128).cuda()
    total_mem = torch.cuda.get_device_properties(0).total_memory

    def query(b, hq, length):
        q = torch.randn(b, hq, 1, 128, device="cuda", dtype=torch.float16)
        qc, qs = query_rope(torch.full((b, 1), length - 1, device="cuda"), inv_freq, torch.float16)
        return q, qc, qs

    # 1) Pick the kernel configuration per shape on the 128K batch-1 nuq3-1% case (few compiles).
    rec["tuning"] = {}
    for shape, (hq, hk, d) in SHAPES.items():
        cache = fast_random_packed_kv(1, hk, d, 3, 32768 if quick else 131072, outlier_slots(0.01, hk * d))
        q, qc, qs = query(1, hq, cache.total)
        cands = [(1, 4), (1, 8), (2, 4), (2, 8), (4, 8), (8, 8)] if hk <= 8 else [(1, 8), (2, 8), (4, 8), (1, 4), (2, 4), (1, 2)]
        tried = {}
        for block_n, warps in cands:
            if time.time() > deadline - 120:
                break
            try:
                tried[f"{block_n}x{warps}"] = bench(lambda: da.decode_attention(q, qc, qs, cache, inv_freq, 1.0, d**-0.5, block_n=block_n, num_warps=warps), 100)
            except Exception as e:  # noqa: BLE001
                tried[f"{block_n}x{warps}"] = f"failed: {type(e).__name__}: {str(e)[:200]}"
        timed = {k: v for k, v in tried.items() if isinstance(v, float)}
        if timed:
            best = min(timed, key=timed.get)
            bn, wp = (int(x) for x in best.split("x"))
            da.TUNED[(hk, hq // hk, d)] = (bn, wp)
            sms = torch.cuda.get_device_properties(0).multi_processor_count
            per_sm = {}
            for mult in (1, 2, 4, 8):  # programs per SM
                per_sm[mult] = tried[f"{best} programs/SM={mult}"] = bench(
                    lambda: da.decode_attention(q, qc, qs, cache, inv_freq, 1.0, d**-0.5, num_splits=mult * sms), 100)
            if shape.startswith("MHA"):  # one global setting; the MHA shape is the acceptance case
                da.PROGRAMS_PER_SM = min(per_sm, key=per_sm.get)
                rec["programs_per_sm"] = da.PROGRAMS_PER_SM
        rec["tuning"][shape] = tried
        s.say(f"tuning {shape}: {tried}")
        del cache
        free_cuda()

    # 2) Correctness spot checks against the fp32 reference at 4K (every format and shape).
    rec["accuracy"] = []
    for shape, (hq, hk, d) in SHAPES.items():
        for bits, frac in FORMATS:
            cache = fast_random_packed_kv(2, hk, d, bits, 4096, outlier_slots(frac, hk * d))
            q, qc, qs = query(2, hq, cache.total)
            out = da.decode_attention(q, qc, qs, cache, inv_freq, 1.0, d**-0.5)
            ref = packed_attention_naive(q, qc, qs, cache, inv_freq, 1.0, d**-0.5)
            err = float((out.float() - ref).norm() / ref.norm())
            rec["accuracy"].append({"shape": shape, "format": fmt_name(bits, frac), "rel_err": err, "finite": bool(torch.isfinite(out).all())})
    s.say(f"accuracy (rel. err. vs fp32 reference): max {max(a['rel_err'] for a in rec['accuracy']):.2e}")
    s.save()

    # 3) Timings.
    rows = rec["rows"] = []
    for shape, (hq, hk, d) in SHAPES.items():
        for b in batches:
            for length in contexts:
                if time.time() > deadline - 30:
                    rows.append({"shape": shape, "batch": b, "context": length, "status": "skipped (time box)"})
                    continue
                fp16_bytes = 2 * b * hk * length * d * 2
                row = {"shape": shape, "batch": b, "context": length, "fp16_bytes": fp16_bytes}
                q, qc, qs = query(b, hq, length)
                if fp16_bytes < 0.45 * total_mem:
                    row["fp16"] = sdpa_fastest(q, b, hq, hk, length, d)
                else:
                    row["fp16"] = {"status": "does not fit beside the other buffers"}
                for bits, frac in FORMATS:
                    name = fmt_name(bits, frac)
                    try:
                        cache = fast_random_packed_kv(b, hk, d, bits, length, outlier_slots(frac, hk * d))
                        ms = bench(lambda: da.decode_attention(q, qc, qs, cache, inv_freq, 1.0, d**-0.5))
                        nbytes = cache_bytes(cache)
                        row[name] = {"ms": ms, "bytes": nbytes, "GBps": nbytes / (ms * 1e-3) / 1e9}
                        del cache
                    except torch.cuda.OutOfMemoryError:
                        row[name] = {"status": "out of memory"}
                    free_cuda()
                fp16_ms = row["fp16"].get("ms") if isinstance(row["fp16"], dict) else None
                for name in [fmt_name(*f) for f in FORMATS]:
                    r = row.get(name, {})
                    if "ms" in r:
                        r["copy_fraction"] = r["GBps"] / copy_bw
                        if fp16_ms:
                            r["speedup_vs_fp16"] = fp16_ms / r["ms"]
                rows.append(row)
                s.say(summary_line(row))
                s.save()
    # 4) HF QuantizedCache (quanto) in a child process: it may JIT-compile its CUDA extension.
    left = deadline - time.time()
    if left > 60:
        rec["quantized_cache"] = run_child(s, "quanto_decode", min(left - 20, 300), quick)
        for qrow in rec["quantized_cache"].get("rows", []):
            for row in rows:
                if (row.get("shape"), row.get("batch"), row.get("context")) == (qrow["shape"], qrow["batch"], qrow["context"]):
                    for key in ("quanto-int4", "quanto-int2"):
                        if key in qrow:
                            row[key] = qrow[key]
                            if "ms" in qrow[key]:
                                for name in [fmt_name(*f) for f in FORMATS]:
                                    if "ms" in row.get(name, {}):
                                        row[name][f"speedup_vs_{key}"] = qrow[key]["ms"] / row[name]["ms"]
    else:
        rec["quantized_cache"] = {"status": "skipped (time box)"}


def summary_line(row: dict) -> str:
    parts = [f"{row['shape']} B{row['batch']} L{row['context']}"]
    for key in ["fp16"] + [fmt_name(*f) for f in FORMATS]:
        r = row.get(key, {})
        parts.append(f"{key}={r['ms'] * 1e3:.0f}us" if "ms" in r else f"{key}=-")
    return " ".join(parts)


def sdpa_fastest(q, b, hq, hk, length, d) -> dict:
    """fp16 SDPA decode over a fp16 K/V of ``length`` tokens: the fastest of the backends that run."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.nn.functional import scaled_dot_product_attention as sdpa

    k = torch.randn(b, hk, length, d, device="cuda", dtype=torch.float16)
    v = torch.randn_like(k)
    res = {}
    for backend in (SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.CUDNN_ATTENTION, SDPBackend.MATH):
        try:
            with sdpa_kernel([backend]):
                res[backend.name] = bench(lambda: sdpa(q, k, v, enable_gqa=hq != hk))
        except Exception as e:  # noqa: BLE001
            res[backend.name] = f"unavailable: {type(e).__name__}"
    del k, v
    free_cuda()
    timed = {n: t for n, t in res.items() if isinstance(t, float)}
    best = min(timed, key=timed.get)
    nbytes = 2 * b * hk * length * d * 2
    return {"ms": timed[best], "backend": best, "all": res, "bytes": nbytes, "GBps": nbytes / (timed[best] * 1e-3) / 1e9}


def quanto_decode(s: Suite, rec: dict, deadline: float, quick: bool = False) -> None:
    """Child-process body: HF QuantizedCache (quanto) decode step = layer update with one token + SDPA."""
    from torch.nn.functional import scaled_dot_product_attention as sdpa
    from transformers.cache_utils import QuantoQuantizedLayer

    contexts = [4096, 32768] if quick else [4096, 8192, 32768, 131072, 524288]
    total_mem = torch.cuda.get_device_properties(0).total_memory
    rows = rec["rows"] = []
    for shape, (hq, hk, d) in SHAPES.items():
        for b in (1, 8):
            for length in contexts:
                if time.time() > deadline - 15:
                    break
                if 2 * b * hk * length * d * 2 * 2.5 > 0.8 * total_mem:  # fp16 input + dequantized copies
                    continue
                row = {"shape": shape, "batch": b, "context": length}
                for nbits in (4, 2):
                    key = f"quanto-int{nbits}"
                    try:
                        layer = QuantoQuantizedLayer(nbits=nbits, axis_key=0, axis_value=0, q_group_size=64, residual_length=128)
                        k = torch.randn(b, hk, length, d, device="cuda", dtype=torch.float16)
                        layer.update(k, torch.randn_like(k))
                        del k
                        free_cuda()
                        q = torch.randn(b, hq, 1, d, device="cuda", dtype=torch.float16)
                        k1 = torch.randn(b, hk, 1, d, device="cuda", dtype=torch.float16)

                        def step():
                            kk, vv = layer.update(k1, k1)
                            return sdpa(q, kk, vv, enable_gqa=hq != hk)

                        row[key] = {"ms": bench(step, 100)}
                        del layer
                    except Exception as e:  # noqa: BLE001
                        row[key] = {"status": f"failed: {type(e).__name__}: {str(e)[:200]}"}
                    free_cuda()
                rows.append(row)
                s.say(f"quanto {shape} B{b} L{length}: {row}")
                s.save()


def run_child(s: Suite, stage: str, limit: float, quick: bool) -> dict:
    child_out = s.out / f"child_{stage}"
    cmd = [sys.executable, __file__, "--out", str(child_out), "--stages", stage, "--budget-scale", f"{limit / 300:.3f}"]
    if quick:
        cmd.append("--quick")
    s.say(f"child process for {stage}, limit {limit:.0f}s")
    try:
        r = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=limit)
        (s.out / f"{stage}.log").write_text(r.stdout + r.stderr)
    except subprocess.TimeoutExpired as e:
        (s.out / f"{stage}.log").write_text(f"{e.stdout}\n{e.stderr}\nTIMEOUT after {limit:.0f}s")
    path = child_out / "results.json"
    if not path.exists():
        return {"status": "no result (the child died or timed out)"}
    return json.loads(path.read_text())["stages"].get(stage, {"status": "missing"})


# ============================================================================================== models
def llama_config(kind: str, max_positions: int):
    from transformers import LlamaConfig

    if kind == "llama2-7b":
        return LlamaConfig(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                           num_key_value_heads=32, max_position_embeddings=max_positions, rope_theta=10000.0, torch_dtype="float16")
    return LlamaConfig(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                       num_key_value_heads=8, max_position_embeddings=max_positions, rope_theta=500000.0, torch_dtype="float16")


@torch.no_grad()
def build_model(kind, max_positions: int = 2**21, device="cuda"):
    """A LLaMA-shaped model with random fp16 weights, created directly on ``device`` (default the GPU).

    ``kind``: "llama2-7b", "llama3-8b", or a ``LlamaConfig`` (e.g. a tiny one for a CPU dry run).
    """
    from transformers import LlamaForCausalLM

    cfg = llama_config(kind, max_positions) if isinstance(kind, str) else kind
    cfg._attn_implementation = "sdpa"
    torch.manual_seed(0)
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float16)
    try:
        with torch.device(device):
            model = LlamaForCausalLM(cfg)
    finally:
        torch.set_default_dtype(old)
    for name, p in model.named_parameters():
        if name.endswith("norm.weight"):
            p.fill_(1.0)
        else:
            p.normal_(0.0, 0.02)
    return model.eval()


def weight_bytes(model) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())


@torch.no_grad()
def kvquant_config(model, bits: int, fraction: float):
    from tests.helpers import quick_config

    tokens = torch.randint(3, model.config.vocab_size, (1, 128), generator=torch.Generator().manual_seed(0))
    return quick_config(model, bits=bits, outlier_fraction=fraction, tokens=tokens)


def kv_bytes_per_token(model, fmt) -> float:
    """Cache bytes per token and row over all layers for a format ('fp16' or (bits, fraction))."""
    c = model.config
    h, d, layers = c.num_key_value_heads, c.hidden_size // c.num_attention_heads, c.num_hidden_layers
    if fmt == "fp16":
        return layers * 2 * h * d * 2
    bits, frac = fmt
    from transformers_kvquant.kernels.layout import packed_words

    s = outlier_slots(frac, h * d)
    # codes, 16-bit value zero/scale, int32 position, int32 key-CSR begin, S value outliers (16-bit value, int16
    # channel), and the calibrated fraction of key elements kept exactly (16-bit value, int16 channel).
    return layers * (2 * h * packed_words(d, bits) * 4 + 4 + 4 + 4 + s * 4 + frac * h * d * 4)


def synchronize(devices=None) -> None:
    """``torch.cuda.synchronize()`` on the current device, or on every CUDA device among ``devices``."""
    if devices is None:
        torch.cuda.synchronize()
        return
    for dev in {torch.device(d) for d in devices}:
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)


@torch.no_grad()
def fill_kvquant(model, cfg, batch: int, length: int, extra: int, chunk: int | None = None, backend: str = "auto", layer_devices=None,
                 key_spread: float = 1 / 2.5758):
    """A KVQuantCache holding ``length`` synthetic pre-RoPE tokens, appended through the real append kernel.

    ``layer_devices``: the device of each decoder layer (a split model); default every layer on "cuda".
    ``key_spread``: std of the keys in units of the calibrated per-channel range; the entries beyond the range
    (|x| > 1) are the stored key outliers: the default 1/2.576 gives the 1% a 1%-outlier calibration sees.
    """
    from transformers_kvquant import KVQuantCache

    cache = KVQuantCache(model, cfg, max_length=length + extra, backend=backend)
    c = model.config
    h, d = c.num_key_value_heads, c.hidden_size // c.num_attention_heads
    # Chunks of ~16M channel values: the outlier selection holds a few fp32 copies of a chunk.
    n = min(chunk or max(1024, 2**24 // (batch * h * d)), length)
    for idx, layer in enumerate(cache.layers):
        dev = "cuda" if layer_devices is None else layer_devices[idx]
        lc = cfg.layers[idx]
        zero = lc.key_zero.to(dev, torch.float32)[None, :, None, :]
        scale = lc.key_scale.to(dev, torch.float32)[None, :, None, :]
        k = (torch.randn(batch, h, n, d, device=dev) * key_spread * scale + zero).to(model.dtype)
        v = torch.randn(batch, h, n, d, device=dev, dtype=model.dtype)
        for start in range(0, length, n):
            m = min(n, length - start)
            layer.stage(torch.arange(start, start + m, device=dev)[None].expand(batch, m), m)
            layer.update(k[:, :, :m], v[:, :, :m])
        del k, v
    synchronize(layer_devices)
    return cache


@torch.no_grad()
def fill_dynamic(model, batch: int, length: int, layer_devices=None):
    """A DynamicCache holding ``length`` random fp16 tokens per layer (on ``layer_devices[i]``, default "cuda")."""
    from transformers import DynamicCache

    cache = DynamicCache(config=model.config)
    c = model.config
    h, d = c.num_key_value_heads, c.hidden_size // c.num_attention_heads
    for idx, layer in enumerate(cache.layers):
        dev = "cuda" if layer_devices is None else layer_devices[idx]
        k = torch.randn(batch, h, length, d, device=dev, dtype=model.dtype)
        layer.lazy_initialization(k[:, :, :0], k[:, :, :0])
        layer.keys, layer.values = k, torch.randn_like(k)
        layer.is_initialized = True
    return cache


@torch.no_grad()
def fill_quanto(model, batch: int, length: int, nbits: int):
    from transformers.cache_utils import QuantizedCache

    cache = QuantizedCache(backend="quanto", config=model.config, nbits=nbits)
    c = model.config
    h, d = c.num_key_value_heads, c.hidden_size // c.num_attention_heads
    k = torch.randn(batch, h, length, d, device="cuda", dtype=model.dtype)
    for layer in cache.layers:
        layer.update(k, k)
    del k
    return cache


@torch.no_grad()
def decode_steps(model, cache, batch: int, steps: int, warmup: int = 2, devices=None) -> dict:
    """Wall-clock ms per decode step of the whole model (synchronized), and the peak memory while decoding.

    ``devices``: for a model split over several devices, all of them (the first holds the embeddings): every
    CUDA device among them is synchronized, and ``peak_bytes_per_device`` reports each one's peak (``peak_bytes``
    is then their sum). Default: the current CUDA device only.
    """
    cuda_devs = None if devices is None else sorted({torch.device(d) for d in devices if torch.device(d).type == "cuda"}, key=str)
    synchronize(devices)
    for dev in [None] if cuda_devs is None else cuda_devs:
        torch.cuda.reset_peak_memory_stats(dev)
    tok = torch.randint(3, min(1000, model.config.vocab_size), (batch, 1), device="cuda" if devices is None else devices[0])
    times = []
    for i in range(warmup + steps):
        synchronize(devices)
        t0 = time.perf_counter()
        out = model(input_ids=tok, past_key_values=cache, use_cache=True, logits_to_keep=1)
        tok = out.logits[:, -1:].argmax(-1).to(tok.device)
        synchronize(devices)
        if i >= warmup:
            times.append((time.perf_counter() - t0) * 1e3)
    times.sort()
    finite = bool(torch.isfinite(out.logits).all())
    res = {"ms_per_token": times[len(times) // 2], "ms_all": [round(t, 2) for t in times], "finite_logits": finite}
    if cuda_devs is None:
        res["peak_bytes"] = torch.cuda.max_memory_allocated()
    else:
        res["peak_bytes_per_device"] = {str(d): torch.cuda.max_memory_allocated(d) for d in cuda_devs}
        res["peak_bytes"] = sum(res["peak_bytes_per_device"].values())
    return res


def quanto_available() -> bool:
    try:
        import optimum.quanto  # noqa: F401

        return True
    except Exception:  # noqa: BLE001
        return False


# ============================================================================================== e2e
def stage_e2e(s: Suite, rec: dict, deadline: float, quick: bool = False) -> None:
    model = build_model("llama2-7b")
    wbytes = weight_bytes(model)
    rec["model"] = {"shape": "LLaMA-2-7B (random fp16 weights)", "weight_bytes": wbytes}
    s.say(f"model built: {wbytes / GiB:.2f} GiB of weights")
    configs = {}
    for bits in (4, 3, 2):
        configs[bits] = kvquant_config(model, bits, 0.01)
    contexts = [8192, 32768] if quick else [32768, 131072, 8192]
    kinds = ["kvquant-4", "kvquant-3", "kvquant-2", "fp16-dynamic"] + (["quanto-int4", "quanto-int2"] if quanto_available() else [])
    total = torch.cuda.get_device_properties(0).total_memory
    rows = rec["rows"] = []
    for batch_mode in ("1", "max"):
        for length in contexts:
            for kind in kinds:
                if time.time() > deadline - 25:
                    rows.append({"kind": kind, "context": length, "batch": batch_mode, "status": "skipped (time box)"})
                    continue
                fmt = "fp16" if kind == "fp16-dynamic" else (int(kind[-1]), 0.01) if kind.startswith("kvquant") else None
                per_row = kv_bytes_per_token(model, fmt) if fmt else kv_bytes_per_token(model, "fp16") * (int(kind[-1]) + 1) / 16
                if batch_mode == "1":
                    batch = 1
                else:
                    margin = 6 * GiB + (kv_bytes_per_token(model, "fp16") / 32 * 2 if kind == "fp16-dynamic" else 0) * length
                    batch = int((total - wbytes - margin) // (per_row * length))
                    batch = max(1, min(batch, 64))
                    if batch == 1:
                        continue
                row = {"kind": kind, "context": length, "batch": batch, "batch_mode": batch_mode}
                for attempt in range(2):
                    cache = None
                    try:
                        free_cuda()
                        t0 = time.time()
                        if kind == "fp16-dynamic":
                            cache = fill_dynamic(model, batch, length)
                        elif kind.startswith("quanto"):
                            cache = fill_quanto(model, batch, length, int(kind[-1]))
                        else:
                            cache = fill_kvquant(model, configs[int(kind[-1])], batch, length, extra=16)
                        row["fill_s"] = round(time.time() - t0, 1)
                        row.update(decode_steps(model, cache, batch, steps=6 if length > 65536 else 10))
                        if kind.startswith("kvquant"):
                            rep = cache.memory_report()
                            row["cache_bytes"] = rep.total_bytes
                            row["avg_bits"] = rep.avg_bits
                            row["uses_kernels"] = all(layer.uses_kernels for layer in cache.layers)
                        row["weight_bytes"] = wbytes
                        row.pop("status", None)
                        break
                    except torch.cuda.OutOfMemoryError:
                        row["status"] = "out of memory"
                        if batch_mode == "max" and batch > 1:
                            batch = max(1, int(batch * 0.75))
                            row["batch"] = batch
                            continue
                        break
                    except Exception as e:  # noqa: BLE001
                        row["status"] = f"failed: {type(e).__name__}: {str(e)[:300]}"
                        break
                    finally:
                        del cache
                        free_cuda()
                rows.append(row)
                s.say(f"e2e {kind} L{length} B{row['batch']}: " + (f"{row['ms_per_token']:.1f} ms/token, peak {row['peak_bytes'] / GiB:.1f} GiB" if "ms_per_token" in row else row.get("status", "")))
                s.save()


# ============================================================================================== capacity
def stage_capacity(s: Suite, rec: dict, deadline: float, quick: bool = False, models=("llama2-7b", "llama3-8b")) -> None:
    rec.setdefault("rows", [])
    for kind in models:
        if time.time() > deadline - 60:
            rec["rows"].append({"model": kind, "status": "skipped (time box)"})
            continue
        model = build_model(kind)
        wbytes = weight_bytes(model)
        s.say(f"capacity: {kind} built ({wbytes / GiB:.2f} GiB)")
        for fmt in ("fp16", (4, 0.01), (3, 0.01), (2, 0.01), (2, 0.0)):
            name = "fp16" if fmt == "fp16" else fmt_name(*fmt)
            if time.time() > deadline - 40:
                rec["rows"].append({"model": kind, "format": name, "status": "skipped (time box)"})
                continue
            cfg = kvquant_config(model, *fmt) if fmt != "fp16" else None
            per_token = kv_bytes_per_token(model, fmt)
            free_cuda()
            free, _ = torch.cuda.mem_get_info()
            c = model.config
            # Workspace: decode activations, logits, the kernels' fp32 score scratch (query heads x tokens), and for
            # fp16 the torch.cat copy of one layer's K or V.
            scratch_per_token = 4 * c.num_attention_heads + (2 * c.num_key_value_heads * 128 if fmt == "fp16" else 0)
            margin = 1.5 * GiB
            length = int((free - margin) / (per_token + scratch_per_token)) // 1024 * 1024
            if quick:
                length = min(length, 65536)
            row = {"model": kind, "format": name, "bytes_per_token": per_token, "free_bytes_before": free}
            for attempt in range(4):
                cache = None
                try:
                    free_cuda()
                    t0 = time.time()
                    cache = fill_dynamic(model, 1, length) if fmt == "fp16" else fill_kvquant(model, cfg, 1, length, extra=8)
                    fill_s = time.time() - t0
                    steps = decode_steps(model, cache, 1, steps=3, warmup=1)
                    row.update(context=length, fill_s=round(fill_s, 1), **steps)
                    if cfg is not None:
                        rep = cache.memory_report()
                        row.update(cache_bytes=rep.total_bytes, avg_bits=rep.avg_bits, uses_kernels=all(layer.uses_kernels for layer in cache.layers))
                    row.pop("status", None)
                    break
                except torch.cuda.OutOfMemoryError:
                    row.setdefault("out_of_memory_at", []).append(length)
                    length = int(length * 0.97) // 1024 * 1024
                    row["status"] = "out of memory"
                finally:
                    del cache
                    free_cuda()
                if time.time() > deadline - 30:
                    break
            rec["rows"].append(row)
            s.say(f"capacity {kind} {name}: " + (f"{row['context']:,} tokens, {row['ms_per_token']:.0f} ms/token" if "context" in row else row.get("status", "")))
            s.save()
        del model
        free_cuda()


# Soft time boxes (checked between measurements): `--stages tests,decode` and `--stages e2e,capacity` each fit a
# 10-minute device call.
STAGES = {"tests": (stage_tests, 250), "decode": (stage_decode, 300), "e2e": (stage_e2e, 260), "capacity": (stage_capacity, 290), "quanto_decode": (quanto_decode, 300)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, type=Path)
    ap.add_argument("--stages", default="tests,decode,e2e,capacity")
    ap.add_argument("--budget-scale", type=float, default=1.0, help="multiply every stage's time box")
    ap.add_argument("--quick", action="store_true", help="small contexts only (a smoke run)")
    args = ap.parse_args()
    suite = Suite(args.out)
    suite.say(f"environment: {suite.results['env']}")
    if not torch.cuda.is_available():
        suite.say("no CUDA device: nothing to run")
        suite.results["stages"]["_error"] = "no CUDA device"
        suite.save()
        sys.exit(1)
    for name in [n.strip() for n in args.stages.split(",") if n.strip()]:
        fn, budget = STAGES[name]
        kw = {"quick": args.quick} if name != "tests" else {}
        suite.run(name, fn, budget * args.budget_scale, **kw)
    print_summary(suite)


def print_summary(s: Suite) -> None:
    st = s.results["stages"]
    lines = ["", "SUMMARY " + json.dumps({k: s.results["env"].get(k) for k in ("gpu", "torch", "triton", "transformers", "date_utc")})]
    for name, rec in st.items():
        if not isinstance(rec, dict):
            continue
        lines.append(f"{name}: {rec.get('status')} ({rec.get('elapsed_s')}s){'  ' + rec['error'] if 'error' in rec else ''}")
        if name == "tests":
            lines.append(f"  pytest: {rec.get('pytest', {}).get('summary')}")
            for g in rec.get("generate", []):
                lines.append(f"  generate {g}")
        if name == "decode":
            lines.append(f"  copy {rec.get('copy_GBps', 0):.0f} GB/s; tuning {json.dumps(rec.get('tuning', {}))[:400]}")
            for row in rec.get("rows", []):
                if row.get("context") in (8192, 131072) or row.get("context") == 32768:
                    cells = []
                    for key in ["fp16"] + [fmt_name(*f) for f in FORMATS]:
                        r = row.get(key, {})
                        if "ms" in r:
                            cells.append(f"{key} {r['ms'] * 1e3:.0f}us" + (f" x{r['speedup_vs_fp16']:.2f} {r['copy_fraction']:.0%}bw" if "speedup_vs_fp16" in r else ""))
                    lines.append(f"  {row['shape']} B{row['batch']} L{row['context']}: " + "; ".join(cells))
        if name in ("e2e", "capacity"):
            for row in rec.get("rows", []):
                keep = {k: row.get(k) for k in ("kind", "model", "format", "context", "batch", "ms_per_token", "status")}
                if row.get("peak_bytes"):
                    keep["peak_GiB"] = round(row["peak_bytes"] / GiB, 2)
                if row.get("cache_bytes"):
                    keep["cache_GiB"] = round(row["cache_bytes"] / GiB, 2)
                lines.append("  " + json.dumps({k: v for k, v in keep.items() if v is not None}))
    text = "\n".join(lines)
    print(text, flush=True)
    (s.out / "summary.txt").write_text(text)


if __name__ == "__main__":
    main()
