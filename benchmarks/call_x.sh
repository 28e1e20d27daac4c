#!/usr/bin/env bash
# Device call of 2026-12-03 (thirteenth session): the value loop with two blocks of code words in flight (the
# default now; Nsight Compute put the value loop's largest stall on the one-block prefetch, call_w.sh). The decode
# tests compiled, the variants (values one block ahead = the previous default, two blocks in both loops), the decode
# grid, then the compiled decode rows at 128K end to end (KVQuant-3 beside fp16 StaticCache, LLaMA-2-7B shape,
# batch 1). carry: .whl
set -u
. "$(dirname "$0")/device_prelude.sh"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$OUT/nvidia-smi.txt"
python3 -c "import torch, transformers, triton; print('torch', torch.__version__, 'transformers', transformers.__version__, 'triton', triton.__version__)" > "$OUT/versions.txt"
T0=$(date +%s)
left() { echo $(( ${TOTAL:-550} - ($(date +%s) - T0) )); }
( KVQUANT_TEST_COMPILED=1 timeout ${TESTS:-120} python3 -m pytest -q -p no:cacheprovider tests/kernels/test_decode_attention.py 2>&1 | tail -4
  echo "== compiled kernel tests $(( $(date +%s) - T0 )) s"
  timeout 110 python3 benchmarks/decode_variants.py --out "$OUT" --budget 95 \
    --variants "default,values 1 block ahead,2 blocks in flight" 2>&1 | grep -v -i "warn"
  echo "== variants $(( $(date +%s) - T0 )) s"
  timeout ${GRID_S:-120} python3 benchmarks/decode.py --out "$OUT" --budget $(( ${GRID_S:-120} - 15 )) 2>&1 | grep -v -i "warn\|us = timer" | tail -6
  rm -f "$OUT"/decode.jsonl
  echo "== grid $(( $(date +%s) - T0 )) s"
  mkdir -p "$OUT/c131072"
  timeout $(( $(left) - 5 )) python3 benchmarks/e2e.py --out "$OUT/c131072" --shapes LLaMA-2-7B --contexts 131072 --stages decode \
    --skip fp16-dynamic:eager,quanto-int4:eager,quanto-int2:eager,kvquant-3:eager,kvquant-4:compiled,kvquant-2:compiled \
    --steps 8 --budget $(( $(left) - 10 )) 2>&1 | grep -v -i "warn\|perf_hints\|USDT"
  rm -f "$OUT/c131072/e2e.jsonl"
  echo "== e2e 131072 done at $(( $(date +%s) - T0 )) s" ) 2>&1 | tee "$OUT/call.log"
