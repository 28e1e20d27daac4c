#!/usr/bin/env bash
# Device call of 2026-12-02 (ninth session): the kernel tests on CUDA (with the prefill chunks' exact window), then
# where a compiled decode step's wall time goes for the LLaMA-2-7B shape at 32K (e2e.py --stages trace: KVQuant-3
# against fp16 StaticCache, a CPU + GPU timeline of six synchronized steps each), the same steps unprofiled (decode
# stage), and KVQuant-3's trace with inductor's plain CUDA graphs instead of its graph trees. carry: .whl
set -u
. "$(dirname "$0")/device_prelude.sh"
T0=$(date +%s)
( nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  python3 -c "import torch, transformers, triton; print('torch', torch.__version__, 'transformers', transformers.__version__, 'triton', triton.__version__)"
  KVQUANT_TEST_COMPILED=1 timeout ${TESTS:-120} python3 -m pytest -q -p no:cacheprovider tests/kernels/test_dispatch.py 2>&1 | tail -6
  echo "tests $(( $(date +%s) - T0 )) s" ) 2>&1 | tee "$OUT/dispatch_tests.log"
left() { echo $(( ${TOTAL:-570} - ($(date +%s) - T0) )); }
SKIPS=fp16-dynamic:eager,quanto-int4:eager,quanto-int2:eager,kvquant-3:eager,kvquant-4:compiled,kvquant-2:compiled
( timeout $(left) python3 benchmarks/e2e.py --out "$OUT" --shapes LLaMA-2-7B --contexts ${CONTEXT:-32768} --stages trace,decode \
    --skip $SKIPS --steps 8 --budget $(( $(left) - 120 )) 2>&1 | grep -v -i "warn\|perf_hints\|USDT"
  echo "trace+decode $(( $(date +%s) - T0 )) s"
  mkdir -p "$OUT/no_trees"
  timeout $(( $(left) - 5 )) python3 benchmarks/e2e.py --out "$OUT/no_trees" --shapes LLaMA-2-7B --contexts ${CONTEXT:-32768} \
    --stages trace --skip fp16-static:trace --no-cudagraph-trees --budget $(( $(left) - 10 )) 2>&1 | grep -v -i "warn\|perf_hints\|USDT"
  echo "total $(( $(date +%s) - T0 )) s" ) 2>&1 | tee "$OUT/call.log"
rm -f "$OUT/e2e.jsonl" "$OUT/no_trees/e2e.jsonl"  # the device tool brings back at most 8 files
