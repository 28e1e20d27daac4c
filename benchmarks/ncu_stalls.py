"""Where a profiled kernel's warps stall, from Nsight Compute's source page (SASS with sampled stall reasons).

    python benchmarks/ncu_stalls.py docs/gpu_runs/h200-2026-12-03d/call1/ncu_sass_MHA_1_131072_nuq3-1p.csv.gz [...]

The CSV is ``ncu -i REPORT --page source --csv --print-source sass`` (benchmarks/call_w.sh writes it, gzipped here).
Prints, per file: the stall reasons over all samples; each loop (a backward branch executed more than 5000 times)
with its instructions, its share of the samples and its stall reasons; and the instructions with the most samples.
"""

from __future__ import annotations

import collections
import csv
import gzip
import io
import re
import sys
from pathlib import Path


def read(path: Path) -> tuple[list[str], list[list[str]]]:
    raw = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
    rows = list(csv.reader(io.StringIO(raw.decode())))
    return rows[1], rows[2:]  # row 0 names the kernel


def stalls(header, rows) -> collections.Counter:
    cols = [(i, h[6:]) for i, h in enumerate(header) if h.startswith("stall_") and "Not Issued" not in h]
    total = collections.Counter()
    for r in rows:
        for i, name in cols:
            total[name] += int(r[i] or 0)
    return total


def shares(counter: collections.Counter, top: int) -> str:
    n = sum(counter.values()) or 1
    return ", ".join(f"{k} {100 * v / n:.0f}%" for k, v in counter.most_common(top))


def main() -> None:
    for name in sys.argv[1:]:
        header, rows = read(Path(name))
        col = {h: i for i, h in enumerate(header)}
        samples = [int(r[col["Warp Stall Sampling (All Samples)"]] or 0) for r in rows]
        total = sum(samples) or 1
        print(f"== {name}: {total} samples; {shares(stalls(header, rows), 8)}")
        addr = [int(r[col["Address"]], 16) for r in rows]
        for i, r in enumerate(rows):
            m = re.search(r"BRA (0x[0-9a-f]+)", r[col["Source"]])
            if m and int(m.group(1), 16) < addr[i] and int(r[col["Instructions Executed"]] or 0) > 5000:
                j = addr.index(int(m.group(1), 16))
                body = rows[j : i + 1]
                print(f"   loop of {len(body)} instructions: {100 * sum(samples[j:i + 1]) / total:.1f}% of the samples; "
                      f"{shares(stalls(header, body), 5)}")
        order = sorted(range(len(rows)), key=lambda k: -samples[k])[:6]
        for k in order:
            print(f"   {100 * samples[k] / total:5.1f}%  {rows[k][col['Source']].strip()[:70]}")


if __name__ == "__main__":
    main()
