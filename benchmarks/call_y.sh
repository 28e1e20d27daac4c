#!/usr/bin/env bash
# Device call of 2026-12-03 (thirteenth session): Nsight Compute found the decode kernel at 12.5% occupancy (two
# programs of 4 warps per SM, limited by 200-230 registers) with most stalls on latency (call_w.sh). Does a register
# cap that fits three or four programs per SM pay for its spills now that the keys are decoded straight into the
# tensor-core operand? The variants of benchmarks/decode_variants.py with register caps and 32-slot blocks, at 128K
# batch 1. carry: .whl
set -u
. "$(dirname "$0")/device_prelude.sh"
python3 -c "import torch, transformers, triton; print('torch', torch.__version__, 'transformers', transformers.__version__, 'triton', triton.__version__)" > "$OUT/versions.txt"
T0=$(date +%s)
( timeout ${TOTAL:-200} python3 benchmarks/decode_variants.py --out "$OUT" --budget $(( ${TOTAL:-200} - 20 )) \
    --cases "MHA:1:131072:nuq3-1%,GQA:1:131072:nuq3-1%,MHA:1:131072:nuq3,MHA:1:131072:nuq2,SmolLM2:1:131072:nuq3-1%" \
    --variants "default,168 registers,128 registers,BN32 4 warps" 2>&1 | grep -v -i "warn\|us = timer"
  echo "== variants $(( $(date +%s) - T0 )) s" ) 2>&1 | tee "$OUT/call.log"
