"""2.5-D input (data.context_slices): neighbours by name, training and prediction agree."""

import logging

import cv2
import numpy as np
import pytest
import torch
from conftest import ROOT, split_items
from hydra import compose, initialize_config_dir

from lungseg.data.context import neighbour_paths, neighbours, slice_keys
from lungseg.errors import LungsegError
from lungseg.evaluate import evaluate
from lungseg.inference import _network_input, load_checkpoint, neighbour_table, read_inputs
from lungseg.predict import predict
from lungseg.train import train

STEMS = ["p1_slice-0", "p1_slice-1", "p1_slice-2", "p2_slice-5", "p2_slice-7", "p1_slice-3"]


def test_slice_keys_default_pattern_takes_the_last_number():
    assert slice_keys(["LIDC-IDRI-0001_nodule-0_slice-12", "ID_0001_Z_0142"], None) == [
        ("LIDC-IDRI-0001_nodule-0_slice-", 12),
        ("ID_0001_Z_", 142),
    ]
    pattern = r"^(?P<volume>[^_]+)_z(?P<slice>\d+)_ct$"
    assert slice_keys(["a_z3_ct"], pattern) == [("a", 3)]


def test_neighbours_pad_with_the_nearest_slice_of_the_same_volume():
    rows = neighbours(STEMS, 1, None)
    named = [[STEMS[j] for j in row] for row in rows]
    assert named[0] == ["p1_slice-0", "p1_slice-0", "p1_slice-1"]  # stack start
    assert named[1] == ["p1_slice-0", "p1_slice-1", "p1_slice-2"]
    assert named[5] == ["p1_slice-2", "p1_slice-3", "p1_slice-3"]  # out of order on disk
    assert named[3] == ["p2_slice-5"] * 3  # gap at 6: never another volume's slice
    two = [STEMS[j] for j in neighbours(STEMS, 2, None)[1]]
    assert two == ["p1_slice-0", "p1_slice-0", "p1_slice-1", "p1_slice-2", "p1_slice-3"]


@pytest.mark.parametrize(
    ("stems", "pattern", "message"),
    [
        (["scan_a", "scan_1"], None, r"'scan_a' does not match data\.slice_pattern"),
        (["a_01", "a_1"], None, r"'a_01' and 'a_1' are both slice 1"),
        (["a_1"], r"^(.*)_(\d+)$", r"needs the named groups"),
        (["a_1"], r"^(?P<volume>.*", r"is not a regular expression"),
    ],
)
def test_bad_names_and_patterns_are_explained(stems, pattern, message):
    with pytest.raises(LungsegError, match=message):
        neighbours(stems, 1, pattern)


def test_neighbour_paths_skip_unmatched_files_of_the_pool(tmp_path):
    paths = [tmp_path / "v_2.png"]
    pool = [tmp_path / n for n in ("v_1.png", "v_2_mask.png", "notes.png", "v_3.png")]
    assert neighbour_paths(paths, pool, 1, None) == [
        [tmp_path / "v_1.png", tmp_path / "v_2.png", tmp_path / "v_3.png"]
    ]


def write_stacks(root, volumes=3, depth=4, size=24):
    """root/images/vol{v}_slice-{k}.png (gray level 20 + 10 k + 60 v, plus noise) and 0/255
    masks with a disc on the middle slices."""
    rng = np.random.default_rng(0)
    image_dir, mask_dir = root / "images", root / "masks"
    image_dir.mkdir(parents=True)
    mask_dir.mkdir(parents=True)
    for v in range(volumes):
        for k in range(depth):
            mask = np.zeros((size, size), np.uint8)
            if 0 < k < depth - 1:
                cv2.circle(mask, (size // 2, size // 2), size // 5, 255, -1)
            image = 20 + 10 * k + 60 * v + rng.integers(0, 8, (size, size))
            cv2.imwrite(str(image_dir / f"vol{v}_slice-{k}.png"), image.astype(np.uint8))
            cv2.imwrite(str(mask_dir / f"vol{v}_slice-{k}.png"), mask)
    return image_dir, mask_dir


def test_training_items_stack_the_neighbours_as_prediction_does(tmp_path):
    image_dir, mask_dir = write_stacks(tmp_path)
    dm, items = split_items(
        image_dir, mask_dir, mask_mode="binary", image_size=16, context_slices=1
    )
    info = dm.data_info()
    assert info["context_slices"] == 1 and len(info["mean"]) == 3
    pool = sorted(image_dir.iterdir())
    for item in items:
        path = image_dir / f"{item['name']}.png"
        (inputs,) = read_inputs([path], neighbour_table([path], info, pool))
        expected = torch.from_numpy(_network_input(inputs, info))
        assert item["image"].shape == (3, 16, 16)
        assert torch.equal(item["image"], expected)
    # the centre channel is the slice itself, the others its neighbours (level 10 per slice)
    raw = dm.test_dataset[0]["image"] * torch.tensor(info["std"]).view(3, 1, 1)
    raw += torch.tensor(info["mean"]).view(3, 1, 1)
    k = int(dm.test_dataset.names[0].rsplit("-", 1)[1])
    levels = raw.mean(dim=(1, 2)) * 255
    assert levels[2] - levels[1] == pytest.approx(10 if k < 3 else 0, abs=3)
    assert levels[1] - levels[0] == pytest.approx(10 if k > 0 else 0, abs=3)


def test_a_split_by_slice_of_named_volumes_warns_once(tmp_path, caplog):
    """vol0_slice-0 ... split by slice: one warning that names the pattern to split by and the
    neighbours' leak (there were two, the name check's and 2.5-D's); 2.5-D's own where the
    names give no id to suggest."""
    image_dir, mask_dir = write_stacks(tmp_path)
    with caplog.at_level(logging.WARNING, logger="lungseg"):
        split_items(image_dir, mask_dir, mask_mode="binary", image_size=16, context_slices=1)
    split = [r.getMessage() for r in caplog.records if "data.group_pattern" in r.getMessage()]
    assert len(split) == 1, split
    assert "share an id" in split[0] and "neighbours, stacked in as channels" in split[0]
    caplog.clear()  # one volume: no id that several volumes share by name to suggest
    image_dir2, mask_dir2 = write_stacks(tmp_path / "one", volumes=1)
    with caplog.at_level(logging.WARNING, logger="lungseg"):
        split_items(image_dir2, mask_dir2, mask_mode="binary", image_size=16, context_slices=1)
    split = [r.getMessage() for r in caplog.records if "data.group_pattern" in r.getMessage()]
    assert len(split) == 1 and split[0].startswith("data.context_slices without"), split


def test_a_context_model_trains_evaluates_and_predicts(tmp_path, make_cfg):
    image_dir, mask_dir = write_stacks(tmp_path / "data")
    cfg = make_cfg(
        f"data.image_dir={image_dir}",
        f"data.mask_dir={mask_dir}",
        "data.mask_mode=binary",
        "data.context_slices=1",
        "data.image_size=16",
        "data.group_pattern='^(vol\\d+)_'",
        "data.split=[0.34,0.33,0.33]",
        "test_after_fit=false",
    )
    assert cfg.model.in_channels == 3
    ckpt = train(cfg)["best_checkpoint"]
    model = load_checkpoint(ckpt, torch.device("cpu"))
    assert model.net(torch.zeros(1, 3, 16, 16)).shape == (1, 2, 16, 16)
    with initialize_config_dir(str(ROOT / "conf"), version_base="1.3"):
        eval_cfg = compose(
            "eval", [f"ckpt_path={ckpt}", f"output_dir={tmp_path / 'eval'}", "progress_bar=false"]
        )
        predict_cfg = compose(
            "predict",
            [
                f"ckpt_path={ckpt}",
                f"input_dir={image_dir}",
                f"output_dir={tmp_path / 'pred'}",
                "progress_bar=false",
            ],
        )
    summary = evaluate(eval_cfg)
    assert summary["classes"]["foreground"]["n_images"] == 4  # one volume of 4 slices
    written = predict(predict_cfg)
    assert len(written) == 2 * 12
    mask = cv2.imread(str(written[0]), cv2.IMREAD_UNCHANGED)
    assert mask.shape[:2] == (24, 24)
