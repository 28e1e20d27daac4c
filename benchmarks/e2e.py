"""End-to-end decode speed, time to first token and capacity of a LLaMA-shaped model (random fp16 weights).

    python benchmarks/e2e.py --out runs/e2e [--shapes LLaMA-2-7B,Llama-3-8B] [--contexts 32768,131072]
        [--stages decode,ttft,throughput,capacity,profile,trace] [--budget 400]

decode: a context of ``--contexts`` tokens is written into each cache directly (random fp16 K/V for the fp16
caches, random packed codes for KVQuant: the decode cost does not depend on the values), then ``--steps`` greedy
decode steps of the whole model are timed (median ms/token after warm-up): eager ``model.forward`` with
``DynamicCache`` / HF ``QuantizedCache`` (quanto) / the growing KVQuant cache, or ``torch.compile(model.forward,
mode="reduce-overhead", fullgraph=True)`` (the gpt-fast loop; what generate does for a compileable cache) with
``StaticCache`` / the static KVQuant cache. Peak GiB is the CUDA allocator's peak during the steps; cache GiB the
cache's own tensors.
ttft: a real prompt of ``--ttft-tokens`` tokens prefilled through the cache (KVQuant: quantized as it goes, in
``--chunk``-token chunks that attend over the packed prefix; several sizes may be given), against fp16 prefill with
``DynamicCache``; ``--profile-chunk C``: where the prefill at chunk size C and fp16's spend their GPU time.
throughput: at 32K, the cache memory of fp16 at batch 4, and the largest KVQuant-3 batch that fits in it.
capacity: the longest context each KVQuant format holds beside the model, proven by decode steps.
profile: the GPU time of a compiled decode step by kernel (torch.profiler), KVQuant-3 against fp16 StaticCache.
trace: where a compiled decode step's wall time goes (CPU + GPU timeline: kernels, idle time between them, CPU ops).

Writes ``e2e.jsonl`` as it goes and ``e2e.json``: ``{"rows": [{"shape", "cache", "compiled", "context", "batch",
"ms_per_token", "tokens_per_s", "ttft_s", "peak_gib", "cache_gib"}], "capacity": [...]}``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import traceback
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

DEV = "cuda" if torch.cuda.is_available() else "cpu"
SHAPES = {
    "LLaMA-2-7B": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                       num_key_value_heads=32, vocab_size=32000, rope_theta=10000.0),
    "Llama-3-8B": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                       num_key_value_heads=8, vocab_size=128256, rope_theta=500000.0),
    "tiny": dict(hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=2,
                 num_key_value_heads=2, vocab_size=256, rope_theta=10000.0),  # a CPU dry run of the same code
}
GIB = 2**30
CAPACITY_STEP = 0.96  # --capacity-step: the next context tried when one does not fit
SKIP: set = set()  # --skip: rows ("name:eager" / "name:compiled") not to run
TTFT_ONCE = False  # --ttft-once: one timed prefill per case after a short warm-up (prompts too long to run three times)
BACKEND = "inductor"  # --compile-backend: "inductor" (mode="reduce-overhead") or "cudagraphs" (no kernel fusion)
TTFT_WINDOW = 0  # --ttft-window W: also KVQuant-3 with an exact recent window of W tokens (each chunk query reads its own)
TREES = True  # --no-cudagraph-trees: inductor's plain CUDA graphs instead of its graph trees (their per-replay checks)


def make_model(shape: str):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(**SHAPES[shape], max_position_embeddings=4 * 2**20, head_dim=128 if shape != "tiny" else 128,
                      attn_implementation="sdpa")
    torch.manual_seed(0)
    with torch.device("meta"):
        model = LlamaForCausalLM(cfg)
    model = model.to_empty(device=DEV).to(torch.float16 if DEV == "cuda" else torch.float32)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.fill_(1.0)
            else:
                p.normal_(0.0, 0.02)
        model.model.rotary_emb.inv_freq.copy_(_inv_freq(cfg))
        if hasattr(model.model.rotary_emb, "original_inv_freq"):
            model.model.rotary_emb.original_inv_freq = model.model.rotary_emb.inv_freq.clone()
    return model.eval()


def _inv_freq(cfg):
    from transformers_kvquant.kernels.rope import rope_inv_freq

    theta = getattr(cfg, "rope_parameters", None) or {}
    return rope_inv_freq(cfg.head_dim, theta.get("rope_theta", getattr(cfg, "rope_theta", 10000.0))).to(DEV)


def kvquant_config(model, bits: int, fraction: float):
    """Codebooks and key ranges fitted from one forward pass of this (random) model: the benchmark needs the
    geometry and realistic ranges, not a calibrated model (tests.helpers.quick_config)."""
    from tests.helpers import quick_config

    return quick_config(model, bits=bits, outlier_fraction=fraction)


def cache_gib(cache) -> float:
    seen, total = set(), 0
    for layer in cache.layers:
        tensors = []
        store = getattr(layer, "store", None)
        if store is not None and getattr(store, "cache", None) is not None:
            tensors = list(store.cache.tensors().values())
        else:
            tensors = [t for t in vars(layer).values() if isinstance(t, torch.Tensor)]
            for name in ("_quantized_keys", "_quantized_values"):
                q = getattr(layer, name, None)
                if q is not None:
                    tensors += [t for t in vars(q).values() if isinstance(t, torch.Tensor)]
        for t in tensors:  # by storage: a static packed cache's tensors are views into one buffer per layer
            if t.untyped_storage().data_ptr() not in seen:
                seen.add(t.untyped_storage().data_ptr())
                total += t.untyped_storage().nbytes()
    return total / GIB


# ------------------------------------------------------------------------------------------------ filling
def fill_fp16(model, kind: str, batch: int, context: int, capacity: int):
    from transformers import DynamicCache, StaticCache

    text = model.config
    h, d = text.num_key_value_heads, text.head_dim
    dtype = model.dtype
    if kind == "fp16-static":
        cache = StaticCache(config=model.config, max_cache_len=capacity)
    elif kind == "fp16-dynamic":
        cache = DynamicCache(config=model.config)
    else:
        from transformers.cache_utils import QuantizedCache

        cache = QuantizedCache("quanto", model.config, nbits=int(kind[-1]), residual_length=128)
    g = torch.Generator(device=DEV).manual_seed(0)
    for i, layer in enumerate(cache.layers):
        k = torch.randn(batch, h, context, d, device=DEV, dtype=dtype, generator=g)
        v = torch.randn_like(k)
        if kind == "fp16-static":
            layer.lazy_initialization(k[:, :, :1], v[:, :, :1])
            layer.keys[:, :, :context].copy_(k)
            layer.values[:, :, :context].copy_(v)
            layer.cumulative_length.fill_(context)
        else:
            cache.update(k, v, i)
        del k, v
    return cache


def fill_kvquant(model, config, batch: int, context: int, capacity: int | None, static: bool):
    """A KVQuant cache holding ``context`` tokens: packed buffers written directly (zero codes and ranges, positions
    0..context-1), as the append would leave them."""
    from transformers_kvquant import KVQuantCache

    opts = {"max_cache_len": capacity} if static else {"max_length": capacity or context + 64}
    cache = KVQuantCache(model, config, backend="triton" if DEV == "cuda" else "reference", **opts)
    text = model.config
    h, d = text.num_key_value_heads, text.head_dim
    one = torch.zeros(batch, h, 1, d, device=DEV, dtype=model.dtype)
    for layer in cache.layers:
        layer.lazy_initialization(one, one)
        store = layer.store
        if not static:
            store.reserve(context + 64)
        c = store.cache
        c.positions[:, :context] = torch.arange(context, device=DEV, dtype=torch.int32)
        c.value_scale[:, :context] = 1.0
        c.length.fill_(context)
        store.host_length = context
    return cache


# ------------------------------------------------------------------------------------------------ decoding
def decode_ms(model, cache, batch: int, context: int, steps: int, compiled: bool, forward_cache: dict) -> tuple[float, float]:
    """Median ms per decode step over ``steps`` (after warm-up), and the peak GiB during them."""
    if compiled:
        key = id(cache)
        if key not in forward_cache:
            forward_cache.clear()
            if DEV != "cuda":
                options = {"backend": "aot_eager"}
            elif BACKEND == "inductor":
                options = {"mode": "reduce-overhead"}
            else:
                options = {"backend": BACKEND}
            forward_cache[key] = torch.compile(model.forward, fullgraph=True, **options)
        forward = forward_cache[key]
    else:
        forward = model.forward
    token = torch.full((batch, 1), 5, device=DEV, dtype=torch.long)
    times = []
    pos = context
    torch.cuda.reset_peak_memory_stats() if DEV == "cuda" else None
    with torch.no_grad():
        for step in range(steps + 3):
            where = torch.tensor([pos], device=DEV)
            sync()
            t = time.perf_counter()
            out = forward(input_ids=token, past_key_values=cache, cache_position=where,
                          position_ids=where[None].expand(batch, 1), use_cache=True)
            token = out.logits[:, -1:].argmax(-1).clone()
            sync()
            if step >= 3:
                times.append((time.perf_counter() - t) * 1000)
            pos += 1
    times.sort()
    peak = torch.cuda.max_memory_allocated() / GIB if DEV == "cuda" else 0.0
    return times[len(times) // 2], peak


def sync():
    if DEV == "cuda":
        torch.cuda.synchronize()


def free():
    import gc

    gc.collect()
    if DEV == "cuda":
        torch.cuda.empty_cache()


# ------------------------------------------------------------------------------------------------ stages
class Run:
    def __init__(self, out: Path, budget: float):
        self.out, self.budget, self.start = out, budget, time.time()
        self.rows, self.capacity, self.profile, self.trace = [], [], [], []
        self.log = (out / "e2e.jsonl").open("a")

    def left(self) -> float:
        return self.budget - (time.time() - self.start)

    def add(self, row: dict, kind: str = "rows"):
        getattr(self, kind).append(row)
        self.log.write(json.dumps({kind: row}) + "\n")
        self.log.flush()
        print(kind, json.dumps(row), flush=True)
        self.save()

    def save(self):
        (self.out / "e2e.json").write_text(json.dumps({"rows": self.rows, "capacity": self.capacity, "profile": self.profile,
                                                       "trace": self.trace,
                                                       "seconds": round(time.time() - self.start, 1)}, indent=1))


def set_length(cache, context: int) -> None:
    """A filled KVQuant cache back to ``context`` tokens (the slots past it are simply overwritten next)."""
    for layer in cache.layers:
        layer.store.cache.length.fill_(context)
        layer.store.host_length = context


def timed_row(run, model, shape, name, compiled, cache, context, steps, forwards, batch=1, **extra):
    t = time.time()
    ms, peak = decode_ms(model, cache, batch, context, steps, compiled, forwards)
    run.add({"shape": shape, "cache": name, "compiled": compiled, "context": context, "batch": batch,
             "ms_per_token": round(ms, 3), "tokens_per_s": round(1000 * batch / ms, 1), "ttft_s": None,
             "peak_gib": round(peak, 2), "cache_gib": round(cache_gib(cache), 2), "seconds": round(time.time() - t, 1), **extra})


def guarded(run, label: dict, fn) -> None:
    try:
        fn()
    except Exception:  # noqa: BLE001 (one failing row is recorded, the others still run)
        run.add({**label, "error": traceback.format_exc()[-1500:]})
    free()


def stage_decode(run, model, shape, contexts, steps, configs):
    """Compiled KVQuant first (one graph for every context: the kernels read to the device length), then a compiled
    StaticCache per context (its attention reads the whole capacity), then the eager rows."""
    import torch._dynamo

    top = max(contexts)

    def kvquant_compiled(bits, which):
        torch._dynamo.reset()
        forwards: dict = {}
        cache = fill_kvquant(model, configs[bits], 1, top, top + steps + 16, static=True)
        for context in which:
            if run.left() < 45:
                return
            set_length(cache, context)
            guarded(run, {"shape": shape, "cache": f"kvquant-{bits}", "compiled": True, "context": context},
                    lambda: timed_row(run, model, shape, f"kvquant-{bits}", True, cache, context, steps, forwards))

    def fp16_static(context):
        torch._dynamo.reset()
        timed_row(run, model, shape, "fp16-static", True, fill_fp16(model, "fp16-static", 1, context, context + steps + 8),
                  context, steps, {})

    def eager(name, context):
        if name.startswith("kvquant"):
            cache = fill_kvquant(model, configs[int(name[-1])], 1, context, None, static=False)
        else:
            cache = fill_fp16(model, name, 1, context, context + steps + 8)
        timed_row(run, model, shape, name, False, cache, context, steps, {})

    if "kvquant-3:compiled" not in SKIP:
        guarded(run, {"shape": shape, "cache": "kvquant-3", "compiled": True}, lambda: kvquant_compiled(3, contexts))
    for context in contexts:
        if run.left() > 90:
            guarded(run, {"shape": shape, "cache": "fp16-static", "compiled": True, "context": context}, lambda: fp16_static(context))
    for name, context in [("kvquant-3", c) for c in contexts] + [("fp16-dynamic", contexts[0]), ("quanto-int4", contexts[0]),
                                                                ("quanto-int2", contexts[0])]:
        if run.left() > 45 and f"{name}:eager" not in SKIP:
            guarded(run, {"shape": shape, "cache": name, "compiled": False, "context": context}, lambda: eager(name, context))
    for bits in (4, 2):
        if run.left() > 120 and f"kvquant-{bits}:compiled" not in SKIP:
            guarded(run, {"shape": shape, "cache": f"kvquant-{bits}", "compiled": True}, lambda: kvquant_compiled(bits, contexts[:1]))


def stage_profile(run, model, shape, context, steps, configs):
    """Where a compiled decode step's GPU time goes: torch.profiler over ``steps`` steps of KVQuant-3 and of fp16
    StaticCache (both compiled, after warm-up), the kernels by total GPU time -> ``profile_<cache>_<context>.txt``."""
    import torch._dynamo
    from torch.profiler import ProfilerActivity, profile

    def one(name, cache):
        torch._dynamo.reset()
        forwards: dict = {}
        decode_ms(model, cache, 1, context, 3, True, forwards)  # compile and warm up
        forward = next(iter(forwards.values()))
        token = torch.full((1, 1), 5, device=DEV, dtype=torch.long)
        pos = context + 8
        gpu = DEV == "cuda"
        with profile(activities=[ProfilerActivity.CUDA if gpu else ProfilerActivity.CPU]) as prof, torch.no_grad():
            for _ in range(steps):
                where = torch.tensor([pos], device=DEV)
                out = forward(input_ids=token, past_key_values=cache, cache_position=where, position_ids=where[None],
                              use_cache=True)
                token = out.logits[:, -1:].argmax(-1).clone()
                pos += 1
            sync()
        table = prof.key_averages().table(sort_by="cuda_time_total" if gpu else "cpu_time_total", row_limit=40,
                                          max_name_column_width=90)
        total = sum(e.self_device_time_total if gpu else e.self_cpu_time_total for e in prof.key_averages()) / steps / 1000
        (run.out / f"profile_{name}_{context}.txt").write_text(f"{shape} {name} compiled, context {context}, "
                                                              f"{steps} steps: {total:.3f} ms of GPU time per step\n{table}\n")
        run.add({"shape": shape, "cache": name, "context": context, "gpu_ms_per_step": round(total, 3)}, "profile")

    guarded(run, {"shape": shape, "cache": "kvquant-3", "stage": "profile"},
            lambda: one("kvquant-3", fill_kvquant(model, configs[3], 1, context, context + 64, static=True)))
    guarded(run, {"shape": shape, "cache": "fp16-static", "stage": "profile"},
            lambda: one("fp16-static", fill_fp16(model, "fp16-static", 1, context, context + 64)))


def stage_trace(run, model, shape, context, steps, configs):
    """Where a compiled decode step's wall time goes, KVQuant-3 against fp16 StaticCache: a CPU + GPU timeline of
    ``steps`` steps (synchronized each, as the decode stage times them) -> ``trace_<cache>_<context>.json``: per step
    the wall time, the GPU kernels' count, summed and merged busy time, the idle time inside the step before the first
    kernel, between kernels (by size) and after the last, and the CPU operators by inclusive time."""
    import torch._dynamo
    from torch.profiler import ProfilerActivity, profile, record_function

    def one(name, cache):
        torch._dynamo.reset()
        forwards: dict = {}
        decode_ms(model, cache, 1, context, 3, True, forwards)  # compile and warm up
        forward = next(iter(forwards.values()))
        token = torch.full((1, 1), 5, device=DEV, dtype=torch.long)
        pos = context + 8
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof, torch.no_grad():
            for _ in range(steps):
                with record_function("decode_step"):
                    where = torch.tensor([pos], device=DEV)
                    out = forward(input_ids=token, past_key_values=cache, cache_position=where,
                                  position_ids=where[None], use_cache=True)
                    token = out.logits[:, -1:].argmax(-1).clone()
                    sync()
                pos += 1
        tag = "" if TREES else "_no_trees"
        path = run.out / f"trace_{name}_{context}{tag}.raw.json"
        prof.export_chrome_trace(str(path))
        summary = summarize_trace(json.loads(path.read_text()))
        path.unlink()
        (run.out / f"trace_{name}_{context}{tag}.json").write_text(json.dumps(summary, indent=1))
        med = summary["median"]
        run.add({"shape": shape, "cache": name, "context": context, "cudagraph_trees": TREES, **med}, "trace")

    if "kvquant-3:trace" not in SKIP:
        guarded(run, {"shape": shape, "cache": "kvquant-3", "stage": "trace"},
                lambda: one("kvquant-3", fill_kvquant(model, configs[3], 1, context, context + 64, static=True)))
    if "fp16-static:trace" not in SKIP and run.left() > 60:
        guarded(run, {"shape": shape, "cache": "fp16-static", "stage": "trace"},
                lambda: one("fp16-static", fill_fp16(model, "fp16-static", 1, context, context + 64)))


def summarize_trace(trace: dict) -> dict:
    """Per decode step of a chrome trace (``decode_step`` ranges): wall, GPU kernels and the idle time among them."""
    events = [e for e in trace.get("traceEvents", []) if e.get("ph") == "X"]
    steps = sorted((e for e in events if e.get("name") == "decode_step"), key=lambda e: e["ts"])
    kernels = sorted((e for e in events if e.get("cat") in ("kernel", "gpu_memcpy", "gpu_memset")), key=lambda e: e["ts"])
    cpu_ops = [e for e in events if e.get("cat") == "cpu_op"]
    rows = []
    for st in steps:
        t0, t1 = st["ts"], st["ts"] + st["dur"]
        ks = [k for k in kernels if t0 <= k["ts"] < t1]
        gaps, busy, end = [], 0.0, None
        for k in ks:
            if end is not None and k["ts"] > end:
                gaps.append(k["ts"] - end)
            start = k["ts"] if end is None else max(k["ts"], end)
            busy += max(0.0, k["ts"] + k["dur"] - start)
            end = k["ts"] + k["dur"] if end is None else max(end, k["ts"] + k["dur"])
        ops: dict = {}
        for e in cpu_ops:
            if t0 <= e["ts"] < t1:
                ops[e["name"]] = ops.get(e["name"], 0.0) + e["dur"]
        rows.append({
            "wall_us": st["dur"], "kernels": len(ks), "kernel_sum_us": sum(k["dur"] for k in ks), "gpu_busy_us": busy,
            "lead_us": (ks[0]["ts"] - t0) if ks else None, "tail_us": (t1 - end) if ks else None,
            "gaps_us": sum(gaps), "gaps_over_5us": sum(g for g in gaps if g > 5), "gap_count_over_5us": sum(g > 5 for g in gaps),
            "cpu_ops_inclusive_top": sorted(ops.items(), key=lambda kv: -kv[1])[:25],
        })
    med = {}
    for key in ("wall_us", "kernels", "kernel_sum_us", "gpu_busy_us", "lead_us", "tail_us", "gaps_us", "gaps_over_5us",
                "gap_count_over_5us"):
        vals = sorted(r[key] for r in rows if r[key] is not None)
        med[key] = round(vals[len(vals) // 2], 1) if vals else None
    return {"median": med, "steps": rows}


def stage_ttft(run, model, shape, tokens, chunks, configs, profile_chunk=0):
    """Time to first token of a ``tokens``-token prompt: fp16 in one forward, KVQuant-3 in chunks of each size in
    ``chunks``. ``profile_chunk``: also where that chunk size's prefill spends its GPU time (torch.profiler, by
    kernel) -> ``profile_ttft_<chunk>.txt``."""
    from torch.profiler import ProfilerActivity, profile
    from transformers import DynamicCache

    from transformers_kvquant import KVQuantCache

    ids = torch.randint(3, model.config.vocab_size, (1, tokens), device=DEV)
    gpu = DEV == "cuda"

    def prefill(name, step, n=tokens):
        if name == "fp16-dynamic":
            cache = DynamicCache(config=model.config)
        else:
            window = int(name.rsplit("window", 1)[1]) if "window" in name else 0  # the long-context preset's exact window
            cache = KVQuantCache(model, configs[3], backend="triton" if gpu else "reference", max_cache_len=tokens + 8,
                                 recent_window=window)
        with torch.no_grad():
            for a in range(0, n, step):
                part = ids[:, a : min(a + step, n)]
                where = torch.arange(a, a + part.shape[1], device=DEV)
                out = model(part, past_key_values=cache, cache_position=where, position_ids=where[None], use_cache=True,
                            logits_to_keep=1)
            out.logits.argmax(-1)
        sync()

    cases = [("fp16-dynamic", tokens)] + [("kvquant-3", c) for c in chunks]
    cases += [(f"kvquant-3-window{TTFT_WINDOW}", c) for c in chunks] if TTFT_WINDOW else []
    for name, step in cases:
        if run.left() < 40 or f"{name}:ttft" in SKIP:
            continue
        try:
            times = []
            if TTFT_ONCE:  # one timed prefill (long prompts): the kernels compiled by a short one first
                prefill(name, step, min(tokens, 2 * step))
            for attempt in range(1 if TTFT_ONCE else 3):  # the first run compiles the kernels: the best of the other two
                free()
                torch.cuda.reset_peak_memory_stats() if gpu else None
                t = time.perf_counter()
                prefill(name, step)
                times.append(time.perf_counter() - t)
            ttft = min(times[1:] or times)
            peak = torch.cuda.max_memory_allocated() / GIB if gpu else 0.0
            run.add({"shape": shape, "cache": name, "compiled": False, "context": tokens, "batch": 1, "ms_per_token": None,
                     "tokens_per_s": None, "ttft_s": round(ttft, 3), "peak_gib": round(peak, 2),
                     "prefill": "one forward" if name == "fp16-dynamic" else f"{step}-token chunks over the packed prefix"})
            if profile_chunk and (step == profile_chunk or name == "fp16-dynamic"):
                with profile(activities=[ProfilerActivity.CUDA if gpu else ProfilerActivity.CPU]) as prof:
                    prefill(name, step)
                table = prof.key_averages().table(sort_by="cuda_time_total" if gpu else "cpu_time_total", row_limit=30,
                                                  max_name_column_width=90)
                total = sum(e.self_device_time_total if gpu else e.self_cpu_time_total for e in prof.key_averages()) / 1e6
                (run.out / f"profile_ttft_{name}_{step}.txt").write_text(
                    f"{shape} {name} prefill of {tokens} tokens in {step}-token chunks: {total:.3f} s of {'GPU' if gpu else 'CPU'} time\n{table}\n")
        except Exception:  # noqa: BLE001
            run.add({"shape": shape, "cache": name, "context": tokens, "ttft_error": traceback.format_exc()[-1500:]})
        free()


def stage_throughput(run, model, shape, context, steps, configs):
    """fp16 static at batch 4; KVQuant-3 static at the batch whose cache fits in the same bytes."""
    forwards: dict = {}
    fp16_batch = 4
    text = model.config
    fp16_bytes = 2 * fp16_batch * context * text.num_key_value_heads * text.head_dim * 2 * text.num_hidden_layers
    try:
        probe = fill_kvquant(model, configs[3], 1, context, context + steps + 16, static=True)
        per_row = cache_gib(probe) * GIB
        probe = None
        free()
        kv_batch = max(1, int(fp16_bytes // per_row))
    except Exception:  # noqa: BLE001
        run.add({"shape": shape, "throughput_error": traceback.format_exc()[-1500:]})
        return
    for name, batch in (("fp16-static", fp16_batch), ("kvquant-3", kv_batch)):
        if run.left() < 90:
            continue
        try:
            if name == "fp16-static":
                cache = fill_fp16(model, name, batch, context, context + steps + 8)
            else:
                cache = fill_kvquant(model, configs[3], batch, context, context + steps + 16, static=True)
            import torch._dynamo

            torch._dynamo.reset()
            forwards.clear()
            ms, peak = decode_ms(model, cache, batch, context, steps, True, forwards)
            run.add({"shape": shape, "cache": name, "compiled": True, "context": context, "batch": batch,
                     "ms_per_token": round(ms, 3), "tokens_per_s": round(1000 * batch / ms, 1), "ttft_s": None,
                     "peak_gib": round(peak, 2), "cache_gib": round(cache_gib(cache), 2), "equal_memory": True})
        except Exception:  # noqa: BLE001
            run.add({"shape": shape, "cache": name, "batch": batch, "throughput_error": traceback.format_exc()[-1500:]})
        cache = None
        forwards.clear()
        free()


def stage_capacity(run, model, shape, configs, targets):
    """For each format: the largest context (tried from the target down) whose static cache and two decode steps fit."""
    for name, target in targets:
        if run.left() < 45:
            continue
        bits = int(name[3])
        config = configs[(bits, 0.01)] if name.endswith("%") else configs[bits]
        context = target
        while context >= 2**17:
            if run.left() < 30:
                break
            cache = None
            try:
                cache = fill_kvquant(model, config, 1, context, context + 8, static=True)
                ms, peak = decode_ms(model, cache, 1, context, 2, False, {})
                run.add({"shape": shape, "format": name, "context": context, "decode_ms": round(ms, 1),
                         "peak_gib": round(peak, 2), "cache_gib": round(cache_gib(cache), 2)}, "capacity")
                break
            except torch.OutOfMemoryError:
                print(f"{name}: {context} tokens do not fit", flush=True)
                context = int(context * CAPACITY_STEP) // 128 * 128
            finally:
                cache = None
                free()


def main() -> None:
    import torch._dynamo

    torch._dynamo.config.recompile_limit = 64  # several caches and batch sizes go through one model.forward
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--shapes", default="LLaMA-2-7B")
    ap.add_argument("--contexts", default="32768,131072")
    ap.add_argument("--stages", default="decode,ttft,capacity,throughput")
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--ttft-tokens", default="32768", help="prompt lengths of the ttft stage, comma-separated")
    ap.add_argument("--chunk", default="8192", help="KVQuant prefill chunk sizes for the ttft stage, comma-separated")
    ap.add_argument("--profile-chunk", type=int, default=0, help="ttft: profile the prefill at this chunk size (and fp16's)")
    ap.add_argument("--capacity", default="nuq2:2080000,nuq3-1%:1250000")
    ap.add_argument("--budget", type=float, default=1e9)
    ap.add_argument("--capacity-step", type=float, default=0.96)
    ap.add_argument("--ttft-once", action="store_true", help="ttft: one timed prefill per case after a short warm-up")
    ap.add_argument("--skip", default="", help="rows to leave out, e.g. quanto-int4:eager,kvquant-2:compiled")
    ap.add_argument("--ttft-window", type=int, default=0,
                    help="ttft: also KVQuant-3 with this exact recent window (the long-context preset: 128)")
    ap.add_argument("--no-cudagraph-trees", action="store_true",
                    help="inductor's plain CUDA graphs, not its graph trees (trace rows say which)")
    ap.add_argument("--compile-backend", default="inductor", choices=("inductor", "cudagraphs"),
                    help="cudagraphs: torch.compile's CUDA-graph backend without inductor (compiles in seconds)")
    args = ap.parse_args()
    global BACKEND
    BACKEND = args.compile_backend
    SKIP.update(filter(None, args.skip.split(",")))
    global TREES, TTFT_WINDOW
    TTFT_WINDOW = args.ttft_window
    TREES = not args.no_cudagraph_trees
    if not TREES:
        import torch._inductor.config

        torch._inductor.config.triton.cudagraph_trees = False
    global TTFT_ONCE
    TTFT_ONCE = args.ttft_once
    global CAPACITY_STEP
    CAPACITY_STEP = args.capacity_step
    args.out.mkdir(parents=True, exist_ok=True)
    run = Run(args.out, args.budget)
    contexts = [int(c) for c in args.contexts.split(",")]
    stages = args.stages.split(",")
    for shape in args.shapes.split(","):
        model = make_model(shape)
        configs = {b: kvquant_config(model, b, 0.0) for b in (2, 3, 4)}
        configs[3] = kvquant_config(model, 3, 0.01)  # KVQuant-3 is nuq3-1%
        configs[(3, 0.01)] = configs[3]
        for stage in stages:
            if run.left() < 30:
                break
            if stage == "decode":
                stage_decode(run, model, shape, contexts, args.steps, configs)
            elif stage == "profile":
                stage_profile(run, model, shape, contexts[0], 4, configs)
            elif stage == "trace":
                stage_trace(run, model, shape, contexts[0], 6, configs)
            elif stage == "ttft":
                prompts = [int(t) for t in args.ttft_tokens.split(",")]
                for tokens in prompts:  # the first prompt length is the one profiled
                    stage_ttft(run, model, shape, tokens, [int(c) for c in args.chunk.split(",")], configs,
                               args.profile_chunk if tokens == prompts[0] else 0)
            elif stage == "throughput":
                stage_throughput(run, model, shape, contexts[0], args.steps, configs)
            elif stage == "capacity":
                targets = [(n, int(c)) for n, c in (t.split(":") for t in args.capacity.split(","))]
                stage_capacity(run, model, shape, configs, targets)
        model = None
        free()
    run.save()


if __name__ == "__main__":
    main()
