"""Compile every kernel variant for sm_90 without a GPU (Triton's bundled ptxas) and count SASS instructions.

    python benchmarks/sass_count.py [--out docs/gpu_runs/sass.json] [--quick]

For the decode kernel's two loops (the key pass and the value pass), prints the instructions of one iteration per
element the iteration decodes (a thread's share of a ``BLOCK_N x head_dim`` tile): the number that decides whether
decode is memory-bound (docs/kernels.md has the budget). For the append, dequantize, exact-window and combine
kernels, the total instructions and registers. A compile error fails here instead of on device time.
Run it with the Triton version of the GPU image (3.6): `make test` builds `.venv-min` with it.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import re
import subprocess
import sys
import tempfile
from collections import Counter
from pathlib import Path

os.environ.pop("TRITON_INTERPRET", None)

import triton

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from transformers_kvquant.kernels import append, decode, dequant
from transformers_kvquant.kernels.offline import APPEND_OVERRIDES, compile_kernel
from transformers_kvquant.kernels.layout import next_pow2

def sass_of(kernel) -> tuple[str, str]:
    tool = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(kernel.asm["cubin"])
        f.flush()
        sass = subprocess.run([str(tool), "-sass", f.name], capture_output=True, text=True, check=True).stdout
        res = subprocess.run([str(tool), "--dump-resource-usage", f.name], capture_output=True, text=True, check=True).stdout
    return sass, res


LINE = re.compile(r"\s+/\*([0-9a-f]{4,6})\*/\s+(?:@!?U?P[T\d]+\s+)?([A-Z0-9_]+)")
BRANCH = re.compile(r"BRA\s+(?:`\(\.L_x_\d+\)\s*)?0x([0-9a-f]+)")


def loops(sass: str):
    """(instructions, [loop bodies]) from SASS: a loop is a backward branch's range."""
    instrs, bodies = [], []
    for line in sass.splitlines():
        m = LINE.match(line)
        if m:
            instrs.append((int(m.group(1), 16), m.group(2), line))
    for addr, op, line in instrs:
        if op == "BRA":
            t = BRANCH.search(line)
            if t and int(t.group(1), 16) < addr:
                lo = int(t.group(1), 16)
                bodies.append([o for a, o, _ in instrs if lo <= a <= addr])
    return instrs, bodies


def resources(res: str) -> dict:
    regs = re.search(r"REG:(\d+)", res)
    stack = re.search(r"STACK:(\d+)", res)
    return {"registers": int(regs.group(1)) if regs else None, "stack": int(stack.group(1)) if stack else None}


def decode_variant(bits, s, g, d, block_n=64, warps=None):
    """Registers and instructions per element of the decode kernel's two passes. The key pass holds a branch for
    blocks whose attended positions jump (one more query rotation and dot per distinct base), taken only with custom
    position ids: it is counted twice, with that branch compiled in (``*_static``) and out (the path every other block runs)."""
    warps = warps or 4  # what the launcher picks (decode.default_warps)
    gr = max(2, next_pow2(g))
    per_elem = block_n * d / (32 * warps)  # elements (of K, or of V) one thread decodes per loop iteration
    row = {"kernel": "decode", "bits": bits, "outliers": s, "groups": g, "head_dim": d, "block_n": block_n, "warps": warps}
    for suffix, slow in (("_static", True), ("", False)):
        const = dict(G=g, GR=gr, D=d, BITS=bits, S=s, SP=max(1, next_pow2(s)), N_SINK=1, BN=block_n, MASK_KIND=1,
                     USE_ASM=True, FAST=True, SLOW_PATH=slow, DOT_A=decode._direct(d, block_n, warps))  # as launched
        k = compile_kernel(decode._decode_packed_kernel, const, warps)
        sass, res = sass_of(k)
        instrs, bodies = loops(sass)
        if slow:
            row.update(instructions=len(instrs), **resources(res))
        big = [b for b in bodies if len(b) > 40]
        main = sorted(big, key=len, reverse=True)[:2]  # the two passes are the longest loops, in code order
        order = [b for b in big if any(b is m for m in main)]
        for name, body in zip(("key_pass", "value_pass"), order):
            row[f"{name}_per_element{suffix}"] = round(len(body) / per_elem, 2)
            if not slow:
                row[f"{name}_top"] = dict(Counter(body).most_common(6))
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path)
    ap.add_argument("--quick", action="store_true", help="the benchmark shapes only")
    args = ap.parse_args()
    rows, failures = [], []
    shapes = [(1, 128), (4, 128), (3, 64)] if args.quick else [(1, 128), (2, 128), (4, 128), (8, 128), (3, 64), (1, 64), (5, 64)]
    for bits, s, (g, d) in itertools.product((2, 3, 4), (0, 1, 2) if args.quick else (0, 1, 2, 3), shapes):
        try:
            row = decode_variant(bits, s, g, d)
            rows.append(row)
            print(f"decode b{bits} o{s} G{g} D{d}: regs {row['registers']} stack {row['stack']} "
                  f"key {row.get('key_pass_per_element')} value {row.get('value_pass_per_element')} instr/elem "
                  f"(with the jump branch: key {row.get('key_pass_per_element_static')})", flush=True)
        except Exception as e:  # noqa: BLE001 (report every failing variant, then fail)
            failures.append(f"decode b{bits} o{s} G{g} D{d}: {str(e).splitlines()[-1][:200]}")
            print("FAIL", failures[-1], flush=True)
    for (g, d), n_sink in itertools.product(shapes, (0, 1, 4)):
        const = dict(G=g, GR=max(2, next_pow2(g)), D=d, N_SINK=n_sink, NSP=max(2, next_pow2(max(n_sink, 1))), BW=16, MASK_KIND=1, FAST=True)
        try:
            k = compile_kernel(decode._decode_exact_kernel, const, 4)
            rows.append({"kernel": "exact", "groups": g, "head_dim": d, "sink": n_sink, **resources(sass_of(k)[1])})
        except Exception as e:  # noqa: BLE001
            failures.append(f"exact G{g} D{d} sink{n_sink}: {str(e).splitlines()[-1][:200]}")
    for h, d, bits, s in itertools.product((3, 8, 32), (64, 128), (2, 3, 4), (0, 1, 2)):
        # phase 0: a decode step's one launch (what must stay cheap beside the decode attention)
        const = dict(D=d, BITS=bits, SK=s, SV=s, N_SINK=1, EXACT=False, PHASE=0, VR=max(2, next_pow2(h)))
        warps = append.step_warps(h, d)
        try:
            k = compile_kernel(append._append_kernel, const, warps, APPEND_OVERRIDES)
            sass, res = sass_of(k)
            rows.append({"kernel": "append", "heads": h, "head_dim": d, "bits": bits, "outliers": s,
                         "instructions": len(loops(sass)[0]), **resources(res)})
        except Exception as e:  # noqa: BLE001
            failures.append(f"append H{h} D{d} b{bits} o{s}: {str(e).splitlines()[-1][:200]}")
            print("FAIL", failures[-1], flush=True)
    for d, bits, s, keys in itertools.product((64, 128), (2, 3, 4), (0, 2), (True, False)):
        const = dict(W=d * bits // 32, D=d, S=s, BT=64, PER_CHANNEL=keys)
        over = {"scale_ptr": "*fp32", "zero_ptr": "*fp32"} if keys else {}
        try:
            k = compile_kernel(dequant._dequant_kernel, const, 4, over)
            rows.append({"kernel": "dequant", "head_dim": d, "bits": bits, "outliers": s, "keys": keys, **resources(sass_of(k)[1])})
        except Exception as e:  # noqa: BLE001
            failures.append(f"dequant D{d} b{bits} o{s} keys={keys}: {str(e).splitlines()[-1][:200]}")
            print("FAIL", failures[-1], flush=True)
    print(f"{len(rows)} variants compiled, {len(failures)} failed", flush=True)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"triton": triton.__version__, "rows": rows, "failures": failures}, indent=1))
    if failures:
        sys.exit(1)


if __name__ == "__main__":
    main()
