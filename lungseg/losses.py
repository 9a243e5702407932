"""Segmentation losses. All take logits (N, C, H, W) and a target that is either int64 class ids
(N, H, W) or float class fractions (N, C, H, W) summing to 1 over C (soft masks,
``data.soft_masks``); a one-hot float target gives the same loss as its class ids.

``ignore_index`` (the ignore label, ``masks.IGNORE`` when data.ignore_index is set; the module
passes it): target pixels of this id are left out, so each loss equals the same loss of the
other pixels alone (as if the ignored pixels were cut out of the batch); a batch with nothing
else gives 0. Soft targets have no ignore label."""

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from lungseg.dtypes import keeping_dtype
from lungseg.errors import LungsegError


def soft_counts(
    logits: torch.Tensor,
    target: torch.Tensor,
    per_image: bool = False,
    ignore_index: int | None = None,
) -> tuple[torch.Tensor, ...]:
    """Soft true positives, false positives and false negatives per class, with
    p = softmax(logits): (C,) each, summed over the batch and all pixels, or (N, C) each,
    summed over each image's pixels, with ``per_image``; pixels whose target is
    ``ignore_index`` count in none of them."""
    probs = logits.float().softmax(dim=1)
    target, valid = kept_pixels(target, ignore_index)
    onehot = class_fractions(target, probs.shape[1])
    if valid is not None:
        probs, onehot = probs * valid.unsqueeze(1), onehot * valid.unsqueeze(1)
    dims = (2, 3) if per_image else (0, 2, 3)
    tp = (probs * onehot).sum(dims)
    return tp, probs.sum(dims) - tp, onehot.sum(dims) - tp


def class_fractions(target: torch.Tensor, num_classes: int) -> torch.Tensor:
    """float32 (N, C, H, W): a soft target as it is, class ids (N, H, W) one-hot encoded."""
    if target.is_floating_point():
        return target.float()
    return F.one_hot(target, num_classes).permute(0, 3, 1, 2).float()


def kept_pixels(
    target: torch.Tensor, ignore_index: int | None
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(target with its ignored pixels set to class 0, float32 (N, H, W) 1 where a pixel is
    kept), or (target, None) where nothing is ignored (no ignore_index, or a soft target)."""
    if ignore_index is None or target.is_floating_point():
        return target, None
    valid = target != ignore_index
    return target.masked_fill(~valid, 0), valid.float()


def _weights(class_weights: Sequence[float] | None) -> torch.Tensor | None:
    return None if class_weights is None else torch.tensor(list(class_weights), dtype=torch.float32)


class _WeightedLoss(nn.Module):
    """A loss whose class weights (the buffer ``weight``) keep their float32 values whatever
    the module is cast to (``lungseg.dtypes``): under ``trainer.precision=bf16-true``
    ``F.cross_entropy`` on the float32 logits stopped with "expected scalar type Float but
    found BFloat16", and the other losses rounded the weights."""

    def _apply(self, fn, recurse=True):
        return super()._apply(keeping_dtype(fn), recurse)


class CrossEntropyLoss(_WeightedLoss):
    """Pixel-wise (categorical) cross-entropy, optionally class-weighted:
    mean over pixels of -w[y] log softmax(logits)[y] / mean w[y] (the pixels whose target is
    not ``ignore_index``)."""

    def __init__(
        self,
        class_weights: Sequence[float] | None = None,
        label_smoothing: float = 0.0,
        ignore_index: int | None = None,
    ):
        super().__init__()
        self.register_buffer("weight", _weights(class_weights), persistent=False)
        self.label_smoothing = label_smoothing
        self.ignore_index = ignore_index

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        if not target.is_floating_point() and self.ignore_index is None:
            return F.cross_entropy(
                logits.float(), target, weight=self.weight, label_smoothing=self.label_smoothing
            )
        if not target.is_floating_point():
            # torch's mean (also with label smoothing): the per-pixel losses over the sum of
            # the kept pixels' weights, which is 0 (torch: nan) where every pixel is ignored
            per_pixel = F.cross_entropy(
                logits.float(),
                target,
                weight=self.weight,
                label_smoothing=self.label_smoothing,
                ignore_index=self.ignore_index,
                reduction="none",
            )
            kept, valid = kept_pixels(target, self.ignore_index)
            weight = valid if self.weight is None else self.weight[kept] * valid
            return per_pixel.sum() / weight.sum().clamp_min(torch.finfo(weight.dtype).tiny)
        # Soft target t: sum over pixels of -sum_c w_c t_c log p_c over the sum of w_c t_c, the
        # class-id formula above for a one-hot t (torch's own soft-target cross-entropy
        # divides by the pixel count instead, which differs once classes are weighted).
        num_classes = logits.shape[1]
        t = class_fractions(target, num_classes)
        weight = torch.ones(num_classes, device=t.device) if self.weight is None else self.weight
        weight = weight.view(1, -1, 1, 1)
        total = (t * weight).sum().clamp_min(1e-12)  # before smoothing, as torch does
        if self.label_smoothing:
            t = t * (1 - self.label_smoothing) + self.label_smoothing / num_classes
        return -(t * weight * F.log_softmax(logits.float(), dim=1)).sum() / total


class DiceLoss(_WeightedLoss):
    """Soft Dice loss: 1 - sum_c w_c D_c / sum_c w_c, with
    D_c = (2 sum p_c t_c + smooth) / (sum p_c + sum t_c + smooth), p = softmax(logits).

    By default the sums run over the whole batch and all pixels ("batch Dice"): a class absent
    from one image does not give that image a meaningless 0/0 term, which keeps the loss stable
    with small foreground structures. ``per_image=True`` takes D_c per image and averages over
    the images (nnU-Net's "sample Dice"), the way lesion Dice is scored: every small nodule
    weighs as much as a large one, and on an image without class c any predicted c costs
    close to the whole term (D_c = smooth / (sum p_c + smooth)), which pushes against false
    positives on empty slices. ``skip_empty=True`` (with ``per_image``) leaves those terms out:
    D_c is averaged only over the images that hold class c, so an image without it is scored
    by the cross-entropy alone (a batch with no such image has no Dice term for c). This is for
    labels whose "empty" images are not sure to be empty (a nodule marked by one reader of four,
    left out of a consensus mask). The background class is left out by default because it
    dominates the pixel count and its Dice is near 1 from the start. Pixels whose target is
    ``ignore_index`` are in none of the sums (an image whose class c is all ignored is, for
    ``skip_empty``, an image without c).
    """

    def __init__(
        self,
        include_background: bool = False,
        class_weights: Sequence[float] | None = None,
        smooth: float = 1.0,
        per_image: bool = False,
        skip_empty: bool = False,
        ignore_index: int | None = None,
    ):
        super().__init__()
        if skip_empty and not per_image:
            raise LungsegError(
                "loss.skip_empty=true needs loss.per_image=true (a batch Dice has no per-image "
                "terms to leave out); set both, or drop skip_empty"
            )
        self.include_background = include_background
        self.register_buffer("weight", _weights(class_weights), persistent=False)
        self.smooth = smooth
        self.per_image = per_image
        self.skip_empty = skip_empty
        self.ignore_index = ignore_index

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        tp, fp, fn = soft_counts(logits, target, self.per_image, self.ignore_index)
        dice = (2 * tp + self.smooth) / (2 * tp + fp + fn + self.smooth)
        weight = self.weight
        if weight is None:
            weight = torch.ones(dice.shape[-1], device=dice.device)
        if self.skip_empty:
            # (N, C): 1 where image n holds class c (tp + fn is its target area).
            present = ((tp + fn).detach() > 0.5).float()
            count = present.sum(dim=0)
            dice = (dice * present).sum(dim=0) / count.clamp_min(1)
            weight = weight * (count > 0)
        elif self.per_image:
            dice = dice.mean(dim=0)
        if not self.include_background:
            dice, weight = dice[1:], weight[1:]
        # 0 where no image of the batch holds a scored class (skip_empty), chosen on the device:
        # a Python test of the weights would wait for the GPU at every step
        total = weight.sum()
        loss = 1 - (weight * dice).sum() / total.clamp_min(torch.finfo(total.dtype).tiny)
        return torch.where(total > 0, loss, dice.sum() * 0)


class DiceCELoss(nn.Module):
    """dice_weight * DiceLoss + ce_weight * CrossEntropyLoss: cross-entropy gives well-scaled
    per-pixel gradients early in training, Dice counters the background/foreground imbalance."""

    def __init__(
        self,
        dice_weight: float = 1.0,
        ce_weight: float = 1.0,
        include_background: bool = False,
        class_weights: Sequence[float] | None = None,
        per_image: bool = False,
        skip_empty: bool = False,
        ignore_index: int | None = None,
    ):
        super().__init__()
        self.dice = DiceLoss(
            include_background=include_background,
            class_weights=class_weights,
            per_image=per_image,
            skip_empty=skip_empty,
            ignore_index=ignore_index,
        )
        self.ce = CrossEntropyLoss(class_weights=class_weights, ignore_index=ignore_index)
        self.dice_weight = dice_weight
        self.ce_weight = ce_weight

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return self.dice_weight * self.dice(logits, target) + self.ce_weight * self.ce(
            logits, target
        )


class FocalLoss(_WeightedLoss):
    """Focal loss (Lin et al. 2017): mean over pixels of -a[y] (1 - p_y)^gamma log p_y.

    Down-weights pixels the network already gets right, so the rare hard ones (small
    nodules, boundaries) dominate the gradient; gamma=0 and no weights is cross-entropy.
    With ``ignore_index`` the mean is over the other pixels."""

    def __init__(
        self,
        gamma: float = 2.0,
        class_weights: Sequence[float] | None = None,
        ignore_index: int | None = None,
    ):
        super().__init__()
        self.gamma = gamma
        self.register_buffer("weight", _weights(class_weights), persistent=False)
        self.ignore_index = ignore_index

    def _modulation(self, log_p: torch.Tensor) -> torch.Tensor:
        """(1 - p)^gamma. 1 - p is -expm1(log p), exact where p is close to 1 (1 - exp rounds
        it to 0 once a logit leads by about 17), and kept off 0: for 0 < gamma < 1 the slope
        of x^gamma at 0 is infinite, and times log p = 0 it made the gradient NaN."""
        return (-torch.expm1(log_p)).clamp_min(1e-12) ** self.gamma

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        log_p = F.log_softmax(logits.float(), dim=1)
        if target.is_floating_point():  # soft target: sum_c t_c (w_c) (1 - p_c)^gamma log p_c
            t = target.float() if self.weight is None else target * self.weight.view(1, -1, 1, 1)
            return -(t * self._modulation(log_p) * log_p).sum(dim=1).mean()
        target, valid = kept_pixels(target, self.ignore_index)
        log_p = log_p.gather(1, target.unsqueeze(1)).squeeze(1)
        loss = -self._modulation(log_p) * log_p
        if self.weight is not None:
            loss = loss * self.weight[target]
        if valid is None:
            return loss.mean()
        return (loss * valid).sum() / valid.sum().clamp_min(1)


class TverskyLoss(nn.Module):
    """Tversky loss (Salehi et al. 2017): 1 - mean over classes of
    (TP + smooth) / (TP + alpha FP + beta FN + smooth), soft counts pooled over the batch.

    alpha = beta = 0.5 is the batch Dice loss with twice the smoothing (``DiceLoss(smooth=2 *
    smooth)``); beta > alpha penalises missed foreground more than false alarms, which raises
    recall on small structures. Pixels whose target is ``ignore_index`` count in no sum."""

    def __init__(
        self,
        alpha: float = 0.3,
        beta: float = 0.7,
        include_background: bool = False,
        smooth: float = 1.0,
        ignore_index: int | None = None,
    ):
        super().__init__()
        self.alpha, self.beta = alpha, beta
        self.include_background = include_background
        self.smooth = smooth
        self.ignore_index = ignore_index

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        tp, fp, fn = soft_counts(logits, target, ignore_index=self.ignore_index)
        index = (tp + self.smooth) / (tp + self.alpha * fp + self.beta * fn + self.smooth)
        if not self.include_background:
            index = index[1:]
        return 1 - index.mean()
