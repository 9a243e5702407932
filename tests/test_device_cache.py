"""data.device_cache: the training images held on the training device, batches gathered there."""

import logging

import numpy as np
import pytest
import pytorch_lightning as pl
import torch
from test_datamodule import H, W, fake_trainer, make_dm, write_data

from lungseg.errors import LungsegError
from lungseg.train import train

DEVICE = {
    "train": [],
    "eval": [],
    "device": {
        "hflip": 0.5,
        "affine": {"p": 0.5, "scale": [0.9, 1.1], "translate": 0.05, "rotate": 10},
        "brightness_contrast": {"p": 0.5, "brightness": 0.1, "contrast": 0.1},
    },
}


def epoch(dm) -> list[dict]:
    """One training epoch's batches as the network gets them (device_transform on the CPU)."""
    return [dm.device_transform(batch) for batch in dm.train_dataloader()]


@pytest.mark.parametrize(
    ("augmentation", "normalize", "in_channels"),
    [(DEVICE, "dataset", 1), (DEVICE, "image", 3), (None, "dataset", 1), (None, "image", 1)],
)
def test_gathered_batches_are_the_loaders(tmp_path, augmentation, normalize, in_channels):
    """The same batches (order, augmentation, normalisation) as the loader's, two epochs."""
    image_dir, mask_dir, _ = write_data(tmp_path, n=20, rgb=in_channels == 3)
    kwargs = {"normalize": normalize, "in_channels": in_channels, "augmentation": augmentation}
    loaded, cached = (
        make_dm(image_dir, mask_dir, **kwargs),
        make_dm(image_dir, mask_dir, device_cache=True, **kwargs),
    )
    for _ in range(2):
        want, got = epoch(loaded), epoch(cached)
        assert len(want) == len(got) == 3
        for a, b in zip(want, got, strict=True):
            assert a["name"] == b["name"]
            assert b["image"].shape == (4, in_channels, H, W) and b["mask"].dtype == torch.int64
            assert torch.allclose(a["image"], b["image"], atol=1e-5)
            assert torch.equal(a["mask"], b["mask"])
    # the loader hands out indices only
    raw = next(iter(cached.train_dataloader()))
    assert set(raw) == {"index", "name"} and raw["index"].dtype == torch.int64
    # normalised (a batch of [0, 1] intensities would have no negative values)
    assert all(batch["image"].min() < 0 for batch in got)
    # held once per device, and untouched by what is done to a batch
    dataset = cached.train_dataset
    images, masks = dataset.on_device(torch.device("cpu"))
    assert dataset.on_device("cpu")[0] is images
    assert images.shape == (len(dataset), in_channels, H, W) and masks.dtype == torch.uint8
    before = images.clone()
    got[0]["image"].add_(1)
    assert torch.equal(images, before)
    assert np.array_equal(images[0].permute(1, 2, 0).numpy(), dataset.images[0])
    # validation and test batches still come from the loader, whole
    val = next(iter(cached.val_dataloader()))
    assert val["image"].shape[1:] == (in_channels, H, W)


def test_gathered_batches_take_the_precisions_input_dtype(tmp_path):
    """Lightning casts a batch's floating tensors to the precision's input dtype (bf16-true:
    bfloat16) before the transfer, when a gathered batch has no images yet: the gather does."""
    from pytorch_lightning.plugins.precision import HalfPrecision

    image_dir, mask_dir, _ = write_data(tmp_path, n=20)
    batches = []
    for cache in (False, True):
        dm = make_dm(image_dir, mask_dir, augmentation=DEVICE, device_cache=cache)
        dm.trainer = fake_trainer(1, 0)
        dm.trainer.precision_plugin = HalfPrecision("bf16-true")
        batch = dm.trainer.precision_plugin.convert_input(next(iter(dm.train_dataloader())))
        batches.append(dm.device_transform(batch))
    loaded, gathered = batches
    assert loaded["image"].dtype == gathered["image"].dtype == torch.bfloat16
    assert torch.equal(loaded["image"], gathered["image"])
    assert torch.equal(loaded["mask"], gathered["mask"])


def test_the_copy_to_a_device_goes_in_chunks():
    """What on_device does for a GPU, on CPU tensors: 3 channels, chunks that do not divide."""
    from lungseg.data.datamodule import fill_in_chunks

    rng = np.random.default_rng(0)
    images = [rng.random((5, 6, 3), dtype=np.float32) for _ in range(17)]
    masks = [rng.integers(0, 3, (5, 6), dtype=np.uint8) for _ in range(17)]
    held = (torch.zeros(17, 3, 5, 6), torch.zeros(17, 5, 6, dtype=torch.uint8))
    fill_in_chunks(held, images, masks, chunk=7)
    assert torch.equal(held[0], torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2))
    assert torch.equal(held[1], torch.from_numpy(np.stack(masks)))


def test_settings_it_cannot_serve_are_explained(tmp_path, caplog):
    image_dir, mask_dir, _ = write_data(tmp_path)
    flip = {"train": [{"_target_": "albumentations.HorizontalFlip", "p": 0.5}]}
    with pytest.raises(LungsegError, match="augmentation=device"):
        make_dm(image_dir, mask_dir, device_cache=True, augmentation=flip)
    with pytest.raises(LungsegError, match="soft_masks"):
        make_dm(image_dir, mask_dir, device_cache=True, augmentation=DEVICE, soft_masks=True)
    with pytest.raises(LungsegError, match="device_cache is 'yes'"):
        make_dm(image_dir, mask_dir, device_cache="yes")
    with caplog.at_level(logging.WARNING):
        make_dm(image_dir, mask_dir, device_cache=True, augmentation=DEVICE, num_workers=2)
    assert "data.num_workers=0" in caplog.text


def test_null_holds_the_images_on_a_gpu_where_it_applies_and_they_fit(
    tmp_path, monkeypatch, caplog
):
    """data.device_cache=null (the default): decided when the training loader is built."""
    image_dir, mask_dir, _ = write_data(tmp_path, n=20)
    dm = make_dm(image_dir, mask_dir, augmentation=DEVICE)
    size = sum(a.nbytes for a in dm.train_dataset.images) + sum(
        m.nbytes for m in dm.train_dataset.masks
    )
    memory = {"free": 4 * size, "total": 10**12}
    monkeypatch.setattr(
        torch.cuda, "mem_get_info", lambda device: (memory["free"], memory["total"])
    )
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)

    def held(trainer, **data) -> bool:
        dm = make_dm(image_dir, mask_dir, **{"augmentation": DEVICE, **data})
        dm.trainer = trainer
        dm.train_dataloader()
        return dm.train_dataset.indices_only

    gpu = fake_trainer(1, 0, "cuda")
    with caplog.at_level(logging.INFO):
        assert held(gpu)
    assert "are held on cuda" in caplog.text
    assert not held(fake_trainer(1, 0, "cpu"))  # the CPU gains nothing from a second copy
    assert not held(None)  # a loop of one's own: the device is not known
    assert not held(gpu, augmentation={"train": [{"_target_": "albumentations.HorizontalFlip"}]})
    assert not held(gpu, soft_masks=True)
    assert not held(gpu, device_cache=False)
    assert held(fake_trainer(1, 0, "cpu"), device_cache=True)
    memory["free"] = 4 * size - 1  # more than a quarter of the free memory
    with caplog.at_level(logging.INFO):
        assert not held(gpu)
    assert "are not held" in caplog.text
    memory["free"], memory["total"] = 4 * size, 10 * size
    assert held(gpu)
    memory["total"] = 10 * size - 1  # more than a tenth of all the memory
    assert not held(gpu)


class GatheredProbe(pl.Callback):
    """Records the training batches' keys as the module gets them, and whether the loader
    handed out indices only."""

    seen: list[tuple[set, bool]] = []

    datamodules: list = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        GatheredProbe.seen.append((set(batch), trainer.datamodule.train_dataset.indices_only))
        GatheredProbe.datamodules.append(trainer.datamodule)


def test_training_from_the_device_cache(make_cfg):
    cfg = make_cfg(
        "augmentation=device",
        "data.device_cache=true",
        "+callbacks.probe._target_=test_device_cache.GatheredProbe",
    )
    GatheredProbe.seen.clear()
    GatheredProbe.datamodules.clear()
    metrics = train(cfg)
    # the copy is dropped when training ends
    assert GatheredProbe.datamodules[-1].train_dataset._stacked == {}
    assert metrics["best_checkpoint"] and np.isfinite(metrics["test/dice"])
    assert GatheredProbe.seen
    assert all(
        keys == {"image", "mask", "name"} and indices for keys, indices in GatheredProbe.seen
    )


class Decision:
    """What hold_on_device reads of Lightning's strategy: whether any process failed."""

    def __init__(self, elsewhere: bool):
        self.elsewhere = elsewhere

    def reduce_boolean_decision(self, decision: bool, all: bool = True) -> bool:  # noqa: A002
        assert all is False  # "any process": one without room stops them all
        return decision or self.elsewhere


def test_every_process_stops_together_when_one_device_has_no_room(tmp_path, monkeypatch):
    """The cache goes to the device as training starts, on every process at once: the one
    whose device has no room and the others stop with an error together (one stopping alone
    at its first batch left its peers waiting). Without the cache nothing is copied."""
    image_dir, mask_dir, _ = write_data(tmp_path, n=8)
    dm = make_dm(image_dir, mask_dir, split=[1.0, 0.0, 0.0], device_cache=True)
    dm.train_dataloader()  # the loader says whether batches are gathered from the cache
    dm.hold_on_device(torch.device("cpu"), Decision(elsewhere=False))
    assert torch.device("cpu") in dm.train_dataset._stacked
    dm.train_dataset.release()
    with pytest.raises(LungsegError, match="do not fit in another process's device memory"):
        dm.hold_on_device(torch.device("cpu"), Decision(elsewhere=True))

    def no_room(device):
        raise LungsegError("data.device_cache: the 8 training images and masks do not fit")

    monkeypatch.setattr(dm.train_dataset, "on_device", no_room)
    with pytest.raises(LungsegError, match="the 8 training images and masks do not fit"):
        dm.hold_on_device(torch.device("cpu"), Decision(elsewhere=False))
    off = make_dm(image_dir, mask_dir, split=[1.0, 0.0, 0.0], device_cache=False)
    off.train_dataloader()
    off.hold_on_device(torch.device("cpu"), Decision(elsewhere=True))  # nothing to hold
    assert off.train_dataset._stacked == {}
