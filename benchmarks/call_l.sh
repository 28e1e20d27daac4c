#!/usr/bin/env bash
# Device call of 2026-12-02 (eighth session): the longest prompts' time to first token for the LLaMA-2-7B shape,
# KVQuant-3 in 32K chunks over the packed prefix (fp16 cannot hold 256K: 128 GiB of K/V beside 13 GiB of weights),
# one timed prefill each after a short warm-up. carry: .whl
set -u
. "$(dirname "$0")/device_prelude.sh"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$OUT/nvidia-smi.txt"
python3 -c "import torch, transformers, triton; print('torch', torch.__version__, 'transformers', transformers.__version__, 'triton', triton.__version__)" > "$OUT/versions.txt"
T0=$(date +%s)
( PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True timeout ${TOTAL:-575} python3 benchmarks/e2e.py --out "$OUT" --shapes LLaMA-2-7B --stages ttft --ttft-once \
    --ttft-tokens ${TOKENS:-524288} --chunk ${CHUNKS:-32768} --skip fp16-dynamic:ttft \
    --budget $(( ${TOTAL:-575} - 15 )) 2>&1 | grep -v -i "warn\|perf_hints\|USDT"
  echo "total $(( $(date +%s) - T0 )) s" ) 2>&1 | tee "$OUT/call.log"
