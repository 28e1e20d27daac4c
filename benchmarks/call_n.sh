#!/usr/bin/env bash
# Device call of 2026-12-02 (ninth session): what the prefill chunks' exact window costs the time to first token,
# LLaMA-2-7B shape, 32K prompt: fp16 DynamicCache, KVQuant-3, and KVQuant-3 with the long-context preset's window of
# 128 tokens (each chunk's query reads its own 128 newest exactly, integration/chunk_window.py). carry: .whl
set -u
. "$(dirname "$0")/device_prelude.sh"
T0=$(date +%s)
( nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  python3 -c "import torch, transformers, triton; print('torch', torch.__version__, 'transformers', transformers.__version__, 'triton', triton.__version__)"
  timeout ${TOTAL:-400} python3 benchmarks/e2e.py --out "$OUT" --shapes LLaMA-2-7B --stages ttft --ttft-tokens ${TOKENS:-32768} \
    --chunk ${CHUNKS:-16384,32768} --ttft-window 128 --budget $(( ${TOTAL:-400} - 15 )) 2>&1 | grep -v -i "warn\|perf_hints\|USDT"
  echo "total $(( $(date +%s) - T0 )) s" ) 2>&1 | tee "$OUT/call.log"
rm -f "$OUT/e2e.jsonl"
