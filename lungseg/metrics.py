"""Segmentation metrics as one torchmetrics ``Metric``.

Every metric takes predicted class ids (N, H, W) and target class ids (N, H, W).

- ``acc``: pixel accuracy, pooled over all pixels of the set (the Keras tutorial's "accuracy").
- ``dice`` / ``iou``: per class, computed per image and then averaged over images
  ("samplewise"). An image where a class is absent from both target and prediction has no
  defined score for that class and is left out of that class's mean; a prediction on an image
  whose target lacks the class scores 0, so false positives on empty slices are penalised.
  A class never seen in target or prediction over the whole set reports NaN.
- ``dice`` / ``iou`` without a class name: mean over the foreground classes (class 0 is the
  background and is not averaged in).
- ``dice_nonempty``: per class, the mean Dice over the images whose target contains the class
  (the usual score for lesions, which most slices lack); ``fp_empty``: per class, the share of
  the images whose target lacks the class in which some pixel is predicted as it (false-
  positive rate on empty slices). Both also as foreground means, NaN where no image qualifies.

The ignore label (``ignore_index``: ``masks.IGNORE`` when data.ignore_index is set): pixels
whose target is it are dropped, as if cut out of the image, from every metric: they are in no
cell of the confusion matrix, so they are neither true nor false positives, negatives, nor
pixels of the accuracy's count, and an image whose class c is all ignored is an image
without c. Mapping them to the background in target and prediction instead would count them
as correct background pixels (raising the accuracy, and scoring no false positive where the
network predicted a class there), and in the target alone as background the network's
predictions there would count as false positives; torchmetrics' ``DiceScore`` has no
``ignore_index``, and its ``MeanIoU``/``MulticlassAccuracy`` drop them the same way.

These are the values of torchmetrics' ``DiceScore(average="none",
aggregation_level="samplewise")``, ``MeanIoU(per_class=True)`` and ``MulticlassAccuracy(
average="micro")`` (tests/test_metrics.py checks them against those and against numpy), but
computed from one per-image confusion matrix (a single ``scatter_add_``): on a 2-core CPU the three
torchmetrics classes cost about 11 ms per 8×128×128 batch, a fifth of a DeepLab training
step, this about 0.5 ms. The states are sums, so torchmetrics reduces them across DDP processes,
and nothing in ``update`` waits for the device.
"""

import math

import torch
from torchmetrics import Metric

from lungseg.dtypes import keeping_dtype

_STATS = ("dice_sum", "iou_sum", "scored", "present_dice", "present", "absent", "absent_fp")


def predicted_classes(logits: torch.Tensor) -> torch.Tensor:
    """Class ids (N, H, W) from logits (N, C, H, W), the first maximum winning as with
    ``argmax(dim=1)``. On a GPU, ``max(dim=1).indices``: one kernel. On the CPU, with three or
    more classes, from ``amax``: torch's index-returning reductions over the class axis are
    slow there (torch 2.13, 8x3x128x128: ``argmax`` 27 ms, ``max(dim=1).indices`` 0.6 ms, this
    0.18 ms; with two classes the same as ``max``)."""
    classes = logits.shape[1]
    if logits.device.type != "cpu" or not 2 < classes <= 256:
        return logits.max(dim=1).indices
    top = logits.amax(dim=1, keepdim=True)
    # each class where it reaches the maximum, weighted so that the first one scores highest
    rank = torch.arange(classes - 1, -1, -1, dtype=torch.uint8).view(1, classes, 1, 1)
    return (classes - 1) - ((logits == top).to(torch.uint8) * rank).amax(dim=1).long()


class Float32States(Metric):
    """A Metric whose float32 states stay float32 whatever the module holding it is cast to
    (``lungseg.dtypes``). torchmetrics keeps its states' dtype under ``.half()``/``.float()``
    but not under ``.to(dtype)``, which ``trainer.precision=bf16-true`` calls on the whole
    LightningModule: the sums and image counts were then kept in bfloat16, and val/dice,
    val/loss and what they steer (the best checkpoint, early stopping) came out wrong without
    an error. The states' device still follows the module."""

    def _apply(self, fn, exclude_state=""):
        return super()._apply(keeping_dtype(fn), exclude_state)


class SegmentationMetrics(Float32States):
    """Accumulates pixel accuracy and per-class Dice/IoU over a split; ``compute`` returns a
    flat dict of floats named ``acc``, ``dice``, ``iou``, ``dice_<class>``, ``iou_<class>``.
    Target pixels of ``ignore_index`` are left out (module docstring)."""

    full_state_update = False
    higher_is_better = True

    def __init__(self, class_names: list[str], ignore_index: int | None = None):
        super().__init__()
        self.class_names = list(class_names)
        self.ignore_index = ignore_index
        c = len(self.class_names)
        # confusion[t, p]: pixels of true class t predicted as p, pooled over the set.
        self.add_state("confusion", torch.zeros(c, c, dtype=torch.long), dist_reduce_fx="sum")
        # Per class, summed over images (rows, see _STATS): each image's Dice and IoU where the
        # class is in its target or prediction, whether it is ("scored"); the Dice of the images
        # whose target has the class and their count; the images whose target lacks it, and
        # those of them where it is predicted. One tensor: one addition an update. float32, not
        # float64 (MPS has none): counts are exact up to 2**24 images.
        self.add_state("stats", torch.zeros(len(_STATS), c), dist_reduce_fx="sum")

    def update(self, preds: torch.Tensor, target: torch.Tensor) -> None:
        # Every tensor operation is a kernel launch the host queues on a GPU: 43 operations a
        # call with torchmetrics' own (59 before the statistics became one tensor; on a 2-core
        # CPU, 32 tiny images, median host time 0.42 -> 0.28 ms).
        c = len(self.class_names)
        n = preds.shape[0]
        image = torch.arange(0, n * c * c, c * c, device=preds.device).view(n, 1)
        # .long(): no operation where they already are (the module's masks and predictions)
        target = target.reshape(n, -1).long()
        ones = target.new_ones(())
        if self.ignore_index is not None:  # ignored pixels: counted nowhere (weight 0)
            kept = target != self.ignore_index
            target, ones = target.masked_fill(~kept, 0), kept.long().flatten()
        index = (image + target * c + preds.reshape(n, -1).long()).flatten()
        # scatter_add_, not bincount: bincount sizes its output from the data's maximum, which
        # on a GPU means waiting for it.
        confusion = torch.zeros(n * c * c, dtype=torch.long, device=preds.device)
        confusion.scatter_add_(0, index, ones.expand_as(index))
        confusion = confusion.view(n, c, c)  # [image, true class, predicted class]
        tp = confusion.diagonal(dim1=1, dim2=2).float()
        true = confusion.sum(dim=2).float()  # tp + fn
        predicted = confusion.sum(dim=1).float()  # tp + fp
        both = true + predicted  # 2 tp + fp + fn: 0 exactly where the class is nowhere
        # tp is 0 where both is: the clamps give those images 0, and "scored" leaves them out
        dice = 2 * tp / both.clamp(min=1)
        iou = tp / (both - tp).clamp(min=1)
        present = (true > 0).float()
        absent = 1 - present
        stats = torch.stack(
            [
                dice,
                iou,
                (both > 0).float(),
                present * dice,
                present,
                absent,
                absent * (predicted > 0).float(),
            ],
            dim=1,
        )  # (n, len(_STATS), c)
        self.stats += stats.sum(dim=0)
        self.confusion += confusion.sum(dim=0)

    def compute(self) -> dict[str, float]:
        confusion = self.confusion.double()
        total = confusion.sum()
        out = {"acc": float(confusion.diagonal().sum() / total) if total > 0 else math.nan}
        stats = dict(zip(_STATS, self.stats.double(), strict=True))
        ratios = {
            "dice": (stats["dice_sum"], stats["scored"]),
            "iou": (stats["iou_sum"], stats["scored"]),
            "dice_nonempty": (stats["present_dice"], stats["present"]),
            "fp_empty": (stats["absent_fp"], stats["absent"]),
        }
        for name, (sums, counts) in ratios.items():
            per_class = torch.where(counts > 0, sums / counts.clamp(min=1), math.nan).tolist()
            # The lesion scores are not given for the background, which every image has.
            first = 0 if name in ("dice", "iou") else 1
            for class_name, v in zip(self.class_names[first:], per_class[first:], strict=True):
                out[f"{name}_{class_name}"] = v
            foreground = [v for v in per_class[1:] if not math.isnan(v)]
            out[name] = sum(foreground) / len(foreground) if foreground else math.nan
        return out
