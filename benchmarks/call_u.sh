#!/usr/bin/env bash
# Device call of 2026-12-03 (twelfth session): the outliers' own passes in the decode kernel (kernels/decode.py
# _key_outlier_pass, _value_outlier_pass). The decode tests compiled, the decode grid, then the compiled decode rows
# end to end (LLaMA-2-7B shape, batch 1, KVQuant-4/3/2 beside fp16 StaticCache, 128K and 32K) with the decode kernel
# as it now is (SKIPS, CONTEXTS: other rows and lengths, as call_v.sh). carry: .whl
set -u
. "$(dirname "$0")/device_prelude.sh"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$OUT/nvidia-smi.txt"
python3 -c "import torch, transformers, triton; print('torch', torch.__version__, 'transformers', transformers.__version__, 'triton', triton.__version__)" > "$OUT/versions.txt"
T0=$(date +%s)
left() { echo $(( ${TOTAL:-570} - ($(date +%s) - T0) )); }
( KVQUANT_TEST_COMPILED=1 timeout ${TESTS:-120} python3 -m pytest -q -p no:cacheprovider tests/kernels/test_decode_attention.py 2>&1 | tail -4
  echo "== compiled kernel tests $(( $(date +%s) - T0 )) s"
  timeout ${GRID_S:-120} python3 benchmarks/decode.py --out "$OUT" --budget $(( ${GRID_S:-120} - 15 )) 2>&1 | grep -v -i "warn\|us = timer" | tail -6
  rm -f "$OUT"/decode.jsonl
  echo "== grid $(( $(date +%s) - T0 )) s"
  SKIPS=${SKIPS:-fp16-dynamic:eager,quanto-int4:eager,quanto-int2:eager,kvquant-3:eager}
  for c in ${CONTEXTS:-131072 32768}; do
    mkdir -p "$OUT/c$c"
    timeout $(( $(left) - 5 )) python3 benchmarks/e2e.py --out "$OUT/c$c" --shapes LLaMA-2-7B --contexts $c --stages decode \
      --skip $SKIPS --steps 8 --budget $(( $(left) - 10 )) 2>&1 | grep -v -i "warn\|perf_hints\|USDT"
    rm -f "$OUT/c$c/e2e.jsonl"
    echo "== e2e $c done at $(( $(date +%s) - T0 )) s"
  done ) 2>&1 | tee "$OUT/call.log"
