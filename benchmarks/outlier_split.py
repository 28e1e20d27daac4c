"""Experiment (issue 14): the outlier budget split between keys and values, and more sink tokens, at equal bytes.

    python benchmarks/outlier_split.py [--windows 8] [--bits 4] [--rows LABEL,...]

The shipped SmolLM2 1% config of each width with the long-context preset (newest 128 tokens exact beside the sink)
stores S = ceil(0.01 * 64) = 1 outlier per (token, KV head) for keys and 1 for values. Rows: that split (k1/v1),
both slots to keys (k2/v0), both to values (k0/v2), each at the same bytes per token (a slot is a 16-bit residual
and an 8-bit channel either way); k1/v1 with 4 sink tokens (constant bytes in the context); and values with a zero
and scale per (token, KV head) instead of per token over all heads (0.17 more bits per element at 3 heads x 64),
with k1/v0 (about the shipped bytes), k2/v0 and k1/v1. Perplexity on the first ``--windows`` 2048-token windows of WikiText-2 and C4 through the simulation
harness of ``smollm2_results.py``. A research probe: results and decision in docs/results.md. Writes
docs/cpu_runs/outlier-split-WINDOWSwindows/outlier_split.json.
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

from transformers_kvquant.evaluation import simulation as sim  # noqa: E402
from transformers_kvquant.evaluation.perplexity import make_method  # noqa: E402
from transformers_kvquant.models import load_model  # noqa: E402

from probe_rows import perplexity_rows  # noqa: E402


class SplitOutliers(sim.KVQuantMethod):
    """The shipped method with ``key_slots`` outliers per (token, head) for keys and ``value_slots`` for values."""

    def __init__(self, config, key_slots: int, value_slots: int, **kw):
        super().__init__(config, **kw)
        for q in self._key_q:
            q.head_slots = key_slots
            q.outliers = key_slots > 0
        for q in self._value_q:
            q.slots = value_slots


class HeadValueRanges(SplitOutliers):
    """Values with a zero and scale per (token, KV head) instead of per token over all heads, ``value_slots``
    outliers per (token, head), ``key_slots`` for keys (the shipped value codebook)."""

    def avg_bits(self, heads, head_dim, tokens):
        """The shipped layout's bits plus a 16-bit zero and scale per (token, head) beyond the first head's."""
        return super().avg_bits(heads, head_dim, tokens) + 32 * (heads - 1) / (2 * heads * head_dim)

    def values(self, layer, values):
        q = self._value_q[layer]
        return torch.cat([sim.fake_quantize(q, values[:, h : h + 1]) for h in range(values.shape[1])], 1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--windows", type=int, default=8)
    ap.add_argument("--bits", default="4")
    ap.add_argument("--recent-window", type=int, default=128)
    ap.add_argument("--rows", default="", help="only the rows whose label contains one of these, comma-separated")
    args = ap.parse_args()
    torch.manual_seed(0)
    model, tok = load_model("smollm2")
    hub = REPO / "hub_configs" / "smollm2-135m-instruct"
    w = args.recent_window
    methods = {}
    for bits in (int(b) for b in args.bits.split(",")):
        cfg = make_method("kvquant", model, config=f"{hub}/nuq{bits}-1pct").config
        methods[f"nuq{bits}-1% k1/v1 (shipped)"] = sim.KVQuantMethod(cfg, recent_window=w, label=f"k1v1-{bits}")
        methods[f"nuq{bits}-1% k2/v0"] = SplitOutliers(cfg, 2, 0, recent_window=w, label=f"k2v0-{bits}")
        methods[f"nuq{bits}-1% k0/v2"] = SplitOutliers(cfg, 0, 2, recent_window=w, label=f"k0v2-{bits}")
        # more slots than the shipped bytes, up to KIVI-4's bits at 128K (5.01): is there a point that dominates it?
        for ks, vs in ((2, 1), (3, 0), (3, 1), (2, 2)):
            methods[f"nuq{bits}-1% k{ks}/v{vs}"] = SplitOutliers(cfg, ks, vs, recent_window=w, label=f"k{ks}v{vs}-{bits}")
        methods[f"nuq{bits}-1% k1/v1 sink 4"] = sim.KVQuantMethod(cfg, recent_window=w, sink_tokens=4, label=f"sink4-{bits}")
        methods[f"nuq{bits}-1% head value ranges k1/v0"] = HeadValueRanges(cfg, 1, 0, recent_window=w, label=f"hv10-{bits}")
        methods[f"nuq{bits}-1% head value ranges k2/v0"] = HeadValueRanges(cfg, 2, 0, recent_window=w, label=f"hv20-{bits}")
        methods[f"nuq{bits}-1% head value ranges k1/v1"] = HeadValueRanges(cfg, 1, 1, recent_window=w, label=f"hv11-{bits}")
    if args.rows:
        methods = {k: m for k, m in methods.items() if any(r in k for r in args.rows.split(","))}
    t0 = time.time()
    res = {"args": vars(args), "rows": perplexity_rows(model, tok, methods, args.windows)}
    out = REPO / "docs" / "cpu_runs" / f"outlier-split-{args.windows}windows"
    out.mkdir(parents=True, exist_ok=True)
    res["seconds"] = round(time.time() - t0, 1)
    path = out / "outlier_split.json"
    if path.exists() and args.rows:  # a run of some rows adds to the earlier runs' (same windows)
        old = json.loads(path.read_text())
        res["rows"] = {**old["rows"], **res["rows"]}
        res["seconds"] = round(old["seconds"] + res["seconds"], 1)
        res["args"] = {**old["args"], "rows": "all"}
    path.write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
