"""Compile the Triton kernels for a GPU target without a GPU (Triton's bundled ptxas) and report registers/spills.

    python benchmarks/compile_check.py [--arch 90]

Catches compile errors before device time is spent and shows the resource use of each configuration the
benchmarks launch. Needs no CUDA device (not run under TRITON_INTERPRET).
"""

from __future__ import annotations

import argparse
import os
import sys

os.environ.pop("TRITON_INTERPRET", None)

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from transformers_kvquant.kernels import append, decode, prefill
from transformers_kvquant.kernels.layout import next_pow2, packed_words


def sig_of(fn, ptr_types: dict, constexprs: dict):
    sig = {}
    for name in fn.arg_names:
        if name in constexprs:
            sig[name] = "constexpr"
        elif name.endswith("_ptr"):
            sig[name] = ptr_types.get(name, "*fp32")
        elif name in ("scale", "rope_scale"):
            sig[name] = "fp32"
        else:
            sig[name] = "i32"
    return sig


def compile_one(fn, ptr_types, constexprs, arch, num_warps):
    src = ASTSource(fn=fn, signature=sig_of(fn, ptr_types, constexprs), constexprs={(fn.arg_names.index(k),): v for k, v in constexprs.items()})
    k = triton.compile(src, target=GPUTarget("cuda", arch, 32), options={"num_warps": num_warps})
    return (*resource_usage(k.asm["cubin"]), k.metadata.shared)


def resource_usage(cubin: bytes) -> tuple[int, int]:
    """(registers per thread, spill stores) read from the cubin with the cuobjdump that ships with Triton."""
    import re
    import subprocess
    import tempfile

    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        text = subprocess.run([tool, "--dump-resource-usage", f.name], capture_output=True, text=True).stdout
    regs = re.search(r"REG:(\d+)", text)
    stack = re.search(r"STACK:(\d+)", text)
    return int(regs.group(1)) if regs else -1, int(stack.group(1)) if stack else -1


OVERRIDE: dict = {}


def decode_cases():
    for name, h, g, d in (("MHA 32x128", 32, 1, 128), ("GQA 8x4x128", 8, 4, 128), ("GQA 3x3x64", 3, 3, 64)):
        for bits in (2, 3, 4):
            for outliers in (False, True):
                hp, gp = next_pow2(h), next_pow2(g)
                block_n, warps = decode.decode_config(h, g, d)
                block_n = OVERRIDE.get("block_n", block_n)
                warps = OVERRIDE.get("warps", warps)
                yield f"decode {name} b{bits} {'1%' if outliers else '0%'}", dict(
                    H=h, HP=hp, G=g, GP=gp, D=d, BITS=bits, W=packed_words(d, bits), S_PAD=64 if outliers else 1,
                    HAS_OUTLIERS=outliers, HAS_KEY_OUTLIERS=outliers, N_SINK=1, NS_PAD=1, MASK_KIND=1, BLOCK_N=block_n, FAST_TRIG=True, VBN=decode.value_block(h, d, warps), SHFL=True, KBN=decode.key_block(h, d, warps), MBN=max(1, 1024 // (hp * gp))), warps


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--arch", type=int, default=90)
    ap.add_argument("--only", default="", help="substring of the kernel labels to compile")
    ap.add_argument("--block-n", type=int)
    ap.add_argument("--warps", type=int)
    args = ap.parse_args()
    if args.block_n:
        OVERRIDE["block_n"] = args.block_n
    if args.warps:
        OVERRIDE["warps"] = args.warps
    ptrs = {"q_ptr": "*fp16", "qc_ptr": "*fp16", "qs_ptr": "*fp16", "kc_ptr": "*i32", "vc_ptr": "*i32", "vzero_ptr": "*fp16",
            "vscale_ptr": "*fp16", "kev_ptr": "*fp16", "vov_ptr": "*fp16", "kec_ptr": "*i16", "voi_ptr": "*i16", "kbeg_ptr": "*i32", "knnz_ptr": "*i64", "pos_ptr": "*i32",
            "sink_k_ptr": "*fp16", "sink_v_ptr": "*fp16", "sink_slot_ptr": "*i64", "win_k_ptr": "*fp16", "win_v_ptr": "*fp16",
            "mask_ptr": "*u8", "out_ptr": "*fp16", "k_ptr": "*fp16", "v_ptr": "*fp16"}
    failures = 0
    rows = []
    for label, const, warps in decode_cases():
        if args.only not in label:
            continue
        try:
            rows.append((label, warps, *compile_one(decode._decode_kernel, ptrs, const, args.arch, warps)))
        except Exception as e:  # noqa: BLE001
            failures += 1
            rows.append((label, warps, "FAILED", str(e).splitlines()[-1][:150], ""))
    import triton.language as tl

    for bits in (2, 3, 4):
        for g, d in ((1, 128), (4, 128), (3, 64)):
            gp = next_pow2(g)
            const = dict(H=8, G=g, GP=gp, D=d, BITS=bits, W=packed_words(d, bits), HAS_KEY_OUTLIERS=True, N_SINK=1, MASK_KIND=1,
                         BLOCK_T=max(1, 64 // gp), BLOCK_N=32, DOT_DTYPE=tl.float16, PRECISION="tf32", FAST_TRIG=True)
            label = f"prefill G{g} D{d} b{bits}"
            try:
                pw = 8 if d >= 128 else 4
                rows.append((label, pw, *compile_one(prefill._prefill_kernel, ptrs, const, args.arch, pw)))
            except Exception as e:  # noqa: BLE001
                failures += 1
                rows.append((label, 0, "FAILED", str(e).splitlines()[-1][:150], ""))
        const = dict(H=32, D=128, BITS=bits, W=packed_words(128, bits), BT=32)
        try:
            rows.append((f"append b{bits}", 4, *compile_one(append._append_kernel, dict(ptrs, vzero_ptr="*fp16", vscale_ptr="*fp16"), const, args.arch, 4)))
        except Exception as e:  # noqa: BLE001
            failures += 1
            rows.append((f"append b{bits}", 4, "FAILED", str(e).splitlines()[-1][:150], ""))
    print(f"triton {triton.__version__}, sm_{args.arch}")
    print(f"{'kernel':36s} {'warps':>5s} {'regs':>6s} {'stack':>7s} {'smem':>7s}")
    for r in rows:
        print(f"{r[0]:36s} {r[1]:>5} {r[2]!s:>6s} {r[3]!s:>7s} {r[4]!s:>7s}")
    sys.exit(1 if failures else 0)


if __name__ == "__main__":
    main()
