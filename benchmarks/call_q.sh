#!/usr/bin/env bash
# Device call of 2026-12-03 (tenth session), after 7a922e4 (two tensors per layer in a compiled step): the compiled
# decode step's trace and decode rows at 32K (KVQuant-3 against fp16 StaticCache, LLaMA-2-7B shape, as call_o.sh),
# then the equal-memory throughput rows at 32K (fp16 StaticCache batch 4 against KVQuant-3 at the batch whose cache
# fits in the same bytes). carry: .whl
set -u
. "$(dirname "$0")/device_prelude.sh"
T0=$(date +%s)
left() { echo $(( ${TOTAL:-560} - ($(date +%s) - T0) )); }
SKIPS=fp16-dynamic:eager,quanto-int4:eager,quanto-int2:eager,kvquant-3:eager,kvquant-4:compiled,kvquant-2:compiled
( python3 -c "import torch, transformers, triton; print('torch', torch.__version__, 'transformers', transformers.__version__, 'triton', triton.__version__)"
  timeout $(left) python3 benchmarks/e2e.py --out "$OUT" --shapes LLaMA-2-7B --contexts 32768 --stages trace,decode \
    --skip $SKIPS --steps 8 --budget $(( $(left) - 240 )) 2>&1 | grep -v -i "warn\|perf_hints\|USDT"
  echo "32K $(( $(date +%s) - T0 )) s"
  mkdir -p "$OUT/throughput"
  timeout $(( $(left) - 5 )) python3 benchmarks/e2e.py --out "$OUT/throughput" --shapes LLaMA-2-7B --contexts 32768 \
    --stages throughput --steps 8 --budget $(( $(left) - 10 )) 2>&1 | grep -v -i "warn\|perf_hints\|USDT"
  echo "total $(( $(date +%s) - T0 )) s" ) 2>&1 | tee "$OUT/call.log"
rm -f "$OUT/e2e.jsonl" "$OUT/throughput/e2e.jsonl"
