"""Integration checks on a CUDA machine: exactness on the GPU, and a model split between cuda:0 and the CPU.

    python benchmarks/gpu_integration_check.py --out runs/gpu_integration [--stories PATH]

1. ``cache_config={"bits": 16}`` (the whole KVQuant path, unquantized) against the default DynamicCache on CUDA:
   greedy and beam search, fp32/bf16/fp16, sdpa/eager, tokens and max |delta logit| (must be 0).
2. An Accelerate ``device_map`` putting alternate decoder layers on cuda:0 and cpu: exactness at bits=16 and, with
   quantization (reference path), that every layer's cache tensors live on that layer's device.
3. Quantized generation on CUDA with the reference path, and the same with the Triton path when it is enabled.
Writes ``gpu_integration.json`` and a log; prints a summary table.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import traceback
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
DEV = "cuda" if torch.cuda.is_available() else "cpu"  # CPU: a dry run of the same code (no real split)


def _models(stories):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    sys.path.insert(0, str(REPO))
    from tests.helpers import tiny_llama, tiny_mistral

    tok = AutoTokenizer.from_pretrained(stories)
    return tok, {
        "stories260K": lambda dtype, attn: AutoModelForCausalLM.from_pretrained(stories, dtype=dtype, attn_implementation=attn),
        "tiny GQA llama": lambda dtype, attn: tiny_llama(layers=3, heads=8, kv_heads=2, head_dim=64, vocab=512, dtype=dtype, attn_implementation=attn),
        "tiny mistral (window 16)": lambda dtype, attn: tiny_mistral(layers=3, heads=8, kv_heads=2, head_dim=64, vocab=512, sliding_window=16, dtype=dtype, attn_implementation=attn),
    }


def _generate(model, ids, mask, **kw):
    out = model.generate(ids, attention_mask=mask, max_new_tokens=24, do_sample=False, output_logits=True,
                         return_dict_in_generate=True, pad_token_id=0, **kw)
    return out.sequences, torch.stack(out.logits)


def check_exactness(tok, models, log):
    rows = []
    ids = torch.randint(3, 500, (2, 20), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[0, :5] = 0  # left padding
    for name, make in models.items():
        for dtype in (torch.float32, torch.bfloat16, torch.float16):
            for attn in ("sdpa", "eager"):
                model = make(dtype, attn).to(DEV).eval()
                for mode, kw in (("greedy", {}), ("beam", {"num_beams": 3, "num_return_sequences": 2})):
                    ref_seq, ref_logits = _generate(model, ids.to(DEV), mask.to(DEV), **kw)
                    seq, logits = _generate(model, ids.to(DEV), mask.to(DEV), cache_implementation="kvquant", cache_config={"bits": 16}, **kw)
                    delta = float((logits - ref_logits).abs().max()) if logits.shape == ref_logits.shape else float("inf")
                    ok = torch.equal(seq, ref_seq) and delta == 0.0
                    rows.append({"model": name, "dtype": str(dtype).split(".")[-1], "attn": attn, "mode": mode, "max_delta_logit": delta, "tokens_equal": torch.equal(seq, ref_seq), "ok": ok})
                    log(f"exact  {name:26s} {rows[-1]['dtype']:9s} {attn:5s} {mode:6s} max|dlogit|={delta:.3g} {'OK' if ok else 'FAIL'}")
                del model
    return rows


def _execution_device(module) -> str:
    hook = getattr(module, "_hf_hook", None)
    dev = getattr(hook, "execution_device", None)
    if dev is None:
        dev = next(module.parameters()).device
    return torch.device(dev).type


def check_device_map(tok, models, log):
    from accelerate import dispatch_model

    import transformers_kvquant  # noqa: F401
    from transformers_kvquant import KVQuantCache

    sys.path.insert(0, str(REPO))
    from tests.helpers import quick_config

    out = []
    ids = torch.randint(3, 500, (2, 20), generator=torch.Generator().manual_seed(1))
    for name in ("stories260K", "tiny GQA llama"):
        model = models[name](torch.float32, "sdpa").eval()
        layers = len(model.model.layers)
        gpu = 0 if DEV == "cuda" else "cpu"
        device_map = {"model.embed_tokens": gpu, "model.rotary_emb": gpu, "model.norm": "cpu", "lm_head": "cpu"}
        device_map.update({f"model.layers.{i}": (gpu if i % 2 == 0 else "cpu") for i in range(layers)})
        if getattr(model.config, "tie_word_embeddings", False):
            device_map["lm_head"] = gpu
            device_map["model.norm"] = gpu
        cfg = quick_config(model, bits=3)
        single_ref = _generate(model.to(DEV), ids.to(DEV), torch.ones_like(ids).to(DEV))[0].cpu()
        model = model.to("cpu")
        split = dispatch_model(model, device_map=device_map)
        seq16, logits16 = _generate(split, ids.to(DEV), torch.ones_like(ids).to(DEV), cache_implementation="kvquant", cache_config={"bits": 16})
        ref_seq, ref_logits = _generate(split, ids.to(DEV), torch.ones_like(ids).to(DEV))
        cache = KVQuantCache(split, cfg, backend="reference")
        split.generate(ids.to(DEV), attention_mask=torch.ones_like(ids).to(DEV), max_new_tokens=16, do_sample=False, past_key_values=cache, pad_token_id=0)
        placement = []
        for i, layer in enumerate(cache.layers):
            # Accelerate offloads "cpu" entries when a GPU is present: their weights stay in CPU memory and the
            # layer executes on the main device, so its cache belongs there (the layer's execution device).
            want = _execution_device(split.model.layers[i])
            tensors = list(layer.store.buffers.tensors.values()) + [layer.store.sink_keys, layer.store.key_entry_values]
            placement.append(all(t.device.type == want for t in tensors))
        row = {
            "model": name,
            "device_map": {k: str(v) for k, v in device_map.items()},
            "bits16_tokens_equal": torch.equal(seq16, ref_seq),
            "bits16_max_delta_logit": float((logits16 - ref_logits).abs().max()),
            "split_equals_single_gpu_tokens": torch.equal(ref_seq.cpu(), single_ref),
            "quantized_layers_on_their_device": placement,
            "layer_execution_devices": [_execution_device(m) for m in split.model.layers],
        }
        row["ok"] = row["bits16_tokens_equal"] and row["bits16_max_delta_logit"] == 0.0 and all(placement)
        out.append(row)
        log(f"split  {name:26s} bits16 max|dlogit|={row['bits16_max_delta_logit']:.3g} layers-on-device={all(placement)} "
            f"split==single-gpu tokens={row['split_equals_single_gpu_tokens']} {'OK' if row['ok'] else 'FAIL'}")
    return out


def check_quantized(tok, models, log):
    import transformers_kvquant  # noqa: F401

    sys.path.insert(0, str(REPO))
    from tests.helpers import quick_config

    out = []
    ids = torch.randint(3, 500, (2, 40), generator=torch.Generator().manual_seed(2))
    model = models["tiny GQA llama"](torch.float16, "sdpa").to(DEV).eval()
    cfg = quick_config(model, bits=3)
    ref = _generate(model, ids.to(DEV), torch.ones_like(ids).to(DEV), cache_implementation="kvquant", cache_config={"config": cfg, "backend": "reference"})
    row = {"backend": "reference", "ok": bool(torch.isfinite(ref[1]).all())}
    out.append(row)
    log(f"quant  reference path on CUDA: finite logits {row['ok']}")
    try:
        tri = _generate(model, ids.to(DEV), torch.ones_like(ids).to(DEV), cache_implementation="kvquant", cache_config={"config": cfg, "backend": "triton"})
        same = torch.equal(tri[0], ref[0])
        delta = float((tri[1] - ref[1]).abs().max())
        out.append({"backend": "triton", "tokens_equal_reference": same, "max_delta_logit": delta})
        log(f"quant  triton path: tokens equal reference {same}, max|dlogit| {delta:.3g}")
    except Exception as e:  # the kernels are checked in depth by benchmarks/gpu_suite.py
        out.append({"backend": "triton", "error": repr(e)})
        log(f"quant  triton path: {e!r}")
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True)
    parser.add_argument("--stories", default=str(REPO.parent / "shared" / "models" / "stories260K"))
    args = parser.parse_args(argv)
    import transformers

    import transformers_kvquant  # noqa: F401

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    logf = open(out / "gpu_integration.log", "w")

    def log(msg):
        print(msg, flush=True)
        logf.write(msg + "\n")

    env = {"date": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "device": torch.cuda.get_device_name(0) if DEV == "cuda" else "cpu (dry run)", "torch": torch.__version__, "transformers": transformers.__version__}
    log(json.dumps(env))
    tok, models = _models(args.stories)
    result = {"environment": env}
    for name, fn in (("exactness", check_exactness), ("device_map", check_device_map), ("quantized", check_quantized)):
        try:
            result[name] = fn(tok, models, log)
        except Exception:
            result[name] = {"error": traceback.format_exc()}
            log(f"{name} FAILED\n{traceback.format_exc()}")
    (out / "gpu_integration.json").write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
