"""Train/val/test splits of file stems: reproducible, grouped by patient, or read from a CSV.

A split is a dict ``stem -> "train" | "val" | "test"``. It depends only on the set of stems,
the fractions, the seed and the patient pattern, never on the order the files were listed in,
so a run can be repeated on another machine and a CSV written by ``write_split`` reproduces it.
"""

from __future__ import annotations

import csv
import re
import unicodedata
from collections.abc import Mapping, Sequence
from pathlib import Path, PurePosixPath

import numpy as np

from lungseg.errors import LungsegError, counted

SPLITS = ("train", "val", "test")
_SHOW = 5  # how many offending names an error message lists
_FRACTION_TOLERANCE = 1e-6


def make_split(
    stems: Sequence[str],
    fractions: Sequence[float] = (0.6, 0.2, 0.2),
    seed: int = 42,
    group_pattern: str | None = None,
    split_file: str | Path | None = None,
    num_folds: int | None = None,
    fold: int | None = None,
) -> dict[str, str]:
    """Assign every stem to "train", "val" or "test".

    Random split: the sorted unique groups (one group per stem, or per patient with
    ``group_pattern``) are shuffled with ``np.random.default_rng(seed)`` and laid end to end,
    each group taking as many places as it has files. The fractions put two cut points on
    that line, at ``fractions[0] * N`` and ``(fractions[0] + fractions[1]) * N`` files; a group
    goes to the split in which its middle falls. Without grouping the file counts are thus the
    fractions of N rounded to whole files; with grouping whole patients move together, so each
    split is off by at most half a patient's files at each cut.

    ``group_pattern`` is a regex searched (``re.search``) in each stem; its first capture group
    is the patient id, e.g. ``r"^(patient\\d+)_"``.

    ``split_file`` is a CSV with columns ``file,split`` that lists every stem exactly once (by
    stem or by file name); it replaces the fractions and the pattern.

    Cross-validation (``num_folds`` k and ``fold`` i in 0..k-1): the shuffled groups are laid
    end to end as above and cut into k parts of about N/k files (where a patient with many
    files would leave a part without any patient, the groups are dealt out instead, largest
    first, each to the part with the fewest files so far); part i is the test split, and
    the other parts, laid from part i + 1 round to part i - 1, are cut into train and val in
    the ratio ``fractions[0] : fractions[1]`` (``fractions[2]`` is then unused), so that val
    comes from part i - 1 (mod k): the folds validate on different patients. Over i = 0..k-1
    every file (and patient) is tested exactly once, and never trained on in the fold that
    tests it.

    Raises LungsegError for fractions that are not three numbers >= 0 summing to 1, for a split
    with a fraction > 0 that gets no file, for a pattern that is not a regex with a group or
    does not match every stem, and for a split file that does not match the data.
    """
    stems = sorted(set(stems))
    if split_file is not None:
        if num_folds is not None or fold is not None:
            raise LungsegError(
                "data.split_file and data.num_folds/data.fold are both set; a split file "
                "fixes the split, so folds cannot apply. Set data.split_file=null for "
                "cross-validation, or data.num_folds=null data.fold=null to use the file."
            )
        return _read_split_file(Path(split_file), stems)
    fractions = _check_fractions(fractions)
    groups = _group(stems, group_pattern)
    names = sorted(set(groups.values()))
    sizes = {name: 0 for name in names}
    for name in groups.values():
        sizes[name] += 1
    order = [names[i] for i in np.random.default_rng(seed).permutation(len(names))]
    if num_folds is None and fold is None:
        cuts = np.cumsum(fractions)[:2] * len(stems)
        group_split = _cut(order, sizes, cuts, SPLITS)
    else:
        num_folds, fold = _check_fold(num_folds, fold, len(names))
        parts = _cut(
            order, sizes, np.arange(1, num_folds) * len(stems) / num_folds, range(num_folds)
        )
        if len(set(parts.values())) < num_folds:  # a large patient swallowed a whole part
            parts = _balance(order, sizes, num_folds)
        group_split = {name: "test" for name in order if parts[name] == fold}
        # The other parts from the one after the test part round to the one before it: val,
        # cut from the end, lies in part fold - 1, so every fold validates on other patients
        # (with the parts in plain order, folds 0 to k-2 all validated on part k-1, the test
        # split of fold k-1).
        rest = [
            name
            for part in (*range(fold + 1, num_folds), *range(fold))
            for name in order
            if parts[name] == part
        ]
        train_share = fractions[0] / (fractions[0] + fractions[1] or 1)
        total = sum(sizes[name] for name in rest)
        rest_split = _cut(rest, sizes, [train_share * total], ("train", "val"))
        if fractions[1] > 0 and "val" not in rest_split.values():
            rest_split[rest[-1]] = "val"  # a large last patient's middle fell before the cut
        group_split.update(rest_split)
        fractions = [fractions[0], fractions[1], 1.0]
    split = {stem: group_split[groups[stem]] for stem in stems}
    _check_not_empty(split, fractions, group_pattern, len(names))
    return split


def _cut(order: list[str], sizes: dict[str, int], cuts, labels) -> dict[str, object]:
    """Lay the groups end to end (each as long as its file count) and label each by the
    interval between ``cuts`` in which its middle falls."""
    labels, out, start = list(labels), {}, 0
    for name in order:
        middle = start + sizes[name] / 2
        out[name] = labels[int(np.searchsorted(cuts, middle, side="right"))]
        start += sizes[name]
    return out


def _balance(order: list[str], sizes: dict[str, int], num_folds: int) -> dict[str, int]:
    """Each group, largest first (ties in ``order``), to the part with the fewest files so
    far (ties to the lowest part): every part gets a group when there are at least
    ``num_folds``. Used only where laying the groups end to end leaves a part without one, so
    that every other data set keeps the folds it always had."""
    load, parts = [0] * num_folds, {}
    for name in sorted(order, key=lambda n: -sizes[n]):  # stable: ties keep the shuffle
        part = min(range(num_folds), key=lambda k: (load[k], k))
        parts[name] = part
        load[part] += sizes[name]
    return parts


def _check_fold(num_folds, fold, num_groups: int) -> tuple[int, int]:
    if num_folds is None or fold is None:
        raise LungsegError(
            f"data.fold is {fold} and data.num_folds is {num_folds}: cross-validation needs "
            f"both, e.g. data.num_folds=5 data.fold=0 (then 1, 2, 3, 4; or -m data.fold="
            f"0,1,2,3,4), or neither for a plain data.split."
        )
    if not isinstance(num_folds, int) or not isinstance(fold, int) or num_folds < 2:
        raise LungsegError(
            f"data.num_folds={num_folds} data.fold={fold}: give a whole number of folds of at "
            f"least 2 and a fold index from 0 to num_folds - 1."
        )
    if not 0 <= fold < num_folds:
        raise LungsegError(
            f"data.fold={fold} is outside 0..{num_folds - 1} for data.num_folds={num_folds}; "
            f"the folds are numbered from 0."
        )
    if num_folds > num_groups:
        raise LungsegError(
            f"data.num_folds={num_folds} is more than the {num_groups} units (patients, or "
            f"files without data.group_pattern) there are to spread over the folds; lower it."
        )
    return num_folds, fold


def patient_ids(stems: Sequence[str], group_pattern: str) -> dict[str, str]:
    """stem -> patient id (the first capture group of ``group_pattern``); errors as make_split."""
    return _group(sorted(set(stems)), group_pattern)


def write_split(split: Mapping[str, str], path: str | Path) -> None:
    """Write ``split`` as a CSV with header ``file,split``, one row per stem, sorted by stem.

    The file can be passed back as ``data.split_file`` to reproduce the split exactly.
    """
    assert set(split.values()) <= set(SPLITS), set(split.values())
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f, lineterminator="\n")
        writer.writerow(["file", "split"])
        writer.writerows(sorted(split.items()))


def _check_fractions(fractions: Sequence[float]) -> list[float]:
    try:
        values = [float(f) for f in fractions]
    except (TypeError, ValueError):
        values = []
    if len(values) != 3 or min(values) < 0 or abs(sum(values) - 1) > _FRACTION_TOLERANCE:
        raise LungsegError(
            f"data.split is {fractions!r}, but it must be three numbers >= 0 (the train, val "
            f"and test fractions) that sum to 1, e.g. [0.6, 0.2, 0.2]. Fix data.split, or set "
            f"data.split_file to a CSV that lists the split of every file."
        )
    return values


def _group(stems: list[str], group_pattern: str | None) -> dict[str, str]:
    """stem -> group name: the stem itself without a pattern, else the pattern's first group."""
    if group_pattern is None:
        return {stem: stem for stem in stems}
    try:
        regex = re.compile(group_pattern)
    except re.error as e:
        raise LungsegError(
            f"data.group_pattern '{group_pattern}' is not a valid regular expression ({e}). "
            f"Write a Python regex whose first capture group is the patient id, e.g. "
            f"'^(patient\\d+)_' for files named patient001_slice12.png."
        ) from None
    if regex.groups < 1:
        raise LungsegError(
            f"data.group_pattern '{group_pattern}' has no capture group, so it cannot tell "
            f"which patient a file belongs to. Put the patient id in parentheses, e.g. "
            f"'^(patient\\d+)_' for files named patient001_slice12.png."
        )
    groups, unmatched = {}, []
    for stem in stems:
        match = regex.search(stem)
        if match is None or not match.group(1):
            unmatched.append(stem)
        else:
            groups[stem] = match.group(1)
    if unmatched and not groups:
        raise LungsegError(
            f"data.group_pattern '{group_pattern}' matches none of the {len(stems)} file "
            f"names, e.g. {', '.join(stems[:_SHOW])}. Adjust the pattern so that its first "
            f"capture group is the patient id in every file name (it is searched with "
            f"re.search in the file name without extension; with data.recursive in its path "
            f"below data.image_dir, e.g. p01/slice_3)."
        )
    if unmatched:
        raise LungsegError(
            f"data.group_pattern '{group_pattern}' finds no patient id in {len(unmatched)} of "
            f"the {len(stems)} file names, e.g. {', '.join(unmatched[:_SHOW])}. Every file "
            f"needs a patient so that no patient is split across train, val and test: adjust "
            f"the pattern, or rename or remove those files."
        )
    return groups


def check_fit_split(
    split: Mapping[str, str],
    fractions: Sequence[float],
    split_file: str | Path | None = None,
    num_folds: int | None = None,
    fold: int | None = None,
) -> None:
    """Raise LungsegError where ``split``, made by ``make_split`` with these settings, leaves
    train without a file, or val without one by accident: fitting chooses the best checkpoint
    and when to stop by the val/* metrics, which an empty val split never logs. A val fraction
    of 0 in data.split (with folds too, e.g. [1.0, 0.0, 0.0]; with a split file without val
    rows too) asks for a fit without validation (``trains_without_validation``): the full
    schedule, the final weights as the model. An empty test split is fine.

    make_split already refuses a split with a fraction > 0 that gets no file, so this finds a
    train fraction of 0 or a split file without train or val rows.
    """
    counts = _counts(split)
    empty = " and ".join(name for name in ("train", "val") if counts[name] == 0)
    if not empty or (empty == "val" and trains_without_validation(fractions)):
        return
    if split_file is not None:
        source = f"data.split_file {str(split_file)!r}"
        fix = (
            f"List some files as {empty} in its split column, or set data.split_file=null to "
            f"split by the data.split fractions."
        )
        if empty == "val":
            fix += (
                " For a fit without validation on this file, give data.split a val fraction "
                "of 0, e.g. data.split=[0.8,0.0,0.2] (the file sets the split; the fraction "
                "says that an empty val split is meant)."
            )
    elif num_folds is not None:
        source = f"data.split {list(fractions)} with data.num_folds={num_folds} data.fold={fold}"
        fix = (
            f"Give data.split a {empty} fraction > 0, e.g. [0.8, 0.2, 0.0] (with folds the "
            f"test split is fold data.fold and the third fraction is unused)."
        )
    else:
        source = f"data.split {list(fractions)}"
        fix = f"Give data.split a {empty} fraction > 0, e.g. [0.6, 0.2, 0.2]."
    without = (
        " (A val fraction of 0 in data.split trains without validation: the full schedule, "
        "the final weights as the model.)"
        if "val" in empty and split_file is None
        else ""
    )
    raise LungsegError(
        f"{source} leaves the {empty} split empty (train/val/test = {counts['train']}/"
        f"{counts['val']}/{counts['test']} files), but training learns from train, and "
        f"chooses the best checkpoint and when to stop (and a plateau scheduler the learning "
        f"rate) by the val/* metrics of the val split. {fix}{without}"
    )


def trains_without_validation(fractions: Sequence[float]) -> bool:
    """Whether these settings ask for a fit without a val split: data.split's val fraction
    is 0 (with folds: of the parts that are not the test part; with data.split_file, which
    then has no val rows, the fraction is the opt-in, as the default's 0.2 is not)."""
    return float(fractions[1]) == 0


def split_counts(path: str | Path) -> dict[str, int]:
    """How many rows of the split file at ``path`` (``file,split``, e.g. a run's split.csv)
    name each of ``SPLITS``."""
    counts = {name: 0 for name in SPLITS}
    for _, split in _file_rows(path):
        if split in counts:
            counts[split] += 1
    return counts


def files_in(path: str | Path, which: Sequence[str]) -> list[str]:
    """The files the split file at ``path`` (a run's split.csv) puts in one of ``which``."""
    return [file for file, split in _file_rows(path) if split in which]


def _file_rows(path: str | Path) -> list[tuple[str, str]]:
    """The (file, split) rows of the split file at ``path``, the file as written (a name may
    start or end with a space; ``_listed`` tries it stripped too), the split stripped and
    lower-case; no checks (``_read_split_file`` checks a data.split_file)."""
    with Path(path).open(newline="", encoding="utf-8-sig") as f:
        return [
            (row.get("file") or "", (row.get("split") or "").strip().lower())
            for row in _dict_rows(csv.DictReader(f))
        ]


def _dict_rows(reader: csv.DictReader) -> list[dict[str, str]]:
    """A CSV's rows as dicts keyed by the stripped header names; the values as written."""
    return [{k.strip(): v or "" for k, v in row.items() if k} for row in reader]


def _listed(file: str, known: set[str]) -> str | None:
    """``_stem_of`` for a split-file entry as written (write_split keeps a name's leading or
    trailing spaces), else stripped (a hand-written 'a.png, train'); in Unicode's composed
    form, as data files are keyed (``folders.file_key``), so a name typed or saved
    decomposed (macOS) still names its file."""
    file = unicodedata.normalize("NFC", file)
    return _stem_of(file, known) or _stem_of(file.strip(), known)


def _counts(split: Mapping[str, str]) -> dict[str, int]:
    counts = {name: 0 for name in SPLITS}
    for name in split.values():
        counts[name] += 1
    return counts


def _check_not_empty(
    split: dict[str, str], fractions: list[float], group_pattern: str | None, num_groups: int
) -> None:
    counts = _counts(split)
    empty = [name for name, f in zip(SPLITS, fractions, strict=True) if f > 0 and counts[name] == 0]
    if empty:
        source = counted(len(split), "file") + (
            f" of {counted(num_groups, 'patient')}" if group_pattern else ""
        )
        raise LungsegError(
            f"data.split {fractions} leaves the {' and '.join(empty)} split empty: "
            f"{source} give train/val/test = {counts['train']}/"
            f"{counts['val']}/{counts['test']} files. Add images, raise the fraction of "
            f"{' and '.join(empty)}, or set it to 0 to do without that split."
        )


def _read_split_file(path: Path, stems: list[str]) -> dict[str, str]:
    if not path.is_file():
        raise LungsegError(
            f"data.split_file {str(path)!r} does not exist. Give the path of a CSV with "
            f"header 'file,split' (e.g. one written by a previous run as split.csv), or set "
            f"data.split_file to null to split by data.split fractions."
        )
    # utf-8-sig: spreadsheet programs often start a CSV with a byte-order mark
    with path.open(newline="", encoding="utf-8-sig") as f:
        reader = csv.DictReader(f)
        columns = [c.strip() for c in reader.fieldnames or []]
        if "file" not in columns or "split" not in columns:
            raise LungsegError(
                f"data.split_file {str(path)!r} has columns {columns}, but it needs a header "
                f"row with the columns 'file' and 'split', e.g. 'file,split' then rows like "
                f"'patient001_slice12.png,train'."
            )
        rows = _dict_rows(reader)
    known = set(stems)
    split, unknown_files, bad_splits, conflicts = {}, [], [], []
    for row in rows:
        stem = _listed(row["file"], known)
        value = row["split"].strip().lower()
        if stem is None:
            unknown_files.append(row["file"])
        elif value not in SPLITS:
            bad_splits.append(f"{row['file']}: {row['split']!r}")
        elif split.setdefault(stem, value) != value:
            conflicts.append(row["file"])
    where = f"data.split_file {str(path)!r}"
    if bad_splits:
        raise LungsegError(
            f"{where} has {len(bad_splits)} rows whose split is not one of {list(SPLITS)}: "
            f"{'; '.join(bad_splits[:_SHOW])}. Use only train, val and test in the split column."
        )
    if conflicts:
        raise LungsegError(
            f"{where} lists {counted(len(conflicts), 'file')} more than once with different "
            f"splits: "
            f"{', '.join(conflicts[:_SHOW])}. Keep one row per file."
        )
    if unknown_files:
        raise LungsegError(
            f"{where} names {counted(len(unknown_files), 'file')} that "
            f"{'is' if len(unknown_files) == 1 else 'are'} not in the data: "
            f"{', '.join(unknown_files[:_SHOW])}. Remove those rows, or point data.image_dir "
            f"and data.mask_dir at the data the file was written for."
        )
    missing = [stem for stem in stems if stem not in split]
    if missing:
        raise LungsegError(
            f"{where} does not list {len(missing)} of the {len(stems)} files in the data, "
            f"e.g. {', '.join(missing[:_SHOW])}. Add a row 'file,split' for each of them, or "
            f"remove those images and masks from the data folders."
        )
    return split


def listed_stems(path: str | Path, stems: Sequence[str]) -> set[str]:
    """The ones of ``stems`` that the split file at ``path`` lists (by stem or file name)."""
    return set(listed_splits(path, stems))


def listed_splits(path: str | Path, stems: Sequence[str]) -> dict[str, str]:
    """``{stem: split}`` for the ones of ``stems`` that the split file at ``path`` lists (by
    stem or file name); other rows are ignored, unlike ``make_split``'s reading."""
    known = set(stems)
    found = ((_listed(file, known), split) for file, split in _file_rows(path))
    return {stem: split for stem, split in found if stem is not None}


def _stem_of(file: str, known: set[str]) -> str | None:
    """The known stem a split-file entry names: the stem itself, or a file path whose end is
    a known stem with or without its extension (`images/a.png` → `a`; for data.recursive keys
    `p01/a.png`, `/data/images/p01/a.png` or `p01\\a.png` → `p01/a`). When the keys have
    folders, an entry with folders never falls back to its bare file name, which could be
    another patient's file."""
    if file in known:
        return file
    parts = [p for p in PurePosixPath(file.replace("\\", "/")).parts if p not in ("/", "..")]
    nested = any("/" in key for key in known)
    for i in range(len(parts)):
        if nested and len(parts) > 1 and i == len(parts) - 1:
            return None
        tail = PurePosixPath(*parts[i:])
        for candidate in (tail.as_posix(), tail.with_suffix("").as_posix()):
            if candidate in known:
                return candidate
    return None
