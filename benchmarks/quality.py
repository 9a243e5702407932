"""Segmentation quality of the four architectures and of the Keras article's recipe (the
baseline) on one dataset: each is trained with `train()` exactly as `python train.py` would,
then its best checkpoint is scored with `evaluate()` (eval.py) on the test split at the masks'
original resolution. Prints one Markdown table.

    python benchmarks/quality.py --image-dir ../shared/data/lung_ct/images \
        --mask-dir ../shared/data/lung_ct/masks --mask-mode index
    python benchmarks/quality.py ... --runs unet article -- trainer.max_epochs=20 data.image_size=96

Each run's folder (outputs/quality/<date>_<time>/<run>/) keeps its checkpoints, metrics and
evaluation. Per-image numbers follow eval.py's rules (an image empty in both ground truth and
prediction scores Dice 1); "pooled Dice" sums true positives and pixel counts over all images.
"""

import argparse
import csv
import sys
import time
from pathlib import Path

from hydra import compose, initialize_config_dir
from hydra.utils import instantiate

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from lungseg.evaluate import evaluate  # noqa: E402
from lungseg.train import plain, train  # noqa: E402

RUNS = {
    "unet": ["model=unet"],
    "fcn": ["model=fcn"],
    "segnet": ["model=segnet"],
    "deeplab": ["model=deeplab"],
    "article": ["experiment=article"],
}


def compose_config(name: str, overrides: list[str]):
    with initialize_config_dir(str(ROOT / "conf"), version_base="1.3"):
        return compose(name, overrides=overrides)


def pooled_dice(per_image_csv: Path, class_name: str) -> float:
    """2 sum TP / (sum |pred| + sum |target|) over all images, TP recovered from each
    image's Dice and pixel counts."""
    tp = pixels = 0.0
    with per_image_csv.open() as f:
        for row in csv.DictReader(f):
            both = float(row[f"pred_pixels_{class_name}"]) + float(
                row[f"target_pixels_{class_name}"]
            )
            tp += float(row[f"dice_{class_name}"]) * both / 2 if both else 0.0
            pixels += both
    return 2 * tp / pixels if pixels else float("nan")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--image-dir", required=True)
    parser.add_argument("--mask-dir", required=True)
    parser.add_argument("--mask-mode", default="index", choices=["index", "binary", "palette"])
    parser.add_argument("--runs", nargs="+", default=list(RUNS), choices=list(RUNS))
    parser.add_argument(
        "--out", default=str(ROOT / "outputs" / "quality" / time.strftime("%Y-%m-%d_%H-%M-%S"))
    )
    parser.add_argument("overrides", nargs="*", help="Hydra overrides applied to every run")
    args = parser.parse_args()

    data = [
        f"data.image_dir={Path(args.image_dir).resolve()}",
        f"data.mask_dir={Path(args.mask_dir).resolve()}",
        f"data.mask_mode={args.mask_mode}",
        "trainer.enable_progress_bar=false",
    ]
    header = (
        "| run | parameters (M) | training min | test Dice mean | median | pooled Dice "
        "| IoU mean | HD95 mean (px) | best epoch |"
    )
    rows = []
    for run in args.runs:
        out = Path(args.out) / run
        cfg = compose_config("config", [*RUNS[run], *data, f"output_dir={out}", *args.overrides])
        metrics = train(cfg)
        eval_cfg = compose_config(
            "eval",
            [
                f"ckpt_path={metrics['best_checkpoint']}",
                f"output_dir={out / 'eval'}",
                "progress_bar=false",
            ],
        )
        summary = evaluate(eval_cfg)
        name = next(iter(summary["classes"]))  # first foreground class
        entry = summary["classes"][name]
        # train() filled in the inferred class count, so the network can be rebuilt from cfg.
        params = sum(p.numel() for p in instantiate(plain(cfg.model)).parameters()) / 1e6
        dice, iou, hd = entry["dice"], entry["iou"]["mean"], entry["hd95"]["mean"]
        pooled = pooled_dice(out / "eval" / "per_image.csv", name)
        rows.append(
            f"| {run} | {params:.2f} | {metrics['train_minutes']:.1f} | {dice['mean']:.4f} "
            f"| {dice['median']:.4f} | {pooled:.4f} | {iou:.4f} | {hd:.2f} "
            f"| {metrics['best_epoch']} |"
        )
        print("\n".join([header, "|---" * 9 + "|", *rows]), flush=True)
    print(f"\n# {args.image_dir}, class '{name}', overrides {args.overrides}, runs in {args.out}")


if __name__ == "__main__":
    main()
