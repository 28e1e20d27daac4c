"""Perplexity over the late tokens of each window only: does an exact recent window help where every scored token
also sees quantized keys?

    python benchmarks/tail_perplexity.py [--windows 8] [--score-from 1024] [--recent 128,512]

In the harness's 2,048-token windows a recent window of W exact tokens covers the whole context of a window's first W
tokens: they see no quantized key at all, which flatters long windows. Here only positions ``>= --score-from`` are
scored (each then sees at least ``score_from - W`` quantized keys), for fp and the shipped 4-bit 1% config with each
exact window, on the first ``--windows`` windows of WikiText-2 and the C4 sample (as probe_rows.py). Writes
docs/cpu_runs/tail-ppl-WINDOWSwindows/tail_ppl.json.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from probe_rows import SHARED  # noqa: E402
from transformers_kvquant.evaluation.datasets import load_text, parse_documents  # noqa: E402
from transformers_kvquant.evaluation.perplexity import make_method, token_windows  # noqa: E402
from transformers_kvquant.evaluation.simulation import SimulationCache  # noqa: E402
from transformers_kvquant.integration.compat import cache_argument  # noqa: E402
from transformers_kvquant.models import load_model  # noqa: E402


@torch.no_grad()
def tail_ppl(model, windows, method, score_from: int) -> float:
    nll, n = 0.0, 0
    for i in range(windows.shape[0]):
        ids = windows[i : i + 1]
        kw = {} if method is None else {"use_cache": True, **cache_argument(model, SimulationCache(model, method))}
        logits = model(input_ids=ids, **({"use_cache": False} if method is None else kw)).logits
        pred, target = logits[0, score_from - 1 : -1].float(), ids[0, score_from:]
        nll += float(torch.nn.functional.cross_entropy(pred, target, reduction="sum"))
        n += target.numel()
    return math.exp(nll / n)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--windows", type=int, default=8)
    ap.add_argument("--score-from", type=int, default=1024)
    ap.add_argument("--recent", default="128,512")
    args = ap.parse_args()
    model, tok = load_model("smollm2")
    methods = {"fp": None}
    for w in map(int, args.recent.split(",")):
        methods[f"kvquant 4-bit 1% + window {w}"] = make_method("kvquant", model, bits=4, outlier_fraction=0.01, recent_window=w)
    out = {"score_from": args.score_from, "windows": args.windows, "rows": {}}
    for name, text in (("wikitext2", load_text(str(SHARED / "wikitext-2-raw" / "wiki.test.raw"))),
                       ("c4", load_text(str(SHARED / "c4" / "c4-validation-sample-2k.jsonl"), parse_documents("150:")))):
        wins = token_windows(tok, text, 2048, args.windows)
        for label, m in methods.items():
            t = time.time()
            ppl = tail_ppl(model, wins, m, args.score_from)
            out["rows"].setdefault(label, {})[name] = ppl
            fp = out["rows"]["fp"][name]
            print(f"{name} {label:32s} tail ppl {ppl:8.3f} ({100 * (ppl / fp - 1):+.2f}%) ({time.time() - t:.0f} s)", flush=True)
    folder = REPO / "docs" / "cpu_runs" / f"tail-ppl-{args.windows}windows"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "tail_ppl.json").write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
