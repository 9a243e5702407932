import logging
import struct
import time
import zlib
from pathlib import Path

import cv2
import numpy as np
import pytest
from conftest import oriented

from lungseg.data.folders import read_image, write_image
from lungseg.data.masks import (
    IGNORE,
    MASK_MODES,
    decode_layers,
    decode_mask,
    default_colors,
    encode_mask,
)
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


@pytest.mark.parametrize(("dtype", "top"), [(np.uint8, 255), (np.uint16, 65535)])
def test_0_255_index_mask_names_the_grey_palette_for_grey_coded_classes(dtype, top):
    """A 0/255 slice among 0/128/255 masks (a tumour, no lung) was told to use binary, which
    merges the classes coded as grey levels."""
    with pytest.raises(LungsegError) as info:
        decode_mask(np.array([[0, top]], dtype), "index", PATH)
    message = str(info.value)
    assert f"holds only the values 0 and {top}, which looks like a binary" in message
    assert "Set data.mask_mode=binary (non-zero = foreground) where every mask is black/white" in (
        message
    )
    assert "If other masks hold further grey levels" in message and "0/128/255" in message
    assert "data.mask_mode=palette with a grey palette, class i the i-th level" in message
    assert "data.palette=[[0,0,0],[128,128,128],[255,255,255]]" in message
    assert ("save the masks as 8-bit grey levels" in message) == (top == 65535)


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


def small_top_jpeg(levels, quality=95, size=128):
    """A mask of ``ellipses(levels)`` (the right lung larger) after JPEG compression, and the
    true foreground."""
    mask = ellipses(levels, size)
    mask[size // 4 : 3 * size // 4, size // 2 + 4 : size - 8] = levels[2]
    return jpeg(mask, quality), mask > 0


def warnings_of(caplog):
    return [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]


def test_small_top_jpeg_binary_masks_are_warned_about_and_cut_halfway_to_their_level(
    caplog, tmp_path
):
    """0/1 masks saved as JPEG (0, 1, 2, 3 ... along the edges) skipped the halfway cut, which
    needs a top of half the range, and passed silently with JPEG noise taken as foreground."""
    folder = tmp_path / "masks"
    gray, truth = small_top_jpeg((0, 1, 1), quality=75)
    assert set(np.unique(gray).tolist()) > {0, 1}  # the noise the tester saw
    with caplog.at_level(logging.WARNING, logger="lungseg.data.masks"):
        for name in ("a.jpg", "b.JPEG"):
            decoded = decode_mask(gray, "binary", folder / name)
            np.testing.assert_array_equal(decoded, gray > 0)  # level 1: cut at 0.5
    warnings = warnings_of(caplog)
    assert len(warnings) == 1 and f"Mask {folder / 'a.jpg'} is a JPEG" in warnings[0]
    assert "JPEG's lossy compression changed the values along the mask's edges" in warnings[0]
    assert "so data.mask_mode=binary takes a pixel as foreground from half of 1 up" in warnings[0]
    assert "save the masks as PNG (lossless)" in warnings[0]

    # 0/40 masks: cut halfway to 40, where the top (JPEG's overshoot) or 0 / non-zero are wrong
    gray, truth = small_top_jpeg((0, 40, 40), quality=75)
    assert gray.max() > 40 and 2 * gray.max() < 255
    decoded = decode_mask(gray, "binary", tmp_path / "forty" / "a.jpg")
    np.testing.assert_array_equal(decoded, gray > 20)
    assert (decoded != truth).mean() < 0.001 < ((gray > 0) != truth).mean()
    # two lungs stored as 1 and 2, the lung of 2 the larger: both are foreground
    gray, truth = small_top_jpeg((0, 1, 2))
    assert (gray == 2).sum() > (gray == 1).sum() > 0.25 * (gray > 0).sum()
    np.testing.assert_array_equal(decode_mask(gray, "binary", tmp_path / "two/a.jpg"), gray > 0)


def test_index_like_png_binary_masks_are_read_as_before_without_a_warning(caplog, tmp_path):
    gray, _ = small_top_jpeg((0, 1, 2))  # values 0-3 in a PNG: 0 / non-zero, as always
    with caplog.at_level(logging.WARNING, logger="lungseg.data.masks"):
        for name in ("a.png", "b.tif", "c.bmp"):
            decoded = decode_mask(gray, "binary", tmp_path / name)
            np.testing.assert_array_equal(decoded, gray > 0)
        for name in ("a.jpg", "a.png"):  # 0/1 with no noise: nothing to say
            decode_mask(np.array([[0, 1, 1]], np.uint8), "binary", tmp_path / "clean" / name)
    assert not warnings_of(caplog)


def red_and_green(size=64):
    """(size, size, 3) RGB mask: a red lung, a green tumour (a disc) inside it, on black."""
    rgb = np.zeros((size, size, 3), np.uint8)
    cv2.ellipse(rgb, (size // 2, size // 2), (size // 3, size // 3), 0, 0, 360, (255, 0, 0), -1)
    cv2.circle(rgb, (size // 2, size // 2), size // 10, (0, 255, 0), -1)
    return rgb


@pytest.mark.parametrize("name", ["a.png", "a.jpg"])
def test_colour_classes_in_binary_mode_are_warned_about_once_per_folder(caplog, tmp_path, name):
    """Red lung and green tumour: both have a largest channel of 255, so binary merged the two
    classes without a word."""
    rgb = red_and_green(64 if name == "a.png" else 128)
    if name == "a.jpg":
        rgb = jpeg(rgb[..., ::-1].copy(), 90)[..., ::-1]
    folder = tmp_path / "masks"
    with caplog.at_level(logging.WARNING, logger="lungseg.data.masks"):
        for file in (name, f"b{Path(name).suffix}"):
            decoded = decode_mask(rgb, "binary", folder / file)
            brightest = rgb.max(axis=2).astype(int)  # cut halfway for the JPEG's noise
            np.testing.assert_array_equal(decoded, 2 * brightest > brightest.max())
    warnings = [w for w in warnings_of(caplog) if "distinct colours" in w]
    assert len(warnings) == 1 and f"Mask {folder / name} holds 2 distinct colours" in warnings[0]
    assert "data.mask_mode=binary takes them all as one foreground class" in warnings[0]
    if name == "a.png":
        assert "((255, 0, 0), (0, 255, 0))" in warnings[0]
        palette = "{background:[0,0,0],class_1:[255,0,0],class_2:[0,255,0]}"
        assert (
            "data.mask_mode=palette and the colours in data.palette, background first, "
            in (warnings[0])
        )
        assert f"'data.palette={palette}'" in warnings[0]
    assert "several brightness levels" not in caplog.text
    # a palette built from the colours found reads the classes apart
    if name == "a.png":
        classes = decode_mask(rgb, "palette", folder / name, [[0, 0, 0], [255, 0, 0], [0, 255, 0]])
        assert set(np.unique(classes).tolist()) == {0, 1, 2}


def one_red(make):
    rgb = np.zeros((96, 96, 3), np.uint8)
    cv2.ellipse(rgb, (48, 48), (20, 30), 0, 0, 360, (255, 0, 0), -1, cv2.LINE_AA)
    return make(rgb)


@pytest.mark.parametrize(
    "rgb",
    [
        one_red(lambda m: m),  # anti-aliased edges: dark reds along the edge
        one_red(lambda m: jpeg(m, 75)),
        one_red(lambda m: jpeg(m, 95)),
        one_red(lambda m: cv2.resize(m, (48, 48), interpolation=cv2.INTER_AREA)),
        one_red(lambda m: cv2.resize(m, (288, 288), interpolation=cv2.INTER_LINEAR)),
        # edge pixels blown up into blocks of one dark red: regions, but shades of the one colour
        one_red(lambda m: cv2.resize(m, (768, 768), interpolation=cv2.INTER_NEAREST)),
        np.repeat(ellipses((0, 128, 255))[:, :, None], 3, axis=2),  # grey levels, as RGB
    ],
    ids=["anti-aliased", "jpeg75", "jpeg95", "area-half", "linear-triple", "nearest-8x", "grey"],
)
def test_one_colour_with_noisy_edges_is_not_taken_for_colour_classes(caplog, tmp_path, rgb):
    with caplog.at_level(logging.WARNING, logger="lungseg.data.masks"):
        decode_mask(rgb, "binary", tmp_path / "a.png")
    assert "distinct colours" not in caplog.text


def test_colours_of_two_brightnesses_get_one_warning_that_names_the_colours(caplog, tmp_path):
    """Red and dark blue have largest channels 255 and 128: the colours' warning says it all,
    without the brightness levels' warning beside it; red and dark red are brightness levels."""
    rgb = np.zeros((64, 64, 3), np.uint8)
    rgb[8:56, 8:34] = (255, 0, 0)  # the larger region: named first
    rgb[8:56, 38:56] = (0, 0, 128)
    with caplog.at_level(logging.WARNING, logger="lungseg.data.masks"):
        np.testing.assert_array_equal(
            decode_mask(rgb, "binary", tmp_path / "blue" / "a.png"), rgb.max(axis=2) > 0
        )
    assert "holds 2 distinct colours in regions of their own ((255, 0, 0), (0, 0, 128))" in (
        caplog.text
    )
    assert "several brightness levels" not in caplog.text
    caplog.clear()
    rgb[8:56, 38:56] = (128, 0, 0)
    with caplog.at_level(logging.WARNING, logger="lungseg.data.masks"):
        decode_mask(rgb, "binary", tmp_path / "dark" / "a.png")
    assert "several brightness levels (0, 128, 255)" in caplog.text
    assert "distinct colours" not in caplog.text


def test_mask_folder_lists_word_their_warnings_for_a_folder_list(caplog, tmp_path):
    """Files of a folder list are read as black/white whatever data.mask_mode: the warning said
    'data.mask_mode=binary takes ...' to a user who had set index."""
    noisy = np.array([[0, 3, 120, 128, 251, 255]], np.uint8)
    clean = np.array([[0, 0, 0, 0, 0, 255]], np.uint8)
    paths = [tmp_path / "left" / "a.jpg", tmp_path / "right" / "a.png"]
    with caplog.at_level(logging.WARNING, logger="lungseg.data.masks"):
        decoded = decode_layers([noisy, clean], paths, "index")
    np.testing.assert_array_equal(decoded, [[0, 0, 0, 1, 1, 2]])
    warnings = warnings_of(caplog)
    assert len(warnings) == 1 and str(paths[0]) in warnings[0]
    assert (
        "and each mask file of a folder list is read as black/white: a pixel is taken as "
        "foreground from half of 255 up"
    ) in warnings[0]
    assert "mask_mode=binary" not in warnings[0]
    # a small-top JPEG and grey-coded levels alike; colour files get no palette advice
    caplog.clear()
    gray, _ = small_top_jpeg((0, 1, 1), quality=75)
    levels = ellipses((0, 60, 255))
    rgb = red_and_green()
    with caplog.at_level(logging.WARNING, logger="lungseg.data.masks"):
        for i, raw in enumerate((gray, levels, rgb)):
            other = np.zeros(raw.shape[:2], np.uint8)
            folders = [tmp_path / f"l{i}" / "a.jpg", tmp_path / f"r{i}" / "a.png"]
            decode_layers([raw, other], folders, "index")
    warnings = warnings_of(caplog)
    assert len(warnings) == 2 and all("folder list is read as black/white" in w for w in warnings)
    assert "a folder list (one class a folder) cannot keep them apart" in warnings[1]
    assert "mask_mode=binary" not in caplog.text and "distinct colours" not in caplog.text


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


def palette_png(path, indices, palette, bits=8, transparency=b"", extra=b""):
    """Write ``indices`` as a PNG of colour type 3 (palette, 'P' mode) of ``bits`` bits a
    pixel, rows packed and unfiltered, written by hand (cv2 cannot write one); ``extra``:
    whole chunks put after IHDR."""
    h, w = indices.shape
    per = 8 // bits
    padded = np.zeros((h, -(-w // per) * per), np.uint8)
    padded[:, :w] = indices
    shifts = 8 - bits * np.arange(1, per + 1)
    packed = (padded.reshape(h, -1, per).astype(np.int64) << shifts).sum(axis=2)
    rows = np.hstack([np.zeros((h, 1), np.int64), packed]).astype(np.uint8)  # filter 0 a row

    def chunk(kind, data):
        crc = struct.pack(">I", zlib.crc32(kind + data))
        return struct.pack(">I", len(data)) + kind + data + crc

    path.write_bytes(
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, bits, 3, 0, 0, 0))
        + extra
        + chunk(b"PLTE", np.asarray(palette, np.uint8).tobytes())
        + (chunk(b"tRNS", transparency) if transparency else b"")
        + chunk(b"IDAT", zlib.compress(rows.tobytes()))
        + chunk(b"IEND", b"")
    )
    return path


VOC = [[0, 0, 0], [128, 0, 0], [0, 128, 0], [128, 128, 0], [0, 0, 128], [128, 0, 128]]


@pytest.mark.parametrize(
    "bits, palette",
    [
        (1, [[255, 255, 255], [0, 0, 0]]),  # bilevel: black drawn on a white background
        (2, VOC[:4]),
        (4, [[255, 255, 255], *VOC[1:]]),  # fewer entries than indices, a white background
        (8, VOC),
    ],
)
def test_palette_pngs_are_read_by_their_indices(tmp_path, bits, palette):
    """A PNG of colour type 3 stores class ids as palette indices, but cv2 reads the palette's
    colours: index masks saved so (Pascal VOC, label tools) were refused as colour images or
    read by their colours (a 1-bit [white, black] one as 255/0), and binary ones by their
    brightest channel (a white background as foreground). Palette mode reads the colours."""
    k = len(palette)
    indices = np.random.default_rng(bits).integers(0, k, (7, 13)).astype(np.uint8)
    path = palette_png(tmp_path / "m.png", indices, palette, bits)
    raw = read_image(path)
    np.testing.assert_array_equal(raw, np.array(palette, np.uint8)[indices])  # cv2: the colours
    decoded = decode_mask(raw, "index", path, num_classes=k)
    assert decoded.dtype == np.uint8
    np.testing.assert_array_equal(decoded, indices)
    np.testing.assert_array_equal(decode_mask(raw, "binary", path), indices != 0)
    np.testing.assert_array_equal(decode_mask(raw, "palette", path, palette, k), indices)
    # a palette PNG written by another encoder (Pillow's filters and bit depths)
    image = pytest.importorskip("PIL.Image").fromarray(indices, "P")
    image.putpalette(np.asarray(palette, np.uint8).ravel().tolist())
    image.save(tmp_path / "pil.png")
    raw = read_image(tmp_path / "pil.png")
    np.testing.assert_array_equal(decode_mask(raw, "index", tmp_path / "pil.png"), indices)


def test_a_palette_png_of_repeated_colours_transparency_and_orientation(tmp_path):
    """Indices 1 and 2 of one colour, index 0 transparent, an EXIF orientation: the indices
    are read all the same, turned as the colours are. Palette mode, the colours, names the
    indices as the likely fix where the colours are not data.palette's."""
    indices = np.array([[0, 1, 2, 3, 3], [3, 2, 1, 0, 0]], np.uint8)
    tagged = oriented(".png", np.zeros((2, 2), np.uint8), 6)  # turned 90 degrees clockwise
    exif = tagged[33 : 33 + 12 + int.from_bytes(tagged[33:37], "big")]
    palette = [[0, 0, 0], [255, 0, 0], [255, 0, 0], [0, 255, 0]]
    path = palette_png(tmp_path / "m.png", indices, palette, 2, b"\0", exif)
    raw = read_image(path)
    assert raw.shape == (5, 2, 3)
    decoded = decode_mask(raw, "index", path, num_classes=4)
    np.testing.assert_array_equal(decoded, np.rot90(indices, -1))
    np.testing.assert_array_equal(decode_mask(raw, "binary", path), np.rot90(indices, -1) != 0)
    with pytest.raises(LungsegError, match=r"a palette PNG .* data.mask_mode=index reads those"):
        decode_mask(raw, "palette", path, VOC[:4])


def test_palette_png_binary_masks_of_several_indices_are_warned_about_once(caplog, tmp_path):
    """Binary mode unites a palette PNG's non-zero indices (classes, or Pascal VOC's void
    border 255) into one foreground class: said once a folder, naming the indices."""
    indices = np.zeros((12, 12), np.uint8)
    indices[2:10, 2:10], indices[4:8, 4:8] = 255, 1  # an object with a void border
    palette = [*VOC[:2], *[[0, 0, 0]] * 253, [224, 224, 192]]
    masks = [palette_png(tmp_path / f"{name}.png", indices, palette) for name in "ab"]
    with caplog.at_level(logging.WARNING, logger="lungseg.data.masks"):
        for path in masks:
            decoded = decode_mask(read_image(path), "binary", path)
            np.testing.assert_array_equal(decoded, indices > 0)
        (tmp_path / "one").mkdir()
        one = palette_png(tmp_path / "one" / "c.png", (indices > 0).astype(np.uint8), palette)
        decode_mask(read_image(one), "binary", one)  # one non-zero index: nothing to say
    warnings = warnings_of(caplog)
    assert len(warnings) == 1, warnings
    said = f"Mask {masks[0]} is a palette PNG whose pixels hold the palette indices 0, 1, 255"
    assert said in warnings[0]
    assert "keep them apart with data.mask_mode=index" in warnings[0]


def test_binary_warnings_name_the_ignore_index_for_a_value_of_unlabelled_pixels(caplog, tmp_path):
    """A palette PNG of indices 0, 1, 2, 255 (VOC's border) and a 0/128/255 mask (128: not
    annotated) were warned of, then trained with the border or the grey area as foreground."""
    indices = np.zeros((12, 12), np.uint8)
    indices[2:10, 2:10], indices[4:8, 4:6], indices[4:8, 6:8] = 255, 1, 2
    palette = [*VOC[:3], *[[0, 0, 0]] * 252, [224, 224, 192]]
    (tmp_path / "voc").mkdir()
    voc = palette_png(tmp_path / "voc" / "a.png", indices, palette)
    with caplog.at_level(logging.WARNING, logger="lungseg.data.masks"):
        decode_mask(read_image(voc), "binary", voc)
        decode_mask(ellipses((0, 128, 255)), "binary", tmp_path / "sparse" / "a.png")
    indexed, levels = warnings_of(caplog)
    assert "palette indices 0, 1, 2, 255" in indexed and "several grey levels (0, 128, 255)" in (
        levels
    )
    for said, value in [(indexed, 255), (levels, 128)]:
        assert "marks unlabelled pixels (a border, an area not annotated)" in said
        assert f"data.ignore_index=<that value> (e.g. data.ignore_index={value})" in said


def test_an_ignore_value_that_is_the_binary_foreground_is_warned_of(caplog, tmp_path):
    """0/128/255 masks (128: not annotated) with data.ignore_index=255 left the foreground out
    and trained the unannotated area as foreground, without a word (found by a new-user
    tester). The right setting (128) and a thin 255 border (VOC's) are not warned of."""
    sparse = ellipses((0, 128, 255))
    border = ellipses((0, 1, 1))
    edge = cv2.morphologyEx(border, cv2.MORPH_GRADIENT, np.ones((3, 3), np.uint8)) > 0
    border[edge] = 255
    cases = [(sparse, 255, "a"), (sparse, 128, "b"), (border, 255, "c")]
    with caplog.at_level(logging.WARNING, logger="lungseg.data.masks"):
        for mask, ignore, folder in cases:
            out = decode_mask(mask, "binary", tmp_path / folder / "m.png", ignore=ignore)
            assert (out[mask == ignore] == IGNORE).all()
    warnings = [w for w in warnings_of(caplog) if "data.ignore_index" in w]
    assert len(warnings) == 1 and str(tmp_path / "a" / "m.png") in warnings[0]
    assert "data.ignore_index=255 is these binary masks' top value" in warnings[0]
    assert "if 128 marks the unlabelled pixels, set data.ignore_index=128 instead" in warnings[0]


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


def test_a_grey_palette_writes_grey_masks(tmp_path):
    """A model trained on 0/128/255 grey masks (a grey palette) wrote 3-channel RGB masks
    (found by a tester); they are written as the training masks were, one channel."""
    grey = [[0, 0, 0], [128, 128, 128], [255, 255, 255]]
    index = INDEX.clip(0, 2)
    encoded = encode_mask(index, "palette", grey)
    assert encoded.shape == index.shape
    np.testing.assert_array_equal(encoded, np.array([0, 128, 255], np.uint8)[index])
    write_image(tmp_path / "pred.png", encoded)
    raw = read_image(tmp_path / "pred.png")
    assert raw.ndim == 2
    np.testing.assert_array_equal(decode_mask(raw, "palette", tmp_path / "pred.png", grey), index)


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
