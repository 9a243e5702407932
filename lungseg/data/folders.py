"""Find image/mask files, pair them by name, and read and write pixels.

Pairing is by file stem, never by sorted position: image `a.png` takes the mask whose stem is
`a` + one of `mask_suffixes`, with any image extension (`a.png`, `a_mask.tif`, ...). With
``recursive`` the sub-folders are searched too and a file's key is its path below the folder
without extension (`p01/slice_003`): image `p01/slice_003.png` pairs with mask
`p01/slice_003.png` (or `p01/slice_003_mask.png`) below the mask folder. Folder patterns
(`Train/*/images` with `Train/*/masks`) pair each folder the image pattern matches with the mask
folder its wildcards fill in; a file's key starts with the matched folder names
(`COVID-19/covid_1`).
"""

import csv
import glob
import logging
import os
import re
import struct
import unicodedata
import zlib
from collections import defaultdict
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from lungseg.errors import LungsegError, counted

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
# predict.py marks its output folders with this hidden file: a search of sub-folders never
# takes an earlier run's masks and overlays for images
OUTPUT_MARKER = ".lungseg-predictions"
PIXEL_DTYPES = (np.uint8, np.uint16, np.float32)
_SHOWN = 5  # how many offending file names an error message lists

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Pair:
    stem: str  # the image's key (file_key): its stem, or `sub/folder/stem` when recursive
    image: Path
    mask: Path
    # data.mask_dir as a list of folders (one class each): the masks of the 2nd, 3rd, ... folder
    more_masks: tuple[Path, ...] = ()
    # folder patterns: how many of the stem's leading parts name the matched folders
    prefix_parts: int = 0

    @property
    def masks(self) -> tuple[Path, ...]:
        """Every mask file of the pair, in the order of data.mask_dir's folders."""
        return (self.mask, *self.more_masks)


def suffix_list(value: Any) -> list[str]:
    """data.mask_suffixes as a list of strings: one suffix (``data.mask_suffixes=_seg``) is a
    list of one, not of its characters; anything but strings is a LungsegError."""
    if isinstance(value, str):
        return [value]
    values = list(value) if isinstance(value, Sequence) else None
    if values is None or not all(isinstance(v, str) for v in values):
        raise LungsegError(
            f"data.mask_suffixes is {value!r}; give the endings a mask's name adds to its "
            f"image's name, as a list, e.g. data.mask_suffixes=[_mask] (a.png and a_mask.png) "
            f"or data.mask_suffixes=['',_mask] (also a mask named as its image)."
        )
    return values


def find_pairs(
    image_dir: str | Path,
    mask_dir: str | Path | Sequence[str | Path],
    mask_suffixes: Sequence[str] = ("", "_mask"),
    strict: bool = True,
    skipped: list[tuple[Path, str]] | None = None,
    recursive: bool = False,
) -> list[Pair]:
    """Pair images and masks by file stem, never by sorted position. Image `a.png` pairs with a
    mask whose stem is `a` + one of mask_suffixes (`a.png`, `a_mask.png`, also other extensions:
    `a.tif`). Returns pairs sorted by stem.

    With ``recursive`` both folders are searched with their sub-folders (hidden ones and, when
    one data folder lies inside the other, that one excepted) and the image `p01/a.png` pairs
    with the mask `p01/a.png` or `p01/a_mask.png` of the mask folder: the stem is the path
    below the folder (``file_key``).

    ``mask_dir`` may list several folders, each with one binary mask per image (one class
    each, e.g. Montgomery's leftMask and rightMask): an image then pairs only when every
    folder has its mask, and ``Pair.more_masks`` holds those of the second folder on.

    Folder patterns (``*`` and ``?`` in folder names, e.g. `Train/*/images` with
    `Train/*/masks`): see ``pattern_folders``; each matched image folder is paired with its
    mask folder(s) as above, and its pairs' stems start with the matched folder names.

    Files without an image extension and hidden files (`.DS_Store`, macOS `._a.png`) are ignored.
    When image_dir and mask_dir are the same folder, files whose stem ends with a non-empty
    suffix are the masks and the others the images. Unpaired files raise LungsegError
    (strict=True) or are skipped with one warning (strict=False) and appended to ``skipped``
    as (path, reason); ambiguous names always raise.
    """
    image_dir, mask_dirs = Path(image_dir).expanduser(), mask_folders(mask_dir)
    mask_suffixes = suffix_list(mask_suffixes)
    if is_pattern(image_dir) or any(is_pattern(m) for m in mask_dirs):
        return _find_pattern_pairs(image_dir, mask_dirs, mask_suffixes, strict, skipped, recursive)
    suffixes = list(dict.fromkeys(mask_suffixes))
    if len(mask_dirs) > 1:
        return _find_layered_pairs(image_dir, mask_dirs, suffixes, strict, skipped, recursive)
    mask_dir = mask_dirs[0]
    same = image_dir.resolve() == mask_dir.resolve()
    images = _list_images(
        image_dir, "image", "data.image_dir", recursive, [] if same else mask_dirs
    )
    if same:
        mask_dir = image_dir  # the masks are listed below image_dir (however it is spelled)
        suffixes = [s for s in suffixes if s]
        if not suffixes:
            raise LungsegError(
                f"data.image_dir and data.mask_dir are the same folder ({image_dir}), but "
                f"data.mask_suffixes {list(mask_suffixes)} has no non-empty suffix, so masks "
                "cannot be told apart from images. Name the masks like 'a_mask.png' for image "
                "'a.png' and set data.mask_suffixes=['_mask'], or move the masks into their "
                "own folder."
            )
        masks = [p for p in images if _ends_with_any(p.stem, suffixes)]
        images = [p for p in images if not _ends_with_any(p.stem, suffixes)]
        if not masks:
            raise LungsegError(
                f"data.image_dir and data.mask_dir are the same folder ({image_dir}), so masks "
                f"are the files whose names end with one of data.mask_suffixes {suffixes} (e.g. "
                f"'a{suffixes[0]}.png' for 'a.png'), but none of its {len(images)} files does. "
                "Set data.mask_dir to the folder of the masks, or data.mask_suffixes to how "
                "their names end."
            )
        if not images:
            raise LungsegError(
                f"Every image file in {image_dir} ends with a mask suffix from "
                f"data.mask_suffixes {suffixes}, so no images are left. Check "
                "data.mask_suffixes or keep images and masks in separate folders."
            )
    else:
        masks = _list_images(mask_dir, "mask", "data.mask_dir", recursive, [image_dir])

    image_by_stem = _index_images_by_stem(images, image_dir)
    masks_by_stem, orphan_images, orphan_masks = _pair_folder(
        masks, image_by_stem, suffixes, mask_dir
    )

    if orphan_images or orphan_masks:
        groups = [
            (orphan_images, "images", "a mask", image_dir),
            (orphan_masks, "masks", "an image", mask_dir),
        ]
        _report_unpaired(
            groups, image_dir, mask_dir, suffixes, strict, bool(masks_by_stem), recursive
        )
        if skipped is not None:
            skipped += [(p, "image without a mask") for p in orphan_images]
            skipped += [(p, "mask without an image") for p in orphan_masks]
    return [Pair(s, image_by_stem[s], masks_by_stem[s][0]) for s in sorted(masks_by_stem)]


_WILDCARD = re.compile(r"[*?]")


def is_pattern(folder: str | Path) -> bool:
    """Whether a data folder setting is a folder pattern (``*`` or ``?`` in a folder name)."""
    return bool(_WILDCARD.search(str(folder)))


def _part_regex(part: str) -> re.Pattern:
    """A folder name pattern as a regex with one group per wildcard."""
    pieces = _WILDCARD.split(part)
    groups = ["([^/]*)" if w == "*" else "([^/])" for w in _WILDCARD.findall(part)]
    regex = re.escape(pieces[0]) + "".join(
        g + re.escape(p) for g, p in zip(groups, pieces[1:], strict=True)
    )
    return re.compile(regex)


def pattern_folders(
    image_dir: Path, mask_dirs: Sequence[Path], setting: str = "data.image_dir"
) -> tuple[list[tuple[str, Path, list[Path]]], int]:
    """The folders a data.image_dir pattern matches, each as (its key prefix, the folder, its
    mask folders), sorted, and the prefix's number of parts. A folder name with ``*`` (any
    characters) or ``?`` (one) is a pattern; hidden folders never match. Each mask folder
    setting holds as many wildcards as data.image_dir, filled with what they matched there,
    in order (`Train/*/images` -> `Train/*/lung masks`, `*_images` -> `*_masks`). The key
    prefix is the matched folder names (`COVID-19` for `Train/COVID-19/images`), "/" between
    them. ``setting`` names the image folder setting in messages (predict.py's input_dir
    matches its folders alike, without mask folders)."""
    if "**" in str(image_dir) or any("**" in str(m) for m in mask_dirs):
        masks = f" or data.mask_dir {[str(m) for m in mask_dirs]}" if mask_dirs else ""
        flag = _recursive_flag(setting)
        raise LungsegError(
            f"{setting} {image_dir}{masks} uses '**'. Folder patterns take '*' and '?' within "
            "folder names (Train/*/images); to search all sub-folders of a folder, give the "
            f"folder and {flag}=true."
        )
    parts = image_dir.parts
    wild = [i for i, part in enumerate(parts) if is_pattern(part)]
    count = sum(len(_WILDCARD.findall(parts[i])) for i in wild)
    if not wild:
        raise LungsegError(
            f"data.mask_dir {[str(m) for m in mask_dirs]} holds wildcards ('*', '?') but "
            f"data.image_dir {image_dir} does not: a mask folder pattern is filled with what "
            "the image folder pattern matched (Train/*/images and Train/*/masks)."
        )
    for i, mask_dir in enumerate(mask_dirs):
        given = len(_WILDCARD.findall(str(mask_dir)))
        if given != count:
            setting = "data.mask_dir" + (f"[{i}]" if len(mask_dirs) > 1 else "")
            raise LungsegError(
                f"{setting} {mask_dir} holds {given} wildcards ('*', '?') but data.image_dir "
                f"{image_dir} holds {count}: each wildcard of the mask folder is filled with "
                "what the image folder's wildcards matched, in order. Give both the same "
                "wildcards (Train/*/images and Train/*/masks)."
            )
    pattern = os.path.join(*(_glob_part(part) for part in parts))
    regexes = {i: _part_regex(parts[i]) for i in wild}
    found = []
    for match in sorted(glob.glob(pattern)):
        folder = Path(match)
        if not folder.is_dir() or len(folder.parts) != len(parts):
            continue
        # what each wildcard matched (glob and the regexes read a pattern alike; glob's
        # wildcards never match a leading ".", so hidden folders are not found)
        fills = [v for i in wild for v in regexes[i].fullmatch(folder.parts[i]).groups()]
        masks = [_fill(m, fills) for m in mask_dirs]
        found.append(("/".join(folder.parts[i] for i in wild), folder, masks))
    if not found:
        raise LungsegError(
            f"The image folder pattern {image_dir} ({setting}) matches no folder. "
            f"Check the path; '*' stands for any characters of one folder name, '?' for one."
        )
    return found, len(wild)


def _glob_part(part: str) -> str:
    """A folder name pattern for glob: its wildcards kept, everything else literal."""
    pieces, wildcards = _WILDCARD.split(part), _WILDCARD.findall(part)
    return glob.escape(pieces[0]) + "".join(
        w + glob.escape(p) for w, p in zip(wildcards, pieces[1:], strict=True)
    )


def _fill(mask_dir: Path, values: list[str]) -> Path:
    """A mask folder pattern with its wildcards replaced by ``values``, in order."""
    it = iter(values)
    return Path(_WILDCARD.sub(lambda _: next(it), str(mask_dir)))


def _find_pattern_pairs(
    image_dir: Path,
    mask_dirs: list[Path],
    mask_suffixes: Sequence[str],
    strict: bool,
    skipped: list[tuple[Path, str]] | None,
    recursive: bool,
) -> list[Pair]:
    """find_pairs for folder patterns: every matched image folder paired with its mask
    folder(s); an image folder whose mask folder is missing is reported with the others."""
    found, depth = pattern_folders(image_dir, mask_dirs)
    missing = [(f, [m for m in masks if not m.is_dir()]) for _, f, masks in found]
    missing = [(f, ms) for f, ms in missing if ms]
    if missing:
        listing = _listing(f"{f} (needs {', '.join(map(str, ms))})" for f, ms in missing)
        if strict or len(missing) == len(found):
            raise LungsegError(
                f"{len(missing)} of the {len(found)} folders that data.image_dir {image_dir} "
                f"matches have no mask folder: {listing}. Each mask folder is data.mask_dir "
                "with its wildcards filled in as the image folder matched them. Add the mask "
                "folders, narrow the pattern, or set data.strict=false to skip those folders."
            )
        log.warning("Skipping image folders without a mask folder (data.strict=false): %s", listing)
        if skipped is not None:
            skipped += [(f, f"no mask folder {', '.join(map(str, ms))}") for f, ms in missing]
    pairs = []
    absent = {f for f, _ in missing}
    with one_unread_warning(image_dir):
        for prefix, folder, masks in found:
            if folder in absent:
                continue
            target = masks[0] if len(masks) == 1 else masks
            for pair in find_pairs(folder, target, mask_suffixes, strict, skipped, recursive):
                pairs.append(
                    Pair(f"{prefix}/{pair.stem}", pair.image, pair.mask, pair.more_masks, depth)
                )
    return sorted(pairs, key=lambda pair: pair.stem)


def mask_folders(mask_dir: str | Path | Sequence[str | Path]) -> list[Path]:
    """data.mask_dir as a list of folders: one folder, or the folders of a list."""
    if isinstance(mask_dir, Mapping):
        raise LungsegError(
            f"data.mask_dir is a mapping ({dict(mask_dir)}); give a folder, or a list of "
            f"folders that each hold one class's binary masks, e.g. data.mask_dir=[left,right]."
        )
    if isinstance(mask_dir, (str, Path)) or not isinstance(mask_dir, Iterable):
        return [Path(str(mask_dir)).expanduser()]  # a folder named 2024 is read as a number
    folders = [Path(str(m)).expanduser() for m in mask_dir]
    if not folders:
        raise LungsegError(
            "data.mask_dir is an empty list. Give the mask folder, or a list of folders "
            "that each hold one class's binary masks, e.g. data.mask_dir=[left,right]."
        )
    return folders


def _find_layered_pairs(
    image_dir: Path,
    mask_dirs: list[Path],
    suffixes: list[str],
    strict: bool,
    skipped: list[tuple[Path, str]] | None,
    recursive: bool,
) -> list[Pair]:
    """find_pairs for several mask folders: each is paired with the images on its own; an
    image is kept when every folder has its mask."""
    resolved = [m.resolve() for m in mask_dirs]
    if image_dir.resolve() in resolved or len(set(resolved)) < len(resolved):
        raise LungsegError(
            f"data.mask_dir lists {[str(m) for m in mask_dirs]}: with several mask folders "
            f"each must be its own folder (not data.image_dir {image_dir}, and none twice), "
            f"holding one class's binary masks under the images' names."
        )
    images = _list_images(image_dir, "image", "data.image_dir", recursive, mask_dirs)
    image_by_stem = _index_images_by_stem(images, image_dir)
    per_folder, groups = [], []
    missing: dict[Path, list[Path]] = defaultdict(list)  # image: the folders without its mask
    for i, mask_dir in enumerate(mask_dirs):
        setting = f"data.mask_dir[{i}]"
        others = [image_dir, *mask_dirs[:i], *mask_dirs[i + 1 :]]  # kept inside this one
        masks = _list_images(mask_dir, "mask", setting, recursive, others)
        by_stem, orphan_images, orphan_masks = _pair_folder(
            masks, image_by_stem, suffixes, mask_dir
        )
        for image in orphan_images:
            missing[image].append(mask_dir)
        groups.append((orphan_images, "images", f"a mask in {mask_dir}", image_dir))
        groups.append((orphan_masks, "masks", "an image", mask_dir))
        if skipped is not None:
            skipped += [(p, "mask without an image") for p in orphan_masks]
        per_folder.append(by_stem)
    common = sorted(set.intersection(*(set(by_stem) for by_stem in per_folder)))
    if any(paths for paths, *_ in groups):  # every folder's gaps in one report
        _report_unpaired(
            groups, image_dir, "data.mask_dir", suffixes, strict, bool(common), recursive
        )
        if skipped is not None:
            skipped += [
                (image, f"image without a mask in {', '.join(map(str, folders))}")
                for image, folders in sorted(missing.items())
            ]
    if not common:
        raise LungsegError(
            f"No image in {image_dir} has a mask in every folder of data.mask_dir "
            f"({', '.join(map(str, mask_dirs))}). Each folder needs a mask for each image, "
            "under the image's name (plus one of data.mask_suffixes)."
        )
    return [
        Pair(s, image_by_stem[s], per_folder[0][s][0], tuple(f[s][0] for f in per_folder[1:]))
        for s in common
    ]


def existing(paths: Iterable[Path]) -> list[Path]:
    """The ``paths`` taken by a file, folder or link (a dangling link exists as a name, and
    writing through it would write outside the folder): outputs that must not be replaced."""
    return [p for p in paths if p.exists() or p.is_symlink()]


def check_writable(path: Path, fix: str) -> None:
    """LungsegError, before any work, when this user cannot write to ``path`` (a folder), or,
    where it does not exist yet, to the nearest folder above it (where it would be made).
    ``fix`` ends the message: which setting to change. Root passes, as it may write anyway;
    a file in the way is left to the write (``writing``)."""
    path = path.expanduser().absolute()
    folder = next(p for p in (path, *path.parents) if p.exists())
    if folder.is_dir() and not os.access(folder, os.W_OK | os.X_OK):
        raise LungsegError(
            f"Cannot write to {path}: {'it' if folder == path else folder} is not writable for "
            f"this user (no permission, or a read-only disk). Nothing was written. {fix}"
        )


@contextmanager
def writing(path: Path, fix: str) -> Iterator[None]:
    """Turns an OSError raised inside (no permission, a full or read-only disk) into a
    LungsegError that names the file (``path`` unless the error names another) and ``fix``."""
    try:
        yield
    except OSError as error:
        raise LungsegError(
            f"Could not write {error.filename or path}: {error.strerror or error}. {fix}"
        ) from error


def check_output_folder(folder: Path) -> None:
    """LungsegError when ``output_dir`` names a file, not a folder (created if needed)."""
    if folder.exists() and not folder.is_dir():
        raise LungsegError(f"output_dir {folder} is a file; give a folder (created if needed).")


def check_data_dirs(image_dir: str | Path | None, mask_dir: Any, recursive: bool = False) -> None:
    """LungsegError unless data.image_dir and data.mask_dir, where set, are existing folders.
    Checked first: a mistyped path also makes the settings that suit the data look wrong
    (data.palette, needed for your own palette masks), and the path is the mistake to report."""
    if image_dir is not None and mask_dir is not None:
        image_dir, folders = Path(image_dir).expanduser(), mask_folders(mask_dir)
        if is_pattern(image_dir) or any(is_pattern(f) for f in folders):
            # each matched folder's mask folders are checked when pairing
            pattern_folders(image_dir, folders)
            return
    if image_dir is not None:
        _check_folder(Path(image_dir).expanduser(), "image", "data.image_dir")
    if mask_dir is not None:
        folders = mask_folders(mask_dir)
        for i, folder in enumerate(folders):
            _check_folder(folder, "mask", "data.mask_dir" + (f"[{i}]" if len(folders) > 1 else ""))
    if image_dir is not None and not recursive:  # sub-folders may hold the slices
        _check_not_volumes(Path(image_dir).expanduser(), "image", "data.image_dir")


def _check_not_volumes(folder: Path, role: str, setting: str) -> None:
    """``_no_images``' LungsegError where ``folder`` holds volumes (DICOM, NIfTI, ...) and no
    image file: the error that says to export slices, before the settings that suit images
    are checked (the default palette mask mode's missing data.palette came first)."""
    if any(p.suffix.lower() in IMAGE_EXTENSIONS and p.name[:1] != "." for p in folder.iterdir()):
        return
    held, volumes = _held(folder)
    if volumes:
        raise _no_images(folder, role, setting, f"holds no image files{held}", "")


def _check_folder(folder: Path, role: str, setting: str) -> None:
    if not folder.is_dir():
        problem = "is not a folder" if folder.exists() else "does not exist"
        raise LungsegError(
            f"The {role} folder {folder} {problem}. Set {setting} to the folder that holds "
            f"your {role} files (a relative path is resolved from the directory you run in)."
        )


def _recursive_flag(setting: str) -> str:
    """The setting that searches sub-folders beside a folder setting (data.image_dir →
    data.recursive, predict.py's input_dir → recursive)."""
    return f"{setting.rpartition('.')[0]}.recursive".lstrip(".")


def _list_images(
    folder: Path, role: str, setting: str, recursive: bool = False, skip: Sequence[Path] = ()
) -> list[Path]:
    """The image files of ``folder`` (sorted; hidden files left out); with ``recursive`` also
    those of its sub-folders, except hidden ones and those of ``skip`` (the other data
    folders, or an output folder, when they lie inside this one)."""
    _check_folder(folder, role, setting)
    found = list(_walk(folder, skip) if recursive else folder.iterdir())
    files = sorted(
        p
        for p in found
        if p.suffix.lower() in IMAGE_EXTENSIONS and not p.name.startswith(".") and p.is_file()
    )
    if files:
        _warn_unread(found, folder, role)
    else:
        flag = _recursive_flag(setting)
        where = (
            "holds no image files, in it or its sub-folders"
            if recursive
            else f"holds no image files{_contents(folder)}"
        )
        hint = _mask_folders_hint(folder, setting) if role == "mask" and not recursive else ""
        if hint:
            raise LungsegError(f"The mask folder {folder} {where}. {hint}")
        searched = "" if recursive else f"; sub-folders are not searched unless {flag}=true"
        raise _no_images(folder, role, setting, where, searched)
    return files


def _mask_folders_hint(folder: Path, setting: str) -> str:
    """For a mask folder without image files whose sub-folders hold them: one such
    sub-folder is the mask folder meant; several, as Montgomery's ManualMask/leftMask and
    rightMask, are most likely a class each, which a list of folders reads. "" where no
    sub-folder holds images (or they cannot be listed)."""
    try:
        held = [
            sub
            for sub in sorted(folder.iterdir())
            if sub.is_dir()
            and not sub.name.startswith(".")
            and any(p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file() for p in sub.iterdir())
        ]
    except OSError:  # a hint only
        return ""
    if len(held) == 1:
        return f"Its sub-folder {held[0].name} holds images: give {setting}={held[0]}."
    if len(held) > 1:
        listed = ",".join(str(sub) for sub in held)
        return (
            f"Its sub-folders {', '.join(sub.name for sub in held)} hold images: masks split "
            f"over folders, one class each, are read from a list of them, "
            f'"{setting}=[{listed}]" with data.mask_mode=binary (one foreground class) or '
            f"index (a class each)."
        )
    return ""


def _no_images(folder: Path, role: str, setting: str, where: str, searched: str) -> LungsegError:
    """The error for a data folder without image files (``where``: what it holds)."""
    return LungsegError(
        f"The {role} folder {folder} {where}. Accepted extensions: "
        f"{', '.join(IMAGE_EXTENSIONS)} (in any letter case){searched}. Point {setting} at "
        "the folder with the files or convert them to one of these formats."
    )


# Image formats (and volumes) that lungseg does not read: files of these kinds beside the
# images get a warning, as a file without its pair would otherwise be the only sign of them.
# fmt: off
OTHER_IMAGE_SUFFIXES = (
    ".webp", ".gif", ".jp2", ".j2k", ".pgm", ".ppm", ".pbm", ".pnm", ".exr", ".hdr", ".heic",
    ".heif", ".avif", ".svg",
)
# fmt: on


# While the folders a pattern matches are listed (one_unread_warning): role -> the files of
# formats lungseg does not read, for one warning over all of them.
_UNREAD: dict[str, list[Path]] | None = None


def write_reasons(path: Path, left_out: Sequence[tuple[Path, str]]) -> None:
    """The files ``strict=false`` left out as CSV ``file,reason`` (training's skipped.csv,
    eval.py's unscored.csv): the warnings name the first few only."""
    with Path(path).open("w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f, lineterminator="\n")
        writer.writerow(["file", "reason"])
        writer.writerows((str(file), reason) for file, reason in left_out)


def _unread_kind(path: Path) -> str | None:
    """The suffix of an image or volume format lungseg does not read, or None."""
    name = path.name.lower()
    if name.startswith("."):
        return None
    return next((s for s in (*OTHER_IMAGE_SUFFIXES, *VOLUME_SUFFIXES) if name.endswith(s)), None)


def _warn_unread(found: Sequence[Path], folder: Path | str, role: str) -> None:
    """A warning that names the image files of ``found`` that are skipped for their format
    (collected instead inside ``one_unread_warning``)."""
    unread = [p for p in sorted(found) if _unread_kind(p)]
    if _UNREAD is not None:
        _UNREAD.setdefault(role, []).extend(unread)
    elif unread:
        _log_unread(unread, str(folder), role)


def _log_unread(unread: list[Path], folder: str, role: str) -> None:
    kinds: dict[str, int] = defaultdict(int)
    for path in unread:
        kinds[_unread_kind(path)] += 1
    first = unread[0]
    log.warning(
        "%s in the %s folder %s %s not read: lungseg reads %s (%s; e.g. %s). Convert %s to "
        "PNG (a volume: one PNG a slice) to use %s.",
        counted(len(unread), "file"),
        role,
        folder,
        "is" if len(unread) == 1 else "are",
        ", ".join(IMAGE_EXTENSIONS),
        ", ".join(f"{k}: {n}" for k, n in sorted(kinds.items())),
        _shown(first, Path(folder)) if first.is_relative_to(folder) else first,
        "it" if len(unread) == 1 else "them",
        "it" if len(unread) == 1 else "them",
    )


@contextmanager
def one_unread_warning(folders: str | Path | None) -> Iterator[None]:
    """The unread-format warnings of the folders listed inside, as one per role, naming
    ``folders`` (a folder pattern, whose matches are listed one by one); None: none (folders
    listed again, whose files were warned about before)."""
    global _UNREAD
    outer, _UNREAD = _UNREAD, {}
    try:
        yield
    finally:
        collected, _UNREAD = _UNREAD, outer
    for role, unread in collected.items():
        if unread and folders is not None:
            _log_unread(unread, str(folders), role)


def _walk(folder: Path, skip: Sequence[Path]) -> list[Path]:
    """Every file below ``folder``, hidden folders, those of ``skip`` and predict.py's output
    folders (marked by OUTPUT_MARKER) left out. Each folder is taken once, under its own path
    when it lies in the tree: a link to a folder of the tree is passed over (a link back up
    would loop, a second name would list its files twice), a link out of it followed once."""
    skipped = {os.path.realpath(s) for s in skip}
    # the tree's own folders: a link to one of them is passed over (its files are listed
    # under their own path); a link out of the tree is followed, once
    inside = {os.path.realpath(top) for top, _, _ in os.walk(folder)}
    seen = {os.path.realpath(folder)}  # every folder taken, whatever the path that led to it
    files = []
    for top, dirs, names in os.walk(folder, followlinks=True):
        kept = []
        for d in sorted(dirs):
            path = os.path.join(top, d)
            real = os.path.realpath(path)
            if d.startswith(".") or real in skipped or real in seen:
                continue
            if os.path.islink(path) and real in inside:
                continue
            if os.path.exists(os.path.join(real, OUTPUT_MARKER)):  # predict.py's outputs
                continue
            seen.add(real)
            kept.append(d)
        dirs[:] = kept
        files += [Path(top, name) for name in names]
    return files


def file_key(path: Path, root: Path) -> str:
    """A file's key in its data folder: its path below ``root`` without the extension, with
    "/" between folders (`a` for root/a.png, `p01/a` for root/p01/a.png), in Unicode's
    composed form (NFC): `é` written as one character or as `e` and an accent (macOS writes
    names decomposed) looks the same on screen, and an image and its mask saved on different
    systems must still pair."""
    return unicodedata.normalize("NFC", path.relative_to(root).with_suffix("").as_posix())


def _shown(path: Path, root: Path) -> str:
    """A file as messages name it: its path below its data folder (its name when directly in
    it)."""
    return path.relative_to(root).as_posix()


# Medical volume formats, by how their file names end; DICOM files often have no extension.
VOLUME_SUFFIXES = (".dcm", ".dicom", ".ima", ".nii", ".nii.gz", ".mha", ".mhd", ".nrrd")


def _contents(folder: Path) -> str:
    """What a folder without image files holds, for the error: its other files by kind and its
    sub-folders, with how to turn volumes (DICOM, NIfTI, ...) into slices lungseg reads."""
    return _held(folder)[0]


def _held(folder: Path) -> tuple[str, bool]:
    """``_contents``' text, and whether the folder holds volumes (DICOM, NIfTI, ...)."""
    kinds: dict[str, int] = defaultdict(int)
    folders: list[str] = []
    hidden = 0
    for path in sorted(folder.iterdir()):
        if path.name.startswith("."):
            hidden += 1
        elif path.is_dir():
            folders.append(path.name)
        else:
            name = path.name.lower()
            kind = next((s for s in VOLUME_SUFFIXES if name.endswith(s)), None)
            # DICOM files are often named by UID (1.2.840.113619.2.55.3.101): the content says
            if kind is None and sum(kinds.values()) < 500 and _is_dicom(path):
                kind = "DICOM"
            kind = kind or path.suffix.lower() or "without extension"
            kinds[kind] += 1
    if not kinds and not folders:
        return (" (it holds only hidden files)" if hidden else " (it is empty)"), False
    ranked = sorted(kinds.items(), key=lambda item: -item[1])
    held = [
        f"{n} file{'s' * (n != 1)} without extension"
        if k == "without extension"
        else f"{n} {k} file{'s' * (n != 1)}"
        for k, n in ranked[:4]
    ]
    if len(ranked) > 4:
        held.append(f"{sum(n for _, n in ranked[4:])} files of {len(ranked) - 4} other kinds")
    if folders:
        held.append(f"{len(folders)} sub-folder{'s' * (len(folders) != 1)} ({_listing(folders)})")
    volumes = any(k in VOLUME_SUFFIXES or k == "DICOM" for k in kinds)
    hint = (
        ": lungseg reads 2-D slices; export each slice of the volumes as a PNG (16-bit for CT, "
        "e.g. the value + 32768 with data.intensity_offset=32768) with its mask under the same "
        "name"
        if volumes
        else ""
    )
    return f" (it holds {', '.join(held)}{hint})", volumes


def _is_dicom(path: Path) -> bool:
    """Whether ``path`` starts like a DICOM file ('DICM' after a 128-byte preamble)."""
    try:
        with path.open("rb") as f:
            return f.read(132)[128:] == b"DICM"
    except OSError:
        return False


def _ends_with_any(stem: str, suffixes: Iterable[str]) -> bool:
    return any(len(stem) > len(s) and stem.endswith(s) for s in suffixes)


def _index_images_by_stem(images: list[Path], image_dir: Path) -> dict[str, Path]:
    by_stem: dict[str, list[Path]] = defaultdict(list)
    for path in images:
        by_stem[file_key(path, image_dir)].append(path)
    clashes = sorted(
        " and ".join(_shown(p, image_dir) for p in ps) for ps in by_stem.values() if len(ps) > 1
    )
    if clashes:
        raise LungsegError(
            f"{len(clashes)} image names in {image_dir} appear with more than one extension: "
            f"{_listing(clashes)}. Images are identified by file name without extension, so "
            "each name must be used once. Remove or rename the duplicates."
        )
    return {stem: ps[0] for stem, ps in by_stem.items()}


def _pair_folder(
    masks: list[Path], image_by_stem: dict[str, Path], suffixes: list[str], mask_dir: Path
) -> tuple[dict[str, list[Path]], list[Path], list[Path]]:
    """One mask folder against the images: (masks by image stem, images without a mask,
    masks without an image); LungsegError for ambiguous names."""
    by_stem, orphan_masks = _match_masks(masks, image_by_stem, suffixes, mask_dir)
    _check_one_mask_each(by_stem, image_by_stem, suffixes, mask_dir)
    orphan_images = sorted(p for s, p in image_by_stem.items() if s not in by_stem)
    return by_stem, orphan_images, orphan_masks


def layer_names(folders: Sequence[Path]) -> list[str]:
    """Class names for mask folders that hold one class each: the folder names, or with as
    many parent folders as tell them apart (lungs/masks, heart/masks → lungs_masks,
    heart_masks); [] when nothing does."""
    for depth in range(1, max(len(f.parts) for f in folders) + 1):
        names = ["_".join(f.parts[-depth:]) for f in folders]
        if len(set(names)) == len(names):
            return names
    return []


def layer_folders(pair: Pair) -> list[Path]:
    """The mask folders a pair's masks were found in (data.mask_dir's list, in its order):
    each mask lies as deep below its folder as the image below data.image_dir (below the
    matched folder, for folder patterns)."""
    depth = pair.stem.count("/") - pair.prefix_parts
    return [mask.parents[depth] for mask in pair.masks]


def _match_masks(
    masks: list[Path], image_by_stem: dict[str, Path], suffixes: list[str], mask_dir: Path
) -> tuple[dict[str, list[Path]], list[Path]]:
    """Assign each mask to the one image stem it can belong to. Every suffix is tried, so with
    suffixes ("", "_mask") the mask `a_mask.png` belongs to image `a` when that image exists and
    to an image named `a_mask` otherwise; a mask that fits two existing images is an error."""
    masks_by_stem: dict[str, list[Path]] = defaultdict(list)
    orphans, clashes = [], []
    for mask in masks:
        key = file_key(mask, mask_dir)
        stems = {key[: len(key) - len(s)] for s in suffixes if key.endswith(s)}
        candidates = sorted(s for s in stems if s in image_by_stem)
        if not candidates:
            orphans.append(mask)
        elif len(candidates) > 1:
            names = " and ".join(f"{s}{image_by_stem[s].suffix}" for s in candidates)
            clashes.append(f"{_shown(mask, mask_dir)} (fits images {names})")
        else:
            masks_by_stem[candidates[0]].append(mask)
    if clashes:
        raise LungsegError(
            f"{len(clashes)} masks in {mask_dir} match more than one image with "
            f"data.mask_suffixes {suffixes}: {_listing(clashes)}. Rename the images or masks so "
            "that each mask name is an image name plus exactly one suffix, or narrow "
            "data.mask_suffixes."
        )
    return dict(masks_by_stem), orphans


def _check_one_mask_each(
    masks_by_stem: dict[str, list[Path]],
    image_by_stem: dict[str, Path],
    suffixes: list[str],
    mask_dir: Path,
) -> None:
    clashes = sorted(
        f"{stem}{image_by_stem[stem].suffix} (masks "
        f"{' and '.join(sorted(_shown(p, mask_dir) for p in ms))})"
        for stem, ms in masks_by_stem.items()
        if len(ms) > 1
    )
    if clashes:
        raise LungsegError(
            f"{counted(len(clashes), 'image')} {'has' if len(clashes) == 1 else 'have'} more "
            f"than one matching mask in {mask_dir} with "
            f"data.mask_suffixes {suffixes}: {_listing(clashes)}. Keep one mask per image "
            "(remove the others), or narrow data.mask_suffixes to the naming you use."
        )


def _report_unpaired(
    groups: list[tuple[list[Path], str, str, Path]],
    image_dir: Path,
    mask_dir: Path | str,
    suffixes: list[str],
    strict: bool,
    any_paired: bool,
    recursive: bool = False,
) -> None:
    """Raise (strict) or warn about unpaired files; ``groups`` are (files, "images" or
    "masks", what they lack, the folder they are named from)."""
    found = " and ".join(
        f"{len(paths)} {kind if len(paths) != 1 else kind.rstrip('s')} without {other} "
        f"({folder}): "
        f"{_listing(_shown(p, folder) for p in paths)}"
        for paths, kind, other, folder in groups
        if paths
    )
    rule = (
        f"Image 'NAME.ext' pairs with the mask named NAME + one of data.mask_suffixes {suffixes}, "
        f"with any of the extensions {', '.join(IMAGE_EXTENSIONS)}"
        + (
            ", in the same sub-folder below data.mask_dir as the image below data.image_dir."
            if recursive
            else "."
        )
    )
    hint = _suffix_hint(groups[0][0], groups[1][0], suffixes)
    if strict:
        raise LungsegError(
            f"Found {found}. {rule}{hint} Add the missing files, remove them, set "
            "data.mask_suffixes, or set data.strict=false to skip them."
        )
    if not any_paired:
        raise LungsegError(
            f"No image in {image_dir} has a mask in {mask_dir}. Found {found}. {rule}{hint} "
            "Check data.image_dir, data.mask_dir and data.mask_suffixes."
        )
    log.warning("Skipping unpaired files (data.strict=false). Found %s.", found)


def _suffix_hint(images: Sequence[Path], masks: Sequence[Path], suffixes: list[str]) -> str:
    """The data.mask_suffixes that would pair most of the unpaired masks with unpaired images
    (``a_label.png`` for ``a.png``: ``_label``), as a sentence, where it pairs at least half
    of them; "" otherwise (found by a new-user tester whose masks all ended in _label)."""
    stems = {p.stem for p in images}
    found: dict[str, int] = {}
    for mask in masks:
        for end in range(len(mask.stem) - 1, 0, -1):
            if mask.stem[:end] in stems:  # the longest image name the mask's name starts with
                found[mask.stem[end:]] = found.get(mask.stem[end:], 0) + 1
                break
    if not found:
        return ""
    suffix, count = max(found.items(), key=lambda item: item[1])
    if 2 * count < len(masks):
        return ""
    listed = ",".join(f"'{x}'" for x in [*suffixes, suffix])  # the pairs found stay paired
    return (
        f" {count} of the {len(masks)} unpaired masks are named as an unpaired image + "
        f'{suffix!r}: "data.mask_suffixes=[{listed}]" on the command line pairs them.'
    )


def _listing(names: Iterable[str]) -> str:
    names = list(names)
    shown = ", ".join(f"'{n}'" for n in names[:_SHOWN])
    return shown if len(names) <= _SHOWN else f"{shown}, ... ({len(names)} in total)"


def check_orientations(turned: Mapping[Pair, tuple[int, int, Path]]) -> None:
    """Warn about pairs whose image and mask carry different EXIF orientations: each file is
    turned as image viewers show it, which is right for masks drawn in a viewer or annotation
    tool, and wrong for masks made from the stored pixels (then image and mask disagree)."""
    if not turned:
        return
    pair, (turn, mask_turn, mask) = min(turned.items(), key=lambda item: item[0].stem)
    log.warning(
        "%d image/mask pairs carry different EXIF orientations, e.g. image %s (%s) and its mask "
        "%s (%s). lungseg turns each file as image viewers show it, which matches masks drawn "
        "on the image in a viewer or annotation tool. If the masks were made from the stored "
        "pixels instead, image and mask now disagree: remove the orientation tag from the "
        "images (e.g. exiftool -Orientation= <files>) or save them again without it.",
        len(turned),
        pair.image,
        ORIENTATIONS[turn],
        mask,
        ORIENTATIONS[mask_turn],
    )


def read_image(path: str | Path) -> np.ndarray:
    """Raw pixels as stored: (H, W) for grayscale or (H, W, 3) in RGB order; dtype uint8,
    uint16 (16-bit is kept) or float32 (float TIFF). An alpha channel is dropped (a file whose
    content is in its alpha alone is a LungsegError). A JPEG or PNG with an EXIF orientation is
    turned as image viewers show it (``exif_orientation``).

    Reads through np.fromfile + cv2.imdecode so non-ASCII and space-containing paths work.
    """
    return read_image_oriented(path)[0]


def read_image_oriented(path: str | Path) -> tuple[np.ndarray, int]:
    """``read_image``'s pixels and the EXIF orientation (1-8, 1 = as stored) applied to them."""
    path = Path(path)
    try:
        data = np.fromfile(path, dtype=np.uint8)
    except OSError as err:
        raise LungsegError(
            f"Could not read {path}: {err.strerror}. Check that the file exists and is readable."
        ) from err
    try:
        image = cv2.imdecode(data, cv2.IMREAD_UNCHANGED) if data.size else None
    except cv2.error:
        image = None
    if image is None:
        empty = " (the file is empty)" if data.size == 0 else ""
        raise LungsegError(
            f"{path} could not be decoded as an image{empty}: it is corrupt, truncated or not "
            f"in the format its extension says. Re-export it or remove it."
        )
    if image.dtype not in PIXEL_DTYPES:
        raise LungsegError(
            f"{path} stores pixels as {image.dtype}; lungseg reads 8-bit or 16-bit unsigned "
            "integer or 32-bit float images. Convert the file to one of these types (e.g. "
            "shift signed CT values by +1024 and save as 16-bit unsigned)."
        )
    pages = tiff_pages(data)
    if pages > 1:
        raise LungsegError(
            f"{path} is a TIFF of {pages} pages (a stack of slices or frames); lungseg reads "
            f"one 2-D image a file, and would see only the first page. Save each page as its "
            f"own file, with its mask under the same name (e.g. {path.stem}_000{path.suffix}, "
            f"{path.stem}_001{path.suffix}, ...; data.context_slices reads the slice number "
            f"from such names)."
        )
    if image.ndim == 3:
        image = _to_rgb(image, path)
    orientation = exif_orientation(data)
    return _apply_orientation(image, orientation), orientation


def tiff_pages(data: np.ndarray | bytes) -> int:
    """How many full-resolution images a TIFF holds (its IFD chain, leaving out reduced-
    resolution ones such as thumbnails: NewSubfileType bit 0); 1 for other formats, BigTIFF
    and a chain that leaves the file. cv2.imdecode reads the first page only."""
    buf = memoryview(data).cast("B") if len(data) else memoryview(b"")
    order = {b"II": "little", b"MM": "big"}.get(bytes(buf[:2]))
    if order is None or len(buf) < 8 or int.from_bytes(buf[2:4], order) != 42:
        return 1

    def number(at: int, width: int) -> int:
        return int.from_bytes(buf[at : at + width], order)

    pages, ifd, seen = 0, number(4, 4), set()
    while ifd and ifd not in seen and ifd + 2 <= len(buf) and len(seen) < 100_000:
        seen.add(ifd)
        entries = number(ifd, 2)
        end = ifd + 2 + 12 * entries
        if end + 4 > len(buf):
            break
        reduced = False
        for at in range(ifd + 2, end, 12):
            if number(at, 2) == 254:  # NewSubfileType, a LONG
                reduced = bool(number(at + 8, 4) & 1)
        pages += not reduced
        ifd = number(end, 4)
    return max(pages, 1)


def exif_orientation(data: np.ndarray | bytes) -> int:
    """The EXIF orientation tag (1-8) of an encoded JPEG or PNG (eXIf chunk), 1 when it has none.

    Cameras, phones and some scanners store pixels as the sensor read them and say in this tag
    how to turn them for display; image viewers and annotation tools apply it, and cv2 reads
    it only without IMREAD_UNCHANGED (which lungseg needs to keep 16-bit pixels and palettes).
    Only headers are read, without copying the file: JPEG segments up to the image data, PNG
    chunk headers up to IEND (an eXIf chunk may follow the image data).
    """
    buf = memoryview(data).cast("B") if len(data) else memoryview(b"")
    blob = b""
    if bytes(buf[:2]) == b"\xff\xd8":  # JPEG: segments FF xx + 2-byte big-endian length
        at = 2
        while at + 4 <= len(buf) and buf[at] == 0xFF:
            if buf[at + 1] == 0xFF:  # fill bytes may precede a marker
                at += 1
                continue
            marker, size = buf[at + 1], int.from_bytes(buf[at + 2 : at + 4], "big")
            if marker == 0xDA:  # start of scan: no header segment follows
                break
            if marker == 0xE1 and bytes(buf[at + 4 : at + 10]) == b"Exif\0\0":
                blob = bytes(buf[at + 10 : at + 2 + size])
                break
            at += 2 + size
    else:
        blob = next((bytes(chunk) for kind, chunk in _png_chunks(buf) if kind == b"eXIf"), b"")
    return _tiff_orientation(blob)


_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _png_chunks(buf: memoryview) -> Iterator[tuple[bytes, memoryview]]:
    """(type, data) of each chunk (length, type, data, CRC) of a PNG before IEND; none for
    other formats. Reads the chunk headers only, without copying the file."""
    if bytes(buf[:8]) != _PNG_SIGNATURE:
        return
    at = 8
    while at + 8 <= len(buf):
        size, kind = int.from_bytes(buf[at : at + 4], "big"), bytes(buf[at + 4 : at + 8])
        if kind == b"IEND":
            return
        yield kind, buf[at + 8 : at + 8 + size]
        at += 12 + size


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def palette_indices(path: str | Path) -> np.ndarray | None:
    """(H, W) uint8: the palette indices a PNG of colour type 3 (palette or 'P' mode, 1, 2, 4
    or 8 bits a pixel) stores, which are the class ids of an index mask saved so (Pascal VOC
    style label exports), turned by its EXIF orientation as ``read_image`` turns its colours;
    None for any other file (or one that cannot be opened).

    cv2 reads such a file as the colours its palette gives the indices. Its image data is
    decoded here again under a palette whose i-th colour is (i, i, i), one entry for every
    index the bit depth holds, so the colours read are the indices themselves, whatever the
    file's palette (colours given to several indices, missing entries, transparency)."""
    path = Path(path)
    try:
        with path.open("rb") as f:
            head = f.read(26)
    except OSError:
        return None
    # signature, IHDR's length (13) and type, then width, height, bit depth, colour type
    if head[:16] != _PNG_SIGNATURE + b"\0\0\0\rIHDR" or head[24:] not in _PALETTE_PNG:
        return None
    data = np.fromfile(path, dtype=np.uint8)
    buf = memoryview(data)
    png = b"".join(
        [
            bytes(buf[:33]),  # signature and IHDR
            _png_chunk(b"PLTE", np.repeat(np.arange(2 ** head[24], dtype=np.uint8), 3).tobytes()),
            _png_chunk(b"IDAT", b"".join(c for kind, c in _png_chunks(buf) if kind == b"IDAT")),
            _png_chunk(b"IEND", b""),
        ]
    )
    try:
        image = cv2.imdecode(np.frombuffer(png, np.uint8), cv2.IMREAD_UNCHANGED)
    except cv2.error:
        image = None
    if image is None:
        raise LungsegError(
            f"{path} is a palette PNG whose palette indices could not be decoded: it is "
            f"corrupt or truncated. Re-export it or remove it."
        )
    return _apply_orientation(image[:, :, 0], exif_orientation(data))  # 3 equal channels


_PALETTE_PNG = tuple(bytes([depth, 3]) for depth in (1, 2, 4, 8))  # bit depth, colour type 3


def _tiff_orientation(blob: bytes) -> int:
    """Tag 0x0112 of the first IFD of a TIFF-structured EXIF block; 1 if absent or malformed."""
    order = {b"II": "little", b"MM": "big"}.get(blob[:2])
    if order is None or len(blob) < 8:
        return 1
    ifd = int.from_bytes(blob[4:8], order)
    if ifd + 2 > len(blob):
        return 1
    for entry in range(int.from_bytes(blob[ifd : ifd + 2], order)):
        at = ifd + 2 + 12 * entry
        if at + 12 > len(blob):
            break
        if int.from_bytes(blob[at : at + 2], order) == 0x0112:
            # SHORT (type 3) as the standard says, left-justified in the value field; a LONG
            # (type 4) as some writers store it
            width = 4 if int.from_bytes(blob[at + 2 : at + 4], order) == 4 else 2
            value = int.from_bytes(blob[at + 8 : at + 8 + width], order)
            return value if 1 <= value <= 8 else 1
    return 1


ORIENTATIONS = {
    1: "as stored",
    2: "mirrored left-right",
    3: "turned 180 degrees",
    4: "mirrored top-bottom",
    5: "transposed",
    6: "turned 90 degrees clockwise",
    7: "transposed and turned 180 degrees",
    8: "turned 90 degrees counter-clockwise",
}


def _apply_orientation(image: np.ndarray, orientation: int) -> np.ndarray:
    """Turn stored pixels as EXIF orientation 1-8 says, as image viewers (and cv2.imread) do."""
    if orientation in (5, 6, 7, 8):  # the stored rows are the displayed columns
        image = image.swapaxes(0, 1)
    flips = {2: (1,), 3: (0, 1), 4: (0,), 6: (1,), 7: (0, 1), 8: (0,)}.get(orientation, ())
    for axis in flips:
        image = np.flip(image, axis)
    return np.ascontiguousarray(image) if orientation != 1 else image


def _to_rgb(image: np.ndarray, path: Path) -> np.ndarray:
    """cv2's (H, W, C) BGR[A] → (H, W, 3) RGB, or (H, W) for one channel (+ alpha). An alpha
    channel is dropped; a file whose content is in it alone (the grey or colour values one
    value everywhere, the alpha varying) is a LungsegError, not a blank image."""
    channels = image.shape[2]
    if channels in (2, 4):
        _check_alpha(image, path)
    if channels in (1, 2):
        return image[:, :, 0].copy()
    if channels in (3, 4):
        return np.ascontiguousarray(image[:, :, 2::-1])
    raise LungsegError(
        f"{path} has {channels} channels; lungseg reads grayscale, RGB or RGBA images. "
        "Save it as a grayscale or RGB file."
    )


def _check_alpha(image: np.ndarray, path: Path) -> None:
    """LungsegError when an image with an alpha channel (last of 2 or 4) holds its content in
    the alpha alone: lungseg drops the alpha and would read one flat value (a mask drawn as
    transparency reads as an empty mask)."""
    alpha, colour = image[:, :, -1], image[:, :, :-1]
    if alpha.min() == alpha.max() or not (colour == colour[:1, :1]).all():
        return
    grey = colour.shape[2] == 1
    value = int(colour[0, 0, 0]) if grey else tuple(int(v) for v in colour[0, 0, ::-1])  # RGB
    raise LungsegError(
        f"{path} holds its content only in its transparency (alpha) channel: its "
        f"{'grey value is' if grey else 'colour is'} {value} everywhere, while the alpha runs "
        f"from {alpha.min()} to {alpha.max()}. lungseg reads the grey or colour values and drops "
        "the alpha, so it would read a blank image. Save the file with its content in the grey "
        "or colour values, e.g. its alpha as a grey image (ImageMagick: magick FILE -alpha "
        "extract OUT.png) or, for white content, flattened onto black (magick FILE -background "
        "black -alpha remove -alpha off OUT.png)."
    )


def write_image(path: str | Path, image: np.ndarray) -> None:
    """Write (H, W) or (H, W, 3) RGB pixels; the format follows the extension. Non-ASCII paths
    work (cv2.imencode + tofile); the parent folder must exist."""
    path = Path(path)
    pixels = image[:, :, ::-1] if image.ndim == 3 else image
    ok, buffer = cv2.imencode(path.suffix, np.ascontiguousarray(pixels))
    if not ok:
        raise LungsegError(f"Could not encode an image for {path}; use a .png or .tif name.")
    buffer.tofile(path)


def to_channels(image: np.ndarray, in_channels: int, path: Path | None = None) -> np.ndarray:
    """(H, W, in_channels) from a read_image result, dtype kept: RGB → gray with cv2's luminance
    weights (0.299 R + 0.587 G + 0.114 B) for in_channels=1, gray → replicated RGB for 3."""
    if in_channels not in (1, 3):
        source = f" (reading {path})" if path is not None else ""
        raise LungsegError(
            f"data.in_channels={in_channels}{source}, but lungseg feeds images as 1 channel "
            "(grayscale) or 3 channels (RGB). Set data.in_channels to 1 or 3."
        )
    if image.ndim == 2:
        gray = image[:, :, None]
        return gray if in_channels == 1 else np.repeat(gray, 3, axis=2)
    if in_channels == 1:
        return cv2.cvtColor(image, cv2.COLOR_RGB2GRAY)[:, :, None]
    return image
