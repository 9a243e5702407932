"""data.ignore_index: ignored mask pixels are left out of decoding's class count, the losses,
the metrics, eval.py's scores, and are what augmentation moves in from outside the image."""

import csv
import logging
import math
from pathlib import Path

import albumentations as A
import cv2
import numpy as np
import pytest
import torch
from test_datamodule import gray_image, label_map, make_dm, write_data
from test_evaluate import eval_cfg
from test_masks import VOC, palette_png

from lungseg.data.datamodule import CachedSegDataset, ForegroundSampler
from lungseg.data.device_augment import BatchAugment
from lungseg.data.folders import read_image
from lungseg.data.masks import IGNORE, decode_layers, decode_mask, ignore_value
from lungseg.data.transforms import build_augmentation, fill_masks_with
from lungseg.errors import LungsegError
from lungseg.evaluate import evaluate, image_metrics
from lungseg.inference import load_checkpoint, predict_probabilities
from lungseg.losses import CrossEntropyLoss, DiceCELoss, DiceLoss, FocalLoss, TverskyLoss
from lungseg.metrics import SegmentationMetrics
from lungseg.module import SegmentationModule
from lungseg.train import train

N, C, S, DROPPED = 3, 3, 8, 10  # images, classes, side, ignored pixels per image


def ignored_batch(seed=0):
    """logits (N, C, S, S), target with DROPPED ignored pixels in every image (image 0's
    class-2 pixels are all among them: an image without class 2 once they are left out), and
    the kept pixels of each as (N, C, P, 1) logits and (N, P, 1) targets: the same batch with
    the ignored pixels cut out."""
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(N, C, S, S, generator=g)
    target = torch.randint(0, 2, (N, S, S), generator=g)
    target[1:, :2] = 2
    target[0, 0, :3] = 2  # image 0's only class-2 pixels
    ignored = torch.zeros(N, S * S, dtype=torch.bool)
    for n in range(N):
        first = [0, 1, 2] if n == 0 else []
        others = [i for i in torch.randperm(S * S, generator=g).tolist() if i not in first]
        ignored[n, first + others[: DROPPED - len(first)]] = True
    ignored = ignored.view(N, S, S)
    marked = target.masked_fill(ignored, IGNORE)
    kept_logits = logits.permute(0, 2, 3, 1)[~ignored].view(N, -1, C).permute(0, 2, 1)[..., None]
    kept_target = target[~ignored].view(N, -1, 1)
    return logits, marked, kept_logits, kept_target


LOSSES = [
    lambda i: CrossEntropyLoss(ignore_index=i),
    lambda i: CrossEntropyLoss(class_weights=[0.2, 1.0, 3.0], label_smoothing=0.1, ignore_index=i),
    lambda i: DiceLoss(ignore_index=i),
    lambda i: DiceLoss(include_background=True, class_weights=[1, 2, 3], ignore_index=i),
    lambda i: DiceLoss(per_image=True, ignore_index=i),
    lambda i: DiceLoss(per_image=True, skip_empty=True, ignore_index=i),
    lambda i: DiceCELoss(class_weights=[0.5, 1, 2], per_image=True, ignore_index=i),
    lambda i: FocalLoss(gamma=2.0, class_weights=[0.2, 1.0, 3.0], ignore_index=i),
    lambda i: TverskyLoss(ignore_index=i),
]


@pytest.mark.parametrize("make", LOSSES)
def test_each_loss_with_ignored_pixels_is_the_loss_of_the_other_pixels(make):
    logits, marked, kept_logits, kept_target = ignored_batch()
    logits.requires_grad_(True)
    loss = make(IGNORE)(logits, marked)
    assert loss.item() == pytest.approx(make(None)(kept_logits, kept_target).item(), rel=1e-5)
    loss.backward()
    ignored = (marked == IGNORE).unsqueeze(1).expand_as(logits)
    assert logits.grad[ignored].abs().max() == 0  # nothing learnt from them
    assert logits.grad[~ignored].abs().max() > 0


@pytest.mark.parametrize("make", LOSSES)
def test_a_batch_of_ignored_pixels_only_gives_a_zero_loss_with_finite_gradients(make):
    logits = torch.randn(2, C, 4, 4, requires_grad=True)
    loss = make(IGNORE)(logits, torch.full((2, 4, 4), IGNORE))
    loss.backward()
    assert loss.item() == 0 and torch.isfinite(logits.grad).all()


def test_metrics_leave_ignored_pixels_out():
    logits, marked, kept_logits, kept_target = ignored_batch(1)
    names = ["background", "lung", "tumour"]
    ours = SegmentationMetrics(names, ignore_index=IGNORE)
    ours.update(logits.argmax(1), marked)
    cut = SegmentationMetrics(names)
    cut.update(kept_logits.argmax(1), kept_target)
    got, expected = ours.compute(), cut.compute()
    assert got.keys() == expected.keys()
    for key, value in expected.items():
        assert got[key] == pytest.approx(value, nan_ok=True), key
    kept = marked != IGNORE
    assert got["acc"] == pytest.approx((logits.argmax(1) == marked)[kept].float().mean().item())


def test_a_prediction_on_ignored_pixels_is_no_false_positive():
    target = torch.zeros(1, 4, 4, dtype=torch.long)
    target[0, 0] = IGNORE  # the top row: unknown
    pred = torch.zeros(1, 4, 4, dtype=torch.long)
    pred[0, 0] = 1  # class 1 predicted there only
    metrics = SegmentationMetrics(["background", "lesion"], ignore_index=IGNORE)
    metrics.update(pred, target)
    out = metrics.compute()
    assert out["acc"] == 1.0 and out["fp_empty"] == 0.0 and out["dice_background"] == 1.0
    assert math.isnan(out["dice_lesion"])  # in neither target nor prediction


def test_eval_image_metrics_take_ignored_pixels_for_neither_prediction_nor_target():
    target = np.zeros((20, 24), np.uint8)
    target[5:12, 6:14] = 1
    target[:, 18:] = IGNORE  # a band of unknown pixels
    pred = np.where(target == IGNORE, 1, target)  # class 1 predicted all over the band
    got = image_metrics(pred, target, 2, IGNORE)[1]
    assert got["dice"] == got["precision"] == got["specificity"] == 1.0
    assert got["hd95"] == 0.0
    assert got["pred_pixels"] == got["target_pixels"] == 7 * 8
    pred[0, 0] = 1  # one false positive among the 20 * 18 - 56 kept negatives
    assert image_metrics(pred, target, 2, IGNORE)[1]["specificity"] == pytest.approx(
        1 - 1 / (20 * 18 - 56)
    )


def test_decoding_marks_the_ignore_value_in_every_mode(tmp_path):
    index = np.array([[0, 1, 255], [255, 2, 0]], np.uint8)
    assert decode_mask(index, "index", tmp_path / "a.png", ignore=255).tolist() == [
        [0, 1, IGNORE],
        [IGNORE, 2, 0],
    ]
    # 0 and the ignore value alone do not look like a black/white mask (which is refused)
    only = np.array([[0, 255]], np.uint8)
    assert decode_mask(only, "index", tmp_path / "a.png", ignore=255).tolist() == [[0, IGNORE]]
    with pytest.raises(LungsegError, match="looks like a binary"):
        decode_mask(only, "index", tmp_path / "a.png")
    # a stored value other than 255, 16-bit
    wide = np.array([[0, 1, 9000]], np.uint16)
    assert decode_mask(wide, "index", tmp_path / "a.png", ignore=9000).tolist() == [[0, 1, IGNORE]]
    # binary: the value before black/white is decided (0/128/255: 128 unknown)
    grey = np.array([[0, 128, 255, 255]], np.uint8)
    assert decode_mask(grey, "binary", tmp_path / "a.png", ignore=128).tolist() == [
        [0, IGNORE, 1, 1]
    ]
    # palette: a colour, which is then no unknown colour
    rgb = np.array([[[0, 0, 0], [0, 255, 0], [255, 255, 255]]], np.uint8)
    palette = [[0, 0, 0], [0, 255, 0]]
    white = ignore_value([255, 255, 255], "palette")
    assert decode_mask(rgb, "palette", tmp_path / "a.png", palette, ignore=white).tolist() == [
        [0, 1, IGNORE]
    ]
    with pytest.raises(LungsegError, match="not in data.palette"):
        decode_mask(rgb, "palette", tmp_path / "a.png", palette)
    # a folder list: a pixel any file ignores
    layers = [np.array([[0, 255, 128]], np.uint8), np.array([[255, 0, 0]], np.uint8)]
    paths = [tmp_path / "l" / "a.png", tmp_path / "r" / "a.png"]
    assert decode_layers(layers, paths, "index", ignore=128).tolist() == [[2, 1, IGNORE]]


@pytest.mark.parametrize(
    ("setting", "mode", "match"),
    [
        (0, "index", "0 is the background"),
        ("void", "binary", "at least 1"),
        (True, "index", "at least 1"),
        ([255, 0], "palette", r"\[R, G, B\]"),
        ([0, 0, 300], "palette", r"\[R, G, B\]"),
    ],
)
def test_a_bad_ignore_index_is_named(setting, mode, match):
    with pytest.raises(LungsegError, match=match):
        ignore_value(setting, mode)
    assert ignore_value(7, "palette") == (7, 7, 7)


# A palette PNG's palette as Pascal VOC's: classes 0-2, index 255 (the border) cream
VOC_PALETTE = [*VOC[:3], *[[0, 0, 0]] * 252, [224, 224, 192]]


def write_voc_like(root, n=8, size=(40, 48), blank=True, class_id=1, paletted=False):
    """Index masks 0/``class_id`` with a 255 border a few pixels wide (Pascal VOC's "void")
    and, with ``blank``, one mask whose only non-zero pixels are the border (the last); with
    ``paletted`` saved as palette PNGs (VOC_PALETTE), as Pascal VOC's are. Returns
    (image_dir, mask_dir, masks)."""
    image_dir, mask_dir = root / "images", root / "masks"
    image_dir.mkdir(parents=True)
    mask_dir.mkdir(parents=True)
    masks = {}
    for i in range(n):
        mask = (label_map(i, *size) > 0).astype(np.uint8) * class_id
        if blank and i == n - 1:
            mask[:] = 0
        edge = cv2.morphologyEx(mask, cv2.MORPH_GRADIENT, np.ones((3, 3), np.uint8)) > 0
        mask[edge] = 255
        mask[:2] = 255
        cv2.imwrite(str(image_dir / f"case{i:02d}.png"), gray_image(np.minimum(mask, 1), i))
        if paletted:
            palette_png(mask_dir / f"case{i:02d}.png", mask, VOC_PALETTE)
        else:
            cv2.imwrite(str(mask_dir / f"case{i:02d}.png"), mask)
        masks[f"case{i:02d}"] = mask
    return image_dir, mask_dir, masks


def test_an_ignore_value_is_no_class_when_the_classes_are_counted(tmp_path):
    # without the setting: refused as before, the errors now naming it
    other_dir, other_masks, _ = write_voc_like(tmp_path / "other", blank=False)
    with pytest.raises(LungsegError, match=r"class ids 0-1 and the value 255.*ignore_index=255"):
        make_dm(other_dir, other_masks)
    image_dir, mask_dir, masks = write_voc_like(tmp_path / "voc")
    with pytest.raises(LungsegError, match=r"looks like a binary.*ignore_index=255"):
        make_dm(image_dir, mask_dir)
    dm = make_dm(image_dir, mask_dir, ignore_index=255, split=[0.5, 0.25, 0.25])
    assert dm.num_classes == 2 and dm.class_names == ["background", "class_1"]
    assert dm.data_info()["ignore_index"] == 255
    item = next(i for i in (dm.train_dataset[k] for k in range(4)) if i["name"] in masks)
    assert set(item["mask"].unique().tolist()) == {0, 1, IGNORE}
    assert np.array_equal(item["mask"].numpy(), masks[item["name"]])
    for wrong, match in [
        ({"num_classes": 3, "ignore_index": 2}, "a class id"),
        ({"ignore_index": 255, "soft_masks": True}, "soft_masks"),
    ]:
        with pytest.raises(LungsegError, match=match):
            make_dm(image_dir, mask_dir, **wrong)
    palette = {"background": [0, 0, 0], "lung": [0, 255, 0]}
    with pytest.raises(LungsegError, match="a colour of data.palette"):
        make_dm(image_dir, mask_dir, mask_mode="palette", palette=palette, ignore_index=[0, 255, 0])


def ignore_warnings(caplog):
    return [r.getMessage() for r in caplog.records if "data.ignore_index is" in r.getMessage()]


def test_an_ignore_value_no_mask_holds_is_warned_of_with_the_values_they_hold(tmp_path, caplog):
    """data.ignore_index=3 on 0/1/2 masks (a typo) left no pixel out, in silence."""
    image_dir, mask_dir, _ = write_data(tmp_path / "index", n=8)
    with caplog.at_level(logging.WARNING, logger="lungseg.data.datamodule"):
        assert make_dm(image_dir, mask_dir, ignore_index=3).num_classes == 3
    (said,) = ignore_warnings(caplog)
    assert "data.ignore_index is 3, but none of the 8 masks holds that value" in said
    assert "the masks hold the values 0-2" in said and "Most likely a typo" in said
    # binary masks 0/255 whose unlabelled area is 128: the stored values, one mask's
    image_dir, mask_dir, masks = write_data(tmp_path / "binary", n=8, mode="binary")
    for name, mask in masks.items():
        sparse = mask * 255
        sparse[:6] = 128
        cv2.imwrite(str(mask_dir / f"{name}.png"), sparse)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="lungseg.data.datamodule"):
        make_dm(image_dir, mask_dir, mask_mode="binary", ignore_index=127)
    (said,) = ignore_warnings(caplog)
    assert f"{mask_dir / 'case00.png'}, for one, holds 0, 128, 255" in said
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="lungseg.data.datamodule"):
        make_dm(image_dir, mask_dir, mask_mode="binary", ignore_index=128)
    assert not ignore_warnings(caplog)


@pytest.mark.parametrize("ignore", [2, 128, 1000])
def test_a_value_above_the_class_ids_names_the_ignore_index_not_the_mask(tmp_path, ignore):
    """VOC masks (0/1/2, a 255 border) with data.ignore_index set wrong were told to fix the
    mask, whose 255 was "out of range"."""
    indices = np.array([[0, 1, 2, 255]], np.uint8)
    grey = tmp_path / "grey.png"
    cv2.imwrite(str(grey), indices)
    for path in (grey, palette_png(tmp_path / "p.png", indices, VOC_PALETTE)):
        with pytest.raises(LungsegError) as info:
            decode_mask(read_image(path), "index", path, ignore=ignore)
        message = str(info.value)
        assert f"255 is not data.ignore_index ({ignore}): if 255 marks pixels" in message
        assert "set data.ignore_index=255" in message and "out of range" not in message


def test_an_ignore_index_below_the_largest_class_id_is_named_as_the_gap(tmp_path):
    """Masks 0/1/2 with data.ignore_index=1: the error said "the values 1 occur in no mask"
    and offered data.ignore_index=2."""
    image_dir, mask_dir, _ = write_data(tmp_path, n=8)
    with pytest.raises(LungsegError) as info:
        make_dm(image_dir, mask_dir, ignore_index=1)
    message = str(info.value)
    assert "data.ignore_index=1 takes the value 1 out of the classes" in message
    assert "the masks hold the values 0, 2 besides 1" in message
    assert "Choose an ignore value above every class id" in message
    assert "occur in no mask" not in message and "ignore_index=2" not in message


def test_voc_masks_without_the_setting_lead_with_the_ignore_index(tmp_path):
    """Index masks of class ids and a 255 border: data.ignore_index=255 comes first; palette
    PNGs get no grey palette (which reads their colours, not the indices)."""
    image_dir, mask_dir, _ = write_voc_like(tmp_path / "grey", blank=False)
    with pytest.raises(LungsegError) as info:
        make_dm(image_dir, mask_dir)
    message = str(info.value)
    assert message.startswith("The masks hold the class ids 0-1 and the value 255")
    assert message.index("set data.ignore_index=255") < message.index("data.num_classes=256")
    assert "data.palette" not in message
    # classes 0/2 (class 1 in no mask): not a run of class ids, so the general message
    image_dir, mask_dir, _ = write_voc_like(tmp_path / "p", blank=False, class_id=2, paletted=True)
    with pytest.raises(LungsegError) as info:
        make_dm(image_dir, mask_dir)
    message = str(info.value)
    assert "the values 1, 3-254 occur in no mask" in message
    assert "data.palette" not in message and "set data.ignore_index=255" in message
    # a mask at a time: 16-bit, or with data.num_classes
    for raw, k in [
        (np.array([[0, 1, 2, 65535]], np.uint16), None),
        (np.array([[0, 1, 2, 255]], np.uint8), 3),
    ]:
        top = int(raw.max())
        with pytest.raises(LungsegError) as info:
            decode_mask(raw, "index", tmp_path / "m.png", num_classes=k)
        assert str(info.value).startswith(
            f"Mask {tmp_path / 'm.png'} holds the value {top} above its class ids (0, 1, 2): "
            f"if {top} marks pixels to leave out of training and scoring"
        )
        assert f"set data.ignore_index={top}." in str(info.value)


def test_palette_mode_names_the_ignore_index_for_an_unknown_colour(tmp_path):
    """A VOC palette PNG read by its colours: the border's colour (224, 224, 192) was named
    as not in data.palette, without data.ignore_index; and data.ignore_index=255 (the index)
    reads as the grey (255, 255, 255)."""
    indices = np.zeros((6, 6), np.uint8)
    indices[1:5, 1:5], indices[2:4, 2:4] = 255, 1
    path = palette_png(tmp_path / "m.png", indices, VOC_PALETTE)
    raw = read_image(path)
    with pytest.raises(LungsegError) as info:
        decode_mask(raw, "palette", path, VOC[:3])
    message = str(info.value)
    assert "If (224, 224, 192) marks unlabelled pixels" in message
    assert "data.ignore_index=[224,224,192] leaves them out of training and scoring" in message
    with pytest.raises(LungsegError) as info:
        decode_mask(raw, "palette", path, VOC[:3], ignore=ignore_value(255, "palette"))
    message = str(info.value)
    assert "read in palette mode as the colour (255, 255, 255)" in message
    assert "shows its index 255 as (224, 224, 192): palette mode takes a colour, " in message
    assert "data.ignore_index=[224,224,192], or set data.mask_mode=index" in message
    expected = np.where(indices == 255, IGNORE, indices)  # either fix reads the mask
    cream = ignore_value([224, 224, 192], "palette")
    decoded = decode_mask(raw, "palette", path, VOC[:3], ignore=cream)
    np.testing.assert_array_equal(decoded, expected)
    np.testing.assert_array_equal(decode_mask(raw, "index", path, ignore=255), expected)
    # an RGB mask of one unknown colour, another ignore colour set: named too
    rgb = np.array(VOC[:3], np.uint8)[np.minimum(indices, 2)]
    rgb[indices == 255] = (255, 255, 255)
    with pytest.raises(LungsegError) as info:
        decode_mask(rgb, "palette", tmp_path / "c.png", VOC[:3], ignore=(9, 9, 9))
    assert "data.ignore_index=[255,255,255] leaves them out" in str(info.value)
    assert "(data.ignore_index is [9, 9, 9])" in str(info.value)


def test_a_mask_of_ignored_pixels_only_is_no_foreground_slice():
    blank = np.zeros((4, 4), np.uint8)
    void = blank.copy()
    void[0] = IGNORE
    lung = blank.copy()
    lung[1] = 1
    images = [np.zeros((4, 4, 1), np.float32)] * 3
    info = {"normalize": "none", "mean": None, "std": None}
    dataset = CachedSegDataset(["a", "b", "c"], images, [blank, void, lung], A.Compose([]), info)
    assert ForegroundSampler(dataset, 2, 0.5, IGNORE).foreground == [2]
    assert ForegroundSampler(dataset, 2, 0.5).foreground == [1, 2]  # 255 a class without it


SHIFT = {"_target_": "albumentations.Affine", "translate_px": {"x": 8, "y": 0}, "p": 1.0}


def test_augmentation_fills_what_it_moves_in_from_outside_with_the_ignore_label(tmp_path):
    compose = fill_masks_with(build_augmentation([SHIFT, {**SHIFT, "fill_mask": 3}]), IGNORE)
    assert [t.fill_mask for t in compose.transforms] == [IGNORE, 3]  # a chosen fill is kept
    image_dir, mask_dir, _ = write_voc_like(tmp_path)
    augmentation = {"train": [SHIFT], "eval": []}
    for ignore, fill in [(255, IGNORE), (None, 0)]:
        dm = make_dm(
            image_dir,
            mask_dir,
            num_classes=None if ignore else 256,
            ignore_index=ignore,
            augmentation=augmentation,
        )
        mask = dm.train_dataset[0]["mask"].numpy()
        assert (mask[2:, :8] == fill).all()  # the left 8 columns came from outside
    # on the device (augmentation=device): the same
    batch = {"image": torch.zeros(1, 1, 8, 8), "mask": torch.ones(1, 8, 8, dtype=torch.uint8)}
    settings = {"affine": {"p": 1.0, "translate": [0.5, 0.5]}}
    moved = BatchAugment(settings, {"normalize": "none"}, mask_fill=IGNORE)(batch)["mask"]
    assert set(moved.unique().tolist()) == {1, IGNORE}
    assert moved.dtype == torch.uint8
    plain = BatchAugment(settings, {"normalize": "none"})(batch)["mask"]
    assert set(plain.unique().tolist()) == {0, 1}


def test_training_and_eval_with_an_ignore_label(tmp_path, make_cfg):
    """Masks of 0/1 with a 255 border train a 2-class model; the checkpoint keeps the setting
    and eval.py scores the kept pixels only."""
    image_dir, mask_dir, masks = write_voc_like(tmp_path / "data", n=10)
    cfg = make_cfg(
        f"data.image_dir={image_dir}",
        f"data.mask_dir={mask_dir}",
        "data.mask_mode=index",
        "data.ignore_index=255",
        "data.image_size=[40,48]",
    )
    train(cfg)
    ckpt = next((tmp_path / "run" / "checkpoints").glob("*.ckpt"))
    model = load_checkpoint(ckpt, torch.device("cpu"))
    info = model.hparams.data_info
    assert info["num_classes"] == 2 and info["ignore_index"] == 255
    # the training images too (split=all): the scores, not the model, are tested
    data = [f"data.image_dir={image_dir}", f"data.mask_dir={mask_dir}", "split=all"]
    summary = evaluate(eval_cfg(tmp_path, ckpt, *data))
    assert summary["n_images"] == len(masks)
    with (tmp_path / "eval" / "per_image.csv").open() as f:
        rows = {row["image"]: row for row in csv.DictReader(f)}
    for stem, mask in masks.items():
        raw = read_image(Path(image_dir) / f"{stem}.png")
        pred = predict_probabilities(model, [raw])[0].argmax(0)
        kept = mask != 255
        p, t = (pred == 1) & kept, (mask == 1) & kept
        assert int(rows[stem]["pred_pixels_class_1"]) == p.sum()
        assert int(rows[stem]["target_pixels_class_1"]) == t.sum()
        both = p.sum() + t.sum()
        dice = 2 * (p & t).sum() / both if both else 1.0
        assert float(rows[stem]["dice_class_1"]) == pytest.approx(dice)


def test_a_loss_without_an_ignore_index_argument_is_named_when_pixels_are_ignored():
    net = {"_target_": "lungseg.models.unet.UNet", "in_channels": 1, "num_classes": 2, "width": 4}
    optimizer = {"_target_": "torch.optim.Adam", "lr": 1e-3}
    info = {"class_names": ["background", "lesion"], "ignore_index": 255}
    loss = {"_target_": "torch.nn.MSELoss"}
    with pytest.raises(LungsegError, match="takes no ignore_index argument"):
        SegmentationModule(net, loss, optimizer, data_info=info)
    SegmentationModule(net, loss, optimizer, data_info={**info, "ignore_index": None})
    focal = {"_target_": "lungseg.losses.FocalLoss"}
    module = SegmentationModule(net, focal, optimizer, data_info=info)
    assert module.loss_fn.ignore_index == IGNORE
    assert module.val_metrics.ignore_index == IGNORE
