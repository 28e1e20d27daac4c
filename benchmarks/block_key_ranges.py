"""Experiment (issue 14, lever 2): block-wise per-channel key ranges computed online, against calibrated ranges.

    python benchmarks/block_key_ranges.py BLOCK WINDOWS [block|ablate]     # e.g. 128 4 block, then 128 4 ablate

``block``: each block of BLOCK tokens gets its own per-channel (pre-RoPE) key zero and scale when it completes
(fp16, counted in the bits), the keys of the open block stay exact until then (a query sees the keys of its own
block exactly), and the key codebook is refitted (Fisher-weighted k-means, 4 calibration windows) on keys
normalized that way; values, outliers (bounded) and the sink are the shipped 1% config's. ``ablate``: the shipped
calibrated ranges with the same exact open block, to separate what the ranges give from what the exact keys give.
Perplexity on the first WINDOWS 2048-token windows of WikiText-2 and C4 (simulated quantization, as
``smollm2_results.py``). Average bits as the harness counts them at 2048 tokens (the exact open block is counted as a
ring of the block plus 64 slots; at 128K it is negligible). A research probe, not a cache option: the results and
the decision are in docs/results.md. Writes docs/cpu_runs/block-keys-WINDOWSwindows/blockBLOCK_MODE.json.
"""
import json
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "data"
sys.path.insert(0, str(REPO))
from transformers_kvquant.models import load_model
from transformers_kvquant.calibration import calibration_windows, collect_statistics
from transformers_kvquant.evaluation.datasets import default_calibration_path, load_text, parse_documents
from transformers_kvquant.evaluation.perplexity import evaluate_perplexity, make_method, token_windows
from transformers_kvquant.evaluation import simulation as sim
from transformers_kvquant.quant.codebook import Codebook
from transformers_kvquant.quant.kmeans import SortedSamples, weighted_kmeans_1d
from transformers_kvquant.kernels.naive import quantize_keys
from transformers_kvquant.quant.quantizer import add_residuals

BLOCK = int(sys.argv[1]) if len(sys.argv) > 1 else 128
NWIN = int(sys.argv[2]) if len(sys.argv) > 2 else 4
MODE = sys.argv[3] if len(sys.argv) > 3 else "block"
torch.manual_seed(0)
model, tok = load_model("smollm2")
t0 = time.time()

def block_ranges(x, block, sink):
    """x [N, L, C] -> zero, scale [N, L//block, C] (sink tokens left out), fp16-rounded."""
    n, l, c = x.shape
    xb = x.view(n, l // block, block, c).clone()
    hi = xb.clone(); lo = xb.clone()
    hi[:, 0, :sink] = -float("inf"); lo[:, 0, :sink] = float("inf")
    hi, lo = hi.amax(2), lo.amin(2)
    zero = ((hi + lo) / 2).half().float(); scale = ((hi - lo) / 2).half().float().clamp_min(1e-6)
    return zero, scale

books = {3: None, 2: None}
if MODE != "ablate":
    samples = calibration_windows(tok, load_text(default_calibration_path()), 4, 2048, 0)
    stats = collect_statistics(model, samples, progress=False)
    print("stats", time.time() - t0, flush=True)
for bits in ((3, 2) if MODE != "ablate" else ()):
    books[bits] = []
    for i in range(stats.num_layers):
        k, g = stats.keys[i], stats.key_grads[i]
        n, l, c = k.shape
        zero, scale = block_ranges(k, BLOCK, 1)
        zr = zero.repeat_interleave(BLOCK, 1); sr = scale.repeat_interleave(BLOCK, 1)
        norm = ((k - zr) / sr)[:, 1:].reshape(-1)
        w = (g.square() * sr.square())[:, 1:].reshape(-1)
        books[bits].append(Codebook(weighted_kmeans_1d(SortedSamples(norm, w), k=2**bits, seed=0)))
print("fit", time.time() - t0, flush=True)

class BlockKeys(sim.KVQuantMethod):
    def __init__(self, config, books, block, label):
        super().__init__(config, label=label)
        self.books, self.block = books, block
        self.window = 1  # streaming attention path; exactness by block below
    calibrated_ranges = False
    def keys_pre_rope(self, layer, keys):
        if self.calibrated_ranges:
            return super().keys_pre_rope(layer, keys)
        t = keys.shape[2]
        x = keys.float()
        book = self.books[layer]
        table = book.decode_table(x.device)
        out = torch.empty_like(x)
        slots = self._key_q[layer].head_slots or 0
        for a in range(0, t, self.block):
            xb = x[:, :, a:a + self.block]
            src = xb if a else xb[:, :, self.sink_tokens:]
            hi, lo = src.amax(2), src.amin(2)  # [B, H, D]
            zero = ((hi + lo) / 2).half().float(); scale = ((hi - lo) / 2).half().float().clamp_min(1e-6)
            # quantize_keys takes [H, D] zero/scale: batch 1 here
            codes, res, idx = quantize_keys(xb, zero[0], scale[0], book.boundaries, table, slots)
            deq = table[codes.long()] * scale[0][None, :, None, :] + zero[0][None, :, None, :]
            out[:, :, a:a + self.block] = add_residuals(deq, res, idx)
        return out.to(keys.dtype)
    def exact_pairs(self, query_pos, key_pos):
        # the keys of the open block exact (its ranges are not known yet); values quantized at once (per token)
        sink = key_pos < self.sink_tokens
        return (query_pos // self.block == key_pos // self.block) | sink, sink

    def avg_bits(self, heads, head_dim, tokens):
        base = super().avg_bits(heads, head_dim, tokens)
        # + key ranges: 32 bits per channel per block (over K and V: half); the open block's keys exact in 16 bits
        return base + 0.5 * (32 / self.block) + 0.5 * 16 * self.block / tokens


hub = REPO / "hub_configs" / "smollm2-135m-instruct"
res = {}
for name, text in (("wikitext2", load_text(str(SHARED / "wikitext-2-raw" / "wiki.test.raw"))),
                   ("c4", load_text(str(SHARED / "c4" / "c4-validation-sample-2k.jsonl"), parse_documents("150:")))):
    wins = token_windows(tok, text, 2048, NWIN)
    rows = [] if MODE == "ablate" else [("fp", None)]
    for bits in (3, 2):
        base = make_method("kvquant", model, config=f"{hub}/nuq{bits}-1pct")
        rows.append((f"shipped nuq{bits}-1%", base))
        if MODE == "ablate":
            m = BlockKeys(base.config, books[bits], BLOCK, f"open-block-exact-{bits}")
            m.calibrated_ranges = True
            rows[-1:] = []
            rows.append((f"nuq{bits}-1% open block exact", m))
        else:
            rows.append((f"block{BLOCK} nuq{bits}-1%", BlockKeys(base.config, books[bits], BLOCK, f"block{BLOCK}-{bits}")))
    for label, m in rows:
        r = evaluate_perplexity(model, wins, m, progress=False)
        print(f"{name} {label:22s} ppl {r.ppl:8.3f} bits {r.avg_bits:.3f} ({r.seconds:.0f}s)", flush=True)
        res.setdefault(name, []).append((label, r.ppl, r.avg_bits))
out = REPO / "docs" / "cpu_runs" / f"block-keys-{NWIN}windows"
out.mkdir(parents=True, exist_ok=True)
(out / f"block{BLOCK}_{MODE}.json").write_text(json.dumps(res, indent=1))
