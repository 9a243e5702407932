import csv
import logging
import re
import shlex
import shutil
from pathlib import Path
from types import SimpleNamespace

import cv2
import numpy as np
import pytest
import torch
from conftest import oriented

from lungseg.data import splits
from lungseg.data.datamodule import CachedSegDataset, SegDataModule
from lungseg.data.transforms import build_augmentation, median_blur, resize_image
from lungseg.errors import LungsegError
from lungseg.train import train

H, W = 40, 48
PALETTE = {"background": [0, 0, 0], "lung": [0, 255, 0], "tumour": [255, 0, 0]}


def label_map(i, h=H, w=W):
    """(h, w) uint8 class ids 0..2, different per image and left/right asymmetric."""
    mask = np.zeros((h, w), np.uint8)
    mask[4 : h // 2, 3 + i % 5 : w // 2] = 1
    mask[h // 2 + 2 : h - 4, w // 2 + i % 3 : w - 6] = 2
    return mask


def gray_image(mask, i):
    """uint8 image whose intensity follows the mask, plus a left-to-right ramp and noise."""
    rng = np.random.default_rng(i)
    ramp = np.linspace(0, 40, mask.shape[1])[None, :]
    noise = rng.integers(0, 20, mask.shape)
    return (30 + 80 * mask + ramp + noise).astype(np.uint8)


def write_data(root, n=10, mode="index", sizes=None, rgb=False, dtype=np.uint8):
    """root/images/case{i}.png and root/masks/case{i}.png; returns (image_dir, mask_dir, masks)."""
    image_dir, mask_dir = root / "images", root / "masks"
    image_dir.mkdir(parents=True)
    mask_dir.mkdir(parents=True)
    masks = {}
    for i in range(n):
        h, w = sizes[i % len(sizes)] if sizes else (H, W)
        mask = label_map(i, h, w)
        if mode == "binary":
            mask = (mask > 0).astype(np.uint8)
        image = gray_image(mask, i)
        if dtype == np.uint16:
            image = image.astype(np.uint16) * 257
        if rgb:  # three different channels, stored BGR by cv2
            image = np.stack([image, image // 2, 255 - image], axis=-1)
        stored = {
            "index": mask,
            "binary": mask * 255,
            "palette": np.array(list(PALETTE.values()), np.uint8)[mask][:, :, ::-1],
        }[mode]
        cv2.imwrite(str(image_dir / f"case{i:02d}.png"), image)
        cv2.imwrite(str(mask_dir / f"case{i:02d}.png"), stored)
        masks[f"case{i:02d}"] = mask
    return image_dir, mask_dir, masks


def make_dm(image_dir, mask_dir, **kwargs):
    kwargs = {"mask_mode": "index", "image_size": [H, W], "batch_size": 4, **kwargs}
    dm = SegDataModule(str(image_dir), str(mask_dir), **kwargs)
    dm.prepare_data()
    dm.setup("fit")
    return dm


def fake_trainer(world_size: int, global_rank: int, device: str = "cpu") -> SimpleNamespace:
    """What the DataModule's loaders read of a Trainer."""
    strategy = SimpleNamespace(root_device=torch.device(device))
    return SimpleNamespace(world_size=world_size, global_rank=global_rank, strategy=strategy)


def all_items(dataset):
    return [dataset[i] for i in range(len(dataset))]


@pytest.mark.parametrize(
    ("mode", "extra", "num_classes", "names"),
    [
        ("index", {}, 3, ["background", "class_1", "class_2"]),
        ("binary", {}, 2, ["background", "foreground"]),
        ("palette", {"palette": PALETTE}, 3, ["background", "lung", "tumour"]),
    ],
)
def test_mask_modes(tmp_path, mode, extra, num_classes, names):
    image_dir, mask_dir, masks = write_data(tmp_path, mode=mode)
    dm = make_dm(image_dir, mask_dir, mask_mode=mode, **extra)
    assert dm.num_classes == num_classes
    assert dm.class_names == names
    assert dm.colors.shape == (num_classes, 3) and dm.colors.dtype == np.uint8
    for dataset in (dm.train_dataset, dm.val_dataset, dm.test_dataset):
        for item in all_items(dataset):
            assert torch.equal(item["mask"].long(), torch.from_numpy(masks[item["name"]]).long())
    if mode == "palette":
        assert dm.colors.tolist() == list(PALETTE.values())


def test_index_num_classes_given_and_class_names(tmp_path):
    image_dir, mask_dir, _ = write_data(tmp_path)
    dm = make_dm(image_dir, mask_dir, num_classes=5, class_names=list("abcde"))
    assert dm.num_classes == 5 and dm.class_names == list("abcde")  # classes 3, 4 absent: fine
    with pytest.raises(LungsegError, match="class ids 2"):
        make_dm(image_dir, mask_dir, num_classes=2)
    with pytest.raises(LungsegError, match="data.class_names"):
        make_dm(image_dir, mask_dir, class_names=["a", "b"])


@pytest.mark.parametrize(
    "mode, lead",
    [
        ("binary", "are grey with the values 0, 255: black/white masks. Use data.mask_mode=bin"),
        ("binary01", "are grey with the values 0, 1: black/white masks. Use data.mask_mode=bin"),
        ("index", "are grey with the values 0, 1, 2: class ids. Use data.mask_mode=index."),
        ("palette", "hold colours ([0, 0, 0], [0, 255, 0], [255, 0, 0]): list them as data"),
        ("grey128", "are grey with the values 128, 255."),  # binary would read all as one
    ],
)
def test_the_missing_palette_error_says_what_the_masks_hold(tmp_path, mode, lead):
    """data.mask_mode=palette, the default, without data.palette on the user's own masks: the
    error leads with what the first mask files hold and the mode that reads them (was: the
    modes listed, for a new-user tester's 0/1 masks)."""
    written = "index" if mode in ("binary01", "grey128") else mode
    image_dir, mask_dir, masks = write_data(tmp_path, mode=written)
    for name, mask in masks.items():
        if mode == "binary01":
            cv2.imwrite(str(mask_dir / f"{name}.png"), (mask > 0).astype(np.uint8))
        if mode == "grey128":
            cv2.imwrite(
                str(mask_dir / f"{name}.png"), np.where(mask > 0, 255, 128).astype(np.uint8)
            )
    with pytest.raises(LungsegError) as error:
        SegDataModule(str(image_dir), str(mask_dir))
    first, rest = str(error.value).split("\n", 1)
    assert first.startswith(f"The 8 mask files read in {mask_dir} (e.g. case00.png) ")
    assert lead in first
    assert rest.startswith("data.mask_mode=palette needs data.palette")
    assert "pairing" not in rest
    if mode == "binary":  # images without a mask: said at once, not on the next run
        for stem in ("case03", "case07"):
            (mask_dir / f"{stem}.png").unlink()
        with pytest.raises(LungsegError) as error:
            SegDataModule(str(image_dir), str(mask_dir))
        also = str(error.value).split("\n")[-1]
        assert also.startswith("The files' pairing stops the run too: Found 2 images without")


def test_config_errors(tmp_path):
    image_dir, mask_dir, _ = write_data(tmp_path, mode="palette")
    with pytest.raises(LungsegError, match="data.mask_dir is null"):
        SegDataModule(image_dir=str(image_dir))
    with pytest.raises(LungsegError, match="needs data.palette.* on the command line 'data.pa"):
        make_dm(image_dir, mask_dir, mask_mode="palette")
    # "data.palette='{...}'": Hydra reads the inner quotes as a string
    with pytest.raises(LungsegError, match=r"is the text '\{bg:\[0,0,0\]\}', not a mapping"):
        make_dm(image_dir, mask_dir, mask_mode="palette", palette="{bg:[0,0,0]}")
    with pytest.raises(LungsegError, match="data.num_classes is 4 but data.palette has 3"):
        make_dm(image_dir, mask_dir, mask_mode="palette", palette=PALETTE, num_classes=4)
    with pytest.raises(LungsegError, match="data.mask_mode is 'index', which ignores it"):
        make_dm(image_dir, mask_dir, palette=PALETTE)
    # class 0 is the background: a palette listing it later scored the wrong classes silently
    late = {name: PALETTE[name] for name in [*list(PALETTE)[1:], list(PALETTE)[0]]}
    assert list(late)[-1] == "background"
    with pytest.raises(LungsegError, match=r"data.palette lists 'background' as class 2 .* List"):
        make_dm(image_dir, mask_dir, mask_mode="palette", palette=late)
    with pytest.raises(LungsegError, match="class_names lists 'BG' as class 1.* is stored as 1"):
        make_dm(image_dir, mask_dir, class_names=["lung", "BG", "tumour"])
    with pytest.raises(LungsegError, match="data.image_size"):
        make_dm(image_dir, mask_dir, image_size=[32])
    with pytest.raises(LungsegError, match="data.normalize"):
        make_dm(image_dir, mask_dir, normalize="zscore")
    with pytest.raises(LungsegError, match=r"entry 0 \(albumentations.NoSuchFlip\)"):
        make_dm(
            image_dir, mask_dir, augmentation={"train": [{"_target_": "albumentations.NoSuchFlip"}]}
        )


def test_file_names_that_share_an_id_warn_until_the_split_is_by_it(tmp_path, caplog, make_cfg):
    """PAT003_view1, PAT003_view2 ... in one folder: the split took every file on its own and
    put most patients into two splits, without a word (a layout of sub-folders warned)."""
    image_dir, mask_dir, _ = write_data(tmp_path, n=12)
    for folder in (image_dir, mask_dir):
        for i, path in enumerate(sorted(folder.iterdir())):
            path.rename(folder / f"PAT{i // 3:03d}_view{i % 3}.png")
    with caplog.at_level(logging.WARNING, logger="lungseg"):
        make_dm(image_dir, mask_dir)
    warned = [r.getMessage() for r in caplog.records if "share an id" in r.getMessage()]
    assert len(warned) == 1 and warned[0].startswith("12 of the 12 files share an id at the")
    assert "(4 ids; e.g. 3 files start with 'PAT000': PAT000_view0, PAT000_view1)" in warned[0]
    # the override it suggests survives the shell and Hydra's parser, and splits by patient
    (typed,) = re.findall(r"on the command line (\".*?\")", warned[0])
    (override,) = shlex.split(typed)
    pattern = make_cfg(override).data.group_pattern
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="lungseg"):
        dm = make_dm(image_dir, mask_dir, group_pattern=pattern)
    assert not [r for r in caplog.records if "share an id" in r.getMessage()]
    splits_of = {}
    for name, part in dm.split.items():
        splits_of.setdefault(name[:6], set()).add(part)
    assert len(splits_of) == 4 and all(len(parts) == 1 for parts in splits_of.values())
    # the id where the pattern finds it: in the path below the folder (data.recursive, one
    # sub-folder), up to the second number where the first is a dataset's or a site's
    from lungseg.data.datamodule import _check_name_grouping

    for names, first, count in [
        ([f"site2023/PAT{p}_view{v}" for p in range(4) for v in range(3)], "site2023/PAT0", 4),
        ([f"BraTS20_Training_{p}_slice_{k}" for p in range(4) for k in range(3)], "BraTS20_T", 4),
        ([f"site{s}_case{c}_slice{k}" for s in (1, 2) for c in range(3) for k in (0, 1)], "s", 6),
    ]:
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="lungseg"):
            _check_name_grouping(names)
        (typed,) = re.findall(r"on the command line (\".*?\")", caplog.records[0].getMessage())
        ids = splits.patient_ids(names, make_cfg(*shlex.split(typed)).data.group_pattern)
        assert len(set(ids.values())) == count and min(ids.values()).startswith(first)
    # names whose ids are all distinct (case00, ID_0000_Z_0142, demo_0001) say nothing
    caplog.clear()
    for folder in (image_dir, mask_dir):
        for i, path in enumerate(sorted(folder.iterdir())):
            path.rename(folder / f"ID_{i:04d}_Z_{100 + i}.png")
    with caplog.at_level(logging.WARNING, logger="lungseg"):
        make_dm(image_dir, mask_dir)
    assert not [r for r in caplog.records if "share an id" in r.getMessage()]


def test_the_default_splits_by_the_id_file_names_share(tmp_path, caplog, make_cfg):
    """data.group_pattern=auto, the default: PAT003_view1, PAT003_view2 ... are split by
    patient, said in the log with the pattern found; null splits by file (with the warning
    above); a split file overrides it; names that share no id are split by file, silently
    (was: a split by file and a warning, found by a new-user tester whose recipe run put 27
    of 40 patients into two splits)."""
    from lungseg.train import build_datamodule

    image_dir, mask_dir, _ = write_data(tmp_path, n=24)
    for folder in (image_dir, mask_dir):
        for i, path in enumerate(sorted(folder.iterdir())):
            path.rename(folder / f"PAT{i // 3:03d}_view{i % 3}.png")
    where = [f"data.image_dir={image_dir}", f"data.mask_dir={mask_dir}", "data.mask_mode=index"]

    def split_of(*overrides: str) -> dict[str, str]:
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="lungseg"):
            return build_datamodule(make_cfg(*where, *overrides)).split

    split = split_of()
    assert make_cfg().data.group_pattern == "auto"
    parts = _parts(split)
    assert len(parts) == 8 and all(len(p) == 1 for p in parts.values())
    assert len({p for ps in parts.values() for p in ps}) == 3  # train, val and test
    said = [r.getMessage() for r in caplog.records if "split by patient" in r.getMessage()]
    assert len(said) == 1 and "the 24 file names share 8 ids at their start" in said[0]
    assert "(e.g. 3 files start with 'PAT000': PAT000_view0, PAT000_view1)" in said[0]
    assert "share an id" not in caplog.text
    assert re.search(r"train/val/test \d+/\d+/\d+ \(\d+/\d+/\d+ patients\)", caplog.text)
    # the pattern it names, given, makes the same split
    (typed,) = re.findall(r"\((\"data\.group_pattern='.*?'\")", said[0])
    assert split_of(*shlex.split(typed)) == split
    by_file = split_of("data.group_pattern=null")
    assert "share an id" in caplog.text and "split by patient" not in caplog.text
    assert any(len(p) > 1 for p in _parts(by_file).values())
    split_file = tmp_path / "split.csv"
    split_file.write_text("file,split\n" + "".join(f"{n},{by_file[n]}\n" for n in by_file))
    assert split_of(f"data.split_file={split_file}") == by_file
    assert "split by patient" not in caplog.text
    for folder in (image_dir, mask_dir):  # ids all distinct: by file, without a word
        for i, path in enumerate(sorted(folder.iterdir())):
            path.rename(folder / f"ID_{i:04d}_Z_{100 + i}.png")
    split_of()
    assert "split by patient" not in caplog.text and "share an id" not in caplog.text


def test_a_split_by_name_ids_too_few_to_fill_it_names_the_split_by_file(tmp_path, make_cfg):
    """3 patients for train, val and test: the error of the empty split says that the ids
    came from data.group_pattern=auto, and how to split by file."""
    from lungseg.train import build_datamodule

    image_dir, mask_dir, _ = write_data(tmp_path, n=15)
    for folder in (image_dir, mask_dir):
        for i, path in enumerate(sorted(folder.iterdir())):
            path.rename(folder / f"case{i // 5}_slice{i % 5}.png")
    where = [f"data.image_dir={image_dir}", f"data.mask_dir={mask_dir}", "data.mask_mode=index"]
    with pytest.raises(LungsegError) as error:
        build_datamodule(make_cfg(*where))
    assert "leaves the val split empty: 15 files of 3 patients" in str(error.value)
    assert "data.group_pattern=auto took the ids the file names share" in str(error.value)
    assert "data.group_pattern=null splits by file instead" in str(error.value)
    assert build_datamodule(make_cfg(*where, "data.group_pattern=null")).split
    with pytest.raises(LungsegError) as error:  # an error the grouping has no part in
        build_datamodule(make_cfg(*where, "data.num_folds=5", "data.fold=7"))
    assert "outside 0..4" in str(error.value) and "group_pattern" not in str(error.value)


def test_auto_finds_the_lidc_patients_the_recipe_named_before():
    """experiment=lidc_nodules gave '^(LIDC-IDRI-\\d+)_' until it took auto (to run on other
    data): the same ids, hence the same folds, on LIDC's names."""
    from lungseg.data.datamodule import _auto_group_pattern

    names = [
        f"LIDC-IDRI-{p:04d}_nodule-{n}_slice-{s}"
        for p in (1, 2, 7, 12, 130)
        for n in range(1 + p % 3)
        for s in range(3)
    ]
    ids = splits.patient_ids(names, _auto_group_pattern(names))
    assert ids == splits.patient_ids(names, r"^(LIDC-IDRI-\d+)_")
    folds = [
        splits.make_split(names, (1, 0, 0), 42, r"^(LIDC-IDRI-\d+)_", None, 5, f) for f in range(5)
    ]
    assert folds == [
        splits.make_split(names, (1, 0, 0), 42, _auto_group_pattern(names), None, 5, f)
        for f in range(5)
    ]


def test_auto_leaves_files_in_sub_folders_to_the_folder_warning():
    """patient01/img_003_L: the second number's ids (img_003) are finer than the folders'
    patients; auto splits by file and the sub-folder warning names '^([^/]+)' (found by a
    review)."""
    from lungseg.data.datamodule import _auto_group_pattern

    names = [
        f"patient{p:02d}/img_{3 * p + k:03d}_{s}" for p in range(4) for k in range(2) for s in "LR"
    ]
    assert _auto_group_pattern(names) is None
    assert _auto_group_pattern([n.replace("/", "_") for n in names]) is not None


def _parts(split: dict[str, str]) -> dict[str, set[str]]:
    parts: dict[str, set[str]] = {}
    for name, part in split.items():
        parts.setdefault(name[:6], set()).add(part)
    return parts


def test_a_group_pattern_that_gives_every_file_its_own_id_is_named(tmp_path, caplog):
    """A group pattern that captured the slice number, slice(\\d+), on PAT001_slice3-style
    names made every file its own patient, a split by file, without a word (found by a
    tester)."""
    image_dir, mask_dir, _ = write_data(tmp_path, n=12)
    for folder in (image_dir, mask_dir):
        for i, path in enumerate(sorted(folder.iterdir())):
            path.rename(folder / f"PAT{i // 3:03d}_slice{i}.png")
    with caplog.at_level(logging.WARNING, logger="lungseg"):
        make_dm(image_dir, mask_dir, group_pattern=r"slice(\d+)")
    (warned,) = [r.getMessage() for r in caplog.records if "an id of its own" in r.getMessage()]
    assert warned.startswith(
        "data.group_pattern 'slice(\\\\d+)' gives each of the 12 files an id of its own (e.g. "
        "'0' for PAT000_slice0)"
    )
    assert "the names share 4 ids at their start (e.g. PAT000_slice0, PAT000_slice1)" in warned
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="lungseg"):
        make_dm(image_dir, mask_dir, group_pattern=r"^(PAT\d+)_")
    assert "an id of its own" not in caplog.text and "share an id" not in caplog.text


def test_batches_and_dataset_normalisation(tmp_path):
    image_dir, mask_dir, _ = write_data(tmp_path, n=12)
    dm = make_dm(image_dir, mask_dir, normalize="dataset")
    batch = next(iter(dm.train_dataloader()))
    assert batch["image"].shape == (4, 1, H, W) and batch["image"].dtype == torch.float32
    # uint8 through the loader; int64 once on the device, for the losses and metrics
    assert batch["mask"].shape == (4, H, W) and batch["mask"].dtype == torch.uint8
    moved = dm.on_after_batch_transfer(batch, 0)
    assert moved["mask"].dtype == torch.int64 and torch.equal(moved["mask"], batch["mask"].long())
    assert len(batch["name"]) == 4
    train = torch.stack([item["image"] for item in all_items(dm.train_dataset)])
    assert abs(train.mean().item()) < 1e-4
    assert abs(train.std(unbiased=False).item() - 1) < 1e-4
    info = dm.data_info()
    assert info["normalize"] == "dataset" and len(info["mean"]) == len(info["std"]) == 1
    # 12 files: 7 train, so with batch size 4 the train loader drops the last incomplete batch
    assert len(dm.train_dataset) == 7 and len(dm.train_dataloader()) == 1
    assert len(dm.val_dataloader()) == 1


@pytest.mark.parametrize(
    ("normalize", "in_channels"), [("dataset", 1), ("image", 1), ("none", 1), ("dataset", 3)]
)
def test_a_batch_without_cpu_augmentation_is_its_items_stacked(tmp_path, normalize, in_channels):
    """Where the CPU pipeline does nothing (augmentation=device, evaluation), the loader asks
    the dataset for a whole batch (__getitems__): the same tensors as collating the items."""
    from torch.utils.data import default_collate

    image_dir, mask_dir, _ = write_data(tmp_path, n=12)
    dm = make_dm(image_dir, mask_dir, normalize=normalize, in_channels=in_channels)
    for dataset in (dm.val_dataset, dm.test_dataset):
        indices = list(range(len(dataset)))[::-1]
        batch = dataset.__getitems__(indices)
        items = default_collate([dataset[i] for i in indices])
        assert isinstance(batch, dict) and batch["name"] == items["name"]
        assert batch["image"].shape == (len(indices), in_channels, H, W)
        assert batch["image"].is_contiguous() and batch["image"].dtype == torch.float32
        assert torch.equal(batch["image"], items["image"])
        assert batch["mask"].dtype == torch.uint8 and torch.equal(batch["mask"], items["mask"])
        # a copy: the cache is not changed by what is done to the batch
        before = dataset.images[indices[0]].copy()
        batch["image"].add_(1)
        assert np.array_equal(dataset.images[indices[0]], before)
    # what the loader delivers: the batches of __getitems__
    calls = []
    original = type(dm.val_dataset).__getitems__

    def counted(self, indices):
        calls.append(len(indices))
        return original(self, indices)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(type(dm.val_dataset), "__getitems__", counted)
        loaded = next(iter(dm.val_dataloader()))
    assert calls and torch.equal(
        loaded["image"], dm.val_dataset.__getitems__(range(calls[0]))["image"]
    )
    # albumentations in the loader: item by item, each with its own draw
    flip = {"train": [{"_target_": "albumentations.HorizontalFlip", "p": 0.5}]}
    augmented = make_dm(image_dir, mask_dir, normalize=normalize, augmentation=flip)
    assert isinstance(augmented.train_dataset.__getitems__([0, 1]), list)


def test_image_and_no_normalisation(tmp_path):
    image_dir, mask_dir, _ = write_data(tmp_path)
    per_image = make_dm(image_dir, mask_dir, normalize="image")
    for item in all_items(per_image.train_dataset):
        assert abs(item["image"].mean().item()) < 1e-4
        assert abs(item["image"].std(unbiased=False).item() - 1) < 1e-3
    raw = make_dm(image_dir, mask_dir, normalize="none")
    item = raw.train_dataset[0]
    expected = cv2.imread(str(image_dir / f"{item['name']}.png"), cv2.IMREAD_UNCHANGED) / 255
    assert torch.allclose(item["image"][0], torch.from_numpy(expected).float())
    assert raw.data_info()["mean"] is None


def test_augmentation_moves_image_and_mask_together(tmp_path):
    image_dir, mask_dir, masks = write_data(tmp_path)
    flip = {"train": [{"_target_": "albumentations.HorizontalFlip", "p": 1.0}]}
    dm = make_dm(image_dir, mask_dir, normalize="none", augmentation=flip)
    for item in all_items(dm.train_dataset):
        original = cv2.imread(str(image_dir / f"{item['name']}.png"), cv2.IMREAD_UNCHANGED)
        image, mask = item["image"][0].numpy(), item["mask"].numpy()
        assert np.allclose(image, original[:, ::-1] / 255, atol=1e-6)
        assert np.array_equal(mask, masks[item["name"]][:, ::-1])
        assert not np.array_equal(mask, masks[item["name"]])
    for item in all_items(dm.val_dataset):  # eval augmentation: none
        assert np.array_equal(item["mask"].numpy(), masks[item["name"]])


def test_augmentation_follows_torch_seed_and_differs_between_draws(tmp_path):
    """Each item's augmentation is drawn from torch's generator (reproducible from the run's
    seed, different in every DataLoader worker), whichever transform of the pipeline draws."""
    image_dir, mask_dir, _ = write_data(tmp_path, n=4)
    pipeline = {
        "train": [
            {"_target_": "albumentations.HorizontalFlip", "p": 0.5},
            {"_target_": "albumentations.Affine", "rotate": [-30, 30], "p": 1.0},
            {"_target_": "albumentations.RandomBrightnessContrast", "p": 1.0},
        ]
    }
    dataset = make_dm(image_dir, mask_dir, augmentation=pipeline).train_dataset

    def draws(seed, n=6):
        torch.manual_seed(seed)
        return [dataset[0]["image"] for _ in range(n)]

    first, again, other = draws(0), draws(0), draws(1)
    assert all(torch.equal(a, b) for a, b in zip(first, again, strict=True))
    assert not any(torch.equal(a, b) for a, b in zip(first, other, strict=True))
    assert not any(torch.equal(first[0], b) for b in first[1:])
    # Another dataset on the same pipeline (val and test share the eval one) does not take
    # the first one's draws out of the seed's hands.
    CachedSegDataset(
        ["x"],
        [np.zeros((4, 4, 1), np.float32)],
        [np.zeros((4, 4), np.uint8)],
        dataset.augment,
        dataset.image_info,
    )
    assert all(torch.equal(a, b) for a, b in zip(first, draws(0), strict=True))


class _ThreadsSeen(torch.utils.data.Dataset):
    """Reports OpenCV's thread count after a training item, where the item was made."""

    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self):
        return 1

    def __getitem__(self, i):
        self.dataset[i]
        return cv2.getNumThreads()


def test_training_items_turn_opencv_threads_off_in_every_process(tmp_path, monkeypatch):
    """The augmentation's OpenCV calls run on one thread, in the training process and in each
    DataLoader worker: OpenCV's own pool would compete with torch's threads for the cores."""
    from lungseg.data import datamodule

    image_dir, mask_dir, _ = write_data(tmp_path, n=4)
    dataset = make_dm(image_dir, mask_dir).train_dataset
    try:
        for where in ("here", "worker"):
            cv2.setNumThreads(4)
            monkeypatch.setattr(datamodule, "_CV2_SEQUENTIAL_PID", None)
            if where == "here":
                dataset[0]
                assert cv2.getNumThreads() == 1
            else:
                loader = torch.utils.data.DataLoader(_ThreadsSeen(dataset), num_workers=1)
                assert [int(n) for n in loader] == [1]
                assert cv2.getNumThreads() == 4  # only the worker's own
    finally:
        cv2.setNumThreads(-1)


def test_mixed_bit_depths_and_12_bit_values_in_16_bit_files_are_named(tmp_path, caplog):
    """8-bit / 255 beside 12-bit values / 65535: one set on two scales, 16x apart, in silence."""
    image_dir, mask_dir, _ = write_data(tmp_path, n=6)
    widened = image_dir / "case01.png"  # 8-bit values saved in 16 bits, each x 257
    eight_bit = cv2.imread(str(widened), cv2.IMREAD_UNCHANGED)
    cv2.imwrite(str(widened), eight_bit.astype(np.uint16) * 257)
    with caplog.at_level(logging.WARNING):
        make_dm(image_dir, mask_dir, normalize="dataset")  # /65535: as its 8-bit file /255
    assert "bit" not in caplog.text
    cv2.imwrite(str(widened), eight_bit)
    for i in (1, 4):  # a 12-bit DICOM export
        path = image_dir / f"case{i:02d}.png"
        twelve_bit = cv2.imread(str(path), cv2.IMREAD_UNCHANGED).astype(np.uint16) * 16
        cv2.imwrite(str(path), twelve_bit)
    with caplog.at_level(logging.WARNING):
        make_dm(image_dir, mask_dir, normalize="dataset")
    assert "mix 4 8-bit files (e.g. case00.png) and 2 16-bit files (e.g. case01.png" in caplog.text
    assert "fill 6 % of their range" in caplog.text and "data.normalize=image" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        make_dm(image_dir, mask_dir, normalize="image")  # each image scaled on its own
        make_dm(image_dir, mask_dir, window=[0, 4095])  # scaled as the user says
    assert "bit" not in caplog.text

    for i in (0, 2, 3, 5):  # now all 12-bit: only normalize=none leaves them dark
        path = image_dir / f"case{i:02d}.png"
        cv2.imwrite(str(path), cv2.imread(str(path), cv2.IMREAD_UNCHANGED).astype(np.uint16) * 16)
    with caplog.at_level(logging.WARNING):
        make_dm(image_dir, mask_dir, normalize="dataset")
        assert "bit" not in caplog.text
        make_dm(image_dir, mask_dir, normalize="none")
    assert "16-bit images hold values up to" in caplog.text
    assert "data.window=[0," in caplog.text


def test_exif_orientation_turns_the_image_and_a_disagreement_is_named(tmp_path, caplog):
    """A phone photo stores its pixels turned, with an EXIF tag; masks drawn in a viewer follow
    the turned view. The image is read as shown, and the differing tags are named."""
    image_dir, mask_dir, _ = write_data(tmp_path / "plain", n=6)
    turned_dir = tmp_path / "turned"
    shutil.copytree(image_dir, turned_dir)
    shown = cv2.imread(str(image_dir / "case03.png"), cv2.IMREAD_UNCHANGED)
    (turned_dir / "case03.png").write_bytes(oriented(".png", shown[::-1, ::-1], 3))
    plain = make_dm(image_dir, mask_dir)
    with caplog.at_level(logging.WARNING):
        turned = make_dm(turned_dir, mask_dir)
    assert "1 image/mask pairs carry different EXIF orientations" in caplog.text
    expected = f"case03.png (turned 180 degrees) and its mask {mask_dir / 'case03.png'} (as stored)"
    assert expected in caplog.text
    for a, b in zip(datasets(plain), datasets(turned), strict=True):
        assert a.names == b.names
        assert all(np.array_equal(x, y) for x, y in zip(a.images, b.images, strict=True))

    (turned_dir / "case03.png").write_bytes(oriented(".png", np.rot90(shown), 6))
    make_dm(turned_dir, mask_dir)  # stored turned back: shown at the mask's size
    (turned_dir / "case03.png").write_bytes(oriented(".png", shown, 6))
    with pytest.raises(LungsegError) as error:  # 40x48 shown as 48x40 beside a 48x40 mask
        make_dm(turned_dir, mask_dir)
    message = str(error.value)
    assert "case03.png is 40x48 pixels" in message and "mask" in message
    assert "EXIF orientation that lungseg applies" in message
    assert "(turned 90 degrees clockwise); its stored pixels are 48x40" in message


def datasets(dm):
    return dm.train_dataset, dm.val_dataset, dm.test_dataset


def test_each_transform_draws_on_its_own():
    """One seed per item used to seed every transform alike: two flips of p=0.5 were applied
    together or not at all (both on half the images, never one alone)."""
    image = np.arange(16, dtype=np.float32).reshape(4, 4, 1)
    flips = build_augmentation(
        [
            {"_target_": "albumentations.HorizontalFlip", "p": 0.5},
            {"_target_": "albumentations.VerticalFlip", "p": 0.5},
        ]
    )
    info = {"normalize": "none", "mean": None, "std": None}
    dataset = CachedSegDataset(["x"], [image], [np.zeros((4, 4), np.uint8)], flips, info)
    torch.manual_seed(0)
    corners = [dataset[0]["image"][0, 0, 0].item() for _ in range(800)]
    counts = {v: corners.count(v) / len(corners) for v in (0.0, 3.0, 12.0, 15.0)}
    assert sum(counts.values()) == 1  # none, horizontal, vertical, both
    assert all(0.19 < share < 0.31 for share in counts.values()), counts


def test_cache_needs_no_files_after_setup(tmp_path):
    image_dir, mask_dir, _ = write_data(tmp_path)
    dm = make_dm(image_dir, mask_dir)
    shutil.rmtree(image_dir)
    shutil.rmtree(mask_dir)
    dm.setup("test")  # a second setup returns at once, without reading
    for _ in range(2):
        for loader in (dm.train_dataloader(), dm.val_dataloader(), dm.test_dataloader()):
            assert sum(len(batch["name"]) for batch in loader) > 0


def test_mask_size_mismatch_names_both_files(tmp_path):
    image_dir, mask_dir, _ = write_data(tmp_path, n=4)
    cv2.imwrite(str(mask_dir / "case02.png"), np.zeros((H, W + 2), np.uint8))
    with pytest.raises(LungsegError, match="case02.png") as error:
        make_dm(image_dir, mask_dir)
    message = str(error.value)
    assert str(image_dir / "case02.png") in message and str(mask_dir / "case02.png") in message
    assert f"{W}x{H}" in message and f"{W + 2}x{H}" in message


def test_masks_at_another_scale_are_taken_with_data_resize_masks(tmp_path):
    """SCR's lung masks are 1024 px for JSRT's 2048-px radiographs: every pair was refused,
    with data.strict=false too."""
    from lungseg.data.transforms import resize_mask

    image_dir, mask_dir, masks = write_data(tmp_path, n=4)
    for name, mask in masks.items():
        cv2.imwrite(str(mask_dir / f"{name}.png"), mask[::2, ::2])
    for strict in (True, False):
        with pytest.raises(LungsegError, match=r"at 1/2 its size: give data.resize_masks=true"):
            make_dm(image_dir, mask_dir, strict=strict)
    dm = make_dm(image_dir, mask_dir, resize_masks=True, normalize="none")
    assert dm.data_info()["resize_masks"] is True
    for item in all_items(dm.train_dataset):
        half = masks[item["name"]][::2, ::2]
        assert np.array_equal(item["mask"].numpy(), resize_mask(half, (H, W)))
    # another shape, not another scale, or a few pixels: refused still
    for shape in ((H, W + 2), (H // 8, W // 8)):
        cv2.imwrite(str(mask_dir / "case02.png"), np.zeros(shape, np.uint8))
        with pytest.raises(LungsegError, match=r"is \d+x\d+\. A mask must have its image's size"):
            make_dm(image_dir, mask_dir, resize_masks=True)


def test_gray_to_three_channels_and_rgb_to_one(tmp_path):
    image_dir, mask_dir, _ = write_data(tmp_path / "gray")
    item = make_dm(image_dir, mask_dir, in_channels=3, normalize="none").train_dataset[0]
    assert item["image"].shape == (3, H, W)
    assert torch.equal(item["image"][0], item["image"][1])
    assert torch.equal(item["image"][0], item["image"][2])
    image_dir, mask_dir, _ = write_data(tmp_path / "rgb", rgb=True)
    dm = make_dm(image_dir, mask_dir, in_channels=1)
    assert dm.train_dataset[0]["image"].shape == (1, H, W)
    dm = make_dm(image_dir, mask_dir, in_channels=3)
    assert dm.train_dataset[0]["image"].shape == (3, H, W)
    assert len(dm.data_info()["mean"]) == 3


def test_16_bit_images_and_ct_window(tmp_path):
    image_dir, mask_dir, _ = write_data(tmp_path, n=6, dtype=np.uint16)
    dm = make_dm(image_dir, mask_dir, normalize="none")
    for item in all_items(dm.train_dataset):
        raw = cv2.imread(str(image_dir / f"{item['name']}.png"), cv2.IMREAD_UNCHANGED)
        assert raw.dtype == np.uint16
        assert np.allclose(item["image"][0].numpy(), raw / 65535, atol=1e-6)
    # CT stored as HU + 32768: a ramp from -2000 to 1000 HU
    hu = np.tile(np.linspace(-2000, 1000, W).round(), (H, 1))
    for name in ("case00", "case01"):
        cv2.imwrite(str(image_dir / f"{name}.png"), (hu + 32768).astype(np.uint16))
    ct = make_dm(image_dir, mask_dir, normalize="none", window=[-1000, 400], intensity_offset=32768)
    expected = (np.clip(hu, -1000, 400) + 1000) / 1400
    items = {
        item["name"]: item
        for ds in (ct.train_dataset, ct.val_dataset, ct.test_dataset)
        for item in all_items(ds)
    }
    assert np.allclose(items["case00"]["image"][0].numpy(), expected, atol=1e-5)
    assert ct.data_info()["window"] == [-1000.0, 400.0]
    assert ct.data_info()["intensity_offset"] == 32768.0


def test_non_square_size_and_mixed_input_sizes(tmp_path):
    image_dir, mask_dir, _ = write_data(tmp_path, sizes=[(40, 48), (32, 32), (48, 36)])
    dm = make_dm(image_dir, mask_dir, image_size=[24, 40])
    for dataset in (dm.train_dataset, dm.val_dataset, dm.test_dataset):
        for item in all_items(dataset):
            assert item["image"].shape == (1, 24, 40) and item["mask"].shape == (24, 40)
            assert set(item["mask"].unique().tolist()) <= {0, 1, 2}
    assert dm.data_info()["image_size"] == [24, 40]


def test_demo_data(tmp_path, caplog):
    dm = SegDataModule(
        demo_dir=str(tmp_path / "demo"), demo_num_images=10, demo_size=64, image_size=32
    )
    dm.prepare_data()
    with caplog.at_level(logging.INFO, logger="lungseg.data.datamodule"):
        dm.setup("fit")
    assert "10 image/mask pairs" in caplog.text and "train/val/test 6/2/2" in caplog.text
    assert dm.num_classes == 3 and dm.class_names == ["background", "lung", "tumour"]
    assert dm.data_info()["palette"] == [[0, 0, 0], [0, 255, 0], [255, 0, 0]]
    batch = next(iter(dm.train_dataloader()))
    assert batch["image"].shape[1:] == (1, 32, 32)
    with pytest.raises(LungsegError, match="demo data"):
        SegDataModule(demo_dir=str(tmp_path / "demo"), mask_mode="index")


def test_write_split_and_reuse_it(tmp_path):
    image_dir, mask_dir, _ = write_data(tmp_path, n=12)
    dm = make_dm(image_dir, mask_dir, seed=3)
    dm.write_split(tmp_path / "run" / "split.csv")
    with (tmp_path / "run" / "split.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert {row["file"]: row["split"] for row in rows} == dm.split
    assert [row["file"] for row in rows] == sorted(dm.split)
    again = make_dm(image_dir, mask_dir, seed=4, split_file=str(tmp_path / "run" / "split.csv"))
    assert again.split == dm.split
    assert [item["name"] for item in all_items(again.val_dataset)] == sorted(
        s for s, name in dm.split.items() if name == "val"
    )


def test_grouped_split_keeps_patients_together(tmp_path, caplog):
    image_dir, mask_dir, _ = write_data(tmp_path, n=12)
    with caplog.at_level(logging.INFO, logger="lungseg.data.datamodule"):
        dm = make_dm(image_dir, mask_dir, group_pattern=r"case\d(\d)")  # 10 patients
    assert "(6/2/2 patients)" in caplog.text
    for a in ("0", "1"):  # the patients with two slices
        assert dm.split[f"case0{a}"] == dm.split[f"case1{a}"]


def test_data_info_survives_weights_only_load(tmp_path):
    image_dir, mask_dir, _ = write_data(tmp_path, mode="palette")
    info = make_dm(image_dir, mask_dir, mask_mode="palette", palette=PALETTE).data_info()
    torch.save({"data_info": info}, tmp_path / "info.pt")
    assert torch.load(tmp_path / "info.pt", weights_only=True)["data_info"] == info
    assert info["class_names"] == list(PALETTE) and info["num_classes"] == 3


def test_transform_helpers():
    gray = np.arange(20 * 30, dtype=np.uint8).reshape(20, 30, 1)
    assert resize_image(gray, (10, 12)).shape == (10, 12, 1)
    assert resize_image(gray, (40, 60)).shape == (40, 60, 1)
    assert median_blur(gray.astype(np.uint16), 5).shape == (20, 30, 1)
    assert median_blur(gray, 7).dtype == np.uint8
    with pytest.raises(LungsegError, match="only for 8-bit"):
        median_blur(gray.astype(np.uint16), 7)
    with pytest.raises(LungsegError, match="odd kernel size"):
        median_blur(gray, 4)
    assert len(build_augmentation(None).transforms) == 0
    with pytest.raises(LungsegError, match="entry 1"):
        build_augmentation([{"_target_": "albumentations.HorizontalFlip"}, {"p": 0.5}])


def test_more_than_4_channels_shrink_by_a_non_integer_factor():
    """OpenCV's INTER_AREA takes at most 4 channels at a non-integer factor (here 12 x 18 to
    8 x 12, 1.5): a 5-class soft mask and a 9-channel 2.5-D context stack are resized channel
    by channel; where one call works (a factor of 2) its result is kept."""
    from lungseg.data.transforms import soft_mask

    rng = np.random.default_rng(0)

    def per_channel(image, size):
        return np.stack(
            [
                cv2.resize(
                    np.ascontiguousarray(image[..., c]), size[::-1], interpolation=cv2.INTER_AREA
                )
                for c in range(image.shape[2])
            ],
            axis=-1,
        )

    mask = rng.integers(0, 5, (12, 18)).astype(np.uint8)
    onehot = (mask[..., None] == np.arange(5)).astype(np.float32)
    soft = soft_mask(mask, 5, (8, 12))
    assert np.array_equal(soft, np.rint(per_channel(onehot, (8, 12)) * 255).astype(np.uint8))
    assert np.abs(soft.sum(-1).astype(int) - 255).max() <= 2  # 5 classes, each rounded <= 1/2
    context = rng.random((12, 18, 9), dtype=np.float32)
    assert np.array_equal(resize_image(context, (8, 12)), per_channel(context, (8, 12)))
    whole = cv2.resize(context, (9, 6), interpolation=cv2.INTER_AREA)
    assert np.array_equal(resize_image(context, (6, 9)), whole)


def test_training_without_a_val_split_keeps_the_final_weights(make_cfg, caplog):
    """A val fraction of 0 trains without validation: no early stopping or best-checkpoint
    callback (they watch val/* metrics, which nothing logs; Lightning's early stopping failed
    after the first epoch), the full schedule, and the final weights (last.ckpt) as the
    tested model. A plateau scheduler, which needs val/loss, is refused before anything is
    written."""
    from lungseg.visualize import read_epoch_scalars

    cfg = make_cfg(
        "data.split=[0.75,0.0,0.25]",
        "trainer.max_epochs=3",
        "callbacks.early_stopping.patience=0",  # left out: it would watch val/loss
        # Lightning then saved an unmonitored checkpoint only after a validation: never
        "trainer.check_val_every_n_epoch=2",
    )
    with caplog.at_level(logging.INFO):
        metrics = train(cfg)
    out = Path(cfg.output_dir)
    assert "no val split" in caplog.text and "EarlyStopping and ModelCheckpoint" in caplog.text
    epochs = [r.getMessage() for r in caplog.records if r.getMessage().startswith("epoch ")]
    assert len(epochs) == 3 and epochs[2].startswith("epoch 2: train/loss")  # one line each
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["last.ckpt"]
    assert metrics["best_checkpoint"] == str(out / "checkpoints" / "last.ckpt")
    assert (metrics["epochs_trained"], metrics["best_epoch"]) == (3, 2)
    assert metrics["monitor"] is None and metrics["stopped_by"] == "max_epochs"
    assert metrics["test/dice"] is not None
    rows = list(csv.reader((out / "split.csv").open()))[1:]
    assert {split for _, split in rows} == {"train", "test"}
    history = read_epoch_scalars(out / "tensorboard")
    assert "train/loss_epoch" in history and not any(k.startswith("val/") for k in history)

    cfg = make_cfg(
        "data.split=[0.75,0.0,0.25]", "scheduler=plateau", "output_dir=" + str(out / "p")
    )
    with pytest.raises(LungsegError, match=r"no val split, but the plateau scheduler .*cosine"):
        train(cfg)
    assert not list((out / "p").glob("*"))
    cfg = make_cfg(
        "data.split=[0.75,0.0,0.25]", "~callbacks.last_checkpoint", f"output_dir={out}/q"
    )
    with pytest.raises(LungsegError, match=r"keeps its final weights through callbacks.last_chec"):
        train(cfg)
    assert not list((out / "q").glob("*"))


def test_foreground_oversampling_fills_each_batch_share(tmp_path):
    from lungseg.data.datamodule import ForegroundSampler

    image_dir, mask_dir, _ = write_data(tmp_path, n=20)
    dm = make_dm(image_dir, mask_dir, split=[1.0, 0.0, 0.0], batch_size=4)
    dataset = dm.train_dataset
    for i in range(16):  # only 4 of the 20 slices keep foreground
        dataset.masks[i][:] = 0
    sampler = ForegroundSampler(dataset, batch_size=4, fraction=0.5)
    torch.manual_seed(0)
    order = list(sampler)
    assert len(order) == 20 and set(sampler.foreground) == {16, 17, 18, 19}
    for start in range(0, 20, 4):
        assert sum(i in sampler.foreground for i in order[start : start + 4]) >= 2
    torch.manual_seed(0)
    assert list(sampler) == order  # follows torch's generator, which EpochLoader reseeds
    with pytest.raises(LungsegError, match="foreground_fraction"):
        make_dm(image_dir, mask_dir, foreground_fraction=1.5)
    loader = make_dm(image_dir, mask_dir, foreground_fraction=0.5).train_dataloader()
    assert type(loader.sampler) is ForegroundSampler


def test_soft_mask_fractions_target_and_tie_break():
    from lungseg.data.transforms import hard_mask, soft_mask, soft_target

    mask = np.zeros((8, 8), np.uint8)
    mask[:, 3:] = 1  # the boundary falls inside a pixel at 4 x 4
    soft = soft_mask(mask, 3, (4, 4))
    assert soft.shape == (4, 4, 3) and soft.dtype == np.uint8  # fractions x 255
    target = soft_target(soft)
    assert target.dtype == np.float32 and np.allclose(target.sum(-1), 1)
    assert np.allclose(target[:, 1], [0.5, 0.5, 0.0], atol=1 / 255)
    assert np.array_equal(hard_mask(soft_mask(mask, 2, (8, 8))), mask)  # same size: one-hot
    # ties (the half-lung column) alternate between the classes: no side gains area
    assert hard_mask(soft)[:, 1].tolist() == [0, 1, 0, 1]
    # sums over 1 are scaled down, missing shares go to the background
    odd = np.array([[[200, 200, 0], [0, 100, 0]]], np.uint8)
    assert np.allclose(soft_target(odd), [[[0.5, 0.5, 0.0], [155 / 255, 100 / 255, 0.0]]])


def test_soft_masks_give_class_fractions_for_the_loss(tmp_path):
    """data.soft_masks: the loss's target holds each class's share of a pixel (the mask's one-hot
    encoding area-resized like the image), the metrics' mask and the sampler's masks are its
    hard_mask, and augmentation moves it with the image, interpolating linearly."""
    import albumentations as A

    from lungseg.data.transforms import hard_mask, soft_mask, soft_mask_augmentation, soft_target

    compose = soft_mask_augmentation(A.Compose([A.OneOf([A.Affine(p=1)]), A.HorizontalFlip()]))
    assert compose.transforms[0].transforms[0].mask_interpolation == cv2.INTER_LINEAR

    image_dir, mask_dir, masks = write_data(tmp_path, n=10, mode="index")
    size = [H // 2 - 1, W // 2 - 1]  # boundaries fall between the network's pixels
    dm = make_dm(image_dir, mask_dir, image_size=size, soft_masks=True, split=[1.0, 0.0, 0.0])
    item = dm.train_dataset[0]
    target, hard = item["target"], item["mask"]
    assert target.shape == (3, *size) and target.dtype == torch.float32
    assert torch.allclose(target.sum(0), torch.ones(size)) and ((target > 0) & (target < 1)).any()
    assert torch.equal(hard, torch.from_numpy(hard_mask(target.numpy().transpose(1, 2, 0))).long())
    expected = soft_target(soft_mask(masks[item["name"]], 3, tuple(size)))
    assert np.allclose(target.numpy().transpose(1, 2, 0), expected, atol=1e-6)
    assert np.array_equal(dm.train_dataset.masks[0], hard.numpy())  # ForegroundSampler's
    known = make_dm(  # classes known before decoding: fractions made as each file is read
        image_dir, mask_dir, image_size=size, soft_masks=True, split=[1.0, 0.0, 0.0], num_classes=3
    )
    assert torch.equal(known.train_dataset[0]["target"], target)

    flip = {"train": [{"_target_": "albumentations.HorizontalFlip", "p": 1.0}]}
    flipped = make_dm(
        image_dir,
        mask_dir,
        image_size=size,
        soft_masks=True,
        split=[1.0, 0.0, 0.0],
        augmentation=flip,
    ).train_dataset[0]
    assert torch.allclose(flipped["target"], target.flip(-1))
    assert torch.allclose(flipped["image"], item["image"].flip(-1))

    # At the masks' own size the fractions are one-hot; a rotation interpolated linearly makes
    # fractions along the boundaries (nearest neighbour would keep them 0/1), and what it moves
    # in from outside the image is background.
    turn = {
        "train": [
            {"_target_": "albumentations.Affine", "rotate": [20, 20], "p": 1.0},
            {
                "_target_": "albumentations.Affine",
                "translate_px": {"x": [5, 5], "y": [0, 0]},
                "p": 1.0,
            },
        ]
    }
    plain = make_dm(image_dir, mask_dir, soft_masks=True, split=[1.0, 0.0, 0.0])
    assert set(plain.train_dataset[0]["target"].unique().tolist()) == {0.0, 1.0}
    turned = make_dm(
        image_dir, mask_dir, soft_masks=True, split=[1.0, 0.0, 0.0], augmentation=turn
    ).train_dataset[0]["target"]
    assert ((turned > 0.1) & (turned < 0.9)).float().mean() > 0.01
    assert torch.allclose(turned.sum(0), torch.ones(H, W), atol=1e-5)
    assert torch.all(turned[0, :, :5] == 1)

    batch = next(iter(dm.train_dataloader()))
    assert batch["target"].shape == (4, 3, *size) and batch["mask"].dtype == torch.uint8
    assert dm.on_after_batch_transfer(batch, 0)["mask"].dtype == torch.int64


def test_foreground_oversampling_under_ddp_gives_disjoint_shards_with_the_batch_share(tmp_path):
    """Each process's sampler (as the DataModule builds it for 2 processes) keeps the
    foreground share in its own batches, the processes draw disjoint samples, the stream
    follows the epoch, and Lightning keeps the sampler instead of wrapping it."""
    from torch.utils.data.distributed import DistributedSampler

    from lungseg.data.datamodule import DistributedForegroundSampler

    image_dir, mask_dir, _ = write_data(tmp_path, n=40)
    dm = make_dm(image_dir, mask_dir, split=[1.0, 0.0, 0.0], batch_size=4, foreground_fraction=0.5)
    for i in range(20):  # 20 of the 40 slices keep foreground
        dm.train_dataset.masks[i][:] = 0
    orders = []
    for rank in (0, 1):
        dm.trainer = fake_trainer(world_size=2, global_rank=rank)
        dm.load_state_dict({"train_epochs": 3})  # as a resumed run's checkpoint restores it
        loader = dm.train_dataloader()
        sampler = loader.sampler
        assert type(sampler) is DistributedForegroundSampler
        assert isinstance(sampler, DistributedSampler)  # Lightning's test for "leave it alone"
        assert len(sampler) == 20
        iter(loader)  # the epoch's loader starts: the stream of epoch 3, set before any prefetch
        sampler.set_epoch(0)  # Lightning's call, after a worker loader prefetched: ignored
        assert sampler.stream_epoch == 3
        torch.manual_seed(rank)  # the global generator (reseeded per rank) plays no part
        order = list(sampler)
        for start in range(0, 20, 4):
            assert sum(i >= 20 for i in order[start : start + 4]) >= 2
        torch.manual_seed(7)
        assert list(sampler) == order
        sampler.stream_epoch = 4
        assert list(sampler) != order
        orders.append(order)
    # The first 2 of every 4 samples of a process are its foreground draws: 20 in all, of 20
    # foreground slices, so the two processes drew each exactly once; the other draws, 20 of
    # all 40 slices, are distinct too (a slice may be drawn once from each source).
    foreground = [i for order in orders for k, i in enumerate(order) if k % 4 < 2]
    others = [i for order in orders for k, i in enumerate(order) if k % 4 >= 2]
    assert sorted(foreground) == list(range(20, 40))
    assert len(set(others)) == 20
    # drop_last looks at a process's share: 40 slices over 10 processes is one batch of 4 each
    dm.trainer = fake_trainer(world_size=10, global_rank=0)
    assert dm.train_dataloader().drop_last is False
    dm.trainer = fake_trainer(world_size=2, global_rank=0)
    assert dm.train_dataloader().drop_last is True


def test_a_stray_mask_value_stops_the_run_not_trained_in_silence(tmp_path, caplog):
    """Was a warning (and an 8-class network); now the run stops with the same facts."""
    image_dir, mask_dir, masks = write_data(tmp_path, n=10)
    mask = masks["case03"].copy()
    mask[0, 0] = 7  # one pixel of a value no other mask holds
    cv2.imwrite(str(mask_dir / "case03.png"), mask)
    with pytest.raises(LungsegError) as info:
        make_dm(image_dir, mask_dir, image_size=[H, W])
    message = str(info.value)
    assert "largest class value is 7 (1 pixels, in 1 masks: case03)" in message
    assert "the values 3-6 occur in no mask" in message and "hold the values 0, 1, 2, 7" in message
    assert "data.num_classes=8 (and data.class_names)" in message
    assert "data.mask_mode=binary" in message and "fix those masks" in message
    assert make_dm(image_dir, mask_dir, num_classes=8).num_classes == 8  # "the classes are right"

    with caplog.at_level(logging.WARNING, logger="lungseg.data.datamodule"):
        assert make_dm(*write_data(tmp_path / "clean", n=10)[:2]).num_classes == 3
    assert "largest class value" not in caplog.text


def test_grey_coded_index_masks_stop_the_run_and_the_grey_palette_it_names_reads_them(tmp_path):
    """0/128/255 masks in index mode made a 256-class network (test Dice 0.0014)."""
    image_dir, mask_dir, masks = write_data(tmp_path, n=10)
    levels = np.array([0, 128, 255], np.uint8)
    for name, mask in masks.items():
        cv2.imwrite(str(mask_dir / f"{name}.png"), levels[mask])
    with pytest.raises(LungsegError) as info:
        make_dm(image_dir, mask_dir)
    message = str(info.value)
    assert "largest class value is 255" in message and "in 10 masks: case00" in message
    assert "the values 1-127, 129-254 occur in no mask" in message
    assert "the masks hold the values 0, 128, 255" in message
    assert "data.num_classes=256" in message
    palette = "[[0,0,0],[128,128,128],[255,255,255]]"
    assert "data.mask_mode=palette with a grey palette, class i the i-th level: " in message
    assert f"data.palette={palette}" in message and "data.mask_mode=binary" in message
    grey = [[0, 0, 0], [128, 128, 128], [255, 255, 255]]  # the palette it names
    dm = make_dm(image_dir, mask_dir, mask_mode="palette", palette=grey)
    assert dm.num_classes == 3
    for dataset in datasets(dm):
        for name, mask in zip(dataset.names, dataset.masks, strict=True):
            np.testing.assert_array_equal(mask, masks[name])


def test_a_class_only_at_full_size_is_counted_and_its_loss_to_the_resize_named(tmp_path, caplog):
    """A 3x3-pixel class in 128-px masks vanishes at 32 px: it is counted at the masks' own
    size (eval.py scores the full-size masks with it), with a warning."""
    image_dir, mask_dir, masks = write_data(tmp_path, n=10, sizes=[(128, 128)])
    for name, mask in masks.items():
        mask[3:6, 3:6] = 3
        cv2.imwrite(str(mask_dir / f"{name}.png"), mask)
    with caplog.at_level(logging.WARNING, logger="lungseg.data.datamodule"):
        dm = make_dm(image_dir, mask_dir, image_size=[32, 32])
    assert dm.num_classes == 4 and dm.class_names[3] == "class_3"
    assert all(3 not in m for ds in datasets(dm) for m in ds.masks)
    assert (
        "class 'class_3' (id 3) is in 10 masks (case00, case01, case02, case03, case04, ...; "
        "at most 9 pixels in one) at the masks' own size but in none after the resize to "
        "data.image_size=[32, 32]"
    ) in caplog.text
    assert "larger data.image_size" in caplog.text
    assert "training masks (" not in caplog.text  # not named again as absent from training

    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="lungseg.data.datamodule"):
        assert make_dm(image_dir, mask_dir, image_size=[128, 128]).num_classes == 4
    assert "after the resize" not in caplog.text


def test_training_masks_without_foreground_stop_the_run(tmp_path):
    image_dir, mask_dir, masks = write_data(tmp_path, n=10, mode="binary")
    for name, mask in masks.items():
        cv2.imwrite(str(mask_dir / f"{name}.png"), np.zeros_like(mask))
    with pytest.raises(LungsegError) as info:
        make_dm(image_dir, mask_dir, mask_mode="binary")
    message = str(info.value)
    assert "None of the 6 training masks holds a foreground pixel" in message
    assert "data.mask_mode=binary" in message and f"data.mask_dir ({mask_dir})" in message
    assert "every mask is empty" in message

    # foreground in the test masks only: the split is named too
    cv2.imwrite(str(mask_dir / "case09.png"), masks["case09"] * 255)
    split = tmp_path / "split.csv"
    rows = [f"case{i:02d},{'test' if i >= 8 else 'val' if i >= 6 else 'train'}" for i in range(10)]
    split.write_text("file,split\n" + "\n".join(rows) + "\n")
    with pytest.raises(LungsegError, match=r"only 1 of the 2 test masks hold foreground"):
        make_dm(image_dir, mask_dir, mask_mode="binary", split_file=str(split))


def test_a_class_absent_from_the_training_split_is_named(tmp_path, caplog):
    image_dir, mask_dir, masks = write_data(tmp_path, n=10)
    for name in ("case08", "case09"):
        mask = masks[name].copy()
        mask[30:36, 2:8] = 3
        cv2.imwrite(str(mask_dir / f"{name}.png"), mask)
    split = tmp_path / "split.csv"
    rows = [f"case{i:02d},{'test' if i == 9 else 'val' if i == 8 else 'train'}" for i in range(10)]
    split.write_text("file,split\n" + "\n".join(rows) + "\n")
    names = ["background", "lung", "tumour", "nodule"]
    with caplog.at_level(logging.WARNING, logger="lungseg.data.datamodule"):
        dm = make_dm(image_dir, mask_dir, split_file=str(split), class_names=names)
    assert dm.num_classes == 4
    assert (
        "Class has no pixel in the 8 training masks ('nodule' in 1 val mask and 1 test mask)"
    ) in caplog.text
    assert "data.group_pattern" in caplog.text

    caplog.clear()  # and a class in no mask at all (data.num_classes above the masks' ids)
    with caplog.at_level(logging.WARNING, logger="lungseg.data.datamodule"):
        make_dm(image_dir, mask_dir, split_file=str(split), num_classes=5)
    assert (
        "Classes have no pixel in the 8 training masks ('class_3' in 1 val mask and 1 test mask, "
        "'class_4' in no mask of any split)"
    ) in caplog.text

    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="lungseg.data.datamodule"):
        make_dm(*write_data(tmp_path / "clean", n=10)[:2])
    assert "training masks" not in caplog.text


@pytest.mark.parametrize(
    ("setting", "device", "pinned"),
    [(None, "cuda", True), (None, "cpu", False), (False, "cuda", False), (True, "cpu", True)],
)
def test_pin_memory_follows_the_training_device_unless_set(tmp_path, setting, device, pinned):
    """data.pin_memory=null pins batches exactly when they go to a CUDA device (pageable ones
    are copied synchronously, stalling the GPU's queue); a setting given wins."""
    image_dir, mask_dir, _ = write_data(tmp_path, n=12)
    dm = make_dm(image_dir, mask_dir, pin_memory=setting)
    dm.trainer = fake_trainer(world_size=1, global_rank=0, device=device)
    assert dm.train_dataloader().pin_memory is pinned
    assert dm.val_dataloader().pin_memory is pinned
    dm.trainer = None  # a loop of one's own: pinned where a GPU is there to train on
    alone = torch.cuda.is_available() if setting is None else setting
    assert dm.train_dataloader().pin_memory is alone


@pytest.mark.parametrize("persistent", [False, True])
def test_an_epoch_after_a_resume_is_the_uninterrupted_runs_epoch_with_workers(tmp_path, persistent):
    """Epoch 1 of a run that went on from epoch 0 and epoch 1 of a run resumed at epoch 1 (the
    count a checkpoint restores) shuffle and augment alike, with worker processes that are
    started anew each epoch and with persistent ones (data.persistent_workers), which keep
    their torch generators from epoch to epoch unless reseeded."""
    image_dir, mask_dir, _ = write_data(tmp_path, n=8)
    turn = {"train": [{"_target_": "albumentations.Affine", "rotate": [-30, 30], "p": 1.0}]}

    def epochs(start: int, count: int) -> list[list[tuple[list[str], torch.Tensor]]]:
        dm = make_dm(
            image_dir,
            mask_dir,
            split=[1.0, 0.0, 0.0],
            batch_size=2,
            num_workers=2,
            persistent_workers=persistent,
            augmentation=turn,
        )
        dm.load_state_dict({"train_epochs": start})
        loader = dm.train_dataloader()
        return [[(b["name"], b["image"]) for b in loader] for _ in range(count)]

    went_on, resumed = epochs(0, 2)[1], epochs(1, 1)[0]
    assert [names for names, _ in went_on] == [names for names, _ in resumed]
    assert all(torch.equal(a, b) for (_, a), (_, b) in zip(went_on, resumed, strict=True))


def test_the_epoch_seed_follows_the_runs_seed_where_it_differs_from_data_seed(
    tmp_path, monkeypatch
):
    """`seed=1 data.seed=42` and `seed=2 data.seed=42` (an ensemble on one split, README)
    must differ in shuffle order, augmentation and dropout, not only in their first weights;
    where the two seeds agree (the default, data.seed: ${seed}) the epochs draw as before."""
    image_dir, mask_dir, _ = write_data(tmp_path, n=6)
    dm = make_dm(image_dir, mask_dir, seed=42)

    def epoch_draw(run_seed):
        if run_seed is None:
            monkeypatch.delenv("PL_GLOBAL_SEED", raising=False)
        else:
            monkeypatch.setenv("PL_GLOBAL_SEED", str(run_seed))
        dm._train_epochs = 0
        dm._reseed()
        return torch.rand(4)

    assert not torch.equal(epoch_draw(1), epoch_draw(2))
    assert torch.equal(epoch_draw(1), epoch_draw(1))
    assert torch.equal(epoch_draw(42), epoch_draw(None))  # data.seed's own epochs, as before


def test_copies_under_other_names_in_other_splits_are_named(tmp_path, caplog):
    """case00.png and 'case00 (1).png', as downloads name copies, landed in train and test
    without a word (found by a tester): the test score counted an image trained on."""
    image_dir, mask_dir, _ = write_data(tmp_path, n=10)
    for folder in (image_dir, mask_dir):
        for i in (0, 1):
            shutil.copy(folder / f"case{i:02d}.png", folder / f"case{i:02d} (1).png")
    rows = [f"case{i:02d},train" for i in range(8)] + ["case08,val", "case09,test"]
    rows += ["case00 (1),test", "case01 (1),train"]  # one copy across splits, one within
    split = tmp_path / "split.csv"
    split.write_text("file,split\n" + "\n".join(rows) + "\n")
    with caplog.at_level(logging.WARNING, logger="lungseg"):
        make_dm(image_dir, mask_dir, split_file=str(split))
    warned = [r.getMessage() for r in caplog.records if "under another name" in r.getMessage()]
    assert len(warned) == 1
    assert warned[0].startswith("2 images are the same image as another under another name")
    assert "(1 group; e.g. case00 (train), case00 (1) (test))" in warned[0]
    caplog.clear()  # the copy in the same split as its original: nothing leaks
    split.write_text(split.read_text().replace("case00 (1),test", "case00 (1),train"))
    with caplog.at_level(logging.WARNING, logger="lungseg"):
        make_dm(image_dir, mask_dir, split_file=str(split))
    assert "under another name" not in caplog.text


def test_a_validation_split_without_foreground_is_named(tmp_path, caplog):
    """val/dice was 0 at every epoch and chose the first checkpoint, without a word."""
    image_dir, mask_dir, masks = write_data(tmp_path, n=10)
    for name in ("case08", "case09"):
        cv2.imwrite(str(mask_dir / f"{name}.png"), np.zeros_like(masks[name]))
    rows = [f"case{i:02d},{'val' if i >= 8 else 'test' if i >= 6 else 'train'}" for i in range(10)]
    split = tmp_path / "split.csv"
    split.write_text("file,split\n" + "\n".join(rows) + "\n")
    with caplog.at_level(logging.WARNING, logger="lungseg"):
        make_dm(image_dir, mask_dir, split_file=str(split))
    assert "None of the 2 validation masks holds a foreground pixel" in caplog.text
    assert "val/dice" in caplog.text and "data.split_file" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="lungseg"):
        make_dm(*write_data(tmp_path / "clean", n=10)[:2])
    assert "validation masks" not in caplog.text


def test_images_that_reach_the_network_flat_are_named(tmp_path, caplog):
    """16-bit CT saved with another offset (raw DICOM, CT + 1024) clipped to black under
    data.window and trained as blank images without a word (found by a tester); a blank file
    is named too. eval.py and predict.py name them the same way (InputCheck)."""
    image_dir, mask_dir, masks = write_data(tmp_path, n=10)
    rng = np.random.default_rng(0)
    for i in range(10):  # CT values -1000..400 stored + 32768; case08 + 1024; case09 blank
        hu = rng.integers(-1000, 400, (H, W))
        stored = hu + (1024 if i == 8 else 32768)
        if i == 9:
            stored = np.full((H, W), 32768)
        cv2.imwrite(str(image_dir / f"case{i:02d}.png"), stored.astype(np.uint16))
    window = {"window": [-1000, 400], "intensity_offset": 32768}
    with caplog.at_level(logging.WARNING, logger="lungseg"):
        make_dm(image_dir, mask_dir, **window)
    (warned,) = [r.getMessage() for r in caplog.records if "one flat grey" in r.getMessage()]
    assert warned.startswith("2 of the 10 images reach the network as one flat grey: ")
    assert "1 lies wholly outside data.window=[-1000, 400] (e.g. case08.png: stored" in warned
    assert "after data.intensity_offset=32768" in warned and "CT + 1024" in warned
    assert "1 holds one value in the file itself (e.g. case09.png: all 32768)" in warned
    caplog.clear()
    from lungseg.inference import InputCheck

    check = InputCheck({"bit_depths": [16], "normalize": "dataset", **window})
    for i in range(10):
        path = image_dir / f"case{i:02d}.png"
        check.see(path, cv2.imread(str(path), cv2.IMREAD_UNCHANGED))
    with caplog.at_level(logging.WARNING, logger="lungseg"):
        check.report()
    assert "2 of the 10 images reach the network as one flat grey" in caplog.text
    assert f"e.g. {image_dir / 'case08.png'}: stored values" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="lungseg"):
        make_dm(*write_data(tmp_path / "clean", n=10)[:2])
    assert "flat grey" not in caplog.text


def test_image_and_mask_folders_swapped_are_named(tmp_path):
    """Grey images read as index masks trained a 256-class network without a word (the
    values 0-255 have no gap for the class-gap check); found by a tester."""
    image_dir, mask_dir, _ = write_data(tmp_path, n=10)
    with pytest.raises(LungsegError, match=r"The masks hold \d+ different values .* look like "):
        make_dm(mask_dir, image_dir)
    with pytest.raises(LungsegError, match=r"not swapped\)\. For index masks of that many"):
        make_dm(mask_dir, image_dir)
    # 0/255 masks with soft edges (anti-aliased): binary, not swapped folders (review)
    rng = np.random.default_rng(0)
    image_dir, mask_dir, _ = write_data(tmp_path / "soft", n=10, sizes=[(160, 160)])
    for path in mask_dir.iterdir():
        mask = (cv2.imread(str(path), cv2.IMREAD_GRAYSCALE) > 0).astype(np.uint8) * 255
        edges = mask != cv2.erode(mask, np.ones((3, 3), np.uint8))
        mask[edges] = rng.integers(1, 255, int(edges.sum()))
        cv2.imwrite(str(path), mask)
    with pytest.raises(LungsegError, match=r"white masks with soft edges .* Set data.mask_mode=bi"):
        make_dm(image_dir, mask_dir)


def test_flat_images_are_told_apart_by_their_stored_values():
    """An image inside the window that the resize made flat was reported as lying outside
    it (found by review)."""
    from lungseg.data.transforms import flat_images_warning

    window, offset = [-1000, 400], 32768
    inside = flat_images_warning({"a.png": (32000.0, 33000.0)}, 5, window, offset)
    assert "1 loses its few other values to the resize" in inside and "outside" not in inside
    outside = flat_images_warning({"b.png": (0.0, 1400.0)}, 5, window, offset)
    assert "1 lies wholly outside data.window=[-1000, 400]" in outside
    assert flat_images_warning({}, 5, window, offset) is None
