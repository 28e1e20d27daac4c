"""Experiment (issue 14, lever 2): per-head key codebooks against one key codebook per layer.

    python benchmarks/head_codebooks.py [--windows 4] [--calibration-windows 8] [--bits 4,3]

For each width, the shipped SmolLM2 1% config with the long-context preset (the newest 128 tokens exact beside the
sink: what the issue's bars are checked on) in three forms that differ only in the key codebook: the shipped one;
one per layer refitted on ``--calibration-windows`` windows of the calibration text (the control: the same data
as the next row); one per KV head of each layer fitted on the same windows (Fisher-weighted k-means of the keys
normalized by the shipped per-channel ranges, the calibration's own recipe restricted to one head's channels).
Ranges, values, outliers and the sink are the shipped config's, so the bytes per token do not change (a per-head
codebook is 2**bits fp16 centroids per head in the config, nothing per token). Perplexity on the first
``--windows`` 2048-token windows of WikiText-2 and C4, simulated quantization as ``smollm2_results.py``. A research
probe, not a cache option: the results and the decision are in docs/results.md. Writes
docs/cpu_runs/head-codebooks-WINDOWSwindows/head_codebooks.json.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from transformers_kvquant.calibration import calibration_windows, collect_statistics  # noqa: E402
from transformers_kvquant.evaluation import simulation as sim  # noqa: E402
from transformers_kvquant.evaluation.datasets import default_calibration_path, load_text  # noqa: E402
from transformers_kvquant.evaluation.perplexity import make_method  # noqa: E402
from transformers_kvquant.models import load_model  # noqa: E402

from transformers_kvquant.quant.codebook import Codebook  # noqa: E402
from transformers_kvquant.quant.kmeans import SortedSamples, weighted_kmeans_1d  # noqa: E402
from transformers_kvquant.quant.quantizer import ChannelKeyQuantizer, fake_quantize  # noqa: E402

from probe_rows import perplexity_rows  # noqa: E402


def fit_books(stats, quantizers, bits: int, heads: int, head_dim: int, sink: int):
    """(per-layer books, per-head books [layer][head]) fitted on ``stats`` with the ranges of ``quantizers``."""
    per_layer, per_head = [], []
    for i, q in enumerate(quantizers):
        keys = stats.keys[i][:, sink:].reshape(-1, heads * head_dim)
        grads = stats.key_grads[i][:, sink:].reshape(-1, heads * head_dim)
        zero, scale = q.zero.reshape(-1), q.scale.reshape(-1)
        norm = (keys - zero) / scale
        weight = grads.square() * scale.square()
        inside = norm.abs() <= 1.0
        per_layer.append(Codebook(weighted_kmeans_1d(SortedSamples(norm[inside], weight[inside]), k=2**bits, seed=0)))
        books = []
        for h in range(heads):
            cols = slice(h * head_dim, (h + 1) * head_dim)
            n, w, m = norm[:, cols], weight[:, cols], inside[:, cols]
            books.append(Codebook(weighted_kmeans_1d(SortedSamples(n[m], w[m]), k=2**bits, seed=0)))
        per_head.append(books)
    return per_layer, per_head


class HeadBooks(sim.KVQuantMethod):
    """The shipped method with its key quantizer of each layer replaced: one codebook per layer or per KV head."""

    def __init__(self, config, books, label, recent_window):
        super().__init__(config, label=label, recent_window=recent_window)
        self._heads = []
        for i, q in enumerate(self._key_q):
            per = books[i] if isinstance(books[i], list) else [books[i]] * q.zero.shape[0]
            self._heads.append([ChannelKeyQuantizer(b, q.zero[h:h + 1], q.scale[h:h + 1], outliers=q.outliers,
                                                    head_slots=q.head_slots) for h, b in enumerate(per)])

    def keys_pre_rope(self, layer, keys):
        return torch.cat([fake_quantize(q, keys[:, h:h + 1]) for h, q in enumerate(self._heads[layer])], 1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--windows", type=int, default=4)
    ap.add_argument("--calibration-windows", type=int, default=8)
    ap.add_argument("--bits", default="4,3")
    ap.add_argument("--recent-window", type=int, default=128)
    args = ap.parse_args()
    torch.manual_seed(0)
    model, tok = load_model("smollm2")
    t0 = time.time()
    samples = calibration_windows(tok, load_text(default_calibration_path()), args.calibration_windows, 2048, 0)
    stats = collect_statistics(model, samples, progress=True)
    print(f"statistics {time.time() - t0:.0f} s", flush=True)
    hub = REPO / "hub_configs" / "smollm2-135m-instruct"
    text_cfg = model.config
    heads = text_cfg.num_key_value_heads
    head_dim = getattr(text_cfg, "head_dim", None) or text_cfg.hidden_size // text_cfg.num_attention_heads
    methods = {}
    for bits in (int(b) for b in args.bits.split(",")):
        base = make_method("kvquant", model, config=f"{hub}/nuq{bits}-1pct")
        per_layer, per_head = fit_books(stats, base._key_q, bits, heads, head_dim, base.config.sink_tokens)
        w = args.recent_window
        methods[f"shipped nuq{bits}-1%"] = sim.KVQuantMethod(base.config, recent_window=w, label=f"shipped-{bits}")
        methods[f"per-layer refit nuq{bits}-1%"] = HeadBooks(base.config, per_layer, f"layer-{bits}", w)
        methods[f"per-head nuq{bits}-1%"] = HeadBooks(base.config, per_head, f"head-{bits}", w)
    print(f"codebooks {time.time() - t0:.0f} s", flush=True)
    del stats
    res = {"args": vars(args), "rows": perplexity_rows(model, tok, methods, args.windows)}
    out = REPO / "docs" / "cpu_runs" / f"head-codebooks-{args.windows}windows"
    out.mkdir(parents=True, exist_ok=True)
    res["seconds"] = round(time.time() - t0, 1)
    (out / "head_codebooks.json").write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
