"""Batch augmentation on the training device (augmentation=device)."""

import math

import cv2
import numpy as np
import pytest
import pytorch_lightning as pl
import torch
from omegaconf import OmegaConf

from lungseg.data import transforms
from lungseg.data.device_augment import BatchAugment, hard_mask, normalize
from lungseg.errors import LungsegError
from lungseg.train import train

INFO = {"normalize": "dataset", "mean": [0.4], "std": [0.2]}
AFFINE = {"p": 1.0, "scale": [0.8, 1.2], "translate": 0.1, "rotate": 30}


def disc_batch(n=4, size=32, soft=False):
    """Images equal to their masks: a disc (class 1) off the centre."""
    masks = np.zeros((n, size, size), np.uint8)
    for i in range(n):
        cv2.circle(masks[i], (size // 3 + i, size // 2), size // 5, 1, -1)
    batch = {
        "image": torch.from_numpy(masks[:, None].astype(np.float32)),
        "mask": torch.from_numpy(masks).long(),
    }
    if soft:
        batch["target"] = torch.stack([1 - batch["image"][:, 0], batch["image"][:, 0]], dim=1)
    return batch


def test_nothing_drawn_only_normalises():
    batch = disc_batch()
    out = BatchAugment({"hflip": 0.0, "affine": {"p": 0.0}}, INFO)(dict(batch))
    assert torch.equal(out["mask"], batch["mask"])
    assert torch.allclose(out["image"], (batch["image"] - 0.4) / 0.2)


@pytest.mark.parametrize(("flip", "dim"), [("hflip", -1), ("vflip", -2)])
def test_flips_are_exact(flip, dim):
    rng = np.random.default_rng(0)
    image = torch.from_numpy(rng.random((2, 1, 6, 10), dtype=np.float32))
    mask = torch.from_numpy(rng.integers(0, 3, (2, 6, 10)))
    out = BatchAugment({flip: 1.0}, {"normalize": "none"})({"image": image, "mask": mask})
    assert torch.equal(out["mask"], mask.flip(dim))
    assert torch.allclose(out["image"], image.flip(dim), atol=1e-6)


def test_affine_moves_a_point_where_the_forward_map_says():
    """A non-square image: scale 1.5, rotation 30 degrees, shift (0.1 w, 0.1 h) about the
    centre, in pixel coordinates with y pointing down."""
    h, w, (x0, y0) = 40, 64, (38, 16)
    image = torch.zeros(1, 1, h, w)
    image[0, 0, y0 - 1 : y0 + 2, x0 - 1 : x0 + 2] = 1
    affine = {"p": 1, "scale": [1.5, 1.5], "rotate": [30, 30], "translate": [0.1, 0.1]}
    settings = {"affine": affine}
    out = BatchAugment(settings, {"normalize": "none"})(
        {"image": image, "mask": torch.zeros(1, h, w, dtype=torch.long)}
    )["image"][0, 0]
    ys, xs = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    found = ((out * xs).sum() / out.sum(), (out * ys).sum() / out.sum())
    a = math.radians(30)
    u, v = x0 - (w - 1) / 2, y0 - (h - 1) / 2  # from the centre
    expected = (
        1.5 * (math.cos(a) * u - math.sin(a) * v) + (w - 1) / 2 + 0.1 * w,
        1.5 * (math.sin(a) * u + math.cos(a) * v) + (h - 1) / 2 + 0.1 * h,
    )
    assert found == pytest.approx(expected, abs=0.3)


def test_brightness_and_contrast():
    image = torch.linspace(0, 1, 12).view(1, 1, 3, 4)
    settings = {"brightness_contrast": {"p": 1, "brightness": [0.1, 0.1], "contrast": [0.5, 0.5]}}
    out = BatchAugment(settings, {"normalize": "none"})(
        {"image": image, "mask": torch.zeros(1, 3, 4, dtype=torch.long)}
    )
    assert torch.allclose(out["image"], (image * 1.5 + 0.1).clamp(0, 1))


def test_dtypes_are_kept():
    batch = disc_batch(soft=True)
    batch = {**batch, "image": batch["image"].bfloat16(), "target": batch["target"].bfloat16()}
    out = BatchAugment({"hflip": 1.0, "affine": AFFINE}, INFO)(batch)
    assert out["image"].dtype == out["target"].dtype == torch.bfloat16
    assert out["mask"].dtype == torch.long


@pytest.mark.parametrize("soft", [False, True])
def test_image_and_mask_move_together(soft):
    torch.manual_seed(0)
    batch = disc_batch(n=8, soft=soft)
    out = BatchAugment({"hflip": 0.5, "affine": AFFINE}, {"normalize": "none"})(dict(batch))
    moved = out["image"][:, 0] > 0.5
    assert not torch.equal(out["mask"], batch["mask"])  # something moved
    for m, p in zip(out["mask"].bool(), moved, strict=True):
        assert (m & p).sum() / (m | p).sum() > 0.85
    if soft:
        target = out["target"]
        assert torch.allclose(target.sum(dim=1), torch.ones_like(target[:, 0]))
        assert torch.equal(out["mask"], hard_mask(target))


def test_reproducible_from_torch_seed():
    augment = BatchAugment({"hflip": 0.5, "affine": AFFINE, "brightness_contrast": {"p": 1}}, INFO)
    results = []
    for _ in range(2):
        torch.manual_seed(3)
        results.append(augment(disc_batch())["image"])
    assert torch.equal(*results)


def test_normalize_and_hard_mask_match_the_numpy_versions():
    rng = np.random.default_rng(0)
    image = rng.random((2, 3, 5, 6), dtype=np.float32)
    for info in (
        {"normalize": "image"},
        {"normalize": "dataset", "mean": [0.1, 0.2, 0.3], "std": [0.5, 0.6, 0.7]},
    ):
        info = {"mean": None, "std": None, **info}
        ours = normalize(torch.from_numpy(image), info).numpy()
        for i in range(2):
            theirs = transforms.normalize(image[i].transpose(1, 2, 0), info).transpose(2, 0, 1)
            assert np.allclose(ours[i], theirs, atol=1e-5)
    fractions = np.full((4, 4, 2), 0.5, np.float32)  # all ties
    fractions[0, 0] = [0.2, 0.8]
    theirs = transforms.hard_mask(fractions)
    ours = hard_mask(torch.from_numpy(fractions.transpose(2, 0, 1))[None])[0].numpy()
    assert np.array_equal(ours, theirs)


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"flip": 0.5}, r"augmentation\.device has \['flip'\]"),
        ({"hflip": 2}, r"augmentation\.device\.hflip is 2"),
        ({"affine": {"p": 1, "scale": [1.2, 0.8]}}, r"scale is \[1\.2, 0\.8\]"),
        ({"affine": {"p": 1, "scale": 1.1}}, r"scales must be positive"),
        ({"affine": {"p": 1, "rotate": -10}}, r"affine\.rotate is -10; give a number v >= 0"),
        ({"brightness_contrast": {"contrast": "x"}}, r"brightness_contrast\.contrast is 'x'"),
        ({"affine": {"p": 1, "shear": 3}}, r"augmentation\.device\.affine is"),
    ],
)
def test_bad_settings_are_explained(settings, message):
    with pytest.raises(LungsegError, match=message):
        BatchAugment(settings, INFO)


class BatchProbe(pl.Callback):
    """Records the images of the training batches the module receives, and whether the first
    validation batch is the validation set's own items, untouched."""

    images: list[torch.Tensor] = []
    val_untouched: list[bool] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        BatchProbe.images.append(batch["image"].detach().clone())

    def on_validation_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0):
        if batch_idx == 0:
            dataset = trainer.datamodule.val_dataset
            items = torch.stack([dataset[i]["image"] for i in range(len(batch["image"]))])
            BatchProbe.val_untouched.append(torch.equal(batch["image"].cpu(), items))


def test_training_with_device_augmentation(make_cfg):
    cfg = make_cfg(
        "augmentation=device",
        "data.soft_masks=true",
        "test_after_fit=false",
        "+callbacks.probe._target_=test_device_augment.BatchProbe",
    )
    assert OmegaConf.select(cfg, "augmentation.device.affine.p") == 0.5
    BatchProbe.images.clear()
    BatchProbe.val_untouched.clear()
    metrics = train(cfg)
    assert metrics["best_checkpoint"]
    assert len(BatchProbe.images) == 2
    # normalised on the device, once: the cached images are in [0, 1], and normalising twice
    # would shift the mean by about -mean/std (below -1 here)
    assert all(images.min() < 0 for images in BatchProbe.images)
    assert abs(torch.cat(BatchProbe.images).mean()) < 0.75
    assert BatchProbe.val_untouched and all(BatchProbe.val_untouched)
