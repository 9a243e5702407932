"""Folder patterns: data.image_dir='Train/*/images' with data.mask_dir='Train/*/lung masks'
(COVID-QU-Ex and other sets that keep images and masks side by side in one folder per patient,
class or site). Each matched image folder pairs with the mask folder its wildcards fill in;
keys start with the matched folder names. predict.py's input_dir takes a pattern too."""

import csv
import logging
import shlex
from pathlib import Path

import cv2
import numpy as np
import pytest
from test_evaluate import eval_cfg, read_outputs
from test_inference import trained_checkpoints
from test_predict import predict_cfg
from test_recursive import BY_FOLDER, keyed, patient_tree, touch

from lungseg.data.folders import check_data_dirs, find_pairs, layer_folders
from lungseg.errors import LungsegError
from lungseg.evaluate import evaluate
from lungseg.predict import predict
from lungseg.train import train


def test_each_matched_folder_pairs_with_its_own_mask_folder(tmp_path):
    # Both groups hold an img_1: by name alone they would pair crosswise.
    for group in ("COVID-19", "Normal", ".trash"):
        touch(tmp_path / "Train" / group, "images/img_1.png", "lung masks/img_1.png")
    touch(tmp_path / "Train" / "Normal", "images/img_2.png", "lung masks/img_2_mask.png")
    train_dir = tmp_path / "Train"
    pairs = find_pairs(train_dir / "*" / "images", train_dir / "*" / "lung masks")

    def paths(group, image, mask):
        return (
            (train_dir / group / "images" / image).as_posix(),
            (train_dir / group / "lung masks" / mask).as_posix(),
        )

    assert keyed(pairs) == {  # sorted by key; hidden folders never match
        "COVID-19/img_1": paths("COVID-19", "img_1.png", "img_1.png"),
        "Normal/img_1": paths("Normal", "img_1.png", "img_1.png"),
        "Normal/img_2": paths("Normal", "img_2.png", "img_2_mask.png"),
    }
    assert [p.stem for p in pairs] == sorted(p.stem for p in pairs)


def test_wildcards_within_names_several_and_with_sub_folders(tmp_path):
    # `*_images` fills `*_masks`; two wildcards fill in order; `?` is one character; the rest
    # of a name is literal, brackets included.
    touch(tmp_path, "siteA_images/p1/scan [1]/a.png", "siteA_masks/p1/scan [1]/a.png")
    touch(tmp_path, "siteB_images/p2/scan [1]/b.png", "siteB_masks/p2/scan [1]/b.png")
    touch(tmp_path, "siteB_images/p2/scan 1/c.png", "siteB_masks/p2/scan 1/c.png")
    pairs = find_pairs(tmp_path / "site?_images/*/scan [1]", tmp_path / "site?_masks/*/scan [1]")
    assert [(p.stem, p.prefix_parts) for p in pairs] == [
        ("siteA_images/p1/a", 2),
        ("siteB_images/p2/b", 2),
    ]
    assert pairs[1].mask == tmp_path / "siteB_masks/p2/scan [1]/b.png"
    # with data.recursive the files below each matched folder too, keyed by their path
    touch(tmp_path, "siteA_images/p1/scan [1]/deep/d.png", "siteA_masks/p1/scan [1]/deep/d.png")
    pairs = find_pairs(
        tmp_path / "site?_images/*/scan [1]", tmp_path / "site?_masks/*/scan [1]", recursive=True
    )
    assert [p.stem for p in pairs] == [
        "siteA_images/p1/a",
        "siteA_images/p1/deep/d",
        "siteB_images/p2/b",
    ]


def test_masks_in_several_folders_per_matched_folder(tmp_path):
    for case in ("c1", "c2"):
        touch(tmp_path / case, "cxr/x.png", "left/x.png", "right/x_mask.png")
    pairs = find_pairs(tmp_path / "*" / "cxr", [tmp_path / "*" / "left", tmp_path / "*/right"])
    assert [p.stem for p in pairs] == ["c1/x", "c2/x"]
    assert pairs[1].masks == (tmp_path / "c2/left/x.png", tmp_path / "c2/right/x_mask.png")
    # eval.py finds each pair's mask folders from its key (below the matched folder)
    assert layer_folders(pairs[1]) == [tmp_path / "c2/left", tmp_path / "c2/right"]


def test_patterns_that_cannot_work_name_the_fix(tmp_path, caplog):
    for group in ("g1", "g2", "g3"):
        touch(tmp_path / group, "images/a.png", "masks/a.png")
    (tmp_path / "g3" / "masks" / "a.png").unlink()
    (tmp_path / "g3" / "masks").rmdir()
    images, masks = tmp_path / "*" / "images", tmp_path / "*" / "masks"
    with pytest.raises(LungsegError, match=r"1 of the 3 folders .* have no mask folder: .*g3"):
        find_pairs(images, masks)
    skipped = []
    with caplog.at_level(logging.WARNING):
        pairs = find_pairs(images, masks, strict=False, skipped=skipped)
    assert [p.stem for p in pairs] == ["g1/a", "g2/a"]
    assert "Skipping image folders without a mask folder" in caplog.text
    assert skipped == [(tmp_path / "g3" / "images", f"no mask folder {tmp_path / 'g3/masks'}")]
    cases = [
        (images, tmp_path / "g1/masks", "holds 0 wildcards .* holds 1"),
        (tmp_path / "*/*", masks, "holds 1 wildcards .* holds 2"),
        (tmp_path / "g1/images", masks, "data.image_dir .* does not"),
        (tmp_path / "*" / "scans", masks, "matches no folder"),
        (tmp_path / "**" / "images", masks, "data.recursive=true"),
    ]
    for image_dir, mask_dir, problem in cases:
        for check in (find_pairs, check_data_dirs):  # the settings are checked before training
            with pytest.raises(LungsegError, match=problem):
                check(image_dir, mask_dir)
    check_data_dirs(images, masks)  # g3's missing mask folder is reported when pairing


def group_tree(root: Path) -> None:
    """root/<group>/images/slice_K.png with 0/1 masks in root/<group>/masks: test_recursive's
    patient tree, each patient's images and masks moved into its own folder."""
    images, masks = patient_tree(root.parent / f"{root.name}_tree")
    for patient in sorted(images.iterdir()):
        (root / patient.name).mkdir(parents=True)
        patient.rename(root / patient.name / "images")
        (masks / patient.name).rename(root / patient.name / "masks")


def test_train_and_eval_on_a_folder_pattern_split_by_matched_folder(tmp_path, make_cfg, caplog):
    group_tree(tmp_path / "data")
    # as typed on the command line: the shell leaves quoted wildcards alone
    typed = f"'data.image_dir={tmp_path}/data/*/images' 'data.mask_dir={tmp_path}/data/*/masks'"
    overrides = [
        *shlex.split(typed),
        "data.mask_mode=binary",
        "data.split=[0.5,0.25,0.25]",
        "data.image_size=16",
    ]
    with caplog.at_level(logging.WARNING, logger="lungseg"):
        train(make_cfg(*overrides, "trainer.max_epochs=1", "output_dir=" + str(tmp_path / "r1")))
    (warned,) = [r.getMessage() for r in caplog.records if "sub-folders" in r.getMessage()]
    assert "12 files lie in 4 sub-folders" in warned and "the folder its first '*'" in warned

    cfg = make_cfg(*overrides, f"data.group_pattern='{BY_FOLDER}'")
    result = train(cfg)
    with (Path(cfg.output_dir) / "split.csv").open() as f:
        split = {row["file"]: row["split"] for row in csv.DictReader(f)}
    assert sorted(split) == [f"p{p:02d}/slice_{k}" for p in range(4) for k in range(3)]
    by_group: dict[str, set[str]] = {}
    for stem, s in split.items():
        by_group.setdefault(stem.split("/")[0], set()).add(s)
    assert len(by_group) == 4 and all(len(s) == 1 for s in by_group.values())
    test = sorted(stem for stem, s in split.items() if s == "test")
    # eval.py scores the run's test split, found through the run's patterns
    evaluate(eval_cfg(tmp_path, result["best_checkpoint"]))
    rows, summary = read_outputs(tmp_path / "eval")
    assert [row["image"] for row in rows] == test and summary["n_images"] == 3


def test_predict_on_a_folder_pattern_writes_below_the_matched_names(
    tmp_path, tmp_path_factory, demo_dir
):
    checkpoint = trained_checkpoints(tmp_path_factory, demo_dir)["palette"]
    data = tmp_path / "data"
    rng = np.random.default_rng(3)
    names = ["COVID-19/images/a.png", "Normal/images/a.png", "Normal/images/deep/b.png"]
    for name in [*names, "Normal/lung masks/a.png"]:  # the mask folder is not one of */images
        (data / name).parent.mkdir(parents=True, exist_ok=True)
        cv2.imwrite(str(data / name), rng.integers(0, 255, (40, 40), dtype=np.uint8))

    def outputs(written, out):
        return sorted(p.relative_to(out).as_posix() for p in written)

    out = tmp_path / "out"
    both = ["COVID-19/a.png", "COVID-19/a_overlay.png", "Normal/a.png", "Normal/a_overlay.png"]
    assert outputs(predict(predict_cfg(checkpoint, data / "*/images", out)), out) == both
    deep = tmp_path / "deep"
    written = predict(predict_cfg(checkpoint, data / "*/images", deep, "recursive=true"))
    assert outputs(written, deep) == sorted(
        [*both, "Normal/deep/b.png", "Normal/deep/b_overlay.png"]
    )
    # an output folder that the pattern matches too is not read as input by a later run
    for overwrite in ("false", "true"):
        written = predict(
            predict_cfg(
                checkpoint, data / "*", data / "preds", "recursive=true", f"overwrite={overwrite}"
            )
        )
        assert len(written) == 8 and {p.relative_to(data / "preds").parts[0] for p in written} == {
            "COVID-19",
            "Normal",
        }
    cases = [
        (data / "*/images", data / "Normal/images", "is one of the folders that input_dir"),
        (data / "*/scans", out, r"\(input_dir\) matches no folder"),
        (data / "**/images", out, r"uses '\*\*'.* give the folder and recursive=true"),
    ]
    for pattern, output_dir, problem in cases:
        with pytest.raises(LungsegError, match=problem):
            predict(predict_cfg(checkpoint, pattern, output_dir))
    with pytest.raises(LungsegError, match=r"already exist in .*COVID-19/a\.png"):
        predict(predict_cfg(checkpoint, data / "*/images", out))
