"""Image and mask transforms: intensity scaling, resizing, denoising, normalisation, augmentation.

Images are numpy arrays (H, W, C) as read from disk (uint8, uint16 or float32) until
``scale_intensity`` turns them into float32 in [0, 1]; masks are (H, W) uint8 class ids.

Training (SegDataModule) and prediction (lungseg.inference) prepare images with the same two
steps, so they cannot drift apart: ``preprocess`` (once per file; cached in training), then, after
any augmentation, ``normalize``. Both read their settings from a ``data_info`` mapping, the one
saved in every checkpoint.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence
from pathlib import Path

import albumentations as A
import cv2
import hydra.utils
import numpy as np

from lungseg.data.folders import to_channels
from lungseg.errors import LungsegError

NORMALIZE_MODES = ("dataset", "image", "none")
_MIN_STD = 1e-6  # per-image z-score of a constant image: avoid dividing by zero
_CV_MAX_CHANNELS = 4  # the most cv2.resize's INTER_AREA takes at a non-integer factor


def scale_intensity(
    image: np.ndarray, window: Sequence[float] | None = None, offset: float = 0.0
) -> np.ndarray:
    """Map raw intensities to float32 in [0, 1], same shape.

    Without ``window``: uint8 / 255, uint16 / 65535; float input is returned as float32,
    unchanged. With ``window = [lo, hi]``: ``clip(raw - offset, lo, hi)`` mapped linearly to
    [0, 1]; e.g. CT stored as HU + 32768 in uint16 with offset 32768 and window [-1000, 400].
    """
    if window is None:
        if offset != 0:
            raise LungsegError(
                f"data.intensity_offset is {offset} but data.window is not set; the offset is "
                f"subtracted only before windowing. Set data.window (e.g. [-1000, 400] for "
                f"lung CT in HU) or set data.intensity_offset to 0."
            )
        if np.issubdtype(image.dtype, np.floating):
            return image.astype(np.float32, copy=False)
        if image.dtype in (np.uint8, np.uint16):
            return image.astype(np.float32) / np.iinfo(image.dtype).max
        raise LungsegError(
            f"Images of dtype {image.dtype} have no natural intensity range. Set data.window "
            f"to the [low, high] raw values to map to [0, 1] (after subtracting "
            f"data.intensity_offset)."
        )
    lo, hi = _check_window(window)
    image = image.astype(np.float32) - np.float32(offset)
    return (np.clip(image, lo, hi) - np.float32(lo)) / np.float32(hi - lo)


def flat_images_warning(
    flat: Mapping[str, tuple[float, float]],
    total: int,
    window: Sequence[float] | None,
    offset: float,
) -> str | None:
    """The warning for images that reach the network as one flat value (``flat``: file name
    -> its stored values' (lowest, highest)), of ``total`` images; None where there are
    none. The file holds one value (a blank image); or, with ``window``, every stored value
    lies outside the window once ``offset`` is taken off, most often files saved with another
    offset (raw DICOM values are CT + 1024), whose pixels all clip to black or white without a
    word; or the few other values were lost to the resize and median blur."""
    if not flat:
        return None
    blank, clipped, smoothed = [], [], []
    for name, (low, high) in flat.items():
        if low == high:
            blank.append(name)
        elif window is not None and outside_window(low, high, window, offset):
            clipped.append(name)
        else:
            smoothed.append(name)
    parts = []
    if clipped:
        low, high = flat[clipped[0]]
        parts.append(
            f"{_with_verb(len(clipped), 'lies', 'lie')} wholly outside data.window={list(window)} "
            f"(e.g. {clipped[0]}: stored values {low:g} to {high:g}, {low - offset:g} to "
            f"{high - offset:g} after data.intensity_offset={offset:g}). Check the offset they "
            f"were saved with (raw DICOM values are often CT + 1024, lungseg's own 16-bit CT "
            f"exports CT + 32768): data.intensity_offset must bring every file's stored values "
            f"to the window's units, so convert these files to the others' offset or leave "
            f"them out"
        )
    if blank:
        parts.append(
            f"{_with_verb(len(blank), 'holds', 'hold')} one value in the file itself (e.g. "
            f"{blank[0]}: all {flat[blank[0]][0]:g}): blank images, which show the network "
            f"nothing; leave them out unless they are meant as blank slices"
        )
    if smoothed:
        parts.append(
            f"{_with_verb(len(smoothed), 'loses', 'lose')} its few other values to the resize to "
            f"data.image_size and the median blur (e.g. {smoothed[0]})"
        )
    return (
        f"{len(flat)} of the {total} images reach the network as one flat grey: "
        + "; ".join(parts)
        + "."
    )


def _with_verb(n: int, singular: str, plural: str) -> str:
    """ "1 lies", "2 lie": a count and its verb."""
    return f"{n} {singular if n == 1 else plural}"


def outside_window(low: float, high: float, window: Sequence[float], offset: float) -> bool:
    """Whether stored values from ``low`` to ``high`` all lie outside ``window`` once
    ``offset`` is taken off (all clip to its low or its high end)."""
    lo, hi = (float(v) for v in window)
    return high - offset <= lo or low - offset >= hi


def is_flat(image: np.ndarray) -> bool:
    """Whether an image holds one value (after ``scale_intensity``: nothing to see)."""
    return image.size > 0 and bool(image.min() == image.max())


def _check_window(window: Sequence[float]) -> tuple[float, float]:
    try:
        lo, hi = (float(v) for v in window)
    except (TypeError, ValueError):
        lo = hi = 0.0
    if not lo < hi:
        raise LungsegError(
            f"data.window is {window!r}, but it must be two numbers [low, high] with "
            f"low < high, in raw units after subtracting data.intensity_offset, e.g. "
            f"[-1000, 400] for lung CT in HU."
        )
    return lo, hi


def resize_image(image: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Resize (H, W) or (H, W, C) to ``size = (height, width)``; same dtype and channel count.

    INTER_AREA when shrinking (averages instead of aliasing), INTER_LINEAR when enlarging.
    """
    height, width = size
    if image.shape[:2] == (height, width):
        return image
    shrink = height <= image.shape[0] and width <= image.shape[1]
    interpolation = cv2.INTER_AREA if shrink else cv2.INTER_LINEAR
    try:
        resized = cv2.resize(image, (width, height), interpolation=interpolation)
    except cv2.error:
        # INTER_AREA takes more than 4 channels only at whole-number factors (OpenCV's fast
        # path, whose test is its own floating-point one), e.g. not a 5-class soft mask from 48
        # to 32 px. It works channel by channel, so resize 4 at a time; where one call works
        # it is kept, as groups can round differently from it.
        if image.ndim < 3 or image.shape[2] <= _CV_MAX_CHANNELS:
            raise
        groups = range(0, image.shape[2], _CV_MAX_CHANNELS)
        resized = np.concatenate(
            [resize_image(image[..., i : i + _CV_MAX_CHANNELS], size) for i in groups], axis=2
        )
    # cv2 drops a trailing channel axis of length 1
    return resized.reshape(height, width, *image.shape[2:])


def resize_mask(mask: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Resize an (H, W) class-id mask to ``size = (height, width)`` by nearest neighbour.

    INTER_NEAREST_EXACT samples pixel centres like INTER_AREA/INTER_LINEAR do for the image;
    plain INTER_NEAREST shifts the mask by up to half a pixel against the image.
    """
    height, width = size
    if mask.shape[:2] == (height, width):
        return mask
    return cv2.resize(mask, (width, height), interpolation=cv2.INTER_NEAREST_EXACT)


SOFT_SCALE = 255  # soft masks are cached as uint8 class fractions x 255: a quarter of float32


def soft_mask(mask: np.ndarray, num_classes: int, size: tuple[int, int]) -> np.ndarray:
    """An (H, W) class-id mask as (height, width, num_classes) class fractions at ``size``,
    uint8 in units of 1/255 (``soft_target`` makes them float): its one-hot encoding resized
    like the image (``resize_image``: area averaging when shrinking), so a pixel on a boundary
    keeps the share of each class it covers.

    A nearest-neighbour mask moves every boundary to the network's pixel grid: at 160 px a
    perfect prediction of a 512-px lung mask, resized back, scores Dice 0.991; its class
    fractions (the probabilities a perfect network would give) score 0.998 (lung_ct).
    """
    onehot = (mask[..., None] == np.arange(num_classes, dtype=mask.dtype)).astype(np.float32)
    fractions = resize_image(onehot, size)
    return np.rint(fractions * SOFT_SCALE).astype(np.uint8)


def soft_target(soft: np.ndarray) -> np.ndarray:
    """float32 (H, W, K) class fractions from a (possibly augmented) ``soft_mask``, each pixel
    summing to 1: values clipped to [0, 1], sums above 1 (rounding) scaled down, and what is
    missing (an augmentation fills what it moves in from outside with 0 in every channel)
    added to class 0, the background."""
    target = np.clip(soft.reshape(*soft.shape[:2], -1).astype(np.float32) / SOFT_SCALE, 0, 1)
    total = target.sum(axis=-1, keepdims=True)
    target /= np.maximum(total, 1)
    target[..., 0] += 1 - np.minimum(total[..., 0], 1)
    return target


def hard_mask(soft: np.ndarray) -> np.ndarray:
    """(H, W) uint8 class ids, the largest fraction of a (H, W, K) soft mask per pixel. A tie (a
    pixel half lung, half background) goes to the higher class on one colour of a checkerboard
    and to the lower on the other, so that neither side of a boundary gains area."""
    nudged = soft.astype(np.float32) + _tie_break(*soft.shape)
    return nudged.argmax(axis=-1).astype(np.uint8)


@functools.lru_cache(maxsize=8)
def _tie_break(h: int, w: int, k: int) -> np.ndarray:
    """hard_mask's (h, w, k) nudge: +-1e-4 x class id on a checkerboard, made once per shape
    (hard_mask runs for every training item)."""
    checker = np.where((np.arange(h)[:, None] + np.arange(w)) % 2 == 0, 1e-4, -1e-4)
    return (checker[..., None] * np.arange(k)).astype(np.float32)


def soft_mask_augmentation(compose: A.BaseCompose) -> A.BaseCompose:
    """Let ``compose``'s geometric transforms interpolate masks linearly (for soft masks,
    ``soft_mask``): every transform with a ``mask_interpolation`` (Affine, Rotate,
    ShiftScaleRotate, ...; albumentations' default is nearest neighbour) gets INTER_LINEAR,
    in nested composes too. Returns ``compose``, changed in place."""
    for transform in compose.transforms:
        if isinstance(transform, A.BaseCompose):
            soft_mask_augmentation(transform)
        elif hasattr(transform, "mask_interpolation"):
            transform.mask_interpolation = cv2.INTER_LINEAR
    return compose


def fill_masks_with(compose: A.BaseCompose, value: int) -> A.BaseCompose:
    """Let ``compose``'s transforms fill the masks' pixels that they move in from outside the
    image (Affine, Rotate, ShiftScaleRotate, PadIfNeeded, ... with a constant border) with
    ``value`` (the ignore label: nothing is known there) instead of albumentations' default 0,
    the background; a transform given another ``fill_mask`` than 0 keeps it. In nested
    composes too. Returns ``compose``, changed in place."""
    for transform in compose.transforms:
        if isinstance(transform, A.BaseCompose):
            fill_masks_with(transform, value)
        elif getattr(transform, "fill_mask", None) == 0:
            transform.fill_mask = value
    return compose


def median_blur(image: np.ndarray, ksize: int) -> np.ndarray:
    """Median filter each channel of an (H, W, C) image with an odd ``ksize``; 0 or 1 = off.

    OpenCV filters uint8 with any odd size, uint16 and float32 only with 3 or 5.
    """
    if ksize in (0, 1):
        return image
    if not isinstance(ksize, int) or ksize < 3 or ksize % 2 == 0:
        raise LungsegError(
            f"data.median_blur is {ksize!r}, but it must be 0 (off) or an odd kernel size "
            f"in pixels, e.g. 3 or 5."
        )
    if image.dtype != np.uint8 and ksize > 5:
        raise LungsegError(
            f"data.median_blur is {ksize}, but OpenCV's median filter supports kernel sizes "
            f"above 5 only for 8-bit images and these images are {image.dtype}. Use "
            f"data.median_blur 3 or 5, or convert the images to 8 bits."
        )
    channels = [
        cv2.medianBlur(np.ascontiguousarray(image[..., c]), ksize) for c in range(image.shape[2])
    ]
    return np.stack(channels, axis=-1)


def normalize_image(
    image: np.ndarray,
    mode: str,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
) -> np.ndarray:
    """Normalise an (H, W, C) float32 image in [0, 1], or an (N, H, W, C) batch of them;
    returns float32 of the same shape.

    "dataset": ``(x - mean[c]) / std[c]`` with the train split's per-channel statistics;
    "image": per-image, per-channel z-score; "none": unchanged.
    """
    if mode == "dataset":
        return (image - np.float32(mean)) / np.float32(std)
    if mode == "image":
        pixels = (-3, -2)  # height and width, of each image of a batch too
        image_mean = image.mean(axis=pixels, dtype=np.float64, keepdims=True)
        image_std = image.std(axis=pixels, dtype=np.float64, keepdims=True)
        image_std = np.maximum(image_std, _MIN_STD)
        return ((image - image_mean) / image_std).astype(np.float32)
    assert mode == "none", mode
    return image


def preprocess(raw: np.ndarray, info: Mapping, path: Path | None = None) -> np.ndarray:
    """A ``read_image`` result ((H, W) or (H, W, 3), any size and dtype) → float32
    (image_size[0], image_size[1], in_channels) in [0, 1]: to_channels → resize_image →
    median_blur → scale_intensity, with ``info``'s in_channels, image_size, median_blur, window
    and intensity_offset. ``path`` only names the file in error messages."""
    image = to_channels(raw, info["in_channels"], path)
    image = resize_image(image, tuple(info["image_size"]))
    image = median_blur(image, info["median_blur"])
    return scale_intensity(image, info["window"], info["intensity_offset"])


def normalize(image: np.ndarray, info: Mapping) -> np.ndarray:
    """The last step before the network, after augmentation: ``normalize_image`` with
    ``info``'s normalize, mean and std. (H, W, C) or (N, H, W, C) float32, shape kept."""
    return normalize_image(image, info["normalize"], info["mean"], info["std"])


def build_augmentation(specs: Sequence[Mapping] | None) -> A.Compose:
    """An albumentations Compose from specs like ``{"_target_": "albumentations.Rotate"}``.

    Each entry is built with ``hydra.utils.instantiate`` (an entry that already is an
    albumentations transform is used as is); None or [] gives a Compose that
    returns its input unchanged. Apply it as ``compose(image=image, mask=mask)`` so that
    geometric transforms move image and mask together.
    """
    transforms = []
    for i, spec in enumerate(specs or []):
        if isinstance(spec, A.BasicTransform | A.BaseCompose):  # already built by a caller
            transforms.append(spec)
            continue
        target = spec.get("_target_") if isinstance(spec, Mapping) else None
        if target is None:
            raise LungsegError(
                f"Augmentation entry {i} is {spec!r}, but each entry must be a mapping with a "
                f"'_target_', e.g. {{_target_: albumentations.HorizontalFlip, p: 0.5}}."
            )
        try:
            transform = hydra.utils.instantiate(dict(spec), _convert_="all")
        except Exception as e:
            raise LungsegError(
                f"Augmentation entry {i} ({target}) could not be built: {e}. Check the class "
                f"name (e.g. albumentations.HorizontalFlip) and its arguments in the "
                f"albumentations documentation."
            ) from None
        if not isinstance(transform, A.BasicTransform | A.BaseCompose):
            raise LungsegError(
                f"Augmentation entry {i} ({target}) built a {type(transform).__name__}, not an "
                f"albumentations transform. Use a class from albumentations, e.g. "
                f"albumentations.Rotate."
            )
        transforms.append(transform)
    return A.Compose(transforms)
