import math

import numpy as np
import pytest
import torch

from lungseg.metrics import _STATS, SegmentationMetrics, predicted_classes


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


@pytest.mark.parametrize("num_classes", [2, 3])
def test_metrics_equal_torchmetrics_reference_classes(num_classes):
    """The confusion-matrix metric reproduces torchmetrics' samplewise DiceScore, per-class
    MeanIoU and micro accuracy, including empty images and absent classes."""
    from torchmetrics.classification import MulticlassAccuracy
    from torchmetrics.segmentation import DiceScore, MeanIoU

    generator = torch.Generator().manual_seed(num_classes)
    target = torch.randint(0, num_classes, (6, 12, 12), generator=generator)
    pred = torch.where(
        torch.rand(6, 12, 12, generator=generator) < 0.7,
        target,
        torch.randint(0, num_classes, (6, 12, 12), generator=generator),
    )
    target[0] = 0  # an empty slice with false positives
    target[1], pred[1] = 0, 0  # an empty slice predicted empty: no foreground score
    names = [f"c{i}" for i in range(num_classes)]
    ours = SegmentationMetrics(names)
    dice = DiceScore(
        num_classes, average="none", aggregation_level="samplewise", input_format="index"
    )
    iou = MeanIoU(num_classes, per_class=True, input_format="index")
    acc = MulticlassAccuracy(num_classes, average="micro", multidim_average="global")
    for part in (slice(0, 4), slice(4, 6)):
        ours.update(pred[part], target[part])
        for reference in (dice, iou, acc):
            reference.update(pred[part], target[part])
    out = ours.compute()
    assert out["acc"] == pytest.approx(float(acc.compute()), abs=1e-6)
    for c, name in enumerate(names):
        assert out[f"dice_{name}"] == pytest.approx(float(dice.compute()[c]), abs=1e-5)
        assert out[f"iou_{name}"] == pytest.approx(float(iou.compute()[c]), abs=1e-5)


@pytest.mark.parametrize("classes", [2, 3, 4, 7])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_predicted_classes_equal_argmax_with_ties(classes, dtype):
    logits = torch.randn(3, classes, 9, 7).to(dtype)
    logits[:, -1] = logits[:, 0]  # ties: the first maximum wins, as with argmax
    logits[0, :, :3] = 0.5  # all classes tie
    predicted = predicted_classes(logits)
    assert predicted.dtype == torch.long and predicted.shape == (3, 9, 7)
    assert torch.equal(predicted, logits.float().argmax(dim=1))
    assert (predicted[0, :3] == 0).all()


def test_dice_on_non_empty_slices_and_false_positive_rate_on_empty_ones():
    target = torch.zeros(4, 8, 8, dtype=torch.long)
    pred = torch.zeros_like(target)
    target[0, :4] = 1
    pred[0, :2] = 1  # non-empty slice, Dice 2*16 / (16 + 32) = 2/3
    target[1, :4] = 1
    pred[1, :4] = 1  # non-empty slice, Dice 1
    pred[2, 0, 0] = 1  # empty slice with a false positive
    metrics = SegmentationMetrics(["background", "nodule"])  # slice 3: empty, predicted empty
    metrics.update(pred, target)
    out = metrics.compute()
    assert out["dice_nonempty_nodule"] == pytest.approx((2 / 3 + 1) / 2)
    assert out["fp_empty_nodule"] == pytest.approx(1 / 2)
    assert out["dice_nodule"] == pytest.approx((2 / 3 + 1 + 0) / 3)  # slice 3 has no score
    assert out["dice_nonempty"] == out["dice_nonempty_nodule"]


def test_the_loss_mean_weights_batches_by_images_without_a_nan_check():
    """The epoch's loss: a mean weighted by each batch's images, whose updates never look at
    the value on the host (torchmetrics' NaN check does, waiting for the GPU at every step;
    its nan_strategy="disable" drops the weights instead). A NaN loss makes the mean NaN."""
    from lungseg.module import _LossMean

    mean = _LossMean()
    mean.update(torch.tensor(0.9), weight=2)
    mean.update(torch.tensor(1.2), weight=1)
    assert mean.compute().item() == pytest.approx(1.0)
    mean.update(torch.tensor(float("nan")), weight=1)
    assert torch.isnan(mean.compute())


def test_the_loss_mean_takes_a_number_of_images_without_copying_it_to_the_device(monkeypatch):
    """MeanMetric turns a number weight into a tensor on the metric's device
    (torch.as_tensor(weight, device=cuda)): a copy from host memory that waited for the GPU
    at every training step. _LossMean multiplies the number in on the device instead."""
    from lungseg.module import _LossMean

    mean = _LossMean()

    def copied(*args, **kwargs):
        raise AssertionError("the weight was copied to the device")

    monkeypatch.setattr(torch, "as_tensor", copied)
    mean.update(torch.tensor(0.9), weight=2)
    mean.update(torch.tensor([1.2]), weight=1)
    monkeypatch.undo()
    assert mean.compute().item() == pytest.approx(1.0)
    mean.update(torch.tensor([3.0, 1.0]), weight=torch.tensor([1.0, 3.0]))  # tensors: MeanMetric's
    assert mean.compute().item() == pytest.approx((1.8 + 1.2 + 3.0 + 3.0) / 7)


def test_states_stay_float32_when_the_module_is_cast_to_bf16():
    """trainer.precision=bf16-true calls .to(torch.bfloat16) on the whole LightningModule,
    and torchmetrics casts its states under .to(dtype): the sums and image counts were kept
    in bfloat16, so a count stopped at 2,048 images in batches of 8 and val/dice and val/loss
    (what picks the best checkpoint and stops early) were wrong without an error."""
    from lungseg.module import _LossMean

    metrics = SegmentationMetrics(["background", "nodule"]).to(torch.bfloat16)
    loss = _LossMean().to(torch.bfloat16)
    target = torch.zeros(8, 4, 4, dtype=torch.long)
    target[:, 1:3, 1:3] = 1
    for _epoch in range(2):  # reset() restores the defaults, which must be float32 too
        for _ in range(313):  # 2,504 images
            metrics.update(target, target)
            loss.update(torch.tensor(0.3), weight=8)
        assert metrics.stats.dtype == loss.mean_value.dtype == loss.weight.dtype == torch.float32
        assert metrics.stats[_STATS.index("present")][1].item() == 2504
        assert metrics.compute()["dice_nodule"] == 1.0
        assert loss.compute().item() == pytest.approx(0.3, rel=1e-5)
        metrics.reset()
        loss.reset()


def test_a_bf16_true_fit_keeps_float32_metrics_and_class_weights():
    """The same through Lightning: Trainer(precision="bf16-true") with class weights trains
    (it stopped at the first cross-entropy) and validates into float32 states."""
    import pytorch_lightning as pl
    from torch.utils.data import DataLoader

    from lungseg.module import SegmentationModule

    class Pairs(torch.utils.data.Dataset):
        def __len__(self):
            return 6

        def __getitem__(self, i):
            mask = torch.zeros(16, 16, dtype=torch.long)
            mask[4:8, 4 + i : 8 + i] = 1
            return {"image": mask[None].float() + 0.1 * torch.rand(1, 16, 16), "mask": mask}

    dtypes = []

    class Look(pl.Callback):
        def on_validation_epoch_end(self, trainer, module):
            dtypes.extend([module.val_metrics.stats.dtype, module.val_loss_mean.weight.dtype])
            dtypes.append(module.loss_fn.ce.weight.dtype)

    module = SegmentationModule(
        net={"_target_": "lungseg.models.unet.UNet", "num_classes": 2, "width": 4, "depth": 2},
        loss={"_target_": "lungseg.losses.DiceCELoss", "class_weights": [0.2, 1.0]},
        optimizer={"_target_": "torch.optim.Adam", "lr": 1e-3},
        data_info={"class_names": ["background", "nodule"]},
    )
    trainer = pl.Trainer(
        precision="bf16-true",
        max_epochs=1,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        callbacks=[Look()],
    )
    trainer.fit(module, DataLoader(Pairs(), batch_size=3), DataLoader(Pairs(), batch_size=3))
    assert dtypes == [torch.float32] * 3
    assert math.isfinite(trainer.callback_metrics["val/loss"].item())
