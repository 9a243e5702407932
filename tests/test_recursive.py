"""data.recursive: data folders with sub-folders (one per patient or scan), paired by the path
below the folder, split by sub-folder, 2.5-D volumes per folder, and predict.py/eval.py on
the same trees."""

import csv
import logging
import os
import re
import shlex
from pathlib import Path

import cv2
import numpy as np
import pytest
from test_evaluate import eval_cfg, read_outputs
from test_inference import trained_checkpoints
from test_predict import predict_cfg

from lungseg.data import context, splits
from lungseg.data.datamodule import SegDataModule
from lungseg.data.folders import find_pairs
from lungseg.errors import LungsegError
from lungseg.evaluate import evaluate
from lungseg.predict import predict
from lungseg.train import train

BY_FOLDER = "^([^/]+)"


def touch(root: Path, *names: str) -> None:
    """Empty files (pairing looks at names only), sub-folders made as needed."""
    for name in names:
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(b"")


def keyed(pairs) -> dict[str, tuple[str, str]]:
    return {p.stem: (p.image.as_posix(), p.mask.as_posix()) for p in pairs}


def test_pairs_by_the_path_below_each_folder(tmp_path):
    # Every patient folder holds a slice_1: the names alone would pair them crosswise.
    touch(tmp_path / "img", "p01/slice_1.png", "p02/slice_1.png", "p02/deep/x.jpg", "top.png")
    touch(tmp_path / "msk", "p01/slice_1.png", "p02/slice_1_mask.png", "p02/deep/x.png", "top.png")
    img, msk = tmp_path / "img", tmp_path / "msk"
    pairs = find_pairs(img, msk, recursive=True)
    assert keyed(pairs) == {
        "p01/slice_1": ((img / "p01/slice_1.png").as_posix(), (msk / "p01/slice_1.png").as_posix()),
        "p02/deep/x": ((img / "p02/deep/x.jpg").as_posix(), (msk / "p02/deep/x.png").as_posix()),
        "p02/slice_1": (
            (img / "p02/slice_1.png").as_posix(),
            (msk / "p02/slice_1_mask.png").as_posix(),
        ),
        "top": ((img / "top.png").as_posix(), (msk / "top.png").as_posix()),
    }
    assert [p.stem for p in find_pairs(img, msk)] == ["top"]  # sub-folders not searched


def test_a_mask_in_another_sub_folder_does_not_pair(tmp_path):
    touch(tmp_path / "img", "p01/a.png", "p02/b.png")
    touch(tmp_path / "msk", "p01/a.png", "p03/b.png")
    with pytest.raises(LungsegError) as err:
        find_pairs(tmp_path / "img", tmp_path / "msk", recursive=True)
    message = str(err.value)
    assert "1 image without a mask" in message and "'p02/b.png'" in message
    assert "1 mask without an image" in message and "'p03/b.png'" in message
    assert "same sub-folder" in message
    pairs = find_pairs(tmp_path / "img", tmp_path / "msk", strict=False, recursive=True)
    assert [p.stem for p in pairs] == ["p01/a"]


def test_hidden_folders_and_a_data_folder_inside_the_other_are_left_out(tmp_path):
    data = tmp_path / "data"
    touch(data, "a.png", "p1/c.png", ".ipynb_checkpoints/a.png", "p1/.cache/c.png")
    touch(data, "masks/a.png", "masks/p1/c.png", "masks/.trash/zz.png")
    pairs = find_pairs(data, data / "masks", recursive=True)  # masks below the images
    assert keyed(pairs) == {
        "a": ((data / "a.png").as_posix(), (data / "masks/a.png").as_posix()),
        "p1/c": ((data / "p1/c.png").as_posix(), (data / "masks/p1/c.png").as_posix()),
    }
    # and the other way round: the images below the masks
    root = tmp_path / "other"
    touch(root, "a.png", "p1/c.png", "images/a.png", "images/p1/c.png")
    assert [p.stem for p in find_pairs(root / "images", root, recursive=True)] == ["a", "p1/c"]


def test_linked_folders_are_followed_once(tmp_path):
    outside = tmp_path / "elsewhere"
    touch(outside, "p9/s.png")
    img, msk = tmp_path / "img", tmp_path / "msk"
    touch(img, "p1/s.png")
    touch(msk, "p1/s.png", "p9/s.png")
    os.symlink(outside / "p9", img / "p9")  # a patient folder kept on another disk
    os.symlink(outside / "p9", img / "p9_again")  # ... and a second name for it
    os.symlink(img, img / "p1" / "loop")  # a link back up the tree
    os.symlink(img / "p1", img / "a_latest")  # a second name for a folder of the tree
    assert [p.stem for p in find_pairs(img, msk, recursive=True)] == ["p1/s", "p9/s"]


def test_one_folder_spelled_two_ways_is_one_folder(tmp_path):
    data = tmp_path / "data"
    touch(data, "a.png", "a_mask.png", "p1/b.png", "p1/b_mask.png")
    other = tmp_path / "x" / ".." / "data"
    (tmp_path / "x").mkdir()
    for recursive, stems in ((False, ["a"]), (True, ["a", "p1/b"])):
        pairs = find_pairs(data, other, ["_mask"], recursive=recursive)
        assert [p.stem for p in pairs] == stems
        assert pairs[0].mask == data / "a_mask.png"


def test_a_folder_without_images_names_the_setting_that_searches_sub_folders(tmp_path):
    touch(tmp_path / "img", "p01/a.png")
    touch(tmp_path / "msk", "p01/a.png")
    with pytest.raises(LungsegError, match=r"not searched unless data\.recursive=true"):
        find_pairs(tmp_path / "img", tmp_path / "msk")
    (tmp_path / "empty" / "p01").mkdir(parents=True)
    with pytest.raises(LungsegError, match="holds no image files, in it or its sub-folders"):
        find_pairs(tmp_path / "empty", tmp_path / "msk", recursive=True)


def test_split_files_name_sub_folder_files_with_or_without_extension(tmp_path):
    stems = ["p01/a", "p01/b", "p02/a"]
    path = tmp_path / "split.csv"
    path.write_text("file,split\np01/a.png,train\n/data/images/p01\\b.png,val\np02/a,test\n")
    assert splits.make_split(stems, split_file=path) == {
        "p01/a": "train",
        "p01/b": "val",
        "p02/a": "test",
    }
    written = tmp_path / "written.csv"
    splits.write_split({"p01/a": "train", "p01/b": "val", "p02/a": "test"}, written)
    assert splits.make_split(stems, split_file=written) == splits.make_split(stems, split_file=path)
    # another patient's file of the same name is not this one
    known = ["top", "slice_3", "p01/slice_3"]
    wrong = tmp_path / "wrong.csv"
    wrong.write_text("file,split\np02/slice_3.png,train\n")
    assert splits.listed_stems(wrong, known) == set()
    wrong.write_text("file,split\nimages/p01/slice_3.png,train\nslice_3.png,test\ntop,val\n")
    assert splits.listed_stems(wrong, known) == {"p01/slice_3", "slice_3", "top"}


def test_volumes_stay_in_their_folder():
    # p1 and p2 both hold slices s1 and s2: without the folder they would be one volume twice
    stems = ["p1/s1", "p1/s2", "p2/s1", "p2/s2", "p2/s3"]
    assert context.neighbours(stems, 1, None) == [
        [0, 0, 1],
        [0, 1, 1],
        [2, 2, 3],
        [2, 3, 4],
        [3, 4, 4],
    ]
    # a pattern anchored to the file name still sees the file name
    assert context.neighbours(stems, 1, r"^(?P<volume>s)(?P<slice>\d+)$")[3] == [2, 3, 4]
    paths = [Path("/d/p1/s1.png"), Path("/d/p2/s1.png")]
    pool = [Path("/d/p1/s2.png"), Path("/d/p2/s2.png")]
    rows = context.neighbour_paths(paths, pool, 1, None)
    assert rows == [
        [Path("/d/p1/s1.png"), Path("/d/p1/s1.png"), Path("/d/p1/s2.png")],
        [Path("/d/p2/s1.png"), Path("/d/p2/s1.png"), Path("/d/p2/s2.png")],
    ]


def patient_tree(root: Path, patients: int = 4, slices: int = 3, size: int = 32):
    """root/images/pNN/slice_K.png with 0/1 masks under root/masks/pNN/: the same file names
    in every patient folder."""
    rng = np.random.default_rng(0)
    for p in range(patients):
        for k in range(slices):
            mask = np.zeros((size, size), np.uint8)
            centre = (int(rng.integers(10, 22)), int(rng.integers(10, 22)))
            cv2.circle(mask, centre, int(rng.integers(4, 8)), 1, -1)
            image = (40 + 150 * mask + rng.integers(0, 30, mask.shape)).astype(np.uint8)
            for folder, pixels in (("images", image), ("masks", mask)):
                (root / folder / f"p{p:02d}").mkdir(parents=True, exist_ok=True)
                cv2.imwrite(str(root / folder / f"p{p:02d}" / f"slice_{k}.png"), pixels)
    return root / "images", root / "masks"


def test_the_split_keeps_each_sub_folder_together_when_told_and_warns_otherwise(
    tmp_path, caplog, make_cfg
):
    images, masks = patient_tree(tmp_path)
    common = dict(mask_mode="binary", image_size=16, split=[0.5, 0.25, 0.25], recursive=True)
    with caplog.at_level(logging.WARNING, logger="lungseg"):
        dm = SegDataModule(str(images), str(masks), **common)
        dm.setup()
    assert len(dm.split) == 12 and "p00/slice_0" in dm.split
    warned = [r.getMessage() for r in caplog.records if "sub-folders" in r.getMessage()]
    assert len(warned) == 1 and "12 files lie in 4 sub-folders" in warned[0]
    # the override it suggests survives the shell and Hydra's parser
    (typed,) = re.findall(r"on the command line (\".*?\")", warned[0])
    (override,) = shlex.split(typed)
    assert make_cfg(override).data.group_pattern == BY_FOLDER
    # and it also fits files directly in the folder (each its own group)
    assert splits.patient_ids(["top", "p01/a", "p01/sub/b"], BY_FOLDER) == {
        "top": "top",
        "p01/a": "p01",
        "p01/sub/b": "p01",
    }

    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="lungseg"):
        dm = SegDataModule(str(images), str(masks), group_pattern=BY_FOLDER, **common)
        dm.setup()
    assert not [r for r in caplog.records if "sub-folders" in r.getMessage()]
    by_patient: dict[str, set[str]] = {}
    for stem, split in dm.split.items():
        by_patient.setdefault(stem.split("/")[0], set()).add(split)
    assert len(by_patient) == 4 and all(len(s) == 1 for s in by_patient.values())
    assert sorted(s for (s,) in by_patient.values()) == ["test", "train", "train", "val"]

    # bit depths are told apart per file, not per name: p03's 16-bit slices mix with 8-bit ones
    for k in range(3):
        cv2.imwrite(str(images / "p03" / f"slice_{k}.png"), np.full((32, 32), 900, np.uint16))
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="lungseg"):
        dm = SegDataModule(str(images), str(masks), group_pattern=BY_FOLDER, **common)
        dm.setup()
    (mixed,) = [r.getMessage() for r in caplog.records if "mix" in r.getMessage()]
    assert (
        "The images mix 9 8-bit files" in mixed and "3 16-bit files (e.g. p03/slice_0.png" in mixed
    )
    assert dm.data_info()["bit_depths"] == [8, 16]

    with pytest.raises(LungsegError, match="data.recursive is 'yes'"):
        SegDataModule(str(images), str(masks), mask_mode="binary", recursive="yes")


def test_train_eval_and_predict_on_a_tree_of_patient_folders(tmp_path, make_cfg, demo_dir):
    images, masks = patient_tree(tmp_path / "data")
    cfg = make_cfg(
        f"data.image_dir={images}",
        f"data.mask_dir={masks}",
        "data.mask_mode=binary",
        "data.recursive=true",
        f"data.group_pattern='{BY_FOLDER}'",
        "data.split=[0.5,0.25,0.25]",
        "data.image_size=16",
    )
    result = train(cfg)
    run = Path(cfg.output_dir)
    with (run / "split.csv").open() as f:
        split = {row["file"]: row["split"] for row in csv.DictReader(f)}
    test = sorted(stem for stem, s in split.items() if s == "test")
    assert len(test) == 3 and len({stem.split("/")[0] for stem in test}) == 1

    # eval.py scores the run's test split, found with the run's data.recursive
    evaluate(eval_cfg(tmp_path, result["best_checkpoint"]))
    rows, summary = read_outputs(tmp_path / "eval")
    assert [row["image"] for row in rows] == test and summary["n_images"] == 3
    # and whole trees of other data with data.recursive=true
    evaluate(
        eval_cfg(
            tmp_path / "all",
            result["best_checkpoint"],
            f"data.image_dir={images}",
            f"data.mask_dir={masks}",
            "data.recursive=true",
            "split=all",  # the run's own data: all of it, its training images included
        )
    )
    rows, _ = read_outputs(tmp_path / "all" / "eval")
    assert sorted(row["image"] for row in rows) == sorted(split)
    with pytest.raises(LungsegError, match="data.recursive is 2; give true, false or null"):
        evaluate(eval_cfg(tmp_path / "typo", result["best_checkpoint"], "data.recursive=2"))


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, demo_dir) -> Path:
    return trained_checkpoints(tmp_path_factory, demo_dir)["palette"]


def test_predict_keeps_the_tree_and_never_reads_its_own_outputs(tmp_path, checkpoint):
    inputs = tmp_path / "in"
    rng = np.random.default_rng(1)
    for name in ("p1/a.png", "p2/a.png", "b.png"):
        (inputs / name).parent.mkdir(parents=True, exist_ok=True)
        cv2.imwrite(str(inputs / name), rng.integers(0, 255, (40, 40), dtype=np.uint8))
    out = inputs / "predicted"  # inside the input folder
    expected = sorted(
        f"{stem}{end}" for stem in ("b", "p1/a", "p2/a") for end in (".png", "_overlay.png")
    )
    for overwrite in ("false", "true"):  # the second run must not take the first's outputs
        written = predict(
            predict_cfg(checkpoint, inputs, out, "recursive=true", f"overwrite={overwrite}")
        )
        assert sorted(p.relative_to(out).as_posix() for p in written) == expected
        found = sorted(
            p.relative_to(out).as_posix()
            for p in out.rglob("*")
            if p.is_file() and not p.name.startswith(".")
        )
        assert found == expected
    with pytest.raises(LungsegError, match=r"already exist in .*'b\.png', 'b_overlay\.png'"):
        predict(predict_cfg(checkpoint, inputs, out, "recursive=true"))

    # without recursive=true: the images directly in the folder only
    flat = predict(predict_cfg(checkpoint, inputs, tmp_path / "flat"))
    assert sorted(p.name for p in flat) == ["b.png", "b_overlay.png"]

    # an earlier run's outputs inside the input folder are not read as images either
    again = predict(predict_cfg(checkpoint, inputs, inputs / "again", "recursive=true"))
    assert sorted(p.relative_to(inputs / "again").as_posix() for p in again) == expected
    assert (inputs / "again" / ".lungseg-predictions").is_file()

    # an output folder above the input folder: outputs would replace inputs
    work = tmp_path / "work"
    (work / "ct" / "ct").mkdir(parents=True)
    for name in ("ct/a.png", "ct/ct/a.png"):  # ct/ct/a.png's mask would be work/ct/a.png
        cv2.imwrite(str(work / name), np.zeros((40, 40), np.uint8))
    kept = (work / "ct" / "a.png").read_bytes()
    with pytest.raises(
        LungsegError, match=r"1 output file would replace input images: .*ct/a\.png"
    ):
        predict(predict_cfg(checkpoint, work / "ct", work, "recursive=true", "overwrite=true"))
    assert (work / "ct" / "a.png").read_bytes() == kept

    (inputs / "P1").mkdir()  # p1/a.png and P1/a.png write the same file on macOS and Windows
    cv2.imwrite(str(inputs / "P1" / "a.png"), np.zeros((40, 40), np.uint8))
    with pytest.raises(LungsegError, match=r"written twice: 'P1/a\.png and p1/a\.png → "):
        predict(predict_cfg(checkpoint, inputs, tmp_path / "clash", "recursive=true"))
