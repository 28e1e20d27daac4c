"""What the append costs a prefill chunk, by launch, and with how many warps the per-head programs run best.

For LLaMA-2-7B (32 KV heads) and Llama-3-8B (8) heads x 128, nuq3 with 2 outliers per (token, head), a chunk of
``--tokens`` tokens appended into an empty cache: GPU milliseconds (CUDA events, median of 5) of the whole append at
each ``PREFILL_WARPS``, and of a decode step's one-launch append for comparison; the bytes read (16-bit K and V) per
millisecond.

    python benchmarks/append_prefill.py --out OUT [--tokens 16384]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cuda_timing import median_ms  # noqa: E402


def main():
    from transformers_kvquant.kernels import append
    from transformers_kvquant.kernels.synthetic import random_cache

    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--tokens", type=int, default=16384)
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    rows = []
    n = args.tokens
    shipped = append.PREFILL_WARPS
    for heads in (32, 8):
        cache = random_cache(1, heads, 128, 3, 0, outliers=2, capacity=n + 128, device="cuda")
        g = torch.Generator(device="cuda").manual_seed(0)
        k = torch.randn(1, heads, n, 128, device="cuda", dtype=torch.float16, generator=g)
        v = torch.randn(1, heads, n, 128, device="cuda", dtype=torch.float16, generator=g)
        pos = torch.arange(n, device="cuda")[None]

        def chunk():
            cache.length.zero_()
            append.append_slots(cache, k, v, pos)

        for warps in (1, 2, 4):
            append.PREFILL_WARPS = warps
            ms = median_ms(chunk)
            rows.append({"kv_heads": heads, "tokens": n, "prefill_warps": warps, "ms": round(ms, 3),
                         "gb_per_s": round(2 * k.numel() * 2 / ms / 1e6, 1)})
            print(json.dumps(rows[-1]), flush=True)

        def step():
            cache.length.zero_()
            append.append_slots(cache, k[:, :, :1], v[:, :, :1], pos[:, :1])

        rows.append({"kv_heads": heads, "tokens": 1, "decode_us": round(1000 * median_ms(step), 1)})
        print(json.dumps(rows[-1]), flush=True)
    append.PREFILL_WARPS = shipped
    (args.out / "append_prefill.json").write_text(json.dumps({"device": torch.cuda.get_device_name(), "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
