#!/usr/bin/env bash
# Device call of 2026-12-03 (fourteenth session): the key outliers' query gathers a block ahead (query_ahead; with
# GQA the gather loaded and used in one iteration was the key loop's hottest instruction in Nsight Compute,
# call_w.sh). The decode tests compiled (the new option included), then the variants default / query ahead on the
# outlier formats where it matters. carry: .whl
set -u
. "$(dirname "$0")/device_prelude.sh"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$OUT/nvidia-smi.txt"
python3 -c "import torch, transformers, triton; print('torch', torch.__version__, 'transformers', transformers.__version__, 'triton', triton.__version__)" > "$OUT/versions.txt"
T0=$(date +%s)
( KVQUANT_TEST_COMPILED=1 timeout ${TESTS:-150} python3 -m pytest -q -p no:cacheprovider tests/kernels/test_decode_attention.py 2>&1 | tail -4
  echo "== compiled kernel tests $(( $(date +%s) - T0 )) s"
  timeout ${VAR_S:-200} python3 benchmarks/decode_variants.py --out "$OUT" --budget $(( ${VAR_S:-200} - 15 )) \
    --cases "GQA:1:131072:nuq3-1%,MHA:1:131072:nuq3-1%,SmolLM2:1:131072:nuq3-1%,GQA:1:131072:nuq4-1%,GQA:1:131072:nuq2-1%,GQA:8:32768:nuq3-1%,GQA:1:32768:nuq3-1%,SmolLM2:8:32768:nuq3-1%" \
    --variants "default,outlier query a block ahead" 2>&1 | grep -v -i "warn"
  echo "== variants $(( $(date +%s) - T0 )) s" ) 2>&1 | tee "$OUT/call.log"
