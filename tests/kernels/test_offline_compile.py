"""Every kernel compiles for sm_90 on the CPU (Triton's bundled ptxas, no GPU).

The interpreter runs a kernel's Python, not Triton's compiler: a name defined only under a constexpr branch, or a
layout the backend cannot lower, passes there and fails on the device. These compile the variants the launchers
use, in a child process (this one imported the kernels for the interpreter, whose functions cannot be compiled).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

# (bits, outliers per token and head, query heads per KV head, head_dim, mask kind, code-word blocks in flight[, query_ahead])
DECODE = [
    (3, 1, 1, 128, 0, 1),  # MHA, 1%
    (3, 2, 4, 128, 1, 1),  # GQA with a bool mask (a compiled static cache)
    (2, 0, 8, 128, 2, 1),  # additive mask
    (4, 2, 1, 128, 1, 1),
    (4, 0, 3, 64, 0, 1),  # SmolLM2's geometry
    (3, 1, 3, 64, 1, 2),  # two blocks in flight
    (2, 3, 2, 64, 0, 2),
    (3, 2, 4, 128, 1, 1, True),  # the key outliers' query gathers a block ahead (query_ahead)
]
OTHERS = [(1, 128, 1, 32, 3, 2), (4, 128, 0, 3, 4, 1), (3, 64, 4, 8, 2, 0)]  # (G, D, sink, heads, bits, outliers)

CHILD = r"""
import json, sys
from transformers_kvquant.kernels import append, decode, dequant
from transformers_kvquant.kernels.layout import block_size, next_pow2
from transformers_kvquant.kernels.offline import APPEND_OVERRIDES, compile_kernel

decode_cases, other_cases = json.loads(sys.argv[1])
failures, compiled = [], 0

def attempt(name, fn, const, warps, over=None):
    global compiled
    try:
        assert compile_kernel(fn, const, warps, over).asm["cubin"]
        compiled += 1
    except Exception as e:
        failures.append(f"{name}: {str(e).strip().splitlines()[-1][:300]}")

for bits, s, g, d, mask_kind, pf, *ahead in decode_cases:
    const = dict(G=g, GR=max(2, next_pow2(g)), D=d, BITS=bits, S=s, SP=max(1, next_pow2(s)), N_SINK=1,
                 BN=block_size(bits), MASK_KIND=mask_kind, USE_ASM=True, FAST=True, PF=pf, KQA=bool(ahead),
                 DOT_A=decode._direct(d, block_size(bits), decode.default_warps(bits)))  # as the launcher picks
    attempt(f"decode {bits, s, g, d, mask_kind, pf}", decode._decode_packed_kernel, const, decode.default_warps(bits),
            {"mask_ptr": "*fp32"} if mask_kind == 2 else None)
for g, d, n_sink, h, bits, s in other_cases:
    gr = max(2, next_pow2(g))
    attempt(f"exact {g, d, n_sink}", decode._decode_exact_kernel,
            dict(G=g, GR=gr, D=d, N_SINK=n_sink, NSP=max(2, next_pow2(max(n_sink, 1))), BW=16, MASK_KIND=1, FAST=True), 4)
    attempt(f"combine {g, d}", decode._combine_kernel, dict(G=g, GR=gr, D=d, NP=16), 4)
    for phase in (0, 1, 2):  # a decode step's one launch; a prefill chunk's two
        attempt(f"append {h, d, bits, s, phase}", append._append_kernel, dict(D=d, BITS=bits, SK=s, SV=s,
                N_SINK=n_sink, EXACT=n_sink != 1, PHASE=phase, VR=2 if phase == 2 else max(2, next_pow2(h))),
                append.step_warps(h, d) if phase == 0 else (4 if h * d <= 4096 or phase == 2 else 8), APPEND_OVERRIDES)
    for keys in (True, False):
        attempt(f"dequant {d, bits, s, keys}", dequant._dequant_kernel, dict(W=d * bits // 32, D=d, S=s, BT=64, PER_CHANNEL=keys),
                4, {"scale_ptr": "*fp32", "zero_ptr": "*fp32"} if keys else None)
print(json.dumps({"compiled": compiled, "failures": failures}))
"""


@pytest.fixture(scope="module")
def report():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_DEFAULT_FP_FUSION"] = "1"  # what the kernels are written for (and Triton 3.9's current default)
    proc = subprocess.run([sys.executable, "-c", CHILD, json.dumps([DECODE, OTHERS])], capture_output=True, text=True,
                          env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_every_variant_compiles_for_sm90(report):
    assert report["failures"] == []
    assert report["compiled"] == len(DECODE) + len(OTHERS) * 7  # exact, combine, append x 3 phases, dequant x 2
