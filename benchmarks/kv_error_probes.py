"""Quick probes of where SmolLM2's remaining quantization error sits, on a few WikiText-2 windows (CPU minutes).

    python benchmarks/kv_error_probes.py --out docs/cpu_runs/kv-probes-4windows [--windows 4]

Rows, each with the long-context preset's exact window of 128 (the preset the bars are met with):
- ``K only`` / ``V only``: the shipped 4- and 3-bit 1% configs quantizing keys alone, or values alone;
- ``K s / V t``: the bounded outlier slots per (token, KV head) split between keys and values otherwise than the
  shipped one each (1 / 1 at 1% of 64 channels), with the bits that costs at 128K;
- ``sink N``: more exact leading tokens than the shipped 1.

Writes ``probes.json`` and ``probes.log`` in ``--out``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "data"


class _KeysOnly:
    """A method that quantizes what ``method`` quantizes, except the values."""

    def __init__(self, method):
        self.method = method

    def __getattr__(self, name):
        return getattr(self.method, name)

    def values(self, layer, values):
        return values


class _ValuesOnly(_KeysOnly):
    def keys_pre_rope(self, layer, keys):
        return keys

    def values(self, layer, values):
        return self.method.values(layer, values)


def main(argv=None) -> int:
    sys.path.insert(0, str(REPO))
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--windows", type=int, default=4)
    ap.add_argument("--wikitext", default=str(SHARED / "wikitext-2-raw" / "wiki.test.raw"))
    args = ap.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)

    import transformers_kvquant  # noqa: F401
    from transformers_kvquant.evaluation.datasets import load_text
    from transformers_kvquant.evaluation.perplexity import evaluate_perplexity, make_method, token_windows
    from transformers_kvquant.models import load_model
    from transformers_kvquant.quant.quantizer import ChannelKeyQuantizer, TokenQuantizer

    model, tok = load_model("smollm2")
    windows = token_windows(tok, load_text(args.wikitext), 2048, args.windows)
    log = open(args.out / "probes.log", "w")

    def preset(bits, **kw):
        return make_method("kvquant", model, bits=bits, outlier_fraction=0.01, recent_window=128, **kw)

    def slots(bits, sk, sv):
        m = preset(bits)
        for i, layer in enumerate(m.config.layers):
            m._key_q[i] = ChannelKeyQuantizer(layer.key_codebook, layer.key_zero, layer.key_scale, outliers=sk > 0, head_slots=sk)
            m._value_q[i] = TokenQuantizer(layer.value_codebook, sv, per_head=True)
        return m

    rows = [("fp", None, None)]
    for bits in (4, 3):
        m = preset(bits)
        rows += [(f"{bits}-bit 1% + window 128", m, m), (f"{bits}-bit K only", _KeysOnly(m), m), (f"{bits}-bit V only", _ValuesOnly(m), m)]
    for bits, sk, sv in ((4, 2, 0), (4, 2, 1)):
        m = slots(bits, sk, sv)
        rows.append((f"{bits}-bit K {sk} / V {sv} slots", m, m))
    for bits, sink in ((4, 16),):
        m = preset(bits, sink_tokens=sink)
        rows.append((f"{bits}-bit sink {sink}", m, m))
    out, fp = [], None
    for label, method, store in rows:
        start = time.time()
        r = evaluate_perplexity(model, windows, method, progress=False)
        fp = r.ppl if method is None else fp
        row = {"label": label, "ppl": r.ppl, "delta_pct": 100 * (r.ppl / fp - 1), "windows": args.windows,
               "bits_128k": store.avg_bits(3, 64, 131072) if store else 16.0, "seconds": round(time.time() - start, 1)}
        out.append(row)
        line = f"{label:28s} ppl {r.ppl:8.4f} {row['delta_pct']:+6.2f}%  bits at 128K {row['bits_128k']:.3f}  ({row['seconds']:.0f} s)"
        print(line, flush=True)
        log.write(line + "\n")
        log.flush()
        (args.out / "probes.json").write_text(json.dumps({"dataset": "WikiText-2 raw test", "rows": out}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
