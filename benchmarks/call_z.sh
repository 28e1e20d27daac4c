#!/usr/bin/env bash
# Device call of 2026-12-03 (thirteenth session), after the slots' positions became one tensor per cache (the static
# cache's arena operators take them beside the buffer): the operator and append tests compiled, gpu_checks.py's
# quantized generations (kernels against the reference path, eager, compiled by generate and in a CUDA-graph loop) and
# repeated compiled generate calls, then the compiled decode rows at 32K (KVQuant-3 and fp16 StaticCache, LLaMA-2-7B shape) to compare
# with h200-2026-12-03d/call1 (13.07 ms/token). carry: .whl .carry
set -u
. "$(dirname "$0")/device_prelude.sh"
python3 -c "import torch, transformers, triton; print('torch', torch.__version__, 'transformers', transformers.__version__, 'triton', triton.__version__)" > "$OUT/versions.txt"
T0=$(date +%s)
left() { echo $(( ${TOTAL:-500} - ($(date +%s) - T0) )); }
( KVQUANT_TEST_COMPILED=1 timeout 150 python3 -m pytest -q -p no:cacheprovider tests/kernels/test_ops.py tests/kernels/test_append.py 2>&1 | tail -3
  echo "== compiled operator and append tests $(( $(date +%s) - T0 )) s"
  timeout $(( $(left) - 90 )) python3 benchmarks/gpu_checks.py --out "$OUT" --stories .carry/data/stories260K --skip-tests --skip-exactness 2>&1 | grep -v -i warn | tail -8
  echo "== gpu_checks $(( $(date +%s) - T0 )) s"
  mkdir -p "$OUT/c32768"
  timeout $(( $(left) - 5 )) python3 benchmarks/e2e.py --out "$OUT/c32768" --shapes LLaMA-2-7B --contexts 32768 --stages decode \
    --skip fp16-dynamic:eager,quanto-int4:eager,quanto-int2:eager,kvquant-3:eager,kvquant-4:compiled,kvquant-2:compiled \
    --steps 8 --budget $(( $(left) - 10 )) 2>&1 | grep -v -i "warn\|perf_hints\|USDT"
  rm -f "$OUT/c32768/e2e.jsonl"
  echo "== e2e 32768 at $(( $(date +%s) - T0 )) s" ) 2>&1 | tee "$OUT/call.log"
