#!/usr/bin/env bash
# Issue 5 on a GPU, one device call (at most LIMIT seconds, default 470: a step that would not
# fit in what is left is skipped, and says so):
#   run(command="bash benchmarks/device/speed.sh", carry=[".whl"], timeout_s=480)
# 1. the brief's line as written, `python train.py model=deeplab trainer.gpus=1` (demo data),
#    then with augmentation=device (STEPS kind "cache": data.device_cache=null's choice);
# 2. benchmarks/throughput.py, width 64, bf16, channels_last, augmentation=device, the
#    training images held on the GPU (--device-cache, no workers; LOADER="--workers 4" for
#    the loader of the earlier tables): one process per row (a slow row cannot cut the others
#    off, as a 110-s step for four rows did on 2026-11-27), 512 px first (the issue's U-Net
#    row), then 256 px;
# 3. benchmarks/profile_step.py on DeepLab at 256 px: where its step's time goes;
# 4. the compiled U-Net at 512 px, batch 32, with the same loader (34 % of the bf16 matrix
#    product on the H100 on 2026-11-27 with 14 workers, before the loader sent uint8 masks and
#    pinned batches).
# All four took 385 s (line, rows) + 150 s (profile, compiled) on an H100 (2026-11-27, with
# --device-cache), about what one call fits with the machine's start: STEPS="line rows profile
# compiled" names the steps to run (the default adds "cache" after "line"), e.g. STEPS=compiled
# for the compiled row.
# Results land in $OUT: gpu.txt, deeplab.txt, deeplab_cache.txt, throughput.md, profile.txt.
source "$(dirname "$0")/env.sh"
set -o pipefail
LIMIT=${LIMIT:-470}
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true; } \
  | tee "$OUT/gpu.txt"
if [ "${SMOKE:-0}" = 1 ]; then
  line=(python3 train.py model=deeplab "$ACCEL" data.demo_num_images=16 data.image_size=32
    model.width=4 trainer.max_epochs=1)
  common=(--device cpu --width 4 --steps 1 --warmup 1) bench=("${common[@]}" --repeats 1)
  sizes="32/4" compiled=(--size 32 --batch 4) profile=32/4
else
  python=python3  # the line as written where the image has a `python`
  command -v python > /dev/null && python=python
  line=("$python" train.py model=deeplab trainer.gpus=1)
  common=(--device cuda --precision bf16-mixed --channels-last --width 64 --steps 8 --warmup 3)
  bench=("${common[@]}" --repeats 3)
  sizes=${SIZES:-512/16 256/32} compiled=(--size 512 --batch 32) profile=256/32
fi
read -r -a loader <<< "${LOADER:---workers 0 --device-cache}"
STEPS=" ${STEPS:-line cache rows profile compiled} "
# step SECONDS WHAT COMMAND...: COMMAND under `timeout SECONDS` if that fits before LIMIT and
# its kind (the first word of WHAT, "rows" for a row) is in STEPS
step() {
  local cap=$1 what=$2 kind=${2%% *}
  shift 2
  [[ $what == *" at "*" px" ]] && kind=rows
  [[ $STEPS == *" $kind "* ]] || return 0
  if ((SECONDS + cap > LIMIT)); then
    echo "# skipped ($what): ${SECONDS} s gone, it may take ${cap} s of the ${LIMIT}"
    return 0
  fi
  timeout "$cap" "$@"
}
rm -rf outputs/device_deeplab
step 150 "line (the brief's deeplab line)" "${line[@]}" trainer.enable_progress_bar=false \
  hydra.run.dir=outputs/device_deeplab 2>&1 | tail -n 4 | tee "$OUT/deeplab.txt"
status=${PIPESTATUS[0]}
if [ "$status" != 0 ] || [ -f outputs/device_deeplab/metrics.json ]; then  # not when skipped
  echo "exit status $status; metrics.json:" | tee -a "$OUT/deeplab.txt"
  cat outputs/device_deeplab/metrics.json >> "$OUT/deeplab.txt" 2>&1
fi
# the same line with augmentation=device: data.device_cache=null must hold the images on the
# GPU by itself (its log line), and train as well
rm -rf outputs/device_deeplab_cache
step 120 "cache (the line with augmentation=device)" "${line[@]}" augmentation=device \
  trainer.enable_progress_bar=false hydra.run.dir=outputs/device_deeplab_cache 2>&1 \
  | grep -E "device_cache|test/dice |Error" | tee "$OUT/deeplab_cache.txt"
# the GPU paths changed on 2026-11-28 without a GPU (STEPS kind "paths", not in the default):
# the EMA average on the training device, bf16-true weights, the post-processed test (flips,
# min_size) on the run's device, the device cache copied as training starts
rm -rf outputs/device_paths
step 120 "paths (EMA, bf16-true, post-processed test)" "${line[@]}" callbacks.ema.enabled=true \
  trainer.precision=bf16-true augmentation=device postprocess.min_size=4 \
  'postprocess.tta_flips=[horizontal]' trainer.max_epochs=10 trainer.enable_progress_bar=false \
  hydra.run.dir=outputs/device_paths 2>&1 | grep -E "device_cache|EMA|Error|error|Traceback" \
  | tee "$OUT/paths.txt"
[ -f outputs/device_paths/metrics.json ] && python3 -c '
import json; m = json.load(open("outputs/device_paths/metrics.json"))
print({k: v for k, v in m.items() if k.startswith(("test/dice", "test_post/dice", "best"))})' \
  | tee -a "$OUT/paths.txt"
for sb in $sizes; do  # rows are printed as they are measured
  for model in unet fcn segnet deeplab; do
    step 75 "$model at ${sb%/*} px" python3 benchmarks/throughput.py "${bench[@]}" \
      "${loader[@]}" --size "${sb%/*}" --batch "${sb#*/}" --augmentation device \
      --models "$model" 2>&1 | grep -E '^(#|\|)' | tee -a "$OUT/throughput.md"
  done
done
# where a DeepLab step's time goes at 256 px (benchmarks/profile_step.py), lungseg against bare
step 75 "profile (deeplab)" python3 benchmarks/profile_step.py "${common[@]}" --steps 20 --warmup 5 \
  "${loader[@]}" --size "${profile%/*}" --batch "${profile#*/}" --augmentation device \
  --models deeplab 2>&1 | grep -vE "Warning|warn\(|^ *$|Tip:|Seed set|available:|USDT|stopped:|LOCAL_RANK|bfloat16|Tensor Cores" \
  | tee "$OUT/profile.txt"
step 140 "compiled (unet)" python3 benchmarks/throughput.py "${bench[@]}" "${compiled[@]}" \
  "${loader[@]}" --compile --augmentation device --models unet 2>&1 | grep -E '^(#|\|)' \
  | tee -a "$OUT/throughput.md"
echo "# ${SECONDS} s in all" | tee -a "$OUT/throughput.md"
