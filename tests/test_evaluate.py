"""Per-image metrics against a direct numpy computation, the empty-mask rule, and eval runs on a
training run's test split and on a folder."""

import csv
import json
import logging
import re
import shutil
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from conftest import ROOT, oriented
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf
from test_inference import CPU, trained_checkpoints, write_pairs
from test_predict import read_only

import lungseg.evaluate
from lungseg import postprocess
from lungseg.data.demo import make_demo_dataset
from lungseg.data.folders import read_image
from lungseg.data.masks import decode_mask
from lungseg.errors import LungsegError
from lungseg.evaluate import METRICS, _same_picture, evaluate, hd95, image_metrics
from lungseg.inference import load_checkpoint, predict_probabilities


@pytest.fixture(scope="session")
def checkpoints(tmp_path_factory, demo_dir):
    return trained_checkpoints(tmp_path_factory, demo_dir)


def brute_boundary(mask):
    """Pixels of mask with a 4-neighbour outside it or outside the image, by looping."""
    h, w = mask.shape
    out = np.zeros_like(mask, bool)
    for y in range(h):
        for x in range(w):
            if mask[y, x]:
                neighbours = [(y - 1, x), (y + 1, x), (y, x - 1), (y, x + 1)]
                out[y, x] = any(
                    not (0 <= j < h and 0 <= i < w) or not mask[j, i] for j, i in neighbours
                )
    return out


def brute_hd95(a, b):
    if not a.any() and not b.any():
        return 0.0
    if not a.any() or not b.any():
        return float(np.sqrt(a.shape[0] ** 2 + a.shape[1] ** 2))
    pa, pb = np.argwhere(brute_boundary(a)), np.argwhere(brute_boundary(b))
    d = np.sqrt(((pa[:, None, :] - pb[None, :, :]) ** 2).sum(-1))  # all pairs
    return float(np.percentile(np.concatenate([d.min(1), d.min(0)]), 95))


def reference(pred, target, num_classes):
    """{class: {metric: value}} straight from pixel counts; 0/0 → 1 if the masks agree else 0."""
    out = {}
    for c in range(1, num_classes):
        p, t = pred == c, target == c
        tp, fp = int((p & t).sum()), int((p & ~t).sum())
        fn, tn = int((~p & t).sum()), int((~p & ~t).sum())
        same = np.array_equal(p, t)

        def ratio(n, d, same=same):
            return (1.0 if same else 0.0) if d == 0 else n / d

        out[c] = {
            "dice": ratio(2 * tp, 2 * tp + fp + fn),
            "iou": ratio(tp, tp + fp + fn),
            "precision": ratio(tp, tp + fp),
            "recall": ratio(tp, tp + fn),
            "specificity": ratio(tn, tn + fp),
            "hd95": brute_hd95(p, t),
            "target_pixels": int(t.sum()),
            "pred_pixels": int(p.sum()),
        }
    return out


def assert_metrics_equal(got, expected):
    assert got.keys() == expected.keys()
    for c in expected:
        for key, value in expected[c].items():
            assert got[c][key] == pytest.approx(value, abs=1e-4), (c, key)


def random_masks(rng, h, w, num_classes):
    """Blobby class maps: smoothed noise cut into classes, so boundaries are irregular."""
    noise = rng.random((h // 3 + 2, w // 3 + 2))
    field = np.kron(noise, np.ones((3, 3)))[:h, :w] + 0.3 * rng.random((h, w))
    return np.digitize(field, np.linspace(0.5, 1.2, num_classes)[: num_classes - 1]).astype(
        np.uint8
    )


@pytest.mark.parametrize("seed", range(6))
def test_metrics_match_numpy(seed):
    rng = np.random.default_rng(seed)
    h, w = rng.integers(6, 20, size=2)
    target = random_masks(rng, h, w, 4)
    pred = random_masks(rng, h, w, 4)
    if seed == 0:
        target[target == 3] = 0  # class 3 only in the prediction
    if seed == 1:
        pred[pred == 2] = 0  # class 2 only in the ground truth
    got = image_metrics(pred, target, 4)
    assert_metrics_equal(got, reference(pred, target, 4))
    assert any(0 < got[c]["hd95"] < np.hypot(h, w) for c in got)  # a non-trivial distance


def test_hd95_in_pixels():
    a, b = np.zeros((10, 10), bool), np.zeros((10, 10), bool)
    a[1, 1], b[4, 5] = True, True  # 3 down, 4 across
    assert hd95(a, b) == pytest.approx(5.0)
    a, b = np.zeros((20, 30), bool), np.zeros((20, 30), bool)
    a[5:15, 5:15], b[5:15, 8:18] = True, True  # a square and the same square 3 px right
    assert hd95(a, b) == pytest.approx(brute_hd95(a, b), abs=1e-4)
    assert hd95(a, b) == pytest.approx(3.0)


def test_empty_mask_rule():
    h, w = 6, 8
    empty, blob = np.zeros((h, w), np.uint8), np.zeros((h, w), np.uint8)
    blob[2:4, 3:6] = 1
    both = image_metrics(empty, empty, 2)[1]
    assert both == {
        "dice": 1.0,
        "iou": 1.0,
        "precision": 1.0,
        "recall": 1.0,
        "specificity": 1.0,
        "hd95": 0.0,
        "target_pixels": 0,
        "pred_pixels": 0,
    }
    missed = image_metrics(empty, blob, 2)[1]  # ground truth has the class, prediction not
    false_alarm = image_metrics(blob, empty, 2)[1]  # prediction has it, ground truth not
    for one in (missed, false_alarm):
        assert one["dice"] == one["iou"] == one["precision"] == one["recall"] == 0.0
        assert one["hd95"] == pytest.approx(10.0)  # the 6 x 8 image's diagonal
    assert missed["specificity"] == 1.0  # no false positives
    assert false_alarm["specificity"] == pytest.approx((48 - 6) / 48)
    full = np.ones((h, w), np.uint8)  # no background: specificity is 0/0
    assert image_metrics(full, full, 2)[1]["specificity"] == 1.0
    assert image_metrics(blob, full, 2)[1]["specificity"] == 0.0


def eval_cfg(tmp_path, ckpt, *overrides):
    with initialize_config_dir(str(ROOT / "conf"), version_base="1.3"):
        return compose(
            "eval",
            overrides=[
                f"ckpt_path={ckpt}",
                f"output_dir={tmp_path / 'eval'}",
                "progress_bar=false",
                *overrides,
            ],
        )


def read_outputs(out_dir):
    with (out_dir / "per_image.csv").open() as f:
        rows = list(csv.DictReader(f))
    return rows, json.loads((out_dir / "summary.json").read_text())


def check_rows(rows, model, images, masks, mask_mode, palette):
    """Every number of per_image.csv equals the numpy reference on the model's prediction."""
    info = model.hparams.data_info
    names, k = info["class_names"], info["num_classes"]
    for row in rows:
        raw = read_image(images[row["image"]])
        pred = predict_probabilities(model, [raw])[0].argmax(0)
        target = decode_mask(read_image(masks[row["image"]]), mask_mode, Path(), palette, k)
        assert (int(row["height"]), int(row["width"])) == target.shape == raw.shape[:2]
        expected = reference(pred, target, k)
        got = {c: {key: float(row[f"{key}_{names[c]}"]) for key in expected[c]} for c in expected}
        assert_metrics_equal(got, expected)


def check_summary(rows, summary, class_names):
    assert summary["n_images"] == len(rows)
    for name in class_names[1:]:
        entry = summary["classes"][name]
        gt_empty = np.array([row[f"target_pixels_{name}"] == "0" for row in rows])
        pred_empty = np.array([row[f"pred_pixels_{name}"] == "0" for row in rows])
        assert entry["n_empty_ground_truth"] == gt_empty.sum()
        assert entry["n_empty_prediction"] == pred_empty.sum()
        assert entry["n_both_empty"] == (gt_empty & pred_empty).sum()
        assert entry["n_one_empty"] == (gt_empty != pred_empty).sum()
        for metric in METRICS:
            values = np.array([float(row[f"{metric}_{name}"]) for row in rows])
            assert entry[metric]["mean"] == pytest.approx(values.mean())
            assert entry[metric]["median"] == pytest.approx(np.median(values))
            assert entry[metric]["std"] == pytest.approx(values.std())
    for metric in METRICS:
        means = [summary["classes"][n][metric]["mean"] for n in class_names[1:]]
        assert summary["mean_over_classes"][metric] == pytest.approx(np.mean(means))


def test_eval_on_the_test_split_of_the_training_run(tmp_path, checkpoints):
    ckpt = checkpoints["palette"]
    run = ckpt.parent.parent
    summary = evaluate(eval_cfg(tmp_path, ckpt))
    rows, saved = read_outputs(tmp_path / "eval")
    assert saved == json.loads(json.dumps(summary))
    with (run / "split.csv").open() as f:
        test = sorted(r["file"] for r in csv.DictReader(f) if r["split"] == "test")
    assert [row["image"] for row in rows] == test and test
    model = load_checkpoint(ckpt, CPU)
    info = model.hparams.data_info
    demo = Path(OmegaConf.load(run / "config.yaml").data.demo_dir)
    images = {s: demo / "images" / f"{s}.png" for s in test}
    masks = {s: demo / "masks" / f"{s}.png" for s in test}
    assert read_image(images[test[0]]).shape == (48, 48)  # scored at 48 px, predicted at 32
    check_rows(rows, model, images, masks, "palette", info["palette"])
    check_summary(rows, saved, info["class_names"])
    assert saved["images"].startswith("test split of")


def test_eval_on_a_folder_with_empty_masks(tmp_path, checkpoints):
    """Index masks scored by a model trained on palette masks (data.mask_mode overrides the
    checkpoint's), mixed sizes, `_mask` names, two masks without any class."""
    ckpt = checkpoints["palette"]
    sizes = [(48, 48), (40, 56), (33, 47), (48, 48), (60, 40)]
    image_dir, mask_dir = write_pairs(tmp_path / "data", sizes, empty=(1, 3), mask_suffix="_mask")
    cfg = eval_cfg(
        tmp_path,
        ckpt,
        f"data.image_dir={image_dir}",
        f"data.mask_dir={mask_dir}",
        "data.mask_mode=index",
    )
    summary = evaluate(cfg)
    rows, saved = read_outputs(tmp_path / "eval")
    stems = [f"img{i}" for i in range(len(sizes))]
    assert [row["image"] for row in rows] == stems
    assert saved["classes"]["lung"]["n_empty_ground_truth"] == 2
    assert saved["classes"]["tumour"]["n_empty_ground_truth"] == 2
    assert summary["mask_mode"] == "index"
    model = load_checkpoint(ckpt, CPU)
    images = {s: image_dir / f"{s}.png" for s in stems}
    masks = {s: mask_dir / f"{s}_mask.png" for s in stems}
    check_rows(rows, model, images, masks, "index", None)
    check_summary(rows, saved, model.hparams.data_info["class_names"])
    for row in rows[1], rows[3]:  # empty ground truth: perfect or zero, nothing in between
        for name in ("lung", "tumour"):
            diagonal = np.hypot(int(row["height"]), int(row["width"]))
            nothing_predicted = row[f"pred_pixels_{name}"] == "0"
            assert float(row[f"dice_{name}"]) == (1.0 if nothing_predicted else 0.0)
            assert float(row[f"hd95_{name}"]) == pytest.approx(0 if nothing_predicted else diagonal)


def test_eval_names_pairs_whose_image_and_mask_carry_different_exif_orientations(
    tmp_path, checkpoints, caplog
):
    """As training does: a mask drawn in a viewer follows its image's EXIF tag; one made from
    the stored pixels does not, and eval.py says so once, naming the first pair."""
    ckpt = checkpoints["palette"]
    image_dir, mask_dir = write_pairs(tmp_path / "data", [(40, 48), (48, 40), (44, 44)])
    cfg = eval_cfg(
        tmp_path,
        ckpt,
        f"data.image_dir={image_dir}",
        f"data.mask_dir={mask_dir}",
        "data.mask_mode=index",
    )
    with caplog.at_level(logging.WARNING):
        evaluate(cfg)
    assert "EXIF" not in caplog.text
    image = read_image(image_dir / "img1.png")
    # The same pixels shown upright: turned 90 degrees for storage, tag 6 says how to undo it.
    (image_dir / "img1.png").write_bytes(oriented(".png", np.rot90(image), 6))
    shutil.rmtree(tmp_path / "eval")
    with caplog.at_level(logging.WARNING):
        evaluate(cfg)
    assert "1 image/mask pairs carry different EXIF orientations" in caplog.text
    assert f"image {image_dir / 'img1.png'} (turned 90 degrees clockwise)" in caplog.text
    assert f"its mask {mask_dir / 'img1.png'} (as stored)" in caplog.text


def test_eval_scores_masks_at_another_scale_with_data_resize_masks(tmp_path, checkpoints):
    """Masks of half their images' size (SCR's of JSRT) score as the full-size masks they
    were drawn from, each pixel repeated 2x2; without data.resize_masks they are refused."""
    image_dir, mask_dir = write_pairs(tmp_path / "data", [(40, 48), (48, 40), (44, 44)])
    rng = np.random.default_rng(0)
    half = {}
    for path in sorted(mask_dir.iterdir()):
        h, w = read_image(path).shape[:2]
        half[path] = rng.integers(0, 3, (h // 2, w // 2)).astype(np.uint8)
        cv2.imwrite(str(path), np.kron(half[path], np.ones((2, 2), np.uint8)))
    folders = [f"data.image_dir={image_dir}", f"data.mask_dir={mask_dir}", "data.mask_mode=index"]
    evaluate(eval_cfg(tmp_path / "full", checkpoints["palette"], *folders))
    for path, mask in half.items():
        cv2.imwrite(str(path), mask)
    with pytest.raises(LungsegError, match=r"at 1/2 its size: give data.resize_masks=true"):
        evaluate(eval_cfg(tmp_path / "half", checkpoints["palette"], *folders))
    ckpt = checkpoints["palette"]
    evaluate(eval_cfg(tmp_path / "half", ckpt, *folders, "data.resize_masks=true"))
    full, _ = read_outputs(tmp_path / "full" / "eval")
    assert read_outputs(tmp_path / "half" / "eval")[0] == full


def test_eval_on_folders_with_strict_false_skips_the_pairs_it_cannot_score(
    tmp_path, checkpoints, caplog
):
    sizes = [(20, 24), (24, 20), (22, 22), (20, 20)]
    image_dir, mask_dir = write_pairs(tmp_path / "data", sizes)
    (image_dir / "img1.png").write_bytes(b"")  # unreadable image
    cv2.imwrite(str(mask_dir / "img2.png"), np.zeros((5, 5), np.uint8))  # mask of another size
    folders = [f"data.image_dir={image_dir}", f"data.mask_dir={mask_dir}", "data.mask_mode=index"]
    with pytest.raises(LungsegError, match="img1.png could not be decoded.* data.strict=false"):
        evaluate(eval_cfg(tmp_path, checkpoints["palette"], *folders))
    with caplog.at_level(logging.INFO):
        evaluate(eval_cfg(tmp_path, checkpoints["palette"], *folders, "data.strict=false"))
    rows, _ = read_outputs(tmp_path / "eval")
    assert [row["image"] for row in rows] == ["img0", "img3"]
    assert "2 image/mask pairs that cannot be scored are left out (strict=false)" in caplog.text
    assert "img1.png could not be decoded" in caplog.text and "is 5x5" in caplog.text
    assert "2 images scored, 2 pairs left out (data.strict=false; each with" in caplog.text
    for written in ("per_image.csv", "unscored.csv"):
        assert b"\r" not in (tmp_path / "eval" / written).read_bytes()
    with (tmp_path / "eval" / "unscored.csv").open(newline="") as f:
        skipped = list(csv.DictReader(f))
    assert [Path(row["file"]).name for row in skipped] == ["img1.png", "img2.png"]
    assert "could not be decoded" in skipped[0]["reason"] and "5x5" in skipped[1]["reason"]
    assert json.loads((tmp_path / "eval" / "summary.json").read_text())["unscored"] == 2
    # scored again into the folder with nothing left out: no stale list
    good = write_pairs(tmp_path / "good", sizes)
    fine = [f"data.image_dir={good[0]}", f"data.mask_dir={good[1]}", "data.mask_mode=index"]
    evaluate(eval_cfg(tmp_path, checkpoints["palette"], *fine, "overwrite=true"))
    assert not (tmp_path / "eval" / "unscored.csv").exists()
    for i in (0, 3):
        (image_dir / f"img{i}.png").write_bytes(b"")
    with pytest.raises(LungsegError, match="None of the 4 image/mask pairs could be scored"):
        evaluate(eval_cfg(tmp_path / "all", checkpoints["palette"], *folders, "data.strict=false"))


def test_eval_applies_the_post_processing_and_keeps_the_scores_without_it(tmp_path, checkpoints):
    """postprocess.* from the command: every image scored on exactly the post-processed
    prediction, the scores before it kept beside (removing components only removes pixels)."""
    ckpt = checkpoints["palette"]
    overrides = ["postprocess.min_confidence=0.9", "postprocess.min_size=3"]
    summary = evaluate(eval_cfg(tmp_path, ckpt, *overrides))
    rows, saved = read_outputs(tmp_path / "eval")
    assert saved["postprocess"] == {"min_size": 3.0, "threshold": None, "min_confidence": 0.9}
    model = load_checkpoint(ckpt, CPU)
    info = model.hparams.data_info
    demo = Path(OmegaConf.load(ckpt.parent.parent / "config.yaml").data.demo_dir)
    changed = 0
    for row in rows:
        prob = predict_probabilities(model, [read_image(demo / "images" / f"{row['image']}.png")])
        pred = postprocess.classes(prob[0], saved["postprocess"], info)
        for c, name in enumerate(info["class_names"][1:], start=1):
            assert int(row[f"pred_pixels_{name}"]) == (pred == c).sum()
        changed += (pred != prob[0].argmax(0)).any()
    assert changed  # the setting did something on these images, so the test can tell
    before = summary["without_postprocessing"]["classes"]
    for name, entry in summary["classes"].items():
        assert entry["n_empty_prediction"] >= before[name]["n_empty_prediction"]


def test_eval_applies_the_checkpoints_test_time_flips_unless_told_otherwise(tmp_path, checkpoints):
    """A recipe's postprocess.tta_flips travel in its checkpoint: eval.py averages over them by
    default (tta=null), over tta_flips with tta=true, and not at all with tta=false."""
    run = tmp_path / "run"
    shutil.copytree(checkpoints["palette"].parent.parent, run)
    ckpt = run / "checkpoints" / checkpoints["palette"].name
    saved = torch.load(ckpt, map_location="cpu", weights_only=False)
    saved["hyper_parameters"]["postprocess"]["tta_flips"] = ["horizontal", "vertical"]
    torch.save(saved, ckpt)
    model = load_checkpoint(ckpt, CPU)
    info = model.hparams.data_info
    demo = Path(OmegaConf.load(run / "config.yaml").data.demo_dir)
    predicted = {}
    for name, overrides, expected in [
        ("recipe", [], ["horizontal", "vertical"]),
        ("asked", ["tta=true", "tta_flips=[vertical]"], ["vertical"]),
        ("none", ["tta=false"], []),
    ]:
        evaluate(eval_cfg(tmp_path / name, ckpt, *overrides))
        rows, summary = read_outputs(tmp_path / name / "eval")
        assert summary["tta_flips"] == expected
        predicted[name] = [row[k] for row in rows for k in row if k.startswith("pred_pixels")]
        for row in rows:
            image = read_image(demo / "images" / f"{row['image']}.png")
            pred = predict_probabilities(model, [image], expected)[0].argmax(0)
            for c, cls in enumerate(info["class_names"][1:], start=1):
                assert int(row[f"pred_pixels_{cls}"]) == (pred == c).sum()
    assert predicted["recipe"] != predicted["none"]  # the flips change pixels: the test can tell


def test_eval_keeps_the_results_of_an_earlier_evaluation_unless_told_to_overwrite(
    tmp_path, checkpoints
):
    """Was: per_image.csv and summary.json already in output_dir silently replaced."""
    out = tmp_path / "eval"
    out.mkdir()
    (out / "summary.json").write_text("earlier\n")
    # Refused before the checkpoint is even read: this one does not exist.
    with pytest.raises(LungsegError) as error:
        evaluate(eval_cfg(tmp_path, tmp_path / "missing.ckpt"))
    message = str(error.value)
    assert f"{out} already holds summary.json of an earlier evaluation" in message
    assert "output_dir=<folder>" in message and "overwrite=true" in message
    assert (out / "summary.json").read_text() == "earlier\n"
    assert not (out / "per_image.csv").exists()

    ckpt = checkpoints["palette"]
    summary = evaluate(eval_cfg(tmp_path, ckpt, "overwrite=true"))
    assert read_outputs(out)[1] == json.loads(json.dumps(summary))
    with pytest.raises(LungsegError, match="holds per_image.csv and summary.json of an earlier"):
        evaluate(eval_cfg(tmp_path, ckpt))
    with pytest.raises(LungsegError, match="overwrite is 'yes', which Hydra keeps as text"):
        evaluate(eval_cfg(tmp_path, ckpt, "overwrite=yes"))
    assert read_outputs(out)[1] == json.loads(json.dumps(summary))


@pytest.mark.parametrize("how", ["mode", "access"])
def test_eval_names_an_output_folder_it_cannot_write_before_scoring(
    tmp_path, checkpoints, monkeypatch, how
):
    """Was: a PermissionError traceback, after every image had been scored."""
    shared = tmp_path / "shared"
    cfg = eval_cfg(shared, checkpoints["palette"])
    read_only(shared, how, monkeypatch)
    monkeypatch.setattr(lungseg.evaluate, "_score", lambda *args: pytest.fail("scored"))
    with pytest.raises(LungsegError) as error:
        evaluate(cfg)
    assert str(error.value) == (
        f"Cannot write to {shared / 'eval'}: {shared} is not writable for this user (no "
        f"permission, or a read-only disk). Nothing was written. Give a folder you can write "
        f"to, on a disk with room, with output_dir=<folder>."
    )


def test_eval_names_the_file_it_could_not_write(tmp_path, checkpoints):
    """An OSError on writing the results (here a folder where per_image.csv goes; also a
    permission the check before scoring cannot see, a full disk) names the file."""
    (tmp_path / "eval" / "per_image.csv").mkdir(parents=True)
    with pytest.raises(LungsegError) as error:
        evaluate(eval_cfg(tmp_path, checkpoints["palette"], "overwrite=true"))
    assert str(error.value) == (
        f"Could not write {tmp_path / 'eval' / 'per_image.csv'}: Is a directory. Give a folder "
        f"you can write to, on a disk with room, with output_dir=<folder>."
    )
    assert not (tmp_path / "eval" / "summary.json").exists()


def test_eval_on_the_runs_own_folders_refuses_what_it_learnt_from(tmp_path, checkpoints, caplog):
    """Was: data folders named were scored whole, the run's training images included, and
    split= was dropped without a word."""
    ckpt = checkpoints["palette"]
    run = ckpt.parent.parent
    with (run / "split.csv").open() as f:
        split = {r["file"]: r["split"] for r in csv.DictReader(f)}
    demo = Path(OmegaConf.load(run / "config.yaml").data.demo_dir)
    # the run's data moved elsewhere
    moved = tmp_path / "moved"
    for name in ("images", "masks"):
        shutil.copytree(demo / name, moved / name)
    folders = [f"data.image_dir={moved / 'images'}", f"data.mask_dir={moved / 'masks'}"]
    trained = sum(v in ("train", "val") for v in split.values())
    tested = sum(v == "test" for v in split.values())
    with pytest.raises(
        LungsegError,
        match=rf"{trained} of the {len(split)} pairs of .*moved/images are named as pairs of "
        rf"the train or val split of .*split.csv\); the same images as the run's\. .* Add "
        rf"split=test to score the run's test split in these folders \({tested} pairs\), or "
        rf"split=all",
    ):
        evaluate(eval_cfg(tmp_path / "seen", ckpt, *folders))
    assert not (tmp_path / "seen").exists()
    # the same images saved again in another format: still the run's
    again = tmp_path / "again"
    shutil.copytree(moved, again)
    for image in (again / "images").iterdir():
        cv2.imwrite(str(image.with_suffix(".tif")), cv2.imread(str(image), cv2.IMREAD_UNCHANGED))
        image.unlink()
    resaved = [f"data.image_dir={again / 'images'}", f"data.mask_dir={again / 'masks'}"]
    with pytest.raises(LungsegError, match=f"{trained} of the .*; the same images as the run's"):
        evaluate(eval_cfg(tmp_path / "again", ckpt, *resaved))
    # ... and as RGB JPEGs at twice the size (were scored as new data: other shape and type)
    for image in (again / "images").iterdir():
        pixels = cv2.imread(str(image), cv2.IMREAD_GRAYSCALE)
        pixels = cv2.resize(pixels, None, fx=2, fy=2, interpolation=cv2.INTER_LINEAR)
        cv2.imwrite(str(image.with_suffix(".jpg")), cv2.cvtColor(pixels, cv2.COLOR_GRAY2BGR))
        image.unlink()
    for mask in (again / "masks").iterdir():  # their masks at that size too
        pixels = cv2.imread(str(mask), cv2.IMREAD_UNCHANGED)
        cv2.imwrite(
            str(mask), cv2.resize(pixels, None, fx=2, fy=2, interpolation=cv2.INTER_NEAREST)
        )
    with pytest.raises(LungsegError, match=f"{trained} of the .*; the same images as the run's"):
        evaluate(eval_cfg(tmp_path / "again2", ckpt, *resaved))
    # ... and as 16-bit PNGs at half size by nearest neighbour, the masks so too (were scored
    # as new data: 24-px copies of the 48-px images differed by up to 5.7 %, the limit 3 %)
    half = tmp_path / "half"
    shutil.copytree(moved, half)
    for path in [*(half / "images").iterdir(), *(half / "masks").iterdir()]:
        pixels = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
        pixels = cv2.resize(pixels, None, fx=0.5, fy=0.5, interpolation=cv2.INTER_NEAREST)
        cv2.imwrite(
            str(path), pixels.astype(np.uint16) * 257 if path.parent.name == "images" else pixels
        )
    halved = [f"data.image_dir={half / 'images'}", f"data.mask_dir={half / 'masks'}"]
    with pytest.raises(LungsegError, match=f"{trained} of the .*; the same images as the run's"):
        evaluate(eval_cfg(tmp_path / "half", ckpt, *halved))
    # other images under the same names (another site's case_001): new data, scored
    site = tmp_path / "site"
    shutil.copytree(moved, site)
    for image in (site / "images").iterdir():
        pixels = cv2.imread(str(image), cv2.IMREAD_UNCHANGED)
        cv2.imwrite(str(image), 255 - pixels)
    there = [f"data.image_dir={site / 'images'}", f"data.mask_dir={site / 'masks'}"]
    assert evaluate(eval_cfg(tmp_path / "site", ckpt, *there))["images"].startswith("all pairs")
    # the run's training images renamed (found by a tester: scored as new data)
    renamed = tmp_path / "renamed"
    for name in ("images", "masks"):
        (renamed / name).mkdir(parents=True)
        for path in (moved / name).iterdir():
            if split[path.stem] == "train":
                shutil.copy(path, renamed / name / f"new_{path.name}")
    copies = [f"data.image_dir={renamed / 'images'}", f"data.mask_dir={renamed / 'masks'}"]
    trained_only = sum(v == "train" for v in split.values())
    with pytest.raises(
        LungsegError,
        match=rf"^{trained_only} images of .*renamed/images are byte for byte the run's train "
        r"or val images under other names \(e.g. new_demo_\d+ is demo_\d+ of ",
    ):
        evaluate(eval_cfg(tmp_path / "renamed_eval", ckpt, *copies))
    assert evaluate(eval_cfg(tmp_path / "renamed_all", ckpt, *copies, "split=all"))
    # the same names where the run's own files cannot be compared: refused by name
    config = OmegaConf.load(run / "config.yaml")
    try:
        OmegaConf.save(
            OmegaConf.merge(config, {"data": {"demo_dir": str(tmp_path / "gone")}}),
            run / "config.yaml",
        )
        with pytest.raises(
            LungsegError, match=r"they could not be compared with the run's images \(the run's"
        ):
            evaluate(eval_cfg(tmp_path / "site2", ckpt, *there))
    finally:
        OmegaConf.save(config, run / "config.yaml")
    for which in ("test", "val"):
        summary = evaluate(eval_cfg(tmp_path / which, ckpt, *folders, f"split={which}"))
        rows, _ = read_outputs(tmp_path / which / "eval")
        assert [row["image"] for row in rows] == sorted(k for k, v in split.items() if v == which)
        assert summary["images"].startswith(f"{which} split of") and str(moved) in summary["images"]
    # a folder with part of the split: scored, but named as part (was: "test split of")
    part = tmp_path / "part"
    shutil.copytree(moved, part)
    dropped = sorted(k for k, v in split.items() if v == "test")[0]
    for name in ("images", "masks"):
        next((part / name).glob(f"{dropped}.*")).unlink()
    partial = [f"data.image_dir={part / 'images'}", f"data.mask_dir={part / 'masks'}"]
    with caplog.at_level(logging.WARNING, logger="lungseg"):
        summary = evaluate(eval_cfg(tmp_path / "partial", ckpt, *partial, "split=test"))
    assert summary["images"].startswith(f"{tested - 1} of the {tested} pairs of the test split")
    assert f"holds {tested - 1} of the {tested} pairs of the run's test split" in caplog.text
    evaluate(eval_cfg(tmp_path / "all", ckpt, *folders, "split=all"))
    rows, _ = read_outputs(tmp_path / "all" / "eval")
    assert sorted(row["image"] for row in rows) == sorted(split)
    with pytest.raises(LungsegError, match="split is 'train'; give split=test or split=val .*all"):
        evaluate(eval_cfg(tmp_path / "train", ckpt, *folders, "split=train"))
    with pytest.raises(
        LungsegError, match=r"split is 'all'; give split=test or split=val \(the run's splits\)\.$"
    ):
        evaluate(eval_cfg(tmp_path / "train", ckpt, "split=all"))
    # other data: nothing to refuse
    image_dir, mask_dir = write_pairs(tmp_path / "other", [(48, 48)] * 3, "palette")
    other = [f"data.image_dir={image_dir}", f"data.mask_dir={mask_dir}"]
    assert evaluate(eval_cfg(tmp_path / "other", ckpt, *other))["images"].startswith("all pairs")
    for mask in Path(mask_dir).iterdir():  # one suffix, given as a string
        mask.rename(mask.with_name(f"{mask.stem}_seg{mask.suffix}"))
    seg = [*other, "data.mask_suffixes=_seg"]
    assert evaluate(eval_cfg(tmp_path / "seg", ckpt, *seg))["classes"]["lung"]["n_images"] == 3
    with pytest.raises(LungsegError, match="None of the 3 pairs of .* is in the test split of"):
        evaluate(eval_cfg(tmp_path / "none", ckpt, *seg, "split=test"))


def test_eval_finds_a_runs_relative_data_paths_from_where_it_started(
    tmp_path, checkpoints, monkeypatch
):
    """Was: "The image folder data/images does not exist" from any other folder than the one
    train.py ran in, and the error's advice (data.image_dir=...) scored the training images."""
    source = checkpoints["binary"].parent.parent
    run = tmp_path / "run"
    shutil.copytree(source, run)
    config = OmegaConf.load(run / "config.yaml")
    started = Path(config.data.image_dir).parent.parent  # <root>/data/images -> <root>
    config.data.image_dir, config.data.mask_dir = "data/images", "data/masks"
    OmegaConf.save(config, run / "config.yaml")
    ckpt = run / "checkpoints" / checkpoints["binary"].name
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    with pytest.raises(
        LungsegError,
        match=r"data/images.* \(The data of .*run, from its config.yaml; if it has moved, give "
        r"data.image_dir=<images> data.mask_dir=<masks> split=test to score the run's test",
    ):
        evaluate(eval_cfg(tmp_path / "unknown", ckpt))
    (run / ".hydra").mkdir(exist_ok=True)  # what Hydra records of a train.py run
    OmegaConf.save({"hydra": {"runtime": {"cwd": str(started)}}}, run / ".hydra" / "hydra.yaml")
    evaluate(eval_cfg(tmp_path / "found", ckpt))
    rows, summary = read_outputs(tmp_path / "found" / "eval")
    with (run / "split.csv").open() as f:
        test = sorted(r["file"] for r in csv.DictReader(f) if r["split"] == "test")
    assert [row["image"] for row in rows] == test
    assert summary["images"] == f"test split of {run} ({started / 'data' / 'images'})"


def test_eval_errors(tmp_path, checkpoints):
    ckpt = checkpoints["palette"]
    loose = tmp_path / "loose" / "model.ckpt"  # not inside a run folder
    loose.parent.mkdir()
    shutil.copy(ckpt, loose)
    with pytest.raises(LungsegError, match="not inside a training run folder"):
        evaluate(eval_cfg(tmp_path, loose))
    image_dir, mask_dir = write_pairs(tmp_path / "data", [(40, 40), (30, 30)])
    with pytest.raises(LungsegError, match="Only one of data.image_dir and data.mask_dir"):
        evaluate(eval_cfg(tmp_path, ckpt, f"data.image_dir={image_dir}"))
    with pytest.raises(LungsegError, match="colours that are not in data.palette"):
        # index masks read with the checkpoint's palette encoding: a clear error, not garbage
        evaluate(
            eval_cfg(tmp_path, ckpt, f"data.image_dir={image_dir}", f"data.mask_dir={mask_dir}")
        )
    torch.save({}, tmp_path / "bad.ckpt")
    with pytest.raises(LungsegError, match="not a lungseg checkpoint"):
        evaluate(eval_cfg(tmp_path, tmp_path / "bad.ckpt"))
    assert not (tmp_path / "eval" / "per_image.csv").exists()


def test_eval_of_an_ensemble_scores_its_mean_softmax_and_refuses_a_leak(tmp_path, checkpoints):
    """ckpt_path=[a,b] scores the ensemble on the first member's test split (summary names
    both); a member whose run trained on one of those images is refused before scoring."""
    from test_inference import save_variant

    ckpt = checkpoints["palette"]
    run = ckpt.parent.parent
    forced = save_variant(ckpt, run / "checkpoints" / "forced.ckpt", force_class=1)
    try:
        summary = evaluate(eval_cfg(tmp_path, f"[{ckpt},{forced}]"))
        rows, _ = read_outputs(tmp_path / "eval")
        assert summary["checkpoint"] == [str(ckpt), str(forced)]
        models = [load_checkpoint(path, CPU) for path in (ckpt, forced)]
        demo = Path(OmegaConf.load(run / "config.yaml").data.demo_dir)
        for row in rows:
            raw = read_image(demo / "images" / f"{row['image']}.png")
            probs = [predict_probabilities(m, [raw])[0] for m in models]
            pred = ((probs[0] + probs[1]) / 2).argmax(0)
            assert int(row["pred_pixels_lung"]) == int((pred == 1).sum())
        assert any(row["pred_pixels_lung"] != "0" for row in rows)

        other = tmp_path / "other_run"
        shutil.copytree(run, other, ignore=shutil.ignore_patterns("*.ckpt"))
        with (run / "split.csv").open() as f:
            split = list(csv.reader(f))
        test = next(row[0] for row in split if row[1] == "test")
        with (other / "split.csv").open("w", newline="") as f:
            csv.writer(f).writerows([[n, "train" if n == test else s] for n, s in split])
        member = shutil.copy(ckpt, other / "checkpoints" / "member.ckpt")
        leak = rf"{re.escape(str(member))}'s run put 1 of the .*train or val split \(e.g. "
        leak += rf"{test}: train"
        with pytest.raises(LungsegError, match=leak):
            evaluate(eval_cfg(tmp_path, f"[{ckpt},{member}]", "output_dir=" + str(tmp_path / "x")))
        assert not (tmp_path / "x").exists()
        # scoring val: a member that tested on one of the images never saw it
        val = [name for name, s in split[1:] if s == "val"]
        with (other / "split.csv").open("w", newline="") as f:
            csv.writer(f).writerows([[n, "test" if n in val else s] for n, s in split])
        evaluate(eval_cfg(tmp_path, f"[{ckpt},{member}]", "split=val", f"output_dir={tmp_path}/v"))
        assert read_outputs(tmp_path / "v")[1]["images"].startswith("val split of") and val
    finally:
        forced.unlink()


def test_train_scores_its_test_split_with_eval_yaml_settings():
    """evaluate.test_config (train.py's test_post/*) holds exactly conf/eval.yaml's keys, so
    a key added there cannot be missing when train.py evaluates."""
    from lungseg.evaluate import test_config

    def keys(tree, prefix=""):
        return {
            k
            for key, value in tree.items()
            for k in (
                {prefix + key}
                | (keys(value, prefix + key + ".") if isinstance(value, dict) else set())
            )
        }

    expected = OmegaConf.to_container(OmegaConf.load(ROOT / "conf" / "eval.yaml"))
    expected.pop("hydra")
    built = OmegaConf.to_container(test_config("a.ckpt", "out"))
    assert keys(built) == keys(expected)
    assert built["tta"] is None and built["postprocess"]["min_size"] is None  # the checkpoint's


def test_renamed_copies_are_found_but_not_blank_images(tmp_path):
    """Blank slices that an exporter writes byte-identical are not copies of the run's
    (they were refused as 'byte for byte the run's train images'; found by review)."""
    from lungseg.data.folders import Pair
    from lungseg.evaluate import _check_no_renamed_copies

    run, trained, scored = tmp_path / "run", tmp_path / "trained", tmp_path / "scored"
    for folder in (run, trained, scored):
        folder.mkdir()
    (run / "split.csv").write_text("file,split\nblank,train\ncase1,train\ncase2,test\n")
    rng = np.random.default_rng(0)
    cv2.imwrite(str(trained / "blank.png"), np.zeros((16, 16), np.uint8))
    cv2.imwrite(str(trained / "case1.png"), rng.integers(0, 255, (16, 16), dtype=np.uint8))
    cv2.imwrite(str(scored / "other_blank.png"), np.zeros((16, 16), np.uint8))
    mask = scored / "mask.png"
    pairs = [Pair("other_blank", scored / "other_blank.png", mask)]
    _check_no_renamed_copies(trained, pairs, str(scored), run / "split.csv")  # blank: not a copy
    shutil.copy(trained / "case1.png", scored / "copy_case1.png")
    pairs.append(Pair("copy_case1", scored / "copy_case1.png", mask))
    with pytest.raises(LungsegError, match=r"^1 image of .* byte for byte .*copy_case1 is case1"):
        _check_no_renamed_copies(trained, pairs, str(scored), run / "split.csv")


def demo_images(folder, size, n=12):
    image_dir, _ = make_demo_dataset(folder, n, size)
    return [read_image(path) for path in sorted(image_dir.iterdir())]


def resized(image, factor, interpolation):
    return cv2.resize(image, None, fx=factor, fy=factor, interpolation=interpolation)


COPIES = {
    "16-bit": lambda a: a.astype(np.uint16) * 257,
    "half, nearest": lambda a: resized(a, 0.5, cv2.INTER_NEAREST),
    "half, centre pixel": lambda a: resized(a, 0.5, cv2.INTER_NEAREST_EXACT),
    "3/4, nearest": lambda a: resized(a, 0.75, cv2.INTER_NEAREST),
    "half, lanczos, 16-bit": lambda a: resized(a, 0.5, cv2.INTER_LANCZOS4).astype(np.uint16) * 257,
    "twice, cubic": lambda a: resized(a, 2, cv2.INTER_CUBIC),
    "half, RGB": lambda a: cv2.cvtColor(resized(a, 0.5, cv2.INTER_AREA), cv2.COLOR_GRAY2RGB),
}


@pytest.mark.parametrize("copy", COPIES.values(), ids=COPIES.keys())
def test_the_runs_images_saved_again_are_the_same_picture(tmp_path, copy):
    """eval.py's leak check by name: the run's 64-px images resized (nearest neighbour keeps
    one pixel of each block, noise included: 4.5 % apart, the limit 3 %, so scored as new
    data), converted to 16-bit or to RGB are the run's images."""
    for image in demo_images(tmp_path, 64):
        assert _same_picture(image, copy(image)) and _same_picture(copy(image), image)


def test_blank_images_are_not_the_same_picture():
    """Blank images (black end slices under the same names) show nothing to recognise (was:
    every two blank images one picture, an all-black one and an all-white one too)."""
    black, white = np.zeros((64, 64), np.uint8), np.full((32, 32), 255, np.uint8)
    assert not _same_picture(black, black) and not _same_picture(black, white)


def test_other_images_of_a_set_are_not_the_same_picture(tmp_path):
    """Other slices of one synthetic set (the closest pairs of any set measured: 4.6 % apart
    before, at 256 px) are other pictures, at any size; so is an inverted copy."""
    for size in (64, 256):
        images = demo_images(tmp_path / str(size), size)
        for i, a in enumerate(images):
            assert not _same_picture(a, 255 - a)
            for b in images[i + 1 :]:
                half = resized(b, 0.5, cv2.INTER_NEAREST)
                assert not _same_picture(a, b) and not _same_picture(a, half)


def test_eval_takes_an_ignore_label_of_its_own(tmp_path, checkpoints):
    """Masks with an unlabelled border (255 beside 0/128 binary masks) scored by a model trained
    without an ignore label: data.ignore_index=255 leaves the border out (was: no such
    setting, and the border counted as foreground, found by a new-user tester)."""
    image_dir, mask_dir = write_pairs(tmp_path / "data", [(40, 48)] * 3, "binary", rgb=True)
    bordered = {}
    for path in sorted(mask_dir.iterdir()):
        mask = np.where(cv2.imread(str(path), cv2.IMREAD_GRAYSCALE) > 0, 128, 0).astype(np.uint8)
        mask[:4] = 255  # the unlabelled border
        cv2.imwrite(str(path), mask)
        bordered[path.stem] = mask
    data = [f"data.image_dir={image_dir}", f"data.mask_dir={mask_dir}", "split=all"]
    evaluate(eval_cfg(tmp_path, checkpoints["binary"], *data, "data.ignore_index=255"))
    rows, _ = read_outputs(tmp_path / "eval")
    for row in rows:
        kept = bordered[Path(row["image"]).stem] != 255
        target = (bordered[Path(row["image"]).stem] == 128) & kept
        assert int(row["target_pixels_foreground"]) == target.sum()
