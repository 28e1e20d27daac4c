#!/usr/bin/env bash
# Device call of 2026-12-03 (tenth session), after call_o.sh: KVQuant-3's compiled decode rows at 32K and 128K
# again, with the cache's GiB counted by storage (call_o.sh counted each view of the one-buffer cache as the whole
# buffer). LLaMA-2-7B shape, batch 1; fp16 StaticCache's rows of the same contexts are call_o.sh's. carry: .whl
set -u
. "$(dirname "$0")/device_prelude.sh"
T0=$(date +%s)
SKIPS=fp16-dynamic:eager,fp16-static:compiled,quanto-int4:eager,quanto-int2:eager,kvquant-3:eager,kvquant-4:compiled,kvquant-2:compiled
( python3 -c "import torch, transformers, triton; print('torch', torch.__version__, 'transformers', transformers.__version__, 'triton', triton.__version__)"
  timeout ${TOTAL:-300} python3 benchmarks/e2e.py --out "$OUT" --shapes LLaMA-2-7B --contexts 32768,131072 --stages decode \
    --skip $SKIPS --steps 8 --budget $(( ${TOTAL:-300} - 15 )) 2>&1 | grep -v -i "warn\|perf_hints\|USDT"
  echo "total $(( $(date +%s) - T0 )) s" ) 2>&1 | tee "$OUT/call.log"
rm -f "$OUT/e2e.jsonl"
