"""Mask encodings: class-index maps ⇄ the pixels stored in mask files.

- `index`:   pixel value = class id (8- or 16-bit, grayscale). A PNG of colour type 3 (palette
             or 'P' mode, as Pascal VOC and many label tools save masks) stores the class ids
             as palette indices: those are read, not the colours its palette shows them in
             (which OpenCV decodes).
- `binary`:  0 = background (class 0), anything else = foreground (class 1); written as 0/255.
             A mask whose values run between 0 and a top value of at least half its type's
             range (JPEG noise, anti-aliased or resized edges: 0, 3, 120, 254, 255 ...) is
             cut halfway to its top value instead, with a warning. A mask of a few grey levels
             whose in-between levels fill regions of their own (classes coded as grey levels:
             0/60/255, 0/85/170/255) keeps the rule, every non-zero pixel foreground, with a
             warning. A JPEG mask of a small top value (0/1, 0/3, 0/100 masks: JPEG noise
             makes 0, 1, 2, 3 ... along the edges) is cut halfway to its foreground level
             (its most common non-zero value; the smallest of those nearly as common, for two
             lungs stored as 1 and 2), with a warning to save the masks as PNG; other masks of
             a small top value (0/1 or 0/1/2 PNGs) keep 0 / non-zero. An 8-bit RGB mask read as
             binary takes its largest channel; one that holds several distinct colours in
             regions of their own (red lung, green tumour: classes coded as colours, all
             foreground here) gets a warning naming them and the palette that keeps them apart.
             A palette PNG is read by its indices, 0 = background, any other = foreground
             (with a warning where several indices are united).
- `palette`: each class has an RGB colour, class i = palette[i]; a palette PNG is read by the
             colours its palette gives its indices.

Masks split over several folders (data.mask_dir as a list, one class a folder, as
Montgomery's leftMask/rightMask): each file is read as a binary mask (its warnings worded for
a folder list; no colour warning, as a list has no palette), then united (`binary`: one
foreground class) or numbered by folder (`index`: folder i is class i + 1).

The ignore label (data.ignore_index; nnU-Net's "ignore", Pascal VOC's 255 border, unlabelled
pixels of sparse annotations): the mask pixels that store it are decoded as ``IGNORE``, which
the losses and metrics leave out, and are not counted as a class. It is the value a pixel
stores (`index`; `binary`: the value before black/white is decided, a palette PNG's index or
an RGB mask's largest channel, those pixels counting as 0 for the rules above; in a folder
list, any file's) or, in `palette` mode, a colour [R, G, B] (a number v: the grey (v, v, v)).
"""

import colorsys
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from lungseg.data import transforms
from lungseg.data.folders import palette_indices, read_image
from lungseg.errors import LungsegError

MASK_MODES = ("index", "binary", "palette")
# Class-index maps hold this where the mask stores the ignore label (data.ignore_index): above
# every class id, which is then at most 254 (class-index maps are uint8)
IGNORE = 255
_SHOWN = 5  # how many offending values an error message lists
_GOLDEN = 0.618033988749895  # hue step that keeps consecutive class colours far apart
# (kind, folder): the folders whose binary masks were warned of, once for each kind ("grey":
# JPEG noise or anti-aliased edges cut halfway; "levels": classes coded as grey levels;
# "jpeg": a JPEG of a small top value cut halfway to its foreground level; "colours": classes
# coded as colours; "indices": a palette PNG's several non-zero indices united)
_WARNED_FOLDERS: set[tuple[str, str]] = set()
# Binary masks: grey levels that fill regions of their own are classes coded as grey levels,
# not JPEG noise or anti-aliased edges (which make many values, or thin lines of a few).
_CODED_LEVELS = 6  # at most this many distinct values, 0 and the top value included
_CODED_SHARE = 0.25  # in-between levels: at least this share of the non-zero pixels
_CODED_INTERIOR = 0.5  # and at least this share of them inside a region of their own level
_JPEG_SUFFIXES = (".jpg", ".jpeg")
# Binary RGB masks: colours that fill regions of their own are classes coded as colours.
# Colours are compared in bins of _COLOUR_BIN per channel (JPEG noise keeps a colour in its
# bin); a bin counts when its pixels' brightest channel is above _COLOUR_APART (darker pixels
# are edges or noise) and at least _COLOUR_INTERIOR of its pixels, and _CODED_INTERIOR of them,
# have four neighbours of the same bin; two colours are distinct when, scaled to the same
# brightness, some channel differs by more than _COLOUR_APART (anti-aliased or resized edges
# are darker shades of a colour, in lines, and JPEG noise stays near it).
_COLOUR_BIN = 32
_COLOUR_APART = 64
_COLOUR_INTERIOR = 9
log = logging.getLogger(__name__)


def decode_mask(
    raw: np.ndarray,
    mode: str,
    path: Path,
    palette: Sequence[Sequence[int]] | None = None,
    num_classes: int | None = None,
    ignore: int | tuple[int, int, int] | None = None,
) -> np.ndarray:
    """(H, W) uint8 class-index map from a read_image result ((H, W) or (H, W, 3) RGB) of the
    mask file ``path``. In modes index and binary a palette PNG (colour type 3), which
    read_image gives as colours, is read again from ``path`` for its indices. ``ignore``
    (``ignore_value``'s): the pixels that store it are ``IGNORE``; None: no ignore label."""
    if mode == "index":
        return _decode_index(raw, path, num_classes, ignore)
    if mode == "binary":
        return _decode_binary(raw, path, ignore=ignore)
    if mode == "palette":
        return _decode_palette(raw, path, _palette_array(palette, num_classes), ignore)
    raise _unknown_mode(mode)


def ignore_value(setting: Any, mode: str) -> int | tuple[int, int, int] | None:
    """data.ignore_index as decode_mask takes it: None (off), a stored value >= 1 (index and
    binary modes) or an (R, G, B) colour (palette mode; a number v is the grey (v, v, v)).
    LungsegError for anything else."""
    if setting is None:
        return None
    if mode == "palette":
        colour = [setting] * 3 if _is_int(setting) else setting
        if (
            isinstance(colour, Sequence)
            and len(colour) == 3
            and all(_is_int(v) and 0 <= v <= 255 for v in colour)
        ):
            return tuple(int(v) for v in colour)
        raise LungsegError(
            f"data.ignore_index is {setting!r}; with data.mask_mode=palette give the colour of "
            "the pixels to leave out of training and scoring as [R, G, B] with values 0-255 "
            "(e.g. [255, 255, 255]), or null for none."
        )
    if _is_int(setting) and setting >= 1:
        return int(setting)
    raise LungsegError(
        f"data.ignore_index is {setting!r}; give the pixel value the masks store where pixels "
        "are to be left out of training and scoring (e.g. 255, Pascal VOC's border), a whole "
        "number of at least 1 (0 is the background), or null for none."
    )


def stored_values(path: Path, mode: str) -> str:
    """The values the mask file ``path`` stores as data.ignore_index is compared with them in
    ``mode`` (a palette PNG's indices, else the largest channel; palette mode: its colours, the
    most common first), listed for a message."""
    raw = read_image(path)
    if mode != "palette":
        indices = _stored_indices(raw, path)
        return _values(np.unique(indices if indices is not None else _largest_channel(raw)))
    packed = _pack(raw) if raw.ndim == 3 else raw.astype(np.int32) * 0x010101
    keys, counts = np.unique(packed, return_counts=True)
    keys = keys[np.argsort(-counts, kind="stable")].tolist()
    shown = ", ".join(_colour_text(k) for k in keys[:_SHOWN])
    return shown if len(keys) <= _SHOWN else f"{shown}, ... ({len(keys)} colours in total)"


def _is_int(value: Any) -> bool:
    return isinstance(value, int | np.integer) and not isinstance(value, bool)


def mask_at_image_size(
    image: Path,
    image_hw: Sequence[int],
    mask: Path,
    raw: np.ndarray,
    resize: bool,
    note: str = "",
) -> np.ndarray:
    """``raw``, a mask read from ``mask``, at its image's size: as it is where it has that
    size; where it has the image's shape at another scale (SCR's 1024-px masks of JSRT's
    2048-px radiographs) and ``resize`` (data.resize_masks), resized to it (nearest
    neighbour, ``transforms.resize_mask``). Else a LungsegError naming both sizes (with
    ``note`` after them), and data.resize_masks where it would apply."""
    (height, width), (mask_height, mask_width) = image_hw[:2], raw.shape[:2]
    if (mask_height, mask_width) == (height, width):
        return raw
    # the image's shape within a pixel of the mask's, at 1/8 to 8 times its size (a mask of a
    # few pixels is no drawing of the image)
    ratio = mask_width / width
    scaled = (
        abs(mask_height * width - mask_width * height) <= max(height, width)
        and 1 / 8 <= ratio <= 8
        and min(mask_height, mask_width) >= 16
    )
    if scaled and resize:
        return transforms.resize_mask(raw, (height, width))
    whole = round(1 / ratio)
    shown = f"1/{whole}" if ratio < 1 and abs(1 / ratio - whole) < 0.01 else f"{ratio:.3g} times"
    fix = (
        f" The mask has its image's shape at {shown} its size: give data.resize_masks=true to "
        f"resize such masks with their images (to data.image_size in training, to the image's "
        f"size in eval.py), or re-export the mask at the image's size."
        if scaled
        else " A mask must have its image's size; re-export the mask at the image's size or "
        "remove the pair."
    )
    raise LungsegError(
        f"Image {image} is {width}x{height} pixels (width x height) but its mask {mask} is "
        f"{mask_width}x{mask_height}.{note}{fix}"
    )


def decode_layers(
    raws: Sequence[np.ndarray],
    paths: Sequence[Path],
    mode: str,
    palette: Sequence[Sequence[int]] | None = None,
    num_classes: int | None = None,
    ignore: int | tuple[int, int, int] | None = None,
) -> np.ndarray:
    """(H, W) uint8 class-index map of a pair's mask files (``Pair.masks``, read with
    read_image): one file as ``decode_mask``; several, one per folder of data.mask_dir, each
    read as a binary mask, then united (mode binary) or numbered in folder order (mode index:
    the i-th folder is class i, 1-based; where two overlap the later folder's class wins).
    Their warnings say that each file of a folder list is read as black/white, whatever the
    mode. ``ignore``: as decode_mask's; a pixel any file ignores is ``IGNORE``."""
    if len(paths) == 1:
        return decode_mask(raws[0], mode, paths[0], palette, num_classes, ignore)
    check_layered_mode(len(paths), mode)
    if mode == "index" and num_classes is not None and len(paths) + 1 != num_classes:
        raise LungsegError(
            f"{len(paths)} mask folders give {len(paths) + 1} classes with the background, "
            f"but {num_classes} are expected (reading {paths[0]}): list one mask folder per "
            f"class in data.mask_dir."
        )
    out = np.zeros(raws[0].shape[:2], np.uint8)
    ignored = np.zeros(out.shape, bool)
    for number, (raw, path) in enumerate(zip(raws, paths, strict=True), 1):
        layer = _decode_binary(raw, path, layered=True, ignore=ignore)
        out[layer == 1] = 1 if mode == "binary" else number
        ignored |= layer == IGNORE
    out[ignored] = IGNORE
    return out


def check_layered_mode(folders: int, mode: str) -> None:
    """LungsegError unless masks from ``folders`` folders (one class each) can be read in
    ``mode``: binary or index (one folder needs no check)."""
    if folders > 1 and mode not in ("binary", "index"):
        raise LungsegError(
            f"data.mask_dir lists {folders} folders, one class each, but data.mask_mode is "
            f"{mode!r}. Set data.mask_mode=binary (one foreground class: the masks united) or "
            f"index (the folders' classes numbered 1, 2, ... in data.mask_dir's order)."
        )


def _decode_binary(
    raw: np.ndarray, path: Path, layered: bool = False, ignore: int | None = None
) -> np.ndarray:
    """``_binary``'s 0/1 map, ``IGNORE`` where the stored value (a palette PNG's index, else
    the largest channel) is ``ignore``; those pixels count as 0 for ``_binary``'s rules."""
    indices = _stored_indices(raw, path)
    if ignore is None:
        return _binary(raw, indices, path, layered)
    ignored = (indices if indices is not None else _largest_channel(raw)) == ignore
    if indices is not None:
        indices = np.where(ignored, 0, indices)
    else:
        _warn_ignored_top(_largest_channel(raw), ignored, ignore, path)
        raw = np.where(ignored[..., None] if raw.ndim == 3 else ignored, 0, raw).astype(raw.dtype)
    out = _binary(raw, indices, path, layered)
    out[ignored] = IGNORE
    return out


def _warn_ignored_top(gray: np.ndarray, ignored: np.ndarray, ignore: int, path: Path) -> None:
    """Warn (once a folder) where data.ignore_index is a binary mask's top value and fills
    regions of its own beside other non-zero levels (0/128/255 with data.ignore_index=255):
    binary masks store their foreground as their top value, so the foreground would be left
    out and the other level (often the one that marks unlabelled pixels) trained as
    foreground. A thin border of the ignore value (Pascal VOC's) is not warned of."""
    others = np.unique(gray[(gray != 0) & ~ignored])
    if (
        not len(others)
        or ignore != gray.max()
        or (_interior(gray) & ignored).sum() < _CODED_INTERIOR * ignored.sum()
        or not _first_in_folder("ignored top", str(path.parent))
    ):
        return
    log.warning(
        "Mask %s (and maybe others in its folder): data.ignore_index=%d is these binary masks' "
        "top value and fills regions of its own, so those regions are left out and the "
        "pixels valued %s are trained as the foreground. Binary masks usually store their "
        "foreground as their top value: if %s marks the unlabelled pixels, set "
        "data.ignore_index=%d instead; if %d does, this is right.",
        path,
        ignore,
        _values(others),
        _values(others),
        int(others[-1]),
        ignore,
    )


def _largest_channel(raw: np.ndarray) -> np.ndarray:
    return raw.max(axis=2) if raw.ndim == 3 else raw


def _binary(
    raw: np.ndarray, indices: np.ndarray | None, path: Path, layered: bool = False
) -> np.ndarray:
    """0 / non-zero, or, for a grey-level mask, below / above half its top value, and for a
    JPEG of a small top value below / above half its foreground level (see the module's
    docstring). Index-like masks (0/1, 0/1/2 for two lungs) keep 0 / non-zero unless they are
    JPEGs, and so do masks of a few grey levels that fill regions of their own
    (``_grey_coded``). An RGB mask is read by its largest channel. ``layered``: the file is
    one of a folder list's (``decode_layers``), whatever data.mask_mode, which the warnings
    say; it gets no warning of colours (a folder list has no palette). A palette PNG is read
    by its indices (``indices``, ``_stored_indices``): 0 / non-zero (with a warning where
    several non-zero indices are united)."""
    if indices is not None:
        if not layered:
            _warn_indices(indices, path)
        return (indices != 0).astype(np.uint8)
    colour = raw.ndim == 3
    gray = _largest_channel(raw)
    folder = str(path.parent)
    coloured = colour and not layered and _warn_colours(raw, path, folder)
    top = gray.max()
    full = np.iinfo(gray.dtype).max if np.issubdtype(gray.dtype, np.integer) else 1.0
    mixed = bool(((gray != 0) & (gray != top)).any())
    if 2 * float(top) >= full and mixed:
        levels = np.unique(gray)
        if _grey_coded(gray, levels):
            if not coloured and _first_in_folder("levels", folder):  # the colours' warning says it
                log.warning(
                    "Mask %s holds several %s levels (%s) that fill regions of their own, %s "
                    "(one class); other such masks in %s are not named. %s %s",
                    path,
                    "brightness" if colour else "grey",
                    ", ".join(str(v) for v in levels.tolist()),
                    _taken("every non-zero pixel", layered),
                    folder,
                    _levels_fix(levels, gray.dtype, colour, layered),
                    _unlabelled_value_hint("a level", int(levels[-2])),
                )
            return (gray != 0).astype(np.uint8)
        if _first_in_folder("grey", folder):
            log.warning(
                "Mask %s holds values between 0 and %s (%d distinct: JPEG compression, or "
                "anti-aliased or resized edges), %s from half of %s up, not every non-zero "
                "pixel; other such masks in %s are not named. Save masks as 0/255 or 0/1 PNGs "
                "to decide the edges yourself.",
                path,
                top,
                len(levels),
                _taken("a pixel", layered),
                top,
                folder,
            )
        return (2 * gray.astype(np.float64) > float(top)).astype(np.uint8)
    if mixed and path.suffix.lower() in _JPEG_SUFFIXES and np.issubdtype(gray.dtype, np.integer):
        level = _foreground_level(gray)
        if _first_in_folder("jpeg", folder):
            log.warning(
                "Mask %s is a JPEG whose values run between 0 and %s (%d distinct): JPEG's lossy "
                "compression changed the values along the mask's edges, %s from half of %s up "
                "(its foreground level, the most common non-zero value), not every non-zero "
                "pixel; other such masks in %s are not named. Edge pixels that the compression "
                "moved across that cut cannot be told apart (in 0/1 masks every non-zero pixel "
                "is foreground, noise included): save the masks as PNG (lossless).",
                path,
                top,
                len(np.unique(gray)),
                _taken("a pixel", layered),
                level,
                folder,
            )
        return (2 * gray.astype(np.int64) > level).astype(np.uint8)
    return (gray != 0).astype(np.uint8)


def _stored_indices(raw: np.ndarray, path: Path) -> np.ndarray | None:
    """(H, W) uint8: the indices of a palette PNG mask (``palette_indices``), whose colours are
    ``raw``; None for any other mask."""
    return palette_indices(path) if raw.ndim == 3 else None  # read_image gives colours (RGB)


def _warn_indices(indices: np.ndarray, path: Path) -> None:
    """Warn, once for the mask's folder, of a palette PNG read as binary whose non-zero indices
    are several, which binary unites as one foreground class (classes, or a void border as
    Pascal VOC's 255)."""
    values = np.flatnonzero(np.bincount(indices.ravel()))
    if np.count_nonzero(values) < 2 or not _first_in_folder("indices", str(path.parent)):
        return
    log.warning(
        "Mask %s is a palette PNG whose pixels hold the palette indices %s, and "
        "data.mask_mode=binary takes every index but 0 as foreground (one class); other such "
        "masks in %s are not named. If the indices are classes, keep them apart with "
        "data.mask_mode=index. %s",
        path,
        _values(values),
        path.parent,
        _unlabelled_value_hint("an index", int(values[-1])),
    )


def _unlabelled_value_hint(what: str, example: int) -> str:
    """For a binary mask's warnings: a stored value (``what``, e.g. ``example``) that marks
    unlabelled pixels, which binary takes as foreground, is left out by data.ignore_index."""
    return (
        f"If {what} marks unlabelled pixels (a border, an area not annotated), binary takes it "
        f"as foreground: leave it out of training and scoring with "
        f"data.ignore_index=<that value> (e.g. data.ignore_index={example})."
    )


def _taken(what: str, layered: bool) -> str:
    """How a binary mask's pixels are read, for its warnings: by data.mask_mode=binary, or as
    one file of a folder list (whatever data.mask_mode)."""
    if layered:
        return (
            f"and each mask file of a folder list is read as black/white: {what} is taken as "
            "foreground"
        )
    return f"so data.mask_mode=binary takes {what} as foreground"


def _levels_fix(levels: np.ndarray, dtype: np.dtype, colour: bool, layered: bool) -> str:
    """The fix for a binary mask of classes coded as grey (or brightness) levels."""
    if layered:
        return (
            "If the levels are classes, a folder list (one class a folder) cannot keep them "
            "apart: give each class a folder of its own."
        )
    if colour:
        palette = "with the masks' colours in data.palette"
    elif dtype == np.uint8:
        palette = f"with a grey palette, data.palette={grey_palette(levels)}"
    else:  # palettes are 8-bit
        palette = "on the masks saved as 8-bit grey levels with a grey palette"
    return (
        "If the levels are classes, keep them apart with data.mask_mode=index (for levels that "
        f"are the class ids 0, 1, 2, ...) or data.mask_mode=palette {palette}."
    )


def _foreground_level(gray: np.ndarray) -> int:
    """A JPEG binary mask's foreground level: its most common non-zero value, or the smallest
    non-zero value at least half as common (two lungs stored as 1 and 2, whichever is the
    larger: both are foreground). JPEG noise is rare next to the regions' flat inside."""
    counts = np.bincount(gray.ravel())
    counts[0] = 0
    return int(np.flatnonzero(2 * counts >= counts.max())[0])


def _warn_colours(rgb: np.ndarray, path: Path, folder: str) -> bool:
    """Whether an 8-bit RGB mask read as binary holds several distinct colours in regions of
    their own (see _COLOUR_APART), which binary takes as one foreground class; warned of once
    for ``folder``, with the palette that keeps them apart."""
    if rgb.dtype != np.uint8:
        return False
    if (rgb[:, :, 0] == rgb[:, :, 1]).all() and (rgb[:, :, 0] == rgb[:, :, 2]).all():
        return False  # grey levels: _grey_coded's case
    if ("colours", folder) in _WARNED_FOLDERS:
        return True  # warned of: the search (65 ms a 1024-px mask) is not made again
    bins = (rgb.astype(np.int32) + _COLOUR_BIN // 2) // _COLOUR_BIN  # 0-8 a channel
    packed = bins[..., 0] << 8 | bins[..., 1] << 4 | bins[..., 2]
    interior = _interior(packed)
    bright = rgb.max(axis=2) > _COLOUR_APART
    keys, inside = np.unique(packed[bright & interior], return_counts=True)
    if len(keys) < 2:
        return False
    values = packed[bright]
    position = np.minimum(np.searchsorted(keys, values), len(keys) - 1)
    total = np.bincount(position[keys[position] == values], minlength=len(keys))
    exact = _pack(rgb)
    found: list[np.ndarray] = []  # distinct colours, the largest regions first
    for k in np.argsort(-inside, kind="stable"):
        if inside[k] < _COLOUR_INTERIOR or inside[k] < _CODED_INTERIOR * total[k]:
            continue
        # the bin's colour: the most common exact colour of its interior pixels
        colours, counts = np.unique(exact[interior & (packed == keys[k])], return_counts=True)
        key = int(colours[counts.argmax()])
        rgb_k = np.array([key >> 16, key >> 8 & 255, key & 255])
        if all(np.abs(_scaled(rgb_k) - _scaled(c)).max() > _COLOUR_APART for c in found):
            found.append(rgb_k)
    if len(found) < 2:
        return False
    if _first_in_folder("colours", folder):
        colours = [tuple(int(v) for v in c) for c in found]
        shown = ", ".join(str(c) for c in colours[:_SHOWN])
        if len(colours) > _SHOWN:
            shown += f", ... ({len(colours)} colours in total)"
        palette = ",".join(
            ["background:[0,0,0]"]
            + [f"class_{i}:[{r},{g},{b}]" for i, (r, g, b) in enumerate(colours, 1)]
        )
        log.warning(
            "Mask %s holds %d distinct colours in regions of their own (%s), and "
            "data.mask_mode=binary takes them all as one foreground class; other such masks in "
            "%s are not named. If the colours are classes, keep them apart with "
            "data.mask_mode=palette and the colours in data.palette, background first, e.g. "
            "'data.palette={%s}' (name the classes as you like).",
            path,
            len(colours),
            shown,
            folder,
            palette,
        )
    return True


def _scaled(colour: np.ndarray) -> np.ndarray:
    """An RGB colour scaled to full brightness (its largest channel 255)."""
    return colour * 255.0 / max(int(colour.max()), 1)


def _first_in_folder(kind: str, folder: str) -> bool:
    """Whether this is the first mask of ``folder`` warned of for ``kind`` (then noted)."""
    first = (kind, folder) not in _WARNED_FOLDERS
    _WARNED_FOLDERS.add((kind, folder))
    return first


def _grey_coded(gray: np.ndarray, levels: np.ndarray) -> bool:
    """Whether a grey-level mask's in-between levels (neither 0 nor its top) are regions of
    their own, as classes coded as grey levels are: few distinct values, the in-between ones
    a large share of the non-zero pixels, and most of those inside a region of their own level
    (their four neighbours of the same value). JPEG noise makes many values; anti-aliased or
    resized edges are lines one or two pixels wide whose pixels have neighbours of other
    values (2x downscaling makes only five values, 0, 64, 128, 191, 255, and on a small mask
    its edges can be a large share of the foreground)."""
    if len(levels) > _CODED_LEVELS:
        return False
    between = (gray != 0) & (gray != levels[-1])
    if between.sum() < _CODED_SHARE * np.count_nonzero(gray):
        return False
    return (_interior(gray) & between).sum() >= _CODED_INTERIOR * between.sum()


def _interior(values: np.ndarray) -> np.ndarray:
    """(H, W) bool: the pixels whose four neighbours hold their value (edge pixels count the
    image's border as their own value)."""
    padded = np.pad(values, 1, mode="edge")
    return (
        (padded[1:-1, :-2] == values)
        & (padded[1:-1, 2:] == values)
        & (padded[:-2, 1:-1] == values)
        & (padded[2:, 1:-1] == values)
    )


def grey_palette(levels: np.ndarray | Sequence[int]) -> str:
    """data.palette, as typed on the command line, for masks of these 8-bit grey levels:
    ``[[0,0,0],[128,128,128],[255,255,255]]``."""
    return "[" + ",".join(f"[{v},{v},{v}]" for v in np.asarray(levels).tolist()) + "]"


def encode_mask(
    index: np.ndarray, mode: str, palette: Sequence[Sequence[int]] | None = None
) -> np.ndarray:
    """Inverse of decode_mask, to write predictions in the training encoding. index: (H, W)
    class ids → index: (H, W) uint8 ids; binary: (H, W) uint8 0/255 (ids must be 0/1);
    palette: (H, W, 3) uint8 RGB, or (H, W) uint8 grey levels for a palette of greys."""
    assert np.issubdtype(index.dtype, np.integer) and index.min() >= 0, "class ids expected"
    if mode == "index":
        assert index.max() <= 255, "class ids above 255 do not fit a uint8 mask"
        return index.astype(np.uint8)
    if mode == "binary":
        if index.max() > 1:
            raise LungsegError(
                f"data.mask_mode=binary stores two classes (0 and 1), but the prediction holds "
                f"class {int(index.max())}. Use data.mask_mode=index or palette for more classes."
            )
        return (index * 255).astype(np.uint8)
    if mode == "palette":
        colours = _palette_array(palette, None)
        if index.max() >= len(colours):
            raise LungsegError(
                f"data.palette has {len(colours)} colours, but the prediction holds class "
                f"{int(index.max())}. Give data.palette one colour per class."
            )
        if (colours == colours[:, :1]).all():  # a grey palette: grey masks, as trained on
            return colours[:, 0][index]
        return colours[index]
    raise _unknown_mode(mode)


def default_colors(num_classes: int) -> np.ndarray:
    """(num_classes, 3) uint8 distinct RGB colours for overlays; class 0 (background) is black.
    Hues step by the golden ratio and brightness alternates, so neighbouring ids contrast."""
    if num_classes < 1:
        raise LungsegError(f"data.num_classes must be at least 1, got {num_classes}.")
    colours = [(0.0, 0.0, 0.0)] + [
        colorsys.hsv_to_rgb(
            ((i - 1) * _GOLDEN) % 1.0, 1.0 - 0.35 * (i % 2), 1.0 - 0.3 * (i // 2 % 2)
        )
        for i in range(1, num_classes)
    ]
    return np.round(np.array(colours) * 255).astype(np.uint8)


def _unknown_mode(mode: str) -> LungsegError:
    return LungsegError(
        f"Unknown data.mask_mode={mode!r}. Choose one of {', '.join(MASK_MODES)}: index (pixel "
        "value = class id), binary (0 = background, non-zero = foreground) or palette (one RGB "
        "colour per class, declared in data.palette)."
    )


def _decode_index(
    raw: np.ndarray, path: Path, num_classes: int | None, ignore: int | None = None
) -> np.ndarray:
    indices = _stored_indices(raw, path)
    if indices is not None:
        raw = indices
    elif path.suffix.lower() in _JPEG_SUFFIXES:
        raise LungsegError(
            f"Mask {path} is a JPEG, but data.mask_mode=index reads each pixel value as a class "
            "id, and JPEG's lossy compression changes the values along every edge, which would "
            "be read as other classes. Save index masks as PNG (lossless), or for black/white "
            "masks set data.mask_mode=binary, which cuts JPEG noise halfway to white."
        )
    if raw.ndim == 3:
        if not ((raw[:, :, 0] == raw[:, :, 1]).all() and (raw[:, :, 0] == raw[:, :, 2]).all()):
            raise LungsegError(
                f"Mask {path} is a colour image (its red, green and blue channels differ), but "
                "data.mask_mode=index expects the class id as a gray value. It looks like a "
                "colour-coded mask: set data.mask_mode=palette and declare the colours in "
                "data.palette (class i = palette[i])."
            )
        raw = raw[:, :, 0]
    if raw.dtype not in (np.uint8, np.uint16):
        raise LungsegError(
            f"Mask {path} stores {raw.dtype} pixels; data.mask_mode=index expects 8- or 16-bit "
            "unsigned integer class ids. Save the mask as an 8-bit or 16-bit PNG."
        )
    values = np.flatnonzero(np.bincount(raw.ravel()))
    ignored = None if ignore is None else raw == ignore
    if ignore is not None:
        values = values[values != ignore]  # not a class: not counted, not checked
    top = int(values[-1]) if values.size else 0  # 0/255 (8-bit) or 0/65535: white on black
    looks_binary = top in (255, 65535) and set(values.tolist()) <= {0, top}
    if looks_binary and (num_classes is None or num_classes <= top):
        grey = "set" if top == 255 else "save the masks as 8-bit grey levels and set"
        raise LungsegError(
            f"Mask {path} holds only the values 0 and {top}, which looks like a binary "
            f"(black/white) mask, but data.mask_mode=index reads {top} as class {top}. Set "
            "data.mask_mode=binary (non-zero = foreground) where every mask is black/white, or "
            "store class ids 0 and 1. If other masks hold further grey levels (classes coded as "
            "grey levels, e.g. 0/128/255), binary would merge those classes into one: "
            f"{grey} data.mask_mode=palette with a grey palette, class i the i-th level, e.g. "
            "data.palette=[[0,0,0],[128,128,128],[255,255,255]]. If other masks hold class ids "
            f"and {top} marks pixels to leave out of training and scoring (unlabelled, Pascal "
            f"VOC's border), set data.ignore_index={top}."
        )
    most = 256 if ignore is None else IGNORE  # ids are stored as uint8, IGNORE above them
    limit = most if num_classes is None else min(num_classes, most)
    if values.size and values[-1] >= limit:
        full = int(np.iinfo(raw.dtype).max)
        raise LungsegError(_out_of_range(path, values, limit, most, ignore, full))
    out = raw.astype(np.uint8)
    if ignored is not None:
        out[ignored] = IGNORE
    return out


def _out_of_range(
    path: Path, values: np.ndarray, limit: int, most: int, ignore: int | None, full: int
) -> str:
    """The error for an index mask whose (sorted, not ignored) ``values`` reach ``limit``, the
    class count (``most`` where it is not given). A value above the class ids lungseg holds
    with data.ignore_index set is most likely the ignore label set wrong (the mask is fine);
    without the setting, the type's top value ``full`` alone above the class ids is most
    likely one (Pascal VOC's 255 border)."""
    bad = values[values >= limit]
    largest = int(bad[-1])
    unlabelled = (
        f"if {largest} marks pixels to leave out of training and scoring (unlabelled, Pascal "
        f"VOC's border), set data.ignore_index={largest}"
    )
    if ignore is not None and largest >= most:
        return (
            f"Mask {path} holds the value{'s' if bad.size > 1 else ''} {_values(bad)}, above the "
            f"class ids (0-{most - 1}) that lungseg holds with data.ignore_index set, and "
            f"{largest} is not data.ignore_index ({ignore}): {unlabelled}; otherwise fix the mask."
        )
    if largest >= most:
        fix = f"lungseg supports at most {most} classes (ids 0-{most - 1}): fix the mask"
    else:
        fix = f"Set data.num_classes to at least {largest + 1} if these are real classes, or "
        fix += "fix the mask"
    if ignore is None and bad.tolist() == [full]:
        return (
            f"Mask {path} holds the value {full} above its class ids ({_values(values[:-1])}): "
            f"{unlabelled}. Otherwise {full} is out of range (ids must be below {limit}); "
            f"{fix[0].lower()}{fix[1:]}."
        )
    return (
        f"Mask {path} holds class ids {_values(bad)} that are out of range (ids must be below "
        f"{limit}). {fix}."
    )


def _palette_array(palette: Sequence[Sequence[int]] | None, num_classes: int | None) -> np.ndarray:
    """Validated (K, 3) uint8 palette."""
    if palette is None or len(palette) == 0:
        raise LungsegError(
            "data.mask_mode=palette needs data.palette: a list of [R, G, B] colours with class "
            "i = palette[i], e.g. [[0, 0, 0], [0, 255, 0]] for background and one class."
        )
    try:
        colours = np.array([list(c) for c in palette])
    except (TypeError, ValueError):  # an entry that is not a sequence, or ragged entries
        colours = None
    if (
        colours is None
        or colours.ndim != 2
        or colours.shape[1] != 3
        or colours.dtype.kind not in "iu"
        or colours.min() < 0
        or colours.max() > 255
    ):
        raise LungsegError(
            f"data.palette={palette!r} is not a list of [R, G, B] colours "
            "with integer values 0-255. Write it like [[0, 0, 0], [0, 255, 0], [255, 0, 0]]."
        )
    unique, counts = np.unique(colours, axis=0, return_counts=True)
    if len(unique) < len(colours):
        repeated = [tuple(int(v) for v in c) for c in unique[counts > 1]]
        raise LungsegError(
            f"data.palette lists the colours {repeated} more than once; each class needs its "
            "own colour. Make the entries of data.palette distinct."
        )
    if len(colours) > 256:
        raise LungsegError(
            f"data.palette has {len(colours)} colours; masks hold at most 256 classes. "
            "Shorten data.palette to one colour per class."
        )
    if num_classes is not None and len(colours) != num_classes:
        raise LungsegError(
            f"data.palette has {len(colours)} colours but data.num_classes={num_classes}. "
            "Give data.palette exactly one colour per class, class i = palette[i]."
        )
    return colours.astype(np.uint8)


def _decode_palette(
    raw: np.ndarray, path: Path, colours: np.ndarray, ignore: tuple[int, int, int] | None = None
) -> np.ndarray:
    if raw.dtype != np.uint8:
        raise LungsegError(
            f"Mask {path} stores {raw.dtype} pixels; data.mask_mode=palette expects 8-bit RGB "
            "colours. Save the mask as an 8-bit RGB PNG."
        )
    # One int32 per pixel (R << 16 | G << 8 | B), looked up in the sorted palette keys.
    packed = _pack(raw) if raw.ndim == 3 else raw.astype(np.int32) * 0x010101  # gray: (v, v, v)
    keys = _pack(colours)
    order = np.argsort(keys)
    position = np.minimum(np.searchsorted(keys[order], packed), len(keys) - 1)
    known = keys[order][position] == packed
    ignored = None if ignore is None else packed == _pack(np.array(ignore))
    if ignored is not None:
        known |= ignored
    if not known.all():
        unknown, counts = np.unique(packed[~known], return_counts=True)
        top = np.argsort(-counts, kind="stable")[:_SHOWN]
        listed = ", ".join(
            f"{_colour_text(k)}: {n} pixels"
            for k, n in zip(unknown[top].tolist(), counts[top].tolist(), strict=True)
        )
        more = f" ({len(unknown)} colours in total)" if len(unknown) > _SHOWN else ""
        raise LungsegError(
            f"Mask {path} has colours that are not in data.palette: {listed}{more}. "
            + (
                _transparent_hint(path, ~known)
                or _indices_hint(raw, path)
                or "Add them to data.palette (class i = palette[i]) or fix the mask. In-between "
                "colours usually come from JPEG compression or smoothed edges: save masks as "
                "PNG without anti-aliasing."
            )
            + _unlabelled_colour_hint(raw, path, int(unknown[top[0]]), len(unknown), ignore)
        )
    out = order[position].astype(np.uint8)
    if ignored is not None:
        out[ignored] = IGNORE
    return out


def _unlabelled_colour_hint(
    raw: np.ndarray, path: Path, colour: int, colours: int, ignore: tuple[int, int, int] | None
) -> str:
    """For a palette mask of ``colours`` unknown colours, the most common ``colour`` (packed):
    how data.ignore_index leaves it out, if it marks unlabelled pixels (a few colours; many
    are noise). Where data.ignore_index is a grey (v, v, v) and the mask a palette PNG whose
    indices hold v, the setting was meant as an index: palette mode takes a colour."""
    indices = _stored_indices(raw, path)
    if ignore is not None and len(set(ignore)) == 1 and indices is not None:
        shown = np.unique(_pack(raw[indices == ignore[0]]))
        if len(shown) == 1:
            return (
                f" data.ignore_index is read in palette mode as the colour {ignore} (a number v "
                f"is the grey (v, v, v)), but this palette PNG shows its index {ignore[0]} as "
                f"{_colour_text(shown[0])}: palette mode takes a colour, "
                f"{_ignore_setting(shown[0])}, or set data.mask_mode=index, which reads the "
                f"file's indices (index {ignore[0]} then is data.ignore_index={ignore[0]})."
            )
    if colours > _SHOWN:
        return ""
    now = "" if ignore is None else f" (data.ignore_index is {list(ignore)})"
    return (
        f" If {_colour_text(colour)} marks unlabelled pixels (a border, areas not annotated), "
        f"{_ignore_setting(colour)} leaves them out of training and scoring{now}."
    )


def _ignore_setting(colour: int) -> str:
    """data.ignore_index for a packed colour, as typed on the command line."""
    colour = int(colour)
    return f"data.ignore_index=[{colour >> 16},{colour >> 8 & 255},{colour & 255}]"


def _indices_hint(raw: np.ndarray, path: Path) -> str | None:
    """The fix when a mask read in palette mode is a palette PNG, whose indices are most
    likely the class ids; None for other masks."""
    if _stored_indices(raw, path) is None:
        return None
    return (
        "The file is a palette PNG ('P' mode), which stores each pixel's class as an index "
        "into its own palette: data.mask_mode=index reads those indices as the class ids "
        "(data.mask_mode=palette reads the colours its palette shows them in; add those to "
        "data.palette to keep reading colours)."
    )


def _transparent_hint(path: Path, unknown: np.ndarray) -> str | None:
    """The fix when the pixels of unknown colours are all fully transparent in the file
    (alpha 0): annotation tools export an unlabelled background so, often as transparent
    white, and lungseg reads the colour, not the transparency. None otherwise (or when the
    file cannot be read again as it is)."""
    raw = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    if raw is None or raw.ndim != 3 or raw.shape[2] not in (2, 4) or raw.shape[:2] != unknown.shape:
        return None
    if (raw[..., -1][unknown] != 0).any():
        return None
    return (
        "These pixels are fully transparent in the file (alpha 0), and lungseg reads the "
        "colour, not the transparency: flatten the masks onto the background colour, e.g. "
        "ImageMagick: magick FILE -background black -alpha remove -alpha off OUT.png (or add "
        "the colour to data.palette as the background's)."
    )


def _pack(rgb: np.ndarray) -> np.ndarray:
    """(..., 3) RGB → (...) int32 R << 16 | G << 8 | B."""
    r, g, b = (rgb[..., i].astype(np.int32) for i in range(3))
    return r << 16 | g << 8 | b


def _colour_text(key: int) -> str:
    """A packed colour (``_pack``) as "(R, G, B)"."""
    key = int(key)
    return f"({key >> 16}, {key >> 8 & 255}, {key & 255})"


def _values(values: np.ndarray) -> str:
    shown = ", ".join(str(v) for v in values[:_SHOWN].tolist())
    return shown if len(values) <= _SHOWN else f"{shown}, ... ({len(values)} values in total)"
