#!/usr/bin/env bash
# Device call of 2026-12-01 (third session): the fused append compiled and timed, decode register-cap variants, and
# a profile of a compiled LLaMA-2-7B decode step at 32K. carry: .whl .carry
set -u
. "$(dirname "$0")/device_prelude.sh"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$OUT/versions.txt"
python3 -c "import torch, transformers, triton; print('torch', torch.__version__, 'transformers', transformers.__version__, 'triton', triton.__version__)" >> "$OUT/versions.txt"
T0=$(date +%s)
( KVQUANT_TEST_COMPILED=1 timeout 100 python3 -m pytest -q -p no:cacheprovider tests/kernels/test_append.py 2>&1 | tail -5
  echo "== append"
  timeout 60 python3 benchmarks/decode.py --out "$OUT/append" --append-only 2>&1 | grep -v Warning | tail -8
  echo "== variants"
  timeout 150 python3 benchmarks/decode_variants.py --out "$OUT/variants" --reps 11 \
    --cases MHA:1:131072:nuq3-1%,GQA:1:131072:nuq3-1%,SmolLM2:1:131072:nuq3-1%,MHA:8:32768:nuq3-1%,MHA:1:131072:nuq4,MHA:1:131072:nuq2 \
    --variants "default,bool mask,168 registers,128 registers" 2>&1 | grep -v Warning | tail -8
  echo "== profile $(( $(date +%s) - T0 )) s"
  timeout $(( 570 - ($(date +%s) - T0) )) python3 benchmarks/e2e.py --out "$OUT/e2e" --stages profile --contexts 32768 2>&1 | grep -v Warning | tail -8
  echo "total $(( $(date +%s) - T0 )) s" ) 2>&1 | tee "$OUT/call.log"
