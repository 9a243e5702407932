"""SegDataModule: paired image/mask folders → split → in-memory cache → augmented batches.

Every pair is read, decoded and resized once in ``setup``; epochs then only augment and
normalise arrays held in memory, so the disk is never touched again and a corrupt or
mislabelled file stops the run before the first epoch, not in the middle of one.
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
import random
import re
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import albumentations as A
import cv2
import numpy as np
import pytorch_lightning as pl
import torch
from pytorch_lightning.overrides.distributed import UnrepeatedDistributedSampler
from torch.utils.data import DataLoader, Dataset, Sampler, default_collate
from torch.utils.data.distributed import DistributedSampler

from lungseg import postprocess
from lungseg.data import context, device_augment, splits, transforms
from lungseg.data.demo import DEMO_CLASSES, DEMO_PALETTE, make_demo_dataset
from lungseg.data.folders import (
    IMAGE_EXTENSIONS,
    ORIENTATIONS,
    Pair,
    _list_images,
    check_data_dirs,
    check_orientations,
    find_pairs,
    layer_names,
    mask_folders,
    palette_indices,
    read_image,
    read_image_oriented,
    suffix_list,
    write_reasons,
)
from lungseg.data.masks import (
    IGNORE,
    MASK_MODES,
    check_layered_mode,
    decode_layers,
    default_colors,
    grey_palette,
    ignore_value,
    mask_at_image_size,
    stored_values,
)
from lungseg.errors import LungsegError, counted

log = logging.getLogger(__name__)


def _flips_left_right(compose: Any, device_settings: Mapping[str, Any] | None) -> bool:
    """Whether an albumentations pipeline (nested ones too) or ``augmentation.device`` can
    flip an image left-right."""

    def flips(transform: Any) -> bool:
        children = getattr(transform, "transforms", None) or []
        return isinstance(transform, A.HorizontalFlip) or any(flips(c) for c in children)

    return flips(compose) or float((device_settings or {}).get("hflip") or 0) > 0


_SIDED_MIN_MASKS = 10  # masks that must hold a class before its side is judged
_SIDED_SHARE = 0.9  # of them with the class's centre on one half
_SIDED_MARGIN = 0.05  # of the width: a centre this close to the midline is on neither half
_SIDED_SAMPLE = 200  # masks looked at, evenly spaced: the answer needs no more


def _sided_classes(masks: list[np.ndarray], num_classes: int) -> dict[str, list]:
    """Foreground classes whose pixels' mean column lies on one half of the image (beyond
    a margin around the midline) in at least _SIDED_SHARE of the masks that hold them, as
    {"left": [(class, share, masks holding it)], "right": [...]}. Masks are (H, W) class ids."""
    if num_classes < 3 or not masks:  # one foreground class cannot be swapped with another
        return {"left": [], "right": []}
    step = max(1, len(masks) // _SIDED_SAMPLE)
    present = np.zeros(num_classes, np.int64)
    on_side = {"left": np.zeros(num_classes, np.int64), "right": np.zeros(num_classes, np.int64)}
    for mask in masks[::step]:
        height, width = mask.shape[:2]
        ids = mask.ravel()
        columns = np.broadcast_to(np.arange(width, dtype=np.float64), (height, width)).ravel()
        counts = np.bincount(ids, minlength=num_classes)[:num_classes]
        sums = np.bincount(ids, weights=columns, minlength=num_classes)[:num_classes]
        held = counts > 0
        held[0] = False  # background
        centre = np.divide(sums, counts, out=np.zeros(num_classes), where=held)
        offset = (centre - (width - 1) / 2) / width
        present += held
        on_side["left"] += held & (offset < -_SIDED_MARGIN)
        on_side["right"] += held & (offset > _SIDED_MARGIN)
    found: dict[str, list] = {"left": [], "right": []}
    for side, on_it in on_side.items():
        for c in np.flatnonzero(present >= _SIDED_MIN_MASKS):
            share = on_it[c] / present[c]
            if share >= _SIDED_SHARE:
                found[side].append((int(c), float(share), int(present[c])))
    return found


_SHOW = 5  # how many offending names a message lists
# Index masks without data.num_classes holding more values than this are taken for images,
# or, where this share of their pixels is their lowest or highest value, for black/white
# masks with soft edges
_MANY_CLASSES = 64
_ENDS_SHARE = 0.9
_PCG_MULTIPLIER = 0x2360ED051FC65DA44385DF649FCCF645  # PCG64's own 128-bit LCG multiplier


_CV2_SEQUENTIAL_PID: int | None = None  # the process that turned OpenCV's threads off


def cv2_sequential() -> None:
    """OpenCV's own thread pool off in this process, once per process (each DataLoader worker
    too, however it was started). The augmentation's OpenCV calls would otherwise split each
    image's work over as many threads as there are cores, beside torch's threads, which keep
    those cores busy or spinning between operations; on a 2-core CPU, training at width 16 and
    128 px with the augmentation in the training process (data.num_workers=0) went from
    0.86-0.87 to 0.90-0.92 of the bare loop on prepared tensors (DeepLab) and from 0.87 to
    0.93-0.95 (FCN-8s) (README, "Speed"). Results are the same: OpenCV splits an image by
    rows. Images are decoded (``setup``) with threads of lungseg's own, one file each."""
    global _CV2_SEQUENTIAL_PID
    pid = os.getpid()
    if pid != _CV2_SEQUENTIAL_PID:
        cv2.setNumThreads(0)
        _CV2_SEQUENTIAL_PID = pid


class CachedSegDataset(Dataset):
    """Images and masks decoded once and held in memory.

    Items: ``{"image": float32 (C, H, W), "mask": uint8 (H, W), "name": stem}``. The cached
    image (float32 (H, W, C) in [0, 1], from ``transforms.preprocess``) and mask ((H, W) uint8)
    are augmented together, then the image goes through ``transforms.normalize`` with
    ``image_info`` (normalize, mean, std), as at prediction time.

    With ``soft`` (one (H, W, K) array of class fractions per mask, ``transforms.soft_mask``),
    the soft mask is augmented in the mask's place (``augment`` should interpolate masks
    linearly: ``transforms.soft_mask_augmentation``) and items also hold ``"target"``: float32
    (K, H, W) fractions (``transforms.soft_target``), the loss's target; ``"mask"`` is then
    their ``transforms.hard_mask``, for the metrics, as ``masks`` (which ForegroundSampler
    reads) are of the cached soft masks.
    """

    def __init__(
        self,
        names: list[str],
        images: list[np.ndarray],
        masks: list[np.ndarray],
        augment: A.Compose,
        image_info: Mapping[str, Any],
        soft: list[np.ndarray] | None = None,
    ):
        assert len(names) == len(images) == len(masks)
        assert soft is None or len(soft) == len(masks)
        self.names, self.images, self.masks, self.soft = names, images, masks, soft
        self.augment, self.image_info = augment, image_info
        # data.device_cache: batches are only their indices, gathered on the training device
        # from a copy of the cache there (``on_device``, SegDataModule.device_transform).
        self.indices_only = False
        self._stacked: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}
        # Persistent DataLoader workers (data.persistent_workers) outlive an epoch, and so do
        # their torch generators: SegDataModule._reseed writes each epoch's seed here, in
        # memory the workers share, and a worker reseeds from it and its id when it changes
        # (``_follow_epoch``), so that a resumed run augments as the uninterrupted one.
        self.epoch_seed: torch.Tensor | None = None
        self._followed: int | None = None
        # One NumPy and one Python generator for the pipeline and all its transforms, reseeded
        # in place for each item (_reseed_augment). They belong to the pipeline: datasets that
        # share it (val and test share the eval pipeline) reseed the same two.
        augment.set_random_state(np.random.Generator(np.random.PCG64()), random.Random())

    def __len__(self) -> int:
        return len(self.names)

    def _reseed_augment(self, seed: int) -> None:
        """Reseed the augmentation's generators in place: a tenth of a millisecond less per
        item than Compose.set_random_seed, which builds two new generators for the pipeline
        and for each of its transforms (a quarter of the data's time at 128 px)."""
        state = (seed * _PCG_MULTIPLIER) % 2**128  # spread the 63 bits over PCG64's 128
        self.augment.random_generator.bit_generator.state = {
            "bit_generator": "PCG64",
            "state": {"state": state, "inc": (state << 1 | 1) % 2**128},
            "has_uint32": 0,
            "uinteger": 0,
        }
        self.augment.py_random.seed(seed)

    def _follow_epoch(self) -> None:
        """In a persistent worker: torch's generator reseeded from (the epoch's seed, worker id)
        at the first item of each epoch."""
        worker = torch.utils.data.get_worker_info()
        seed = int(self.epoch_seed.item())
        if worker is not None and seed != self._followed:
            state = np.random.SeedSequence([seed, worker.id]).generate_state(1, np.uint64)[0]
            torch.manual_seed(int(state) >> 1)
            self._followed = seed

    def __getitem__(self, i: int) -> dict[str, Any]:
        # albumentations' Compose draws from its own generator, seeded from the OS and copied
        # unchanged into every DataLoader worker. Seeding it from torch's generator per item
        # makes augmentation follow the run's seed (and EpochLoader's reseed) and differ
        # between workers, whose torch generators PyTorch seeds one by one.
        cv2_sequential()
        if self.epoch_seed is not None:
            self._follow_epoch()
        self._reseed_augment(int(torch.randint(2**63 - 1, ()).item()))
        # Copies: an in-place transform must not alter the cache for later epochs.
        mask = self.masks[i] if self.soft is None else self.soft[i]
        out = self.augment(image=self.images[i].copy(), mask=mask.copy())
        image = transforms.normalize(out["image"], self.image_info)
        item = {"image": torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1)))}
        if self.soft is None:
            # uint8, an eighth of int64's bytes through the workers' shared memory, the pinning
            # and the copy to the device; SegDataModule.on_after_batch_transfer makes it int64.
            item["mask"] = torch.from_numpy(np.ascontiguousarray(out["mask"], dtype=np.uint8))
        else:
            target = transforms.soft_target(out["mask"])
            item["target"] = torch.from_numpy(np.ascontiguousarray(target.transpose(2, 0, 1)))
            item["mask"] = torch.from_numpy(transforms.hard_mask(target))
        item["name"] = self.names[i]
        return item

    def __getitems__(self, indices: list[int]) -> dict[str, Any] | list[dict[str, Any]]:
        """A whole batch (the DataLoader asks for one by its indices): where the CPU pipeline
        does nothing to an image (no albumentations transforms, e.g. ``augmentation=device``,
        and the evaluation pipelines; hard masks), the batch is the cached arrays stacked and
        normalised, as ``collate`` would stack the items of ``__getitem__``, without the
        per-image work (at 256 px, 32 images,
        a 2-core CPU, the loader alone: 24,000 images/s against 7,000 by items). Otherwise the
        items."""
        if self.indices_only:
            return {
                "index": torch.tensor(indices, dtype=torch.long),
                "name": [self.names[i] for i in indices],
            }
        if not self.batched:
            return [self[i] for i in indices]
        images = np.stack([self.images[i] for i in indices])  # (N, H, W, C), a copy
        images = transforms.normalize(images, self.image_info)
        return {
            # (N, C, H, W); a view for one channel, a copy for several
            "image": torch.from_numpy(images).permute(0, 3, 1, 2).contiguous(),
            "mask": torch.from_numpy(np.stack([self.masks[i] for i in indices])),
            "name": [self.names[i] for i in indices],
        }

    @property
    def batched(self) -> bool:
        """Whether the CPU pipeline does nothing to an image (no albumentations transforms,
        hard masks): batches are then the cached arrays as they are (``__getitems__``), and
        can be gathered on the training device (``on_device``)."""
        return not self.augment.transforms and self.soft is None

    @property
    def nbytes(self) -> int:
        """The cached images' and masks' bytes (``on_device`` holds as many)."""
        return sum(a.nbytes for a in self.images) + sum(m.nbytes for m in self.masks)

    def on_device(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """The whole cache on ``device``, copied there on first use: images (N, C, H, W) float32
        as cached (not normalised) and masks (N, H, W) uint8. ``data.device_cache``.

        On a GPU the copy goes in chunks of 64 images, so the host never holds the set twice;
        on the CPU the cache itself becomes views of one stacked array, which is then used as
        it is."""
        device = torch.device(device)
        if device.type == "cuda" and device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        if device in self._stacked:
            return self._stacked[device]
        n, (h, w, c) = len(self), self.images[0].shape
        size = self.nbytes / 2**20
        if device.type == "cpu":
            stacked = np.stack(self.images)  # (N, H, W, C); the cache: views of it
            self.images = list(stacked)
            masks = np.stack(self.masks)
            self.masks = list(masks)
            held = (torch.from_numpy(stacked).permute(0, 3, 1, 2), torch.from_numpy(masks))
        else:
            try:
                held = (
                    torch.empty((n, c, h, w), dtype=torch.float32, device=device),
                    torch.empty((n, h, w), dtype=torch.uint8, device=device),
                )
            except torch.OutOfMemoryError as error:
                raise LungsegError(
                    f"data.device_cache: the {n} training images and masks ({size:,.0f} MB) do "
                    f"not fit in {device}'s free memory beside the network. Set "
                    f"data.device_cache=false (batches then come from the loader), or a smaller "
                    f"data.image_size."
                ) from error
            fill_in_chunks(held, self.images, self.masks)
        self._stacked[device] = held
        log.info(
            "data.device_cache: %d training images and masks (%.0f MB) held on %s", n, size, device
        )
        return held

    def release(self) -> None:
        """Drop the copies ``on_device`` made on devices (the CPU's is the cache itself)."""
        self._stacked.clear()


def fill_in_chunks(
    held: tuple[torch.Tensor, torch.Tensor],
    images: Sequence[np.ndarray],
    masks: Sequence[np.ndarray],
    chunk: int = 64,
) -> None:
    """Copy (H, W, C) images and (H, W) masks into ``held`` ((N, C, H, W), (N, H, W) tensors
    on any device), ``chunk`` at a time: the host holds one chunk stacked, not the set."""
    for first in range(0, len(images), chunk):
        part = slice(first, first + chunk)
        held[0][part].copy_(torch.from_numpy(np.stack(images[part])).permute(0, 3, 1, 2))
        held[1][part].copy_(torch.from_numpy(np.stack(masks[part])))


def collate(batch: list[dict[str, Any]] | dict[str, Any]) -> dict[str, Any]:
    """The DataLoader's collate_fn: a batch from ``CachedSegDataset.__getitems__`` as it is,
    a list of items as PyTorch's ``default_collate`` stacks them."""
    return batch if isinstance(batch, dict) else default_collate(batch)


class ForegroundSampler(Sampler[int]):
    """Oversamples slices that contain foreground: in every run of ``batch_size`` indices (one
    batch), the first ``ceil(fraction * batch_size)`` come from slices whose mask has a
    foreground pixel and the rest from all slices, each source a fresh random permutation,
    restarted when used up. An epoch has as many samples as the dataset. Random numbers come
    from torch's global generator, which EpochLoader reseeds per epoch (reproducible, resumable).
    The foreground share of a batch is therefore at least ``fraction`` (nnU-Net's
    "oversample_foreground_percent"). For several processes (DDP) see
    ``DistributedForegroundSampler``. ``ignore``: the ignore label (``masks.IGNORE``) when
    data.ignore_index is set, which is not foreground."""

    def __init__(
        self,
        dataset: CachedSegDataset,
        batch_size: int,
        fraction: float,
        ignore: int | None = None,
    ):
        self.size, self.batch_size = len(dataset), batch_size
        self.foreground = [
            i for i, m in enumerate(dataset.masks) if ((m != 0) & (m != ignore)).any()
        ]
        self.per_batch = math.ceil(fraction * batch_size) if self.foreground else 0
        self.replicas, self.rank = 1, 0

    def __len__(self) -> int:
        return math.ceil(self.size / self.replicas)

    def _generator(self) -> torch.Generator | None:
        return None  # torch's global generator

    def __iter__(self):
        sources = {"fg": self.foreground, "all": list(range(self.size))}
        queues: dict[str, list[int]] = {"fg": [], "all": []}
        generator = self._generator()

        def draw(source: str) -> int:
            if not queues[source]:
                order = torch.randperm(len(sources[source]), generator=generator).tolist()
                queues[source] = [sources[source][i] for i in order]
            return queues[source].pop()

        # One stream for all processes, process r taking positions r, r + W, ...: its k-th
        # sample is the k-th of a batch of its own, so the batch share holds in every process.
        for position in range(len(self) * self.replicas):
            in_batch = (position // self.replicas) % self.batch_size
            index = draw("fg" if in_batch < self.per_batch else "all")
            if position % self.replicas == self.rank:
                yield index


class DistributedForegroundSampler(ForegroundSampler, DistributedSampler):
    """``ForegroundSampler`` for process ``rank`` of ``replicas`` (DDP). Every process draws the
    same stream from a generator seeded by (seed, ``stream_epoch``) and keeps every
    ``replicas``-th index of it: within an epoch no slice is drawn twice from the same source
    (foreground slices, all slices) until that source is used up, and each process's batches
    keep the foreground share. Being a DistributedSampler, Lightning uses it as it is instead
    of wrapping it (its wrapper would shuffle the stream, losing the batch share, and each
    process would draw its own). The DataModule sets ``stream_epoch`` as each training epoch's
    loader starts, from the epoch count a checkpoint restores; Lightning's ``set_epoch`` comes
    after a loader with workers has begun to prefetch, so it is ignored."""

    def __init__(
        self,
        dataset: CachedSegDataset,
        batch_size: int,
        fraction: float,
        ignore: int | None,
        replicas: int,
        rank: int,
        seed: int,
    ):
        # DistributedSampler.__init__ is not called: it would need the process group, and
        # Lightning reads none of what it sets from a sampler it does not wrap.
        ForegroundSampler.__init__(self, dataset, batch_size, fraction, ignore)
        self.replicas, self.rank, self.seed, self.stream_epoch = replicas, rank, seed, 0

    def set_epoch(self, epoch: int) -> None:
        """Ignored: see the class's note."""

    def _generator(self) -> torch.Generator:
        entropy = np.random.SeedSequence([self.seed, self.stream_epoch]).generate_state(1)[0]
        return torch.Generator().manual_seed(int(entropy))


class EpochLoader(DataLoader):
    """A DataLoader that calls ``on_epoch()`` whenever a pass over it (an epoch) begins."""

    def __init__(self, *args: Any, on_epoch: Callable[[], None], **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.on_epoch = on_epoch

    def __iter__(self):
        self.on_epoch()
        if self.persistent_workers and self.num_workers > 0 and self._iterator is not None:
            # A new iterator draws its workers' base seed from torch's generator before the
            # sampler shuffles; the persistent one is reused without it. The same draw here
            # keeps the shuffle order of every epoch that of a resumed run, whose first
            # epoch starts a new iterator.
            torch.empty((), dtype=torch.int64).random_(generator=self.generator)
        return super().__iter__()


class SegDataModule(pl.LightningDataModule):
    """Segmentation data from an image folder and a mask folder (or the bundled demo data).

    Arguments are plain values as in ``conf/data/folders.yaml``, which documents each one.
    ``palette`` is ``{class_name: [r, g, b]}`` in class order (a list of ``[r, g, b]`` is also
    accepted); ``augmentation`` is ``{"train": [specs], "eval": [specs]}`` with albumentations
    specs as for ``transforms.build_augmentation``. After ``setup()``: ``num_classes``,
    ``class_names``, ``colors``, ``split``, the three datasets and ``data_info()``.
    """

    def __init__(
        self,
        image_dir: str | None = None,
        mask_dir: str | Sequence[str] | None = None,
        mask_suffixes: Sequence[str] = ("", "_mask"),
        recursive: bool = False,
        mask_mode: str = "palette",
        palette: Mapping[str, Sequence[int]] | Sequence[Sequence[int]] | None = None,
        class_names: Sequence[str] | None = None,
        num_classes: int | None = None,
        ignore_index: int | Sequence[int] | None = None,
        in_channels: int = 1,
        context_slices: int = 0,
        slice_pattern: str | None = None,
        image_size: int | Sequence[int] = 128,
        median_blur: int = 0,
        window: Sequence[float] | None = None,
        intensity_offset: float = 0.0,
        normalize: str = "dataset",
        split: Sequence[float] = (0.6, 0.2, 0.2),
        seed: int = 42,
        group_pattern: str | None = None,
        split_file: str | None = None,
        num_folds: int | None = None,
        fold: int | None = None,
        foreground_fraction: float | None = None,
        soft_masks: bool = False,
        strict: bool = True,
        resize_masks: bool = False,
        batch_size: int = 8,
        num_workers: int = 0,
        pin_memory: bool | None = None,
        persistent_workers: bool = False,
        device_cache: bool | None = None,
        augmentation: Mapping[str, Sequence[Mapping]] | None = None,
        demo_dir: str = "~/.cache/lungseg/demo",
        demo_num_images: int = 120,
        demo_size: int = 256,
    ):
        super().__init__()
        if (image_dir is None) != (mask_dir is None):
            missing = "mask_dir" if mask_dir is None else "image_dir"
            raise LungsegError(
                f"data.{missing} is null but the other data folder is set. Set both to your "
                f"image and mask folders, or leave both null to use the bundled demo data."
            )
        self._demo = image_dir is None
        # a missing folder (or one of volumes) before any mask setting
        check_data_dirs(image_dir, mask_dir, bool(recursive))
        if mask_mode not in MASK_MODES:
            raise LungsegError(
                f"data.mask_mode is {mask_mode!r}; choose one of {', '.join(MASK_MODES)}: index "
                f"(pixel value = class id), binary (0 = background, non-zero = foreground) or "
                f"palette (one RGB colour per class, declared in data.palette)."
            )
        if normalize not in transforms.NORMALIZE_MODES:
            raise LungsegError(
                f"data.normalize is {normalize!r}; choose one of "
                f"{', '.join(transforms.NORMALIZE_MODES)}: dataset (train-split mean/std), "
                f"image (per-image z-score) or none (intensities scaled to [0, 1])."
            )
        if self._demo and mask_mode != "palette":
            raise LungsegError(
                f"data.mask_mode is {mask_mode!r}, but the bundled demo data (data.image_dir "
                f"and data.mask_dir null) has RGB palette masks. Set data.mask_mode=palette, or "
                f"point data.image_dir and data.mask_dir at your own data."
            )
        # several mask folders, one class each (Montgomery's leftMask, rightMask)
        self._layers = [] if mask_dir is None else mask_folders(mask_dir)
        check_layered_mode(len(self._layers), mask_mode)
        try:
            self._palette_names, self._palette = _parse_palette(palette, mask_mode, self._demo)
        except LungsegError as error:
            seen = _masks_seen(self._layers) if palette is None and mask_mode == "palette" else ""
            if not seen:
                if not recursive and isinstance(recursive, bool):  # a folder without masks:
                    for folder in self._layers:  # its own error first, with what it holds
                        if folder.is_dir():
                            _list_images(folder, "mask", "data.mask_dir")
                raise
            also = _pairing_too(image_dir, self._layers, mask_suffixes, recursive, strict)
            raise LungsegError(f"{seen}\n{error}{also}") from error
        layered = len(self._layers) + 1 if len(self._layers) > 1 and mask_mode == "index" else None
        if layered is not None and num_classes not in (None, layered):
            raise LungsegError(
                f"data.num_classes is {num_classes!r} but data.mask_dir lists "
                f"{len(self._layers)} folders, one class each: {layered} classes with the "
                f"background. Set data.num_classes={layered} or null."
            )
        num_classes = layered or num_classes
        self._num_classes = _fixed_num_classes(mask_mode, self._palette, num_classes)
        self._ignore = ignore_value(ignore_index, mask_mode)
        _check_ignore(self._ignore, mask_mode, self._palette, self._num_classes, soft_masks)
        self._image_dir = image_dir
        self._mask_suffixes = tuple(suffix_list(mask_suffixes))
        self._mask_mode, self._strict = mask_mode, strict
        if not isinstance(recursive, bool):
            raise LungsegError(
                f"data.recursive is {recursive!r}; give true (search the data folders' "
                f"sub-folders too) or false."
            )
        self._recursive = recursive
        if not isinstance(resize_masks, bool):
            raise LungsegError(
                f"data.resize_masks is {resize_masks!r}; give true (masks with their image's "
                f"shape at another scale are resized with it) or false."
            )
        self._resize_masks = resize_masks
        self._given_class_names = None if class_names is None else list(class_names)
        _check_background_first(self._palette_names, "data.palette")
        _check_background_first(self._given_class_names, "data.class_names")
        self._in_channels, self._image_size = in_channels, _parse_size(image_size)
        self._context = context.check_context(context_slices)
        self._slice_pattern = slice_pattern
        if self._context:  # a bad pattern stops the run before any file is read
            context.slice_keys([], slice_pattern)
        self._median_blur, self._normalize = median_blur, normalize
        self._window = window  # checked by scale_intensity
        # image (its path below data.image_dir): (bits, largest value)
        self._bit_depths: dict[str, tuple[int, int, bool]] = {}  # bits, largest, x 257
        # images that are one value as the network gets them: name -> stored (lowest, highest)
        self._flat: dict[str, tuple[float, float]] = {}
        # each pair's image as the network gets it, hashed: copies under other names
        self._digests: dict[str, bytes] = {}
        # pair's stem: (the class ids its mask holds at its own size, their pixel counts);
        # the classes are counted there, before the resize to image_size can lose small ones
        self._full_classes: dict[str, tuple[np.ndarray, np.ndarray]] = {}
        # pairs' stems whose masks hold data.ignore_index's value (a pixel of IGNORE)
        self._ignoring: set[str] = set()
        # pair: (image's, mask's EXIF orientation) where they differ; see check_orientations
        self._turned: dict[Pair, tuple[int, int, Path]] = {}
        self.skipped: list[tuple[Path, str]] = []  # data.strict=false: (file, reason)
        self._offset = float(intensity_offset)
        self._fractions, self._seed = split, seed
        self._group_pattern, self._split_file = group_pattern, split_file
        self._num_folds, self._fold = num_folds, fold
        if foreground_fraction is not None and not 0 <= foreground_fraction <= 1:
            raise LungsegError(
                f"data.foreground_fraction is {foreground_fraction}; give a share of each "
                f"training batch between 0 and 1 (e.g. 0.5), or null to sample slices uniformly."
            )
        self._foreground_fraction = foreground_fraction
        self._soft_masks = bool(soft_masks)
        self._batch_size, self._num_workers = batch_size, num_workers
        self._pin_memory, self._persistent_workers = pin_memory, persistent_workers
        augmentation = augmentation or {}
        if not isinstance(augmentation, Mapping) or set(augmentation) - {"train", "eval", "device"}:
            raise LungsegError(
                f"augmentation is {augmentation!r}, but it must be a mapping with the keys "
                f"'train' and/or 'eval', each a list of albumentations transforms, e.g. "
                f"{{train: [{{_target_: albumentations.HorizontalFlip, p: 0.5}}], eval: []}}, "
                f"and optionally 'device' (batches augmented on the training device, "
                f"conf/augmentation/device.yaml)."
            )
        self._device_settings = augmentation.get("device") or None
        if self._device_settings is not None:  # checked before any file is read
            device_augment.check_settings(self._device_settings)
        self._device_augment: device_augment.BatchAugment | None = None
        self._train_augment = transforms.build_augmentation(augmentation.get("train"))
        self._eval_augment = transforms.build_augmentation(augmentation.get("eval"))
        if self._ignore is not None:  # what moves in from outside the image is not labelled
            for compose in (self._train_augment, self._eval_augment):
                transforms.fill_masks_with(compose, IGNORE)
        if self._soft_masks:
            for compose in (self._train_augment, self._eval_augment):
                transforms.soft_mask_augmentation(compose)
        self._device_cache = _check_device_cache(
            device_cache, self._train_augment, self._soft_masks, num_workers
        )
        self._device_normalize: device_augment.BatchAugment | None = None
        self._demo_args = (Path(demo_dir).expanduser(), demo_num_images, demo_size)
        self._class_names: list[str] | None = None
        self._split: dict[str, str] | None = None
        self._datasets: dict[str, CachedSegDataset] = {}
        self._mean: list[float] | None = None
        self._std: list[float] | None = None
        self._train_epochs = 0
        self._train_sampler: Sampler[int] | None = None

    # ---- Lightning hooks -------------------------------------------------------------------

    def prepare_data(self) -> None:
        """Generate the demo data on first use (once per machine, before any setup)."""
        if self._demo:
            make_demo_dataset(*self._demo_args)

    def setup(self, stage: str | None = None) -> None:
        """Pair, split, decode and cache every file, and compute the normalisation statistics.

        The first call does the work; later ones (Lightning calls it per stage) reuse it. A
        Trainer's fit (stage "fit", trainer attached) also needs files in train, and in val
        unless data.split's val fraction is 0 (``splits.check_fit_split``); without a
        trainer, to read the data (and in ``train``, which sets up before it builds the trainer
        and calls check_fit_split itself before it writes anything), any split is accepted.
        """
        if self._split is None:
            self._cache_all()
        if stage == "fit" and self.trainer is not None:
            self.check_fit_split()

    def check_fit_split(self) -> None:
        """LungsegError unless train has files, and val too where data.split's val fraction
        is not 0 (``splits.check_fit_split``)."""
        splits.check_fit_split(
            self._split, self._fractions, self._split_file, self._num_folds, self._fold
        )

    def _cache_all(self) -> None:
        """setup's work: pair, split, decode, cache, statistics."""
        self.skipped.clear()
        pairs = find_pairs(
            *self._data_dirs(), self._mask_suffixes, self._strict, self.skipped, self._recursive
        )
        self._bit_depths.clear()
        self._flat.clear()
        self._digests.clear()
        self._full_classes.clear()
        self._ignoring.clear()
        self._turned.clear()
        pairs, images, masks = self._decode_all(pairs)
        check_orientations({p: self._turned[p] for p in pairs if p in self._turned})
        if self._window is None:
            _check_bit_depths(self._bit_depths, self._normalize)
        flat = transforms.flat_images_warning(self._flat, len(pairs), self._window, self._offset)
        if flat:
            log.warning("%s", flat)
        names = [p.stem for p in pairs]
        if self._context:  # 2.5-D: each slice with its neighbours as channels
            rows = context.neighbours(names, self._context, self._slice_pattern)
            images = [np.concatenate([images[j] for j in row], axis=2) for row in rows]
            self._log_context(names, rows)
        auto = self._group_pattern == AUTO
        if auto:  # the shared id at the start of the names, if any
            self._group_pattern = None if self._split_file else _auto_group_pattern(names)
        elif self._group_pattern is not None and self._split_file is None:
            _check_group_ids(names, self._group_pattern)
        by_file = self._group_pattern is None and self._split_file is None
        # one warning: the layout's, which names the pattern to set, or else 2.5-D's own
        if by_file and not _check_folder_grouping(names, bool(self._context)) and self._context:
            log.warning(
                "data.context_slices without data.group_pattern: the split is by slice, so a "
                "training slice's neighbours may be validation or test images (their pixels, "
                "not their masks). Set data.group_pattern to split by patient or volume."
            )
        try:
            split = splits.make_split(
                names,
                self._fractions,
                self._seed,
                self._group_pattern,
                self._split_file,
                self._num_folds,
                self._fold,
            )
        except LungsegError as error:
            few = "leaves the" in str(error) or "to spread over the folds" in str(error)
            if not auto or self._group_pattern is None or not few:
                raise
            raise LungsegError(
                f"{error} The split is by patient: data.group_pattern=auto took the ids the "
                f"file names share ('{self._group_pattern}'); data.group_pattern=null splits "
                f"by file instead, though one patient's images may then land in two splits."
            ) from error
        full = [self._full_classes[n] for n in names]  # class ids at the masks' own size
        if self._ignore is not None and not self._ignoring.intersection(names):
            self._warn_unheld_ignore(pairs, full)
        if self._num_classes is None:  # index masks without data.num_classes
            files = [p.masks[0] for p in pairs]
            self._num_classes = _infer_num_classes(names, full, self._ignore, files)
            _check_ignore(self._ignore, self._mask_mode, None, self._num_classes, False)
        soft = None
        if self._soft_masks:  # full-size masks (classes were not known) → fractions
            soft = [
                transforms.soft_mask(m, self._num_classes, self._image_size) if m.ndim == 2 else m
                for m in masks
            ]
            masks = [transforms.hard_mask(transforms.soft_target(m)) for m in soft]
        self._class_names = self._resolve_class_names()
        members = {s: [i for i, n in enumerate(names) if split[n] == s] for s in splits.SPLITS}
        self._check_foreground(members, full)
        self._warn_no_background(pairs, full)
        self._warn_empty_val(members, full)
        self._warn_copies(split)
        # (N, K): which classes each mask holds as trained (soft masks: any fraction)
        held = np.zeros((len(masks), self._num_classes), bool)
        for i, mask in enumerate(soft or masks):
            held[i] = _held_classes(mask, self._num_classes)
        lost = self._warn_lost_classes(names, full, held)
        self._warn_untrained_classes(members, held, lost)
        self._warn_sided_classes([masks[i] for i in members["train"]])
        train_images = [images[i] for i in members["train"]]
        if self._normalize == "dataset":
            self._mean, self._std = _channel_stats(train_images, self._window)
        info = self._image_info()
        if self._device_settings is not None:  # normalised on the device, after augmenting
            self._device_augment = device_augment.BatchAugment(
                self._device_settings, info, mask_fill=0 if self._ignore is None else IGNORE
            )
        for name in splits.SPLITS:
            deferred = name == "train" and self._device_augment is not None
            self._datasets[name] = CachedSegDataset(
                [names[i] for i in members[name]],
                [images[i] for i in members[name]],
                [masks[i] for i in members[name]],
                self._train_augment if name == "train" else self._eval_augment,
                {**info, "normalize": "none"} if deferred else info,
                None if soft is None else [soft[i] for i in members[name]],
            )
        self._split = split
        if self._device_cache is not False and self._device_augment is None:
            # for batches gathered on the device: normalised there, after the gather
            self._device_normalize = device_augment.BatchAugment({}, info)
        log.info(self._summary(pairs, members, [masks[i] for i in members["train"]]))

    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        """On the training device: masks become int64 (the loader sends uint8), and with device
        augmentation (``augmentation.device``) training batches are augmented and normalised.
        Anything but a batch dict (the module's example input, which Lightning's model summary
        sends through this hook) passes unchanged."""
        if not isinstance(batch, dict):
            return batch
        if self.trainer is not None and self.trainer.training:
            return self.device_transform(batch)
        return _class_ids(batch)

    def device_transform(self, batch: dict[str, Any]) -> dict[str, Any]:
        """A training batch, on its device, as the network trains on it: augmented and
        normalised by ``augmentation.device`` when it is set (else the loader already did
        both), with int64 masks. A hand-written loop over ``train_dataloader()`` calls this
        after moving each batch to its device."""
        self._check_setup()
        if "index" in batch:  # data.device_cache: the batch from the cache on its device
            batch = self._gather(batch)
        return _class_ids(batch if self._device_augment is None else self._device_augment(batch))

    def _gather(self, batch: dict[str, Any]) -> dict[str, Any]:
        index = batch["index"]
        images, masks = self.train_dataset.on_device(index.device)
        out = {key: value for key, value in batch.items() if key != "index"}
        out["image"] = images.index_select(0, index)
        out["mask"] = masks.index_select(0, index)
        if self._device_normalize is not None:
            out["image"] = self._device_normalize.normalize(out["image"])
        if self.trainer is not None:
            # The precision's input dtype (bf16-true: bfloat16), which Lightning gives the
            # loader's batches before their transfer, and this batch only now has images.
            out = self.trainer.precision_plugin.convert_input(out)
        return out

    def teardown(self, stage: str) -> None:
        if stage == "fit" and "train" in self._datasets:
            self._datasets["train"].release()  # not kept on the GPU through the test

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train_dataset, train=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.val_dataset, train=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader(self.test_dataset, train=False)

    # ---- public, after setup ---------------------------------------------------------------

    @property
    def num_classes(self) -> int:
        self._check_setup()
        return self._num_classes

    @property
    def class_names(self) -> list[str]:
        self._check_setup()
        return list(self._class_names)

    @property
    def colors(self) -> np.ndarray:
        """(num_classes, 3) uint8 RGB: the palette in palette mode, else distinct defaults."""
        self._check_setup()
        if self._palette is not None:
            return np.array(self._palette, dtype=np.uint8)
        return default_colors(self._num_classes)

    @property
    def split(self) -> dict[str, str]:
        """stem -> "train" | "val" | "test"."""
        self._check_setup()
        return dict(self._split)

    @property
    def train_dataset(self) -> CachedSegDataset:
        self._check_setup()
        return self._datasets["train"]

    @property
    def val_dataset(self) -> CachedSegDataset:
        self._check_setup()
        return self._datasets["val"]

    @property
    def test_dataset(self) -> CachedSegDataset:
        self._check_setup()
        return self._datasets["test"]

    def write_split(self, path: str | Path) -> None:
        """Write the split as CSV ``file,split``; pass it as data.split_file to reuse it."""
        splits.write_split(self.split, Path(path))

    def write_skipped(self, path: str | Path) -> None:
        """Write the files data.strict=false left out as CSV ``file,reason``."""
        write_reasons(Path(path), self.skipped)

    def data_info(self) -> dict[str, Any]:
        """What prediction on new images needs, as plain values (safe for weights_only loads).

        mean/std: per-channel train statistics of the [0, 1] images (normalize=dataset only).
        """
        self._check_setup()
        info = self._image_info()
        return {
            **info,
            # Checked while decoding, so these casts cannot hide a bad value.
            "in_channels": int(info["in_channels"]),
            "median_blur": int(info["median_blur"]),
            "window": None if info["window"] is None else [float(v) for v in info["window"]],
            "mask_mode": self._mask_mode,
            # the images' bit depths (8, 16): predict.py and eval.py name other ones
            "bit_depths": sorted({bits for bits, _, _ in self._bit_depths.values()}),
            "palette": None if self._palette is None else self.colors.tolist(),
            "class_names": list(self._class_names),
            "num_classes": int(self._num_classes),
            # data.ignore_index as set (plain values): eval.py reads the masks with it
            "ignore_index": None if self._ignore is None else _plain_ignore(self._ignore),
            # data.resize_masks: eval.py reads the masks so too
            "resize_masks": self._resize_masks,
        }

    # ---- internals -------------------------------------------------------------------------

    def _check_setup(self) -> None:
        assert self._split is not None, "call prepare_data() and setup() first"

    def _data_dirs(self) -> tuple[Path, Path | list[Path]]:
        if self._demo:  # idempotent: returns at once when prepare_data generated it
            return make_demo_dataset(*self._demo_args)
        masks = self._layers if len(self._layers) > 1 else self._layers[0]
        return Path(self._image_dir).expanduser(), masks

    def _image_info(self) -> dict[str, Any]:
        """The data_info entries that transforms.preprocess and transforms.normalize read."""
        return {
            "in_channels": self._in_channels,
            "context_slices": self._context,
            "slice_pattern": self._slice_pattern,
            "image_size": list(self._image_size),
            "median_blur": self._median_blur,
            "window": self._window,
            "intensity_offset": self._offset,
            "normalize": self._normalize,
            "mean": None if self._mean is None else list(self._mean),
            "std": None if self._std is None else list(self._std),
        }

    def _decode_all(
        self, pairs: list[Pair]
    ) -> tuple[list[Pair], list[np.ndarray], list[np.ndarray]]:
        """The pairs that decode, with their images and masks. Every pair is tried, so that one
        message lists all the files that fail (corrupt, mask size or values wrong). They stop
        the run, or with data.strict=false are skipped with one warning; when every pair fails
        (usually a setting, not the files) the first error stops the run either way."""

        def attempt(pair: Pair) -> tuple[np.ndarray, np.ndarray] | LungsegError:
            try:
                return self._decode(pair)
            except LungsegError as error:
                return error

        # Threads: PNG decoding and the numpy work release the GIL, so this scales with cores.
        with ThreadPoolExecutor() as pool:
            results = list(pool.map(attempt, pairs))
        failed = [(p, r) for p, r in zip(pairs, results, strict=True) if isinstance(r, Exception)]
        if failed and len(failed) == len(pairs):
            raise failed[0][1]
        if failed and self._strict:
            others = [_failed_file(p, e) for p, e in failed[1:]]
            listed = ", ".join(others[:_SHOW])
            listed += f", ... ({len(others)} in total)" if len(others) > _SHOW else ""
            more = f" Other pairs that cannot be used: {listed}." if others else ""
            raise LungsegError(
                f"{failed[0][1]}{more} Or set data.strict=false to skip the pairs that cannot "
                f"be used, with a warning."
            )
        if failed:
            self.skipped += [(p.image, str(e)) for p, e in failed]
            log.warning(
                "Skipping %d of %d image/mask pairs (data.strict=false): %s",
                len(failed),
                len(pairs),
                " ".join(f"({i}) {e}" for i, (_, e) in enumerate(failed[:_SHOW], 1)),
            )
        kept = [(p, r) for p, r in zip(pairs, results, strict=True) if isinstance(r, tuple)]
        return [p for p, _ in kept], [r[0] for _, r in kept], [r[1] for _, r in kept]

    def _decode(self, pair: Pair) -> tuple[np.ndarray, np.ndarray]:
        """(H, W, C) float32 image in [0, 1] and (H, W) uint8 mask, both at image_size; with
        data.soft_masks the mask's class fractions at image_size (``transforms.soft_mask``), or,
        while the number of classes is not known yet, the mask at its own size for ``setup``
        to count the classes in and convert."""
        raw, turn = read_image_oriented(pair.image)
        raw_masks = []
        for path in pair.masks:  # one file, or one per folder of data.mask_dir
            raw_mask, mask_turn = read_image_oriented(path)
            if turn != mask_turn:
                self._turned.setdefault(pair, (turn, mask_turn, path))
            if raw_mask.shape[:2] != raw.shape[:2]:
                note = "".join(
                    f" {file.name} carries an EXIF orientation that lungseg applies, as image "
                    f"viewers do ({ORIENTATIONS[t]}); its stored pixels are "
                    f"{shape[0]}x{shape[1]}."
                    for file, t, shape in (
                        (pair.image, turn, raw.shape),
                        (path, mask_turn, raw_mask.shape),
                    )
                    if t in (5, 6, 7, 8)
                )
                # data.resize_masks: to the image's size first, as eval.py scores it (and the
                # folders of a data.mask_dir list may hold masks at different scales)
                raw_mask = mask_at_image_size(
                    pair.image, raw.shape, path, raw_mask, self._resize_masks, note
                )
            raw_masks.append(raw_mask)
        mask = decode_layers(
            raw_masks, pair.masks, self._mask_mode, self._palette, self._num_classes, self._ignore
        )
        counts = np.bincount(mask.ravel())  # uint8 class ids: at most 256 counts
        present = np.flatnonzero(counts)
        if self._ignore is not None:  # not a class: not counted, nor foreground
            if IGNORE in present:
                self._ignoring.add(pair.stem)  # a set: one add is safe across threads
            present = present[present != IGNORE]
        self._full_classes[pair.stem] = (present, counts[present])  # one key per thread
        image = transforms.preprocess(raw, self._image_info(), pair.image)
        if transforms.is_flat(image):  # _flat: setup warns of them
            self._flat[f"{pair.stem}{pair.image.suffix}"] = (float(raw.min()), float(raw.max()))
        else:  # flat images are alike without being copies
            self._digests[pair.stem] = hashlib.blake2b(image.tobytes(), digest_size=16).digest()
        if raw.dtype in (np.uint8, np.uint16):  # of the pairs used: _check_bit_depths, data_info
            top = int(raw.max())
            # 8-bit values stored in 16 bits (each x 257) are scaled to what the 8-bit file
            # gives; the full look only where the largest value allows it
            widened = raw.dtype == np.uint16 and top % 257 == 0 and not (raw % 257).any()
            self._bit_depths[f"{pair.stem}{pair.image.suffix}"] = (
                raw.dtype.itemsize * 8,
                top,
                bool(widened),
            )
        if self._soft_masks:
            k = self._num_classes
            return image, mask if k is None else transforms.soft_mask(mask, k, self._image_size)
        return image, transforms.resize_mask(mask, self._image_size)

    def _check_foreground(
        self, members: Mapping[str, list[int]], full: Sequence[tuple[np.ndarray, np.ndarray]]
    ) -> None:
        """LungsegError when no training mask holds a pixel of any class but 0 (at the
        masks' own size): the wrong folder, a mask mode that reads the masks as empty, or
        masks drawn in a way lungseg does not read."""
        train = members["train"]
        if not train or any(full[i][0][-1] > 0 for i in train):
            return
        others = {
            s: sum(full[i][0][-1] > 0 for i in members[s]) for s in splits.SPLITS if s != "train"
        }
        if any(others.values()):
            found = " and ".join(
                f"{n} of the {len(members[s])} {s} masks" for s, n in others.items() if n
            )
            found = f"; only {found} hold foreground, so check the split too"
        else:
            found = ", nor does any val or test mask: every mask is empty"
        folders = ", ".join(str(f) for f in self._layers) if self._layers else "the demo data"
        raise LungsegError(
            f"None of the {len(train)} training masks holds a foreground pixel (every pixel "
            f"reads as class 0, background, with data.mask_mode={self._mask_mode}){found}. "
            f"Check that data.mask_dir ({folders}) is the folder of the masks, not another one "
            f"with the same file names, and that data.mask_mode fits how they store the "
            f"classes: index (class ids 1, 2, ... as grey values), binary (non-zero = "
            f"foreground) or palette (the colours of data.palette)."
        )

    def _warn_unheld_ignore(
        self, pairs: Sequence[Pair], full: Sequence[tuple[np.ndarray, np.ndarray]]
    ) -> None:
        """A warning when no mask holds data.ignore_index's value: most likely a typo, or
        masks that store their unlabelled pixels as another value, which are then trained on
        as a class (index masks: the values they hold; other modes: the first mask's)."""
        setting = _plain_ignore(self._ignore)
        if self._mask_mode == "index" and len(self._layers) <= 1:
            held = np.unique(np.concatenate([ids for ids, _ in full]))
            holds = f"the masks hold the values {_ranges(held.tolist())}"
        else:  # a folder list's files are read as binary masks
            mode = "binary" if len(self._layers) > 1 else self._mask_mode
            holds = f"{pairs[0].masks[0]}, for one, holds {stored_values(pairs[0].masks[0], mode)}"
        log.warning(
            "data.ignore_index is %s, but none of the %d masks holds that %s, so no pixel is "
            "left out of training and scoring; %s. Most likely a typo, or the masks store "
            "their unlabelled pixels as another value: set data.ignore_index to that value, or "
            "null if every pixel is labelled.",
            setting,
            len(pairs),
            "colour" if self._mask_mode == "palette" else "value",
            holds,
        )

    def _warn_copies(self, split: Mapping[str, str]) -> None:
        """A warning when images of different names are the same image (``case00`` and
        ``case00 (1)``, as downloads and copies name them; the same pixels as the network gets
        them) and the split put them in different parts: the test (or validation) score then
        counts images the model trained on."""
        by_digest: dict[bytes, list[str]] = {}
        for stem, digest in self._digests.items():
            by_digest.setdefault(digest, []).append(stem)
        groups = [sorted(g) for g in by_digest.values() if len({split[n] for n in g}) > 1]
        if not groups:
            return
        log.warning(
            "%d images are the same image as another under another name, in another split "
            "(%s; e.g. %s), so the val and test scores count images the model trained on. "
            "Remove the copies from the data folders, or keep each group in one split with a "
            "data.split_file (or a data.group_pattern that gives the copies one id).",
            sum(len(g) for g in groups),
            counted(len(groups), "group"),
            ", ".join(f"{n} ({split[n]})" for n in groups[0][:3]),
        )

    def _warn_no_background(
        self, pairs: Sequence[Pair], full: Sequence[tuple[np.ndarray, np.ndarray]]
    ) -> None:
        """A warning naming the masks without a background pixel (every pixel a structure, at
        the masks' own size): a mask saved inverted or blank white, or of another image. A
        new-user tester's all-ones and inverted 0/1 masks trained without a word."""
        full_masks = [  # a partial annotation (ignore label and foreground) is not one
            i
            for i, (present, _) in enumerate(full)
            if present.size and present[0] > 0 and pairs[i].stem not in self._ignoring
        ]
        if not full_masks:
            return
        names = self._class_names
        shown = [
            f"{pairs[i].masks[0].name} (all {', '.join(names[c] for c in full[i][0])})"
            for i in full_masks[:_SHOW]
        ]
        log.warning(
            "%s of the %d hold no background pixel: %s%s. A mask whose every pixel is a "
            "structure is mostly a mask saved inverted (0 and 1 swapped) or blank, or the mask "
            "of another image; check %s, and fix or remove %s.",
            counted(len(full_masks), "mask"),
            len(full),
            ", ".join(shown),
            ", ..." if len(full_masks) > _SHOW else "",
            "it" if len(full_masks) == 1 else "them",
            "it" if len(full_masks) == 1 else "them",
        )

    def _warn_empty_val(
        self, members: Mapping[str, list[int]], full: Sequence[tuple[np.ndarray, np.ndarray]]
    ) -> None:
        """A warning when the validation split holds images but none with a foreground pixel
        (small data, lesion data with many empty slices, a split file): val/dice is then 0 or
        undefined at every epoch, so the checkpoint chosen by it says nothing about the
        model, without an error."""
        val = members["val"]
        if not val or any(full[i][0][-1] > 0 for i in val):
            return
        log.warning(
            "None of the %s holds a foreground pixel (every pixel is class 0, background), so "
            "val/dice can only be 0 (any foreground predicted on an empty mask scores 0) or "
            "undefined, and a checkpoint chosen by it (callbacks.model_checkpoint.monitor, "
            "val/dice by default) says nothing about the model. Give the validation split "
            "images with foreground: "
            "another data.seed, split by patient with data.group_pattern, a larger "
            "validation share in data.split, or a data.split_file.",
            counted(len(val), "validation mask"),
        )

    def _warn_lost_classes(
        self,
        names: Sequence[str],
        full: Sequence[tuple[np.ndarray, np.ndarray]],
        held: np.ndarray,
    ) -> set[int]:
        """The classes some mask holds at its own size (``full``: its class ids and pixel
        counts) but none after the resize to data.image_size (``held``: (N, K) bool), too
        small to survive it, with a warning naming them and the masks that hold them: the
        network would have an output it never trains."""
        k = self._num_classes
        largest = np.zeros(k, np.int64)  # the most pixels of each class in one full mask
        for ids, counts in full:
            kept = ids < k
            largest[ids[kept]] = np.maximum(largest[ids[kept]], counts[kept])
        lost = [c for c in range(1, k) if largest[c] and not held[:, c].any()]
        if lost:
            holders = {
                c: [n for n, (ids, _) in zip(names, full, strict=True) if c in ids] for c in lost
            }
            log.warning(
                "%s at the masks' own size but in none after the resize to data.image_size=%s "
                "(too small to survive it), so the network has an output it never trains. "
                "Give a larger data.image_size.",
                "; ".join(
                    f"class {self._class_names[c]!r} (id {c}) is in {len(holders[c])} masks "
                    f"({_listed(holders[c])}; at most {largest[c]} pixels in one)"
                    for c in lost
                ),
                list(self._image_size),
            )
        return set(lost)

    def _warn_untrained_classes(
        self, members: Mapping[str, list[int]], held: np.ndarray, lost: set[int]
    ) -> None:
        """A warning naming each class that no training mask holds (as trained, at
        data.image_size; ``held``: (N, K) bool) with how many val and test masks hold it;
        the classes ``lost`` by the resize have their own warning."""
        train = members["train"]
        if not train:
            return
        counts = {s: held[ids].sum(axis=0) for s, ids in members.items()}
        absent = [c for c in range(self._num_classes) if not counts["train"][c] and c not in lost]
        if not absent:
            return

        def where(c: int) -> str:
            found = [
                counted(int(counts[s][c]), f"{s} mask")
                for s in splits.SPLITS
                if s != "train" and counts[s][c]
            ]
            return f"in {' and '.join(found)}" if found else "in no mask of any split"

        log.warning(
            "%s no pixel in the %d training masks (%s), so the network has an output it never "
            "trains. Where val or test masks hold it, split by patient (data.group_pattern) "
            "or with a data.split_file so that training masks hold it too, or add data that "
            "holds it; for a class in no mask at all check data.num_classes or data.palette.",
            "Class has" if len(absent) == 1 else "Classes have",
            len(train),
            ", ".join(f"{self._class_names[c]!r} {where(c)}" for c in absent),
        )

    def _warn_sided_classes(self, train_masks: list[np.ndarray]) -> None:
        """A warning when the training augmentation flips images left-right while classes
        are told apart by their side: named for a side of the body (left lung, right lung:
        one mask folder each, as the Montgomery set ships them), or found on opposite halves
        of the image in nearly every training mask whatever their names (``_sided_classes``).
        A flip moves each side to the other's place under its own label."""
        if not _flips_left_right(self._train_augment, self._device_settings):
            return
        sided = [name for name in self._class_names if postprocess.SIDES.search(name)]
        if sided:
            found = f"The classes {sided} name a side of the body"
        else:
            halves = _sided_classes(train_masks, len(self._class_names))
            if not (halves["left"] and halves["right"]):
                return
            found = "Classes sit on one side of the image in nearly every training mask (" + (
                "; ".join(
                    f"{self._class_names[c]}: {side} half in {share:.0%} of {n} masks"
                    for side in ("left", "right")
                    for c, share, n in halves[side]
                )
                + ")"
            )
        log.warning(
            "%s, but the training augmentation flips images left-right "
            "(albumentations.HorizontalFlip or augmentation.device.hflip): a flipped image "
            "shows each side where the other was, under its own label. If the classes are "
            "told apart by their side, train without the horizontal flip (augmentation=none, "
            "or a conf/augmentation/ file without it) and keep horizontal out of "
            "postprocess.tta_flips; with data.mask_mode=binary the classes are united into one.",
            found,
        )

    def _resolve_class_names(self) -> list[str]:
        k = self._num_classes
        if self._given_class_names is not None:
            names = self._given_class_names
            if len(names) != k or len(set(names)) != k:
                raise LungsegError(
                    f"data.class_names {names} must be {k} distinct names, one per class "
                    f"(data.num_classes or the classes found in the masks is {k}). Fix the "
                    f"list, or set data.class_names to null to name the classes automatically."
                )
            return [str(n) for n in names]
        if self._palette_names is not None:
            return list(self._palette_names)
        if self._mask_mode == "binary":
            return ["background", "foreground"]
        if len(self._layers) > 1:  # a class a folder, named after it
            names = ["background", *layer_names(self._layers)]
            if len(set(names)) == k:
                return names
        return ["background"] + [f"class_{i}" for i in range(1, k)]

    def _loader(self, dataset: CachedSegDataset, train: bool) -> DataLoader:
        options = {
            "batch_size": self._batch_size,
            "collate_fn": collate,
            "num_workers": self._num_workers,
            "pin_memory": self._pins(),
            "persistent_workers": self._persistent_workers and self._num_workers > 0,
        }
        replicas = self.trainer.world_size if self.trainer is not None else 1
        if not train:
            limit = getattr(
                self.trainer,
                f"limit_{'val' if dataset is self.val_dataset else 'test'}_batches",
                None,
            )
            # A fraction of the batches rounds each process's share: one could get none.
            if 1 < replicas <= len(dataset) and not (isinstance(limit, float) and limit < 1):
                # Each image once over all processes: Lightning's DistributedSampler would pad
                # the split with repeats to equal shares, counting them twice in val/test
                # metrics. Uneven shares are safe: the metrics and the logged loss are summed
                # across processes once, at the epoch's end (with fewer images than processes,
                # a process without a batch would never log: padding is kept there).
                rank = self.trainer.global_rank
                options["sampler"] = UnrepeatedDistributedSampler(dataset, replicas, rank, False)
            return DataLoader(dataset, **options)
        # each process's share of the split: one short batch rather than none
        drop_last = math.ceil(len(dataset) / replicas) > self._batch_size
        if self._foreground_fraction:
            ignore = None if self._ignore is None else IGNORE
            args = (dataset, self._batch_size, self._foreground_fraction, ignore)
            if replicas > 1:
                rank = self.trainer.global_rank
                options["sampler"] = DistributedForegroundSampler(*args, replicas, rank, self._seed)
                log.info(
                    "foreground oversampling: process %d of %d takes one sample in %d of a "
                    "stream common to all processes",
                    rank,
                    replicas,
                    replicas,
                )
            else:
                options["sampler"] = ForegroundSampler(*args)
        else:
            options["shuffle"] = True
        self._train_sampler = options.get("sampler")
        dataset.indices_only = self._uses_device_cache()
        if options["persistent_workers"]:
            dataset.epoch_seed = torch.zeros((), dtype=torch.int64).share_memory_()
        return EpochLoader(dataset, drop_last=drop_last, on_epoch=self._reseed, **options)

    def hold_on_device(self, device: torch.device, strategy: Any) -> None:
        """With data.device_cache in use: the training cache copied to ``device`` now, as
        training starts (the module's on_train_start), on every process at once. Where it
        does not fit on one process's device, every process stops with the error: one
        stopping alone at its first batch left the others waiting for it (a DDP sweep was
        killed, or waited out NCCL's timeout). ``strategy``: Lightning's, for the agreement."""
        dataset = self.train_dataset
        if not dataset.indices_only:
            return
        error = None
        try:
            dataset.on_device(device)
        except LungsegError as failed:
            error = failed
        if strategy.reduce_boolean_decision(error is not None, all=False):
            raise error or LungsegError(
                "data.device_cache: the training images and masks do not fit in another "
                "process's device memory beside the network (its log says how much they "
                "take). Set data.device_cache=false (batches then come from the loader), or a "
                "smaller data.image_size."
            )

    def _uses_device_cache(self) -> bool:
        """data.device_cache, or where it is null, whether the training images go to the GPU:
        when training on a CUDA device (a Trainer attached), the loader has nothing to do to an
        image (no albumentations transforms, hard masks), and they take at most a quarter of
        the device's free memory and a tenth of all of it."""
        if self._device_cache is not None:
            return self._device_cache
        dataset = self.train_dataset
        if self.trainer is None or not dataset.batched:
            return False
        device = self.trainer.strategy.root_device
        if device.type != "cuda" or not torch.cuda.is_available():
            return False
        size = dataset.nbytes
        # Measured before the optimiser's state and the activations take their share: a
        # quarter of what is free, and a tenth of the whole, leave them the rest.
        free, total = torch.cuda.mem_get_info(device)
        held = size <= min(free / 4, total / 10)
        log.info(
            "data.device_cache=null: the %d training images (%.0f MB) %s on %s (%.0f of %.0f MB "
            "free; held where they take at most a quarter of the free memory and a tenth of "
            "all)%s",
            len(dataset),
            size / 2**20,
            "are held" if held else "are not held",
            device,
            free / 2**20,
            total / 2**20,
            "; the loader's worker processes only hand out indices (data.num_workers=0 saves "
            "starting them)"
            if held and self._num_workers
            else "",
        )
        return held

    def _pins(self) -> bool:
        """data.pin_memory, or where it is null, whether batches go to a CUDA device: page-locked
        batches copy to it without blocking the host (pageable ones are copied synchronously,
        so the host stops queueing work while the GPU drains)."""
        if self._pin_memory is not None:
            return bool(self._pin_memory)
        if self.trainer is not None:
            return self.trainer.strategy.root_device.type == "cuda"
        return torch.cuda.is_available()  # a hand-written loop: as it would most likely train

    def _reseed(self) -> None:
        """Reseed Python's, NumPy's and torch's generators from (data.seed, epoch, rank, and
        ``seed`` where it differs) as a training epoch begins. Its shuffle order, augmentations
        (in worker processes too: PyTorch seeds them from torch's generator) and dropout masks
        then do not depend on what ran before it, and a run resumed from an epoch-end
        checkpoint, which holds the epoch count (see ``state_dict``), trains exactly as the
        uninterrupted run. The reseed sits in the loader, not in an epoch hook, because
        Lightning creates the first iterator of a fit, and fetches its first batch, before the
        first ``on_train_epoch_start``."""
        rank = self.trainer.global_rank if self.trainer is not None else 0
        entropy = [self._seed, self._train_epochs, rank]
        # the run's seed too (pl.seed_everything's, train.py's `seed`) where it differs from
        # data.seed: `seed=1 data.seed=42` and `seed=2 data.seed=42` (an ensemble on one split)
        # then differ in shuffle order, augmentation and dropout, not only in their first weights
        run_seed = os.environ.get("PL_GLOBAL_SEED")
        if run_seed is not None and int(run_seed) != self._seed:
            entropy.append(int(run_seed))
        if isinstance(self._train_sampler, DistributedForegroundSampler):
            self._train_sampler.stream_epoch = self._train_epochs  # before workers prefetch
        seed = int(np.random.SeedSequence(entropy).generate_state(1)[0])
        if self.train_dataset.epoch_seed is not None:  # persistent workers follow it
            self.train_dataset.epoch_seed.fill_(seed)
        # Not pl.seed_everything: that would also reset PL_GLOBAL_SEED and PL_SEED_WORKERS.
        random.seed(seed)
        np.random.seed(seed)  # noqa: NPY002 - the legacy global generator, for any code using it
        torch.manual_seed(seed)
        self._train_epochs += 1

    def state_dict(self) -> dict[str, int]:
        """Saved in Lightning checkpoints: the training epochs begun so far."""
        return {"train_epochs": self._train_epochs}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._train_epochs = int(state_dict.get("train_epochs", 0))

    def _log_context(self, names: list[str], rows: list[list[int]]) -> None:
        """What data.slice_pattern made of the file names: volumes, slices per volume, how
        many neighbours are padding; a warning where the pattern probably does not fit."""
        volumes = [volume for volume, _ in context.slice_keys(names, self._slice_pattern)]
        depths = sorted(np.unique(volumes, return_counts=True)[1].tolist())
        centre = self._context
        padded = sum(row[k] == row[centre] for row in rows for k in range(len(row)) if k != centre)
        share = padded / max(1, 2 * centre * len(rows))
        log.info(
            "2.5-D input (data.context_slices=%d): %d volumes, %d-%d slices each (median %d); "
            "%.0f%% of the neighbours repeat a nearer slice (stack ends, gaps)",
            centre,
            len(depths),
            depths[0],
            depths[-1],
            depths[len(depths) // 2],
            100 * share,
        )
        if share > 0.5:
            log.warning(
                "data.context_slices: %.0f%% of the neighbouring slices are missing, so most "
                "inputs repeat their own slice. Check that data.slice_pattern (%s) finds the "
                "volume and slice number in the file names (e.g. %s).",
                100 * share,
                self._slice_pattern or context.DEFAULT_SLICE_PATTERN,
                names[0],
            )

    def _summary(
        self, pairs: list[Pair], members: dict[str, list[int]], train_masks: list[np.ndarray]
    ) -> str:
        counts = "/".join(str(len(members[s])) for s in splits.SPLITS)
        patients = ""
        if self._group_pattern is not None:
            ids = splits.patient_ids([p.stem for p in pairs], self._group_pattern)
            per_split = [{ids[pairs[i].stem] for i in members[s]} for s in splits.SPLITS]
            patients = f" ({'/'.join(str(len(p)) for p in per_split)} patients)"
            shared = sorted(set.union(*[a & b for a in per_split for b in per_split if a is not b]))
            if shared:
                log.warning(
                    "data.split_file puts %s into more than one split (leakage between train, "
                    "val and test): %s",
                    counted(len(shared), "patient"),
                    ", ".join(shared[:_SHOW]),
                )
        k = self._num_classes  # [:k]: the ignore label (masks.IGNORE) is no class
        pixels = sum(np.bincount(m.ravel(), minlength=k)[:k] for m in train_masks)
        fractions = pixels / max(1, pixels.sum()) if train_masks else np.zeros(self._num_classes)
        classes = ", ".join(
            f"{n} {f:.1%}" for n, f in zip(self._class_names, fractions, strict=True)
        )
        source = "demo data" if self._demo else str(self._image_dir)
        return (
            f"{len(pairs)} image/mask pairs from {source}; train/val/test {counts}{patients}; "
            f"{self._num_classes} classes, train pixels: {classes}"
        )


def _check_device_cache(
    device_cache: Any, train_augment: A.Compose, soft_masks: bool, num_workers: int
) -> bool | None:
    """data.device_cache (true, false, or None: decided when the training loader is built),
    true checked against the settings it cannot serve."""
    if device_cache is not None and not isinstance(device_cache, bool):
        raise LungsegError(
            f"data.device_cache is {device_cache!r}; give true (the training images held on the "
            f"training device, batches gathered there), false, or null (true when training on "
            f"a GPU where it applies and the images fit)."
        )
    if not device_cache:
        return device_cache
    if train_augment.transforms:
        raise LungsegError(
            "data.device_cache=true gathers training batches on the device, but augmentation "
            f"has albumentations transforms for training ({len(train_augment.transforms)}), "
            "which work image by image on the CPU. Use augmentation=device (the same "
            "augmentation on the device) or augmentation=none, or set data.device_cache=false."
        )
    if soft_masks:
        raise LungsegError(
            "data.device_cache=true does not hold soft masks (data.soft_masks=true); set one "
            "of them to false."
        )
    if num_workers:
        log.warning(
            "data.device_cache=true: the loader only hands out batch indices, so its %d worker "
            "processes have nothing to do; data.num_workers=0 saves starting them",
            num_workers,
        )
    return True


def _class_ids(batch: Any) -> Any:
    """``batch`` with its ``"mask"`` as int64 class ids, as the losses and metrics take them."""
    if isinstance(batch, dict) and isinstance(batch.get("mask"), torch.Tensor):
        batch = {**batch, "mask": batch["mask"].long()}
    return batch


_BACKGROUND = re.compile(r"_*(background|back_ground|bg|backgrnd)_*", re.IGNORECASE)


def _check_background_first(names: Sequence[Any] | None, setting: str) -> None:
    """LungsegError when a class named background (bg, Background, _background_) is not
    class 0. Class 0 is the background everywhere: left out of the mean Dice and IoU that pick
    the best checkpoint, of the lesion scores and of post-processing. A palette listing it
    later made another structure the background and scored the real background as one, with
    no error."""
    if not names:
        return
    late = [(i, str(n)) for i, n in enumerate(names) if i > 0 and _BACKGROUND.fullmatch(str(n))]
    if late:
        i, name = late[0]
        order = [name, *(str(n) for j, n in enumerate(names) if j != i)]
        fix = (
            f"List {name!r} first, in this order: {', '.join(order)}."
            if setting == "data.palette"
            else f"data.class_names names the mask values 0, 1, 2, ... in order: if 0 is the "
            f"background in your masks, list {name!r} first ({', '.join(order)}); if the "
            f"background is stored as {i}, remap the masks so that it is 0."
        )
        raise LungsegError(
            f"{setting} lists {name!r} as class {i} ({', '.join(map(str, names))}), but class 0 "
            f"is the background: lungseg leaves it out of the mean Dice and IoU, the lesion "
            f"scores and post-processing, so {str(names[0])!r} would be scored as background "
            f"and {name!r} as a structure. {fix}"
        )


def _pairing_too(
    image_dir: Any, layers: Sequence[Path], suffixes: Any, recursive: Any, strict: Any
) -> str:
    """The pairing's own error, where the files have one, for the missing-palette error to
    give with it: fixing the one showed the other only on the next run (a new-user tester's
    Shenzhen set took three runs to start). "" where the pairing is fine or not checked."""
    if image_dir is None or strict is not True or not isinstance(recursive, bool):
        return ""
    try:
        masks = layers if len(layers) > 1 else layers[0]
        find_pairs(image_dir, masks, suffix_list(suffixes), True, recursive=recursive)
    except LungsegError as pairing:
        return f"\nThe files' pairing stops the run too: {pairing}"
    except (OSError, IndexError):  # a hint only: the folders' errors come from setup
        return ""
    return ""


def _masks_seen(folders: Sequence[Path], most: int = 8) -> str:
    """What the first mask files of ``folders`` hold, as the line that leads the error of
    data.mask_mode=palette (the default) without data.palette: the mode that fits them
    (found by a new-user tester whose 0/1 masks met a message that listed the modes only).
    "" where nothing can be read (the folder errors come later, from setup)."""
    try:
        return _masks_seen_in(folders, most)
    except (OSError, ValueError):  # a hint only: the error stays
        return ""


def _masks_seen_in(folders: Sequence[Path], most: int) -> str:
    files: list[Path] = []
    for folder in folders:
        if folder.is_dir():
            files += sorted(
                f
                for f in folder.iterdir()
                if f.suffix.lower() in IMAGE_EXTENSIONS and not f.name.startswith(".")
            )[:most]
    values: set[int] = set()
    colours: set[tuple[int, ...]] = set()
    read = []
    for path in files[:most]:
        try:
            mask = read_image(path)  # (H, W) or RGB, as training reads it
        except LungsegError:
            continue
        read.append(path)
        if mask.ndim == 3 and not all(np.array_equal(mask[..., 0], mask[..., c]) for c in (1, 2)):
            colours |= {
                tuple(int(v) for v in c) for c in np.unique(mask.reshape(-1, 3), axis=0)[:16]
            }
        else:
            values |= {int(v) for v in np.unique(mask if mask.ndim == 2 else mask[..., 0])}
    if not read:
        return ""
    where = f"{len(read)} mask files read in {read[0].parent} (e.g. {read[0].name})"
    if colours:
        shown = ", ".join(str(list(c)) for c in sorted(colours)[:6])
        return f"The {where} hold colours ({shown}): list them as data.palette, as below."
    shown = ", ".join(map(str, sorted(values)[:8])) + (", ..." if len(values) > 8 else "")
    if len(values) <= 2 and min(values) == 0:
        return (
            f"The {where} are grey with the values {shown}: black/white masks. "
            f"Use data.mask_mode=binary (0 is background, any other value foreground)."
        )
    if max(values) < 32:
        return f"The {where} are grey with the values {shown}: class ids. Use data.mask_mode=index."
    return f"The {where} are grey with the values {shown}."


def _parse_palette(
    palette: Mapping | Sequence | None, mask_mode: str, demo: bool
) -> tuple[list[str] | None, list[list[int]] | None]:
    """(class names or None, colours) from data.palette; decode_mask checks the colours."""
    if mask_mode != "palette":
        if palette is not None:
            raise LungsegError(
                f"data.palette is set but data.mask_mode is {mask_mode!r}, which ignores it. "
                f"Set data.mask_mode=palette if the masks are colour-coded, or remove "
                f"data.palette."
            )
        return None, None
    if palette is None:
        if demo:
            return list(DEMO_CLASSES), [list(c) for c in DEMO_PALETTE]
        raise LungsegError(
            "data.mask_mode=palette needs data.palette: the RGB colour of each class in class "
            "order, background first, e.g. on the command line "
            "'data.palette={background:[0,0,0],lung:[0,255,0],tumour:[255,0,0]}' or in the "
            "data config\n  palette:\n    background: "
            "[0, 0, 0]\n    lung: [0, 255, 0]\n    tumour: [255, 0, 0]\nFor masks that store "
            "class ids as gray values use data.mask_mode=index, for black/white masks binary."
        )
    if isinstance(palette, Mapping):
        return [str(n) for n in palette], list(palette.values())
    if isinstance(palette, list | tuple):
        return None, list(palette)
    if isinstance(palette, str) and palette.strip()[:1] in ("{", "["):
        raise LungsegError(
            f"data.palette is the text {palette!r}, not a mapping: quotes inside the override "
            f"made Hydra read it as a string. Quote the whole override once, for the shell: "
            f"'data.palette={palette.strip()}'."
        )
    raise LungsegError(
        f"data.palette is {palette!r}; write it as {{class_name: [r, g, b]}} in class order, "
        f"background first, e.g. {{background: [0, 0, 0], lung: [0, 255, 0]}}."
    )


def _fixed_num_classes(
    mask_mode: str, palette: list[list[int]] | None, num_classes: int | None
) -> int | None:
    """The class count the settings fix (None: index masks, counted in setup)."""
    if num_classes is not None and (not isinstance(num_classes, int) or num_classes < 2):
        raise LungsegError(
            f"data.num_classes is {num_classes!r}; it must be an integer >= 2 (background "
            f"plus at least one class) or null to infer it from the masks."
        )
    implied = {"palette": None if palette is None else len(palette), "binary": 2}.get(mask_mode)
    if num_classes is not None and implied is not None and num_classes != implied:
        source = "data.palette has" if mask_mode == "palette" else "data.mask_mode=binary has"
        raise LungsegError(
            f"data.num_classes is {num_classes} but {source} {implied} classes. Set "
            f"data.num_classes to {implied} or to null (inferred)."
        )
    return implied if implied is not None else num_classes


def _parse_size(image_size: int | Sequence[int]) -> tuple[int, int]:
    size = [image_size] * 2 if isinstance(image_size, int) else list(image_size)
    if len(size) != 2 or not all(isinstance(s, int) and s > 0 for s in size):
        raise LungsegError(
            f"data.image_size is {image_size!r}; it must be a positive integer (square) or "
            f"[height, width] in pixels, e.g. 128 or [128, 160]."
        )
    return size[0], size[1]


# Added to the split-by-file warnings for 2.5-D input (data.context_slices)
_CONTEXT_LEAK = (
    " With data.context_slices the leak is wider: a training slice's neighbours, stacked in "
    "as channels, may be validation or test images (their pixels, not their masks)."
)


def _name_id_pattern(numbers: int) -> str:
    """A group_pattern for the start of a name up to its ``numbers``-th number, where a
    separator (``-``, ``_``, ``.``) follows: PAT012 in PAT012_view1 (1), LIDC-IDRI-0001 in
    LIDC-IDRI-0001_nodule-1_slice-7 (1), BraTS20_Training_001 in
    BraTS20_Training_001_flair_slice_080 (2)."""
    return r"^(\D*?\d+" + r"\D+?\d+" * (numbers - 1) + r")(?=[-_.])"


def _shared_name_ids(names: Sequence[str]) -> tuple[str, dict[str, list[str]]] | None:
    """The group_pattern and the ids (id -> its files) where file names share an id
    (``PAT012_view1``, ``PAT012_view2``): the start of the name (its path below the data
    folder) up to its first number, or its second where the first gives fewer than 3 ids (a
    dataset's name, BraTS20_...; two sites); only where every name has one and some share it.
    Names whose ids are all distinct (``ID_0000_Z_0142``, ``demo_0001``, ``MCUCXR_0001_0``)
    or that have none (``JPCLN001``, UUIDs) give None."""
    for numbers in (1, 2):
        pattern = _name_id_pattern(numbers)
        found = [re.match(pattern, name) for name in names]
        if not all(found):
            continue  # the pattern would not fit every file
        ids: dict[str, list[str]] = {}
        for name, match in zip(names, found, strict=True):
            ids.setdefault(match.group(1), []).append(name)
        if len(ids) == len(names):
            return None  # every file its own id: nothing shared
        if len(ids) >= 3:
            return pattern, ids
    return None


def _failed_file(pair: Pair, error: Exception) -> str:
    """A pair that cannot be used, as the strict error lists it: by its image's name, and by
    its mask's where the error is the mask's (a corrupt mask, named by the image alone, sent
    the user to the image)."""
    name = f"{pair.stem}{pair.image.suffix}"
    mask = next((m for m in pair.masks if str(error).startswith(str(m))), None)
    return f"{name} (its mask {mask.name})" if mask is not None else name


# data.group_pattern's default: split by the id the file names share (_shared_name_ids), or
# by file where they share none
AUTO = "auto"


def _auto_group_pattern(names: Sequence[str]) -> str | None:
    """data.group_pattern=auto: the pattern of the id that file names share at their start
    (``_shared_name_ids``), said in the log, or None (a split by file; files in several
    sub-folders, whose names' ids may be finer than the folders' patients, are warned of by
    ``_check_folder_grouping`` instead)."""
    if len({name.rpartition("/")[0] for name in names}) > 1:
        return None  # sub-folders: mostly patients, but the names' ids may be finer
    shared_ids = _shared_name_ids(names)
    if shared_ids is None:
        return None
    pattern, ids = shared_ids
    log.info(
        "split by patient: the %d file names share %s at their start (%s), and "
        "data.group_pattern=auto keeps each id's files in one split "
        "(\"data.group_pattern='%s'\"; data.group_pattern=null splits by file)",
        len(names),
        counted(len(ids), "id"),
        _id_example(ids),
        pattern,
    )
    return pattern


def _id_example(ids: Mapping[str, list[str]]) -> str:
    """The id with the most files, for a message: "e.g. 3 files start with 'PAT000': PAT000_view0,
    PAT000_view1"."""
    example, files = max(ids.items(), key=lambda item: len(item[1]))
    return f"e.g. {len(files)} files start with {example!r}: {', '.join(files[:2])}"


def _check_name_grouping(names: Sequence[str], context: bool = False) -> bool:
    """Warn when file names share an id with others (``_shared_name_ids``) but the split
    takes each file on its own: such a shared start is mostly a patient or scan id, whose
    images must not be split between train and test. With ``context`` (2.5-D input) the
    warning also says that neighbours leak. Returns whether it warned."""
    shared_ids = _shared_name_ids(names)
    if shared_ids is None:
        return False
    pattern, ids = shared_ids
    shared = {i: files for i, files in ids.items() if len(files) > 1}
    log.warning(
        "%d of the %d files share an id at the start of their name with another (%s; %s), "
        "but data.group_pattern is null, so the split takes "
        "every file on its own and one id's images can land in train and test. If that id is "
        "a patient (or scan), split by it: on the command line \"data.group_pattern='%s'\" "
        "(the double quotes keep the shell's hands off it); the log then counts the patients "
        "of each split.%s",
        sum(len(f) for f in shared.values()),
        len(names),
        counted(len(ids), "id"),
        _id_example(shared),
        pattern,
        _CONTEXT_LEAK if context else "",
    )
    return True


def _check_group_ids(names: Sequence[str], group_pattern: str) -> None:
    """Warn when data.group_pattern gives every file an id of its own (it captured the slice
    or view number, ``slice(\\d+)``) while the names share one at their start: the split is
    then by file, as without a pattern."""
    ids = splits.patient_ids(names, group_pattern)
    shared_ids = _shared_name_ids(names)
    if len(set(ids.values())) < len(names) or shared_ids is None:
        return
    pattern, shared = shared_ids
    log.warning(
        "data.group_pattern %r gives each of the %d files an id of its own (e.g. %r for %s), "
        "so the split takes every file on its own, as without a pattern; yet the names share "
        "%s at their start (e.g. %s). If that is the patient, split by it: on the command line "
        "\"data.group_pattern='%s'\" (the first capture group is the patient id).",
        group_pattern,
        len(names),
        ids[names[0]],
        names[0],
        counted(len(shared), "id"),
        ", ".join(next(files for files in shared.values() if len(files) > 1)[:2]),
        pattern,
    )


def _check_folder_grouping(names: Sequence[str], context: bool = False) -> bool:
    """Warn when the files lie in several sub-folders (data.recursive) but the split takes
    each file on its own: sub-folders are mostly patients or scans, whose slices must not be
    split between train and test; for files in one folder, ``_check_name_grouping``.
    Returns whether it warned."""
    folders = {name.rpartition("/")[0] for name in names} - {""}
    if len(folders) < 2:
        return _check_name_grouping(names, context)
    log.warning(
        "The %d files lie in %d sub-folders, but data.group_pattern does not group them, so "
        "the split takes every file on its own and slices of one sub-folder can land in train "
        "and test. "
        "If each sub-folder holds one patient (or scan), split by it: on the command line "
        "\"data.group_pattern='^([^/]+)'\" (the first folder below data.image_dir, or the "
        "folder its first '*' matched, or the file itself when it lies directly in it; the "
        "double quotes keep the shell's hands off it).%s",
        len(names),
        len(folders),
        _CONTEXT_LEAK if context else "",
    )
    return True


def _check_bit_depths(depths: Mapping[str, tuple[int, int, bool]], normalize: str) -> None:
    """Warn where scaling by the type's range (8-bit / 255, 16-bit / 65535) puts images of
    one set on different scales: 8- and 16-bit images mixed, or 16-bit images that hold
    12-bit values (DICOM exports), which come out 16 times darker than the range allows.
    (Without a window: the caller's.) A 16-bit file whose values are 8-bit ones x 257 is
    scaled as its 8-bit file would be, so it counts as 8-bit here."""
    by_bits: dict[int, list[str]] = {}
    for name, (bits, _, widened) in depths.items():
        by_bits.setdefault(8 if widened else bits, []).append(name)
    largest = max(
        (top for bits, top, widened in depths.values() if bits == 16 and not widened),
        default=None,
    )
    if len(by_bits) > 1 and normalize != "image":
        log.warning(
            "The images mix %d 8-bit files (e.g. %s) and %d 16-bit files (e.g. %s, largest value "
            "%d): each is scaled by its type's range (/255, /65535), so the two kinds reach the "
            "network at different brightness%s. Give data.normalize=image (each image to zero "
            "mean and unit variance), or convert the images to one bit depth.",
            len(by_bits[8]),
            sorted(by_bits[8])[0],
            len(by_bits[16]),
            sorted(by_bits[16])[0],
            largest,
            f" (16-bit values up to {largest} fill {100 * largest / 65535:.0f} % of their range)"
            if largest is not None and largest < 65535 // 4
            else "",
        )
    elif largest is not None and largest < 65535 // 4 and normalize == "none":
        log.warning(
            "The 16-bit images hold values up to %d only (%.1f %% of the range they are scaled "
            "by, e.g. 12-bit CT or X-ray), and data.normalize=none leaves them at that scale. "
            "Give data.window=[0,%d], or data.normalize=dataset or image.",
            largest,
            100 * largest / 65535,
            largest,
        )


def _infer_num_classes(
    names: Sequence[str],
    full: Sequence[tuple[np.ndarray, np.ndarray]],
    ignore: int | None = None,
    files: Sequence[Path] = (),
) -> int:
    """The class count of index masks without data.num_classes: their largest value + 1,
    counted at each mask's own size (``full``: each mask's class ids and their pixel
    counts), before the resize to image_size can lose a small class. A LungsegError names
    the masks that hold the largest value when values below it occur in no mask (one stray
    value, e.g. 7 in 0/1 masks, classes coded as grey levels, 0/128/255, or Pascal VOC's 255
    border, would otherwise make an 8- or 256-class network), or ``ignore`` (data.ignore_index)
    where it is one of those values. ``files``: each mask's file (a palette PNG gets no grey
    palette)."""
    counts = np.zeros(256, np.int64)
    for ids, pixels in full:
        counts[ids] += pixels
    values = np.flatnonzero(counts)
    largest = int(values.max()) if values.size else 0
    if values.size > _MANY_CLASSES:
        most = max(range(len(names)), key=lambda i: len(full[i][0]))
        ends = counts[values[0]] + counts[largest]
        if ends >= _ENDS_SHARE * counts.sum():  # black and white, values between on edges
            raise LungsegError(
                f"The masks hold {values.size} different values, but "
                f"{100 * ends / counts.sum():.0f} % of their pixels are {values[0]} or "
                f"{largest} ({names[most]} alone {len(full[most][0])} values): black/white "
                f"masks with soft edges (anti-aliased, resized or lossy), which "
                f"data.mask_mode=index would read as {largest + 1} classes. Set "
                f"data.mask_mode=binary, which cuts such edges halfway."
            )
        raise LungsegError(
            f"The masks hold {values.size} different values ({_ranges(values.tolist())}; "
            f"{names[most]} alone {len(full[most][0])}), so {largest + 1} classes would be "
            f"trained: they look like images, not class ids. Check that data.mask_dir is the "
            f"folder of the masks and data.image_dir that of the images (not swapped). For "
            f"index masks of that many classes give data.num_classes."
        )
    missing = [v for v in range(1, largest) if counts[v] == 0]
    if not missing:
        return max(2, largest + 1)
    holders = [i for i, (ids, _) in enumerate(full) if largest in ids]
    listed = _listed([names[i] for i in holders])
    held = f"{counts[largest]} pixels, in {len(holders)} masks: {listed}"
    shown = ", ".join(str(v) for v in values[:10].tolist())
    if values.size > 10:
        shown += f", ... ({values.size} values in total)"
    if ignore in missing:
        raise LungsegError(
            f"data.ignore_index={ignore} takes the value {ignore} out of the classes, but the "
            f"masks hold class values above it ({largest}: {held}; the masks hold the values "
            f"{shown} besides {ignore}), and class ids must run 0, 1, 2, ... without a gap. "
            f"Choose an ignore value above every class id (the value the masks store for "
            f"unlabelled pixels, above {largest}), or data.ignore_index=null if {ignore} is a "
            f"class."
        )
    unlabelled = (
        f"if {largest} marks pixels to leave out of training and scoring (unlabelled, a "
        f"border), set data.ignore_index={largest}"
    )
    # Pascal VOC: class ids 0..K and the type's top value, its border of unlabelled pixels
    if largest == 255 and values[:-1].tolist() == list(range(values.size - 1)):
        raise LungsegError(
            f"The masks hold the class ids {_ranges(values[:-1].tolist())} and the value "
            f"{largest} ({held}): {unlabelled}. Otherwise {largest + 1} classes would be "
            f"trained, the values {_ranges(missing)} in no mask: if {largest} is a stray value, "
            f"fix those masks; if the classes are right, give data.num_classes={largest + 1} "
            f"(and data.class_names)."
        )
    grey = ""
    if not files or palette_indices(files[holders[0]]) is None:  # a palette PNG's has colours
        # the levels themselves where they look like grey-coded classes (spread over 0-255)
        spread = values.size <= 10 and largest >= 128
        levels = (
            f"data.palette={grey_palette(values)}"
            if spread
            else "one grey colour a level, e.g. data.palette=[[0,0,0],[128,128,128],[255,255,255]]"
            " for 0/128/255"
        )
        grey = (
            "If the values code classes as grey levels, set data.mask_mode=palette with a grey "
            f"palette, class i the i-th level: {levels}. "
        )
    raise LungsegError(
        f"The masks' largest class value is {largest} ({held}), so {largest + 1} classes would "
        f"be trained, but the values {_ranges(missing)} occur in no mask; the masks hold the "
        f"values {shown}. If the classes are right, give data.num_classes={largest + 1} (and "
        f"data.class_names). {grey}For black/white or JPEG masks set data.mask_mode=binary. "
        f"If {largest} is a stray value, fix those masks; {unlabelled}."
    )


def _check_ignore(
    ignore: int | tuple[int, int, int] | None,
    mask_mode: str,
    palette: list[list[int]] | None,
    num_classes: int | None,
    soft_masks: bool,
) -> None:
    """LungsegError where data.ignore_index (``masks.ignore_value``'s) cannot be told from
    the classes: a class id (index masks), a colour of data.palette, or more classes than
    fit below ``masks.IGNORE``; or where it comes with soft masks, which have no ignore
    label."""
    if ignore is None:
        return
    if soft_masks:
        raise LungsegError(
            "data.ignore_index is set together with data.soft_masks=true, whose class fractions "
            "have no place for ignored pixels. Set one of them (data.soft_masks=false or "
            "data.ignore_index=null)."
        )
    if palette is not None and list(ignore) in [list(c) for c in palette]:
        raise LungsegError(
            f"data.ignore_index is {list(ignore)}, a colour of data.palette (class "
            f"{[list(c) for c in palette].index(list(ignore))}). Give the colour of the "
            "pixels to leave out, which no class has."
        )
    if num_classes is not None and num_classes > IGNORE:
        raise LungsegError(
            f"data.num_classes is {num_classes}, but with data.ignore_index set lungseg holds "
            f"at most {IGNORE} classes. Set data.ignore_index=null, or use fewer classes."
        )
    if mask_mode == "index" and num_classes is not None and ignore < num_classes:
        raise LungsegError(
            f"data.ignore_index is {ignore}, a class id of the {num_classes} classes "
            f"(data.num_classes). The ignore label must be above every class id: give its "
            f"stored value (e.g. 255), or a smaller data.num_classes."
        )


def _plain_ignore(ignore: int | tuple[int, int, int]) -> int | list[int]:
    return list(ignore) if isinstance(ignore, tuple) else int(ignore)


def _held_classes(mask: np.ndarray, num_classes: int) -> np.ndarray:
    """(num_classes,) bool: the classes a (H, W) class-id mask holds a pixel of, or a
    (H, W, K) soft mask a fraction of."""
    if mask.ndim == 3:
        return mask.reshape(-1, mask.shape[2]).any(axis=0)[:num_classes]
    return np.bincount(mask.ravel(), minlength=num_classes)[:num_classes] > 0


def _listed(names: Sequence[str]) -> str:
    """The first _SHOW names, ", ..." after them when there are more."""
    return ", ".join(names[:_SHOW]) + (", ..." if len(names) > _SHOW else "")


def _ranges(values: Sequence[int]) -> str:
    """[2, 3, 4, 6] -> "2-4, 6"."""
    runs: list[list[int]] = []
    for v in values:
        if runs and v == runs[-1][-1] + 1:
            runs[-1].append(v)
        else:
            runs.append([v])
    return ", ".join(f"{r[0]}-{r[-1]}" if len(r) > 1 else str(r[0]) for r in runs)


def _channel_stats(
    images: list[np.ndarray], window: list[float] | None
) -> tuple[list[float], list[float]]:
    """Per-channel mean and std over (H, W, C) float32 images in [0, 1], pooled over pixels."""
    if not images:
        raise LungsegError(
            "data.normalize=dataset needs training images for its mean and std, but the train "
            "split is empty. Give data.split a train fraction > 0, e.g. [0.6, 0.2, 0.2] (or "
            "list train files in data.split_file): training needs them with any data.normalize."
        )
    n = sum(im.shape[0] * im.shape[1] for im in images)
    mean = sum(im.sum(axis=(0, 1), dtype=np.float64) for im in images) / n
    var = sum(np.square(im - mean).sum(axis=(0, 1)) for im in images) / n
    std = np.sqrt(var)
    if (std == 0).any():
        channel = int(np.argmin(std))
        raise LungsegError(
            f"Channel {channel} of every training image has the same value {mean[channel]:.3g} "
            f"after intensity scaling (data.window={window}), so it cannot be normalised. "
            f"Check the images, and that data.window and data.intensity_offset match their "
            f"raw values (everything outside the window is clipped to one value)."
        )
    return [float(v) for v in mean], [float(v) for v in std]
