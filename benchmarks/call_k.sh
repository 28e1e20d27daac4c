#!/usr/bin/env bash
# Device call of 2026-12-02 (eighth session): the decode kernel's L2 prefetch distance swept on long-context cases,
# the full decode grid without it and with the best distance, then the compiled kernel tests. carry: .whl
set -u
. "$(dirname "$0")/device_prelude.sh"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$OUT/nvidia-smi.txt"
python3 -c "import torch, transformers, triton; print('torch', torch.__version__, 'transformers', transformers.__version__, 'triton', triton.__version__)" > "$OUT/versions.txt"
T0=$(date +%s)
( timeout 230 python3 benchmarks/decode_variants.py --out "$OUT" --budget 200 \
    --cases ${CASES:-MHA:1:131072:nuq3-1%,GQA:1:131072:nuq3-1%,SmolLM2:1:131072:nuq3-1%,MHA:1:131072:nuq2,MHA:1:131072:nuq4,GQA:8:32768:nuq3,MHA:1:8192:nuq3-1%} \
    --variants "default,L2 prefetch 2,L2 prefetch 4,L2 prefetch 8,L2 prefetch 16,bool mask,bool mask, L2 prefetch 4" 2>&1 | grep -v -i warn
  BEST=$(python3 - "$OUT/variants.json" <<'PY'
import json, math, sys
cases = json.load(open(sys.argv[1]))["cases"]
score = {}
for name, n in (("default", 0), ("L2 prefetch 2", 2), ("L2 prefetch 4", 4), ("L2 prefetch 8", 8), ("L2 prefetch 16", 16)):
    t = [c["variants"].get(name) for c in cases]
    if t and all(isinstance(x, float) for x in t):
        score[n] = math.exp(sum(math.log(x) for x in t) / len(t))
print(min(score, key=score.get) if score else 4)
PY
)
  echo "== best L2 prefetch distance (geometric mean over the cases): $BEST, $(( $(date +%s) - T0 )) s"
  timeout 120 python3 benchmarks/decode.py --out "$OUT/l2_0" --l2-prefetch 0 --budget 100 2>&1 | grep -v -i warn | tail -3
  echo "== grid with $BEST $(( $(date +%s) - T0 )) s"
  timeout 120 python3 benchmarks/decode.py --out "$OUT/l2_best" --l2-prefetch "$BEST" --budget 100 2>&1 | grep -v -i warn
  sed -i "s/^L2_PREFETCH = 0/L2_PREFETCH = $BEST/" kernels/decode.py  # this copy's default, for the tests
  grep -n "^L2_PREFETCH" kernels/decode.py
  echo "== compiled kernel tests $(( $(date +%s) - T0 )) s"
  KVQUANT_TEST_COMPILED=1 timeout $(( ${TOTAL:-570} - ($(date +%s) - T0) )) python3 -m pytest -q -p no:cacheprovider \
    tests/kernels/test_decode_attention.py tests/kernels/test_ops.py tests/kernels/test_dispatch.py 2>&1 | tail -5
  rm -f "$OUT"/l2_*/decode.jsonl  # the returned files are few: decode.json holds the same rows
  echo "total $(( $(date +%s) - T0 )) s" ) 2>&1 | tee "$OUT/call.log"
