#!/usr/bin/env bash
# Device call of 2026-12-03 (tenth session), the session's last device time: KVQuant-2 compiled decode at 128K
# beside fp16 StaticCache compiled in the same run (LLaMA-2-7B shape, batch 1; the e2e acceptance listed it as not
# measured). carry: .whl
set -u
. "$(dirname "$0")/device_prelude.sh"
T0=$(date +%s)
SKIPS=kvquant-3:compiled,kvquant-4:compiled,kvquant-3:eager,fp16-dynamic:eager,quanto-int4:eager,quanto-int2:eager
( timeout ${TOTAL:-230} python3 benchmarks/e2e.py --out "$OUT" --shapes LLaMA-2-7B --contexts 131072 --stages decode \
    --skip $SKIPS --steps 8 --budget $(( ${TOTAL:-230} - 10 )) 2>&1 | grep -v -i "warn\|perf_hints\|USDT"
  echo "total $(( $(date +%s) - T0 )) s" ) 2>&1 | tee "$OUT/call.log"
rm -f "$OUT/e2e.jsonl"
