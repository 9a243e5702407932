"""Segmentation quality of the four architectures and of the Keras article's recipe (the
baseline) on one dataset: each is trained with `train()` exactly as `python train.py` would,
then its best checkpoint is scored with `evaluate()` (eval.py) on the test split at the masks'
original resolution. Prints one Markdown table.

    python benchmarks/quality.py --image-dir ../shared/data/lung_ct/images \
        --mask-dir ../shared/data/lung_ct/masks --experiment lung_ct
    python benchmarks/quality.py ... --runs unet article -- trainer.max_epochs=20 data.image_size=96
    python benchmarks/quality.py --image-dir CXR_png --mask-dir ManualMask/leftMask \
        ManualMask/rightMask --mask-mode binary     # one mask folder per class, united

With --experiment, the four architectures train with that recipe (conf/experiment/<name>.yaml,
model=<architecture> on top), and the article's recipe keeps its own settings but takes the
recipe's mask encoding and split (patient grouping, folds), so every row is scored on the same
test images. Overrides after "--" apply to every run.

Each run's folder (outputs/quality/<date>_<time>/<run>/) keeps its checkpoints, metrics and
evaluation. Per-image numbers follow eval.py's rules (an image empty in both ground truth and
prediction scores Dice 1); "pooled Dice" sums true positives and pixel counts over all images;
"Dice non-empty" is the mean over the images whose mask has the class, "FP rate empty" the share
of the images without it on which the class is predicted (n/a: every mask has it). Scores are
after the recipe's post-processing (postprocess.threshold, min_size and min_confidence) and
with its test-time flips (postprocess.tta_flips; the article's recipe has none), as eval.py
applies them; the footer lists each run's flips.
"val Dice" is the best checkpoint's mean Dice on the validation split scored the same way (at
the masks' resolution, eval.py split=val): what recipes are chosen on, the test columns being
for reporting only. "val Dice, net px" is the validation Dice at the network's size that chose
the checkpoint; it flatters small sizes, whose boundaries are only scored on their own coarse
grid (lung_ct: 192 px beats 160 px at 512 px, 0.9879 against 0.9874, but not at the network's
size, 0.9883 against 0.9886); n/a where the checkpoint was chosen by another measure (the
article's recipe watches val/loss).
"""

import argparse
import csv
import re
import sys
import time
from collections.abc import Mapping
from difflib import get_close_matches
from pathlib import Path

from hydra import compose, initialize_config_dir
from hydra.errors import HydraException
from hydra.utils import instantiate
from omegaconf import OmegaConf

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from lungseg.data.splits import split_counts  # noqa: E402
from lungseg.errors import LungsegError, run_cli  # noqa: E402

RUNS = {
    "unet": ["model=unet"],
    "fcn": ["model=fcn"],
    "segnet": ["model=segnet"],
    "deeplab": ["model=deeplab"],
    "article": ["experiment=article"],
}


# What the article's run takes from the recipe: how masks are read and which images are tested.
SPLIT_KEYS = (
    "mask_mode",
    "class_names",
    "group_pattern",
    "num_folds",
    "fold",
    "split",
    "split_file",
)


def override_value(value) -> str:
    """A Hydra override value for a plain config value (lists, strings with regex characters)."""
    if value is None:
        return "null"
    if isinstance(value, list):
        return "[" + ",".join(override_value(v) for v in value) + "]"
    if isinstance(value, str):
        return "'" + value.replace("'", "\\'") + "'"  # Hydra keeps other backslashes as they are
    return str(value)


def mask_dir_override(folders: list[str]) -> str:
    """data.mask_dir for one mask folder, or for a list of them (one class's masks each)."""
    paths = [str(Path(folder).resolve()) for folder in folders]
    return f"data.mask_dir={override_value(paths[0] if len(paths) == 1 else paths)}"


def _num(value) -> str:
    return "n/a" if value is None else f"{value:.4f}"


def compose_config(name: str, overrides: list[str]):
    """conf/<name>.yaml with ``overrides``; a LungsegError for one Hydra cannot apply (a
    misspelt key, an unknown recipe, an override that does not parse), as train.py gives
    Hydra's message without a traceback."""
    try:
        with initialize_config_dir(str(ROOT / "conf"), version_base="1.3"):
            return compose(name, overrides=overrides)
    except HydraException as error:
        raise LungsegError(config_error(error, name, overrides)) from error


def config_error(error: HydraException, name: str, overrides: list[str]) -> str:
    """Hydra's message in one line, Hydra's search path left out; for a key the config lacks
    (``model.widht=8``), the settings of its group with the nearest names."""
    text = str(error).split("\nConfig search path:")[0]
    missing = re.match(r"Could not override '([^']+)'", text)
    if missing:
        key = missing.group(1)
        group, _, leaf = key.rpartition(".")
        try:
            others = [o for o in overrides if o.split("=", 1)[0].lstrip("~+") != key]
            node = OmegaConf.select(compose_config(name, others), group) if group else None
        except LungsegError:  # another override fails too: named once this one is mended
            node = None
        close = get_close_matches(leaf, list(node), cutoff=0.7) if isinstance(node, Mapping) else []
        guess = " or ".join(f"{group}.{other}" for other in close)
        # Not Hydra's "use +key=...": the groups built from the config refuse keys they lack.
        return f"Could not override '{key}': the config has no such key" + (
            f"; did you mean {guess}?" if close else " (python train.py --cfg job lists them)."
        )
    parts: list[str] = []
    for line in text.splitlines():
        if line.startswith("\t") and parts:  # an item of the list the line before announced
            parts[-1] += (" " if parts[-1].endswith(":") else ", ") + line.strip()
        elif line.strip():
            parts.append(line.strip())
    return " ".join(part if part.endswith((".", ":")) else f"{part}." for part in parts)


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
    parser.add_argument(
        "--mask-dir",
        required=True,
        nargs="+",
        help="the mask folder, or one folder per class (data.mask_dir as a list)",
    )
    parser.add_argument(
        "--mask-mode",
        default=None,
        choices=["index", "binary", "palette"],
        help="default: the recipe's",
    )
    parser.add_argument("--experiment", default=None, help="recipe of the four architectures")
    parser.add_argument("--runs", nargs="+", default=list(RUNS), choices=list(RUNS))
    parser.add_argument(
        "--out", default=str(ROOT / "outputs" / "quality" / time.strftime("%Y-%m-%d_%H-%M-%S"))
    )
    parser.add_argument("overrides", nargs="*", help="Hydra overrides applied to every run")
    args = parser.parse_args()
    run_cli(lambda: benchmark(args))


def check_out(out: Path, runs: list[str]) -> None:
    """LungsegError, before anything trains, when --out is a file or already holds one of the
    runs (train() never writes over a run)."""
    if out.exists() and not out.is_dir():
        raise LungsegError(f"--out {out} is a file: give a folder for the runs.")
    taken = [run for run in runs if (out / run).exists() and any((out / run).iterdir())]
    if taken:
        raise LungsegError(
            f"--out {out} already holds the run{'s' if len(taken) > 1 else ''} "
            f"{', '.join(taken)} of an earlier call, and runs are never written over. Give "
            f"another --out, or leave --out out (each call gets a new folder "
            f"outputs/quality/<date>_<time>)."
        )


def benchmark(args: argparse.Namespace) -> None:
    """Train and score every run of args.runs; print the table."""
    check_out(Path(args.out), args.runs)

    data = [
        f"data.image_dir={override_value(str(Path(args.image_dir).resolve()))}",
        mask_dir_override(args.mask_dir),
        "trainer.enable_progress_bar=false",
    ]
    if args.mask_mode or not args.experiment:
        data.append(f"data.mask_mode={args.mask_mode or 'index'}")
    recipe = [f"experiment={args.experiment}"] if args.experiment else []
    shared = []  # the recipe's data encoding and split, for the article's run
    if args.experiment:
        recipe_cfg = compose_config("config", recipe)
        recipe_data = OmegaConf.to_container(recipe_cfg.data)
        for key in SPLIT_KEYS:
            shared.append(f"data.{key}={override_value(recipe_data[key])}")
        # Scored like the other rows: with the recipe's post-processing.
        post = recipe_cfg.postprocess
        shared.append(f"postprocess.min_size={post.min_size}")
        shared.append(f"postprocess.threshold={override_value(post.threshold)}")
        shared.append(f"postprocess.min_confidence={post.min_confidence}")
    header = (
        "| run | parameters (M) | training min | val Dice | val Dice, net px | test Dice mean "
        "| median | pooled Dice | Dice non-empty | FP rate empty | IoU mean | HD95 mean (px) "
        "| best epoch |"
    )
    configs = {}  # all composed first: a bad override stops the call before anything trains
    for run in args.runs:
        runs = [*RUNS[run], *shared] if run == "article" else [*recipe, *RUNS[run]]
        output = f"output_dir={override_value(str(Path(args.out) / run))}"
        configs[run] = compose_config("config", [*runs, *data, output, *args.overrides])
    # Imported once every config is composed: a refused one is reported without waiting
    # seconds for torch and Lightning.
    from lungseg.evaluate import evaluate
    from lungseg.train import plain, train

    rows, flips = [], {}
    for run, cfg in configs.items():
        out = Path(args.out) / run
        metrics = train(cfg)
        scored = {}
        # a run without a validation split: val Dice n/a
        has_val = split_counts(out / "split.csv")["val"] > 0
        for split, folder in (("val", "eval_val"), ("test", "eval"))[0 if has_val else 1 :]:
            eval_cfg = compose_config(
                "eval",
                [
                    f"ckpt_path={override_value(metrics['best_checkpoint'])}",
                    f"split={split}",
                    f"output_dir={override_value(str(out / folder))}",
                    "progress_bar=false",
                ],
            )
            scored[split] = evaluate(eval_cfg)
        summary = scored["test"]
        flips[run] = summary["tta_flips"]
        name = next(iter(summary["classes"]))  # first foreground class
        entry = summary["classes"][name]
        val_dice = scored["val"]["classes"][name]["dice"]["mean"] if has_val else None
        # train() filled in the inferred class count, so the network can be rebuilt from cfg.
        params = sum(p.numel() for p in instantiate(plain(cfg.model)).parameters()) / 1e6
        dice, iou, hd = entry["dice"], entry["iou"]["mean"], entry["hd95"]["mean"]
        pooled = pooled_dice(out / "eval" / "per_image.csv", name)
        nonempty, fp_rate = entry["dice_nonempty"]["mean"], entry["fp_rate_empty"]
        # the checkpoint's monitor; a recipe that chooses by val/loss (the article's) has none
        net_dice = metrics["best_score"] if metrics.get("monitor") == "val/dice" else None
        rows.append(
            f"| {run} | {params:.2f} | {metrics['train_minutes']:.1f} "
            f"| {_num(val_dice)} | {_num(net_dice)} | {dice['mean']:.4f} "
            f"| {dice['median']:.4f} | {pooled:.4f} | {_num(nonempty)} | {_num(fp_rate)} "
            f"| {iou:.4f} | {hd:.2f} | {metrics['best_epoch']} |"
        )
        print("\n".join([header, "|---" * 13 + "|", *rows]), flush=True)
    print(
        f"\n# {args.image_dir}, masks {' '.join(args.mask_dir)}, class '{name}', experiment "
        f"{args.experiment}, overrides {args.overrides}, runs in {args.out}"
    )
    print("# test-time flips: " + ", ".join(f"{run} {f or 'none'}" for run, f in flips.items()))


if __name__ == "__main__":
    main()
