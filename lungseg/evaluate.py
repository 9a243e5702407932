"""Score a checkpoint on labelled images: metrics per image and class, and their summary.

Predictions are made at the network's size and their softmax probabilities resized bilinearly
to each mask's original size before the argmax (``inference.predict_probabilities``), so every
metric, HD95 included, is measured at the original resolution, in pixels.

For each image and each foreground class c (pred = prediction == c, gt = ground truth == c;
TP, FP, TN, FN pixel counts from the image's confusion matrix):

- dice = 2 TP / (2 TP + FP + FN); iou = TP / (TP + FP + FN);
- precision = TP / (TP + FP); recall (sensitivity) = TP / (TP + FN);
  specificity = TN / (TN + FP);
- hd95: symmetric 95th-percentile Hausdorff distance: the 95th percentile (numpy's default
  linear interpolation) of the union of both directed surface-distance sets, i.e. the
  Euclidean distance from every boundary pixel of pred to the nearest boundary pixel of gt and
  from every boundary pixel of gt to the nearest one of pred. A boundary pixel is a pixel of
  the mask with a 4-neighbour outside it (beyond the image edge counts as outside).

Empty masks. A ratio whose denominator is 0 is 1 when pred and gt agree and 0 when they do not:
both empty → dice = iou = precision = recall = 1 (specificity is then TN / TN = 1) and hd95 = 0;
exactly one empty → dice = iou = precision = recall = 0 and hd95 = the image diagonal
sqrt(H² + W²) in pixels (specificity keeps its formula: 1 if only gt has the class, below 1
if only pred has it). The same rule decides specificity where gt fills the image (no negative
pixels): 1 if pred fills it too, else 0, the mirror of recall on an empty gt. Every image
therefore counts in every class's mean, unlike the training metrics, which leave out images
where a class is absent from both. For lesions, which most
slices lack, the summary also gives ``dice_nonempty`` (over the images whose ground truth has
the class) and ``fp_rate_empty`` (the share of the images without the class in the ground
truth on which some pixel is predicted as it).

Ignored pixels (the checkpoint's data.ignore_index: the mask stores the ignore label there)
are neither prediction nor ground truth: they are left out of every count above (TN
included), of hd95's masks (a prediction there is no boundary) and of the pixel counts of the
lesion scores.

Post-processing (``postprocess.threshold``, ``postprocess.min_size`` and
``postprocess.min_confidence``, by default the checkpoint's) is applied before scoring; the
summary then also holds the scores without it (``without_postprocessing``), and the log says
what it changed.
"""

import csv
import filecmp
import hashlib
import json
import logging
from pathlib import Path
from typing import Any

import cv2
import numpy as np
from omegaconf import DictConfig, OmegaConf
from tqdm import tqdm

from lungseg import hostmem, hydra_files, postprocess
from lungseg.checks import check_overwrite, check_switch_words, check_top_keys, require
from lungseg.data import splits, transforms
from lungseg.data.demo import make_demo_dataset
from lungseg.data.folders import (
    IMAGE_EXTENSIONS,
    Pair,
    _list_images,
    check_orientations,
    check_output_folder,
    check_writable,
    exif_orientation,
    find_pairs,
    is_pattern,
    layer_folders,
    layer_names,
    one_unread_warning,
    read_image,
    read_image_oriented,
    suffix_list,
    write_reasons,
    writing,
)
from lungseg.data.folders import existing as taken
from lungseg.data.masks import IGNORE, decode_layers, ignore_value, mask_at_image_size
from lungseg.errors import LungsegError, counted
from lungseg.inference import (
    InputCheck,
    batches,
    config_checkpoints,
    load_from_config,
    neighbour_table,
    predict_probabilities,
    read_usable,
    report_skipped,
)

METRICS = ("dice", "iou", "precision", "recall", "specificity", "hd95")
OUTPUT_FILES = ("per_image.csv", "summary.json")  # what evaluate() writes into output_dir
UNSCORED_FILE = "unscored.csv"  # and, with data.strict=false, the pairs it left out
DEFAULT_MASK_SUFFIXES = ("", "_mask")
_WRITE_FIX = "Give a folder you can write to, on a disk with room, with output_dir=<folder>."
log = logging.getLogger(__name__)


def boundary(mask: np.ndarray) -> np.ndarray:
    """(H, W) bool: the pixels of ``mask`` with a 4-neighbour outside it (or off the image)."""
    padded = np.pad(mask.astype(bool), 1)
    interior = (
        padded[1:-1, 1:-1]
        & padded[:-2, 1:-1]
        & padded[2:, 1:-1]
        & padded[1:-1, :-2]
        & padded[1:-1, 2:]
    )
    return padded[1:-1, 1:-1] & ~interior


def hd95(pred: np.ndarray, target: np.ndarray) -> float:
    """Symmetric 95th-percentile Hausdorff distance in pixels between two (H, W) bool masks:
    95th percentile of the union of both directed boundary-to-boundary distance sets. Both
    empty → 0; exactly one empty → the image diagonal sqrt(H² + W²)."""
    if not pred.any() and not target.any():
        return 0.0
    if not pred.any() or not target.any():
        return float(np.hypot(*pred.shape))
    a, b = boundary(pred), boundary(target)
    distances = np.concatenate([_distance_to(b)[a], _distance_to(a)[b]])
    return float(np.percentile(distances, 95))


def _distance_to(points: np.ndarray) -> np.ndarray:
    """(H, W) float32 exact Euclidean distance of every pixel to the nearest True pixel."""
    return cv2.distanceTransform((~points).astype(np.uint8), cv2.DIST_L2, cv2.DIST_MASK_PRECISE)


def _ratio(numerator: int, denominator: int, agree: bool) -> float:
    """numerator / denominator, where 0 / 0 is 1 if prediction and ground truth agree, else 0."""
    if denominator == 0:
        return 1.0 if agree else 0.0
    return numerator / denominator


def image_metrics(
    pred: np.ndarray, target: np.ndarray, num_classes: int, ignore: int | None = None
) -> dict[int, dict]:
    """Metrics of one image for each foreground class: ``{c: {"dice": ..., ..., "hd95": ...,
    "target_pixels": n, "pred_pixels": n}}`` for c in 1..num_classes-1. pred, target: (H, W)
    class ids at the same (original) size; target pixels of ``ignore`` are left out.
    Formulas, the empty-mask rule and ignored pixels: module docstring."""
    assert pred.shape == target.shape, (pred.shape, target.shape)
    kept = None if ignore is None else target != ignore
    shown = pred if kept is None else np.where(kept, pred, num_classes)  # no class: dropped
    # Confusion matrix (rows: ground truth, columns: prediction) in one pass; ignored pixels
    # are counted in the extra column and row num_classes, then dropped.
    size = num_classes + (kept is not None)
    truth = target if kept is None else np.where(kept, target, num_classes)
    confusion = np.bincount(
        truth.ravel().astype(np.int64) * size + shown.ravel(), minlength=size * size
    ).reshape(size, size)[:num_classes, :num_classes]
    total = int(target.size if kept is None else kept.sum())
    out = {}
    for c in range(1, num_classes):
        tp = int(confusion[c, c])
        fp = int(confusion[:, c].sum()) - tp
        fn = int(confusion[c, :].sum()) - tp
        tn = total - tp - fp - fn
        agree = fp == 0 and fn == 0
        out[c] = {
            "dice": _ratio(2 * tp, 2 * tp + fp + fn, agree),
            "iou": _ratio(tp, tp + fp + fn, agree),
            "precision": _ratio(tp, tp + fp, agree),
            "recall": _ratio(tp, tp + fn, agree),
            "specificity": _ratio(tn, tn + fp, agree),
            "hd95": hd95(shown == c, truth == c),
            "target_pixels": tp + fn,
            "pred_pixels": tp + fp,
        }
    return out


def summarize(rows: list[dict[str, Any]], class_names: list[str]) -> dict[str, Any]:
    """Per foreground class: mean, median and population std (ddof=0) over the images of each
    metric, and the counts behind them; plus the mean over classes of each metric's mean."""
    classes = {}
    for name in class_names[1:]:
        gt_empty = np.array([row[f"target_pixels_{name}"] == 0 for row in rows])
        pred_empty = np.array([row[f"pred_pixels_{name}"] == 0 for row in rows])
        entry: dict[str, Any] = {
            "n_images": len(rows),
            "n_empty_ground_truth": int(gt_empty.sum()),
            "n_empty_prediction": int(pred_empty.sum()),
            "n_both_empty": int((gt_empty & pred_empty).sum()),
            "n_one_empty": int((gt_empty ^ pred_empty).sum()),
        }
        for metric in METRICS:
            values = np.array([row[f"{metric}_{name}"] for row in rows], dtype=np.float64)
            entry[metric] = {
                "mean": float(values.mean()),
                "median": float(np.median(values)),
                "std": float(values.std()),
            }
        dice = np.array([row[f"dice_{name}"] for row in rows], dtype=np.float64)[~gt_empty]
        entry["dice_nonempty"] = {
            "mean": float(dice.mean()) if dice.size else None,
            "median": float(np.median(dice)) if dice.size else None,
        }
        entry["fp_rate_empty"] = (
            float((gt_empty & ~pred_empty).sum() / gt_empty.sum()) if gt_empty.any() else None
        )
        classes[name] = entry
    mean = {m: float(np.mean([c[m]["mean"] for c in classes.values()])) for m in METRICS}
    return {"n_images": len(rows), "classes": classes, "mean_over_classes": mean}


def evaluate(cfg: DictConfig) -> dict[str, Any]:
    """Score ``cfg.ckpt_path`` (conf/eval.yaml) and write ``per_image.csv`` and
    ``summary.json`` into ``cfg.output_dir``; a folder that already holds either is refused
    before any scoring, unless ``cfg.overwrite``. Returns the summary."""
    check_top_keys(cfg, "eval.py")
    check_switch_words(cfg)
    per_image, summary_file = _output_paths(cfg)
    paths = config_checkpoints(cfg)
    hostmem.configure(cfg.get("retain_freed_memory", True))
    model = load_from_config(cfg)
    post = postprocess.settings(cfg.get("postprocess"), model.hparams.get("postprocess"))
    grid = [post, postprocess.settings({"min_size": 0}, None)]
    if not postprocess.active(post):
        grid = grid[:1]
    scored, source, mask_mode, flips, failed = _score(cfg, model, grid)
    rows = scored[0]
    raw_rows = scored[1] if len(scored) > 1 else []
    info = model.hparams.data_info
    class_names = list(info["class_names"])

    with writing(per_image, _WRITE_FIX):
        per_image.parent.mkdir(parents=True, exist_ok=True)
        with per_image.open("w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]), lineterminator="\n")
            writer.writeheader()
            writer.writerows(rows)
    unscored = per_image.with_name(UNSCORED_FILE)
    with writing(unscored, _WRITE_FIX):
        if failed:  # data.strict=false: the pairs left out, each with its reason
            write_reasons(unscored, failed)
        elif unscored.is_file():  # an earlier evaluation's, which overwrite=true replaces
            unscored.unlink()
    summary = {
        # one path, or the list of an ensemble's
        "checkpoint": _one_or_list([str(Path(p).expanduser().absolute()) for p in paths]),
        "images": source,
        "mask_mode": mask_mode,
        "tta_flips": flips,
        "postprocess": post,
        "unscored": len(failed),  # pairs data.strict=false left out: unscored.csv
        **summarize(rows, class_names),
    }
    if raw_rows:
        summary["without_postprocessing"] = summarize(raw_rows, class_names)
        for name, entry in summary["classes"].items():
            before = summary["without_postprocessing"]["classes"][name]
            log.info(
                "post-processing (%s, at the network size), %s: "
                "dice %.4f -> %.4f, dice on non-empty %s -> %s, false positives on empty "
                "slices %s -> %s",
                postprocess.describe(post),
                name,
                before["dice"]["mean"],
                entry["dice"]["mean"],
                _fmt(before["dice_nonempty"]["mean"]),
                _fmt(entry["dice_nonempty"]["mean"]),
                _fmt(before["fp_rate_empty"]),
                _fmt(entry["fp_rate_empty"]),
            )
    with writing(summary_file, _WRITE_FIX):
        summary_file.write_text(json.dumps(summary, indent=2) + "\n")
    for name, entry in summary["classes"].items():
        log.info(
            "%s: dice %.4f (median %.4f), hd95 %.2f px over %d images, %d of them "
            "without %s in the ground truth",
            name,
            entry["dice"]["mean"],
            entry["dice"]["median"],
            entry["hd95"]["mean"],
            entry["n_images"],
            entry["n_empty_ground_truth"],
            name,
        )
    if failed:
        log.info(
            "%s scored, %s left out (data.strict=false; each with its reason in %s)",
            counted(len(rows), "image"),
            counted(len(failed), "pair"),
            UNSCORED_FILE,
        )
    log.info("%s and %s written to %s", *OUTPUT_FILES, per_image.parent)
    return summary


def test_config(checkpoint: str | Path, output_dir: str | Path) -> DictConfig:
    """conf/eval.yaml's settings with every choice left to the checkpoint: its run's test
    split, its post-processing and test-time flips; no progress bar, ``output_dir`` written
    over. What train.py scores its test split with after the fit (``test_post/*``); the keys are
    eval.yaml's (tests/test_evaluate.py compares them)."""
    return OmegaConf.create(
        {
            "ckpt_path": str(checkpoint),
            "split": "test",
            "data": {
                "image_dir": None,
                "mask_dir": None,
                "mask_suffixes": None,
                "recursive": None,
                "strict": True,
                "mask_mode": None,
                "palette": None,
                "ignore_index": None,
                "resize_masks": None,
            },
            "postprocess": {"min_size": None, "threshold": None, "min_confidence": None},
            "tta": None,
            "tta_flips": [],
            "batch_size": 8,
            "device": "auto",
            "retain_freed_memory": True,
            "progress_bar": False,
            "trusted_modules": ["lungseg", "torch.nn", "torch.optim"],
            "output_dir": str(output_dir),
            "overwrite": True,
        }
    )


def scores(summary: dict[str, Any], prefix: str) -> dict[str, float | None]:
    """A ``summary`` (evaluate's) as flat metrics: ``<prefix>/dice``, ``/dice_nonempty`` and
    ``/fp_empty``, the means over the foreground classes (over those that have a value), and
    the same per class (``<prefix>/dice_<class>`` ...)."""
    out: dict[str, float | None] = {}
    per_class = {
        name: {
            "dice": entry["dice"]["mean"],
            "dice_nonempty": entry["dice_nonempty"]["mean"],
            "fp_empty": entry["fp_rate_empty"],
        }
        for name, entry in summary["classes"].items()
    }
    for metric in ("dice", "dice_nonempty", "fp_empty"):
        values = [v[metric] for v in per_class.values() if v[metric] is not None]
        out[f"{prefix}/{metric}"] = float(np.mean(values)) if values else None
    for name, values in per_class.items():
        out.update({f"{prefix}/{metric}_{name}": value for metric, value in values.items()})
    return out


def _output_paths(cfg: DictConfig) -> tuple[Path, Path]:
    """The paths of ``OUTPUT_FILES`` in ``cfg.output_dir``. LungsegError, before anything is
    read or scored, when output_dir is a file, cannot be written, or already holds one of them
    (the results of an earlier evaluation), unless ``cfg.overwrite``."""
    check_overwrite(cfg.overwrite)
    out_dir = Path(cfg.output_dir)
    check_output_folder(out_dir)
    paths = tuple(out_dir / name for name in OUTPUT_FILES)
    existing = [p.name for p in taken([*paths, out_dir / UNSCORED_FILE])]
    if existing and not cfg.overwrite:
        one = len(existing) == 1
        raise LungsegError(
            f"{out_dir} already holds {' and '.join(existing)} of an earlier evaluation. "
            f"Nothing was scored or written. Give another folder with output_dir=<folder>, or "
            f"set overwrite=true to replace {'it' if one else 'them'}."
        )
    check_writable(out_dir, _WRITE_FIX)
    return paths


def evaluate_grid(cfg: DictConfig, grid: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The summaries (``summarize``) of ``cfg.ckpt_path`` on the images of ``cfg`` (as
    ``evaluate`` picks them) under each post-processing of ``grid`` (``postprocess.settings``
    dicts), from one prediction per image; nothing is written. benchmarks/crossval.py chooses
    the post-processing with it."""
    model = load_from_config(cfg)
    scored = _score(cfg, model, grid)[0]
    class_names = list(model.hparams.data_info["class_names"])
    return [summarize(rows, class_names) for rows in scored]


def _score(
    cfg: DictConfig, model: Any, grid: list[dict[str, Any]]
) -> tuple[list[list[dict[str, Any]]], str, str, list[str], list[tuple[Path, str]]]:
    """Per-image metric rows of the evaluation images, one list per post-processing of
    ``grid``; also the images' source, the mask mode, the test-time flips and the files
    data.strict=false left out, each with its reason."""
    info = model.hparams.data_info
    class_names, num_classes = list(info["class_names"]), int(info["num_classes"])
    pairs, source = eval_pairs(cfg)
    mask_mode = cfg.data.mask_mode or info["mask_mode"]
    palette = _palette(cfg.data.palette) or info["palette"]
    # as the checkpoint's run read its masks (a checkpoint from before it: none), unless given
    given = cfg.data.get("ignore_index")
    ignore = ignore_value(info.get("ignore_index") if given is None else given, mask_mode)
    resize = cfg.data.get("resize_masks")  # null: as the checkpoint's run read its masks
    resize = bool(info.get("resize_masks", False)) if resize is None else resize
    require(
        isinstance(resize, bool),
        "data.resize_masks",
        resize,
        "true (masks with their image's shape at another scale are resized to it), false, or "
        "null (as the checkpoint's run read them)",
        "data.resize_masks=true",
    )
    flips = postprocess.flips(cfg.tta, cfg.tta_flips, model.hparams.get("postprocess"))
    postprocess.warn_sided_flips(flips, class_names)
    label = " + ".join(config_checkpoints(cfg))
    log.info("scoring %s on %s: %s", label, counted(len(pairs), "pair"), source)
    if flips:
        log.info("test-time flips: %s (tta=false for none)", ", ".join(flips))
    _check_layers(pairs, mask_mode, class_names, label)
    # 2.5-D models take neighbouring slices from the images' folders, other splits included
    folders = dict.fromkeys(p.image.parent for p in pairs) if info.get("context_slices") else {}
    with one_unread_warning(None):  # listed (and warned about) by find_pairs already
        pool = [image for f in folders for image in _list_images(f, "image", "data.image_dir")]
    table = neighbour_table([p.image for p in pairs], info, pool)

    strict = cfg.data.get("strict", True)
    scored: list[list[dict[str, Any]]] = [[] for _ in grid]
    failed: list[tuple[Path, str]] = []  # strict=false: pairs that cannot be scored
    turned: dict[Pair, tuple[int, int, Path]] = {}  # pairs whose EXIF orientations differ
    checks = InputCheck(info)
    with tqdm(total=len(pairs), unit="image", disable=not cfg.progress_bar) as bar:
        for batch in batches(pairs, cfg.batch_size):
            try:
                kept, images, unread = read_usable([p.image for p in batch], table, strict)
            except LungsegError as error:
                raise LungsegError(f"{error} {_SKIP_HINT}") from error
            failed += unread
            for i, image in zip(kept, images, strict=True):
                checks.see(batch[i].image, image)
            probs = predict_probabilities(model, images, flips) if images else []
            for pair, prob in zip([batch[i] for i in kept], probs, strict=True):
                try:
                    target = _read_mask(
                        pair,
                        prob.shape[1:],
                        mask_mode,
                        palette,
                        num_classes,
                        turned,
                        ignore,
                        resize,
                    )
                except LungsegError as error:
                    if strict:
                        raise LungsegError(f"{error} {_SKIP_HINT}") from error
                    failed.append((pair.mask, str(error)))
                    continue
                height, width = target.shape
                for post, rows in zip(grid, scored, strict=True):
                    pred = postprocess.classes(prob, post, info)
                    row: dict[str, Any] = {"image": pair.stem, "height": height, "width": width}
                    kept = None if ignore is None else IGNORE
                    for c, values in image_metrics(pred, target, num_classes, kept).items():
                        row.update({f"{k}_{class_names[c]}": v for k, v in values.items()})
                    rows.append(row)
            bar.update(len(batch))
    report_skipped(
        failed,
        ("image/mask pair that cannot be scored is", "image/mask pairs that cannot be scored are"),
    )
    check_orientations(turned)
    checks.report()
    if not scored[0] and failed:
        raise LungsegError(
            f"None of the {len(pairs)} image/mask pairs could be scored ({source}); the first: "
            f"{failed[0][1]}"
        )
    return scored, source, mask_mode, flips, failed


_SKIP_HINT = "Or set data.strict=false to score the other pairs, with a warning naming these."


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.4f}"


def eval_pairs(cfg: DictConfig) -> tuple[list[Pair], str]:
    """The image/mask pairs to score and a description of where they come from.

    Without ``data.image_dir`` + ``data.mask_dir``: the test (or, with ``split=val``, the
    validation) split of the checkpoint's training run (``<run>/config.yaml`` and
    ``<run>/split.csv``, run = two folders up; relative data paths are the run's, from the
    folder train.py ran in). With them: every pair of those folders, refused where a member's
    run trained or validated on one of them (``split=all`` scores them all the same); with
    ``split=test`` or ``val``, the pairs there that the run's split.csv puts in that split
    (the run's split, its data found at another place)."""
    data = cfg.data
    which = cfg.get("split")
    folders_given = data.image_dir is not None or data.mask_dir is not None
    allowed = ("test", "val", "all") if folders_given else ("test", "val")
    if which is not None and which not in allowed:
        raise LungsegError(
            f"split is {which!r}; give split=test or split=val (the run's splits)"
            + (", or split=all (every pair of the data folders)." if folders_given else ".")
        )
    if folders_given:
        if data.image_dir is None or data.mask_dir is None:
            raise LungsegError(
                "Only one of data.image_dir and data.mask_dir is set. Give both to score the "
                "image/mask pairs of those folders, or neither to score the test split of the "
                "checkpoint's training run."
            )
        suffixes = DEFAULT_MASK_SUFFIXES if data.mask_suffixes is None else data.mask_suffixes
        recursive = _recursive(data.get("recursive"))
        pairs = find_pairs(
            data.image_dir, data.mask_dir, suffix_list(suffixes), data.strict, recursive=recursive
        )
        where = f"{data.image_dir} and {data.mask_dir}"
        if which == "all":
            return pairs, f"all pairs of {where}"
        checkpoint, *others = config_checkpoints(cfg)
        if which is None:
            for member in (checkpoint, *others):
                _check_folders_unseen(member, pairs, str(data.image_dir))
            return pairs, f"all pairs of {where}"
        split_file = _run_folder(checkpoint) / "split.csv"
        if not split_file.is_file():
            raise LungsegError(
                f"split={which} with data folders scores the pairs that the checkpoint's run "
                f"put in its {which} split, but {checkpoint} is not inside a training run "
                f"folder (no {split_file}). Leave split out to score every pair of {where}."
            )
        listed = splits.listed_splits(split_file, [p.stem for p in pairs])
        chosen = [p for p in pairs if listed.get(p.stem) == which]
        if not chosen:
            raise LungsegError(
                f"None of the {len(pairs)} pairs of {where} is in the {which} split of "
                f"{split_file}. Point data.image_dir and data.mask_dir at the run's data, or "
                f"leave split out to score every pair of other data."
            )
        for other in others:
            _check_member_unseen(other, checkpoint, [p.stem for p in chosen], which)
        whole = splits.split_counts(split_file).get(which, 0)
        if len(chosen) < whole:
            # the run's data partly moved or copied: its scores are not the split's
            log.warning(
                "%s holds %d of the %d pairs of the run's %s split (%s): only those are "
                "scored, so the scores are not the whole split's",
                where,
                len(chosen),
                whole,
                which,
                split_file,
            )
            return chosen, (
                f"{len(chosen)} of the {whole} pairs of the {which} split of "
                f"{_run_folder(checkpoint)} ({data.image_dir})"
            )
        return chosen, f"{which} split of {_run_folder(checkpoint)} ({data.image_dir})"

    checkpoint, *others = config_checkpoints(cfg)
    run = _run_folder(checkpoint)
    config_file, split_file = run / "config.yaml", run / "split.csv"
    if not (config_file.is_file() and split_file.is_file()):
        raise LungsegError(
            f"{checkpoint} is not inside a training run folder: {run} (two folders up) has "
            f"no config.yaml and split.csv, which name the data and its test split. Keep the "
            f"checkpoint in <run>/checkpoints/, or score other data with "
            f"data.image_dir=<images> data.mask_dir=<masks>."
        )
    run_data = OmegaConf.load(config_file).data
    if run_data.image_dir is None:  # the run used the demo data; regenerated if deleted
        folders = make_demo_dataset(
            Path(run_data.demo_dir).expanduser(), run_data.demo_num_images, run_data.demo_size
        )
    else:
        started = _run_cwd(run)
        folders = tuple(
            _from_run(value, started) for value in (run_data.image_dir, run_data.mask_dir)
        )
    suffixes = run_data.mask_suffixes if data.mask_suffixes is None else data.mask_suffixes
    given = data.get("recursive")  # null: as the run paired its data
    recursive = bool(run_data.get("recursive", False)) if given is None else _recursive(given)
    try:
        pairs = find_pairs(*folders, suffix_list(suffixes), run_data.strict, recursive=recursive)
    except LungsegError as error:
        raise LungsegError(
            f"{error} (The data of {run}, from its config.yaml; if it has moved, give "
            f"data.image_dir=<images> data.mask_dir=<masks> split={which or 'test'} to score "
            f"the run's {which or 'test'} split there.)"
        ) from error
    if not run_data.strict:
        # data.strict=false left out the pairs the run could not use (corrupt files, sizes
        # that differ); its split.csv lists only those it trained, validated and tested on.
        listed = splits.listed_stems(split_file, [p.stem for p in pairs])
        left_out = [p.stem + p.image.suffix for p in pairs if p.stem not in listed]
        if left_out:
            log.info(
                "%s the run left out (data.strict=false) %s not scored: %s",
                counted(len(left_out), "pair"),
                "is" if len(left_out) == 1 else "are",
                ", ".join(left_out[:5]) + (", ..." if len(left_out) > 5 else ""),
            )
        pairs = [p for p in pairs if p.stem in listed]
    split = splits.make_split([p.stem for p in pairs], split_file=split_file)
    which = which or "test"
    chosen = [p for p in pairs if split[p.stem] == which]
    if not chosen:
        raise LungsegError(
            f"The {which} split in {split_file} is empty (the run used a {which} fraction of "
            f"0). Score other data with data.image_dir=<images> data.mask_dir=<masks>."
        )
    for other in others:  # an ensemble: no member may have trained on what is scored
        _check_member_unseen(other, checkpoint, [p.stem for p in chosen], which)
    return chosen, f"{which} split of {run} ({folders[0]})"


def _run_cwd(run: Path) -> Path | None:
    """The folder train.py ran in (Hydra's ``<run>/.hydra/hydra.yaml``), which the run's
    relative data paths are relative to; None where it is not recorded. Where this command
    runs in the run's folder (``hydra.run.dir=<run>``), Hydra has already replaced that file
    with this command's own: the run's, as it was before, is read (``hydra_files``)."""
    saved = hydra_files.remembered(run, "hydra.yaml")
    try:
        record = (
            OmegaConf.create(saved.decode())
            if saved is not None
            else OmegaConf.load(run / ".hydra" / "hydra.yaml")
        )
        cwd = record.hydra.runtime.cwd
    except Exception:  # no such file, or not Hydra's
        return None
    return Path(cwd) if cwd else None


def _from_run(value: Any, cwd: Path | None) -> Any:
    """A run's data path (or list of paths, or folder pattern) as seen from the folder the run
    started in: a relative one joined to ``cwd``."""
    if isinstance(value, str):
        path = Path(value).expanduser()
        return str(cwd / path) if cwd is not None and not path.is_absolute() else str(path)
    return [_from_run(v, cwd) for v in value]


def _seen_by(
    checkpoint: str, stems: list[str], seen: tuple[str, ...]
) -> tuple[Path, dict[str, str], list[str]] | None:
    """``checkpoint``'s run's split.csv, its ``{stem: split}`` of ``stems`` and those of them
    it put in one of the ``seen`` splits; None outside a run folder (nothing to check)."""
    split_file = _run_folder(checkpoint) / "split.csv"
    if not split_file.is_file():
        return None
    listed = splits.listed_splits(split_file, stems)  # an unlisted image: not trained on
    return split_file, listed, [stem for stem in stems if listed.get(stem) in seen]


def _check_folders_unseen(checkpoint: str, pairs: list[Pair], image_dir: str) -> None:
    """LungsegError where ``checkpoint``'s run put some of the pairs of the data folders being
    scored (all of them) in its train or val split: their scores would count images the model
    learnt from, or chose its checkpoint by. Pairs are matched by name (split.csv), then
    compared with the run's own image files where those are at hand: an image of the same
    name but other content (another site's ``case_001``) is not one the run saw. A checkpoint
    outside a run folder is not checked."""
    found = _seen_by(checkpoint, [p.stem for p in pairs], ("train", "val"))
    if found is None:
        return
    split_file, listed, named = found
    by_stem = {p.stem: p for p in pairs}
    run_images, reason = _run_image_folder(checkpoint)  # once, for both checks
    folder = run_images if named else None
    same = {
        stem: _same_image(folder, by_stem[stem]) if folder else (None, reason) for stem in named
    }
    seen = [stem for stem in named if same[stem][0] is not False]
    if seen:
        tested = sum(split == "test" for split in listed.values())
        compared = sum(same[stem][0] is True for stem in seen)
        unknown = next((same[stem][1] for stem in seen if same[stem][0] is None), "")
        how = (
            "the same images as the run's"
            if compared == len(seen)
            else f"they could not be compared with the run's images ({unknown})"
            if compared == 0
            else f"{compared} of them are the same images as the run's, the others could not "
            f"be compared ({unknown})"
        )
        raise LungsegError(
            f"{len(seen)} of the {len(pairs)} pairs of {image_dir} are named as pairs of the "
            f"train or val split of {checkpoint}'s run (e.g. {seen[0]}: {listed[seen[0]]}, "
            f"{split_file}); {how}. Their scores would count images the model learnt from or "
            f"chose its checkpoint by. Add split=test to score the run's test split in these "
            f"folders ({counted(tested, 'pair')}), or split=all to score every pair all the "
            f"same (other images under the same names, or the training fit)."
        )
    if named:
        log.info(
            "%s of %s have the names of pairs the run of %s trained or validated on, but other "
            "images: scored as new data",
            counted(len(named), "pair"),
            image_dir,
            checkpoint,
        )
    _check_no_renamed_copies(run_images, pairs, image_dir, split_file)


def _check_no_renamed_copies(
    folder: Path | None, pairs: list[Pair], image_dir: str, split_file: Path
) -> None:
    """LungsegError where image files being scored are byte for byte the run's train or val
    images under other names (``new_demo_0000.png``, a renamed copy of ``demo_0000.png``),
    which the check by name cannot see. Compares the files' contents: a run file is read only
    where a scored file has its size, first its last 64 KiB (where images of one size and
    format differ), then whole. An image saved again in another format under another name is
    not found, and blank images (one value: exporters write them byte-identical) are not
    copies; nothing where the run's image ``folder`` is not at hand (None)."""
    if folder is None or not folder.is_dir():
        return
    names = {p.stem for p in pairs}
    seen = [stem for stem in splits.files_in(split_file, ("train", "val")) if stem not in names]
    ours: dict[tuple[int, bytes], Pair] = {}
    tails: set[tuple[int, bytes]] = set()
    for pair in pairs:
        try:
            data = pair.image.read_bytes()
        except OSError:
            continue  # scoring names a file it cannot read
        ours[(len(data), _digest(data))] = pair
        tails.add((len(data), _digest(data[-_TAIL:])))
    sizes = {size for size, _ in ours}
    copies = []
    for stem in seen:  # those of the same name were compared above
        run_file = _image_file(folder, stem)
        if run_file is None or (size := run_file.stat().st_size) not in sizes:
            continue
        try:
            with run_file.open("rb") as f:
                f.seek(max(0, size - _TAIL))
                if (size, _digest(f.read())) not in tails:
                    continue
            pair = ours.get((size, _digest(run_file.read_bytes())))
        except OSError:
            continue
        if pair is not None and not transforms.is_flat(read_image(pair.image)):
            copies.append((pair.stem, stem))
    if copies:
        scored, theirs = copies[0]
        raise LungsegError(
            f"{counted(len(copies), 'image')} of {image_dir} {'is' if len(copies) == 1 else 'are'}"
            f" byte for byte the run's train or val images under other names (e.g. {scored} is "
            f"{theirs} of {folder}, {split_file}). Their scores would count images the model "
            f"learnt from or chose its checkpoint by. Remove the copies from the folders "
            f"scored, or give split=all to score every pair all the same."
        )


_TAIL = 65536  # _check_no_renamed_copies: the bytes of a run file read before the whole


def _digest(data: bytes) -> bytes:
    return hashlib.blake2b(data, digest_size=16).digest()


def _image_file(folder: Path, stem: str, first: str | None = None) -> Path | None:
    """The image file of ``stem`` in ``folder``, any of lungseg's extensions (``first``
    tried first); None where there is none."""
    suffixes = [first, *(s for s in IMAGE_EXTENSIONS if s != first)] if first else IMAGE_EXTENSIONS
    return next((c for s in suffixes if (c := folder / (stem + s)).is_file()), None)


def _run_image_folder(checkpoint: str) -> tuple[Path | None, str]:
    """The image folder of ``checkpoint``'s run (its config.yaml's, relative paths from where
    it started; the demo data's), or None and why it cannot be told."""
    run = _run_folder(checkpoint)
    try:
        run_data = OmegaConf.load(run / "config.yaml").data
        run_dir = run_data.image_dir
        if run_dir is None:  # the demo data (not made again here)
            run_dir = str(Path(run_data.demo_dir).expanduser() / "images")
    except Exception:  # no config.yaml, or not lungseg's
        return None, f"{run / 'config.yaml'} could not be read"
    if not isinstance(run_dir, str) or is_pattern(Path(run_dir)):
        return None, "the run read several folders or a folder pattern"
    return Path(_from_run(run_dir, _run_cwd(run))), ""


def _same_image(folder: Path, pair: Pair) -> tuple[bool | None, str]:
    """Whether ``pair``'s image is the image of its name in a run's image ``folder``: the same
    file, or the same picture in another file (saved again in another format, as grey from
    RGB, at another size or bit depth: ``_same_picture``); None with the reason where that
    cannot be told (no such file there, a file that cannot be read)."""
    candidate = _image_file(folder, pair.stem, pair.image.suffix)
    if candidate is None:
        return None, f"the run's data folder {folder} has no image {pair.stem}"
    if filecmp.cmp(candidate, pair.image, shallow=False):
        return True, ""
    try:
        theirs, ours = read_image(candidate), read_image(pair.image)
    except LungsegError:
        return None, f"{candidate} or {pair.image} cannot be read"
    return _same_picture(theirs, ours), ""


def _same_picture(a: np.ndarray, b: np.ndarray) -> bool:
    """Whether two read_image results show one picture: the same shape up to a resize (aspect
    ratios within 2 %) and, both made grey (luminance) and the larger shrunk to the smaller's
    size, a ``_difference`` up to 10 % (of a standard deviation). The larger is shrunk as
    tools shrink images, by area, bilinear and nearest-neighbour (top-left or centre pixel),
    and the closest counts: a nearest-neighbour copy keeps one pixel of each block, noise and
    thin features included, which an average of the block does not match. Measured, copies
    at half, three quarters or twice the size by six resamplers, as JPEG at quality 75 or as
    16-bit: at most 3.6 % (noisy synthetic slices at 48 px; 5.2 % with more noise; 0.7 % at
    256 px) and 2.8 % (lung CT at 64 px; 0.2 % at 512); other images of the same sets at
    least 17.5 % and 20.6 % (other patients' nodule crops 35 %); an inverted copy about
    160 %. Neighbouring slices of one nodule's 128-px crops, 1-2 mm apart, are about half
    the time one picture (a third before). Was: at most 32 px a side, each stretched from its
    darkest to its brightest pixel, within 3 %, which half-size nearest-neighbour copies of
    64-px images exceeded (4.5 %; lung CT 6.7 %), and other synthetic slices came within
    4.6 %."""
    grey = [
        (p if p.ndim == 2 else cv2.cvtColor(p.astype(np.float32), cv2.COLOR_RGB2GRAY)).astype(
            np.float32
        )
        for p in (a, b)
    ]
    if any(float(g.min()) == float(g.max()) for g in grey):
        return False  # a blank picture shows nothing to recognise (blank end slices share names)
    small, large = sorted(grey, key=lambda g: g.size)
    (hs, ws), (hl, wl) = small.shape, large.shape
    if abs(hs * wl - hl * ws) > 0.02 * max(hs * wl, hl * ws):
        return False
    if large.shape == small.shape:
        return _difference(large, small) <= _SAME
    return any(
        _difference(cv2.resize(large, (ws, hs), interpolation=shrink), small) <= _SAME
        for shrink in _SHRINKS
    )


def _difference(a: np.ndarray, b: np.ndarray) -> float:
    """Mean absolute difference of two grey pictures of one shape, each brought to at most
    32 x 32 pixels, smoothed (Gaussian, 0.7 px) and scaled to zero mean and unit standard
    deviation (so that 8- and 16-bit copies and linear rescales compare; a flat picture is
    all 0): in standard deviations. The small size and the smoothing average resampling and
    JPEG noise out; a picture's own range would hang on its few brightest and darkest pixels,
    which resampling moves."""
    h, w = a.shape
    size = (min(w, _COMPARED), min(h, _COMPARED))  # (width, height), as cv2 takes it
    scaled = []
    for g in (a, b):
        if g.shape[::-1] != size:
            g = cv2.resize(g, size, interpolation=cv2.INTER_AREA)
        g = cv2.GaussianBlur(g, (0, 0), _SMOOTH)
        spread = float(g.std())
        scaled.append((g - g.mean()) / spread if spread > 0 else np.zeros_like(g))
    return float(np.abs(scaled[0] - scaled[1]).mean())


_COMPARED = 32  # _difference's largest side: fine enough to tell images apart, coarse
# enough that resampling and JPEG noise average out
_SMOOTH = 0.7  # _difference's Gaussian sigma, in compared pixels
_SAME = 0.10  # _same_picture's largest difference of one picture, in standard deviations
_SHRINKS = (cv2.INTER_AREA, cv2.INTER_LINEAR, cv2.INTER_NEAREST, cv2.INTER_NEAREST_EXACT)


def _run_folder(checkpoint: str) -> Path:
    """The training run folder of a checkpoint in ``<run>/checkpoints/``."""
    return Path(checkpoint).expanduser().absolute().parent.parent


def _check_member_unseen(checkpoint: str, first: str, stems: list[str], which: str) -> None:
    """LungsegError where an ensemble member's run put one of the scored images (the ``which``
    split of the first member's run) in another split: its score would count images that
    member trained (or chose its checkpoint) on. A member outside a run folder is not
    checked, with a warning."""
    # Scoring test: a member's train or val image leaks (it learnt from it, or chose its
    # checkpoint by it); scoring val: a member's train image (its own val is as the first's).
    seen = ("train", "val") if which == "test" else ("train",)
    found = _seen_by(checkpoint, stems, seen)
    if found is None:
        log.warning(
            "%s is not inside a training run folder (no %s): whether it trained on the %s "
            "split of %s cannot be checked",
            checkpoint,
            _run_folder(checkpoint) / "split.csv",
            which,
            first,
        )
        return
    split_file, split, moved = found
    if moved:
        raise LungsegError(
            f"{checkpoint}'s run put {len(moved)} of the {len(stems)} images of the {which} "
            f"split of {first} in its own {' or '.join(seen)} split (e.g. {moved[0]}: "
            f"{split[moved[0]]}, {split_file}), so the ensemble's score would count images a "
            f"member learnt from. Ensemble runs of the same split (same data.seed, "
            f"data.fold), or score other data with data.image_dir=<images> "
            f"data.mask_dir=<masks>."
        )


def _one_or_list(values: list[str]) -> str | list[str]:
    return values[0] if len(values) == 1 else values


def _recursive(value: Any) -> bool:
    """data.recursive checked: true or false, or null (false; for a run's split, the run's)."""
    require(
        value is None or isinstance(value, bool),
        "data.recursive",
        value,
        "true, false or null (the run's setting for its split, false for other folders)",
        "data.recursive=true",
    )
    return bool(value)


def _palette(palette: Any) -> list[list[int]] | None:
    """data.palette as a colour list: ``{name: [r, g, b]}`` (class order) or ``[[r, g, b]]``."""
    if palette is None:
        return None
    palette = OmegaConf.to_container(palette) if OmegaConf.is_config(palette) else palette
    return list(palette.values()) if isinstance(palette, dict) else list(palette)


def _read_mask(
    pair: Pair,
    size: tuple[int, int],
    mode: str,
    palette: Any,
    num_classes: int,
    turned: dict[Pair, tuple[int, int, Path]],
    ignore: int | tuple[int, int, int] | None = None,
    resize: bool = False,
) -> np.ndarray:
    """(H, W) class ids of pair's mask file(s) (one per folder of a data.mask_dir list), which
    must have its image's size (or with ``resize``, data.resize_masks, its shape at another
    scale: resized to it, nearest neighbour), ``IGNORE`` where they store ``ignore``
    (``ignore_value``'s). A mask whose EXIF orientation differs from its image's is recorded
    in ``turned`` (as training does, for one warning)."""
    raws = []
    # the image's own tag, from its header (its pixels were read for the prediction)
    turn = exif_orientation(np.fromfile(pair.image, dtype=np.uint8))
    for path in pair.masks:
        raw, mask_turn = read_image_oriented(path)
        if turn != mask_turn:
            turned.setdefault(pair, (turn, mask_turn, path))
        if raw.shape[:2] != tuple(size):
            raw = mask_at_image_size(pair.image, size, path, raw, resize)
        raws.append(raw)
    return decode_layers(raws, pair.masks, mode, palette, num_classes, ignore)


def _check_layers(pairs: list[Pair], mode: str, class_names: list[str], ckpt: str) -> None:
    """LungsegError unless a data.mask_dir list read as index masks (folder i = class i)
    gives the model's classes: as many folders as it has foreground classes, and, where the
    folders are named after its classes, in its order."""
    folders = layer_folders(pairs[0]) if pairs else []
    if len(folders) < 2 or mode != "index":
        return
    names = layer_names(folders) or [folder.name for folder in folders]
    if len(folders) + 1 != len(class_names) or (
        set(names) == set(class_names[1:]) and names != class_names[1:]
    ):
        raise LungsegError(
            f"data.mask_dir lists {len(folders)} folders ({', '.join(names)}), read as "
            f"classes 1-{len(folders)} in that order, but {ckpt} predicts the classes "
            f"{', '.join(class_names[1:])} (1-{len(class_names) - 1}) besides the background. "
            f"List one mask folder per class, in the model's order."
        )
