import csv
import random

import pytest

from lungseg.data.splits import (
    SPLITS,
    check_fit_split,
    listed_splits,
    make_split,
    trains_without_validation,
    write_split,
)
from lungseg.errors import LungsegError

STEMS = [f"img{i:03d}" for i in range(100)]
# 12 patients x 3 slices; patient numbers of different widths so sorting is not trivial
SLICES = [f"p{p}_slice{s}" for p in range(1, 13) for s in range(3)]
PATIENT = r"^(p\d+)_"


def counts(split):
    return {name: sum(v == name for v in split.values()) for name in SPLITS}


def test_same_stems_in_any_order_give_the_same_split():
    shuffled = STEMS[:]
    random.Random(1).shuffle(shuffled)
    assert make_split(STEMS, seed=7) == make_split(shuffled, seed=7)
    assert make_split(SLICES, group_pattern=PATIENT) == make_split(
        SLICES[::-1], group_pattern=PATIENT
    )


def test_seed_changes_the_split():
    assert make_split(STEMS, seed=1) != make_split(STEMS, seed=2)


def test_fractions_give_file_counts():
    split = make_split(STEMS, (0.6, 0.2, 0.2))
    assert set(split) == set(STEMS)
    assert counts(split) == {"train": 60, "val": 20, "test": 20}
    assert counts(make_split(STEMS[:10], (0.7, 0.3, 0.0))) == {"train": 7, "val": 3, "test": 0}


def test_patient_grouping_keeps_each_patient_in_one_split():
    for seed in range(5):
        split = make_split(SLICES, (0.6, 0.2, 0.2), seed=seed, group_pattern=PATIENT)
        by_patient = {}
        for stem, name in split.items():
            by_patient.setdefault(stem.split("_")[0], set()).add(name)
        assert len(by_patient) == 12
        assert all(len(names) == 1 for names in by_patient.values()), by_patient
        n = counts(split)
        assert all(n[s] % 3 == 0 and n[s] > 0 for s in SPLITS), n
        assert abs(n["train"] - 0.6 * len(SLICES)) <= 3, n


@pytest.mark.parametrize(
    ("pattern", "message"),
    [
        (r"^(q\d+)_", "matches none of the 36"),
        (r"^(p1\d)_", "finds no patient id in 27"),
        (r"^(p\d+_", "not a valid regular expression"),
        (r"^p\d+_", "no capture group"),
    ],
)
def test_bad_group_pattern_is_explained(pattern, message):
    with pytest.raises(LungsegError, match=message) as error:
        make_split(SLICES, group_pattern=pattern)
    assert "data.group_pattern" in str(error.value)


def test_partial_pattern_lists_unmatched_names():
    with pytest.raises(LungsegError, match="p1_slice0"):
        make_split(SLICES, group_pattern=r"^(p1\d)_")


@pytest.mark.parametrize("fractions", [(0.5, 0.2, 0.2), (0.8, 0.3, -0.1), (0.5, 0.5), "abc"])
def test_bad_fractions(fractions):
    with pytest.raises(LungsegError, match="data.split"):
        make_split(STEMS, fractions)


def test_split_that_gets_no_file_is_an_error():
    with pytest.raises(LungsegError, match=r"val split empty.*5 files.*4/0/1"):
        make_split(STEMS[:5], (0.8, 0.1, 0.1))
    with pytest.raises(LungsegError, match="of 2 patients"):
        make_split(["a_1", "a_2", "b_1"], (0.4, 0.3, 0.3), group_pattern="^(.)_")


def test_zero_fraction_may_be_empty():
    assert set(make_split(STEMS[:3], (1.0, 0.0, 0.0)).values()) == {"train"}
    assert counts(make_split(STEMS[:5], (0.8, 0.2, 0.0)))["test"] == 0


def write_csv(path, rows, header=("file", "split")):
    with path.open("w", newline="") as f:
        csv.writer(f).writerows([header, *rows])
    return path


def test_fitting_needs_train_and_val_files_unless_val_is_0(tmp_path):
    """make_split accepts a fraction of 0; check_fit_split, run as a fit starts, refuses an
    empty train split, and an empty val split that no val fraction of 0 asked for (a split
    file without val rows), and names the setting that made it. A val fraction of 0 asks for
    a fit without validation, with folds too."""
    stems = STEMS[:16]

    def refused(words, fractions=(0.6, 0.2, 0.2), **settings):
        split = make_split(stems, fractions, **settings)
        with pytest.raises(LungsegError, match=words):
            check_fit_split(split, fractions, **settings)

    refused(r"leaves the train split empty.*a train fraction > 0", (0.0, 0.5, 0.5))
    refused(r"leaves the train and val split empty.*a train and val fraction > 0", (0, 0, 1))
    for fractions, folds in [
        ((0.75, 0.0, 0.25), {}),
        ((1.0, 0.0, 0.0), {"num_folds": 4, "fold": 1}),
    ]:
        split = make_split(stems, fractions, **folds)
        assert (counts(split)["train"], counts(split)["val"]) == (12, 0)
        check_fit_split(split, fractions, **folds)
        assert trains_without_validation(fractions)
    rows = [(s, "train" if i % 4 else "test") for i, s in enumerate(stems)]
    no_val = write_csv(tmp_path / "no_val.csv", rows)
    refused(
        r"no_val.csv' leaves the val split empty.*List some files as val.*For a fit without "
        r"validation on this file, give data.split a val fraction of 0",
        split_file=no_val,
    )
    # a run's own split.csv of a fit without validation, passed back with a val fraction of 0
    split = make_split(stems, split_file=no_val)
    check_fit_split(split, (0.8, 0.0, 0.2), split_file=no_val)
    with pytest.raises(LungsegError) as error:
        check_fit_split(make_split(stems, (0.0, 0.5, 0.5)), (0.0, 0.5, 0.5))
    assert "trains without validation" not in str(error.value)  # not about val
    assert not trains_without_validation((0.6, 0.2, 0.2))
    only_test = write_csv(tmp_path / "only_test.csv", [(s, "test") for s in stems])
    refused(r"leaves the train and val split empty.*as train and val", split_file=only_test)


def test_fitting_without_test_files_is_fine():
    for folds in ({}, {"num_folds": 4, "fold": 3}):
        split = make_split(STEMS[:16], (0.8, 0.2, 0.0), **folds)
        check_fit_split(split, (0.8, 0.2, 0.0), **folds)
    assert counts(make_split(STEMS[:16], (0.8, 0.2, 0.0)))["test"] == 0


def test_split_file_overrides_fractions_and_pattern(tmp_path):
    rows = [(f"{s}.png" if i % 2 else s, SPLITS[i % 3]) for i, s in enumerate(SLICES)]
    path = write_csv(tmp_path / "split.csv", rows)
    split = make_split(SLICES, (1.0, 0.0, 0.0), group_pattern=r"^(nomatch)", split_file=path)
    assert split == {s: SPLITS[i % 3] for i, s in enumerate(SLICES)}


def test_write_split_round_trips(tmp_path):
    split = make_split(STEMS)
    path = tmp_path / "out" / "split.csv"
    write_split(split, path)
    lines = path.read_text().splitlines()
    assert b"\r" not in path.read_bytes()  # csv's default \r\n: grep ',test$' found nothing
    assert lines[0] == "file,split"
    assert lines[1:] == [f"{s},{split[s]}" for s in sorted(split)]
    assert make_split(STEMS, seed=99, split_file=path) == split


def test_names_with_spaces_at_their_ends_round_trip_and_a_spaced_csv_reads(tmp_path):
    """A run's split.csv names files as they are, spaces at either end included; read back
    (as data.split_file, on resume, by eval's filters) it gives the same split. A hand-written
    file with a space after each comma reads as well."""
    stems = [" a", "b ", "c", "d", "e"]
    split = {" a": "train", "b ": "val", "c": "test", "d": "train", "e": "train"}
    write_split(split, tmp_path / "split.csv")
    assert make_split(stems, split_file=tmp_path / "split.csv") == split
    assert listed_splits(tmp_path / "split.csv", stems) == split
    (tmp_path / "hand.csv").write_text("file, split\nc.png, test\nd, train\ne.png,val\n")
    assert listed_splits(tmp_path / "hand.csv", ["c", "d", "e"]) == {
        "c": "test",
        "d": "train",
        "e": "val",
    }
    partial = make_split(["c", "d", "e"], split_file=tmp_path / "hand.csv")
    assert partial == {"c": "test", "d": "train", "e": "val"}


def test_split_file_errors(tmp_path):
    stems = ["a", "b", "c"]
    with pytest.raises(LungsegError, match="does not exist"):
        make_split(stems, split_file=tmp_path / "missing.csv")
    bad_header = write_csv(tmp_path / "h.csv", [("a", "train")], header=("name", "set"))
    with pytest.raises(LungsegError, match="'file' and 'split'"):
        make_split(stems, split_file=bad_header)
    bad_name = write_csv(tmp_path / "n.csv", [("a", "train"), ("b", "training"), ("c", "val")])
    with pytest.raises(LungsegError, match="b: 'training'"):
        make_split(stems, split_file=bad_name)
    missing = write_csv(tmp_path / "m.csv", [("a.png", "train")])
    with pytest.raises(LungsegError, match=r"does not list 2 of the 3 files.*b, c"):
        make_split(stems, split_file=missing)
    extra = write_csv(tmp_path / "e.csv", [(s, "train") for s in [*stems, "zz.png"]])
    with pytest.raises(LungsegError, match=r"not in the data: zz.png"):
        make_split(stems, split_file=extra)


def test_k_fold_tests_every_patient_once_and_never_trains_on_it():
    folds = [make_split(SLICES, (0.75, 0.25, 0.0), 3, PATIENT, None, 4, k) for k in range(4)]
    tested = [stem for split in folds for stem, name in split.items() if name == "test"]
    assert sorted(tested) == sorted(SLICES)  # each slice in exactly one test fold
    for split in folds:
        patients = {
            name: {s.split("_")[0] for s, v in split.items() if v == name} for name in SPLITS
        }
        assert not (patients["test"] & patients["train"]) and not (
            patients["test"] & patients["val"]
        )
        assert not (patients["train"] & patients["val"])
        assert counts(split) == {"train": 21, "val": 6, "test": 9}  # 3 patients per fold
    assert folds[0] == make_split(SLICES[::-1], (0.75, 0.25, 0.0), 3, PATIENT, None, 4, 0)
    # The folds validate on different patients, each fold's from the test part of the fold
    # before it: a choice made on the mean validation score over the folds does not rest on
    # one fold's test patients (with the parts in plain order, folds 0-2 validated on fold 3's).
    val = [{s for s, v in split.items() if v == "val"} for split in folds]
    test = [{s for s, v in split.items() if v == "test"} for split in folds]
    assert all(not (val[i] & val[j]) for i in range(4) for j in range(i))
    assert all(val[k] <= test[k - 1] for k in range(4))


def test_k_fold_gives_every_fold_a_patient_when_one_patient_has_many_slices():
    """Laid end to end, P4's 57 of 131 slices covered a whole fifth: fold 0 had no test
    patient and fold 2 no validation patient (two patients were tested together). The
    patients are then dealt out by size: one test patient a fold, each tested once."""
    sizes = {"P0": 25, "P1": 34, "P2": 2, "P3": 13, "P4": 57}
    stems = [f"{p}_s{i:02d}" for p, n in sizes.items() for i in range(n)]
    tested = []
    for k in range(5):
        split = make_split(stems, (0.8, 0.2, 0.0), 42, r"^(P\d)_", None, 5, k)
        patients = {n: {s[:2] for s, v in split.items() if v == n} for n in SPLITS}
        assert len(patients["test"]) == 1 and patients["val"], (k, patients)
        assert not (patients["test"] & (patients["train"] | patients["val"]))
        tested += patients["test"]
    assert sorted(tested) == sorted(sizes)


@pytest.mark.parametrize(
    ("num_folds", "fold", "words"),
    [
        (5, None, "needs both"),
        (1, 0, "at least 2"),
        (5, 5, "outside 0..4"),
        (40, 0, "more than the 12"),
    ],
)
def test_bad_fold_settings_are_explained(num_folds, fold, words):
    with pytest.raises(LungsegError, match=words):
        make_split(SLICES, (0.8, 0.2, 0.0), 0, PATIENT, None, num_folds, fold)


def test_split_file_and_folds_together_are_refused(tmp_path):
    write_split(make_split(SLICES), tmp_path / "split.csv")
    with pytest.raises(LungsegError, match="split_file and data.num_folds"):
        make_split(SLICES, split_file=tmp_path / "split.csv", num_folds=5, fold=0)
