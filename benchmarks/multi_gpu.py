"""A LLaMA-2-7B-shaped model split over every GPU with Accelerate: KVQuant generation equals one GPU, and every
layer's cache lives on its layer's device. Public API only (Accelerate's ``dispatch_model``, ``generate``).

    python benchmarks/multi_gpu.py --out runs/multi_gpu          # on a machine with several GPUs
    python benchmarks/multi_gpu.py --out /tmp/mg --dry-run       # the same code on the CPU: a tiny model split
                                                                 # between the CPU and "disk" (offloaded layers)

For the reference and the Triton paths (``cache_config={"backend": ...}``; the dry run has the reference only):
greedy generation of a left-padded batch on one device and split by ``device_map``, tokens equal and max
|delta logit|; and for every decoder layer, the device of its cache layer against the device its attention runs on.
Writes ``OUT/multi_gpu.json``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def model_and_config(dry: bool):
    from transformers import LlamaConfig, LlamaForCausalLM

    from tests.helpers import quick_config

    shape = (dict(hidden_size=128, intermediate_size=256, num_hidden_layers=4, num_attention_heads=2, num_key_value_heads=2)
             if dry else dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                              num_key_value_heads=32))
    cfg = LlamaConfig(**shape, head_dim=64 if dry else 128, vocab_size=256 if dry else 32000, attn_implementation="sdpa")
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg).to(torch.float32 if dry else torch.float16).eval()
    return model, quick_config(model if dry else model.cuda(), bits=3, outlier_fraction=0.01)


def split(model, dry: bool, tmp: Path):
    from accelerate import dispatch_model, infer_auto_device_map

    if dry:
        size = sum(p.numel() * p.element_size() for p in model.parameters())
        device_map = infer_auto_device_map(model, max_memory={"cpu": size // 2, "disk": 10 * size},
                                           no_split_module_classes=["LlamaDecoderLayer"])
        return dispatch_model(model.cpu(), device_map=device_map, offload_dir=str(tmp), main_device="cpu"), device_map
    n = torch.cuda.device_count()
    size = sum(p.numel() * p.element_size() for p in model.parameters())
    memory = {i: int(size / n * 1.2) for i in range(n)}
    device_map = infer_auto_device_map(model, max_memory=memory, no_split_module_classes=["LlamaDecoderLayer"])
    return dispatch_model(model.cpu(), device_map=device_map), device_map


def generate(model, inputs, cfg, backend):
    with torch.no_grad():
        return model.generate(**inputs, max_new_tokens=12, do_sample=False, return_dict_in_generate=True, output_logits=True,
                              cache_implementation="kvquant", cache_config={"config": cfg, "backend": backend, "static": False})


def placement(model, cache) -> list[dict]:
    """For each decoder layer: where its weights execute and where its cache layer keeps its tensors."""
    rows = []
    for i, (block, layer) in enumerate(zip(model.model.layers, cache.layers)):
        hook = getattr(block, "_hf_hook", None)
        execution = getattr(hook, "execution_device", None) or next(block.parameters()).device
        rows.append({"layer": i, "execution": str(torch.device(execution)), "cache": str(layer.device)})
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--dry-run", action="store_true")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    dry = args.dry_run or not torch.cuda.is_available()
    result = {"devices": torch.cuda.device_count() if not dry else 0, "dry_run": dry, "checks": {}}
    model, cfg = model_and_config(dry)
    ids = torch.randint(3, model.config.vocab_size, (2, 40), generator=torch.Generator().manual_seed(0))
    ids[1, :9] = 0
    inputs = {"input_ids": ids, "attention_mask": (ids != 0).long()}
    device = "cpu" if dry else "cuda:0"
    backends = ("reference",) if dry else ("reference", "triton")
    single = {}
    one = model.to(device)
    for backend in backends:
        single[backend] = generate(one, {k: v.to(device) for k, v in inputs.items()}, cfg, backend)
    model, device_map = split(model, dry, args.out / "offload")
    result["device_map"] = {k: str(v) for k, v in device_map.items()}
    for backend in backends:
        t = time.time()
        out = generate(model, {k: v.to(device) for k, v in inputs.items()}, cfg, backend)
        ref = single[backend]
        rows = placement(model, out.past_key_values)
        result["checks"][backend] = {
            "same_tokens": bool(torch.equal(out.sequences.cpu(), ref.sequences.cpu())),
            "max_abs_dlogit": max(float((a.float().cpu() - b.float().cpu()).abs().max()) for a, b in zip(out.logits, ref.logits)),
            "placement_ok": all(r["cache"] == r["execution"] or (dry and r["execution"] in ("cpu", "meta")) for r in rows),
            "cache_devices": sorted({r["cache"] for r in rows}),
            "placement": rows,
            "seconds": round(time.time() - t, 1),
        }
        print(backend, {k: v for k, v in result["checks"][backend].items() if k != "placement"}, flush=True)
    (args.out / "multi_gpu.json").write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
