"""Multi-GPU evidence: a LLaMA-2-7B-shaped model split over two GPUs with ``device_map="auto"``.

    PYTHONPATH=$PWD python benchmarks/multi_gpu.py --out runs/multi_gpu [--budget 330]
    python benchmarks/multi_gpu.py --dry-run --out /tmp/mg        # the same code on the CPU, tiny model
    python benchmarks/multi_gpu_report.py runs/multi_gpu/results.json   # -> docs/multi_gpu.md

Sections, each in a child process with its own time box (a CUDA error is sticky for a process, so one failing
section cannot take the others down), each writing what it got:

1. ``exactness``: random fp16 weights (seeded), generated on one GPU, then loaded with ``from_pretrained(...,
   device_map="auto", max_memory=...)`` so that the decoder layers are split about half per GPU. A left-padded
   batch of 2 is generated greedily with the default DynamicCache (control), and with
   ``cache_implementation="kvquant"`` on the reference path and on the Triton-kernel path
   (``cache_config={"config": cfg, "backend": "reference" | "triton"}``, nuq3-1%). Checks: the split model's
   tokens (and logits) equal the single GPU's for each path, every layer's cache tensors (the store's slot
   buffers, sink, outlier entries, recent window) live on that layer's execution device, and (Triton path) each
   kernel attention call ran with the current CUDA device equal to its tensors' device (Triton launches on the
   current device; a spy records both, without changing anything).
2. ``exactness_device_guard``, only when the Triton path failed on the split: the same check with a benchmark-
   side workaround (``KVQuantLayer.update``/``attend`` run under ``torch.cuda.device(<the layer's device>)``),
   to tell whether the failure is the kernels launching on the current device instead of the tensors' device.
3. ``capacity``: the longest context that fits for fp16 (DynamicCache), nuq3-1% and nuq2, with the model split
   over both GPUs: the length is picked from each GPU's free memory and the bytes per token of the layers it
   holds, the context is filled with synthetic K/V (KVQuant: pre-RoPE K/V through the real append path), and
   real decode steps of the whole model prove it; on out-of-memory the length backs off by 0.9x. Per-GPU peak
   memory (``torch.cuda.max_memory_allocated``) is recorded. If section 2 ran and the workaround fixed the
   Triton path, capacity runs with it too (recorded as ``device_guard``).

Writes ``OUT/results.json`` (environment, per-check results, per-format capacity with per-GPU memory),
``OUT/log.txt`` (everything printed) and ``OUT/sections/*.json``. ``--dry-run`` runs all of it on the CPU with a
4-layer LLaMA (hidden 128): ``device_map="auto"`` with a CPU budget of half the weights puts the other half on
"disk" (executed on the CPU by Accelerate's hooks), the Triton path runs in Triton's interpreter, contexts are
tiny, and the first capacity attempt raises a simulated out-of-memory error to exercise the back-off.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import functools
import gc
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from collections import Counter
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

import gpu_suite as gs
import torch

GiB = 2**30
EXACT_FORMAT = (3, 0.01)  # nuq3-1%
CAPACITY_FORMATS = ("fp16", (3, 0.01), (2, 0.0))
PATHS = ("dynamic", "reference", "triton")


def fmt_name(fmt) -> str:
    return "fp16" if fmt == "fp16" else gs.fmt_name(*fmt)


def now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).strftime("%H:%M:%S")


# ============================================================================================== setup
class Ctx:
    """What differs between the GPU run and the CPU dry run."""

    def __init__(self, dry_run: bool, out: Path, deadline: float):
        self.dry_run, self.out, self.deadline = dry_run, out, deadline
        self.batch, self.prompt_len, self.pad = (2, 24, 6) if dry_run else (2, 64, 16)
        self.new_tokens = 6 if dry_run else 16
        self.quantum = 16 if dry_run else 1024  # capacity lengths are multiples of this
        self.chunk = 64 if dry_run else 16384  # tokens per append call when filling a context
        self.margin = 0 if dry_run else int(2.5 * GiB)  # per-GPU room kept free beside the estimate

    def left(self) -> float:
        return self.deadline - time.time()


def ensure_package_layout() -> None:
    """``transformers_kvquant.kernels`` / ``.hub_configs`` are ``kernels/`` and ``hub_configs/`` at the repository
    root (an install maps them; a checkout on PYTHONPATH has symlinks). Without either, look in the root."""
    import transformers_kvquant

    try:
        import transformers_kvquant.kernels
    except ImportError:
        transformers_kvquant.__path__.append(str(REPO))
        import transformers_kvquant.kernels


def environment(dry_run: bool) -> dict:
    import accelerate

    env = gs.environment()
    env["accelerate"] = accelerate.__version__
    env["dry_run"] = dry_run
    env["gpus"] = [
        {"index": i, "name": torch.cuda.get_device_name(i), "memory_bytes": torch.cuda.get_device_properties(i).total_memory}
        for i in range(torch.cuda.device_count())
    ]
    return env


def tiny_config():
    """The dry run's model: a 4-layer LLaMA, hidden 128 (2 heads of 64, the kernels' smallest head size)."""
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=512, hidden_size=128, intermediate_size=256, num_hidden_layers=4, num_attention_heads=2,
                       num_key_value_heads=2, max_position_embeddings=4096, rope_theta=10000.0, torch_dtype="float16")


def build_single(ctx: Ctx):
    """The model on one device: seeded random fp16 weights (LLaMA-2-7B shape on cuda:0, tiny on the CPU)."""
    if ctx.dry_run:
        return gs.build_model(tiny_config(), device="cpu")
    return gs.build_model("llama2-7b", max_positions=2**23, device="cuda:0")


def load_split(ctx: Ctx, single) -> tuple:
    """``from_pretrained(None, state_dict=..., device_map="auto", max_memory=...)`` of the same weights.

    GPU: device 0 may hold half the weights plus 1.25 decoder layers (``infer_auto_device_map`` keeps one layer's
    room free on the first device, ``get_balanced_memory`` allows 1.25 layers above half): the embeddings and 16
    of 32 layers. Dry run: the same budget for the CPU, the rest goes to "disk" (run on the CPU by Accelerate).
    """
    from transformers import LlamaForCausalLM

    wbytes = gs.weight_bytes(single)
    layer_bytes = gs.weight_bytes(single.model.layers[0])
    if ctx.dry_run:
        max_memory = {"cpu": int(wbytes * 0.5 + layer_bytes * 1.25)}
    else:
        second = torch.cuda.get_device_properties(1).total_memory if torch.cuda.device_count() > 1 else 0
        max_memory = {0: int(wbytes * 0.5 + layer_bytes * 1.25), 1: int(second - 4 * GiB)}
    kw = dict(config=single.config, state_dict=single.state_dict(), device_map="auto", max_memory=max_memory,
              dtype=torch.float16, attn_implementation="sdpa")
    if ctx.dry_run:
        kw["offload_folder"] = tempfile.mkdtemp(prefix="mg_offload_")
    info = {"max_memory": {str(k): v for k, v in max_memory.items()}}
    try:
        model = LlamaForCausalLM.from_pretrained(None, **kw).eval()
        info["load"] = "from_pretrained(None, state_dict=..., device_map='auto', max_memory=...)"
    except Exception as e:  # noqa: BLE001 - the same placement through Accelerate directly (moves `single`)
        from accelerate import dispatch_model, infer_auto_device_map
        from accelerate.utils import get_balanced_memory

        no_split = single._no_split_modules
        balanced = get_balanced_memory(single, max_memory=max_memory, no_split_module_classes=no_split)
        device_map = infer_auto_device_map(single, max_memory=balanced, no_split_module_classes=no_split)
        model = dispatch_model(single, device_map=device_map, offload_dir=kw.get("offload_folder")).eval()
        info["load"] = f"accelerate get_balanced_memory + infer_auto_device_map + dispatch_model (from_pretrained failed: {type(e).__name__}: {e})"
    return model, info


def execution_device(module) -> torch.device:
    """Where Accelerate runs ``module`` (its hook's execution device), else where its parameters are."""
    hook = getattr(module, "_hf_hook", None)
    for h in getattr(hook, "hooks", [hook]):
        dev = getattr(h, "execution_device", None)
        if dev is not None:
            return torch.device(dev)
    return next(module.parameters()).device


def describe_split(model) -> dict:
    layer_devs = [execution_device(layer) for layer in model.model.layers]
    weights = Counter()
    for p in model.parameters():
        if p.device.type != "meta":
            weights[str(p.device)] += p.numel() * p.element_size()
    device_map = {k: str(v) for k, v in (getattr(model, "hf_device_map", None) or {}).items()}
    return {
        "layer_devices": [str(d) for d in layer_devs],
        "layers_per_map_entry": dict(Counter(v for k, v in device_map.items() if k.startswith("model.layers."))),
        "layers_per_device": dict(Counter(str(d) for d in layer_devs)),
        "embed_device": str(execution_device(model.model.embed_tokens)),
        "lm_head_device": str(execution_device(model.lm_head)),
        "weights_bytes_per_device": dict(weights),
        "hf_device_map": device_map,
    }


def model_devices(model) -> tuple[list, list]:
    """(per-layer execution devices, all devices with the embeddings' first) of a split model."""
    layer_devs = [execution_device(layer) for layer in model.model.layers]
    devs = [execution_device(model.model.embed_tokens)]
    for d in layer_devs + [execution_device(model.lm_head)]:
        if d not in devs:
            devs.append(d)
    return layer_devs, devs


def install_device_guard() -> None:
    """Benchmark-side workaround (not the shipped library): run ``KVQuantLayer.update`` / ``attend`` with the
    current CUDA device set to the device of the tensors they get, so Triton launches on that device."""
    from transformers_kvquant.integration.cache import KVQuantLayer

    def guarded(fn, arg):
        @functools.wraps(fn)
        def inner(self, *args, **kwargs):
            dev = args[arg].device
            with torch.cuda.device(dev) if dev.type == "cuda" else contextlib.nullcontext():
                return fn(self, *args, **kwargs)

        inner._device_guard = True
        return inner

    if not getattr(KVQuantLayer.update, "_device_guard", False):
        KVQuantLayer.update = guarded(KVQuantLayer.update, 0)  # update(key_states, value_states, ...)
        KVQuantLayer.attend = guarded(KVQuantLayer.attend, 1)  # attend(module, query, ...)


class LaunchDeviceSpy:
    """Observation only: for each kernel-path attention call, the query's device and the current CUDA device
    (Triton launches on the current device, whatever device the tensors are on)."""

    def __init__(self):
        import transformers_kvquant.integration.kernel_dispatch as kd

        self.kd, self.original, self.seen = kd, kd.fused_attention, Counter()

        def spy(layer, module, query, *args, **kwargs):
            current = f"cuda:{torch.cuda.current_device()}" if query.is_cuda else str(query.device)
            self.seen[(str(query.device), current)] += 1
            return self.original(layer, module, query, *args, **kwargs)

        kd.fused_attention = spy  # cache.py imports it from the module at call time

    def report(self) -> dict:
        self.kd.fused_attention = self.original
        calls = {f"query on {q}, current device {c}": n for (q, c), n in self.seen.items()}
        return {"calls": calls, "all_on_query_device": all(q == c for q, c in self.seen)}


def free_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            with torch.cuda.device(i):
                torch.cuda.empty_cache()


def cuda_indices(devs) -> list[int]:
    return sorted({torch.device(d).index or 0 for d in devs if torch.device(d).type == "cuda"})


# ============================================================================================== exactness
def prompt(ctx: Ctx) -> tuple:
    """A left-padded random batch (row 1 shorter by ``ctx.pad`` tokens); pad id 0, real ids >= 3."""
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, 32000 if not ctx.dry_run else 512, (ctx.batch, ctx.prompt_len), generator=g)
    mask = torch.ones_like(ids)
    ids[1, : ctx.pad] = 0
    mask[1, : ctx.pad] = 0
    return ids, mask


@torch.no_grad()
def generate(model, ids, mask, path: str, cfg, new_tokens: int) -> dict:
    """Greedy generation; ``path`` is "dynamic" (default cache) or a KVQuant backend ("reference"/"triton")."""
    kw = {} if path == "dynamic" else {"cache_implementation": "kvquant", "cache_config": {"config": cfg, "backend": path}}
    dev = execution_device(model.model.embed_tokens)
    t0 = time.time()
    out = model.generate(input_ids=ids.to(dev), attention_mask=mask.to(dev), max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                         do_sample=False, pad_token_id=0, output_logits=True, return_dict_in_generate=True, **kw)
    return {"tokens": out.sequences.cpu(), "logits": torch.stack([x.float().cpu() for x in out.logits]), "cache": out.past_key_values,
            "seconds": round(time.time() - t0, 2)}


STORE_SIDE_TENSORS = ("sink_keys", "sink_values", "sink_slot", "key_entry_values", "key_entry_channels", "key_nnz", "window_keys", "window_values")


def cache_placement(cache, layer_devs) -> dict:
    """Per layer: the store's tensors that are not on that layer's execution device."""
    misplaced, counted = {}, 0
    for i, (layer, want) in enumerate(zip(cache.layers, layer_devs, strict=True)):
        store = layer.store
        tensors = dict(store.buffers.tensors)
        tensors.update({n: getattr(store, n) for n in STORE_SIDE_TENSORS if hasattr(store, n)})
        counted += len(tensors)
        wrong = [f"{n}@{t.device}" for n, t in tensors.items() if t.device != want]
        if wrong:
            misplaced[i] = wrong
    return {"ok": not misplaced and counted > 0, "tensors_checked": counted, "misplaced": misplaced,
            "store_devices": [str(layer.store.device) for layer in cache.layers]}


def section_exactness(ctx: Ctx, rec: dict, save, say, paths=PATHS, guard: bool = False) -> None:
    if guard:
        install_device_guard()
        rec["device_guard"] = "KVQuantLayer.update/attend under torch.cuda.device(<layer device>) (benchmark workaround)"
    single = build_single(ctx)
    cfg = gs.kvquant_config(single, *EXACT_FORMAT)
    ids, mask = prompt(ctx)
    rec["setup"] = {"model": "tiny LLaMA (dry run)" if ctx.dry_run else "LLaMA-2-7B shape, random fp16 weights (seed 0)",
                    "format": fmt_name(EXACT_FORMAT), "batch": ctx.batch, "prompt_tokens": ctx.prompt_len,
                    "left_padding_row1": ctx.pad, "new_tokens": ctx.new_tokens, "decoding": "greedy",
                    "single_device": str(next(single.parameters()).device)}
    say(f"single-device model built ({gs.weight_bytes(single) / GiB:.2f} GiB); config {fmt_name(EXACT_FORMAT)}")
    reference = {}
    for path in paths:
        try:
            r = generate(single, ids, mask, path, cfg, ctx.new_tokens)
            reference[path] = r
            say(f"single {path}: {r['seconds']}s")
        except Exception as e:  # noqa: BLE001 - the split run of this path is then compared with nothing
            reference[path] = {"error": f"{type(e).__name__}: {e}"}
            say(f"single {path} FAILED: {e!r}")
    if "triton" in reference and "reference" in reference and "tokens" in reference["triton"] and "tokens" in reference["reference"]:
        rec["single_triton_equals_reference_tokens"] = bool(torch.equal(reference["triton"]["tokens"], reference["reference"]["tokens"]))
    for r in reference.values():
        r.pop("cache", None)
    split, info = load_split(ctx, single)
    del single
    free_memory()
    rec["split"] = {**info, **describe_split(split)}
    layer_devs, _ = model_devices(split)
    say(f"split loaded: layers per device {rec['split']['layers_per_device']} (device_map {rec['split']['layers_per_map_entry']}), weights per device "
        f"{ {k: round(v / GiB, 2) for k, v in rec['split']['weights_bytes_per_device'].items()} }")
    rec["checks"] = []
    save()
    for path in paths:
        row = {"path": path, "cache": "DynamicCache (fp16)" if path == "dynamic" else f"KVQuantCache {fmt_name(EXACT_FORMAT)}, backend={path!r}"}
        rec["checks"].append(row)
        if "error" in reference[path]:
            row.update(ok=False, error=f"single-device run failed: {reference[path]['error']}")
            continue
        if ctx.left() < 10:
            row.update(ok=False, status="skipped (time box)")
            continue
        row["status"] = "running"  # stays if this process dies here (a crash in a kernel)
        save()
        try:
            spy = LaunchDeviceSpy() if path == "triton" else None
            try:
                r = generate(split, ids, mask, path, cfg, ctx.new_tokens)
            finally:
                if spy is not None:
                    row["kernel_launch_devices"] = spy.report()
            ref = reference[path]
            row["tokens_equal_single_device"] = bool(torch.equal(r["tokens"], ref["tokens"]))
            row["max_abs_logit_diff"] = float((r["logits"] - ref["logits"]).abs().max()) if r["logits"].shape == ref["logits"].shape else None
            row["finite_logits"] = bool(torch.isfinite(r["logits"]).all())
            row["seconds_single"], row["seconds_split"] = ref["seconds"], r["seconds"]
            row["generated_row0"] = r["tokens"][0, ids.shape[1]:].tolist()
            ok = row["tokens_equal_single_device"] and row["finite_logits"]
            if path != "dynamic":
                row["placement"] = cache_placement(r["cache"], layer_devs)
                row["uses_kernels"] = [bool(layer.uses_kernels) for layer in r["cache"].layers]
                ok = ok and row["placement"]["ok"]
                if path == "triton":
                    # Kernels running on another device than their tensors' would read them over NVLink, unordered
                    # with that device's stream: a failure even when the tokens happen to match.
                    ok = ok and row["kernel_launch_devices"]["all_on_query_device"] and (ctx.dry_run or all(row["uses_kernels"]))
            row["ok"] = ok
            row.pop("status")
            del r
            say(f"split {path}: tokens equal single device {row['tokens_equal_single_device']}, max|dlogit| "
                f"{row['max_abs_logit_diff']}, cache on layer devices {row.get('placement', {}).get('ok', '-')}"
                + (f", kernel launches {row['kernel_launch_devices']['calls']}" if "kernel_launch_devices" in row else "")
                + f" -> {'OK' if ok else 'FAIL'}")
        except Exception as e:  # noqa: BLE001
            row.update(ok=False, status="failed", error=f"{type(e).__name__}: {e}", traceback=traceback.format_exc()[-3000:])
            say(f"split {path} FAILED: {e!r}")
        save()
    rec["ok"] = all(row.get("ok") for row in rec["checks"]) and len(rec["checks"]) == len(paths)


# ============================================================================================== capacity
def per_device_bytes(cache, layer_devs, fp16: bool) -> dict:
    """Cache bytes held on each device (KVQuant: the store's real bytes; fp16: the K and V tensors)."""
    from transformers_kvquant.quant.memory import store_report

    out = Counter()
    for layer, dev in zip(cache.layers, layer_devs, strict=True):
        if fp16:
            out[str(dev)] += layer.keys.numel() * layer.keys.element_size() * 2
        elif layer.store is not None:
            out[str(dev)] += store_report(layer.store).total_bytes
    return dict(out)


def candidate_length(ctx: Ctx, model, fmt, layer_devs) -> tuple[int, dict]:
    """The longest context the free memory of every device holds: the bytes per token of the layers a device
    holds, plus per-token workspace (the kernels' fp32 scores; for fp16 the torch.cat copy of one layer's K)."""
    c = model.config
    layers = len(layer_devs)
    per_token = gs.kv_bytes_per_token(model, fmt)
    if fmt != "fp16":
        # Beside kv_bytes_per_token: key_outlier_begin (int32), and room for the key-outlier entry buffers, which
        # grow by 1.5x (up to half of the ~s entries of 4 bytes a token may be allocated but unused).
        s = gs.outlier_slots(fmt[1], c.num_key_value_heads * (c.hidden_size // c.num_attention_heads))
        per_token += layers * (4 + 0.5 * s * 4)
    head_dim = c.hidden_size // c.num_attention_heads
    scratch = 4 * c.num_attention_heads + (2 * c.num_key_value_heads * head_dim if fmt == "fp16" else 0)
    share = Counter(layer_devs)
    if ctx.dry_run:
        return 256, {"per_token": per_token, "note": "dry run: fixed length"}
    est = {}
    for dev, n in share.items():
        free, _ = torch.cuda.mem_get_info(dev)
        need = per_token * n / layers + scratch
        est[str(dev)] = {"free_bytes": free, "layers": n, "bytes_per_token": need, "tokens": int((free - ctx.margin) / need)}
    length = min(e["tokens"] for e in est.values()) // ctx.quantum * ctx.quantum
    return length, est


def key_spread(fmt) -> float:
    """Synthetic keys' std in units of the calibrated range: a 1% calibration clips at the 99.5th percentile, so
    Gaussian keys with std 1/z(0.995) leave 1% of entries outside (stored as key outliers, as real keys would)."""
    from statistics import NormalDist

    fraction = fmt[1]
    return 1 / NormalDist().inv_cdf(1 - fraction / 2) if fraction else 0.6


@torch.no_grad()
def capacity_format(ctx: Ctx, model, fmt, deadline: float, say) -> dict:
    layer_devs, devs = model_devices(model)
    cuda = cuda_indices(devs)
    fp16 = fmt == "fp16"
    cfg = None if fp16 else gs.kvquant_config(model, *fmt)
    free_memory()
    length, estimate = candidate_length(ctx, model, fmt, layer_devs)
    row = {"format": fmt_name(fmt), "bytes_per_token": gs.kv_bytes_per_token(model, fmt), "estimate": estimate, "candidate": length}
    say(f"capacity {row['format']}: candidate {length:,} tokens ({row['bytes_per_token']:,.0f} B/token over all layers)")
    for attempt in range(6):
        if time.time() > deadline - 5 or length < ctx.quantum:
            row.setdefault("status", "skipped (time box)")
            break
        cache = None
        try:
            free_memory()
            for i in cuda:
                torch.cuda.reset_peak_memory_stats(i)
            t0 = time.time()
            if ctx.dry_run and attempt == 0 and fmt == CAPACITY_FORMATS[0]:
                raise torch.OutOfMemoryError("simulated out of memory (dry run: exercises the back-off)")
            if fp16:
                cache = gs.fill_dynamic(model, 1, length, layer_devices=layer_devs)
            else:
                cache = gs.fill_kvquant(model, cfg, 1, length, extra=8, chunk=ctx.chunk, layer_devices=layer_devs, key_spread=key_spread(fmt))
            gs.synchronize(devs)
            fill_s = time.time() - t0
            fill_peak = {str(torch.device("cuda", i)): torch.cuda.max_memory_allocated(i) for i in cuda}
            resident = {str(torch.device("cuda", i)): torch.cuda.memory_allocated(i) for i in cuda}
            steps = gs.decode_steps(model, cache, 1, steps=3, warmup=1, devices=devs)
            cache_bytes = per_device_bytes(cache, layer_devs, fp16)
            cached = cache.get_seq_length()  # the context plus the decoded tokens
            row.update(context=length, cached_tokens=cached, fill_s=round(fill_s, 1), cache_bytes_per_device=cache_bytes,
                       cache_bytes=sum(cache_bytes.values()), bytes_per_token_measured=sum(cache_bytes.values()) / cached,
                       fill_peak_bytes_per_device=fill_peak, resident_after_fill_bytes_per_device=resident, **steps)
            if not fp16:
                rep = cache.memory_report()
                entries = sum(int(layer.store.key_nnz.sum()) for layer in cache.layers)
                c = model.config
                row.update(avg_bits=rep.avg_bits, uses_kernels=all(layer.uses_kernels for layer in cache.layers), key_spread=key_spread(fmt),
                           key_outlier_fraction=entries / (cached * len(cache.layers) * c.num_key_value_heads * (c.hidden_size // c.num_attention_heads)))
            row.pop("status", None)
            break
        except torch.OutOfMemoryError as e:
            row.setdefault("out_of_memory_at", []).append(length)
            row["status"] = "out of memory"
            say(f"capacity {row['format']}: out of memory at {length:,} tokens ({str(e).splitlines()[0][:160]}); backing off 0.9x")
            length = int(length * 0.9) // ctx.quantum * ctx.quantum
        finally:
            del cache
            free_memory()
    if "context" in row:
        peaks = {k: round(v / GiB, 2) for k, v in row.get("peak_bytes_per_device", {}).items()}
        say(f"capacity {row['format']}: {row['context']:,} tokens, {row['ms_per_token']:.1f} ms/token, fill {row['fill_s']}s, "
            f"peak GiB per GPU {peaks}, finite logits {row['finite_logits']}")
    return row


def section_capacity(ctx: Ctx, rec: dict, save, say, guard: bool = False) -> None:
    rec["device_guard"] = bool(guard)
    if guard:
        install_device_guard()
    single = build_single(ctx)
    wbytes = gs.weight_bytes(single)  # all of them (a dry run's disk-offloaded ones are on "meta" after the split)
    model, info = load_split(ctx, single)
    del single
    free_memory()
    rec["split"] = {**info, **describe_split(model)}
    rec["weight_bytes"] = wbytes
    say(f"split loaded: layers per device {rec['split']['layers_per_device']} (device_map {rec['split']['layers_per_map_entry']})")
    rec["rows"] = []
    save()
    for i, fmt in enumerate(CAPACITY_FORMATS):
        if ctx.left() < 15:
            rec["rows"].append({"format": fmt_name(fmt), "status": "skipped (time box)"})
            continue
        # An even share of what is left (at least 15 s): time a format does not use passes on to the next.
        share = max(ctx.left() / (len(CAPACITY_FORMATS) - i), 15)
        rec["rows"].append({"format": fmt_name(fmt), "status": "running"})  # stays if this process dies here
        save()
        try:
            rec["rows"][-1] = capacity_format(ctx, model, fmt, min(time.time() + share, ctx.deadline), say)
        except Exception as e:  # noqa: BLE001 - one format failing must not lose the others
            rec["rows"][-1].update(status=f"failed: {type(e).__name__}: {e}", traceback=traceback.format_exc()[-3000:])
            say(f"capacity {fmt_name(fmt)} FAILED: {e!r}")
        save()


SECTIONS = {"exactness": section_exactness, "capacity": section_capacity}


# ============================================================================================== processes
def child_main(args) -> int:
    """One section in this process: writes OUT/sections/<record>.json as it goes; prints progress."""
    if args.dry_run:
        os.environ["TRITON_INTERPRET"] = "1"  # the kernels run in Triton's interpreter on the CPU
    ensure_package_layout()
    import transformers

    import transformers_kvquant  # noqa: F401  (registers cache_implementation="kvquant")

    transformers.utils.logging.disable_progress_bar()

    ctx = Ctx(args.dry_run, args.out, args.deadline)
    name = args.record or args.section
    path = args.out / "sections" / f"{name}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    rec = {"status": "running", "started": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
    t0 = time.time()

    def save():
        rec["elapsed_s"] = round(time.time() - t0, 1)
        path.write_text(json.dumps(rec, indent=1, default=str))

    def say(msg):
        print(f"[{now()}] [{name}] {msg}", flush=True)

    try:
        rec["env"] = environment(args.dry_run)
        kw = {"guard": args.device_guard}
        if args.section == "exactness":
            kw["paths"] = tuple(args.paths.split(","))
        SECTIONS[args.section](ctx, rec, save, say, **kw)
        rec["status"] = "ok"
    except Exception as e:  # noqa: BLE001
        rec["status"] = "failed"
        rec["error"] = f"{type(e).__name__}: {e}"
        rec["traceback"] = traceback.format_exc()[-4000:]
        say(f"FAILED: {rec['error']}\n{rec['traceback']}")
    save()
    return 0


class Runner:
    """The parent: runs the sections as child processes, logs everything, merges their JSON."""

    def __init__(self, args):
        self.args, self.out = args, args.out
        self.out.mkdir(parents=True, exist_ok=True)
        self.log_file = open(self.out / "log.txt", "w")
        self.t_end = time.time() + args.budget
        self.results = {"dry_run": args.dry_run, "budget_s": args.budget,
                        "date_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                        "command": " ".join([Path(sys.executable).name, *sys.argv]), "sections": {}}

    def echo(self, line: str) -> None:
        print(line, flush=True)
        self.log_file.write(line + "\n")
        self.log_file.flush()

    def say(self, msg: str) -> None:
        self.echo(f"[{now()}] {msg}")

    def save(self) -> None:
        (self.out / "results.json").write_text(json.dumps(self.results, indent=1, default=str))

    def run(self, section: str, box: float, record: str | None = None, paths: str | None = None, guard: bool = False) -> dict:
        record = record or section
        box = max(5.0, min(box, self.t_end - time.time()))
        deadline = time.time() + box
        grace = 20 if self.args.dry_run else 45
        cmd = [sys.executable, str(Path(__file__).resolve()), "--section", section, "--record", record, "--out", str(self.out),
               "--deadline", f"{deadline:.1f}"]
        cmd += ["--dry-run"] if self.args.dry_run else []
        cmd += ["--paths", paths] if paths else []
        cmd += ["--device-guard"] if guard else []
        sec_file = self.out / "sections" / f"{record}.json"
        sec_file.unlink(missing_ok=True)
        self.say(f"== {record}: child process, time box {box:.0f}s (killed {grace}s after)")
        t0 = time.time()
        proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1)
        killer = threading.Timer(box + grace, proc.kill)
        killer.start()
        try:
            for line in proc.stdout:
                self.echo(line.rstrip("\n"))
            code = proc.wait()
        finally:
            killer.cancel()
        try:
            rec = json.loads(sec_file.read_text())
        except Exception as e:  # noqa: BLE001
            rec = {"status": "failed", "error": f"no result ({type(e).__name__})"}
        if code != 0:
            rec["exit_code"] = code
            if rec.get("status") in (None, "running"):
                rec["status"] = "failed"
                rec.setdefault("error", f"child exited with {code} (killed after the time box, or crashed)")
        rec["wall_s"] = round(time.time() - t0, 1)
        self.results["sections"][record] = rec
        if "env" in rec:
            self.results.setdefault("env", rec["env"])
        self.save()
        self.say(f"== {record}: {rec.get('status')} in {rec['wall_s']}s" + (f" ({rec['error']})" if rec.get("error") else ""))
        return rec


def triton_failed(rec: dict) -> bool:
    """Whether the split Triton check ran (or started) and failed: a reason to try the device guard."""
    rows = [r for r in rec.get("checks", []) if r.get("path") == "triton"]
    return bool(rows) and not rows[0].get("ok") and rows[0].get("status") != "skipped (time box)" and "single-device" not in rows[0].get("error", "")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, type=Path)
    ap.add_argument("--budget", type=float, default=330.0, help="seconds for the whole run (soft time boxes; a child overrunning its box is killed 45 s later)")
    ap.add_argument("--dry-run", action="store_true", help="the same code on the CPU with a tiny model")
    ap.add_argument("--section", choices=sorted(SECTIONS), help=argparse.SUPPRESS)  # child process mode
    ap.add_argument("--record", help=argparse.SUPPRESS)
    ap.add_argument("--deadline", type=float, help=argparse.SUPPRESS)
    ap.add_argument("--paths", default=",".join(PATHS), help=argparse.SUPPRESS)
    ap.add_argument("--device-guard", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.section:
        return child_main(args)

    r = Runner(args)
    r.say(f"multi-GPU run: budget {args.budget:.0f}s, out {args.out}, dry run {args.dry_run}")
    if not args.dry_run:
        n = torch.cuda.device_count()
        r.say(f"CUDA devices: {n}" + ("" if n >= 2 else "  WARNING: fewer than 2 GPUs, the model cannot be split"))
    b = args.budget
    exact = r.run("exactness", 0.36 * b)
    guard = False
    if triton_failed(exact) and r.t_end - time.time() > 0.5 * b:
        fixed = r.run("exactness", 0.16 * b, record="exactness_device_guard", paths="triton", guard=True)
        guard = not triton_failed(fixed)
        r.say(f"Triton path on the split failed as shipped; with the device guard: {'OK' if guard else 'still failing'}"
              + ("; capacity runs with the guard" if guard else ""))
    r.run("capacity", r.t_end - time.time() - 5, guard=guard)
    r.results["total_s"] = round(time.time() - (r.t_end - args.budget), 1)
    r.save()
    for line in summary(r.results):
        r.echo(line)
    return 0


def summary(res: dict) -> list[str]:
    env = res.get("env", {})
    lines = ["", "SUMMARY " + json.dumps({"gpus": [g["name"] for g in env.get("gpus", [])], **{k: env.get(k) for k in ("torch", "transformers", "triton", "accelerate")}, "dry_run": res["dry_run"], "total_s": res.get("total_s")})]
    for name, rec in res["sections"].items():
        lines.append(f"{name}: {rec.get('status')} ({rec.get('wall_s')}s){'  ' + rec['error'] if rec.get('error') else ''}")
        if "split" in rec:
            lines.append(f"  split: layers per execution device {rec['split'].get('layers_per_device')}, per device_map entry "
                         f"{rec['split'].get('layers_per_map_entry')}")
        for row in rec.get("checks", []):
            lines.append(f"  {row['path']:9s} tokens==single {row.get('tokens_equal_single_device')} max|dlogit| {row.get('max_abs_logit_diff')} "
                         f"placement {row.get('placement', {}).get('ok', '-')}"
                         + (f" launches {row['kernel_launch_devices']['calls']}" if "kernel_launch_devices" in row else "")
                         + f" -> {'OK' if row.get('ok') else 'FAIL'}"
                         + (f"  {row.get('error') or row.get('status')}" if row.get("error") or row.get("status") else ""))
        for row in rec.get("rows", []):
            if "context" in row:
                peaks = {k: round(v / GiB, 2) for k, v in row.get("peak_bytes_per_device", {}).items()}
                extra = f"  key outliers {row['key_outlier_fraction']:.2%}" if "key_outlier_fraction" in row else ""
                lines.append(f"  {row['format']:8s} {row['context']:>10,} tokens  {row['bytes_per_token_measured']:>9,.0f} B/token  "
                             f"{row['ms_per_token']:.1f} ms/token  peak GiB {peaks}  OOM at {row.get('out_of_memory_at', [])}{extra}")
            else:
                lines.append(f"  {row['format']:8s} {row.get('status')}")
    return lines


if __name__ == "__main__":
    raise SystemExit(main())
