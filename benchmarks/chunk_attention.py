"""How a prefill chunk's attention over the packed prefix is best computed on the GPU (LLaMA-2-7B heads).

A chunk of ``q`` queries attends to ``k`` keys that end with its own (causal aligned at the bottom right). Timed,
medians of CUDA events, fp16, 32 heads x 128:

- ``lower_right``: SDPA with ``causal_lower_right`` (what ``kernel_dispatch._causal_chunk`` does; torch dispatches
  it to the flash-attention 2 kernel);
- ``padded``: the queries padded at the front to ``k`` rows, then ``is_causal=True`` on the square (the backend
  SDPA prefers for plain causal, cuDNN on Hopper), the pad rows discarded;
- ``full_causal``: a ``k``-token causal prefill in one call, for scale.

    python benchmarks/chunk_attention.py --out OUT [--cases 16384:32768,32768:65536]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.nn.attention.bias import causal_lower_right

from cuda_timing import median_ms


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--cases", default="16384:32768,8192:32768,32768:65536")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    rows = []
    g = torch.Generator(device="cuda").manual_seed(0)
    for case in args.cases.split(","):
        nq, nk = (int(x) for x in case.split(":"))
        q = torch.randn(1, 32, nq, 128, device="cuda", dtype=torch.float16, generator=g)
        k = torch.randn(1, 32, nk, 128, device="cuda", dtype=torch.float16, generator=g)
        v = torch.randn(1, 32, nk, 128, device="cuda", dtype=torch.float16, generator=g)
        ref = F.scaled_dot_product_attention(q, k, v, attn_mask=causal_lower_right(nq, nk))

        def padded():
            qp = torch.cat([q.new_zeros(1, 32, nk - nq, 128), q], 2)
            return F.scaled_dot_product_attention(qp, k, v, is_causal=True)[:, :, nk - nq:]

        err = (padded() - ref).abs().max().item()
        row = {"queries": nq, "keys": nk,
               "lower_right_ms": round(median_ms(lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=causal_lower_right(nq, nk))), 3),
               "padded_ms": round(median_ms(padded), 3),
               "full_causal_ms": round(median_ms(lambda: F.scaled_dot_product_attention(k, k, v, is_causal=True)), 3),
               "max_abs_diff": err}
        print(json.dumps(row), flush=True)
        rows.append(row)
    (args.out / "chunk_attention.json").write_text(json.dumps({"device": torch.cuda.get_device_name(), "torch": torch.__version__,
                                                                "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
