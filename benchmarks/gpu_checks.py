"""Correctness on a CUDA machine: the compiled kernels, the cache through generate, and the compiled decode step.

    python benchmarks/gpu_checks.py --out runs/gpu_checks [--skip-tests]

1. The kernel tests compiled (``KVQUANT_TEST_COMPILED=1 pytest tests/kernels``): decode, append, dequantize and the
   reference-vs-kernel generation of tests/kernels/test_dispatch.py, on the GPU.
2. ``bits=16`` exactness on CUDA: the growing cache against ``DynamicCache`` and the static cache against
   ``StaticCache``, eager and compiled by generate (max |delta logit| and tokens).
3. A quantized cache with the kernels against the reference path (tokens, max |delta logit|), eager and compiled:
   generate's own compile and a gpt-fast loop with ``torch.compile(mode="reduce-overhead")`` (CUDA graphs); and with
   an exact recent window of 128 tokens (growing, and static compiled by generate); and with two outliers per
   (token, head) (``outlier_slots=2``, the quality preset's layout) beside a window of 64.
4. Two compiled generate calls in a row, the second shorter: no recompilation (the capacity is kept), as "static".
Writes ``gpu_checks.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
import traceback
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
DEV = "cuda" if torch.cuda.is_available() else "cpu"  # CPU: a dry run of the same code (TRITON_INTERPRET=1, --dry)
DRY = {"prompt": 300, "new": 24, "steps": 16}


def kernel_tests(out: Path) -> dict:
    env = {**os.environ, "KVQUANT_TEST_COMPILED": "1"}
    env.pop("TRITON_INTERPRET", None)
    t = time.time()
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/kernels"], cwd=REPO, env=env,
                          capture_output=True, text=True)
    (out / "kernel_tests.log").write_text(proc.stdout + proc.stderr)
    return {"returncode": proc.returncode, "summary": proc.stdout.strip().splitlines()[-1:], "seconds": round(time.time() - t, 1)}


def run_generate(model, inputs, **kwargs):
    kwargs.setdefault("do_sample", False)
    with torch.no_grad():
        return model.generate(**inputs, return_dict_in_generate=True, output_logits=True, **kwargs)


def compare(a, b) -> dict:
    """Tokens and logits of two generations. After the first step whose tokens differ, the logits are conditioned on
    different prefixes, so the logits are also compared up to that step (``*_until_divergence``), with the reference's
    top-2 margin there: a flip at a near-tie (margin below the differences the compiler's rounding makes) is not a
    wrong kernel."""
    same = bool(torch.equal(a.sequences, b.sequences))
    worst = max(float((x.float() - y.float()).abs().max()) for x, y in zip(a.logits, b.logits))
    scale = max(float(x.float().abs().max()) for x in a.logits)
    out = {"same_tokens": same, "max_abs_dlogit": worst, "relative": worst / scale}
    if not same:
        new = len(a.logits)
        ta, tb = a.sequences[:, -new:], b.sequences[:, -new:]
        step = int((ta != tb).any(0).nonzero()[0])
        row = int((ta[:, step] != tb[:, step]).nonzero()[0])
        top2 = a.logits[step][row].float().topk(2).values
        out.update(first_divergent_step=step, steps=new,
                   max_abs_dlogit_until_divergence=max(float((x.float() - y.float()).abs().max()) for x, y in
                                                       zip(a.logits[: step + 1], b.logits[: step + 1])),
                   reference_top2_margin_there=float(top2[0] - top2[1]))
    return out


def exactness(stories: Path) -> dict:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from transformers_kvquant import unpatch_model

    tok = AutoTokenizer.from_pretrained(stories)
    inputs = tok(["Once upon a time, there was a little dog", "Tom had a red ball", "The sun"], return_tensors="pt",
                 padding=True, padding_side="left").to(DEV)
    out = {}
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        model = AutoModelForCausalLM.from_pretrained(stories, dtype=dtype).to(DEV).eval()
        name = str(dtype).removeprefix("torch.")
        unpatch_model(model)
        ref = run_generate(model, inputs, max_new_tokens=20)
        got = run_generate(model, inputs, max_new_tokens=20, cache_implementation="kvquant", cache_config={"bits": 16, "static": False})
        out[f"growing-vs-DynamicCache-{name}"] = compare(ref, got)
        unpatch_model(model)
        ref = run_generate(model, inputs, max_new_tokens=20, cache_implementation="static", disable_compile=True)
        got = run_generate(model, inputs, max_new_tokens=20, cache_implementation="kvquant", cache_config={"bits": 16}, disable_compile=True)
        out[f"static-vs-StaticCache-eager-{name}"] = compare(ref, got)
        if dtype == torch.float16 and DEV == "cuda":
            unpatch_model(model)
            ref = run_generate(model, inputs, max_new_tokens=20, cache_implementation="static")
            if hasattr(model, "_compiled_call"):
                del model._compiled_call
            got = run_generate(model, inputs, max_new_tokens=20, cache_implementation="kvquant", cache_config={"bits": 16})
            out[f"static-vs-StaticCache-compiled-{name}"] = compare(ref, got)
        print(json.dumps({k: v for k, v in out.items() if name in k}), flush=True)
    return out


def quantized(out: dict) -> dict:
    from tests.helpers import quick_config, tiny_llama
    from transformers_kvquant import KVQuantCache, unpatch_model

    res = {}
    for heads, kv, d in ((8, 2, 128), (9, 3, 64)):
        model = tiny_llama(layers=2, heads=heads, kv_heads=kv, head_dim=d, vocab=256, dtype=torch.float16 if DEV == "cuda" else torch.float32).to(DEV)
        cfg = quick_config(model, bits=3, outlier_fraction=0.01)
        g = torch.Generator().manual_seed(0)
        ids = torch.randint(3, 256, (2, DRY["prompt"]), generator=g)
        ids[1, :40] = 0
        mask = (ids != 0).long()
        inputs = {"input_ids": ids.to(DEV), "attention_mask": mask.to(DEV)}
        shape = f"{heads}q/{kv}kv x{d}"

        def against_reference(config, labels, prefix="", **extra):
            """Generate with the kernels in each of ``labels``' ways and compare with the reference path's run
            (``extra``: more cache_config keys for every cache)."""
            ref = run_generate(model, inputs, max_new_tokens=DRY["new"],
                               past_key_values=KVQuantCache(model, config, backend="reference", **extra))
            static = {"cache_implementation": "kvquant", "cache_config": {"config": config, "backend": "triton", **extra}}
            ways = {"triton-growing": lambda: {"past_key_values": KVQuantCache(model, config, backend="triton", **extra)},
                    "triton-static-eager": lambda: {**static, "disable_compile": True},
                    "triton-static-compiled": lambda: static}  # generate's compiled path (each compile costs device time)
            for label in labels:
                t = time.time()
                got = run_generate(model, inputs, max_new_tokens=DRY["new"], **ways[label]())
                res[f"{shape} {prefix}{label}"] = {**compare(ref, got), "seconds": round(time.time() - t, 1)}
                print(shape, prefix + label, res[f"{shape} {prefix}{label}"], flush=True)
            if hasattr(model, "_compiled_call"):
                del model._compiled_call

        against_reference(cfg, ("triton-growing", "triton-static-eager", "triton-static-compiled"))
        # two outliers per (token, head) with an exact window (the quality preset's layout; 1 slot at 1% otherwise)
        against_reference(cfg.with_runtime(recent_window=64), ("triton-growing", "triton-static-compiled"), "slots-2 window-64 ",
                          outlier_slots=2)
        if d == 128:  # an exact recent window (the long-context preset keeps 128): the ring beside the packed slots
            against_reference(cfg.with_runtime(recent_window=128), ("triton-growing", "triton-static-compiled"), "window-128 ")
            res[f"{shape} gpt-fast reduce-overhead"] = gpt_fast(model, cfg, inputs)
            print(shape, "gpt-fast", res[f"{shape} gpt-fast reduce-overhead"], flush=True)
        unpatch_model(model)
    return res


def repeated(out: dict) -> dict:
    """Two compiled ``generate`` calls in a row, the second with fewer new tokens: the cache keeps the first call's
    capacity, so the second compiles nothing new (graphs counted by TorchDynamo), for "kvquant" as for "static"."""
    import torch._dynamo

    from tests.helpers import quick_config, tiny_llama
    from transformers_kvquant import unpatch_model

    model = tiny_llama(layers=2, heads=8, kv_heads=2, head_dim=128, vocab=256, dtype=torch.float16 if DEV == "cuda" else torch.float32).to(DEV)
    cfg = quick_config(model, bits=3, outlier_fraction=0.01)
    ids = torch.randint(3, 256, (1, DRY["prompt"]), generator=torch.Generator().manual_seed(1)).to(DEV)
    res = {}
    for name, kwargs in (("static", {"cache_implementation": "static"}),
                         ("kvquant", {"cache_implementation": "kvquant", "cache_config": {"config": cfg, "backend": "triton"}})):
        torch._dynamo.reset()
        torch._dynamo.utils.counters.clear()
        for attr in ("_compiled_call", "_previous_max_cache_length"):
            if hasattr(model, attr):
                delattr(model, attr)
        row = {}
        for call, new in (("first", 8 * DRY["new"]), ("second", 4)):
            t = time.time()
            got = run_generate(model, {"input_ids": ids}, max_new_tokens=new, **kwargs)
            cache = got.past_key_values
            row[call] = {"new_tokens": new, "seconds": round(time.time() - t, 2),
                         "graphs": int(torch._dynamo.utils.counters["stats"]["unique_graphs"]),
                         "capacity": int(cache.get_max_length())}
        row["recompiled"] = row["second"]["graphs"] != row["first"]["graphs"]
        res[name] = row
        print("repeated", name, row, flush=True)
        unpatch_model(model)
    return res


def gpt_fast(model, cfg, inputs, steps=None) -> dict:
    """Prefill eagerly, then decode with torch.compile(mode="reduce-overhead") vs eager, both over the kernels."""
    from transformers_kvquant import KVQuantCache

    steps = steps or DRY["steps"]
    ids = inputs["input_ids"][:1, 40:]
    logits = {}
    for compiled in (False, True):
        cache = KVQuantCache(model, cfg, backend="triton", max_cache_len=ids.shape[1] + steps + 1)
        mode = "reduce-overhead" if DEV == "cuda" else None
        fwd = torch.compile(model.forward, mode=mode, fullgraph=True, **({} if DEV == "cuda" else {"backend": "aot_eager"})) if compiled else model.forward
        seq = []
        with torch.no_grad():
            out = model(ids, past_key_values=cache, use_cache=True)
            token = out.logits[:, -1:].argmax(-1)
            pos = ids.shape[1]
            for _ in range(steps):
                where = torch.tensor([pos], device=DEV)
                out = fwd(input_ids=token, past_key_values=cache, cache_position=where, position_ids=where[None], use_cache=True)
                seq.append(out.logits[:, -1].float().clone())
                token = out.logits[:, -1:].argmax(-1).clone()
                pos += 1
        logits[compiled] = torch.stack(seq)
    d = float((logits[True] - logits[False]).abs().max())
    return {"same_tokens": bool(torch.equal(logits[True].argmax(-1), logits[False].argmax(-1))), "max_abs_dlogit": d}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--stories", type=Path, required=True)
    ap.add_argument("--skip-tests", action="store_true")
    ap.add_argument("--skip-exactness", action="store_true", help="only the quantized generations (and the tests)")
    ap.add_argument("--dry", action="store_true", help="small sizes (a CPU run under TRITON_INTERPRET=1)")
    args = ap.parse_args()
    if args.dry:
        DRY.update(prompt=48, new=3, steps=2)
    args.out.mkdir(parents=True, exist_ok=True)
    result = {"gpu": torch.cuda.get_device_name() if DEV == "cuda" else "cpu (dry run)", "torch": torch.__version__}
    import transformers
    import triton

    result.update(transformers=transformers.__version__, triton=triton.__version__)
    for name, fn in (("kernel_tests", lambda: kernel_tests(args.out)) if not args.skip_tests else (None, None),
                     ("exactness", lambda: exactness(args.stories)) if not args.skip_exactness else (None, None), ("quantized", lambda: quantized(result)),
                     ("repeated", lambda: repeated(result))):
        if name is None:
            continue
        t = time.time()
        try:
            result[name] = fn()
        except Exception:  # noqa: BLE001 (record and go on: the other checks still run)
            result[name] = {"error": traceback.format_exc()[-3000:]}
        print(name, round(time.time() - t, 1), "s", json.dumps(result[name])[:1500], flush=True)
        (args.out / "gpu_checks.json").write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
