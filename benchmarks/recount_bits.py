"""Recount the average bits of finished perplexity runs with the cache's current byte accounting.

    python benchmarks/recount_bits.py docs/cpu_runs/long-context-40windows
    python benchmarks/recount_bits.py --at-128k docs/cpu_runs/outliers-40windows

Perplexity does not depend on how the cache lays its bytes out, the bits do: since 2026-12-03 the slots' RoPE
positions are kept once per cache instead of once per layer (quant/store.py, ``SharedPositions``). This rebuilds each
row's method from the config the row names (its window and outlier layout from its label: ``+ window N``,
``(long-context preset)``, ``bounded`` / ``uncapped``) and rewrites ``avg_bits`` (at the run's 2,048 tokens) and,
where the row has it (every row with ``--at-128k``), ``avg_bits_128k``, keeping the earlier values as
``*_before_recount``. SmolLM2's geometry
(3 KV heads x 64).
"""

from __future__ import annotations

import json
import re
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

HEADS, HEAD_DIM = 3, 64


def method_of(row: dict):
    from transformers_kvquant.config import load_config_file
    from transformers_kvquant.evaluation.simulation import KVQuantMethod

    label, config = row["label"], row.get("config")
    if not config:
        return None
    path = Path(config)
    path = path if path.is_absolute() else REPO / path
    if not path.exists():  # an absolute path of the machine that ran it: the part from docs/ on
        path = REPO / re.sub(r"^.*?(docs/)", r"\1", str(config))
    window = 128 if "long-context" in label else int(m.group(1)) if (m := re.search(r"\+ window (\d+)", label)) else None
    outliers = "uncapped" if "uncapped" in label else "bounded"
    return KVQuantMethod(load_config_file(path / "kvquant_config.json"), recent_window=window, outliers=outliers)


def main() -> None:
    args = [a for a in sys.argv[1:] if a != "--at-128k"]
    every_128k = "--at-128k" in sys.argv  # bits at 128K for every row, not only where the run counted them
    for folder in map(Path, args):
        f = folder / "ppl.json"
        data = json.loads(f.read_text())
        counted = {}
        for rows in data["result"].values():
            for row in rows:
                if row["label"] not in counted:
                    method = method_of(row)
                    counted[row["label"]] = None if method is None else (
                        method.avg_bits(HEADS, HEAD_DIM, 2048),
                        method.avg_bits(HEADS, HEAD_DIM, 131072) if every_128k or "avg_bits_128k" in row else None)
                bits = counted[row["label"]]
                if bits is None:
                    continue
                row.setdefault("avg_bits_before_recount", row["avg_bits"])
                row["avg_bits"] = bits[0]
                if bits[1] is not None:
                    if "avg_bits_128k" in row:
                        row.setdefault("avg_bits_128k_before_recount", row["avg_bits_128k"])
                    row["avg_bits_128k"] = round(bits[1], 3)
                print(f"{folder.name}: {row['label']}: {row['avg_bits_before_recount']:.3f} -> {row['avg_bits']:.3f}"
                      + (f", at 128K {row.get('avg_bits_128k_before_recount', '-')} -> {row['avg_bits_128k']}" if bits[1] else ""),
                      flush=True)
        data["bits_recounted"] = (f"{time.strftime('%Y-%m-%d')}: benchmarks/recount_bits.py, the slots' positions once per "
                                  "cache instead of once per layer")
        f.write_text(json.dumps(data, indent=1))


if __name__ == "__main__":
    main()
