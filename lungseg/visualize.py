"""Pictures of segmentations: colour overlays, a grid of fixed validation images that is
logged to TensorBoard in every validation epoch, and a run's training curves."""

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch
from matplotlib.figure import Figure
from pytorch_lightning.loggers import TensorBoardLogger
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from lungseg.metrics import predicted_classes

log = logging.getLogger(__name__)


def to_display(image: np.ndarray) -> np.ndarray:
    """(H, W) or (H, W, C) float image of any range → (H, W, 3) uint8, min-max stretched
    (the network sees normalised intensities; a person needs the full grey range)."""
    image = image.astype(np.float32)
    if image.ndim == 3 and image.shape[2] == 1:
        image = image[..., 0]
    lo, hi = float(image.min()), float(image.max())
    image = (image - lo) / (hi - lo) if hi > lo else np.zeros_like(image)
    image = (image * 255).round().astype(np.uint8)
    return np.repeat(image[..., None], 3, axis=2) if image.ndim == 2 else image[..., :3]


def overlay(
    image: np.ndarray, mask: np.ndarray, colors: np.ndarray, alpha: float = 0.5
) -> np.ndarray:
    """Blend class colours into an image. image: (H, W[, C]) any range; mask: (H, W) class ids;
    colors: (num_classes, 3) uint8 RGB. Background (class 0) pixels and ignored ones
    (data.ignore_index: masks.IGNORE, above every class id) stay unchanged.
    Returns (H, W, 3) uint8 RGB."""
    rgb = to_display(image).astype(np.float32)
    fg = (mask > 0) & (mask < len(colors))
    rgb[fg] = (1 - alpha) * rgb[fg] + alpha * np.asarray(colors, np.float32)[mask[fg]]
    return rgb.round().astype(np.uint8)


def prediction_grid(
    images: np.ndarray,
    targets: np.ndarray,
    preds: np.ndarray,
    colors: np.ndarray,
    alpha: float = 0.5,
) -> np.ndarray:
    """One row per image: the image | ground truth overlaid | prediction overlaid.
    images: (N, C, H, W); targets, preds: (N, H, W). Returns (N*H, 3*W, 3) uint8 RGB."""
    rows = []
    for image, target, pred in zip(images, targets, preds, strict=True):
        image = image.transpose(1, 2, 0)
        rows.append(
            np.concatenate(
                [
                    to_display(image),
                    overlay(image, target, colors, alpha),
                    overlay(image, pred, colors, alpha),
                ],
                axis=1,
            )
        )
    return np.concatenate(rows, axis=0)


class PredictionGrid(pl.Callback):
    """Logs ``val/predictions``: the first ``num_images`` validation images (always the same
    ones, so epochs can be compared) with ground truth and prediction overlaid in colour.

    Drawn after the first validation batch, while the weights are those validation scores
    whatever the callbacks' order: weight averaging (``callbacks.ema``) puts the trained
    weights back in its own ``on_validation_epoch_end``, which ran before this callback's."""

    def __init__(self, num_images: int = 4, alpha: float = 0.5):
        self.num_images = num_images
        self.alpha = alpha

    def on_validation_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        loggers = [lg for lg in trainer.loggers if isinstance(lg, TensorBoardLogger)]
        first = batch_idx == 0 and dataloader_idx == 0
        if not first or trainer.sanity_checking or not loggers or not trainer.is_global_zero:
            return
        dataset = trainer.datamodule.val_dataset
        samples = [dataset[i] for i in range(min(self.num_images, len(dataset)))]
        if not samples:
            return
        images = torch.stack([s["image"] for s in samples])
        targets = torch.stack([s["mask"] for s in samples])
        with torch.no_grad():
            preds = predicted_classes(pl_module(images.to(pl_module.device))).cpu()
        info = pl_module.hparams.get("data_info") or {}
        n, per_slice = int(info.get("context_slices", 0)), int(info.get("in_channels", 1))
        shown = images[:, n * per_slice : (n + 1) * per_slice]  # 2.5-D input: the centre slice
        grid = prediction_grid(
            shown.float().numpy(),
            targets.numpy(),
            preds.numpy(),
            trainer.datamodule.colors,
            self.alpha,
        )
        # At the step of the validation scalars (Lightning's count of batches that stepped
        # the optimiser), not at the epoch: the grid lines up with the val curves, and a
        # continued run's purge_step (train.logged_steps) hides the grid of the epoch it
        # trains again, as it does those points.
        loop = trainer.fit_loop.epoch_loop
        step = int(getattr(loop, "_batches_that_stepped", trainer.global_step))
        for logger in loggers:
            logger.experiment.add_image(
                "val/predictions", grid, global_step=step, dataformats="HWC"
            )


# One panel each: title, train tag, val tag, as SegmentationModule logs them per epoch.
CURVES = (
    ("loss", "train/loss_epoch", "val/loss"),
    ("pixel accuracy", "train/acc", "val/acc"),
    ("Dice (mean over foreground classes)", "train/dice", "val/dice"),
)


def read_epoch_scalars(
    log_dir: str | Path, tags: Sequence[str] | None = None
) -> dict[str, list[tuple[int, float]]]:
    """``{tag: [(epoch, value), ...]}`` sorted by epoch, from the TensorBoard event files in
    ``log_dir``, for ``tags`` (default: those of ``CURVES``); tags without values are left out.

    Lightning logs at step = optimiser steps so far and writes an ``epoch`` scalar at the same
    step, which maps steps to epochs. A resumed run repeats epochs: the latest value wins.
    """
    events: dict[str, list] = {}
    for path in sorted(Path(log_dir).glob("events.out.tfevents.*")):
        accumulator = EventAccumulator(str(path), size_guidance={"scalars": 0}).Reload()
        for tag in accumulator.Tags()["scalars"]:
            events.setdefault(tag, []).extend(accumulator.Scalars(tag))
    in_order = {tag: sorted(found, key=lambda e: e.wall_time) for tag, found in events.items()}
    epoch_at = {e.step: int(e.value) for e in in_order.get("epoch", [])}
    history = {}
    for tag in tags or [tag for _, *pair in CURVES for tag in pair]:
        values = {epoch_at[e.step]: e.value for e in in_order.get(tag, []) if e.step in epoch_at}
        if values:
            history[tag] = sorted(values.items())
    return history


def plot_curves(
    history: Mapping[str, Sequence[tuple[int, float]]],
    path: str | Path,
    best_epoch: int | None = None,
) -> None:
    """Save loss, pixel accuracy and Dice per epoch, train and val, side by side as a PNG.

    history: ``{tag: [(epoch, value), ...]}`` with the tags of ``CURVES`` (missing ones are
    skipped); best_epoch: marked with a dotted line (the checkpoint that was tested).
    """
    # Figure without pyplot renders with Agg: no GUI backend, no global state between runs.
    figure = Figure(figsize=(4 * len(CURVES), 3.5), layout="constrained")
    for ax, (title, *tags) in zip(figure.subplots(1, len(CURVES)), CURVES, strict=True):
        for tag, style in zip(tags, ("o-", "s--"), strict=True):
            if history.get(tag):
                epochs, values = zip(*history[tag], strict=True)
                ax.plot(epochs, values, style, markersize=3, label=tag.split("/")[0])
        if best_epoch is not None:
            ax.axvline(best_epoch, color="gray", linestyle=":", label="tested checkpoint")
        ax.set(title=title, xlabel="epoch")
        ax.xaxis.get_major_locator().set_params(integer=True)
        ax.grid(alpha=0.3)
        if ax.has_data():
            ax.legend()
    figure.savefig(path, dpi=100)


def save_curves(trainer: pl.Trainer, path: str | Path, best_epoch: int | None = None) -> bool:
    """Plot the epoch curves of the trainer's TensorBoard logger into ``path`` (PNG). False,
    with nothing written, when there is no TensorBoard logger or it holds no epoch values."""
    log_dirs = [lg.log_dir for lg in trainer.loggers if isinstance(lg, TensorBoardLogger)]
    history = read_epoch_scalars(log_dirs[0]) if log_dirs else {}
    if not history:
        log.info("no epoch metrics in TensorBoard event files: %s not written", path)
        return False
    plot_curves(history, path, best_epoch)
    log.info("training curves written to %s", path)
    return True
