"""Batch augmentation on the training device (augmentation=device)."""

import cv2
import numpy as np
import pytest
import pytorch_lightning as pl
import torch
from conftest import ROOT, TINY
from hydra import compose, initialize_config_dir
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


def test_flips_are_exact():
    batch = disc_batch()
    out = BatchAugment({"hflip": 1.0, "vflip": 1.0}, {"normalize": "none"})(dict(batch))
    assert torch.equal(out["mask"], batch["mask"].flip(-1).flip(-2))
    assert torch.allclose(out["image"], batch["image"].flip(-1).flip(-2), atol=1e-6)


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
        ({"affine": {"p": 1, "shear": 3}}, r"augmentation\.device\.affine is"),
    ],
)
def test_bad_settings_are_explained(settings, message):
    with pytest.raises(LungsegError, match=message):
        BatchAugment(settings, INFO)


class BatchProbe(pl.Callback):
    """Records the images of the batches the training step receives."""

    images: list[torch.Tensor] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        BatchProbe.images.append(batch["image"].detach().clone())


def test_training_with_device_augmentation(tmp_path, demo_dir):
    with initialize_config_dir(str(ROOT / "conf"), version_base="1.3"):
        cfg = compose(
            "config",
            overrides=[
                f"output_dir={tmp_path / 'run'}",
                f"data.demo_dir={demo_dir}",
                *TINY,
                "augmentation=device",
                "data.soft_masks=true",
                "test_after_fit=false",
                "+callbacks.probe._target_=test_device_augment.BatchProbe",
            ],
        )
    assert OmegaConf.select(cfg, "augmentation.device.affine.p") == 0.5
    BatchProbe.images.clear()
    metrics = train(cfg)
    assert metrics["best_checkpoint"]
    assert len(BatchProbe.images) == 2
    # normalised on the device: the cached [0, 1] images have no negative values
    assert all(images.min() < 0 for images in BatchProbe.images)
