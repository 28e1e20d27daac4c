#!/usr/bin/env bash
# Device call of 2026-12-03 (tenth session): a static cache's tensors as one buffer per layer (kernels/layout.py
# consolidate; the operators of kernels/ops.py take the buffer and a layout id). The operator tests on CUDA, then
# where a compiled decode step's time goes for the LLaMA-2-7B shape at 32K (trace, as call_m.sh) and the compiled
# decode rows at 32K and 128K, KVQuant-3 against fp16 StaticCache. carry: .whl
set -u
. "$(dirname "$0")/device_prelude.sh"
T0=$(date +%s)
( nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  python3 -c "import torch, transformers, triton; print('torch', torch.__version__, 'transformers', transformers.__version__, 'triton', triton.__version__)"
  KVQUANT_TEST_COMPILED=1 timeout ${TESTS:-150} python3 -m pytest -q -p no:cacheprovider tests/kernels/test_ops.py tests/kernels/test_dispatch.py 2>&1 | tail -6
  echo "tests $(( $(date +%s) - T0 )) s" ) 2>&1 | tee "$OUT/tests.log"
left() { echo $(( ${TOTAL:-570} - ($(date +%s) - T0) )); }
SKIPS=fp16-dynamic:eager,quanto-int4:eager,quanto-int2:eager,kvquant-3:eager,kvquant-4:compiled,kvquant-2:compiled
( timeout $(left) python3 benchmarks/e2e.py --out "$OUT" --shapes LLaMA-2-7B --contexts 32768 --stages trace,decode \
    --skip $SKIPS --steps 8 --budget $(( $(left) - 150 )) 2>&1 | grep -v -i "warn\|perf_hints\|USDT"
  echo "32K $(( $(date +%s) - T0 )) s"
  mkdir -p "$OUT/c128k"
  timeout $(( $(left) - 5 )) python3 benchmarks/e2e.py --out "$OUT/c128k" --shapes LLaMA-2-7B --contexts 131072 \
    --stages decode --skip $SKIPS --steps 8 --budget $(( $(left) - 10 )) 2>&1 | grep -v -i "warn\|perf_hints\|USDT"
  echo "total $(( $(date +%s) - T0 )) s" ) 2>&1 | tee "$OUT/call.log"
rm -f "$OUT/e2e.jsonl" "$OUT/c128k/e2e.jsonl"  # the device tool brings back at most 8 files
