"""Decode kernel variants on the GPU: block size, warps, code words in flight, and what the outliers cost.

    python benchmarks/decode_variants.py --out runs/variants

Times the packed decode (three launches, CUDA graph, L2 flushed, median; the timer of ``decode.py``) for each
launch variant on a few long-context cases, each with the split count the launcher picks for it. Two diagnostic
variants, built at run time from the kernel's source and never used for attention, show where the outlier time
goes: one without the key-outlier score corrections, one without the value-outlier pass (their results are wrong;
only their times are kept). Writes ``variants.json``: ``{"cases": [{"shape", "batch", "context", "format",
"fp16_us", "variants": {name: µs}}]}``. The chosen defaults and the numbers are in docs/kernels.md.
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from decode import ALIASES, SHAPES, Timer, fp16_sdpa, parse_format  # noqa: E402

# name: (block_n or None for block_size(bits), warps or None for the launcher's, code-word blocks in flight in the key
# loop, diagnostic module or None, register cap or None, with a bool attention mask by slot, keys decoded straight into
# the tensor-core operand where the shape allows: decode.load_words_dot, code-word blocks in flight in the value loop,
# optionally the key outliers' query gathers a block ahead)
VARIANTS = {
    "default": (None, None, 1, None, None, False, True, 1),
    "outlier query a block ahead": (None, None, 1, None, None, False, True, 1, True),
    "values 2 blocks ahead": (None, None, 1, None, None, False, True, 2),
    "bool mask": (None, None, 1, None, None, True, True, 1),
    "168 registers": (None, None, 1, None, 168, False, True, 1),
    "128 registers": (None, None, 1, None, 128, False, True, 1),
    "key tile through shared memory": (None, None, 1, None, None, False, False, 1),
    "2 blocks in flight": (None, None, 2, None, None, False, True, 2),
    "BN32 4 warps": (32, 4, 1, None, None, False, True, 1),
    "BN128 8 warps": (128, 8, 1, None, None, False, True, 1),
    "no key-outlier corrections (diagnostic)": (None, None, 1, "nokey", None, False, True, 1),
    "no value-outlier adds (diagnostic)": (None, None, 1, "novalue", None, False, True, 1),
}
CASES = "MHA:1:131072:nuq3-1%,MHA:1:131072:nuq3,GQA:1:131072:nuq3-1%,GQA:1:131072:nuq3,MHA:8:32768:nuq3-1%,SmolLM2:1:131072:nuq3-1%,MHA:1:131072:nuq4,MHA:1:131072:nuq2"


def diagnostic_module(kind: str):
    """A copy of the decode module with one outlier step compiled out (for timing only)."""
    from transformers_kvquant.kernels import decode

    src = Path(decode.__file__).read_text()
    if kind == "nokey":
        marker = "        if S > 0:\n            # key outliers as score corrections"
    else:
        marker = "        if S > 0:\n            # value outliers:"
    if marker not in src:
        raise RuntimeError(f"diagnostic {kind}: the kernel source changed (marker not found)")
    src = src.replace(marker, marker.replace("if S > 0:", "if S < 0:"), 1)
    path = Path(decode.__file__).with_name(f"_diag_{kind}.py")
    path.write_text(src)
    return importlib.import_module(f"transformers_kvquant.kernels._diag_{kind}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--cases", default=CASES)
    ap.add_argument("--reps", type=int, default=15)
    ap.add_argument("--budget", type=float, default=1e9)
    ap.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated names (default: all)")
    args = ap.parse_args()
    from transformers_kvquant.kernels import decode
    from transformers_kvquant.kernels.layout import block_size, kernel_constants, outlier_slots
    from transformers_kvquant.kernels.rope import rope_inv_freq
    from transformers_kvquant.kernels.synthetic import random_cache

    args.out.mkdir(parents=True, exist_ok=True)
    modules = {None: decode, "nokey": diagnostic_module("nokey"), "novalue": diagnostic_module("novalue")}
    timer = Timer(args.reps)
    start = time.time()
    cases = []
    for case in args.cases.split(","):
        shape, batch, context, fmt, *rest = case.split(":")
        window = int(rest[0][1:]) if rest else 0  # e.g. MHA:1:32768:nuq3-1%:w128, an exact recent window of 128
        shape, batch, context = ALIASES.get(shape, shape), int(batch), int(context)
        hq, hkv, d = SHAPES[shape]
        bits, fraction = parse_format(fmt)
        fp_us, _, _ = fp16_sdpa(hq, hkv, d, batch, context, timer)
        cache = random_cache(batch, hkv, d, bits, context, outliers=outlier_slots(d, fraction), sink_tokens=1, device="cuda", seed=1,
                             recent_window=window)
        q = torch.randn(batch, hq, d, device="cuda") * 0.1
        row = {"shape": shape, "batch": batch, "context": context, "format": fmt, "recent_window": window,
               "fp16_us": round(fp_us, 2), "variants": {}}
        mask = torch.ones(batch, cache.capacity, dtype=torch.bool, device="cuda")
        for name, (bn, warps, pf, diag, maxnreg, masked, direct, pfv, *ahead) in VARIANTS.items():
            if name not in args.variants.split(","):
                continue
            if time.time() - start > args.budget:
                break
            if diag and not fraction:
                continue
            consts = kernel_constants(cache, rope_inv_freq(d).cuda(), bn or block_size(bits))
            fn = modules[diag].decode_attention
            try:
                kw = ({"maxnreg": maxnreg} if maxnreg else {}) | ({"query_ahead": True} if ahead else {})
                us = timer(lambda: fn(q, cache, consts, num_warps=warps, prefetch=pf, mask=mask if masked else None,
                                      direct_keys=direct, value_prefetch=pfv, **kw))
            except Exception as e:  # noqa: BLE001 (a variant that does not compile or fit is reported, not fatal)
                row["variants"][name] = f"failed: {str(e).splitlines()[0][:160]}"
                continue
            row["variants"][name] = round(us, 2)
        print(json.dumps(row), flush=True)
        cases.append(row)
        del cache
        torch.cuda.empty_cache()
    (args.out / "variants.json").write_text(json.dumps({"gpu": torch.cuda.get_device_name(), "cases": cases}, indent=1))


if __name__ == "__main__":
    main()
