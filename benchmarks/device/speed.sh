#!/usr/bin/env bash
# Issue 5 on a GPU, one device call (7.5 minutes at most: each step has its own timeout):
#   run(command="bash benchmarks/device/speed.sh", carry=[".whl"], timeout_s=480)
# 1. the brief's line as written, `python train.py model=deeplab trainer.gpus=1` (demo data);
# 2. benchmarks/throughput.py for the four architectures, width 64, bf16, channels_last, at
#    256 and 512 px with augmentation=device (the rows still missing), and U-Net 512 px with
#    the CPU workers' augmentation again as that lending's baseline.
# Results land in $OUT: deeplab.txt, throughput.md.
source "$(dirname "$0")/env.sh"
set -o pipefail
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true; } \
  | tee "$OUT/gpu.txt"
if [ "${SMOKE:-0}" = 1 ]; then
  line=(python3 train.py model=deeplab "$ACCEL" data.demo_num_images=16 data.image_size=32
    model.width=4 trainer.max_epochs=1)
  bench=(--device cpu --width 4 --steps 1 --warmup 1 --repeats 1 --workers 0)
  sizes="32/4"
else
  python=python3  # the line as written where the image has a `python`
  command -v python > /dev/null && python=python
  line=("$python" train.py model=deeplab trainer.gpus=1)
  bench=(--device cuda --precision bf16-mixed --channels-last --width 64 --steps 8 --warmup 3
    --repeats 3 --workers 4)
  sizes="256/32 512/16"
fi
rm -rf outputs/device_deeplab
timeout 150 "${line[@]}" trainer.enable_progress_bar=false hydra.run.dir=outputs/device_deeplab \
  2>&1 | tail -n 4 | tee "$OUT/deeplab.txt"
echo "exit status ${PIPESTATUS[0]}; metrics.json:" | tee -a "$OUT/deeplab.txt"
cat outputs/device_deeplab/metrics.json >> "$OUT/deeplab.txt" 2>&1
for sb in $sizes; do  # rows are printed as they are measured: a cut table keeps its rows
  timeout 110 python3 benchmarks/throughput.py "${bench[@]}" --size "${sb%/*}" \
    --batch "${sb#*/}" --augmentation device 2>&1 | grep -E '^(#|\|)' | tee -a "$OUT/throughput.md"
done
timeout 70 python3 benchmarks/throughput.py "${bench[@]}" --size "${sb%/*}" --batch "${sb#*/}" \
  --augmentation default --models unet 2>&1 | grep -E '^(#|\|)' | tee -a "$OUT/throughput.md"
