import json
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import onnxruntime as ort
import pytest
import torch
from conftest import ROOT, oriented
from hydra import compose, initialize_config_dir
from test_predict import read_only

import lungseg.export
from lungseg.data import transforms
from lungseg.data.folders import read_image
from lungseg.errors import LungsegError
from lungseg.export import CHECK_BATCH, TRACE_BATCH, export, load_network, write_model
from lungseg.models.segnet import SegNet
from lungseg.train import train


def readme_prepare(path: str, info: dict) -> np.ndarray:
    """The README's preprocessing for the ONNX model, from the exported JSON's data_info alone
    (numpy and OpenCV, no lungseg): an image file → (C, H, W) float32."""
    # keeps 16 bits, drops alpha, turns the image by its EXIF orientation (IMREAD_UNCHANGED
    # would not); imdecode: cv2.imread cannot read a TIFF with an orientation tag
    image = cv2.imdecode(np.fromfile(path, np.uint8), cv2.IMREAD_ANYDEPTH | cv2.IMREAD_ANYCOLOR)
    if image.ndim == 3:  # OpenCV reads colour as BGR(A)
        to = cv2.COLOR_BGR2GRAY if info["in_channels"] == 1 else cv2.COLOR_BGR2RGB
        image = cv2.cvtColor(image[..., :3], to)
    image = image.reshape(*image.shape[:2], -1)
    image = np.repeat(image, info["in_channels"] // image.shape[2], axis=2)  # gray → RGB
    h, w = info["image_size"]
    smaller = h <= image.shape[0] and w <= image.shape[1]
    image = cv2.resize(image, (w, h), interpolation=cv2.INTER_AREA if smaller else cv2.INTER_LINEAR)
    image = image.reshape(h, w, -1)
    if info["median_blur"] > 1:
        channels = [np.ascontiguousarray(image[..., c]) for c in range(image.shape[2])]
        image = np.dstack([cv2.medianBlur(c, info["median_blur"]) for c in channels])
    if info["window"]:  # e.g. CT in HU: clip to the window, scale to [0, 1]
        lo, hi = info["window"]
        x = (np.clip(image.astype(np.float32) - info["intensity_offset"], lo, hi) - lo) / (hi - lo)
    else:  # 8/16-bit to [0, 1]; float images as they are
        x = image.astype(np.float32) / (np.iinfo(image.dtype).max if image.dtype.kind == "u" else 1)
    if info["normalize"] == "dataset":
        x = (x - np.float32(info["mean"])) / np.float32(info["std"])
    elif info["normalize"] == "image":
        x = (x - x.mean((0, 1))) / np.maximum(x.std((0, 1)), 1e-6)
    return x.astype(np.float32).transpose(2, 0, 1)


CT_WINDOW = {"window": [-1000.0, 400.0], "intensity_offset": 32768.0}
RGB = {"in_channels": 3, "mean": [0.5, 0.4, 0.3], "std": [0.2, 0.2, 0.3]}


@pytest.mark.parametrize(
    ("image", "orientation", "settings"),
    [
        ("ct16.png", None, {**CT_WINDOW, "median_blur": 3}),
        ("ct16.png", None, {"normalize": "image", "image_size": [48, 40]}),  # enlarged: LINEAR
        ("rgb8.png", None, RGB),
        ("rgb8.png", None, {"median_blur": 5, "normalize": "none"}),
        # an EXIF orientation, as cameras and phones write it: lungseg turns the image (was:
        # the JSON's recipe and the README read it as stored)
        ("ct16.png", 6, CT_WINDOW),
        ("rgb8.jpg", 8, RGB),
        ("rgb8.png", 3, {"median_blur": 3}),
    ],
)
def test_readme_preprocessing_matches_lungseg(tmp_path, image, orientation, settings):
    rng = np.random.default_rng(0)
    pixels = {
        "ct16": rng.integers(31000, 34000, (37, 29), dtype=np.uint16),
        "rgb8": rng.integers(0, 256, (37, 29, 3), dtype=np.uint8),
    }[Path(image).stem]
    path = tmp_path / image
    bgr = pixels[..., ::-1] if pixels.ndim == 3 else pixels  # OpenCV writes BGR
    if orientation is None:
        cv2.imwrite(str(path), bgr)
    else:
        path.write_bytes(oriented(path.suffix, bgr, orientation))
    info = {
        "in_channels": 1,
        "image_size": [16, 24],
        "median_blur": 0,
        "window": None,
        "intensity_offset": 0.0,
        "normalize": "dataset",
        "mean": [0.45],
        "std": [0.25],
        **settings,
    }
    expected = transforms.normalize(transforms.preprocess(read_image(path), info), info)
    np.testing.assert_allclose(
        readme_prepare(str(path), info), expected.transpose(2, 0, 1), atol=1e-5
    )


@pytest.fixture
def checkpoint(make_cfg):
    """Train a tiny run of an architecture and return its best checkpoint."""

    def make(model: str, *overrides: str) -> Path:
        metrics = train(make_cfg(f"model={model}", "test_after_fit=false", *overrides))
        return Path(metrics["best_checkpoint"])

    return make


def export_cfg(*overrides: str):
    with initialize_config_dir(str(ROOT / "conf"), version_base="1.3"):
        return compose("export", overrides=list(overrides))


@pytest.mark.parametrize("model", ["unet", "fcn", "segnet", "deeplab"])
def test_onnx_and_pt2_exports_run_like_pytorch(checkpoint, demo_dir, model):
    ckpt = checkpoint(model, "data.median_blur=3")
    record = export(export_cfg(f"ckpt_path={ckpt}", "format=onnx"))
    onnx_path = ckpt.with_suffix(".onnx")  # default: next to the checkpoint
    assert record["max_abs_diff"] <= 1e-4
    saved = json.loads(onnx_path.with_name(onnx_path.name + ".json").read_text())
    assert saved == json.loads(json.dumps(record))
    assert saved["postprocess"] == {"min_size": 0.0, "threshold": None, "min_confidence": 0.0}
    assert saved["tta_flips"] == []  # the training default: none
    # lungseg turns JPEG and PNG images by their EXIF orientation: so must a reader of the JSON
    assert "turned as its EXIF orientation tag says" in saved["preprocessing"][0]
    info = saved["data_info"]
    assert info["class_names"] == ["background", "lung", "tumour"] and info["median_blur"] == 3
    assert saved["input"]["shape"] == ["batch", 1, 32, 32]
    assert not list(ckpt.parent.glob("*.data")), "weights must be inside the .onnx file"

    # The README's recipe, from the JSON alone, prepares images as lungseg does ...
    paths = sorted((demo_dir / "images").glob("*.png"))[:5]
    batch = np.stack([readme_prepare(str(p), info) for p in paths])
    lungseg = [
        transforms.normalize(transforms.preprocess(read_image(p), info), info) for p in paths
    ]
    np.testing.assert_allclose(batch, np.stack(lungseg).transpose(0, 3, 1, 2), atol=1e-5)
    # ... and onnxruntime gives PyTorch's logits for a batch size it was not traced with.
    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    logits = session.run(["logits"], {"images": batch})[0]
    net, _ = load_network(export_cfg(f"ckpt_path={ckpt}"))
    with torch.no_grad():
        expected = net(torch.from_numpy(batch)).numpy()
    assert logits.shape == (5, 3, 32, 32)
    np.testing.assert_allclose(logits, expected, atol=1e-4)

    # torch.export's format, SegNet included (TorchScript cannot take it), from the same
    # checkpoint: loaded with torch alone, any batch size, PyTorch's logits.
    record = export(export_cfg(f"ckpt_path={ckpt}", "format=pt2"))
    pt2_path = ckpt.with_suffix(".pt2")
    assert record["format"] == "pt2" and record["model"] == pt2_path.name
    assert record["max_abs_diff"] <= 1e-4 and record["data_info"] == info
    assert json.loads(pt2_path.with_name(pt2_path.name + ".json").read_text())["format"] == "pt2"
    exported = torch.export.load(str(pt2_path)).module()
    with torch.no_grad():
        np.testing.assert_allclose(exported(torch.from_numpy(batch)).numpy(), expected, atol=1e-4)
        for size in (1, TRACE_BATCH, CHECK_BATCH + 4):
            assert exported(torch.randn(size, 1, 32, 32)).shape == (size, 3, 32, 32)


def test_torchscript_export_has_a_free_batch_axis_and_is_checked(checkpoint, tmp_path, monkeypatch):
    ckpt = checkpoint("unet")
    output = tmp_path / "exported" / "unet.pt"
    record = export(export_cfg(f"ckpt_path={ckpt}", "format=torchscript", f"output={output}"))
    assert record["max_abs_diff"] <= 1e-4 and record["format"] == "torchscript"
    assert (tmp_path / "exported" / "unet.pt.json").is_file()
    scripted = torch.jit.load(str(output))
    for batch in (1, TRACE_BATCH, CHECK_BATCH + 2):
        assert scripted(torch.randn(batch, 1, 32, 32)).shape == (batch, 3, 32, 32)

    output.unlink()
    run_exported = lungseg.export.run_exported
    monkeypatch.setattr(lungseg.export, "run_exported", lambda *args: run_exported(*args) + 1)
    with pytest.raises(LungsegError, match=r"differ from PyTorch's by up to 1 .*tolerance 0.0001"):
        export(
            export_cfg(
                f"ckpt_path={ckpt}", "format=torchscript", f"output={output}", "overwrite=true"
            )
        )
    assert not output.exists(), "a model that failed the check must not be left behind"
    assert sorted(p.name for p in output.parent.iterdir()) == ["unet.pt.json"]


def test_existing_files_are_never_replaced_or_removed_by_default(checkpoint, monkeypatch):
    # They were: output=<the checkpoint> wrote the model over it, and an export whose check
    # failed then deleted the file it had written over.
    ckpt = checkpoint("unet")
    mine = ckpt.with_name("mine.pt")
    mine.write_bytes(b"my model")
    kept = {p: p.read_bytes() for p in (ckpt, mine)}
    names = sorted(p.name for p in ckpt.parent.iterdir())
    run = ["format=torchscript", f"ckpt_path={ckpt}"]
    with pytest.raises(LungsegError, match="output is ckpt_path .* would replace the checkpoint"):
        export(export_cfg(*run, f"output={ckpt}", "overwrite=true"))
    # a file no export wrote (no export's JSON beside it: a run's split.csv, curves.png, the
    # user's own model) is never replaced, whatever overwrite says (found by a tester)
    for extra in ([], ["overwrite=true"]):
        with pytest.raises(LungsegError, match=r"mine.pt exists and is not a model an earlier"):
            export(export_cfg(*run, f"output={mine}", *extra))
    assert {p: p.read_bytes() for p in (ckpt, mine)} == kept
    ours = ckpt.with_name("ours.pt")
    export(export_cfg(*run, f"output={ours}"))
    exported = ours.read_bytes()
    names = sorted(p.name for p in ckpt.parent.iterdir())
    with pytest.raises(LungsegError, match=r"ours.pt and .*ours.pt.json already exist. Nothing"):
        export(export_cfg(*run, f"output={ours}"))
    monkeypatch.setattr(lungseg.export, "run_exported", lambda *args: np.zeros(1))
    with pytest.raises(LungsegError, match="logits of shape"):
        export(export_cfg(*run, f"output={ours}", "overwrite=true"))
    assert ours.read_bytes() == exported and ckpt.read_bytes() == kept[ckpt]
    assert sorted(p.name for p in ckpt.parent.iterdir()) == names  # nor a partial file
    monkeypatch.undo()
    export(export_cfg(*run, f"output={ours}", "overwrite=true"))  # an export's own: replaced
    assert ckpt.read_bytes() == kept[ckpt] and mine.read_bytes() == b"my model"


def test_an_output_ending_in_ckpt_is_refused_whatever_overwrite_says(checkpoint):
    # Was: output=<another checkpoint> overwrite=true replaced that training checkpoint (which
    # eval.py, predict.py and resuming read) with the exported model, for onnx and torchscript.
    ckpt = checkpoint("unet")
    other = ckpt.with_name("other.ckpt")
    other.write_bytes(ckpt.read_bytes())
    kept = {p: p.read_bytes() for p in (ckpt, other)}
    names = sorted(p.name for p in ckpt.parent.iterdir())
    for fmt, suffix in (("onnx", ".onnx"), ("pt2", ".pt2"), ("torchscript", ".pt")):
        for output in (other, ckpt.with_name("new.CKPT")):
            for overwrite in ("true", "false"):
                cfg = export_cfg(
                    f"ckpt_path={ckpt}",
                    f"format={fmt}",
                    f"output={output}",
                    f"overwrite={overwrite}",
                )
                with pytest.raises(LungsegError) as error:
                    export(cfg)
                assert str(error.value) == (
                    f"output={output} ends in {output.suffix}, the suffix of training checkpoints "
                    f"(which eval.py, predict.py and resuming training read): an export never "
                    f"writes one, whatever overwrite says. Nothing was written. Give "
                    f"output={output.with_suffix(suffix)}, format={fmt}'s suffix."
                )
    assert {p: p.read_bytes() for p in kept} == kept
    assert sorted(p.name for p in ckpt.parent.iterdir()) == names


def test_the_json_beside_the_model_never_replaces_a_file_it_did_not_write(checkpoint):
    # Was: output=<run>/metrics (no suffix, accepted for onnx and torchscript) with
    # overwrite=true replaced the run's metrics.json with the export's JSON; a checkpoint
    # named like <output>.json went the same way.
    ckpt = checkpoint("unet")
    run_dir = ckpt.parent.parent
    metrics = run_dir / "metrics.json"
    theirs = ckpt.parent / "best.json"
    theirs.write_text('{"model": "best"}')  # not an export's: no format nor data_info
    kept = {p: p.read_bytes() for p in (ckpt, metrics, theirs)}
    names = sorted(p.name for p in run_dir.rglob("*"))
    for output, other in ((run_dir / "metrics", "metrics.pt"), (ckpt.parent / "best", "best.pt")):
        for overwrite in ("true", "false"):
            over = f"overwrite={overwrite}"
            cfg = export_cfg(f"ckpt_path={ckpt}", "format=torchscript", f"output={output}", over)
            info = output.with_name(output.name + ".json")
            with pytest.raises(LungsegError) as error:
                export(cfg)
            assert str(error.value) == (
                f"{info} exists and is not an earlier export's JSON file for {output.name}, where "
                f"export would write the model's description (<model file>.json): it could be a "
                f"run's or checkpoint's file, so it is not replaced, whatever overwrite says. "
                f"Nothing was written. Give another output=<file>, e.g. "
                f"output={output.with_name(other)}, or move {info} away."
            )
    assert {p: p.read_bytes() for p in kept} == kept
    assert sorted(p.name for p in run_dir.rglob("*")) == names

    # An earlier export's own JSON is replaced with overwrite=true, as before, and a file
    # with the model's suffix whose JSON is someone else's gets another name suggested.
    mine = ckpt.parent / "mine"
    run = [f"ckpt_path={ckpt}", "format=torchscript", f"output={mine}"]
    export(export_cfg(*run))
    assert json.loads((ckpt.parent / "mine.json").read_text())["model"] == "mine"
    with pytest.raises(LungsegError, match=r"mine and .*mine.json already exist. Nothing was"):
        export(export_cfg(*run))
    assert export(export_cfg(*run, "overwrite=true"))["model"] == "mine"
    model = ckpt.parent / "lungs.pt"
    (ckpt.parent / "lungs.pt.json").write_text("not JSON")
    with pytest.raises(LungsegError, match=r"e.g. output=.*lungs-export.pt, or move .*lungs.pt.j"):
        export(export_cfg(f"ckpt_path={ckpt}", "format=torchscript", f"output={model}"))
    assert not model.exists()


@pytest.mark.parametrize("how", ["mode", "access"])
def test_a_folder_that_cannot_be_written_is_named_not_blamed_on_the_format(
    checkpoint, tmp_path, monkeypatch, how
):
    """Was: "UNet could not be exported to torchscript ... Export it with format=onnx instead"
    for a folder the user may not write to (a shared models folder, where the model goes
    next to the checkpoint by default)."""
    shared = read_only(tmp_path / "shared", how, monkeypatch)
    ckpt = checkpoint("unet")
    cfg = export_cfg("format=torchscript", f"ckpt_path={ckpt}", f"output={shared / 'unet.pt'}")
    fix = (
        "Give output=<file> in a folder you can write to, on a disk with room (without it, the "
        "model is written next to the checkpoint)."
    )
    with pytest.raises(LungsegError) as error:
        export(cfg)
    assert str(error.value) == (
        f"Cannot write to {shared}: it is not writable for this user (no permission, or a "
        f"read-only disk). Nothing was written. {fix}"
    )
    if how == "mode":
        return
    # a write that fails all the same (the check cannot see every cause), as torch reports it
    monkeypatch.undo()
    denied = "[enforce fail at inline_container.cc:747] . open file failed with strerror: Perm"

    def save(*args):
        raise RuntimeError(denied)

    monkeypatch.setattr(torch.jit, "save", save)
    with pytest.raises(LungsegError) as error:
        export(cfg)
    assert str(error.value) == (
        f"The exported model could not be written to {shared} (RuntimeError: {denied}). {fix}"
    )
    assert list(shared.iterdir()) == []


def test_segnet_to_torchscript_is_a_clear_error(tmp_path):
    # torch 2.13 can neither trace MaxUnpool2d (pytorch/pytorch#189298) nor script it.
    net = SegNet(in_channels=1, num_classes=3, width=4).eval()
    example = torch.randn(TRACE_BATCH, 1, 32, 32)
    with pytest.raises(
        LungsegError,
        match="SegNet could not be exported to torchscript.*with format=onnx or format=pt2 inst",
    ):
        write_model(net, example, tmp_path / "segnet.pt", "torchscript", opset=18)


def test_missing_onnx_packages_name_the_extra(monkeypatch):
    monkeypatch.setattr(
        lungseg.export, "find_spec", lambda name: None if name == "onnxruntime" else "found"
    )
    with pytest.raises(
        LungsegError, match=r'onnxruntime is not installed.*pip install -e "\.\[onnx\]"'
    ):
        lungseg.export.check_onnx_packages()


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["format=tflite"], "choose format=onnx .*, format=pt2 .* or format=torchscript"),
        (["format=pt2", "ckpt_path=a.ckpt", "output=m.bin"], r"end in .pt2 .* output=m.bin.pt2"),
        # was: an ONNX file named m.pt, which torch.jit.load could not read
        (
            ["ckpt_path=a.ckpt", "output=m.pt"],
            r"output=m.pt ends in .pt, the suffix of format=torchscript files, but format=onnx. "
            r"Give output=m.onnx or format=torchscript.",
        ),
        (["format=pt2", "ckpt_path=a.ckpt", "output=m.pt"], r"Give output=m.pt2 or format=torch"),
        (["format=torchscript", "ckpt_path=a.ckpt", "output=m.onnx"], "output=m.pt or format=onnx"),
        (["tolerance=abc"], "tolerance is 'abc'; give the largest accepted difference"),
        ([], "ckpt_path is not set"),
        (["ckpt_path=[a.ckpt,b.ckpt]"], "export writes one network, so give one checkpoint"),
        # was: 'no', a string, is true, and replaced the model file
        (["overwrite=no"], r"overwrite is 'no', which Hydra keeps as text .* Give overwrite=false"),
    ],
)
def test_bad_settings_are_clear_errors(overrides, message):
    with pytest.raises(LungsegError, match=message):
        export(export_cfg(*overrides))


def test_cli_error_is_one_line_and_leaves_the_working_directory_clean(tmp_path):
    result = subprocess.run(
        [sys.executable, str(ROOT / "export.py"), f"ckpt_path={tmp_path}/x.ckpt", "format=tflite"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 1
    assert result.stderr.startswith("lungseg: error: format='tflite'"), result.stderr
    assert "Traceback" not in result.stderr
    assert list(tmp_path.iterdir()) == []  # no outputs/, .hydra/ or log file
