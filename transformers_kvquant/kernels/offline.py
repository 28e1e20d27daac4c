"""Compile a kernel of this package for an NVIDIA GPU without one (Triton's bundled ptxas): the compiled-code checks
that need no device. ``tests/kernels/test_offline_compile.py`` compiles every decode variant this way, so a kernel
that runs under the interpreter but does not compile fails on the CPU; ``benchmarks/sass_count.py`` counts the
instructions of what it returns."""

from __future__ import annotations

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

PTR_TYPES = {
    # decode
    "qrot_ptr": "*fp32", "pchan_ptr": "*i32", "vchan_ptr": "*i32", "theta_ptr": "*fp32", "offc_ptr": "*fp16",
    "offs_ptr": "*fp16", "kc_ptr": "*i32", "vc_ptr": "*i32", "ktab_ptr": "*i32", "vtab_ptr": "*i32",
    "kt16_ptr": "*fp16", "vt16_ptr": "*fp16", "kz_ptr": "*fp32", "ks_ptr": "*fp32", "vz_ptr": "*fp16",
    "vs_ptr": "*fp16", "kov_ptr": "*fp16", "koi_ptr": "*u8", "vov_ptr": "*fp16", "voi_ptr": "*u8", "pos_ptr": "*i32",
    "len_ptr": "*i32", "mask_ptr": "*u8", "sink_ptr": "*i64", "part_m_ptr": "*fp32", "part_l_ptr": "*fp32",
    "part_o_ptr": "*fp32", "uscr_ptr": "*fp32", "wk_ptr": "*fp16", "wv_ptr": "*fp16", "sk_ptr": "*fp16",
    "sv_ptr": "*fp16", "out_ptr": "*fp16",
    # append
    "k_ptr": "*fp16", "v_ptr": "*fp16", "p_ptr": "*i32", "sslot_ptr": "*i64", "kchan_ptr": "*i32", "kb_ptr": "*fp32", "vb_ptr": "*fp32",
    # dequant
    "codes_ptr": "*i32", "src_ptr": "*i32", "table_ptr": "*fp32", "scale_ptr": "*fp16", "zero_ptr": "*fp16",
    "ov_ptr": "*fp16", "oi_ptr": "*u8",
}
APPEND_OVERRIDES = {"ktab_ptr": "*fp32", "vtab_ptr": "*fp32", "kz_ptr": "*fp32", "ks_ptr": "*fp32", "kc_ptr": "*i32", "vc_ptr": "*i32"}


def compile_kernel(fn, constexprs: dict, num_warps: int, overrides=None, arch: int = 90):
    """``fn`` (a ``triton.jit`` function of this package) compiled for ``sm_{arch}``: every pointer argument typed by
    its name (``PTR_TYPES``, ``overrides``), 16-byte aligned as the launchers pass them, every other non-constexpr
    argument an int32."""
    types = {**PTR_TYPES, **(overrides or {})}
    sig = {}
    for name in fn.arg_names:
        if name in constexprs:
            sig[name] = "constexpr"
        elif name.endswith("_ptr"):
            sig[name] = types.get(name, "*fp32")
        else:
            sig[name] = "i32"
    div16 = [n for n in fn.arg_names if sig[n].startswith("*")] + [n for n in ("cap",) if n in sig]
    attrs = {(fn.arg_names.index(n),): [["tt.divisibility", 16]] for n in div16}
    src = ASTSource(fn=fn, signature=sig, constexprs={(fn.arg_names.index(k),): v for k, v in constexprs.items()}, attrs=attrs)
    return triton.compile(src, target=GPUTarget("cuda", arch, 32), options={"num_warps": num_warps, "num_stages": 1})
