"""Augmentation of whole training batches on the training device (``augmentation=device``).

albumentations augments one image at a time in the DataLoader's processes, on the CPU. On a
GPU that feeds at most what the CPU cores can augment (about 1,000 images/s at 256 px with four
workers), less than the GPU trains. ``BatchAugment`` does the usual geometric and intensity
augmentation to a batch after it reaches the device, in a few batched tensor operations
(``affine_grid`` + ``grid_sample``), so that the loader only indexes cached arrays.

Per image, each with its own probability, as albumentations' HorizontalFlip, VerticalFlip,
Affine (about the centre, border filled with 0, images bilinear, masks nearest with what moves
in from outside filled with ``mask_fill`` (the ignore label when data.ignore_index is set),
soft masks bilinear with what moves in from outside counted as background) and
RandomBrightnessContrast (``x * (1 + c) + b``, then clipped to [0, 1]) would, on the images'
[0, 1] intensities before normalisation, which follows here. Random numbers come from torch's
CPU generator, which the DataModule reseeds every epoch, so runs stay reproducible and
resumable.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F

from lungseg.data.transforms import NORMALIZE_MODES
from lungseg.errors import LungsegError

_MIN_STD = 1e-6  # as transforms.normalize_image's per-image z-score
_KEYS = {"hflip", "vflip", "affine", "brightness_contrast"}
_AFFINE = {"p", "scale", "translate", "rotate"}
_INTENSITY = {"p", "brightness", "contrast"}


class BatchAugment:
    """Augment and normalise a training batch on its device: ``augment(batch) -> batch``.

    settings: ``{"hflip": p, "vflip": p, "affine": {"p", "scale": [lo, hi], "translate":
    fraction of the size, "rotate": degrees}, "brightness_contrast": {"p", "brightness",
    "contrast"}}`` (any may be left out); translate, rotate, brightness and contrast are a
    number v (drawn from [-v, v]) or a range [lo, hi], as in albumentations; one scale is drawn
    for both axes. ``image_info``: the DataModule's normalize, mean and std. The batch holds
    ``image`` (N, C, H, W) in [0, 1], ``mask`` (N, H, W) class ids and, with soft masks,
    ``target`` (N, K, H, W) class fractions; they come back in their own dtypes.
    ``mask_fill``: the class id of mask pixels moved in from outside the image.
    """

    def __init__(
        self, settings: Mapping[str, Any], image_info: Mapping[str, Any], mask_fill: int = 0
    ):
        settings = dict(settings or {})
        unknown = set(settings) - _KEYS
        if unknown:
            raise LungsegError(
                f"augmentation.device has {sorted(unknown)}; it takes {sorted(_KEYS)}, e.g. "
                f"{{hflip: 0.5, affine: {{p: 0.5, scale: [0.9, 1.1], translate: 0.05, "
                f"rotate: 10}}, brightness_contrast: {{p: 0.5, brightness: 0.1, contrast: 0.1}}}}."
            )
        self.hflip = _probability(settings.get("hflip", 0.0), "hflip")
        self.vflip = _probability(settings.get("vflip", 0.0), "vflip")
        affine = _section(settings.get("affine"), _AFFINE, "affine")
        self.affine_p = _probability(affine.get("p", 0.0), "affine.p")
        self.scale = _range(affine.get("scale", [1.0, 1.0]), "affine.scale", "[0.9, 1.1]")
        if self.scale[0] <= 0:
            raise LungsegError(
                f"augmentation.device.affine.scale is {list(self.scale)}; scales must be "
                f"positive, e.g. [0.9, 1.1]."
            )
        self.translate = _range(affine.get("translate", 0.0), "affine.translate", "0.05")
        self.rotate = _range(affine.get("rotate", 0.0), "affine.rotate", "10 (degrees)")
        intensity = _section(settings.get("brightness_contrast"), _INTENSITY, "brightness_contrast")
        self.intensity_p = _probability(intensity.get("p", 0.0), "brightness_contrast.p")
        self.brightness = _range(
            intensity.get("brightness", 0.0), "brightness_contrast.brightness", "0.1"
        )
        self.contrast = _range(
            intensity.get("contrast", 0.0), "brightness_contrast.contrast", "0.1"
        )
        if image_info["normalize"] not in NORMALIZE_MODES:
            raise LungsegError(f"normalize is {image_info['normalize']!r}")
        self.info = dict(image_info)
        self.mask_fill = mask_fill
        self._stats: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}

    def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
        image = batch["image"]
        n, _, h, w = image.shape
        # Every random number of the batch is drawn on the CPU first (the generator the
        # DataModule reseeds), then sent to the device in one copy.
        theta, moves = self._theta(n, h, w)
        alpha, beta, brightens = self._intensity_params(n)
        params = torch.cat([theta.reshape(n, 6), alpha[:, None], beta[:, None]], dim=1)
        params = params.to(image.device, non_blocking=True)
        theta, alpha, beta = params[:, :6].view(n, 2, 3), params[:, 6], params[:, 7]
        out = dict(batch)
        x = image.float()  # float32 maths whatever the batch's dtype (e.g. bf16-true)
        if moves:
            grid = F.affine_grid(theta, [n, 1, h, w], align_corners=False)
            x = F.grid_sample(x, grid, "bilinear", "zeros", align_corners=False)
            if "target" in batch:
                target = batch["target"].float()
                target = F.grid_sample(target, grid, "bilinear", "zeros", align_corners=False)
                target = target.clamp(0, 1)
                total = target.sum(dim=1, keepdim=True)
                target = target / total.clamp(min=1)
                target[:, :1] += 1 - total.clamp(max=1)  # moved in from outside: background
                out["target"] = target.to(batch["target"].dtype)
                out["mask"] = hard_mask(target).to(batch["mask"].dtype)
            else:
                # shifted so that the zeros padding becomes mask_fill (exact in float32)
                mask = batch["mask"][:, None].float() - self.mask_fill
                mask = F.grid_sample(mask, grid, "nearest", "zeros", align_corners=False)
                out["mask"] = (mask[:, 0] + self.mask_fill).round().to(batch["mask"].dtype)
        if brightens:
            x = (x * alpha.view(n, 1, 1, 1) + beta.view(n, 1, 1, 1)).clamp(0, 1)
        out["image"] = self.normalize(x).to(image.dtype)
        return out

    def normalize(self, image: torch.Tensor) -> torch.Tensor:
        """``normalize`` of an (N, C, H, W) batch of [0, 1] intensities, with the dataset's
        mean and std copied to the device once."""
        if self.info["normalize"] == "dataset" and image.device not in self._stats:
            self._stats[image.device] = _dataset_stats(self.info, image.device)
        return normalize(image, self.info, self._stats.get(image.device))

    def _theta(self, n: int, h: int, w: int) -> tuple[torch.Tensor, bool]:
        """(N, 2, 3) affine_grid matrices (output → input, normalised coordinates) of each
        image's flips and affine, and whether any image of the batch moves."""
        flip_x = torch.where(torch.rand(n) < self.hflip, -1.0, 1.0)
        flip_y = torch.where(torch.rand(n) < self.vflip, -1.0, 1.0)
        moved = torch.rand(n) < self.affine_p
        scale = torch.empty(n).uniform_(*self.scale)
        angle = torch.empty(n).uniform_(*self.rotate) * math.pi / 180
        shift = torch.stack(
            [torch.empty(n).uniform_(*self.translate), torch.empty(n).uniform_(*self.translate)],
            dim=1,
        )
        moves = bool(moved.any() or (flip_x < 0).any() or (flip_y < 0).any())
        scale = torch.where(moved, scale, 1.0)
        angle = torch.where(moved, angle, 0.0)
        shift = torch.where(moved[:, None], shift, 0.0)
        # Forward map in pixels about the centre: out = S R F in + t, with t in pixels.
        cos, sin = torch.cos(angle), torch.sin(angle)
        forward = torch.zeros(n, 2, 2)
        forward[:, 0, 0], forward[:, 0, 1] = cos * scale, -sin * scale
        forward[:, 1, 0], forward[:, 1, 1] = sin * scale, cos * scale
        forward = forward * torch.stack([flip_x, flip_y], dim=1)[:, None, :]  # flip first
        half = torch.tensor([w / 2, h / 2])
        t = shift * torch.tensor([w, h])
        inverse = torch.linalg.inv(forward)
        # in = F^-1 (out - t); in normalised coordinates u = x / half (pixels from the centre)
        theta = torch.zeros(n, 2, 3)
        theta[:, :, :2] = inverse * half[None, None, :] / half[None, :, None]
        theta[:, :, 2] = -(inverse @ t[:, :, None])[:, :, 0] / half
        return theta, moves

    def _intensity_params(self, n: int) -> tuple[torch.Tensor, torch.Tensor, bool]:
        """Each image's contrast factor and brightness shift (1 and 0 where not drawn), and
        whether any image of the batch is changed."""
        chosen = torch.rand(n) < self.intensity_p
        alpha = 1 + torch.empty(n).uniform_(*self.contrast)
        beta = torch.empty(n).uniform_(*self.brightness)
        return torch.where(chosen, alpha, 1.0), torch.where(chosen, beta, 0.0), bool(chosen.any())


def normalize(
    image: torch.Tensor,
    info: Mapping[str, Any],
    stats: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:
    """``transforms.normalize_image`` on an (N, C, H, W) tensor of [0, 1] intensities;
    ``stats``: the dataset's mean and std already on the device (``_dataset_stats``)."""
    mode = info["normalize"]
    if mode == "dataset":
        mean, std = stats if stats is not None else _dataset_stats(info, image.device)
        return (image - mean) / std
    if mode == "image":
        mean = image.mean(dim=(2, 3), keepdim=True)
        std = image.std(dim=(2, 3), keepdim=True, unbiased=False).clamp(min=_MIN_STD)
        return (image - mean) / std
    return image


def _dataset_stats(info: Mapping[str, Any], device: torch.device) -> tuple[torch.Tensor, ...]:
    """The dataset's per-channel mean and std as (1, C, 1, 1) float32 tensors on ``device``."""
    return tuple(
        torch.tensor(info[k], dtype=torch.float32).view(1, -1, 1, 1).to(device)
        for k in ("mean", "std")
    )


def hard_mask(target: torch.Tensor) -> torch.Tensor:
    """``transforms.hard_mask`` of (N, K, H, W) fractions: (N, H, W) int64 class ids, ties
    alternating between the classes on a checkerboard."""
    _, k, h, w = target.shape
    rows = torch.arange(h, device=target.device)[:, None]
    cols = torch.arange(w, device=target.device)
    checker = torch.where((rows + cols) % 2 == 0, 1e-4, -1e-4)
    classes = torch.arange(k, device=target.device, dtype=target.dtype).view(1, k, 1, 1)
    return (target + checker * classes).argmax(dim=1)


def _probability(value: Any, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 <= value <= 1:
        raise LungsegError(
            f"augmentation.device.{name} is {value!r}; give a probability between 0 and 1."
        )
    return float(value)


def _range(value: Any, name: str, example: str) -> tuple[float, float]:
    """A number v >= 0 as (-v, v), or [lo, hi] with lo <= hi as (lo, hi)."""

    def number(v: Any) -> bool:
        return isinstance(v, int | float) and not isinstance(v, bool)

    if number(value) and value >= 0:
        return -float(value), float(value)
    pair = isinstance(value, Sequence) and len(value) == 2 and all(number(v) for v in value)
    if pair and value[0] <= value[1]:
        return float(value[0]), float(value[1])
    raise LungsegError(
        f"augmentation.device.{name} is {value!r}; give a number v >= 0 (drawn from [-v, v]) "
        f"or a range [low, high] with low <= high, e.g. {example}."
    )


def _section(value: Any, keys: set[str], name: str) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, Mapping) or set(value) - keys:
        raise LungsegError(
            f"augmentation.device.{name} is {value!r}; give a mapping with keys from "
            f"{sorted(keys)}."
        )
    return dict(value)


def check_settings(settings: Sequence | Mapping | None) -> None:
    """Raise LungsegError for device settings ``BatchAugment`` would refuse."""
    BatchAugment(settings or {}, {"normalize": "none"})
