"""Folder prediction: original sizes, the training encoding, overwrite protection, safe names,
TTA, and the two command lines."""

import errno
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
from conftest import ROOT
from hydra import compose, initialize_config_dir
from test_inference import CPU, save_variant, trained_checkpoints

import lungseg.predict
from lungseg.data.folders import read_image
from lungseg.data.masks import decode_mask
from lungseg.errors import LungsegError
from lungseg.inference import load_checkpoint, predict_probabilities
from lungseg.predict import output_paths, output_stem, predict

PALETTE = [[0, 0, 0], [0, 255, 0], [255, 0, 0]]


@pytest.fixture(scope="session")
def checkpoints(tmp_path_factory, demo_dir):
    return trained_checkpoints(tmp_path_factory, demo_dir)


@pytest.fixture
def inputs(tmp_path) -> Path:
    """Mixed formats, sizes, bit depths and channel counts."""
    rng = np.random.default_rng(0)
    folder = tmp_path / "in"
    folder.mkdir()
    ramp = np.linspace(0, 1, 53)[None, :] * np.ones((37, 1))
    cv2.imwrite(str(folder / "gray8.png"), rng.integers(0, 255, (48, 48), dtype=np.uint8))
    cv2.imwrite(str(folder / "ct16.tif"), (ramp * 60000).astype(np.uint16))
    cv2.imwrite(str(folder / "colour.jpg"), rng.integers(0, 255, (30, 50, 3), dtype=np.uint8))
    cv2.imwrite(str(folder / "wide.bmp"), rng.integers(0, 255, (20, 70), dtype=np.uint8))
    (folder / "notes.txt").write_text("not an image\n")
    return folder


def predict_cfg(ckpt, input_dir, output_dir, *overrides):
    with initialize_config_dir(str(ROOT / "conf"), version_base="1.3"):
        return compose(
            "predict",
            overrides=[
                f"ckpt_path={ckpt}",
                f"input_dir={input_dir}",
                f"output_dir={output_dir}",
                "progress_bar=false",
                *overrides,
            ],
        )


def snapshot(folder: Path) -> dict[str, tuple[bytes, int]]:
    return {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in sorted(folder.iterdir())}


def read_only(folder: Path, how: str, monkeypatch) -> Path:
    """Make ``folder``, one this user cannot write to: by its mode 555 (skipped as root, who
    writes anyway, as in CI), or as os.access reports it (as for a read-only disk; runs as
    root too)."""
    folder.mkdir()
    if how == "mode":
        if os.geteuid() == 0:
            pytest.skip("root writes to a folder of mode 555")
        folder.chmod(0o555)
    else:
        access = os.access
        monkeypatch.setattr(
            os,
            "access",
            lambda path, mode, **kw: Path(path) != folder and access(path, mode, **kw),
        )
    return folder


@pytest.mark.parametrize("name", ["palette", "binary", "index"])
def test_masks_at_original_size_in_the_training_encoding(tmp_path, checkpoints, inputs, name):
    out = tmp_path / "out"
    written = predict(predict_cfg(checkpoints[name], inputs, out))
    stems = ["colour", "ct16", "gray8", "wide"]
    assert sorted(p.name for p in written) == sorted(
        n for s in stems for n in (f"{s}.png", f"{s}_overlay.png")
    )
    # and the hidden mark that keeps a recursive=true search out of the folder
    assert sorted(p.name for p in out.iterdir()) == sorted(
        [".lungseg-predictions", *(p.name for p in written)]
    )
    model = load_checkpoint(checkpoints[name], CPU)
    info = model.hparams.data_info
    for stem in stems:
        raw = read_image(next(inputs.glob(f"{stem}.*")))
        expected = predict_probabilities(model, [raw])[0].argmax(0)
        stored = read_image(out / f"{stem}.png")
        decoded = decode_mask(
            stored, name, out / f"{stem}.png", info["palette"], info["num_classes"]
        )
        assert decoded.shape == raw.shape[:2]
        assert np.array_equal(decoded, expected)
        if name == "palette":
            assert stored.shape == (*raw.shape[:2], 3)
            assert {tuple(c) for c in stored.reshape(-1, 3)} <= {tuple(c) for c in PALETTE}
        else:
            assert stored.ndim == 2 and stored.dtype == np.uint8
            assert set(np.unique(stored)) <= ({0, 255} if name == "binary" else {0, 1})
        overlay = read_image(out / f"{stem}_overlay.png")
        assert overlay.shape == (*raw.shape[:2], 3) and overlay.dtype == np.uint8


@pytest.mark.parametrize(
    ("name", "pixel"), [("palette", PALETTE[1]), ("binary", 255), ("index", 1)]
)
def test_each_encoding_writes_its_own_values(tmp_path, checkpoints, inputs, name, pixel):
    """A model forced to predict class 1 everywhere: the mask pixels tell the encodings apart."""
    ckpt = save_variant(checkpoints[name], tmp_path / "forced.ckpt", force_class=1)
    predict(predict_cfg(ckpt, inputs, tmp_path / "out"))
    stored = read_image(tmp_path / "out" / "gray8.png")
    assert stored.shape[:2] == (48, 48)
    assert (stored == np.array(pixel, np.uint8)).all()


def test_one_image_file(tmp_path, checkpoints, inputs):
    """input_dir may name one image: its mask and overlay directly in output_dir, the same
    mask as when its folder is predicted; another file, or an output onto it, is refused."""
    written = predict(predict_cfg(checkpoints["index"], inputs / "ct16.tif", tmp_path / "one"))
    assert sorted(p.name for p in written) == ["ct16.png", "ct16_overlay.png"]
    predict(predict_cfg(checkpoints["index"], inputs, tmp_path / "all"))
    assert np.array_equal(
        read_image(tmp_path / "one" / "ct16.png"), read_image(tmp_path / "all" / "ct16.png")
    )
    with pytest.raises(LungsegError, match=r"notes.txt is a file but not an image lungseg"):
        predict(predict_cfg(checkpoints["index"], inputs / "notes.txt", tmp_path / "txt"))
    with pytest.raises(LungsegError, match="1 output file would replace input images"):
        predict(predict_cfg(checkpoints["index"], inputs / "gray8.png", inputs))
    with pytest.raises(LungsegError, match="into 1 folder that input_dir .* reads images from"):
        predict(predict_cfg(checkpoints["index"], inputs / "ct16.tif", inputs))
    assert not (tmp_path / "txt").exists() and not (inputs / "ct16_overlay.png").exists()


def test_masks_kept_beside_their_images_are_not_predicted(tmp_path, checkpoints, inputs, caplog):
    """Images and masks in one folder (gray8.png, gray8_mask.png, as Kaggle's LGG set): the
    masks were predicted as images, into gray8_mask.png named like the ground truth (found by
    a tester). A file named *_mask without its image beside it, or named by itself, is an
    image; mask_suffixes=[] predicts every file."""
    cv2.imwrite(str(inputs / "gray8_mask.png"), np.zeros((48, 48), np.uint8))
    cv2.imwrite(str(inputs / "lone_mask.png"), np.zeros((48, 48), np.uint8))
    with caplog.at_level(logging.INFO, logger="lungseg"):
        written = predict(predict_cfg(checkpoints["index"], inputs, tmp_path / "out"))
    names = sorted(p.name for p in written if not p.name.endswith("_overlay.png"))
    assert names == ["colour.png", "ct16.png", "gray8.png", "lone_mask.png", "wide.png"]
    assert "1 file left out: the masks of images beside them (e.g. gray8_mask.png for " in (
        caplog.text
    )
    written = predict(
        predict_cfg(checkpoints["index"], inputs, tmp_path / "all", "mask_suffixes=[]")
    )
    assert "gray8_mask.png" in {p.name for p in written}
    one = predict(predict_cfg(checkpoints["index"], inputs / "gray8_mask.png", tmp_path / "one"))
    assert sorted(p.name for p in one) == ["gray8_mask.png", "gray8_mask_overlay.png"]


def test_existing_outputs_are_never_overwritten_by_default(tmp_path, checkpoints, inputs):
    out = tmp_path / "out"
    cfg = predict_cfg(checkpoints["palette"], inputs, out)
    predict(cfg)
    before = snapshot(out)
    with pytest.raises(LungsegError, match="8 output files already exist") as error:
        predict(cfg)
    assert "'colour.png'" in str(error.value) and "overwrite=true" in str(error.value)
    assert snapshot(out) == before
    # one old output left: the check comes before anything is written
    for path in out.iterdir():
        if path.name not in ("wide_overlay.png", ".lungseg-predictions"):
            path.unlink()
    with pytest.raises(LungsegError, match="1 output file already exists in .*'wide_overlay.png'"):
        predict(cfg)
    assert sorted(p.name for p in out.iterdir()) == [".lungseg-predictions", "wide_overlay.png"]
    # overlays=false: the masks alone (a 4000-px X-ray's overlay took 4.9 MB against its mask's
    # 20 kB); an earlier overlay there is not one of its outputs, and stays as it was
    masks = predict(predict_cfg(checkpoints["palette"], inputs, out, "overlays=false"))
    assert sorted(p.name for p in masks) == ["colour.png", "ct16.png", "gray8.png", "wide.png"]
    assert (out / "wide_overlay.png").read_bytes() == before["wide_overlay.png"][0]
    for path in masks:
        path.unlink()
    # nor do an image named like another's overlay and that image clash
    named = tmp_path / "named"
    named.mkdir()
    for name in ("scan.png", "scan_overlay.png"):
        shutil.copy(inputs / "gray8.png", named / name)
    both = predict(predict_cfg(checkpoints["palette"], named, tmp_path / "o", "overlays=false"))
    assert sorted(p.name for p in both) == ["scan.png", "scan_overlay.png"]
    (out / "wide_overlay.png").write_bytes(b"stale")
    predict(predict_cfg(checkpoints["palette"], inputs, out, "overwrite=true"))
    after = snapshot(out)
    assert after.keys() == before.keys()
    assert all(after[n][0] == before[n][0] for n in before)  # same model, same outputs again


def test_a_folder_of_the_users_images_is_never_an_output_folder(tmp_path, checkpoints, inputs):
    """output_dir=<a training image folder>: with overwrite=true the masks replaced images of
    the same names, and new masks and overlays went among the images (found by a tester)."""
    images = tmp_path / "train_images"
    shutil.copytree(inputs, images)
    before = snapshot(images)
    for extra in ([], ["overwrite=true"]):
        with pytest.raises(LungsegError, match=r"holds 4 image files that predict.py did not"):
            predict(predict_cfg(checkpoints["palette"], inputs, images, *extra))
    assert snapshot(images) == before


def test_names_cannot_leave_the_output_folder(tmp_path, checkpoints):
    out = tmp_path / "nest" / "out"
    for stem in ["../../evil", "a/b", "..\\..\\x", "C:\\x", "..", ".hidden", "", "a\x00b", "ok ü"]:
        safe = output_stem(stem)
        assert "/" not in safe and "\\" not in safe and not safe.startswith(".") and safe
        assert (out / f"{safe}.png").resolve().parent == out.resolve()
    assert output_stem("ok ü") == "ok ü"

    folder = tmp_path / "in"
    folder.mkdir()
    image = np.full((20, 24), 128, np.uint8)
    for name in ["sub\\..\\..\\evil.png", "a:b?.png", "-rf .png", "..png"]:  # ..png: hidden
        cv2.imencode(".png", image)[1].tofile(folder / name)
    victim = tmp_path / "victim.png"
    victim.write_bytes(b"keep me")
    out.mkdir(parents=True)
    (out / ".lungseg-predictions").touch()  # an earlier output folder of predict.py
    (out / "-rf .png").symlink_to(victim)  # a link where an output goes: replaced, not followed
    outside = {p for p in tmp_path.rglob("*") if out not in p.parents}
    predict(predict_cfg(checkpoints["palette"], folder, out, "overwrite=true"))
    assert {p for p in tmp_path.rglob("*") if out not in p.parents} == outside
    assert victim.read_bytes() == b"keep me"
    assert sorted(p.name for p in out.iterdir()) == sorted(
        [".lungseg-predictions", "-rf .png", "-rf _overlay.png", "a_b_.png", "a_b__overlay.png"]
        + ["sub_.._.._evil.png", "sub_.._.._evil_overlay.png"]
    )
    assert not (out / "-rf .png").is_symlink()


def test_clashing_names_and_missing_settings(tmp_path, checkpoints, inputs):
    folder = tmp_path / "clash"
    folder.mkdir()
    for name in ["a:b.png", "a_b.tif", "x.png", "x_overlay.png"]:
        cv2.imwrite(str(folder / name), np.zeros((8, 8), np.uint8))
    with pytest.raises(LungsegError, match="written twice: 'a:b.png and a_b.tif → a_b.png'"):
        output_paths(sorted(folder.iterdir()), tmp_path / "out")
    with pytest.raises(LungsegError, match="x_overlay.png"):
        predict(predict_cfg(checkpoints["palette"], folder, tmp_path / "out"))
    assert not (tmp_path / "out").exists()
    with pytest.raises(LungsegError, match="output_dir is input_dir"):
        predict(predict_cfg(checkpoints["palette"], folder, folder))
    with pytest.raises(LungsegError, match="output_dir is not set"):
        predict(predict_cfg(checkpoints["palette"], folder, "null"))
    with pytest.raises(LungsegError, match="ckpt_path is not set"):
        predict(predict_cfg("null", inputs, tmp_path / "out"))


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("batch_size=0", r"batch_size is 0; give a whole number of images per batch"),
        ("overlay_alpha=2", r"overlay_alpha is 2; give the opacity"),
        ("tta_flips=[diagonal]", r"tta_flips \['diagonal'\] holds"),
        # was: 'no', a string, is true, and replaced the files in output_dir
        ("overwrite=no", r"overwrite is 'no', which Hydra keeps as text .* Give overwrite=false"),
    ],
)
def test_bad_settings_stop_before_the_output_folder_is_made(
    tmp_path, checkpoints, inputs, override, message
):
    # batch_size and tta_flips were checked only once the loop started, after the output
    # folder had been created (empty).
    out = tmp_path / "out"
    with pytest.raises(LungsegError, match=message):
        predict(predict_cfg(checkpoints["palette"], inputs, out, "tta=true", override))
    assert not out.exists()


def test_outputs_never_land_in_a_folder_that_input_dir_reads(tmp_path, checkpoints):
    """Was: input_dir='scans/*' output_dir=scans wrote each folder's masks and overlays among
    its JPEG images (only outputs that would replace PNG inputs were refused), and the next
    run read them as images. The same for a folder read with recursive=true below output_dir."""
    scans, work = tmp_path / "scans", tmp_path / "work"
    for path in (
        scans / "p01/a.jpg",
        scans / "p02/b.jpg",
        scans / "p02/ct/c.jpg",
        work / "ct/ct/d.jpg",
    ):
        path.parent.mkdir(parents=True, exist_ok=True)
        cv2.imwrite(str(path), np.full((40, 40), 128, np.uint8))
    before = sorted(tmp_path.rglob("*"))
    ckpt = checkpoints["palette"]
    cases = [
        (scans / "*", scans, "false", [scans / "p01", scans / "p02"]),
        (scans / "*", scans, "true", [scans / "p01", scans / "p02", scans / "p02/ct"]),
        (work / "ct", work, "true", [work / "ct"]),  # ct/ct/d.jpg → work/ct/d.png
    ]
    for input_dir, output_dir, recursive, folders in cases:
        listed = ", ".join(f"'{f}'" for f in folders)
        with pytest.raises(LungsegError) as error:
            predict(predict_cfg(ckpt, input_dir, output_dir, f"recursive={recursive}"))
        assert str(error.value) == (
            f"output_dir {output_dir} would put masks and overlays into {len(folders)} "
            f"folder{'s' if len(folders) > 1 else ''} that input_dir {input_dir} reads images "
            f"from: {listed}. They would mix with your images, and the next run would read "
            f"them as images. Nothing was written. Choose an output_dir outside these folders, "
            f"e.g. a new folder beside {output_dir}."
        )
        assert sorted(tmp_path.rglob("*")) == before
    # a new folder beside the input folders, or inside one read with recursive=true, is fine
    for input_dir, output_dir, stems in (
        (scans / "*", scans / "masks", ["p01/a", "p02/b", "p02/ct/c"]),
        (work / "ct", work / "ct" / "masks", ["ct/d"]),
    ):
        written = predict(predict_cfg(ckpt, input_dir, output_dir, "recursive=true"))
        assert sorted(p.relative_to(output_dir).as_posix() for p in written) == sorted(
            f"{stem}{end}" for stem in stems for end in (".png", "_overlay.png")
        )


def test_an_image_folder_inside_input_dir_is_refused_as_output_dir(tmp_path, checkpoints):
    """Was: input_dir=images output_dir=images/p01 recursive=true wrote the outputs of p00
    and p02 into p01/p00 and p01/p02, left p01's own images unpredicted (the search leaves
    output_dir out), and marked p01 as an output folder, which hid it from later recursive
    runs (training then found masks without their images). An output_dir inside a folder
    read with recursive=true must be new, an earlier output folder or without image files."""
    images = tmp_path / "data" / "images"
    for path in ("p00/a.png", "p01/b.png", "p01/c.png", "p01/ct/d.png", "p02/e.png"):
        (images / path).parent.mkdir(parents=True, exist_ok=True)
        cv2.imwrite(str(images / path), np.full((40, 40), 128, np.uint8))
    (images / "notes").mkdir()
    (images / "notes" / "readme.txt").write_text("no images here\n")
    before = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    ckpt = checkpoints["palette"]
    pattern = tmp_path / "data" / "*"
    cases = [
        (images, images / "p01", 3, f"input_dir {images}"),
        (images, images / "p01" / "ct", 1, f"input_dir {images}"),
        (pattern, images / "p01", 3, f"{images}, a folder that input_dir {pattern} matches,"),
    ]
    for input_dir, output_dir, held, where in cases:
        they, them = ("it", "it") if held == 1 else ("they", "them")
        with pytest.raises(LungsegError) as error:
            predict(predict_cfg(ckpt, input_dir, output_dir, "recursive=true"))
        assert str(error.value) == (
            f"output_dir {output_dir} is a folder inside {where} read with recursive=true, and "
            f"it holds {held} image file{'s' if held > 1 else ''} (in it or its sub-folders). "
            f"The search leaves output_dir out, so {they} would not be predicted, and the "
            f"hidden .lungseg-predictions file that marks it as an output folder would hide "
            f"{them} from later recursive=true runs, training included. Nothing was written. "
            f"Choose an output_dir outside input_dir, e.g. a new folder beside {images}, or a "
            f"new folder inside it."
        )
        assert {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()} == before
    # accepted: a folder without image files, and an earlier output folder (run again)
    stems = ["p00/a", "p01/b", "p01/c", "p01/ct/d", "p02/e"]
    for output_dir, overrides in ((images / "notes", []), (images / "notes", ["overwrite=true"])):
        written = predict(predict_cfg(ckpt, images, output_dir, "recursive=true", *overrides))
        assert sorted(p.relative_to(output_dir).as_posix() for p in written) == sorted(
            f"{stem}{end}" for stem in stems for end in (".png", "_overlay.png")
        )


@pytest.mark.parametrize("how", ["mode", "access"])
def test_an_output_folder_that_cannot_be_written_is_named_before_any_work(
    tmp_path, checkpoints, inputs, monkeypatch, how
):
    """Was: a PermissionError traceback, once the model was loaded and a batch predicted."""
    out = tmp_path / "shared" / "masks"
    cfg = predict_cfg(checkpoints["palette"], inputs, out)
    read_only(tmp_path / "shared", how, monkeypatch)
    monkeypatch.setattr(lungseg.predict, "load_from_config", lambda cfg: pytest.fail("loaded"))
    with pytest.raises(LungsegError) as error:
        predict(cfg)
    assert str(error.value) == (
        f"Cannot write to {out}: {tmp_path / 'shared'} is not writable for this user (no "
        f"permission, or a read-only disk). Nothing was written. Choose an output_dir you can "
        f"write to, on a disk with room."
    )
    assert not out.exists()


def test_a_failed_write_names_the_file(tmp_path, checkpoints, inputs, monkeypatch):
    """An OSError on writing (a permission the check above cannot see, a full disk) is a
    LungsegError that names the file, not a traceback."""

    def denied(path, pixels):
        raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(path))

    monkeypatch.setattr(lungseg.predict, "write_image", denied)
    out = tmp_path / "out"
    with pytest.raises(LungsegError) as error:
        predict(predict_cfg(checkpoints["palette"], inputs, out))
    assert str(error.value) == (
        f"Could not write {out / 'colour.png'}: Permission denied. Choose an output_dir you "
        f"can write to, on a disk with room."
    )


def test_unreadable_first_image_leaves_no_output_folder(tmp_path, checkpoints, inputs):
    (inputs / "colour.jpg").write_bytes(b"not a jpeg")  # the first image, sorted by name
    out = tmp_path / "out"
    with pytest.raises(LungsegError, match="colour.jpg could not be decoded"):
        predict(predict_cfg(checkpoints["palette"], inputs, out))
    assert not out.exists()


def test_strict_false_skips_the_images_that_cannot_be_read(tmp_path, checkpoints, inputs, caplog):
    (inputs / "colour.jpg").write_bytes(b"not a jpeg")
    (inputs / "wide.bmp").write_bytes(b"")
    out = tmp_path / "out"
    with caplog.at_level(logging.WARNING):
        written = predict(predict_cfg(checkpoints["palette"], inputs, out, "strict=false"))
    assert sorted(p.name for p in written) == sorted(
        ["ct16.png", "ct16_overlay.png", "gray8.png", "gray8_overlay.png"]
    )
    assert "2 images that cannot be read are left out (strict=false)" in caplog.text
    assert "colour.jpg could not be decoded" in caplog.text and "wide.bmp" in caplog.text


def test_strict_false_with_no_image_read_is_an_error(tmp_path, checkpoints, inputs):
    """Was: exit 0 and "0 masks and their overlays written" when no image could be read."""
    for name in ("colour.jpg", "ct16.tif", "gray8.png", "wide.bmp"):
        (inputs / name).write_bytes(b"broken")
    out = tmp_path / "out"
    with pytest.raises(LungsegError) as error:
        predict(predict_cfg(checkpoints["palette"], inputs, out, "strict=false"))
    assert str(error.value).startswith(
        f"None of the 4 images of input_dir {inputs} can be read, e.g. "
        f"{inputs / 'colour.jpg'} could not be decoded as an image: "
    )
    assert str(error.value).endswith(
        " Nothing was written: strict=false leaves out the images that cannot be read, and "
        "here that is every one. Point input_dir at your images, or fix or convert the files."
    )
    with pytest.raises(LungsegError, match=r"^The one image of input_dir .*wide.bmp cannot be"):
        predict(predict_cfg(checkpoints["palette"], inputs / "wide.bmp", out, "strict=false"))
    assert not out.exists()


def test_images_of_another_bit_depth_than_the_training_ones_are_named(
    tmp_path, checkpoints, inputs, caplog
):
    """The checkpoints were trained on 8-bit images: the 16-bit one is predicted, on another
    scale than the network learned, and one warning names it (before, nothing was said)."""
    assert load_checkpoint(checkpoints["palette"], CPU).hparams.data_info["bit_depths"] == [8]
    with caplog.at_level(logging.WARNING):
        written = predict(predict_cfg(checkpoints["palette"], inputs, tmp_path / "out"))
    assert len(written) == 8
    warned = [r.getMessage() for r in caplog.records if "-bit (e.g." in r.getMessage()]
    assert len(warned) == 1
    assert warned[0].startswith("1 of the images are 16-bit (e.g. ") and "ct16.tif" in warned[0]
    assert "trained on 8-bit images" in warned[0]
    # An 8-bit image stored in 16 bits (x 257) reaches the network as the 8-bit one: not
    # named (was, found by a new-user tester)
    widened = tmp_path / "widened"
    widened.mkdir()
    shutil.copy(inputs / "ct16.tif", widened)
    gray = cv2.imread(str(inputs / "gray8.png"), cv2.IMREAD_UNCHANGED)
    cv2.imwrite(str(widened / "gray16.png"), gray.astype(np.uint16) * 257)
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        predict(predict_cfg(checkpoints["palette"], widened, tmp_path / "out3"))
    warned = [r.getMessage() for r in caplog.records if "-bit (e.g." in r.getMessage()]
    assert len(warned) == 1 and warned[0].startswith("1 of the images are 16-bit (e.g. ")
    assert "ct16.tif" in warned[0]
    # A model that normalises each image by itself (no window) takes any depth alike.
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        predict(predict_cfg(checkpoints["binary"], inputs, tmp_path / "out2"))
    assert "-bit (e.g." not in caplog.text


def test_tta_is_wired_through(tmp_path, checkpoints, inputs):
    out = tmp_path / "out"
    flips = "tta_flips=[horizontal,vertical]"
    predict(predict_cfg(checkpoints["palette"], inputs, out, "tta=true", flips))
    model = load_checkpoint(checkpoints["palette"], CPU)
    raw = read_image(inputs / "ct16.tif")
    expected = predict_probabilities(model, [raw], ["horizontal", "vertical"])[0].argmax(0)
    decoded = decode_mask(read_image(out / "ct16.png"), "palette", out, PALETTE, 3)
    assert np.array_equal(decoded, expected)


def test_an_ensemble_is_wired_through(tmp_path, checkpoints, inputs):
    """ckpt_path=[a,b]: the masks are the argmax of the members' mean softmax."""
    from lungseg.inference import Ensemble

    first = checkpoints["palette"]
    other = save_variant(first, tmp_path / "other.ckpt", force_class=2)
    out = tmp_path / "out"
    predict(predict_cfg(f"[{first},{other}]", inputs, out))
    members = [load_checkpoint(path, CPU) for path in (first, other)]
    raw = read_image(inputs / "ct16.tif")
    expected = predict_probabilities(Ensemble(members, [first, other]), [raw])[0].argmax(0)
    decoded = decode_mask(read_image(out / "ct16.png"), "palette", out, PALETTE, 3)
    assert np.array_equal(decoded, expected)
    alone = predict_probabilities(members[0], [raw])[0].argmax(0)
    assert not np.array_equal(decoded, alone)  # the second member counted


def test_command_lines(tmp_path, checkpoints, inputs):
    """`python eval.py` and `python predict.py`, run side by side (each spends seconds
    importing torch): exit 0 and their files written."""
    runs = {
        "eval": [
            "eval.py",
            f"ckpt_path={checkpoints['palette']}",
            f"hydra.run.dir={tmp_path / 'eval'}",
            "progress_bar=false",
        ],
        "predict": [
            "predict.py",
            f"ckpt_path={checkpoints['binary']}",
            f"input_dir={inputs}",
            f"output_dir={tmp_path / 'out'}",
            f"hydra.run.dir={tmp_path / 'predict'}",
        ],
    }
    procs = {
        name: subprocess.Popen(
            [sys.executable, str(ROOT / script), *overrides],
            cwd=tmp_path,
            env={**os.environ, "PYTHONPATH": str(ROOT)},
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for name, (script, *overrides) in runs.items()
    }
    for name, proc in procs.items():
        _, stderr = proc.communicate(timeout=300)
        assert proc.returncode == 0, f"{name}: {stderr}"
    assert (tmp_path / "eval" / "per_image.csv").is_file()
    assert (tmp_path / "eval" / "summary.json").is_file()
    assert len(list((tmp_path / "out").glob("*_overlay.png"))) == 4
    assert (tmp_path / "predict" / "predict.log").is_file()
