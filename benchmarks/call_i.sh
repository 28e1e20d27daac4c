#!/usr/bin/env bash
# Device call of 2026-12-02 (seventh session): the append kernel's two-launch prefill path compiled (tests), the
# chunk attention's backends, then time to first token of LLaMA-2-7B shape at 32K and 128K (KVQuant-3 chunks of
# 16K and 32K against fp16's one forward) with the prefill's kernels profiled. carry: .whl
set -u
. "$(dirname "$0")/device_prelude.sh"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$OUT/nvidia-smi.txt"
python3 -c "import torch, transformers, triton; print('torch', torch.__version__, 'transformers', transformers.__version__, 'triton', triton.__version__)" > "$OUT/versions.txt"
T0=$(date +%s)
( KVQUANT_TEST_COMPILED=1 timeout 150 python3 -m pytest -q -p no:cacheprovider tests/kernels/test_append.py tests/kernels/test_ops.py 2>&1 | tail -4
  echo "== chunk attention $(( $(date +%s) - T0 )) s"
  timeout 90 python3 benchmarks/chunk_attention.py --out "$OUT" 2>&1 | grep -v -i warn
  echo "== ttft $(( $(date +%s) - T0 )) s"
  timeout $(( ${TOTAL:-560} - ($(date +%s) - T0) )) python3 benchmarks/e2e.py --out "$OUT" --shapes LLaMA-2-7B --stages ttft \
    --ttft-tokens ${TOKENS:-32768,131072} --chunk ${CHUNKS:-16384,32768} --profile-chunk ${PROFILE_CHUNK:-16384} \
    --budget $(( ${TOTAL:-560} - 20 - ($(date +%s) - T0) )) 2>&1 | grep -v -i "warn\|perf_hints\|USDT"
  echo "total $(( $(date +%s) - T0 )) s" ) 2>&1 | tee "$OUT/call.log"
