#!/usr/bin/env bash
# Device call of 2026-12-03 (eleventh session), at the commit after 97dcec9 (allocation-free views of the one-buffer
# cache; generate keeps the largest capacity across calls): gpu_checks.py in full (the kernel tests compiled, bits=16
# exactness on CUDA, the kernels against the reference path eager and compiled, and two compiled generate calls in a
# row, the second shorter, counting TorchDynamo's graphs). carry: .whl .carry
set -u
. "$(dirname "$0")/device_prelude.sh"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$OUT/nvidia-smi.txt"
python3 -c "import torch, transformers, triton; print('torch', torch.__version__, 'transformers', transformers.__version__, 'triton', triton.__version__)" > "$OUT/versions.txt"
T0=$(date +%s)
timeout ${TOTAL:-560} python3 benchmarks/gpu_checks.py --out "$OUT" --stories .carry/data/stories260K 2>&1 | grep -v -i warn | tee "$OUT/checks.log" | tail -30
echo "total $(( $(date +%s) - T0 )) s" | tee -a "$OUT/checks.log"
