#!/usr/bin/env bash
# Device call of 2026-12-03 (thirteenth session). 1) Nsight Compute on the packed decode kernel as it ships (MHA and
# GQA 128K batch 1 nuq3-1%, MHA nuq3 as the control): where its time goes (stall reasons by SASS instruction,
# memory throughput), since the outlier-pass attempts grew slower with slots per iteration for no counted reason.
# 2) The compiled decode rows at 32K (KVQuant-3 beside fp16 StaticCache, LLaMA-2-7B shape, batch 1) with the direct
# key path. 3) Time to first token of a 32K prompt with the long-context window now that chunk windows attend only
# the columns each query block can read. carry: .whl
set -u
. "$(dirname "$0")/device_prelude.sh"
T0=$(date +%s)
left() { echo $(( ${TOTAL:-560} - ($(date +%s) - T0) )); }
( nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  python3 -c "import torch, transformers, triton; print('torch', torch.__version__, 'transformers', transformers.__version__, 'triton', triton.__version__)"
  ncu --version | tail -1
  for case in "MHA 1 131072 nuq3-1%" "MHA 1 131072 nuq3" "GQA 1 131072 nuq3-1%"; do
    tag=$(echo "$case" | tr ' %' '_p')
    timeout 100 ncu --clock-control none --kernel-name regex:_decode_packed_kernel --launch-skip 3 --launch-count 1 \
      --set full --import-source no -f -o /tmp/$tag python3 benchmarks/profile_decode.py $case 2>&1 | grep -v "^==PROF==" | tail -3
    { echo "##### $case"; ncu -i /tmp/$tag.ncu-rep --page details 2>&1; } >> "$OUT/ncu_details.txt"
    ncu -i /tmp/$tag.ncu-rep --page source --csv --print-source sass > "$OUT/ncu_sass_$tag.csv" 2>&1 || true
    echo "== ncu $case at $(( $(date +%s) - T0 )) s"
  done
  mkdir -p "$OUT/c32768"
  timeout $(( $(left) - 150 )) python3 benchmarks/e2e.py --out "$OUT/c32768" --shapes LLaMA-2-7B --contexts 32768 --stages decode \
    --skip fp16-dynamic:eager,quanto-int4:eager,quanto-int2:eager,kvquant-3:eager,kvquant-4:compiled,kvquant-2:compiled \
    --steps 8 --budget $(( $(left) - 160 )) 2>&1 | grep -v -i "warn\|perf_hints\|USDT"
  rm -f "$OUT/c32768/e2e.jsonl"
  echo "== e2e 32768 at $(( $(date +%s) - T0 )) s"
  mkdir -p "$OUT/ttft"
  timeout $(( $(left) - 5 )) python3 benchmarks/e2e.py --out "$OUT/ttft" --shapes LLaMA-2-7B --stages ttft --ttft-tokens 32768 \
    --chunk 16384 --ttft-window 128 --budget $(( $(left) - 15 )) 2>&1 | grep -v -i "warn\|perf_hints\|USDT"
  rm -f "$OUT/ttft/e2e.jsonl"
  echo "total $(( $(date +%s) - T0 )) s" ) 2>&1 | tee "$OUT/call.log"
