#!/usr/bin/env bash
# Device call of 2026-12-03 (fourteenth session), after cache_config['outlier_slots'] (the quality preset: two
# outliers per token and head on the 1% ranges): gpu_checks.py's quantized generations (kernels against the reference
# path, eager, compiled by generate and in a CUDA-graph loop, now also with two outlier slots beside an exact window)
# and repeated compiled generate calls. carry: .whl .carry
set -u
. "$(dirname "$0")/device_prelude.sh"
python3 -c "import torch, transformers, triton; print('torch', torch.__version__, 'transformers', transformers.__version__, 'triton', triton.__version__)" > "$OUT/versions.txt"
T0=$(date +%s)
( timeout ${CHECKS_S:-300} python3 benchmarks/gpu_checks.py --out "$OUT" --stories .carry/data/stories260K --skip-tests --skip-exactness 2>&1 | grep -v -i warn | tail -14
  echo "== gpu_checks $(( $(date +%s) - T0 )) s" ) 2>&1 | tee "$OUT/call.log"
