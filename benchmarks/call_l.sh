#!/usr/bin/env bash
# Device call of 2026-12-02 (eighth session), after call_k.sh chose the decode kernel's L2 prefetch distance: compiled
# decode of LLaMA-2-7B shape at 32K and 128K (KVQuant-3/4/2 against fp16 StaticCache, the eager and quanto rows left
# to the earlier calls) and the equal-memory throughput at 32K. carry: .whl
set -u
. "$(dirname "$0")/device_prelude.sh"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$OUT/nvidia-smi.txt"
python3 -c "import torch, transformers, triton; print('torch', torch.__version__, 'transformers', transformers.__version__, 'triton', triton.__version__)" > "$OUT/versions.txt"
T0=$(date +%s)
( timeout ${TOTAL:-570} python3 benchmarks/e2e.py --out "$OUT" --shapes ${SHAPES:-LLaMA-2-7B} --stages ${E2E_STAGES:-decode,throughput} \
    --contexts 32768,131072 --budget $(( ${TOTAL:-570} - 15 )) \
    --skip ${SKIP:-kvquant-3:eager,fp16-dynamic:eager,quanto-int4:eager,quanto-int2:eager} 2>&1 \
    | grep -v -i "warn\|perf_hints\|USDT"
  echo "total $(( $(date +%s) - T0 )) s" ) 2>&1 | tee "$OUT/call.log"
