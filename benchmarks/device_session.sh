#!/usr/bin/env bash
# One GPU device call: correctness checks, the decode sweep and the end-to-end run, each under its own time limit so
# that a slow stage leaves the later ones their share (the call is limited to 10 minutes). STAGES picks some of
# "checks decode e2e tests"; CHECKS, DECODE, TESTS are their seconds, DECODE_ARGS and E2E_ARGS their options.
#
#   carry: .whl (jsonschema and its needs, optimum-quanto) and .carry/data/stories260K
#
# The GPU image has torch, transformers and triton but no internet: the package runs from the checkout (PYTHONPATH
# plus two symlinks standing in for the build's package-dir mapping), extra wheels from .whl/. Results go under
# $OUT; benchmarks/report.py turns them into docs/benchmarks.* and docs/e2e.*.
set -u
OUT=${OUT:-/tmp/out}
ln -sfn ../hub_configs transformers_kvquant/hub_configs
mkdir -p /tmp/site "$OUT"
[ -d .whl ] && python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl >/dev/null 2>&1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/nvidia-smi.txt"
python3 -c "import torch, transformers, triton; print('torch', torch.__version__, 'transformers', transformers.__version__, 'triton', triton.__version__)" | tee "$OUT/versions.txt"
T0=$(date +%s)
STAGES=${STAGES:-"checks decode e2e tests"}
has() { case " $STAGES " in *" $1 "*) return 0;; *) return 1;; esac; }
left() { echo $(( ${TOTAL:-570} - ($(date +%s) - T0) )); }
has checks && timeout ${CHECKS:-110} python3 benchmarks/gpu_checks.py --out "$OUT/checks" --stories .carry/data/stories260K --skip-tests 2>&1 | grep -v Warning | tee "$OUT/checks.log" | tail -40
has decode && timeout ${DECODE:-150} python3 benchmarks/decode.py --out "$OUT/decode" --budget $(( ${DECODE:-150} - 25 )) ${DECODE_ARGS:-} 2>&1 | tee "$OUT/decode.log" | tail -120
E2E=$(( $(left) - ${TESTS:-45} ))
has e2e && timeout $E2E python3 benchmarks/e2e.py --out "$OUT/e2e" --budget $(( E2E - 20 )) ${E2E_ARGS:-} 2>&1 | grep -v Warning | tee "$OUT/e2e.log" | tail -60
has tests && KVQUANT_TEST_COMPILED=1 timeout $(( $(left) - 5 )) python3 -m pytest -q -p no:cacheprovider tests/kernels 2>&1 | tee "$OUT/kernel_tests.log" | tail -15
echo "total $(( $(date +%s) - T0 )) s"
