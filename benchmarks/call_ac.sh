#!/usr/bin/env bash
# Device call of 2026-12-03 (fourteenth session): the equal-memory throughput rows at 32K remeasured (fp16
# StaticCache batch 4 against KVQuant-3 at the batch whose cache fits in the same bytes, LLaMA-2-7B shape), last
# measured at h200-2026-12-03/call3, before the keys decoded straight into the tensor-core operand and the shared
# positions. carry: .whl
set -u
. "$(dirname "$0")/device_prelude.sh"
T0=$(date +%s)
left() { echo $(( ${TOTAL:-300} - ($(date +%s) - T0) )); }
( python3 -c "import torch, transformers, triton; print('torch', torch.__version__, 'transformers', transformers.__version__, 'triton', triton.__version__)"
  mkdir -p "$OUT/throughput"
  timeout $(( $(left) - 5 )) python3 benchmarks/e2e.py --out "$OUT/throughput" --shapes LLaMA-2-7B --contexts 32768 \
    --stages throughput --steps 8 --budget $(( $(left) - 10 )) 2>&1 | grep -v -i "warn\|perf_hints\|USDT"
  echo "total $(( $(date +%s) - T0 )) s" ) 2>&1 | tee "$OUT/call.log"
rm -f "$OUT/throughput/e2e.jsonl"
