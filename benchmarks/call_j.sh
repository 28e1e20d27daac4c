#!/usr/bin/env bash
# Device call of 2026-12-02 (seventh session): the prefill append by warps, the compiled append and dispatch tests
# (the padded square chunk attention runs there), then TTFT of LLaMA-2-7B shape at 32K and 128K with the padded chunk
# attention, KVQuant-3 in 16K and 32K chunks, the 16K prefill profiled. carry: .whl
set -u
. "$(dirname "$0")/device_prelude.sh"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$OUT/nvidia-smi.txt"
python3 -c "import torch, transformers, triton; print('torch', torch.__version__, 'transformers', transformers.__version__, 'triton', triton.__version__)" > "$OUT/versions.txt"
T0=$(date +%s)
( timeout 100 python3 benchmarks/append_prefill.py --out "$OUT" 2>&1 | grep -v -i warn
  echo "== tests $(( $(date +%s) - T0 )) s"
  KVQUANT_TEST_COMPILED=1 timeout 150 python3 -m pytest -q -p no:cacheprovider tests/kernels/test_append.py tests/kernels/test_dispatch.py 2>&1 | tail -4
  echo "== ttft $(( $(date +%s) - T0 )) s"
  timeout $(( ${TOTAL:-560} - ($(date +%s) - T0) )) python3 benchmarks/e2e.py --out "$OUT" --shapes LLaMA-2-7B --stages ttft \
    --ttft-tokens ${TOKENS:-32768,131072} --chunk ${CHUNKS:-16384,32768} --profile-chunk ${PROFILE_CHUNK:-16384} \
    --budget $(( ${TOTAL:-560} - 20 - ($(date +%s) - T0) )) 2>&1 | grep -v -i "warn\|perf_hints\|USDT"
  echo "total $(( $(date +%s) - T0 )) s" ) 2>&1 | tee "$OUT/call.log"
