#!/usr/bin/env bash
# Device call of 2026-12-02 (seventh session): time to first token of LLaMA-2-7B shape (random fp16 weights) at 32K
# and 128K, KVQuant-3 prefill at several chunk sizes against fp16's one forward, and where each prefill spends its
# GPU time (torch.profiler, by kernel). carry: .whl (jsonschema and its dependencies)
set -u
. "$(dirname "$0")/device_prelude.sh"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$OUT/nvidia-smi.txt"
python3 -c "import torch, transformers, triton; print('torch', torch.__version__, 'transformers', transformers.__version__, 'triton', triton.__version__)" > "$OUT/versions.txt"
T0=$(date +%s)
timeout ${TOTAL:-540} python3 benchmarks/e2e.py --out "$OUT" --shapes LLaMA-2-7B --stages ttft --ttft-tokens ${TOKENS:-32768,131072} \
  --chunk ${CHUNKS:-4096,8192,16384,32768} --profile-chunk ${PROFILE_CHUNK:-16384} --budget $(( ${TOTAL:-540} - 20 )) \
  2>&1 | grep -v -i "warn\|perf_hints\|USDT" | tee "$OUT/call.log"
echo "total $(( $(date +%s) - T0 )) s" | tee -a "$OUT/call.log"
