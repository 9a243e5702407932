#!/usr/bin/env bash
# Issue 9 on a GPU, one device call (about 6 minutes):
#   run(command="bash benchmarks/device/nodules.sh", carry=[".whl", ".gpudata"], timeout_s=500)
# By default the lidc_nodules recipe as it stands (loss.skip_empty, all four non-test parts
# without validation, the final weights; README "The recipe today") and its validation-split
# variant (data.split=[0.8,0.2,0.0], as the settings were chosen), 5 folds each, all 10 runs
# at once on the one GPU, each stopped by trainer.max_time at the latest; then
# benchmarks/crossval.py per candidate whose runs have a validation split, its 5 folds scored
# at once (post-processing chosen per fold on its own validation split). augmentation=device
# in both: with the CPU workers' augmentation, 15 runs at once on 16 cores reached only 21-22
# of 40 epochs in 5.75 minutes (README). The 192-px candidate (worse on CPU fold 4):
#   CANDIDATES="val:augmentation=device data.split=[0.8,0.2,0.0];px192:data.image_size=192
#     augmentation=device data.split=[0.8,0.2,0.0]"   (one line)
# Stronger augmentation over a longer schedule (CPU fold 2, 40 epochs: best epoch 36,
# validation below the default augmentation's, test 0.766 against 0.755; README), with the
# albumentations pipeline in the workers since augmentation=device has no elastic transform:
#   CANDIDATES="val:augmentation=device data.split=[0.8,0.2,0.0];strong80:augmentation=strong
#     trainer.max_epochs=80 data.num_workers=1 data.split=[0.8,0.2,0.0]"   (one line)
#   CANDIDATES="name:overrides;name:overrides"  the set (overrides space-separated)
#   MAX_TIME=DD:HH:MM:SS                         each run's cap (default 00:00:05:30)
#   CROSSVAL=seconds                             crossval.py's cap (default 150; 0 skips it)
# With augmentation=device the training images stay on the GPU (data.device_cache, null by
# default: on where it applies on a GPU; checked on an H100 on 2026-11-28).
# An ensemble of seeds per fold (ENSEMBLE=1: eval.py with every candidate's model of the
# fold, then each alone, flips included, ensemble.txt; seeds keep the split with
# data.seed=42) and the run folders back as tars (CKPTS=1), as measured on 2026-11-28 (README
# "The recipe today", before the recipe took loss.skip_empty and data.split=[1.0,0.0,0.0]):
#   ENSEMBLE=1 CKPTS=1 CROSSVAL=0 MAX_TIME=00:00:05:30 CANDIDATES="all4:loss.skip_empty=true
#     data.split=[1.0,0.0,0.0] augmentation=device;all4s1:loss.skip_empty=true
#     data.split=[1.0,0.0,0.0] augmentation=device seed=1 data.seed=42"   (one line)
# The post-processing grid is cut to 18 settings (argmax/0.7/0.9 x 0/8/32 px x confidence
# 0/0.98; the default's 124 take minutes a fold). Results in $OUT: runs.txt (per run: epochs,
# stop reason, best epoch, minutes, test Dice on nodule slices and FP rate on empty ones at the
# argmax, and with the recipe's post-processing and flips (test_post/*), from metrics.json; a
# mean per candidate), crossval_<name>.md.
source "$(dirname "$0")/env.sh"
data=.gpudata/lidc_nodules
[ -d "$data/images" ] || { echo "no $data: run benchmarks/device/prepare.sh here first"; exit 1; }
CANDIDATES=${CANDIDATES:-"recipe:augmentation=device;val:augmentation=device data.split=[0.8,0.2,0.0]"}
MAX_TIME=${MAX_TIME:-00:00:05:30}
CROSSVAL=${CROSSVAL:-150}
extra=()
[ "${SMOKE:-0}" = 1 ] && extra=(trainer.max_epochs=1 trainer.limit_train_batches=2
  trainer.limit_val_batches=2 model.width=4)
root=outputs/device_lidc
rm -rf "$root" && mkdir -p "$root"
: > "$OUT/runs.txt"
names=()
IFS=';' read -ra cands <<<"$CANDIDATES"
for cand in "${cands[@]}"; do
  read -r name <<<"${cand%%:*}"  # trimmed
  over=()
  [[ $cand == *:* ]] && read -ra over <<<"${cand#*:}"
  names+=("$name")
  for fold in 0 1 2 3 4; do
    python3 train.py experiment=lidc_nodules data.image_dir="$data/images" \
      data.mask_dir="$data/masks" data.fold=$fold "$ACCEL" trainer.max_time="$MAX_TIME" \
      trainer.enable_progress_bar=false hydra.run.dir="$root/$name/fold$fold" \
      "${over[@]}" "${extra[@]}" > "$root/$name-fold$fold.log" 2>&1 &
  done
done
wait
for name in "${names[@]}"; do
  python3 - "$root" "$name" <<'PY' | tee -a "$OUT/runs.txt"
import json, statistics, sys
from pathlib import Path
root, name = Path(sys.argv[1]), sys.argv[2]
scores = []
for fold in range(5):
    path = root / name / f"fold{fold}" / "metrics.json"
    if not path.exists():
        log = (root / f"{name}-fold{fold}.log").read_text().splitlines()
        print(f"{name}/fold{fold}: no metrics.json; its log ends:", *log[-3:], sep="\n  ")
        continue
    m = json.loads(path.read_text())
    scores.append((m["test/dice_nonempty"], m["test/fp_empty"]))
    post = ""
    if m.get("test_post/dice_nonempty") is not None:  # the recipe's post-processing, flips
        scores[-1] += (m["test_post/dice_nonempty"], m["test_post/fp_empty"])
        post = f"; post-processed {scores[-1][2]:.4f}, FP rate {scores[-1][3]:.4f}"
    print(f"{name}/fold{fold}: {m['epochs_trained']} epochs ({m['stopped_by']}), best "
          f"{m['best_epoch']}, {m['train_minutes']:.1f} min, test Dice non-empty "
          f"{m['test/dice_nonempty']:.4f}, FP rate empty {m['test/fp_empty']:.4f}{post}")
if scores:
    dice, fp = zip(*[s[:2] for s in scores])
    print(f"{name}: {len(scores)} folds, test Dice non-empty {statistics.fmean(dice):.4f} ± "
          f"{statistics.pstdev(dice):.4f}, FP rate {statistics.fmean(fp):.4f} (argmax)")
    if all(len(s) == 4 for s in scores):
        dice, fp = zip(*[s[2:] for s in scores])
        print(f"{name}: {len(scores)} folds, post-processed (test_post/*) "
              f"{statistics.fmean(dice):.4f} ± {statistics.pstdev(dice):.4f}, FP rate "
              f"{statistics.fmean(fp):.4f}")
PY
  # crossval.py chooses on validation splits: only for candidates trained with one
  python3 -c 'import sys; from lungseg.data.splits import split_counts
sys.exit(split_counts(sys.argv[1])["val"] == 0)' "$root/$name/fold0/split.csv" 2>/dev/null || continue
  ((CROSSVAL > 0)) && timeout "$CROSSVAL" python3 benchmarks/crossval.py "$root/$name" --jobs 5 --thresholds argmax 0.7 \
    0.9 --min-sizes 0 8 32 --min-confidences 0 0.98 > "$OUT/crossval_$name.md" 2>&1 &
done
wait
if ((CROSSVAL > 0)); then tail -n 8 "$OUT"/crossval_*.md; fi
# ENSEMBLE=1: per fold, eval.py on its test split with every candidate's model of that fold
# (ckpt_path=[...], their mean softmax, at the argmax, with the recipe's test-time flips, which
# runs.txt's scores from metrics.json are without); the candidates must share the split
# (seeds: seed=<n> with data.seed=42); then each member alone, scored the same way. Written to
# ensemble.txt. One thread each: 15 evaluations at once with a thread per core each took 10
# minutes on 2 cores (smoke), against 7.5 s for one alone.
if [ "${ENSEMBLE:-0}" = 1 ]; then
  for fold in 0 1 2 3 4; do
    # "<name> <checkpoint>" per candidate that finished this fold
    mapfile -t found < <(python3 - "$root" "$fold" "${names[@]}" <<'PY'
import json, sys
from pathlib import Path
root, fold, names = Path(sys.argv[1]), sys.argv[2], sys.argv[3:]
for name in names:
    metrics = root / name / f"fold{fold}" / "metrics.json"
    best = json.loads(metrics.read_text()).get("best_checkpoint") if metrics.exists() else None
    if best:
        print(name, best)
PY
)
    ((${#found[@]})) || { echo "fold$fold: no checkpoint to ensemble" | tee -a "$OUT/ensemble.txt"; continue; }
    ckpts=$(printf '%s\n' "${found[@]}" | cut -d' ' -f2- | paste -sd,)
    OMP_NUM_THREADS=1 python3 eval.py "ckpt_path=[$ckpts]" split=test postprocess.threshold=argmax \
      postprocess.min_size=0 progress_bar=false hydra.run.dir="$root/ensemble/fold$fold" \
      > "$root/ensemble-fold$fold.log" 2>&1 &
    # each member alone, scored the same way (flips included), beside the ensemble
    for member in "${found[@]}"; do
      name=${member%% *} ckpt=${member#* }
      OMP_NUM_THREADS=1 python3 eval.py "ckpt_path=$ckpt" split=test postprocess.threshold=argmax \
        postprocess.min_size=0 progress_bar=false hydra.run.dir="$root/alone/$name-fold$fold" \
        > "$root/alone-$name-fold$fold.log" 2>&1 &
    done
  done
  wait
  python3 - "$root" <<'PY' | tee -a "$OUT/ensemble.txt"
import json, statistics, sys
from pathlib import Path
root = Path(sys.argv[1])
names = sorted(p.name.rsplit("-fold", 1)[0] for p in (root / "alone").glob("*-fold0"))
for name in ["ensemble", *names]:
    scores = []
    for fold in range(5):
        folder = root / "ensemble" / f"fold{fold}" if name == "ensemble" else (
            root / "alone" / f"{name}-fold{fold}")
        path = folder / "summary.json"
        if not path.exists():
            print(f"{name}/fold{fold}: no summary.json; see its log in {root}")
            continue
        s = json.loads(path.read_text())
        entry = next(iter(s["classes"].values()))
        scores.append((entry["dice_nonempty"]["mean"], entry["fp_rate_empty"]))
        members = s["checkpoint"] if isinstance(s["checkpoint"], list) else [s["checkpoint"]]
        print(f"{name}/fold{fold}: {len(members)} member(s), test-time flips {s['tta_flips']}, "
              f"test Dice non-empty {scores[-1][0]:.4f}, FP rate empty {scores[-1][1]:.4f}")
    if scores:
        dice, fp = zip(*scores)
        print(f"{name}: {len(scores)} folds, test Dice non-empty {statistics.fmean(dice):.4f} ± "
              f"{statistics.pstdev(dice):.4f}, FP rate {statistics.fmean(fp):.4f} (argmax, "
              "flips)")
PY
fi
# CKPTS=1: every run's folder (config.yaml, split.csv, metrics.json and its checkpoint without
# the optimizer state, which eval.py needs none of) back in $OUT as one tar per fold
# (ckpts_fold<k>.tar: <name>/fold<k>/...; width 16: 7.5 MiB a checkpoint, so two candidates
# fit the 16 MiB a returned file may have), to score further on the CPU:
#   tar xf ckpts_fold0.tar -C outputs/device_lidc
if [ "${CKPTS:-0}" = 1 ]; then
  python3 - "$root" "$OUT" "${names[@]}" <<'PY'
import json, sys, tarfile, tempfile
from pathlib import Path
import torch
root, out, names = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3:]
with tempfile.TemporaryDirectory() as tmp:
    for fold in range(5):
        with tarfile.open(out / f"ckpts_fold{fold}.tar", "w") as tar:
            for name in names:
                run = root / name / f"fold{fold}"
                if not (run / "metrics.json").exists():
                    continue
                best = Path(json.loads((run / "metrics.json").read_text())["best_checkpoint"])
                ckpt = torch.load(best, map_location="cpu", weights_only=True)
                ckpt.pop("optimizer_states", None)
                torch.save(ckpt, Path(tmp) / best.name)
                arc = f"{name}/fold{fold}"
                tar.add(Path(tmp) / best.name, arcname=f"{arc}/checkpoints/{best.name}")
                for extra in ("config.yaml", "split.csv", "metrics.json"):
                    tar.add(run / extra, arcname=f"{arc}/{extra}")
        print(f"ckpts_fold{fold}.tar: {(out / f'ckpts_fold{fold}.tar').stat().st_size >> 20} MiB")
PY
fi
