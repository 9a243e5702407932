import logging
import time
from pathlib import Path

import cv2
import numpy as np
import pytest

from lungseg.data.folders import read_image, write_image
from lungseg.data.masks import MASK_MODES, decode_mask, default_colors, encode_mask
from lungseg.errors import LungsegError

PATH = Path("masks/case 1.png")
PALETTE = [[0, 0, 0], [0, 255, 0], [255, 0, 0], [128, 128, 128]]
INDEX = np.array([[0, 1, 2, 3], [3, 2, 1, 0]], np.uint8)


def test_index_mask():
    decoded = decode_mask(INDEX, "index", PATH, num_classes=4)
    assert decoded.dtype == np.uint8
    np.testing.assert_array_equal(decoded, INDEX)


def test_16_bit_index_mask_from_file(tmp_path):
    write_image(tmp_path / "m.png", INDEX.astype(np.uint16))
    raw = read_image(tmp_path / "m.png")
    assert raw.dtype == np.uint16
    decoded = decode_mask(raw, "index", tmp_path / "m.png", num_classes=4)
    assert decoded.dtype == np.uint8
    np.testing.assert_array_equal(decoded, INDEX)


def test_index_out_of_range_names_values_and_fix():
    raw = np.array([[0, 1, 7, 5, 5]], np.uint8)
    with pytest.raises(
        LungsegError,
        match=r"case 1\.png holds class ids 5, 7 .*below 3.*data\.num_classes to at least 8",
    ):
        decode_mask(raw, "index", PATH, num_classes=3)


@pytest.mark.parametrize("num_classes", [None, 301])
def test_index_above_255_is_an_error(num_classes):
    with pytest.raises(LungsegError, match=r"case 1\.png holds class ids 300 .*at most 256"):
        decode_mask(np.array([[0, 300]], np.uint16), "index", PATH, num_classes=num_classes)


def test_gray_stored_as_rgb_is_accepted_in_index_mode():
    decoded = decode_mask(np.repeat(INDEX[:, :, None], 3, axis=2), "index", PATH, num_classes=4)
    np.testing.assert_array_equal(decoded, INDEX)


def test_colour_mask_in_index_mode_is_an_error():
    rgb = np.array(PALETTE, np.uint8)[INDEX]
    with pytest.raises(LungsegError, match=r"case 1\.png is a colour image.*mask_mode=palette"):
        decode_mask(rgb, "index", PATH)


@pytest.mark.parametrize("num_classes", [None, 2])
def test_0_255_mask_in_index_mode_suggests_binary(num_classes):
    raw = np.array([[0, 255]], np.uint8)
    with pytest.raises(LungsegError, match=r"case 1\.png holds only the values 0 and 255.*binary"):
        decode_mask(raw, "index", PATH, num_classes=num_classes)


def test_binary_mask():
    for values in ([0, 255, 255, 0], [0, 1, 1, 0], [0, 1, 2, 0]):  # 0/255, 0/1, two lungs 1/2
        gray = np.array([values], np.uint8)
        np.testing.assert_array_equal(decode_mask(gray, "binary", PATH), [[0, 1, 1, 0]])
    np.testing.assert_array_equal(
        decode_mask(np.array([[0, 7, 65535]], np.uint16), "binary", PATH), [[0, 0, 1]]
    )
    rgb = np.zeros((1, 3, 3), np.uint8)
    rgb[0, 1, 1] = 255  # only green set
    rgb[0, 2] = 255
    np.testing.assert_array_equal(decode_mask(rgb, "binary", PATH), [[0, 1, 1]])


def test_grey_level_binary_masks_are_cut_halfway_with_one_warning_per_folder(caplog):
    """JPEG noise and anti-aliased edges (values between 0 and 255) are not foreground: 0 /
    non-zero would grow every mask by its blurred edge and speckle the background."""
    jpeg_like = np.array([[0, 3, 120, 128, 251, 255]], np.uint8)
    folder = Path(f"/data/grey-{id(caplog)}")
    with caplog.at_level(logging.WARNING):
        for name in ("a.jpg", "b.jpg"):
            decoded = decode_mask(jpeg_like, "binary", folder / name)
            np.testing.assert_array_equal(decoded, [[0, 0, 0, 1, 1, 1]])
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and str(folder / "a.jpg") in warnings[0]
    assert "half of 255" in warnings[0] and "0/255 or 0/1 PNGs" in warnings[0]


@pytest.mark.parametrize("name", ["case 1.jpg", "case 1.JPEG", "case 1.jpeg"])
def test_jpeg_index_mask_is_an_error(name):
    """Lossy compression changes class ids along every edge: 1 next to 0 becomes 0, 1, 2 ...,
    which index mode would read as classes."""
    with pytest.raises(LungsegError) as info:
        decode_mask(INDEX, "index", Path("masks") / name, num_classes=4)
    message = str(info.value)
    assert f"Mask masks/{name} is a JPEG" in message
    assert "Save index masks as PNG" in message and "data.mask_mode=binary" in message
    # PNG index masks and JPEG binary masks are read as before
    np.testing.assert_array_equal(decode_mask(INDEX, "index", PATH, num_classes=4), INDEX)
    binary = decode_mask(np.array([[0, 255]], np.uint8), "binary", Path("masks") / name)
    np.testing.assert_array_equal(binary, [[0, 1]])


def ellipses(levels, size=48):
    """(size, size) uint8 mask: background 0, a left ellipse of levels[1], a right one of
    levels[2], a small square of levels[3] (where given)."""
    mask = np.zeros((size, size), np.uint8)
    for value, x in zip(levels[1:3], (0.3, 0.7), strict=False):
        cv2.ellipse(mask, (int(size * x), size // 2), (size // 7, size // 4), 0, 0, 360, value, -1)
    if len(levels) > 3:
        mask[size // 8 : size // 4, size // 8 : size // 4] = levels[3]
    return mask


@pytest.mark.parametrize("levels", [(0, 60, 255), (0, 85, 170, 255), (0, 128, 255)])
def test_grey_coded_binary_masks_keep_every_non_zero_pixel(caplog, tmp_path, levels):
    """Classes coded as grey levels fill regions of their own: binary mode takes them all as
    foreground (its documented rule), not only those above half the top value."""
    gray = ellipses(levels)
    folder = tmp_path / "masks"  # one warning per folder and session
    with caplog.at_level(logging.WARNING, logger="lungseg.data.masks"):
        for name in ("a.png", "b.png"):
            decoded = decode_mask(gray, "binary", folder / name)
            np.testing.assert_array_equal(decoded, (gray > 0).astype(np.uint8))
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and str(folder / "a.png") in warnings[0]
    listed = ", ".join(str(v) for v in levels)
    assert f"several grey levels ({listed})" in warnings[0]
    assert "every non-zero pixel as foreground" in warnings[0]
    palette = ",".join(f"[{v},{v},{v}]" for v in levels)
    assert "data.mask_mode=index" in warnings[0] and f"data.palette=[{palette}]" in warnings[0]
    assert "half of" not in warnings[0]


def jpeg(mask, quality):
    ok, data = cv2.imencode(".jpg", mask, [cv2.IMWRITE_JPEG_QUALITY, quality])
    assert ok
    return cv2.imdecode(data, cv2.IMREAD_UNCHANGED)


@pytest.mark.parametrize(
    "make",
    [
        lambda m: jpeg(m, 75),
        lambda m: jpeg(m, 95),
        # 2x downscaling gives 5 values only (0, 64, 128, 191, 255), and at 24 px its edges
        # are 42 % of the foreground: the levels are lines, not regions
        lambda m: cv2.resize(m, (24, 24), interpolation=cv2.INTER_LINEAR),
        lambda m: cv2.resize(m, (24, 24), interpolation=cv2.INTER_AREA),
        lambda m: cv2.resize(m, (12, 12), interpolation=cv2.INTER_AREA),
        lambda m: cv2.resize(m, (96, 96), interpolation=cv2.INTER_LINEAR),
    ],
    ids=["jpeg75", "jpeg95", "linear-half", "area-half", "area-quarter", "linear-double"],
)
def test_jpeg_and_anti_aliased_binary_masks_are_still_cut_halfway(caplog, tmp_path, make):
    gray = make(ellipses((0, 255, 255)))
    assert len(np.unique(gray)) > 2
    folder = tmp_path / "masks"
    with caplog.at_level(logging.WARNING, logger="lungseg.data.masks"):
        decoded = decode_mask(gray, "binary", folder / "a.png")
    np.testing.assert_array_equal(decoded, (gray > 127.5).astype(np.uint8))
    assert "half of 255" in caplog.text and "several grey levels" not in caplog.text


def test_palette_mask():
    rgb = np.array(PALETTE, np.uint8)[INDEX]
    decoded = decode_mask(rgb, "palette", PATH, palette=PALETTE, num_classes=4)
    assert decoded.dtype == np.uint8
    np.testing.assert_array_equal(decoded, INDEX)


def test_gray_mask_in_palette_mode_reads_as_gray_colour():
    gray = np.array([[0, 128]], np.uint8)
    np.testing.assert_array_equal(decode_mask(gray, "palette", PATH, palette=PALETTE), [[0, 3]])


def test_unknown_palette_colour_is_named_with_its_count():
    rgb = np.array(PALETTE, np.uint8)[INDEX]
    rgb[0, :3] = (10, 20, 30)
    rgb[1, 0] = (1, 2, 3)
    with pytest.raises(LungsegError) as info:
        decode_mask(rgb, "palette", PATH, palette=PALETTE)
    message = str(info.value)
    assert "case 1.png" in message and "data.palette" in message
    assert "(10, 20, 30): 3 pixels, (1, 2, 3): 1 pixels" in message


def test_unknown_colours_that_are_transparent_in_the_file_say_so(tmp_path):
    """Annotation tools export the unlabelled background as transparent white: the error
    named only the colour (255, 255, 255), which the user never saw."""
    bgra = np.zeros((10, 10, 4), np.uint8)
    bgra[..., :3] = 255  # white, fully transparent
    bgra[2:5, 2:5] = (0, 0, 255, 255)  # opaque red
    path = tmp_path / "exported.png"
    cv2.imwrite(str(path), bgra)
    with pytest.raises(LungsegError, match=r"\(255, 255, 255\): 91 pixels. These pixels are fully"):
        decode_mask(read_image(path), "palette", path, palette=[[0, 0, 0], [255, 0, 0]])
    bgra[0, 0, 3] = 255  # one of them visible: not all transparent, the usual advice
    cv2.imwrite(str(path), bgra)
    with pytest.raises(LungsegError, match=r"91 pixels. Add them to data.palette"):
        decode_mask(read_image(path), "palette", path, palette=[[0, 0, 0], [255, 0, 0]])


def test_many_unknown_colours_are_cut_to_five():
    rgb = np.zeros((1, 8, 3), np.uint8)
    rgb[0, :, 2] = np.arange(1, 9)
    with pytest.raises(LungsegError, match=r"\(0, 0, 5\): 1 pixels \(8 colours in total\)"):
        decode_mask(rgb, "palette", PATH, palette=PALETTE)


@pytest.mark.parametrize(
    ("palette", "num_classes", "match"),
    [
        (None, None, "needs data.palette"),
        ([[0, 0, 0], [0, 255, 0], [0, 0, 0]], None, r"colours \[\(0, 0, 0\)\] more than once"),
        ([[0, 0, 0], [0, 256, 0]], None, "integer values 0-255"),
        ([[0, 0, 0], [0, 255]], None, "integer values 0-255"),
        ([[0, 0, 0], [0.5, 1, 1]], None, "integer values 0-255"),
        ([[0, 0, 0], [0, 255, 0]], 3, "2 colours but data.num_classes=3"),
    ],
)
def test_bad_palette(palette, num_classes, match):
    with pytest.raises(LungsegError, match=match):
        decode_mask(np.zeros((2, 2, 3), np.uint8), "palette", PATH, palette, num_classes)


def test_unknown_mode():
    for call in (
        lambda: decode_mask(INDEX, "rgb", PATH),
        lambda: encode_mask(INDEX, "rgb"),
    ):
        with pytest.raises(LungsegError, match="mask_mode='rgb'.*index, binary, palette"):
            call()
    assert MASK_MODES == ("index", "binary", "palette")


@pytest.mark.parametrize(
    ("mode", "index", "stored"),
    [
        ("index", INDEX, INDEX),
        ("binary", INDEX.clip(0, 1), INDEX.clip(0, 1) * 255),
        ("palette", INDEX, np.array(PALETTE, np.uint8)[INDEX]),
    ],
)
def test_encode_then_decode_through_a_file(tmp_path, mode, index, stored):
    encoded = encode_mask(index, mode, PALETTE)
    assert encoded.dtype == np.uint8
    np.testing.assert_array_equal(encoded, stored)
    write_image(tmp_path / "pred.png", encoded)
    raw = read_image(tmp_path / "pred.png")
    np.testing.assert_array_equal(decode_mask(raw, mode, tmp_path / "pred.png", PALETTE), index)


def test_encode_errors():
    with pytest.raises(LungsegError, match="binary stores two classes.*class 3"):
        encode_mask(INDEX, "binary")
    with pytest.raises(LungsegError, match="2 colours, but the prediction holds class 3"):
        encode_mask(INDEX, "palette", PALETTE[:2])


def test_palette_decode_is_vectorised():
    rng = np.random.default_rng(0)
    rgb = np.array(PALETTE, np.uint8)[rng.integers(0, 4, (512, 512))]
    seconds = []
    for _ in range(5):
        start = time.perf_counter()
        decode_mask(rgb, "palette", PATH, PALETTE)
        seconds.append(time.perf_counter() - start)
    assert min(seconds) < 0.05  # "a few ms"; a per-pixel Python loop takes seconds


def test_default_colors():
    colours = default_colors(256)
    assert colours.shape == (256, 3) and colours.dtype == np.uint8
    np.testing.assert_array_equal(colours[0], [0, 0, 0])
    assert len(np.unique(colours, axis=0)) == 256
    assert colours[1:].max(axis=1).min() > 100  # no class is nearly black like the background
    np.testing.assert_array_equal(default_colors(3), colours[:3])
