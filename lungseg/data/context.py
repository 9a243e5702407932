"""2.5-D input: each slice with its neighbours of the same volume as extra channels.

``data.context_slices=n`` gives the network slices ``k-n .. k+n`` of slice ``k``'s volume,
stacked along the channel axis (centre in the middle). Volume and slice number come from the
file stem with ``data.slice_pattern``, a regular expression with the named groups ``volume``
and ``slice`` (digits); the default takes the last number in the stem as the slice number and
everything before it as the volume (``LIDC-IDRI-0001_nodule-0_slice-3`` → volume
``LIDC-IDRI-0001_nodule-0_slice-``, slice 3; ``ID_0001_Z_0142`` → ``ID_0001_Z_``, 142).
A neighbour that is not there (the ends of a stack, a gap) is replaced by the nearest slice
between it and the centre, as edge padding would, so every input has 2n+1 slices. The pattern
sees the file's own stem; a key with folders (``p01/slice_3``, from data.recursive) puts the
folder in front of the volume, so volumes never span folders.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path

from lungseg.errors import LungsegError

DEFAULT_SLICE_PATTERN = r"^(?P<volume>.*?)(?P<slice>\d+)$"


def check_context(context_slices: object) -> int:
    """data.context_slices as an int >= 0; LungsegError otherwise."""
    if (
        isinstance(context_slices, bool)
        or not isinstance(context_slices, int)
        or context_slices < 0
    ):
        raise LungsegError(
            f"data.context_slices is {context_slices!r}; give the number of neighbouring slices "
            f"on each side to stack as channels (0 = off, 1 = 2.5-D input of 3 slices)."
        )
    return context_slices


def slice_keys(stems: Sequence[str], pattern: str | None) -> list[tuple[str, int]]:
    """(volume, slice number) of each stem under ``pattern`` (None: the default)."""
    source = pattern or DEFAULT_SLICE_PATTERN
    try:
        regex = re.compile(source)
    except re.error as err:
        raise LungsegError(
            f"data.slice_pattern {source!r} is not a regular expression ({err})."
        ) from None
    if not {"volume", "slice"} <= set(regex.groupindex):
        raise LungsegError(
            f"data.slice_pattern {source!r} needs the named groups (?P<volume>...) and "
            f"(?P<slice>...), e.g. '^(?P<volume>.+)_slice-(?P<slice>\\d+)$'."
        )
    keys = []
    for stem in stems:
        folder, _, name = stem.rpartition("/")
        match = regex.search(name)
        number = match.group("slice") if match else None
        if match is None or number is None or not number.isdigit():
            raise LungsegError(
                f"data.context_slices needs each file's volume and slice number, but the name "
                f"{stem!r} does not match data.slice_pattern {source!r} (groups volume and "
                f"slice, the slice a number). Rename the files to <volume><slice number>, set "
                f"data.slice_pattern to fit them, or set data.context_slices=0."
            )
        volume = match.group("volume") or ""
        keys.append((f"{folder}/{volume}" if folder else volume, int(number)))
    return keys


def neighbours(stems: Sequence[str], context_slices: int, pattern: str | None) -> list[list[int]]:
    """For each stem, the indices (into ``stems``) of the 2n+1 slices ``k-n .. k+n`` of its
    volume; a missing one is the nearest present slice between it and the centre."""
    keys = slice_keys(stems, pattern)
    index: dict[tuple[str, int], int] = {}
    for i, key in enumerate(keys):
        if key in index:
            raise LungsegError(
                f"{stems[index[key]]!r} and {stems[i]!r} are both slice {key[1]} of volume "
                f"{key[0]!r} under data.slice_pattern; give the slices distinct numbers or "
                f"set data.slice_pattern so that each (volume, slice) names one file."
            )
        index[key] = i
    out = []
    for volume, number in keys:
        row = []
        for offset in range(-context_slices, context_slices + 1):
            step = 1 if offset < 0 else -1
            while (volume, number + offset) not in index:  # offset 0 is always present
                offset += step
            row.append(index[(volume, number + offset)])
        out.append(row)
    return out


def neighbour_paths(
    paths: Sequence[Path], pool: Sequence[Path], context_slices: int, pattern: str | None
) -> list[list[Path]]:
    """For each of ``paths``, the paths of its 2n+1 slices, found among ``paths`` and ``pool``
    (the images it may take neighbours from, e.g. its folder's; those whose names do not match
    the pattern, or name a slice already given, are passed over)."""
    paths = list(paths)
    keys = set(slice_keys([_key(p) for p in paths], pattern))
    extra = []
    for path in dict.fromkeys(pool):
        if path in paths:
            continue
        try:
            (key,) = slice_keys([_key(path)], pattern)
        except LungsegError:
            continue
        if key not in keys:
            keys.add(key)
            extra.append(path)
    everything = list(dict.fromkeys([*paths, *extra]))
    rows = neighbours([_key(p) for p in everything], context_slices, pattern)
    position = {p: i for i, p in enumerate(everything)}
    return [[everything[j] for j in rows[position[p]]] for p in paths]


def _key(path: Path) -> str:
    """A slice key for a file path: its folder, then its stem (volumes stay in their folder)."""
    return f"{path.parent.as_posix()}/{path.stem}"
