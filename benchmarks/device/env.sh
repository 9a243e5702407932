# Sourced by the device scripts: the carried wheels on PYTHONPATH, $OUT for results.
cd "$(dirname "${BASH_SOURCE[0]}")/../.." || exit 1
if [ -d .whl ] && ! python3 -c "import hydra, albumentations" 2>/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/lungseg-device-out}
mkdir -p "$OUT"
# SMOKE=1: the same steps on this CPU at toy sizes, to check the script before a lending.
if [ "${SMOKE:-0}" = 1 ]; then
  ACCEL="trainer.accelerator=cpu"
else
  ACCEL="trainer.gpus=1"
fi
