#!/usr/bin/env bash
# Device call of 2026-12-01 (fourth session): the compiled custom-operator tests, then the Llama-3-8B shape's H200
# capacity (nuq2, nuq3-1%, each proven by decode steps) and its compiled decode rows. carry: .whl .carry
set -u
. "$(dirname "$0")/device_prelude.sh"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$OUT/nvidia-smi.txt"
python3 -c "import torch, transformers, triton; print('torch', torch.__version__, 'transformers', transformers.__version__, 'triton', triton.__version__)" > "$OUT/versions.txt"
T0=$(date +%s)
left() { echo $(( ${TOTAL:-575} - ($(date +%s) - T0) )); }
( KVQUANT_TEST_COMPILED=1 timeout 150 python3 -m pytest -q -p no:cacheprovider tests/kernels/test_ops.py tests/kernels/test_dispatch.py tests/kernels/test_append.py 2>&1 | tail -6
  echo "== e2e $(( $(date +%s) - T0 )) s"
  timeout $(left) python3 benchmarks/e2e.py --out "$OUT/e2e" --shapes ${SHAPES:-Llama-3-8B} --stages ${E2E_STAGES:-capacity,decode} \
    --contexts 32768,131072 --capacity ${CAPACITY:-nuq2:8000000,nuq3-1%:4900000} --budget $(( $(left) - 15 )) \
    --skip ${SKIP:-quanto-int4:eager,quanto-int2:eager} 2>&1 | grep -v -i warn | grep -v perf_hints | tee "$OUT/e2e.log" | tail -30
  echo "total $(( $(date +%s) - T0 )) s" ) 2>&1 | tee "$OUT/call.log"
