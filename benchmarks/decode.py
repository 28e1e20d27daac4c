"""Decode attention: the packed-cache kernel against fp16 SDPA in the same run, and the append kernel's cost.

    python benchmarks/decode.py --out runs/decode [--contexts 8192,32768,131072,524288] [--batches 1,8]
        [--shapes MHA,GQA,SmolLM2] [--formats nuq4,nuq3,nuq3-1%,nuq2] [--budget 300]

One attention layer, one query per row, every call captured in a CUDA graph and timed on its own after an L2 flush
(a 256 MiB write), median of ``--reps``. fp16: ``scaled_dot_product_attention`` over fp16 K/V of the context,
the fastest of the cuDNN, flash and efficient backends that run the shape. KVQuant: the three decode launches over a
packed cache of that context (random codes, ranges and outliers: the kernels' cost does not depend on the values).
For each call: microseconds, the bytes the call must read (fp16: K and V; packed: codes, ranges, outliers and
positions), the achieved GB/s on them, and that as a fraction of the copy bandwidth measured in the same run. The
append (quantize + pack one token per row) is timed at 32K against the decode of the same cache.

Writes ``decode.jsonl`` (one row per call, as it goes: a time limit still leaves results) and ``decode.json``
(``{"decode": [{"shape", "batch", "context", "format", "fp16_us", "kvquant_us", ...}], "append": [...]}``).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

SHAPES = {  # name: (query heads, KV heads, head_dim)
    "MHA 32x128": (32, 32, 128),
    "GQA 32q/8kv x128": (32, 8, 128),
    "SmolLM2 9q/3kv x64": (9, 3, 64),
}
ALIASES = {"MHA": "MHA 32x128", "GQA": "GQA 32q/8kv x128", "SmolLM2": "SmolLM2 9q/3kv x64"}


def parse_format(name: str) -> tuple[int, float]:
    """``nuq3-1%`` -> (3, 0.01)."""
    bits, _, pct = name.removeprefix("nuq").partition("-")
    return int(bits), (float(pct.rstrip("%")) / 100 if pct else 0.0)


class Timer:
    """Times a CUDA graph of ``fn`` after an L2 flush, median of ``reps`` replays (microseconds)."""

    def __init__(self, reps: int):
        self.reps = reps
        self.flush = torch.empty(256 * 2**20, dtype=torch.uint8, device="cuda")

    def __call__(self, fn) -> float:
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(2):
                fn()  # warm up (compiles) outside the capture
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            fn()
        times = []
        for _ in range(self.reps):
            self.flush.zero_()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            graph.replay()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) * 1000)
        del graph
        times.sort()
        return times[len(times) // 2]


def copy_bandwidth(timer: Timer) -> float:
    """GB/s of a 4 GiB device-to-device copy (bytes read plus written), in the same run."""
    a = torch.empty(2 * 2**30, dtype=torch.uint8, device="cuda")
    b = torch.empty_like(a)
    us = timer(lambda: b.copy_(a))
    return 2 * 2 * 2**30 / us / 1e3


def fp16_sdpa(hq, hkv, d, batch, context, timer):
    """(µs, backend, bytes) of the fastest SDPA backend on fp16 K/V ``[B, Hkv, L, D]``."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    q = torch.randn(batch, hq, 1, d, device="cuda", dtype=torch.float16)
    k = torch.randn(batch, hkv, context, d, device="cuda", dtype=torch.float16)
    v = torch.randn_like(k)
    best = (math.inf, None)
    for backend in (SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION):
        try:
            with sdpa_kernel([backend]):
                us = timer(lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v, enable_gqa=hq != hkv))
        except RuntimeError:
            continue
        best = min(best, (us, backend.name))
    return best[0], best[1], k.nbytes + v.nbytes


def kvquant_decode(hq, hkv, d, batch, context, fmt, timer):
    """(µs, bytes) of the packed-cache decode (three launches) at ``context`` tokens."""
    from transformers_kvquant.kernels.decode import decode_attention
    from transformers_kvquant.kernels.layout import (
        kernel_constants,
        nbytes,
        outlier_slots,
    )
    from transformers_kvquant.kernels.rope import rope_inv_freq
    from transformers_kvquant.kernels.synthetic import random_cache

    from transformers_kvquant.kernels.layout import block_size

    bits, fraction = parse_format(fmt)
    cache = random_cache(batch, hkv, d, bits, context, outliers=outlier_slots(d, fraction), sink_tokens=1, device="cuda", seed=1)
    consts = kernel_constants(cache, rope_inv_freq(d).cuda(), block_size(bits))
    q = torch.randn(batch, hq, d, device="cuda") * 0.1
    us = timer(lambda: decode_attention(q, cache, consts))
    return us, sum(v for k, v in nbytes(cache, context).items() if k not in ("sink", "length"))


def splits_sweep(spec: str, counts: list[int], timer) -> list[dict]:
    """µs of the decode at each split count in ``counts`` and at the launcher's own choice, for each case of ``spec``
    (``shape:batch:context:format`` separated by commas): the data behind the split rule (docs/kernels.md)."""
    from transformers_kvquant.kernels.layout import block_size
    from transformers_kvquant.kernels.decode import decode_attention, planned_splits
    from transformers_kvquant.kernels.layout import kernel_constants, outlier_slots
    from transformers_kvquant.kernels.rope import rope_inv_freq
    from transformers_kvquant.kernels.synthetic import random_cache

    rows = []
    for case in spec.split(","):
        shape, batch, context, fmt = case.split(":")
        shape, batch, context = ALIASES.get(shape, shape), int(batch), int(context)
        hq, hkv, d = SHAPES[shape]
        bits, fraction = parse_format(fmt)
        cache = random_cache(batch, hkv, d, bits, context, outliers=outlier_slots(d, fraction), sink_tokens=1, device="cuda", seed=1)
        consts = kernel_constants(cache, rope_inv_freq(d).cuda(), block_size(bits))
        q = torch.randn(batch, hq, d, device="cuda") * 0.1
        auto_us = timer(lambda: decode_attention(q, cache, consts))  # its first launch also sets the rule's occupancy
        row = {"shape": shape, "batch": batch, "context": context, "format": fmt,
               "auto_splits": planned_splits(cache, hq // hkv, block_size(bits)), "auto_us": round(auto_us, 2), "us_by_splits": {}}
        for n in counts:
            if n <= context // block_size(bits):
                row["us_by_splits"][n] = round(timer(lambda: decode_attention(q, cache, consts, n_splits=n)), 2)
        best = min(row["us_by_splits"].items(), key=lambda kv: kv[1])
        row["best_splits"], row["best_us"] = best
        print("splits", json.dumps(row), flush=True)
        rows.append(row)
        del cache
        torch.cuda.empty_cache()
    return rows


def append_cost(hq, hkv, d, batch, context, fmt, timer):
    """(append µs, decode µs) of one new token per row into a cache of ``context`` tokens."""
    from transformers_kvquant.kernels import append as append_module
    from transformers_kvquant.kernels.append import append_slots
    from transformers_kvquant.kernels.decode import decode_attention
    from transformers_kvquant.kernels.layout import kernel_constants, outlier_slots
    from transformers_kvquant.kernels.rope import rope_inv_freq
    from transformers_kvquant.kernels.synthetic import random_cache

    from transformers_kvquant.kernels.layout import block_size

    bits, fraction = parse_format(fmt)
    cache = random_cache(batch, hkv, d, bits, context, outliers=outlier_slots(d, fraction), capacity=context + 128,
                         sink_tokens=1, device="cuda", seed=2)
    k = torch.randn(batch, hkv, 1, d, device="cuda", dtype=torch.float16)
    v = torch.randn_like(k)
    pos = torch.full((batch, 1), context, device="cuda", dtype=torch.int32)

    def append():
        append_slots(cache, k, v, pos)  # does not advance the length: every replay writes the same slot

    # a decode step's append is this launch and the device length's advance (one tensor op), timed apart
    by_warps = {}
    for w in (1, 2, 4, 8):
        append_module.STEP_WARPS = w
        by_warps[w] = round(timer(append), 2)
    append_module.STEP_WARPS = 0
    slots_us = timer(append)
    advance_us = timer(lambda: cache.length.add_(1))
    cache.length.fill_(context)
    append_us = slots_us + advance_us
    consts = kernel_constants(cache, rope_inv_freq(d).cuda(), block_size(bits))
    q = torch.randn(batch, hq, d, device="cuda") * 0.1
    decode_us = timer(lambda: decode_attention(q, cache, consts))
    return append_us, decode_us, by_warps, advance_us


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--contexts", default="4096,8192,32768,131072,524288")
    ap.add_argument("--batches", default="1,8")
    ap.add_argument("--shapes", default="MHA,GQA,SmolLM2")
    ap.add_argument("--formats", default="nuq4,nuq3,nuq3-1%,nuq2")
    ap.add_argument("--reps", type=int, default=15)
    ap.add_argument("--budget", type=float, default=1e9, help="seconds; later cases are skipped past it")
    ap.add_argument("--sweep", default="", help="split-count sweep first: shape:batch:context:format,... (e.g. MHA:1:131072:nuq3-1%%)")
    ap.add_argument("--append-only", action="store_true", help="the append rows only (no decode grid)")
    ap.add_argument("--sweep-splits", default="1,2,4,8,12,16,17,24,32,33,48,66,132")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    start = time.time()
    timer = Timer(args.reps)
    copy = copy_bandwidth(timer)
    env = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "copy_GBps": round(copy, 1)}
    import triton

    env["triton"] = triton.__version__
    print(json.dumps(env), flush=True)
    log = (args.out / "decode.jsonl").open("a")
    rows, appends = [], []
    sweep = splits_sweep(args.sweep, [int(n) for n in args.sweep_splits.split(",")], timer) if args.sweep else []
    for row in sweep:
        log.write(json.dumps({"splits": row}) + "\n")
    log.flush()
    shapes = [ALIASES.get(s, s) for s in args.shapes.split(",")]
    formats = args.formats.split(",")
    for shape in shapes:
        hq, hkv, d = SHAPES[shape]
        for batch in (int(b) for b in args.batches.split(",")):
            if time.time() - start < args.budget:
                us_a, us_d, by_warps, adv = append_cost(hq, hkv, d, batch, 32768, "nuq3-1%", timer)
                row = {"shape": shape, "batch": batch, "context": 32768, "format": "nuq3-1%", "append_us": round(us_a, 2),
                       "decode_us": round(us_d, 2), "append_fraction": round(us_a / us_d, 3),
                       "append_launch_us_by_warps": by_warps, "length_advance_us": round(adv, 2)}
                appends.append(row)
                log.write(json.dumps({"append": row}) + "\n")
                log.flush()
                print("append", row, flush=True)
            for context in ([] if args.append_only else (int(c) for c in args.contexts.split(","))):
                if time.time() - start > args.budget:
                    print(f"budget reached: skipping {shape} batch {batch} {context}", flush=True)
                    continue
                fp_us, backend, fp_bytes = fp16_sdpa(hq, hkv, d, batch, context, timer)
                torch.cuda.empty_cache()  # each case allocates its own tensors; give the last ones back
                for fmt in formats:
                    us, read = kvquant_decode(hq, hkv, d, batch, context, fmt, timer)
                    torch.cuda.empty_cache()
                    row = {
                        "shape": shape, "batch": batch, "context": context, "format": fmt,
                        "fp16_us": round(fp_us, 2), "kvquant_us": round(us, 2), "speedup": round(fp_us / us, 3),
                        "fp16_backend": backend, "fp16_GBps": round(fp_bytes / fp_us / 1e3, 1),
                        "kvquant_bytes": read, "kvquant_GBps": round(read / us / 1e3, 1),
                        "kvquant_copy_fraction": round(read / us / 1e3 / copy, 3),
                        "fp16_copy_fraction": round(fp_bytes / fp_us / 1e3 / copy, 3),
                    }
                    rows.append(row)
                    log.write(json.dumps(row) + "\n")
                    log.flush()
                    print(f"{shape:20s} B{batch} {context:>7d} {fmt:8s} fp16 {fp_us:9.1f} us ({backend})  kvquant {us:9.1f} us"
                          f"  x{fp_us / us:.2f}  {read / us / 1e3:7.0f} GB/s", flush=True)
    result = {"environment": env, "decode": rows, "append": appends, "splits": sweep, "seconds": round(time.time() - start, 1)}
    (args.out / "decode.json").write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
