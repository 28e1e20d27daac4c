#!/usr/bin/env bash
# Device call of 2026-12-03 (eleventh session): the compiled decode rows that were never measured at 128K, KVQuant-4
# and KVQuant-2 (LLaMA-2-7B shape, batch 1), beside KVQuant-3 and fp16 StaticCache compiled in the same run, at 32K
# and 128K. carry: .whl
set -u
. "$(dirname "$0")/device_prelude.sh"
T0=$(date +%s)
left() { echo $(( ${TOTAL:-560} - ($(date +%s) - T0) )); }
SKIPS=fp16-dynamic:eager,quanto-int4:eager,quanto-int2:eager,kvquant-3:eager
( python3 -c "import torch, transformers, triton; print('torch', torch.__version__, 'transformers', transformers.__version__, 'triton', triton.__version__)"
  for c in 131072 32768; do
    mkdir -p "$OUT/c$c"
    timeout $(( $(left) - 5 )) python3 benchmarks/e2e.py --out "$OUT/c$c" --shapes LLaMA-2-7B --contexts $c --stages decode \
      --skip $SKIPS --steps 8 --budget $(( $(left) - 10 )) 2>&1 | grep -v -i "warn\|perf_hints\|USDT"
    rm -f "$OUT/c$c/e2e.jsonl"
    echo "$c done at $(( $(date +%s) - T0 )) s"
  done ) 2>&1 | tee "$OUT/call.log"
