"""Perplexity rows of the research probes (head_codebooks.py, outlier_split.py): fp and each method on the first
``windows`` 2048-token windows of WikiText-2 and of the C4 sample (documents 150 on, past the calibration text), as
``{label: {dataset: {"ppl", "bits"}}}``, each row printed as it is measured."""

from __future__ import annotations

from pathlib import Path

from transformers_kvquant.evaluation.datasets import load_text, parse_documents
from transformers_kvquant.evaluation.perplexity import evaluate_perplexity, token_windows

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"


def perplexity_rows(model, tok, methods: dict, windows: int) -> dict:
    rows: dict = {}
    for name, text in (("wikitext2", load_text(str(SHARED / "wikitext-2-raw" / "wiki.test.raw"))),
                       ("c4", load_text(str(SHARED / "c4" / "c4-validation-sample-2k.jsonl"), parse_documents("150:")))):
        wins = token_windows(tok, text, 2048, windows)
        for label, m in [("fp", None), *methods.items()]:
            r = evaluate_perplexity(model, wins, m, progress=False)
            print(f"{name} {label:28s} ppl {r.ppl:8.3f} bits {r.avg_bits:.3f} ({r.seconds:.0f}s)", flush=True)
            rows.setdefault(label, {})[name] = {"ppl": r.ppl, "bits": r.avg_bits}
    return rows
