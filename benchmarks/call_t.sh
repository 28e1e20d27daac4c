#!/usr/bin/env bash
# Device call of 2026-12-03 (eleventh session): the decode kernel's keys decoded straight into the tensor-core operand
# (kernels/triton_common.py load_words_dot: no shared-memory round trip for the key tile; the query's per-block
# rotation without layout changes). The decode tests compiled (MORE_TESTS: more test files), then the new key path against
# the tile through shared memory on long-context cases, then the decode grid with the new default. carry: .whl
set -u
. "$(dirname "$0")/device_prelude.sh"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$OUT/nvidia-smi.txt"
python3 -c "import torch, transformers, triton; print('torch', torch.__version__, 'transformers', transformers.__version__, 'triton', triton.__version__)" > "$OUT/versions.txt"
T0=$(date +%s)
( KVQUANT_TEST_COMPILED=1 timeout ${TESTS:-120} python3 -m pytest -q -p no:cacheprovider \
    tests/kernels/test_decode_attention.py ${MORE_TESTS:-} 2>&1 | tail -5
  echo "== compiled kernel tests $(( $(date +%s) - T0 )) s"
  timeout ${VARIANTS:-150} python3 benchmarks/decode_variants.py --out "$OUT" --budget $(( ${VARIANTS:-150} - 30 )) \
    --cases ${CASES:-MHA:1:131072:nuq3-1%,GQA:1:131072:nuq3-1%,MHA:1:131072:nuq3,MHA:1:131072:nuq2,MHA:1:131072:nuq4,GQA:8:32768:nuq3,MHA:1:32768:nuq3-1%,MHA:1:8192:nuq3-1%} \
    --variants "default,key tile through shared memory" 2>&1 | grep -v -i "warn\|us = timer"
  echo "== variants $(( $(date +%s) - T0 )) s"
  [ "${GRID:-1}" = 1 ] && timeout $(( ${TOTAL:-540} - ($(date +%s) - T0) )) python3 benchmarks/decode.py --out "$OUT/grid" --budget $(( ${TOTAL:-540} - 20 - ($(date +%s) - T0) )) 2>&1 | grep -v -i "warn\|us = timer" | tail -12
  rm -f "$OUT"/grid/decode.jsonl
  echo "total $(( $(date +%s) - T0 )) s" ) 2>&1 | tee "$OUT/call.log"
