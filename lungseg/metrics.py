"""Segmentation metrics built on torchmetrics.

Every metric takes predicted class ids (N, H, W) and target class ids (N, H, W).

- ``acc``: pixel accuracy, pooled over all pixels of the set (the Keras tutorial's "accuracy").
- ``dice`` / ``iou``: per class, computed per image and then averaged over images
  ("samplewise"). An image where a class is absent from both target and prediction has no
  defined score for that class and is left out of that class's mean; a prediction on an image
  whose target lacks the class scores 0, so false positives on empty slices are penalised.
  A class never seen in target or prediction over the whole set reports NaN.
- ``dice`` / ``iou`` without a class name: mean over the foreground classes (class 0 is the
  background and is not averaged in).
"""

import math

import torch
from torch import nn
from torchmetrics import MetricCollection
from torchmetrics.classification import MulticlassAccuracy
from torchmetrics.segmentation import DiceScore, MeanIoU


class SegmentationMetrics(nn.Module):
    """Accumulates pixel accuracy and per-class Dice/IoU over a split; ``compute`` returns a
    flat dict of floats named ``acc``, ``dice``, ``iou``, ``dice_<class>``, ``iou_<class>``."""

    def __init__(self, class_names: list[str]):
        super().__init__()
        self.class_names = list(class_names)
        num_classes = len(class_names)
        # Every torchmetrics default that changed between releases is spelled out.
        self.collection = MetricCollection(
            {
                "acc": MulticlassAccuracy(
                    num_classes, average="micro", multidim_average="global", validate_args=False
                ),
                "dice": DiceScore(
                    num_classes,
                    include_background=True,
                    average="none",
                    aggregation_level="samplewise",
                    input_format="index",
                ),
                "iou": MeanIoU(
                    num_classes, include_background=True, per_class=True, input_format="index"
                ),
            },
            compute_groups=False,
        )

    def update(self, preds: torch.Tensor, target: torch.Tensor) -> None:
        self.collection.update(preds, target)

    def reset(self) -> None:
        self.collection.reset()

    def compute(self) -> dict[str, float]:
        values = self.collection.compute()
        out = {"acc": float(values["acc"])}
        for name in ("dice", "iou"):
            per_class = [float(v) for v in values[name]]
            # MeanIoU reports -1 for a class that never occurred; make that NaN like DiceScore.
            per_class = [math.nan if v < 0 else v for v in per_class]
            for class_name, v in zip(self.class_names, per_class, strict=True):
                out[f"{name}_{class_name}"] = v
            foreground = [v for v in per_class[1:] if not math.isnan(v)]
            out[name] = sum(foreground) / len(foreground) if foreground else math.nan
        return out
