"""Instructions per dequantized element in the decode kernel's loops, from its sm_90 SASS (no GPU needed).

    python benchmarks/sass_count.py [--heads 32 --groups 1 --bits 3 --outliers --block-n 1 --warps 8]

The loops print in code order: key pass, key-outlier entries (with --outliers; "per element" is per entry / 32
there), max pass, value pass, value outliers (with --outliers), exact tokens.

Compiles ``_decode_kernel`` with Triton's bundled ptxas, finds the loops (backward branches) and prints, for each,
the thread-instructions per loop iteration divided by the K (pass 1) or V (pass 2) elements one iteration covers,
with the most frequent opcodes. An H100 issues ~30 T thread-instructions/s, so e.g. 30 per element over the ~1G
elements of a 128K-token MHA layer-step is ~1 ms: the number to drive down.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
from collections import Counter

os.environ.pop("TRITON_INTERPRET", None)

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from transformers_kvquant.kernels import decode
from transformers_kvquant.kernels.layout import next_pow2, packed_words

from benchmarks.compile_check import sig_of

PTRS = {"q_ptr": "*fp16", "qc_ptr": "*fp16", "qs_ptr": "*fp16", "kc_ptr": "*i32", "vc_ptr": "*i32", "vzero_ptr": "*fp16",
        "vscale_ptr": "*fp16", "kev_ptr": "*fp16", "vov_ptr": "*fp16", "kec_ptr": "*i16", "voi_ptr": "*i16", "kbeg_ptr": "*i32", "knnz_ptr": "*i64", "pos_ptr": "*i32",
        "sink_k_ptr": "*fp16", "sink_v_ptr": "*fp16", "sink_slot_ptr": "*i64", "win_k_ptr": "*fp16", "win_v_ptr": "*fp16", "mask_ptr": "*u8"}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--heads", type=int, default=32)
    ap.add_argument("--groups", type=int, default=1)
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--bits", type=int, default=3)
    ap.add_argument("--outliers", action="store_true")
    ap.add_argument("--block-n", type=int)
    ap.add_argument("--warps", type=int)
    ap.add_argument("--no-shfl", action="store_true", help="codebook lookups by table loads instead of warp shuffles")
    a = ap.parse_args()
    bn, warps = decode.decode_config(a.heads, a.groups, a.head_dim)
    bn, warps = a.block_n or bn, a.warps or warps
    fn = decode._decode_kernel
    const = dict(H=a.heads, HP=next_pow2(a.heads), G=a.groups, GP=next_pow2(a.groups), D=a.head_dim, BITS=a.bits,
                 W=packed_words(a.head_dim, a.bits), S_PAD=64 if a.outliers else 1, HAS_OUTLIERS=a.outliers, HAS_KEY_OUTLIERS=a.outliers, N_SINK=1, NS_PAD=1,
                 MASK_KIND=0, BLOCK_N=bn, FAST_TRIG=True, VBN=decode.value_block(a.heads, a.head_dim, warps), SHFL=not a.no_shfl, KBN=decode.key_block(a.heads, a.head_dim, warps), MBN=max(1, 1024 // (next_pow2(a.heads) * next_pow2(a.groups))))
    src = ASTSource(fn=fn, signature=sig_of(fn, PTRS, const), constexprs={(fn.arg_names.index(k),): v for k, v in const.items()})
    k = triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": warps})
    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(k.asm["cubin"])
        f.flush()
        sass = subprocess.run([tool, "-sass", f.name], capture_output=True, text=True).stdout
    pat = re.compile(r"\s+/\*([0-9a-f]{4,6})\*/\s+(?:@!?U?P[T\d]+\s+)?([A-Z0-9_]+)")
    instrs = [(int(m.group(1), 16), m.group(2), line) for line in sass.splitlines() if (m := pat.match(line))]
    loops = []
    for addr, op, line in instrs:
        if op == "BRA":
            t = re.search(r"0x([0-9a-f]+)", line.split("BRA", 1)[1])
            if t and int(t.group(1), 16) < addr:
                loops.append((int(t.group(1), 16), addr))
    # The key and value passes give each thread one unit of 32 elements per iteration (key: 16 RoPE pairs of a
    # (head, slot); value: a 32-channel group of a (head, slot)), so instructions per element = per-thread body / 32.
    # Other loops (key-outlier entries: one entry per thread per iteration; the max pass; exact tokens) are listed
    # with the same division, which is only meaningful for the two passes.
    elements = 32 * warps * 32
    print(f"decode H{a.heads} G{a.groups} D{a.head_dim} b{a.bits} outliers={a.outliers} BLOCK_N={bn} warps={warps}: {len(instrs)} instructions")
    if os.environ.get("SASS_DUMP"):
        open(os.environ["SASS_DUMP"], "w").write(sass)
    for lo, hi in loops:
        body = [op for addr, op, _ in instrs if lo <= addr <= hi]
        if len(body) < 100:  # helper loops (e.g. a slow path), not a pass over slots
            continue
        per = len(body) * warps * 32 / elements
        print(f"  loop {lo:#x}-{hi:#x}: {len(body)} per thread per iteration = {per:.1f} per element; "
              + ", ".join(f"{o} {c}" for o, c in Counter(body).most_common(10)))


if __name__ == "__main__":
    main()
