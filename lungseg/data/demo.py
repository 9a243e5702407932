"""The bundled demo dataset: synthetic CT-like axial chest slices, generated on first use.

Each slice has a body on a dark background, two dark lungs with irregular outlines, bright
bone (spine, ribs, sternum), small vessels, and in about half the slices one or two small
tumours inside the lungs. A threshold cannot solve it: lungs are as dark as the air outside
the body and tumours are no brighter than bone, so a network has to learn shape and context.
"""

import json
import os
import shutil
import tempfile
from pathlib import Path

import cv2
import numpy as np

from lungseg.data.folders import write_image
from lungseg.data.masks import encode_mask
from lungseg.errors import LungsegError

DEMO_CLASSES = ("background", "lung", "tumour")
DEMO_PALETTE = ((0, 0, 0), (0, 255, 0), (255, 0, 0))  # black, green lung, red tumour
_GENERATOR_VERSION = 1  # bump when the slices change, so cached datasets are regenerated
_MARKER = "demo.json"
_SHIFT = 4  # outline vertices in 1/16 pixel (cv2.fillPoly shift), so small blobs stay round
_T = np.linspace(0, 2 * np.pi, 72, endpoint=False)  # angles of the outline vertices
_HARMONICS = np.arange(2, 6)[:, None]  # boundary ripples: 2 to 5 bumps around the outline

# Gray levels (0-255) of the synthetic tissues, before shading, contrast jitter and noise.
# Lungs are nearly as dark as the air outside the body; tumours are darker than bone.
_AIR = 12
_LUNG = 32
_FAT = 95
_VESSEL = 105
_SOFT_TISSUE = 125
_HEART = 140
_TUMOUR = 158
_BONE = 220
_MIN_SIZE = 32  # below this the chest wall, vessels and tumours shrink under one pixel


def make_demo_dataset(
    root: str | Path, num_images: int = 120, size: int = 256, seed: int = 0
) -> tuple[Path, Path]:
    """Write root/images/demo_XXXX.png (8-bit grayscale) and root/masks/demo_XXXX.png (RGB
    palette masks, colours DEMO_PALETTE) and return (image_dir, mask_dir).

    Deterministic for a seed. Returns at once if a complete dataset with the same parameters is
    there (root/demo.json records them). The dataset is generated in a temporary sibling folder
    and renamed into place, so an interrupted run never leaves a half dataset behind.
    """
    if num_images < 1 or size < _MIN_SIZE:
        raise LungsegError(
            f"The demo dataset needs num_images >= 1 and size >= {_MIN_SIZE} pixels, got "
            f"num_images={num_images}, size={size}. Raise them in the data config."
        )
    root = Path(root)
    params = dict(generator=_GENERATOR_VERSION, num_images=num_images, size=size, seed=seed)
    image_dir, mask_dir = root / "images", root / "masks"
    if _is_complete(root, params):
        return image_dir, mask_dir
    if root.exists() and _read_marker(root) is None and (not root.is_dir() or any(root.iterdir())):
        raise LungsegError(
            f"{root} already exists and is not a lungseg demo dataset (it has no {_MARKER}), so "
            "the demo data will not be written there. Choose another folder for the demo data "
            "or empty this one."
        )
    root.parent.mkdir(parents=True, exist_ok=True)
    partial = Path(tempfile.mkdtemp(prefix=f".{root.name}.partial-", dir=root.parent))
    try:
        _write_dataset(partial, params)
        _move_into_place(partial, root, params)
    finally:
        shutil.rmtree(partial, ignore_errors=True)
    return image_dir, mask_dir


def _read_marker(root: Path) -> dict | None:
    try:
        return json.loads((root / _MARKER).read_text())
    except (OSError, ValueError):
        return None


def _is_complete(root: Path, params: dict) -> bool:
    return _read_marker(root) == params and all(
        len(list((root / sub).glob("demo_*.png"))) == params["num_images"]
        for sub in ("images", "masks")
    )


def _write_dataset(folder: Path, params: dict) -> None:
    (folder / "images").mkdir()
    (folder / "masks").mkdir()
    for i in range(params["num_images"]):
        # One generator per slice: slice i is the same whatever num_images is.
        image, label = _synthetic_slice(np.random.default_rng([params["seed"], i]), params["size"])
        write_image(folder / "images" / f"demo_{i:04d}.png", image)
        write_image(
            folder / "masks" / f"demo_{i:04d}.png", encode_mask(label, "palette", DEMO_PALETTE)
        )
    (folder / _MARKER).write_text(json.dumps(params))


def _move_into_place(partial: Path, root: Path, params: dict) -> None:
    """Rename `partial` to `root`; an outdated dataset at `root` is moved aside first."""
    outdated = partial.with_name(partial.name + ".outdated")
    if root.exists():
        os.replace(root, outdated)
    try:
        os.replace(partial, root)
    except OSError:
        # Another process (e.g. a second DDP rank) put a dataset there first; keep it if it fits.
        if not _is_complete(root, params):
            raise
    finally:
        shutil.rmtree(outdated, ignore_errors=True)


def _synthetic_slice(rng: np.random.Generator, size: int) -> tuple[np.ndarray, np.ndarray]:
    """One CT-like slice: image (size, size) uint8 and class-index label (size, size) uint8
    (0 background, 1 lung, 2 tumour). Anterior is up, the spine at the bottom."""
    s = size
    image = np.full((s, s), _AIR, np.float32)
    centre = s / 2 + rng.normal(0, 0.02 * s, 2)
    body_axes = np.array([rng.uniform(0.39, 0.46), rng.uniform(0.29, 0.35)]) * s
    body_angle = rng.uniform(-6, 6)
    _fill(image, _outline(rng, centre, body_axes, body_angle, 0.05), _FAT)
    inner = _outline(rng, centre, body_axes - 0.035 * s, body_angle, 0.05)
    _fill(image, inner, _SOFT_TISSUE)
    _fill(
        image, _outline(rng, centre + [0.03 * s, -0.06 * s], [0.1 * s, 0.08 * s], 30, 0.1), _HEART
    )

    bone = _bones(rng, s, centre, body_axes)
    lung = _lungs(rng, s, centre, _fill(np.zeros((s, s), np.uint8), inner, 1)) & ~bone
    image[lung] = _LUNG
    for point in _random_points(rng, lung, rng.integers(4, 10)):
        _fill(image, _outline(rng, point, [0.006 * s] * 2, 0, 0), _VESSEL)
    tumour = _tumours(rng, s, lung)
    image[tumour] = _TUMOUR
    image[bone] = _BONE

    shading = cv2.resize(rng.normal(0, 6, (4, 4)).astype(np.float32), (s, s), cv2.INTER_CUBIC)
    image = cv2.GaussianBlur(image + shading, (0, 0), 0.7 * s / 256)
    image = image * rng.uniform(0.9, 1.1) + rng.uniform(-8, 8)
    image += 7 * rng.standard_normal((s, s), dtype=np.float32)
    label = np.where(tumour, 2, np.where(lung, 1, 0)).astype(np.uint8)
    return np.clip(np.round(image), 0, 255).astype(np.uint8), label


def _bones(
    rng: np.random.Generator, s: int, centre: np.ndarray, body_axes: np.ndarray
) -> np.ndarray:
    """(s, s) bool: vertebral body, spinous process, sternum and 6-11 rib cross-sections in
    the chest wall."""
    bone = np.zeros((s, s), np.uint8)
    spine_y = centre[1] + body_axes[1] * rng.uniform(0.55, 0.65)
    _fill(bone, _outline(rng, [centre[0], spine_y], [0.05 * s] * 2, 0, 0.05), 1)
    _fill(bone, _outline(rng, [centre[0], spine_y + 0.08 * s], [0.02 * s, 0.04 * s], 0, 0.05), 1)
    _fill(bone, _outline(rng, centre - [0, body_axes[1] * 0.85], [0.04 * s, 0.015 * s], 0, 0.05), 1)
    for angle in rng.uniform(0, 2 * np.pi, rng.integers(6, 12)):
        rib_centre = centre + (body_axes - 0.04 * s) * [np.cos(angle), np.sin(angle)]
        rib_axes = [rng.uniform(0.01, 0.02) * s, rng.uniform(0.01, 0.025) * s]
        _fill(bone, _outline(rng, rib_centre, rib_axes, np.degrees(angle), 0.05), 1)
    return bone.astype(bool)


def _lungs(rng: np.random.Generator, s: int, centre: np.ndarray, inner: np.ndarray) -> np.ndarray:
    """(s, s) bool: a left and a right lung with irregular outlines, kept inside the chest
    wall (`inner`: (s, s) uint8 body without its fat layer, eroded by 2 % of the size)."""
    lung = np.zeros((s, s), np.uint8)
    for side in (-1, 1):
        lung_centre = centre + [side * rng.uniform(0.17, 0.22) * s, rng.uniform(-0.04, 0.0) * s]
        lung_axes = np.array([rng.uniform(0.10, 0.14), rng.uniform(0.15, 0.20)]) * s
        _fill(lung, _outline(rng, lung_centre, lung_axes, side * rng.uniform(-5, 20), 0.3), 1)
    wall = max(1, round(0.02 * s))
    return (lung & cv2.erode(inner, np.ones((wall, wall), np.uint8))).astype(bool)


def _tumours(rng: np.random.Generator, s: int, lung: np.ndarray) -> np.ndarray:
    """(s, s) bool: in half the slices one or two round blobs (radius 2-3.5 % of the size),
    each centred far enough inside a lung to fit."""
    tumour = np.zeros((s, s), np.uint8)
    if rng.random() < 0.5:
        for _ in range(rng.integers(1, 3)):
            radius = rng.uniform(0.018, 0.035) * s
            kernel = np.ones((int(radius) * 2 + 1,) * 2, np.uint8)
            for point in _random_points(rng, cv2.erode(lung.astype(np.uint8), kernel), 1):
                _fill(tumour, _outline(rng, point, [radius] * 2, 0, 0.2), 1)
    return tumour.astype(bool) & lung


def _outline(
    rng: np.random.Generator, centre: np.ndarray, axes: np.ndarray, angle_deg: float, wobble: float
) -> np.ndarray:
    """(72, 2) int32 vertices, in 1/16 pixel, of a rotated ellipse whose radius wavers by a
    random sum of harmonics 2-5 (relative amplitude up to `wobble`), for organic outlines."""
    phase = rng.uniform(0, 2 * np.pi, (4, 1))
    radius = 1 + (
        rng.uniform(0, wobble, (4, 1)) / _HARMONICS * np.cos(_HARMONICS * _T + phase)
    ).sum(0)
    a = np.radians(angle_deg)
    x, y = axes[0] * radius * np.cos(_T), axes[1] * radius * np.sin(_T)
    points = np.stack([x * np.cos(a) - y * np.sin(a), x * np.sin(a) + y * np.cos(a)], axis=1)
    return np.round((points + centre) * 2**_SHIFT).astype(np.int32)


def _fill(canvas: np.ndarray, outline: np.ndarray, value: float) -> np.ndarray:
    cv2.fillPoly(canvas, [outline], value, cv2.LINE_8, _SHIFT)
    return canvas


def _random_points(rng: np.random.Generator, region: np.ndarray, n: int) -> np.ndarray:
    """(n, 2) (x, y) of random pixels of an (H, W) mask; (0, 2) if the mask is empty."""
    ys, xs = np.nonzero(region)
    if len(xs) == 0:
        return np.empty((0, 2))
    i = rng.integers(len(xs), size=n)
    return np.stack([xs[i], ys[i]], axis=1).astype(np.float64)
