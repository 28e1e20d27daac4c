#!/usr/bin/env bash
# Device call of 2026-12-02: what the long-context preset (an exact window of 128 recent tokens) costs the decode
# attention, against no window, same cases. carry: .whl
set -u
. "$(dirname "$0")/device_prelude.sh"
python3 -c "import torch, transformers, triton; print('torch', torch.__version__, 'transformers', transformers.__version__, 'triton', triton.__version__)" > "$OUT/versions.txt"
T0=$(date +%s)
timeout ${TOTAL:-240} python3 benchmarks/decode_variants.py --out "$OUT" --variants default \
  --cases ${CASES:-MHA:1:32768:nuq3-1%,MHA:1:32768:nuq3-1%:w128,GQA:1:32768:nuq3-1%,GQA:1:32768:nuq3-1%:w128,SmolLM2:1:32768:nuq3-1%,SmolLM2:1:32768:nuq3-1%:w128,MHA:1:131072:nuq3-1%,MHA:1:131072:nuq3-1%:w128,GQA:8:32768:nuq3-1%,GQA:8:32768:nuq3-1%:w128} \
  2>&1 | grep -v -i "warn\|scaled_dot" | tee "$OUT/call.log"
echo "total $(( $(date +%s) - T0 )) s" | tee -a "$OUT/call.log"
