#!/usr/bin/env bash
# Device call of 2026-12-02: gpu_checks.py (bits=16 exactness on CUDA; kernels against the reference path, eager and
# compiled, now also with an exact recent window of 128 as the shipped SmolLM2 presets keep). carry: .whl .carry
set -u
. "$(dirname "$0")/device_prelude.sh"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$OUT/nvidia-smi.txt"
python3 -c "import torch, transformers, triton; print('torch', torch.__version__, 'transformers', transformers.__version__, 'triton', triton.__version__)" > "$OUT/versions.txt"
T0=$(date +%s)
timeout ${TOTAL:-420} python3 benchmarks/gpu_checks.py ${CHECK_ARGS:-} --out "$OUT" --stories .carry/data/stories260K --skip-tests 2>&1 | grep -v -i warn | tee "$OUT/checks.log" | tail -25
echo "total $(( $(date +%s) - T0 )) s" | tee -a "$OUT/checks.log"
