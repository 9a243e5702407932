"""data.mask_dir as a list of folders, one class's binary masks each (Montgomery's leftMask and
rightMask, JSRT's organs): pairing, decoding, the DataModule, and train + eval on such data."""

import csv
import shutil
from pathlib import Path

import cv2
import numpy as np
import pytest
from test_evaluate import eval_cfg, read_outputs
from test_masks import palette_png

from lungseg.data.datamodule import SegDataModule
from lungseg.data.folders import Pair, find_pairs, layer_folders, mask_folders
from lungseg.data.masks import decode_layers
from lungseg.errors import LungsegError
from lungseg.evaluate import evaluate
from lungseg.train import train


def touch(folder: Path, *names: str) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for name in names:
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_bytes(b"")


def two_lungs(root: Path, n: int = 8, size: tuple[int, int] = (40, 48)):
    """root/images/cxr{i}.png with 0/255 masks of the left lung in root/left and of the right
    lung in root/right (the two overlap in a 2-px band), as the Montgomery set ships them."""
    rng = np.random.default_rng(0)
    h, w = size
    folders = [root / name for name in ("images", "left", "right")]
    for folder in folders:
        folder.mkdir(parents=True)
    for i in range(n):
        left, right = np.zeros((h, w), np.uint8), np.zeros((h, w), np.uint8)
        left[8:32, 6 : w // 2 + 1] = 255
        right[8:32, w // 2 - 1 : w - 6] = 255
        image = (40 + 120 * ((left | right) > 0) + rng.integers(0, 30, (h, w))).astype(np.uint8)
        cv2.imwrite(str(folders[0] / f"cxr{i}.png"), image)
        cv2.imwrite(str(folders[1] / f"cxr{i}.png"), left)
        cv2.imwrite(str(folders[2] / f"cxr{i}_mask.png"), right)
    return folders


def test_an_image_pairs_with_a_mask_in_every_folder(tmp_path):
    touch(tmp_path / "img", "a.png", "b.png", "c.png")
    touch(tmp_path / "left", "a.png", "b.png", "c.png")
    touch(tmp_path / "right", "a_mask.png", "c.png")
    folders = [tmp_path / "left", tmp_path / "right"]
    with pytest.raises(LungsegError) as err:
        find_pairs(tmp_path / "img", folders)
    assert f"1 image without a mask in {tmp_path / 'right'}" in str(err.value)
    assert "'b.png'" in str(err.value)

    skipped: list = []
    pairs = find_pairs(tmp_path / "img", folders, strict=False, skipped=skipped)
    assert pairs == [
        Pair(
            "a", tmp_path / "img/a.png", tmp_path / "left/a.png", (tmp_path / "right/a_mask.png",)
        ),
        Pair("c", tmp_path / "img/c.png", tmp_path / "left/c.png", (tmp_path / "right/c.png",)),
    ]
    assert pairs[0].masks == (tmp_path / "left/a.png", tmp_path / "right/a_mask.png")
    assert skipped == [(tmp_path / "img/b.png", f"image without a mask in {tmp_path / 'right'}")]
    # a list of one folder is that folder
    assert find_pairs(tmp_path / "img", [tmp_path / "left"]) == [
        Pair(s, tmp_path / f"img/{s}.png", tmp_path / f"left/{s}.png") for s in "abc"
    ]


def test_every_folder_s_gaps_are_reported_at_once(tmp_path):
    touch(tmp_path / "img", "a.png", "b.png", "c.png")
    touch(tmp_path / "left", "a.png", "c.png")
    touch(tmp_path / "right", "a.png", "x.png")
    folders = [tmp_path / "left", tmp_path / "right"]
    with pytest.raises(LungsegError) as err:
        find_pairs(tmp_path / "img", folders)
    message = str(err.value)
    assert f"1 image without a mask in {tmp_path / 'left'}" in message
    assert f"2 images without a mask in {tmp_path / 'right'}" in message
    assert f"1 mask without an image ({tmp_path / 'right'}): 'x.png'" in message
    skipped: list = []
    assert [
        p.stem for p in find_pairs(tmp_path / "img", folders, strict=False, skipped=skipped)
    ] == ["a"]
    assert sorted(skipped) == [  # one row an image, with every folder it lacks a mask in
        (tmp_path / "img/b.png", f"image without a mask in {folders[0]}, {folders[1]}"),
        (tmp_path / "img/c.png", f"image without a mask in {folders[1]}"),
        (tmp_path / "right/x.png", "mask without an image"),
    ]


def test_folders_inside_others_and_home_folders(tmp_path, monkeypatch):
    touch(tmp_path / "img", "p1/a.png")
    touch(tmp_path / "masks", "p1/a.png", "heart/p1/a.png")  # heart's folder inside the lungs'
    pairs = find_pairs(
        tmp_path / "img", [tmp_path / "masks", tmp_path / "masks/heart"], recursive=True
    )
    assert pairs == [
        Pair(
            "p1/a",
            tmp_path / "img/p1/a.png",
            tmp_path / "masks/p1/a.png",
            (tmp_path / "masks/heart/p1/a.png",),
        )
    ]
    # the folders eval.py checks against the model's classes, below patient folders too
    assert layer_folders(pairs[0]) == [tmp_path / "masks", tmp_path / "masks/heart"]
    monkeypatch.setenv("HOME", str(tmp_path))
    assert [p.stem for p in find_pairs("~/img", ["~/masks", "~/masks/heart"], recursive=True)] == [
        "p1/a"
    ]
    assert mask_folders(2024) == [Path("2024")]  # a folder named by a number, as YAML reads it
    with pytest.raises(LungsegError, match="data.mask_dir is a mapping"):
        mask_folders({"left": "a", "right": "b"})


def test_mask_folder_lists_that_cannot_work(tmp_path):
    touch(tmp_path / "img", "a.png", "a_mask.png")
    touch(tmp_path / "left", "a.png")
    with pytest.raises(LungsegError, match="each must be its own folder"):
        find_pairs(tmp_path / "img", [tmp_path / "left", tmp_path / "img"])
    with pytest.raises(LungsegError, match="each must be its own folder"):
        find_pairs(tmp_path / "img", [tmp_path / "left", tmp_path / "left"])
    with pytest.raises(LungsegError, match="data.mask_dir is an empty list"):
        find_pairs(tmp_path / "img", [])
    with pytest.raises(
        LungsegError, match=r"mask folder .*nowhere does not exist. Set data\.mask_dir\[1\]"
    ):
        SegDataModule(str(tmp_path / "img"), [str(tmp_path / "left"), str(tmp_path / "nowhere")])


def test_a_mask_folder_of_class_folders_is_told_to_be_a_list(tmp_path):
    """data.mask_dir=ManualMask (Montgomery's, holding leftMask and rightMask) met the missing
    palette first, then advice to search sub-folders, which pairs nothing."""
    images, left, right = two_lungs(tmp_path / "ManualMask")
    images.rename(tmp_path / "images")
    for mode in ("palette", "binary"):
        with pytest.raises(LungsegError, match="The mask folder .*ManualMask holds no image") as e:
            SegDataModule(str(tmp_path / "images"), str(left.parent), mask_mode=mode).setup("fit")
        assert f'"data.mask_dir=[{left},{right}]" with data.mask_mode=binary' in str(e.value)
    shutil.rmtree(right)
    with pytest.raises(
        LungsegError, match=rf"Its sub-folder left holds images: give data.mask_dir={left}\."
    ):
        SegDataModule(str(tmp_path / "images"), str(left.parent), mask_mode="binary").setup("fit")


def test_layers_are_united_or_numbered_in_folder_order():
    left = np.array([[0, 255, 255, 0]], np.uint8)
    right = np.array([[0, 0, 1, 1]], np.uint8)  # 0/1 masks mix with 0/255 ones
    paths = [Path("left/a.png"), Path("right/a.png")]
    assert decode_layers([left, right], paths, "binary").tolist() == [[0, 1, 1, 1]]
    assert decode_layers([left, right], paths, "index").tolist() == [[0, 1, 2, 2]]  # later wins
    assert decode_layers([right, left], paths[::-1], "index").tolist() == [[0, 2, 2, 1]]
    with pytest.raises(
        LungsegError, match="data.mask_mode is 'palette'. Set data.mask_mode=binary"
    ):
        decode_layers([left, right], paths, "palette")
    with pytest.raises(LungsegError, match="2 mask folders give 3 classes .* but 4 are expected"):
        decode_layers([left, right], paths, "index", num_classes=4)


def test_the_datamodule_reads_one_class_a_folder(tmp_path):
    images, left, right = two_lungs(tmp_path)
    dm = SegDataModule(
        str(images), [str(left), str(right)], mask_mode="index", image_size=24, split=[0.5, 0.5, 0]
    )
    dm.setup()
    assert dm.num_classes == 3 and dm.class_names == ["background", "left", "right"]
    mask = dm.train_dataset[0]["mask"].numpy()
    assert set(np.unique(mask)) == {0, 1, 2}
    assert (mask[:, :10] != 2).all() and (mask[:, -10:] != 1).all()  # left stays left

    dm = SegDataModule(str(images), [str(left), str(right)], mask_mode="binary", image_size=24)
    dm.setup()
    assert dm.num_classes == 2 and set(np.unique(dm.train_dataset[0]["mask"].numpy())) == {0, 1}

    # data.resize_masks with one folder's masks at half their images' size: the folders'
    # masks at two scales are each resized to the image (they met in a traceback)
    half = tmp_path / "half" / "left"
    shutil.copytree(left, half)
    for path in half.iterdir():
        cv2.imwrite(str(path), cv2.imread(str(path), cv2.IMREAD_UNCHANGED)[::2, ::2])
    dm = SegDataModule(
        str(images), [str(half), str(right)], mask_mode="index", image_size=24, resize_masks=True
    )
    dm.setup()
    assert set(np.unique(dm.train_dataset[0]["mask"].numpy())) == {0, 1, 2}

    # folders of one name are told apart by their parents
    for organ in ("lungs", "heart"):
        (tmp_path / organ).mkdir()
        shutil.copytree(left, tmp_path / organ / "masks")
    dm = SegDataModule(
        str(images),
        [str(tmp_path / "lungs/masks"), str(tmp_path / "heart/masks")],
        mask_mode="index",
        image_size=24,
    )
    dm.setup()
    assert dm.class_names == ["background", "lungs_masks", "heart_masks"]

    with pytest.raises(LungsegError, match=r"data.num_classes is 4 but data.mask_dir lists 2"):
        SegDataModule(str(images), [str(left), str(right)], mask_mode="index", num_classes=4)
    with pytest.raises(LungsegError, match="lists 2 folders, one class each, but data.mask_mode"):
        SegDataModule(str(images), [str(left), str(right)])  # palette, the default

    cv2.imwrite(str(right / "cxr3_mask.png"), np.zeros((20, 20), np.uint8))
    with pytest.raises(LungsegError, match=r"its mask \S*right/cxr3_mask\.png is 20x20"):
        SegDataModule(str(images), [str(left), str(right)], mask_mode="index").setup()


def test_the_datamodule_reads_palette_png_masks_by_their_indices(tmp_path):
    """Index masks saved as palette PNGs (colour type 3: Pascal VOC, label tools), one folder
    or one folder a class: read by their indices, not the colours cv2 gives them (were
    refused as colour images, and a folder list of 1-bit [white, black] masks, the lungs
    drawn black on white, read with the background as foreground)."""
    images, left, right = two_lungs(tmp_path)
    voc = tmp_path / "voc"
    voc.mkdir()
    for i in range(8):
        files = (left / f"cxr{i}.png", right / f"cxr{i}_mask.png")
        sides = [cv2.imread(str(f), cv2.IMREAD_GRAYSCALE) > 0 for f in files]
        classes = np.where(sides[1], 2, np.where(sides[0], 1, 0)).astype(np.uint8)
        palette_png(voc / f"cxr{i}.png", classes, [[0, 0, 0], [128, 0, 0], [0, 128, 0]])
        for file, side in zip(files, sides, strict=True):  # 1-bit, the lung black on white
            palette_png(file, side.astype(np.uint8), [[255, 255, 255], [0, 0, 0]], 1)
    runs = [(str(voc), "index"), ([str(left), str(right)], "index")]
    for mask_dir, mode in [*runs, ([str(left), str(right)], "binary")]:
        dm = SegDataModule(str(images), mask_dir, mask_mode=mode, image_size=24)
        dm.setup()
        assert dm.num_classes == (3 if mode == "index" else 2)
        for item in dm.train_dataset:
            mask = item["mask"].numpy()
            assert set(np.unique(mask)) == set(range(dm.num_classes)), (mask_dir, mode)
            assert (mask[:4] == 0).all() and (mask[:, :3] == 0).all()  # the background: 0
            assert mode == "binary" or (mask[:, :10] != 2).all()  # left stays left


def test_left_and_right_classes_with_a_horizontal_flip_are_warned_about(tmp_path, caplog):
    """Left and right lungs as two classes (a folder each): a left-right flip in training
    puts each lung where the other was, under its own label. Said once the classes are known;
    nothing said without the flip or with the folders united (mask_mode=binary)."""
    images, left, right = two_lungs(tmp_path)
    flip = {"train": [{"_target_": "albumentations.HorizontalFlip", "p": 0.5}]}
    nested = {"train": [{"_target_": "albumentations.OneOf", "transforms": flip["train"]}]}
    device = {"device": {"hflip": 0.5}}
    cases = [
        ("index", flip, True),
        ("index", nested, True),
        ("index", device, True),
        ("index", None, False),
        ("index", {"device": {"hflip": 0.0, "vflip": 0.5}}, False),
        ("binary", flip, False),
    ]
    for mask_mode, augmentation, warned in cases:
        caplog.clear()
        dm = SegDataModule(
            str(images),
            [str(left), str(right)],
            mask_mode=mask_mode,
            image_size=24,
            augmentation=augmentation,
        )
        with caplog.at_level("WARNING", logger="lungseg.data.datamodule"):
            dm.setup()
        said = "The classes ['left', 'right'] name a side of the body" in caplog.text
        assert said == warned, (mask_mode, augmentation)


def index_pairs(root: Path, n: int, swapped: int = 0, size: tuple[int, int] = (32, 40)):
    """root/images and root/masks: n index masks with class 1 on the image's left half and
    class 2 on its right half (the two sides exchanged in the last ``swapped``), and class 3,
    a small disc that wanders across the middle, in every mask."""
    rng = np.random.default_rng(1)
    h, w = size
    images, masks = root / "images", root / "masks"
    images.mkdir(parents=True)
    masks.mkdir(parents=True)
    for i in range(n):
        mask = np.zeros((h, w), np.uint8)
        top = int(rng.integers(4, 10))
        first, second = (2, 1) if i >= n - swapped else (1, 2)
        mask[top : top + 16, 3 : w // 2 - 2] = first
        mask[top : top + 16, w // 2 + 2 : w - 3] = second
        cv2.circle(mask, (int(rng.integers(w // 4, 3 * w // 4)), h - 6), 3, 3, -1)
        image = (40 + 50 * mask + rng.integers(0, 30, (h, w))).astype(np.uint8)
        cv2.imwrite(str(images / f"s{i:02d}.png"), image)
        cv2.imwrite(str(masks / f"s{i:02d}.png"), mask)
    return images, masks


def test_classes_on_opposite_sides_are_warned_about_whatever_their_names(tmp_path, caplog):
    """Index masks whose classes 1 and 2 sit on the left and on the right half of every image
    (names that say nothing of sides): a left-right flip in training is warned about, naming
    the two classes and not the one that wanders across the middle. Not when a tenth or more
    of the masks have the sides the other way round, nor without the flip."""
    flip = {"train": [{"_target_": "albumentations.HorizontalFlip", "p": 0.5}]}
    names = ["background", "organ_a", "organ_b", "spot"]
    cases = [("sided", 0, flip, True), ("mixed", 3, flip, False), ("no_flip", 0, None, False)]
    for folder, swapped, augmentation, warned in cases:
        images, masks = index_pairs(tmp_path / folder, n=20, swapped=swapped)
        caplog.clear()
        dm = SegDataModule(
            str(images),
            str(masks),
            mask_mode="index",
            class_names=names,
            image_size=[32, 40],
            split=[1.0, 0.0, 0.0],  # every mask in training: the shares below are exact
            augmentation=augmentation,
        )
        with caplog.at_level("WARNING", logger="lungseg.data.datamodule"):
            dm.setup()
        said = "sit on one side of the image in nearly every training mask" in caplog.text
        assert said == warned, folder
        if warned:
            assert "organ_a: left half in 100% of 20 masks" in caplog.text
            assert "organ_b: right half in 100% of 20 masks" in caplog.text
            assert "spot" not in caplog.text and "augmentation=none" in caplog.text


def test_train_and_eval_on_masks_in_two_folders(tmp_path, make_cfg, caplog):
    images, left, right = two_lungs(tmp_path / "data", n=12)
    overrides = [
        f"data.image_dir={images}",
        f"data.mask_dir=[{left},{right}]",  # as typed on the command line
        "data.mask_mode=index",
        "data.image_size=24",
    ]
    cfg = make_cfg(*overrides)
    result = train(cfg)
    ckpt = result["best_checkpoint"]
    with (Path(cfg.output_dir) / "split.csv").open() as f:
        test = sorted(row["file"] for row in csv.DictReader(f) if row["split"] == "test")

    # the run's test split, read with the run's two mask folders
    evaluate(eval_cfg(tmp_path, ckpt))
    rows, summary = read_outputs(tmp_path / "eval")
    assert [row["image"] for row in rows] == test
    assert set(summary["classes"]) == {"left", "right"}
    # a horizontal test-time flip would average each lung with the other's label
    sided = "The test-time flips include horizontal, but the classes ['left', 'right']"
    assert sided not in caplog.text
    for flip, warned in (("horizontal", True), ("vertical", False)):
        caplog.clear()
        with caplog.at_level("WARNING", logger="lungseg.postprocess"):
            evaluate(eval_cfg(tmp_path / flip, ckpt, "tta=true", f"tta_flips=[{flip}]"))
        assert (sided in caplog.text) == warned
    # other data in the same layout; where the two overlap the later folder's class wins
    evaluate(
        eval_cfg(
            tmp_path / "all",
            ckpt,
            f"data.image_dir={images}",
            f"data.mask_dir=[{left},{right}]",
            "split=all",  # the run's own data: all of it, its training images included
        )
    )
    rows, _ = read_outputs(tmp_path / "all" / "eval")
    row = next(r for r in rows if r["image"] == "cxr0")

    # folders that do not give the model's classes, in its order, are refused before scoring
    shutil.copytree(left, tmp_path / "data" / "heart")
    for folders, problem in (
        (f"[{left},{right},{tmp_path / 'data' / 'heart'}]", "lists 3 folders"),
        (f"[{right},{left}]", "lists 2 folders \\(right, left\\)"),
    ):
        with pytest.raises(LungsegError, match=f"{problem}.*predicts the classes left, right"):
            evaluate(
                eval_cfg(
                    tmp_path / "bad",
                    ckpt,
                    f"data.image_dir={images}",
                    f"data.mask_dir={folders}",
                    "split=all",
                )
            )
    # and so is continuing the run with its folders reordered (the classes would swap)
    swapped = [o.replace(f"[{left},{right}]", f"[{right},{left}]") for o in overrides]
    with pytest.raises(LungsegError, match="was trained on the classes background, left, right"):
        train(make_cfg(*swapped, "trainer.max_epochs=2", "resume=true"))
    in_left = cv2.imread(str(left / "cxr0.png"), cv2.IMREAD_GRAYSCALE) > 0
    in_right = cv2.imread(str(right / "cxr0_mask.png"), cv2.IMREAD_GRAYSCALE) > 0
    assert (in_left & in_right).sum() == 48
    assert int(row["target_pixels_right"]) == in_right.sum()
    assert int(row["target_pixels_left"]) == (in_left & ~in_right).sum()


def test_fine_tuning_without_the_data_folders_says_so(tmp_path, make_cfg):
    """A fine-tuning command without data.image_dir reads the bundled demo data, whose three
    classes do not fit a two-class network: the error named only weights that differ."""
    images, left, right = two_lungs(tmp_path / "data", n=10)
    data = [f"data.image_dir={images}", f"data.mask_dir=[{left},{right}]"]
    cfg = make_cfg(*data, "data.mask_mode=binary", "data.image_size=24", "test_after_fit=false")
    train(cfg)
    last = Path(cfg.output_dir) / "checkpoints" / "last.ckpt"
    with pytest.raises(LungsegError) as error:
        train(make_cfg(f"ckpt_path={last}", f"output_dir={tmp_path / 'tuned'}"))
    assert (
        "It predicts the classes background, foreground; this run's data has background, lung, "
        "tumour (the bundled demo data: data.image_dir is not set)."
    ) in str(error.value)
