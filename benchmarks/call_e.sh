#!/usr/bin/env bash
# Device call of 2026-12-02: the compiler-pipelined decode loops (asynchronous copies into shared memory, `pipeline`
# stages) against the register prefetch, compiled correctness first. carry: .whl
set -u
OUT=${OUT:-/tmp/out}
ln -sfn ../kernels transformers_kvquant/kernels
ln -sfn ../hub_configs transformers_kvquant/hub_configs
mkdir -p /tmp/site "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl >/dev/null 2>&1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
python3 -c "import torch, transformers, triton; print('torch', torch.__version__, 'transformers', transformers.__version__, 'triton', triton.__version__)" > "$OUT/versions.txt"
T0=$(date +%s)
( KVQUANT_TEST_COMPILED=1 timeout 120 python3 -m pytest -q -p no:cacheprovider tests/kernels/test_decode_attention.py -k "pipelined or matches_reference" 2>&1 | tail -4
  echo "== variants $(( $(date +%s) - T0 )) s"
  timeout $(( ${TOTAL:-400} - ($(date +%s) - T0) )) python3 benchmarks/decode_variants.py --out "$OUT" \
    --cases ${CASES:-MHA:1:131072:nuq3-1%,GQA:1:131072:nuq3-1%,MHA:1:131072:nuq3,MHA:1:131072:nuq2,GQA:8:32768:nuq3,SmolLM2:1:131072:nuq3-1%} \
    --variants "${VARIANTS:-default,128 registers,pipeline 2,pipeline 3,pipeline 4,pipeline 3 + 128 registers,bool mask,pipeline 3 + bool mask}" 2>&1 | grep -v -i warn
  echo "total $(( $(date +%s) - T0 )) s" ) 2>&1 | tee "$OUT/call.log"
