"""Probe (issue 14): does the way a prompt is prefilled decide the 2-bit passkey result?

    python benchmarks/passkey_prefill_probe.py [--bits 2] [--lengths 512,1024] [--samples 10] [--out DIR]

The passkey prompt through the long-context preset (the newest 128 tokens exact), three ways, then 8 greedy tokens:
fp (`DynamicCache`); the prompt in one forward, as `generate` does; one token at a time (each prompt token reads its
128 newest exactly, as a decode step does). Same prompts for the three. The committed result was measured before
chunk windows (integration/chunk_window.py), when a chunk was appended, then attended, and its queries read exactly
only the prompt's last 128 tokens; since then the two prefills differ only by rounding. A research probe on the CPU: the result and what it means are in
docs/results.md's long-context section. Writes DIR/passkey_prefill.json (default docs/cpu_runs/passkey-prefill).
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


@torch.no_grad()
def greedy_after(model, tok, cache, ids, chunk: int, new_tokens: int = 8) -> str:
    """Prefill ``ids`` into ``cache`` in chunks of ``chunk`` tokens, then decode ``new_tokens`` greedily."""
    for a in range(0, ids.shape[1], chunk):
        part = ids[:, a : a + chunk]
        pos = torch.arange(a, a + part.shape[1])
        out = model(part, past_key_values=cache, cache_position=pos, position_ids=pos[None], use_cache=True)
    toks, p = [], ids.shape[1]
    nxt = out.logits[:, -1].argmax(-1, keepdim=True)
    for _ in range(new_tokens):
        toks.append(nxt.item())
        pos = torch.tensor([p])
        p += 1
        out = model(nxt, past_key_values=cache, cache_position=pos, position_ids=pos[None], use_cache=True)
        nxt = out.logits[:, -1].argmax(-1, keepdim=True)
    return tok.decode(toks, skip_special_tokens=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--bits", type=int, default=2)
    ap.add_argument("--lengths", default="512,1024")
    ap.add_argument("--samples", type=int, default=10)
    ap.add_argument("--out", type=Path, default=REPO / "docs" / "cpu_runs" / "passkey-prefill")
    args = ap.parse_args()
    from transformers import DynamicCache

    from transformers_kvquant import KVQuantCache
    from transformers_kvquant.evaluation.passkey import passkey_prompt
    from transformers_kvquant.models import load_model

    model, tok = load_model("smollm2")
    cfg = {"bits": args.bits, "outlier_fraction": 0.01, "preset": "long-context"}
    lengths = [int(x) for x in args.lengths.split(",")]
    rng = random.Random(0)
    cases = [(n, rng.random(), rng.randint(10000, 99999)) for n in lengths for _ in range(args.samples)]
    ways = {"fp": (lambda: DynamicCache(config=model.config), None),
            "prompt in one forward": (lambda: KVQuantCache(model, **cfg), None),
            "prompt one token at a time": (lambda: KVQuantCache(model, **cfg), 1)}
    hits = {w: {n: 0 for n in lengths} for w in ways}
    t0 = time.time()
    for n, depth, key in cases:
        ids = passkey_prompt(tok, n, depth, key)
        for w, (make, chunk) in ways.items():
            hits[w][n] += int(str(key) in greedy_after(model, tok, make(), ids, chunk or ids.shape[1]))
        print(n, key, {w: h[n] for w, h in hits.items()}, f"{time.time() - t0:.0f} s", flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    result = {"config": cfg, "samples": args.samples, "seconds": round(time.time() - t0, 1),
              "accuracy": {w: {str(n): h / args.samples for n, h in d.items()} for w, d in hits.items()}}
    (args.out / "passkey_prefill.json").write_text(json.dumps(result, indent=1))
    print(json.dumps(result))


if __name__ == "__main__":
    main()
