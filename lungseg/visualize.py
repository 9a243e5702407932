"""Pictures of segmentations: colour overlays, and a grid of fixed validation images that is
logged to TensorBoard after every validation epoch."""

import numpy as np
import pytorch_lightning as pl
import torch
from pytorch_lightning.loggers import TensorBoardLogger


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
    colors: (num_classes, 3) uint8 RGB. Background (class 0) pixels stay unchanged.
    Returns (H, W, 3) uint8 RGB."""
    rgb = to_display(image).astype(np.float32)
    fg = mask > 0
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
    ones, so epochs can be compared) with ground truth and prediction overlaid in colour."""

    def __init__(self, num_images: int = 4, alpha: float = 0.5):
        self.num_images = num_images
        self.alpha = alpha

    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        loggers = [lg for lg in trainer.loggers if isinstance(lg, TensorBoardLogger)]
        if trainer.sanity_checking or not loggers or not trainer.is_global_zero:
            return
        dataset = trainer.datamodule.val_dataset
        samples = [dataset[i] for i in range(min(self.num_images, len(dataset)))]
        if not samples:
            return
        images = torch.stack([s["image"] for s in samples])
        targets = torch.stack([s["mask"] for s in samples])
        with torch.no_grad():
            preds = pl_module(images.to(pl_module.device)).argmax(dim=1).cpu()
        grid = prediction_grid(
            images.float().numpy(),
            targets.numpy(),
            preds.numpy(),
            trainer.datamodule.colors,
            self.alpha,
        )
        for logger in loggers:
            logger.experiment.add_image(
                "val/predictions", grid, global_step=trainer.current_epoch, dataformats="HWC"
            )
