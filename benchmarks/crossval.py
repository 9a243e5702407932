"""Cross-validation report of a sweep over folds, with post-processing chosen on validation.

    python train.py -m experiment=lidc_nodules data.image_dir=<images> data.mask_dir=<masks> \
        data.fold=0,1,2,3,4 'data.split=[0.8,0.2,0.0]'
    python benchmarks/crossval.py outputs/train/multirun_<date>

(lidc_nodules itself trains without a validation split; the runs need one to choose on.)

For every finished run under the folder (a folder with metrics.json; run folders linked into
it count, so a folder of links can gather one setting's runs), the best checkpoint is
scored on the run's validation split under every combination of --thresholds (foreground where
its probability reaches this; "argmax" = the most probable class), --min-sizes (predicted
components below that many pixels at the network size removed) and --min-confidences
(components whose most confident pixel stays below this removed), from one prediction per
image. Each fold takes the setting with the highest Dice on its own validation split (per
image, an image empty in both ground truth and prediction scoring 1, so false positives on
empty slices count) and applies it to its own test split, which is scored with and without
it. With --max-fp-rate F the choice is instead the highest validation Dice over the non-empty
slices among the settings whose validation false-positive rate on empty slices is at most F:
an operating point for a required false-positive rate. A fold whose validation split holds
no slice with a foreground class gets a warning: its choice rests on the empty slices alone.
Prints two Markdown tables: every setting's validation scores as the mean over the folds (for
reading the trade-off), and per fold its choice and test scores, the test Dice over the slices
whose mask is not empty and the false-positive rate on the empty ones, with mean ± std
(population) over the folds. With --jobs N the folds are scored N at a time, each in its own
process.

Every score is the mean over the foreground classes (one class: that class's), each class's
first taken per image as above; the report names the classes. The folder must hold the runs of
one setting, one per fold: runs whose overrides differ in more than data.fold (and resume), or
two runs of one fold, are refused (summary.md of a sweep over more gives the mean ± std per
setting). Rows are labelled by each run's data.fold, in its order. A run's best checkpoint is
taken from its own checkpoints/ folder (a sweep folder copied or moved elsewhere scores its own
copies).

No test image plays a part in the choice applied to it. (A choice by the mean validation score
over the folds would: every fold's validation patients are another fold's test patients.)
"""

import argparse
import json
import multiprocessing
import os
import statistics
import sys
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

from hydra import compose, initialize_config_dir

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from omegaconf import OmegaConf  # noqa: E402

from benchmarks.quality import override_value  # noqa: E402
from lungseg.data.splits import split_counts  # noqa: E402
from lungseg.errors import LungsegError, run_cli  # noqa: E402
from lungseg.sweep import fold_of, fold_order, run_folders, run_overrides, setting  # noqa: E402

# lungseg.evaluate and torch take seconds to import: they are imported in the functions that
# score, so that a refused option or folder is answered at once.


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
                # <run>/crossval is this script's own output, regenerated on every run of it
                "overwrite=true",
                "progress_bar=false",
            ],
        )


def label(post: dict) -> str:
    threshold = "argmax" if post["threshold"] is None else f"{post['threshold']:g}"
    return f"{threshold} | {post['min_size']:g} | {post['min_confidence']:g}"


def mean_std(values: list[float | None]) -> str:
    values = [v for v in values if v is not None]
    if not values:
        return "n/a"
    return f"{statistics.fmean(values):.4f} ± {statistics.pstdev(values):.4f}"


KEYS = ("dice", "dice_nonempty", "fp_empty")  # what choose() weighs, in its order


def entry(summary: dict, key: str) -> float | None:
    """The mean over the foreground classes of their mean ``key`` in a summary (dice,
    dice_nonempty, or fp_empty: the FP rate on the images without the class); the classes
    without a value (no image with, or without, the class) left out, None if none has one."""
    from lungseg.evaluate import scores

    return scores(summary, "s")[f"s/{key}"]


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


def unrepresented(
    folds: dict[Path, int | str | None], val: list[list[dict]], sweep: Path
) -> list[str]:
    """A warning for each fold whose validation split holds no slice with some foreground
    class (each class's Dice over the slices that have it is missing): there, the choice
    rests on that class's empty slices alone, which favour the setting that predicts least."""
    lines = []
    for (run, fold), summaries in zip(folds.items(), val, strict=True):
        classes = summaries[0]["classes"]
        missing = [name for name, c in classes.items() if c["dice_nonempty"]["mean"] is None]
        if not missing:
            continue
        listed = ", ".join(missing)
        if len(missing) == len(classes):
            what, lost = f"foreground ({listed}): its choice", "a lesion"
        else:
            which = "that class" if len(missing) == 1 else "those classes"
            what, lost = f"{listed}: for {which}, its choice", which
        lines.append(
            f"Warning: the validation split of fold {fold} ({run.relative_to(sweep).as_posix()}) "
            f"holds no slice with {what} rests on the empty slices alone, where the setting "
            f"that predicts least scores best, whatever it would cost on the slices with {lost}. "
            f"Read that fold's choice and its test scores with post-processing with care; a "
            f"larger val fraction in data.split gives each fold's validation split more patients."
        )
    return lines


def has_val_split(run: Path) -> bool:
    """Whether the run's split.csv names a val file; True without one (eval.py then says
    what is missing)."""
    path = run / "split.csv"
    return not path.is_file() or split_counts(path)["val"] > 0


def score_validation(checkpoint: str, run: Path, grid: list[dict]) -> list[dict]:
    """The validation split's summaries of one fold's checkpoint, one per grid setting."""
    from lungseg.evaluate import evaluate_grid

    return evaluate_grid(eval_cfg(checkpoint, run / "crossval", "val", grid[0]), grid)


def score_test(checkpoint: str, run: Path, post: dict) -> dict:
    """The test split's summary of one fold's checkpoint with its chosen post-processing; it
    holds the scores without post-processing too (evaluate keeps them)."""
    from lungseg.evaluate import evaluate

    return evaluate(eval_cfg(checkpoint, run / "crossval", "test", post))


def in_parallel(task, calls: list[tuple], jobs: int) -> list:
    """``task(*call)`` for every call, in order; with jobs > 1 in that many fresh processes
    (spawned: no CUDA or thread-pool state is inherited), the threads of the machine shared."""
    if jobs == 1 or len(calls) == 1:
        return [task(*call) for call in calls]
    import torch

    jobs = min(jobs, len(calls))
    threads = max(1, len(os.sched_getaffinity(0)) // jobs)
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(
        jobs, context, initializer=torch.set_num_threads, initargs=(threads,)
    ) as pool:
        return list(pool.map(task, *zip(*calls, strict=True)))


def run_fold(run: Path) -> int | str | None:
    """The run's data.fold: from Hydra's record of its config (.hydra/config.yaml), else from
    its overrides, else from the config train.py wrote (config.yaml)."""
    for path in (run / ".hydra" / "config.yaml", run / "config.yaml"):
        if path.is_file():
            fold = OmegaConf.select(
                OmegaConf.load(path), "data.fold", default=None, throw_on_resolution_failure=False
            )
            if isinstance(fold, int | str):
                return fold
    return fold_of(run_overrides(run))


def check_one_setting(runs: list[Path], sweep: Path) -> dict[Path, int | str | None]:
    """{run: data.fold}, in fold order. LungsegError for runs of more than one setting
    (overrides other than data.fold) or two runs of one fold."""
    name = {run: run.relative_to(sweep).as_posix() for run in runs}
    groups: dict[tuple[str, ...], list[Path]] = {}
    for run in runs:
        groups.setdefault(setting(run_overrides(run)), []).append(run)
    if len(groups) > 1:
        shared = set.intersection(*(set(key) for key in groups))
        listed = "; ".join(
            f"`{' '.join(o for o in key if o not in shared) or 'no other override'}`: "
            f"{', '.join(name[run] for run in members)}"
            for key, members in groups.items()
        )
        raise LungsegError(
            f"{sweep} holds the runs of {len(groups)} settings (overrides other than data.fold): "
            f"{listed}. crossval.py reports the folds of one setting: give it a folder that "
            f"holds only that setting's runs (move or link them into one), one per fold; "
            f"summary.md of the sweep has the mean ± std of each setting's test scores."
        )
    folds = {run: run_fold(run) for run in runs}
    by_fold: dict[int | str | None, list[Path]] = {}
    for run, fold in folds.items():
        by_fold.setdefault(fold, []).append(run)
    repeated = {fold: members for fold, members in by_fold.items() if len(members) > 1}
    if repeated:
        listed = "; ".join(
            f"data.fold {fold}: {', '.join(name[run] for run in members)}"
            for fold, members in repeated.items()
        )
        raise LungsegError(
            f"{sweep} holds more than one run of a fold ({listed}). Give crossval.py a folder "
            f"with one run per fold (move the others out of it)."
        )
    return dict(sorted(folds.items(), key=lambda item: (fold_order(item[1]), str(item[0]))))


def best_checkpoint(run: Path, metrics: dict) -> str:
    """The run's best checkpoint in its own checkpoints/ folder (metrics.json holds the path
    it was saved at, which a copied or moved run folder no longer is); the saved path where
    it lies in the run folder elsewhere."""
    saved = metrics.get("best_checkpoint")
    if not saved:
        raise LungsegError(f"{run} saved no best checkpoint (metrics.json's best_checkpoint).")
    local = run / "checkpoints" / Path(saved).name
    if local.is_file():
        return str(local)
    if Path(saved).is_file() and run.resolve() in Path(saved).resolve().parents:
        return saved
    raise LungsegError(
        f"{run}'s best checkpoint {Path(saved).name} is not in {run / 'checkpoints'} (its "
        f"metrics.json names {saved}, where the run saved it). Copy the run folder with its "
        f"checkpoints/ folder; a checkpoint of another folder is not scored for it."
    )


def threshold_value(text: str) -> str:
    """--thresholds: argmax or a probability in (0, 1)."""
    if text != "argmax":
        try:
            value = float(text)
        except ValueError:
            value = None
        if value is None or not 0 < value < 1:
            raise argparse.ArgumentTypeError(
                f"{text}: give argmax or a probability strictly between 0 and 1, e.g. 0.7"
            )
    return text


def share(low_open: bool, high_open: bool, what: str):
    """An argparse type: a number in [0, 1], the ends excluded where open."""

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            value = float("nan")
        low = value > 0 if low_open else value >= 0
        high = value < 1 if high_open else value <= 1
        if not (low and high):
            bounds = f"{'(' if low_open else '['}0, 1{')' if high_open else ']'}"
            raise argparse.ArgumentTypeError(f"{text}: give {what} in {bounds}")
        return value

    return parse


def at_least(minimum: int | float, kind):
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            value = None
        if value is None or not value >= minimum:
            raise argparse.ArgumentTypeError(f"{text}: give a number of {minimum} or more")
        return value

    return parse


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("sweep", type=Path, help="folder holding the fold runs")
    parser.add_argument(
        "--min-sizes", type=at_least(0, float), nargs="+", default=[0, 4, 8, 16, 32]
    )
    parser.add_argument(
        "--thresholds",
        type=threshold_value,
        nargs="+",
        default=["argmax", "0.6", "0.7", "0.8", "0.9"],
        help="argmax, or probabilities in (0, 1)",
    )
    parser.add_argument(
        "--min-confidences",
        type=share(False, True, "a probability"),
        nargs="+",
        default=[0, 0.9, 0.95, 0.98, 0.99],
        help="probabilities in [0, 1)",
    )
    parser.add_argument(
        "--jobs",
        type=at_least(1, int),
        default=1,
        help="score this many fold runs at once, each in its own process (the CPU work of the "
        "grid, connected components and HD95 per image and setting, is most of the time)",
    )
    parser.add_argument(
        "--max-fp-rate",
        type=share(False, False, "a share"),
        help="choose the best validation Dice on non-empty slices among the settings with at "
        "most this validation false-positive rate on empty slices",
    )
    args = parser.parse_args()
    run_cli(lambda: report(args))


def report(args: argparse.Namespace) -> None:
    """Score the runs under args.sweep and print the report."""
    if not args.sweep.is_dir():
        raise LungsegError(f"{args.sweep} is not a folder: give the folder of the fold runs.")
    runs = run_folders(args.sweep, "metrics.json")  # linked run folders too
    if not runs:
        raise LungsegError(f"no finished run (metrics.json) under {args.sweep}")
    checkpoints = {run: json.loads((run / "metrics.json").read_text()) for run in runs}
    unvalidated = [run for run in runs if not has_val_split(run)]
    if unvalidated:
        raise LungsegError(
            f"{', '.join(map(str, unvalidated))} trained without a val split (data.split "
            f"with a val fraction of 0), so there is nothing to choose its post-processing on. "
            f"Its metrics.json (and a sweep's summary.md) hold its test scores as trained; "
            f"`python eval.py ckpt_path=<run>/checkpoints/last.ckpt split=test` scores it "
            f"with any post-processing."
        )
    best = {run: best_checkpoint(run, metrics) for run, metrics in checkpoints.items()}
    folds = check_one_setting(runs, args.sweep)
    checkpoints = {run: checkpoints[run] for run in folds}  # in fold order
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
    val = in_parallel(score_validation, [(best[run], run, grid) for run in checkpoints], args.jobs)
    classes = list(val[0][0]["classes"])
    if len(classes) == 1:
        print(f"Scores of the foreground class {classes[0]}.\n")
    else:
        print(f"Scores: the mean over the foreground classes {', '.join(classes)}.\n")
    # Per fold and grid setting: Dice over all slices, over the non-empty ones, FP rate.
    scores_by_fold = [
        [[entry(summary, key) for summary in per_run] for key in KEYS] for per_run in val
    ]
    chosen = [choose(*fold, args.max_fp_rate) for fold in scores_by_fold]

    def mean_over_folds(key: int, i: int) -> float | None:
        values = [fold[key][i] for fold in scores_by_fold if fold[key][i] is not None]
        return statistics.fmean(values) if values else None

    print(
        "| threshold | min_size | min_confidence | validation Dice, mean over folds "
        "| Dice non-empty | FP rate empty | chosen by fold |\n|---|---|---|---|---|---|---|"
    )
    for i, post in enumerate(grid):
        by = ", ".join(
            str(fold) for fold, best in zip(folds.values(), chosen, strict=True) if best == i
        )
        means = [cell(mean_over_folds(key, i)) for key in range(len(KEYS))]
        print(f"| {label(post)} | " + " | ".join(means) + f" | {by} |")
    for line in unrepresented(folds, val, args.sweep):
        print(f"\n{line}")
    if args.max_fp_rate is not None:
        over = [
            str(fold)
            for k, (fold, scored) in enumerate(zip(folds.values(), scores_by_fold, strict=True))
            if (scored[2][chosen[k]] or 0) > args.max_fp_rate
        ]
        if over:
            print(
                f"\nFolds {', '.join(map(str, over))}: no setting keeps the validation FP rate "
                f"at or under {args.max_fp_rate:g}; chosen there: the lowest FP rate."
            )

    header = (
        "| fold | run | best epoch | chosen: threshold, min_size, min_confidence | its val Dice "
        "| test Dice non-empty | with post-processing | FP rate empty | with post-processing "
        "| test Dice (all slices) | with post-processing |"
    )
    print(f"\n{header}\n" + "|---" * 11 + "|")
    table = []
    tests = in_parallel(
        score_test,
        [(best[run], run, grid[chosen[k]]) for k, run in enumerate(checkpoints)],
        args.jobs,
    )
    for k, ((run, metrics), summary) in enumerate(zip(checkpoints.items(), tests, strict=True)):
        post_k = grid[chosen[k]]
        raw = summary.get("without_postprocessing", summary)
        row = [
            entry(s, key) for key in ("dice_nonempty", "fp_empty", "dice") for s in (raw, summary)
        ]
        table.append(row)
        name = run.relative_to(args.sweep).as_posix()
        chosen_label = label(post_k).replace(" |", ",")
        print(
            f"| {folds[run]} | {name} | {metrics['best_epoch']} | {chosen_label} "
            f"| {cell(scores_by_fold[k][0][chosen[k]])} | "
            + " | ".join(cell(v) for v in row)
            + " |"
        )
    spread = [mean_std([row[i] for row in table]) for i in range(6)]
    print(f"| mean ± std | {len(table)} folds | | | | " + " | ".join(spread) + " |", flush=True)
    used = sorted({", ".join(summary["tta_flips"]) or "none" for summary in tests})
    print(
        f"\nTest-time flips (the checkpoints' postprocess.tta_flips), on validation and test: "
        f"{'; '.join(used)}"
    )


if __name__ == "__main__":
    main()
