import math

import numpy as np
import pytest
import torch

from lungseg.metrics import SegmentationMetrics


def numpy_dice(pred: np.ndarray, target: np.ndarray, c: int) -> float:
    p, t = pred == c, target == c
    if not p.any() and not t.any():
        return math.nan
    return 2 * (p & t).sum() / (p.sum() + t.sum())


def test_metrics_match_numpy_per_image_mean():
    rng = np.random.default_rng(0)
    target = rng.integers(0, 3, size=(4, 16, 16))
    pred = np.where(rng.random((4, 16, 16)) < 0.8, target, rng.integers(0, 3, size=(4, 16, 16)))
    target[3][target[3] == 2] = 0  # class 2 absent from image 3's target...
    pred[3][pred[3] == 2] = 0  # ...and from its prediction: image 3 must not count for class 2
    metrics = SegmentationMetrics(["background", "lung", "tumour"])
    metrics.update(torch.from_numpy(pred[:2]), torch.from_numpy(target[:2]))
    metrics.update(torch.from_numpy(pred[2:]), torch.from_numpy(target[2:]))
    out = metrics.compute()
    for c, name in enumerate(["background", "lung", "tumour"]):
        per_image = [numpy_dice(p, t, c) for p, t in zip(pred, target, strict=True)]
        expected = np.nanmean(per_image)
        assert out[f"dice_{name}"] == pytest.approx(expected, abs=1e-5)
        iou = [d / (2 - d) for d in per_image if not math.isnan(d)]
        assert out[f"iou_{name}"] == pytest.approx(np.mean(iou), abs=1e-5)
    assert out["dice"] == pytest.approx((out["dice_lung"] + out["dice_tumour"]) / 2)
    assert out["acc"] == pytest.approx((pred == target).mean())


def test_false_positive_on_empty_image_scores_zero_and_absent_class_is_nan():
    target = torch.zeros(1, 8, 8, dtype=torch.long)
    pred = target.clone()
    pred[0, 0, 0] = 1
    metrics = SegmentationMetrics(["background", "lung", "tumour"])
    metrics.update(pred, target)
    out = metrics.compute()
    assert out["dice_lung"] == 0.0
    assert math.isnan(out["dice_tumour"]) and math.isnan(out["iou_tumour"])
    assert out["dice"] == 0.0  # mean over the foreground classes that occurred


def test_reset_starts_a_new_epoch():
    metrics = SegmentationMetrics(["background", "lung"])
    t = torch.ones(1, 4, 4, dtype=torch.long)
    metrics.update(torch.zeros_like(t), t)
    metrics.reset()
    metrics.update(t, t)
    assert metrics.compute()["dice_lung"] == 1.0
