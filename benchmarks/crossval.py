"""Cross-validation report of a sweep over folds, with post-processing chosen on validation.

    python train.py -m experiment=lidc_nodules data.image_dir=<images> data.mask_dir=<masks> \
        data.fold=0,1,2,3,4
    python benchmarks/crossval.py outputs/train/multirun_<date>

For every finished run under the folder (a folder with metrics.json), the best checkpoint is
scored on the run's validation split under every combination of --thresholds (foreground where
its probability reaches this; "argmax" = the most probable class), --min-sizes (predicted
components below that many pixels at the network size removed) and --min-confidences
(components whose most confident pixel stays below this removed), from one prediction per
image. The setting with the highest mean validation Dice over the folds (per image, an image
empty in both ground truth and prediction scoring 1, so false positives on empty slices count)
is then applied to each test split, which is scored with and without it. With --max-fp-rate F
the choice is instead the highest validation Dice over the non-empty slices among the settings
whose mean validation false-positive rate on empty slices is at most F: an operating point for
a required false-positive rate. Prints one Markdown table:
per fold and mean ± std (population) over the folds, the test Dice over the slices whose mask is
not empty and the false-positive rate on the empty ones. The test splits play no part in any
choice.
"""

import argparse
import json
import statistics
import sys
from pathlib import Path

from hydra import compose, initialize_config_dir

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.quality import override_value  # noqa: E402
from lungseg.evaluate import evaluate, evaluate_grid  # noqa: E402


def quote(path) -> str:
    """A path as a quoted Hydra override value (sweep folders hold '=' and ',')."""
    return override_value(str(path))


def eval_cfg(checkpoint: str, out: Path, split: str, post: dict):
    """eval.py's config scoring ``checkpoint`` on ``split`` with the post-processing ``post``."""
    threshold = post["threshold"]
    name = (
        f"{split}_t{'argmax' if threshold is None else f'{threshold:g}'}"
        f"_min{post['min_size']:g}_conf{post['min_confidence']:g}"
    )
    with initialize_config_dir(str(ROOT / "conf"), version_base="1.3"):
        return compose(
            "eval",
            [
                f"ckpt_path={quote(checkpoint)}",
                f"split={split}",
                f"postprocess.min_size={post['min_size']}",
                f"postprocess.threshold={'argmax' if threshold is None else threshold}",
                f"postprocess.min_confidence={post['min_confidence']}",
                f"output_dir={quote(out / name)}",
                "progress_bar=false",
            ],
        )


def label(post: dict) -> str:
    threshold = "argmax" if post["threshold"] is None else f"{post['threshold']:g}"
    return f"{threshold} | {post['min_size']:g} | {post['min_confidence']:g}"


def first_class(summary: dict) -> dict:
    """The summary entry of the first foreground class."""
    return next(iter(summary["classes"].values()))


def mean_std(values: list[float | None]) -> str:
    values = [v for v in values if v is not None]
    if not values:
        return "n/a"
    return f"{statistics.fmean(values):.4f} ± {statistics.pstdev(values):.4f}"


def cell(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.4f}"


def choose(
    dice: list[float | None],
    nonempty: list[float | None],
    fp_rate: list[float | None],
    max_fp_rate: float | None,
) -> int:
    """The index of the chosen setting: the best mean Dice over all slices or, with
    ``max_fp_rate``, the best Dice over the non-empty slices among the settings whose FP rate on
    the empty slices is at most that (none: the lowest FP rate). A missing Dice (no non-empty
    slice) counts as the worst, a missing FP rate (no empty slice) as 0; either depends on the
    ground truth alone, so it is the same for every setting. Ties go to the least
    post-processing, the earliest in the grid."""

    def value(values: list[float | None], i: int, worst: float) -> float:
        return worst if values[i] is None else values[i]

    indices = range(len(dice))
    if max_fp_rate is None:
        return max(indices, key=lambda i: (value(dice, i, -1), -i))
    allowed = [i for i in indices if value(fp_rate, i, 0) <= max_fp_rate]
    if not allowed:
        return min(indices, key=lambda i: (value(fp_rate, i, 0), i))
    return max(allowed, key=lambda i: (value(nonempty, i, -1), -i))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("sweep", type=Path, help="folder holding the fold runs")
    parser.add_argument("--min-sizes", type=float, nargs="+", default=[0, 4, 8, 16, 32])
    parser.add_argument("--thresholds", nargs="+", default=["argmax", "0.6", "0.7", "0.8", "0.9"])
    parser.add_argument(
        "--min-confidences", type=float, nargs="+", default=[0, 0.9, 0.95, 0.98, 0.99]
    )
    parser.add_argument(
        "--max-fp-rate",
        type=float,
        help="choose the best validation Dice on non-empty slices among the settings with at "
        "most this validation false-positive rate on empty slices",
    )
    args = parser.parse_args()

    runs = sorted(path.parent for path in args.sweep.glob("**/metrics.json"))
    if not runs:
        sys.exit(f"crossval: no finished run (metrics.json) under {args.sweep}")
    checkpoints = {run: json.loads((run / "metrics.json").read_text()) for run in runs}
    for run, metrics in checkpoints.items():
        if not metrics.get("best_checkpoint"):
            sys.exit(f"crossval: {run} saved no best checkpoint")

    for value in args.min_confidences:
        if not 0 <= value < 1:
            sys.exit(f"crossval: --min-confidences {value:g}: give values in [0, 1)")
    if args.max_fp_rate is not None and not 0 <= args.max_fp_rate <= 1:
        sys.exit(f"crossval: --max-fp-rate {args.max_fp_rate:g}: give a share in [0, 1]")
    grid = [
        {
            "threshold": None if t == "argmax" else float(t),
            "min_size": float(size),
            "min_confidence": float(confidence),
        }
        for t in args.thresholds
        for size in args.min_sizes
        for confidence in args.min_confidences
        # a component above the threshold already peaks above any lower confidence bar
        if not (t != "argmax" and 0 < confidence <= float(t))
    ]
    val = [
        evaluate_grid(eval_cfg(m["best_checkpoint"], run / "crossval", "val", grid[0]), grid)
        for run, m in checkpoints.items()
    ]

    def val_mean(i: int, key: str) -> float | None:
        """Mean over the folds of one first-class summary entry for grid setting i."""
        values = [first_class(per_run[i])[key] for per_run in val]
        values = [v["mean"] if isinstance(v, dict) else v for v in values]
        values = [v for v in values if v is not None]
        return statistics.fmean(values) if values else None

    val_dice = [val_mean(i, "dice") for i in range(len(grid))]
    val_nonempty = [val_mean(i, "dice_nonempty") for i in range(len(grid))]
    val_fp = [val_mean(i, "fp_rate_empty") for i in range(len(grid))]
    best = choose(val_dice, val_nonempty, val_fp, args.max_fp_rate)
    chosen = grid[best]
    print(
        "| threshold | min_size | min_confidence | validation Dice mean over folds "
        "| Dice non-empty | FP rate empty |\n|---|---|---|---|---|---|"
    )
    for i, post in enumerate(grid):
        print(
            f"| {label(post)}{' (chosen)' if i == best else ''} | {val_dice[i]:.4f} "
            f"| {cell(val_nonempty[i])} | {cell(val_fp[i])} |"
        )
    if args.max_fp_rate is not None and not (val_fp[best] or 0) <= args.max_fp_rate:
        print(
            f"\nNo setting keeps the validation FP rate at or under {args.max_fp_rate:g}; "
            "chosen: the lowest FP rate."
        )

    header = (
        "| fold run | best epoch | test Dice non-empty | with post-processing | FP rate empty "
        "| with post-processing | test Dice (all slices) | with post-processing |"
    )
    print(f"\n{header}\n" + "|---" * 8 + "|")
    table = []
    for run, metrics in checkpoints.items():
        # One scoring gives both: evaluate() keeps the scores before post-processing.
        summary = evaluate(eval_cfg(metrics["best_checkpoint"], run / "crossval", "test", chosen))
        post = first_class(summary)
        raw = first_class(summary.get("without_postprocessing", summary))
        row = [
            raw["dice_nonempty"]["mean"],
            post["dice_nonempty"]["mean"],
            raw["fp_rate_empty"],
            post["fp_rate_empty"],
            raw["dice"]["mean"],
            post["dice"]["mean"],
        ]
        table.append(row)
        name = run.relative_to(args.sweep).as_posix()
        print(f"| {name} | {metrics['best_epoch']} | " + " | ".join(cell(v) for v in row) + " |")
    spread = [mean_std([row[i] for row in table]) for i in range(6)]
    print(f"| mean ± std ({len(table)} folds) | | " + " | ".join(spread) + " |", flush=True)


if __name__ == "__main__":
    main()
