"""One decode case, launched a few times, for Nsight Compute (``ncu``) to profile the packed decode kernel.

    ncu --clock-control none --kernel-name regex:_decode_packed_kernel --launch-skip 3 --launch-count 1 --set full \
        -o decode python benchmarks/profile_decode.py MHA 1 131072 nuq3-1%

The cache is benchmarks/decode.py's (random codes, ranges and outliers); the first launch of a variant runs with a
provisional split count, so the profiled launch is a later one (``--launch-skip``). Prints the median time of the
launches outside the profiler for reference.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from decode import ALIASES, SHAPES, parse_format  # noqa: E402

DEV = "cuda" if torch.cuda.is_available() else "cpu"  # cpu: TRITON_INTERPRET=1, small contexts (a check of the script)


def main() -> None:
    shape, batch, context, fmt = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
    launches = int(sys.argv[5]) if len(sys.argv) > 5 else 5
    from transformers_kvquant.kernels.decode import decode_attention
    from transformers_kvquant.kernels.layout import block_size, kernel_constants, outlier_slots
    from transformers_kvquant.kernels.rope import rope_inv_freq
    from transformers_kvquant.kernels.synthetic import random_cache

    hq, hkv, d = SHAPES[ALIASES.get(shape, shape)]
    bits, fraction = parse_format(fmt)
    cache = random_cache(batch, hkv, d, bits, context, outliers=outlier_slots(d, fraction), sink_tokens=1, device=DEV, seed=1)
    consts = kernel_constants(cache, rope_inv_freq(d).to(DEV), block_size(bits))
    q = torch.randn(batch, hq, d, device=DEV) * 0.1
    for _ in range(launches):
        out = decode_attention(q, cache, consts)
    if DEV == "cuda":
        torch.cuda.synchronize()
    print(f"{shape} batch {batch} context {context} {fmt}: output finite {bool(torch.isfinite(out).all())}")


if __name__ == "__main__":
    main()
