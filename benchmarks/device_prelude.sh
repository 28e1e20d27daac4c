# Sourced by the benchmarks/call_*.sh device calls: the package importable from the checkout (the
# shipped configs linked in as the installed package lays them out), the carried wheels (.whl) on PYTHONPATH, and
# $OUT (the folder the device tool sends back).
OUT=${OUT:-/tmp/out}
ln -sfn ../hub_configs transformers_kvquant/hub_configs
mkdir -p /tmp/site "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl >/dev/null 2>&1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
