import logging
import re
import shlex
import struct
import unicodedata

import cv2
import numpy as np
import pytest
from conftest import oriented
from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf import ListConfig

from lungseg.data.folders import (
    Pair,
    exif_orientation,
    find_pairs,
    read_image,
    suffix_list,
    tiff_pages,
    to_channels,
    write_image,
)
from lungseg.errors import LungsegError


def touch(folder, *names):
    """Empty files: pairing looks at names only."""
    folder.mkdir(parents=True, exist_ok=True)
    for name in names:
        (folder / name).write_bytes(b"")


def stems_to_names(pairs):
    return {p.stem: (p.image.name, p.mask.name) for p in pairs}


def test_pairs_by_name_not_by_sorted_position(tmp_path):
    # Sorted, the images are a, a1 but the masks a1_mask, a_mask; extensions differ too.
    touch(tmp_path / "img", "a1.jpg", "a.png", "b.PNG")
    touch(tmp_path / "msk", "a_mask.tif", "b.png", "a1_mask.png")
    pairs = find_pairs(tmp_path / "img", tmp_path / "msk")
    assert [p.stem for p in pairs] == ["a", "a1", "b"]
    assert stems_to_names(pairs) == {
        "a": ("a.png", "a_mask.tif"),
        "a1": ("a1.jpg", "a1_mask.png"),
        "b": ("b.PNG", "b.png"),
    }
    assert pairs[0] == Pair("a", tmp_path / "img" / "a.png", tmp_path / "msk" / "a_mask.tif")


def test_names_that_differ_only_in_unicode_form_pair(tmp_path):
    """Séance_08.png written composed (NFC, Linux and Windows) for the image and decomposed
    (NFD, macOS) for the mask looked the same in the 'images without a mask and masks without
    an image' error, and did not pair (found by a tester)."""
    composed, decomposed = (unicodedata.normalize(f, "Séance_08") for f in ("NFC", "NFD"))
    assert composed != decomposed
    touch(tmp_path / "img", f"{composed}.png", "b.png")
    touch(tmp_path / "msk", f"{decomposed}_mask.png", "b.png")
    pairs = find_pairs(tmp_path / "img", tmp_path / "msk", strict=True)
    assert stems_to_names(pairs) == {
        composed: (f"{composed}.png", f"{decomposed}_mask.png"),
        "b": ("b.png", "b.png"),
    }
    # a split file that names it decomposed names the same file (review)
    from lungseg.data.splits import listed_splits

    split_file = tmp_path / "split.csv"
    split_file.write_text(f"file,split\n{decomposed}.png,test\nb,train\n", encoding="utf-8")
    assert listed_splits(split_file, [p.stem for p in pairs]) == {composed: "test", "b": "train"}


def test_mask_suffix_is_matched_against_existing_images(tmp_path):
    # With suffixes ("", "_mask"), 'a_mask.png' could be the mask of an image 'a_mask';
    # it belongs to 'a' because only that image exists, and nothing is reported unpaired.
    touch(tmp_path / "img", "a.png", "b.png")
    touch(tmp_path / "msk", "a_mask.png", "b.png")
    pairs = find_pairs(tmp_path / "img", tmp_path / "msk", strict=True)
    assert stems_to_names(pairs) == {"a": ("a.png", "a_mask.png"), "b": ("b.png", "b.png")}


def test_mask_fitting_two_images_is_an_error(tmp_path):
    touch(tmp_path / "img", "a.png", "a_mask.png")
    touch(tmp_path / "msk", "a_mask.png")
    with pytest.raises(LungsegError, match=r"a_mask\.png \(fits images a\.png and a_mask\.png\)"):
        find_pairs(tmp_path / "img", tmp_path / "msk", strict=False)


def test_unpaired_files_listed_with_counts(tmp_path):
    touch(tmp_path / "img", *[f"{c}.png" for c in "abcdefg"])
    touch(tmp_path / "msk", "a_mask.png", "z_mask.png", "y.png")
    with pytest.raises(LungsegError) as info:
        find_pairs(tmp_path / "img", tmp_path / "msk")
    message = str(info.value)
    assert "6 images without a mask" in message
    assert "'b.png', 'c.png', 'd.png', 'e.png', 'f.png', ... (6 in total)" in message
    assert "g.png" not in message  # only the first five names
    assert "2 masks without an image" in message and "'y.png', 'z_mask.png'" in message
    assert "data.strict=false" in message and "data.mask_suffixes" in message


def test_masks_named_with_another_suffix_get_the_setting_that_pairs_them(tmp_path):
    """Every mask named <image>_label: the error names data.mask_suffixes=[_label] (was: only
    "set data.mask_suffixes", found by a new-user tester); where no suffix pairs at least
    half of the unpaired masks, nothing is suggested."""
    touch(tmp_path / "img", *[f"case{i}.png" for i in range(4)], "case10.png")
    touch(tmp_path / "msk", *[f"case{i}_label.png" for i in range(4)], "case10-seg.png")
    with pytest.raises(LungsegError) as info:
        find_pairs(tmp_path / "img", tmp_path / "msk")
    message = str(info.value)
    assert "4 of the 5 unpaired masks are named as an unpaired image + '_label': " in message
    # the suffixes given, and the one found: the pairs found by them stay paired
    (typed,) = re.findall(r"(\"data\.mask_suffixes=\[.*?\]\") on the command line", message)
    (override,) = OverridesParser.create().parse_overrides(shlex.split(typed))
    assert override.value() == ["", "_mask", "_label"]
    pairs = find_pairs(tmp_path / "img", tmp_path / "msk", ["", "_mask", "_label", "-seg"])
    assert len(pairs) == 5
    touch(tmp_path / "msk2", "case0_label.png", "case1-seg.png", "other.png")
    with pytest.raises(LungsegError) as info:
        find_pairs(tmp_path / "img", tmp_path / "msk2")
    assert "unpaired masks are named" not in str(info.value)


def test_a_file_with_an_image_extension_counts(tmp_path):
    touch(tmp_path / "img", "a.png", "notes.tif")
    touch(tmp_path / "msk", "a.png")
    with pytest.raises(LungsegError, match=r"1 image without a mask .*'notes\.tif'"):
        find_pairs(tmp_path / "img", tmp_path / "msk")


def test_not_strict_warns_once_and_skips(tmp_path, caplog):
    touch(tmp_path / "img", "a.png", "b.png", "c.png")
    touch(tmp_path / "msk", "a.png", "b_mask.png", "x.png")
    with caplog.at_level(logging.WARNING):
        pairs = find_pairs(tmp_path / "img", tmp_path / "msk", strict=False)
    assert [p.stem for p in pairs] == ["a", "b"]
    assert len(caplog.records) == 1
    message = caplog.records[0].getMessage()
    assert "1 image without a mask" in message and "'c.png'" in message
    assert "1 mask without an image" in message and "'x.png'" in message


def test_not_strict_with_nothing_paired_is_an_error(tmp_path):
    touch(tmp_path / "img", "a.png")
    touch(tmp_path / "msk", "b.png")
    with pytest.raises(LungsegError, match="No image in .* has a mask"):
        find_pairs(tmp_path / "img", tmp_path / "msk", strict=False)


def test_same_stem_two_image_extensions_is_an_error(tmp_path):
    touch(tmp_path / "img", "a.png", "a.jpg", "b.png")
    touch(tmp_path / "msk", "a.png", "b.png")
    with pytest.raises(LungsegError, match=r"'a\.jpg and a\.png'"):
        find_pairs(tmp_path / "img", tmp_path / "msk", strict=False)


def test_two_masks_for_one_image_is_an_error(tmp_path):
    touch(tmp_path / "img", "a.png", "b.png")
    touch(tmp_path / "msk", "a.png", "a_mask.png", "b.png")
    with pytest.raises(LungsegError, match=r"a\.png \(masks a\.png and a_mask\.png\)"):
        find_pairs(tmp_path / "img", tmp_path / "msk", strict=False)


@pytest.mark.parametrize("suffixes", [("_mask",), ("", "_mask")])
def test_images_and_masks_in_one_folder(tmp_path, suffixes):
    touch(tmp_path, "a.png", "a_mask.png", "b.jpg", "b_mask.png")
    pairs = find_pairs(tmp_path, tmp_path, mask_suffixes=suffixes)
    assert stems_to_names(pairs) == {"a": ("a.png", "a_mask.png"), "b": ("b.jpg", "b_mask.png")}


def test_one_mask_suffix_may_be_given_as_a_string(tmp_path):
    """Was: data.mask_suffixes=_seg (what one types for one suffix) read as the suffixes
    ['_', 's', 'e', 'g'], and every image was "without a mask"."""
    touch(tmp_path / "img", "a.png", "b.png")
    touch(tmp_path / "msk", "a_seg.png", "b_seg.png")
    pairs = find_pairs(tmp_path / "img", tmp_path / "msk", mask_suffixes="_seg")
    assert stems_to_names(pairs) == {"a": ("a.png", "a_seg.png"), "b": ("b.png", "b_seg.png")}
    assert suffix_list("_seg") == ["_seg"] and suffix_list(ListConfig(["", "_m"])) == ["", "_m"]
    with pytest.raises(LungsegError, match=r"data.mask_suffixes is 3; .*=\[_mask\]"):
        suffix_list(3)
    with pytest.raises(LungsegError, match=r"data.mask_suffixes is \['_mask', 1\]"):
        find_pairs(tmp_path / "img", tmp_path / "msk", mask_suffixes=["_mask", 1])


def test_one_folder_without_a_suffix_is_an_error(tmp_path):
    touch(tmp_path, "a.png", "a_mask.png")
    with pytest.raises(LungsegError, match="same folder"):
        find_pairs(tmp_path, tmp_path, mask_suffixes=("",))


def test_one_folder_without_any_mask_names_the_setting(tmp_path):
    """data.mask_dir given as the image folder by mistake: "267 images without a mask ... with
    data.mask_suffixes ['_mask']" read as if the suffixes were wrong; the error now says that
    the two folders are one and what that means."""
    touch(tmp_path, "a.png", "b.png", "c.png")
    with pytest.raises(LungsegError) as error:
        find_pairs(tmp_path, tmp_path)
    assert "data.image_dir and data.mask_dir are the same folder" in str(error.value)
    assert "none of its 3 files does. Set data.mask_dir to the folder of the masks" in str(
        error.value
    )


def test_non_ascii_names_with_spaces(tmp_path):
    image = np.arange(12, dtype=np.uint8).reshape(3, 4)
    (tmp_path / "bilder ü").mkdir()
    (tmp_path / "masken").mkdir()
    write_image(tmp_path / "bilder ü" / "Patient Ä 01.png", image)
    write_image(tmp_path / "masken" / "Patient Ä 01_mask.png", image)
    pairs = find_pairs(tmp_path / "bilder ü", tmp_path / "masken")
    assert [p.stem for p in pairs] == ["Patient Ä 01"]
    np.testing.assert_array_equal(read_image(pairs[0].image), image)
    np.testing.assert_array_equal(read_image(pairs[0].mask), image)


def test_non_image_files_are_ignored(tmp_path):
    touch(tmp_path / "img", "a.png", ".DS_Store", "Thumbs.db", "notes.txt", "._a.png")
    touch(tmp_path / "msk", "a.png", ".DS_Store", "labels.csv")
    (tmp_path / "img" / "folder.png").mkdir()  # a folder, even with an image extension
    (tmp_path / "msk" / "sub").mkdir()
    pairs = find_pairs(tmp_path / "img", tmp_path / "msk")
    assert stems_to_names(pairs) == {"a": ("a.png", "a.png")}


def test_images_of_formats_lungseg_does_not_read_are_named(tmp_path, caplog):
    """Was: a.webp beside the PNGs was skipped without a word (predict.py), or showed only as
    its mask "without an image" (training)."""
    touch(tmp_path / "img", "a.png", "b.webp", "c.GIF", "scan.nii.gz", "notes.txt", ".x.webp")
    touch(tmp_path / "msk", "a.png", "b.png", "labels.csv.gz")
    with caplog.at_level(logging.WARNING), pytest.raises(LungsegError, match="1 mask without"):
        find_pairs(tmp_path / "img", tmp_path / "msk")
    (warned,) = [r.getMessage() for r in caplog.records]
    assert warned == (
        f"3 files in the image folder {tmp_path / 'img'} are not read: lungseg reads .png, "
        f".jpg, .jpeg, .bmp, .tif, .tiff (.gif: 1, .nii.gz: 1, .webp: 1; e.g. b.webp). "
        f"Convert them to PNG (a volume: one PNG a slice) to use them."
    )
    # the folders a pattern matches: one warning for all of them, naming the pattern
    for patient in ("p1", "p2"):
        touch(tmp_path / patient / "img", "a.png", "b.webp")
        touch(tmp_path / patient / "msk", "a.png")
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        find_pairs(tmp_path / "*" / "img", tmp_path / "*" / "msk")
    (warned,) = [r.getMessage() for r in caplog.records]
    assert warned.startswith(f"2 files in the image folder {tmp_path / '*' / 'img'} are not")


def test_folder_without_images(tmp_path):
    touch(tmp_path / "img", "notes.txt", ".DS_Store")
    touch(tmp_path / "msk", "a.png")
    with pytest.raises(LungsegError, match=r"image folder .*img holds no image files.*\.png"):
        find_pairs(tmp_path / "img", tmp_path / "msk")


def test_folder_of_volumes_or_sub_folders_says_what_it_holds(tmp_path):
    """nnU-Net and MONAI users point at NIfTI or DICOM folders, Montgomery's masks sit in
    sub-folders: the error says what was found and how to make slices of volumes."""
    volumes, nested = tmp_path / "volumes", tmp_path / "nested"
    volumes.mkdir()
    for name in ("ct_001.nii.gz", "ct_002.nii.gz", "notes.txt"):
        (volumes / name).write_bytes(b"x")
    (volumes / "IM-0001-0001").write_bytes(bytes(128) + b"DICM" + bytes(8))  # no extension
    (nested / "leftMask").mkdir(parents=True)
    (nested / "rightMask").mkdir()
    with pytest.raises(LungsegError) as error:
        find_pairs(volumes, nested)
    message = str(error.value)
    assert "holds no image files (it holds 2 .nii.gz files, 1 DICOM file, 1 .txt file" in message
    assert "export each slice of the volumes as a PNG" in message
    uids = tmp_path / "uids"  # a PACS export: files named by UID, each its own 'suffix'
    uids.mkdir()
    for i in range(300):
        (uids / f"1.2.840.113619.2.55.3.{i}").write_bytes(bytes(128) + b"DICM" + bytes(8))
    (uids / ".hidden.png").write_bytes(b"x")
    with pytest.raises(LungsegError, match=r"\(it holds 300 DICOM files: lungseg reads 2-D"):
        find_pairs(uids, nested)
    hidden = tmp_path / "hidden"
    hidden.mkdir()
    (hidden / "._a.png").write_bytes(b"x")
    with pytest.raises(LungsegError, match=r"\(it holds only hidden files\)"):
        find_pairs(hidden, nested)
    with pytest.raises(LungsegError) as error:
        find_pairs(nested, volumes)
    message = str(error.value)
    assert "(it holds 2 sub-folders ('leftMask', 'rightMask'))" in message
    assert "export each slice" not in message and "sub-folders are not searched" in message


def test_missing_folder(tmp_path):
    touch(tmp_path / "img", "a.png")
    with pytest.raises(LungsegError, match=r"mask folder .*nowhere does not exist.*data\.mask_dir"):
        find_pairs(tmp_path / "img", tmp_path / "nowhere")


def test_file_instead_of_folder(tmp_path):
    touch(tmp_path, "a.png")
    with pytest.raises(LungsegError, match=r"a\.png is not a folder"):
        find_pairs(tmp_path / "a.png", tmp_path)


def png_bytes(array):
    ok, buffer = cv2.imencode(".png", array)
    assert ok
    return buffer.tobytes()


@pytest.mark.parametrize(
    "content",
    [b"", b"this is not an image", png_bytes(np.full((32, 32), 7, np.uint8))[:60]],
    ids=["zero-byte", "corrupt", "truncated"],
)
def test_undecodable_file_names_the_file(tmp_path, content):
    path = tmp_path / "scan 7.png"
    path.write_bytes(content)
    with pytest.raises(LungsegError, match=r"scan 7\.png could not be decoded as an image"):
        read_image(path)


def test_missing_file(tmp_path):
    with pytest.raises(LungsegError, match=r"Could not read .*gone\.png"):
        read_image(tmp_path / "gone.png")


def test_16_bit_png_keeps_its_values(tmp_path):
    image = np.array([[0, 300], [4095, 65535]], np.uint16)
    write_image(tmp_path / "ct.png", image)
    read = read_image(tmp_path / "ct.png")
    assert read.dtype == np.uint16
    np.testing.assert_array_equal(read, image)


def test_colour_is_rgb_and_alpha_is_dropped(tmp_path):
    bgra = np.zeros((2, 2, 4), np.uint8)
    bgra[..., 2] = 200  # red in cv2's BGR order
    bgra[..., 3] = 17  # alpha
    (tmp_path / "rgba.png").write_bytes(png_bytes(bgra))
    (tmp_path / "rgb.png").write_bytes(png_bytes(bgra[..., :3]))
    for name in ("rgba.png", "rgb.png"):
        read = read_image(tmp_path / name)
        assert read.shape == (2, 2, 3)
        np.testing.assert_array_equal(read[0, 0], [200, 0, 0])


def test_float_tiff_passes_and_signed_tiff_is_an_error(tmp_path):
    image = np.array([[0.5, -1.25]], np.float32)
    (tmp_path / "f.tif").write_bytes(cv2.imencode(".tif", image)[1].tobytes())
    np.testing.assert_array_equal(read_image(tmp_path / "f.tif"), image)
    (tmp_path / "s.tif").write_bytes(cv2.imencode(".tif", image.astype(np.int16))[1].tobytes())
    with pytest.raises(LungsegError, match=r"s\.tif stores pixels as int16"):
        read_image(tmp_path / "s.tif")


def test_to_channels_gray():
    gray = np.array([[1, 1000]], np.uint16)
    one = to_channels(gray, 1)
    assert one.shape == (1, 2, 1) and one.dtype == np.uint16
    three = to_channels(gray, 3)
    assert three.shape == (1, 2, 3) and three.dtype == np.uint16
    np.testing.assert_array_equal(three[0, 1], [1000, 1000, 1000])


def test_to_channels_rgb_uses_luminance_weights():
    rgb = np.array([[[1000, 0, 0], [0, 1000, 0], [0, 0, 1000]]], np.uint16)
    gray = to_channels(rgb, 1)
    assert gray.dtype == np.uint16
    np.testing.assert_array_equal(gray[0, :, 0], [299, 587, 114])
    assert to_channels(rgb, 3) is rgb


def test_to_channels_rejects_other_counts(tmp_path):
    with pytest.raises(LungsegError, match=r"data\.in_channels=2 \(reading .*x\.png\)"):
        to_channels(np.zeros((2, 2), np.uint8), 2, tmp_path / "x.png")


@pytest.mark.parametrize(
    ("ext", "byteorder"), [(".jpg", "big"), (".jpg", "little"), (".png", "big")]
)
def test_exif_orientation_is_applied_as_viewers_and_cv2_imread_do(tmp_path, ext, byteorder):
    """Phones and some scanners store the sensor's pixels and an EXIF orientation; viewers and
    annotation tools show them turned. IMREAD_UNCHANGED ignores the tag (a 180-degree turn
    went unnoticed); cv2's own reading with the tag applied is the reference."""
    stored = np.zeros((4, 6), np.uint8)
    stored[0, 0], stored[0, 1], stored[3, 5] = 255, 128, 60
    for orientation in range(1, 9):
        data = oriented(ext, stored, orientation, byteorder)
        (tmp_path / f"a{ext}").write_bytes(data)
        read = read_image(tmp_path / f"a{ext}")
        shown = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_GRAYSCALE)
        assert exif_orientation(np.frombuffer(data, np.uint8)) == orientation
        assert read.shape == ((4, 6) if orientation < 5 else (6, 4))
        np.testing.assert_array_equal(read, shown)


def test_exif_orientation_keeps_16_bit_and_colour(tmp_path):
    stored = np.arange(12, dtype=np.uint16).reshape(3, 4) * 5000
    (tmp_path / "ct.png").write_bytes(oriented(".png", stored, 6))  # 90 degrees clockwise
    read = read_image(tmp_path / "ct.png")
    assert read.dtype == np.uint16
    np.testing.assert_array_equal(read, np.rot90(stored, -1))
    bgr = np.zeros((2, 3, 3), np.uint8)
    bgr[0, 0] = (0, 0, 200)  # red, top left
    (tmp_path / "rgb.png").write_bytes(oriented(".png", bgr, 3))  # 180 degrees
    read = read_image(tmp_path / "rgb.png")
    assert read.shape == (2, 3, 3)
    np.testing.assert_array_equal(read[1, 2], [200, 0, 0])


def tiff_bytes(pixels: np.ndarray, orientation: int) -> bytes:
    """An uncompressed little-endian grayscale TIFF whose own Orientation tag (274) is set, as
    some scanners and microscopes write them (cv2 cannot write the tag)."""
    h, w = pixels.shape
    data = pixels.astype(pixels.dtype.newbyteorder("<")).tobytes()
    bits = pixels.dtype.itemsize * 8
    tags = [(256, w), (257, h), (258, bits), (259, 1), (262, 1), (273, 0), (274, orientation)]
    tags += [(277, 1), (278, h), (279, len(data))]
    start = 8 + 2 + 12 * len(tags) + 4
    ifd = b"".join(
        struct.pack("<HHII", tag, 4, 1, start if tag == 273 else value) for tag, value in tags
    )
    return b"II*\0" + struct.pack("<IH", 8, len(tags)) + ifd + bytes(4) + data


@pytest.mark.parametrize("dtype", [np.uint8, np.uint16])
def test_a_tiff_orientation_tag_is_applied_too(tmp_path, dtype):
    """TIFF keeps the orientation in its own header, which OpenCV's decoder applies itself
    (8 and 16 bit); lungseg's EXIF reading must not turn the pixels a second time."""
    stored = (np.arange(12).reshape(3, 4) * 20).astype(dtype)
    turns = {1: stored, 3: stored[::-1, ::-1], 6: np.rot90(stored, -1), 8: np.rot90(stored)}
    for orientation, shown in turns.items():
        (tmp_path / "scan.tif").write_bytes(tiff_bytes(stored, orientation))
        read = read_image(tmp_path / "scan.tif")
        assert read.dtype == dtype
        np.testing.assert_array_equal(read, shown)


def test_a_multi_page_tiff_is_refused_and_a_thumbnail_page_is_not_a_page(tmp_path):
    """cv2 decodes the first page only: a stack of slices in one .tif would train as one
    slice. The error names the file, its pages and how to save them; a reduced-resolution
    page (NewSubfileType bit 0, a thumbnail) does not count."""
    pages = [np.full((6, 5), 40 * i, np.uint8) for i in range(3)]
    (tmp_path / "stack.tif").write_bytes(cv2.imencodemulti(".tif", pages)[1].tobytes())
    with pytest.raises(LungsegError, match=r"stack\.tif is a TIFF of 3 pages .* stack_000\.tif"):
        read_image(tmp_path / "stack.tif")
    one = tiff_bytes(np.arange(12, dtype=np.uint8).reshape(3, 4), 1)
    assert tiff_pages(np.frombuffer(one, np.uint8)) == 1
    # the same image again as a second IFD marked reduced-resolution (254 = 1)
    entries = struct.unpack_from("<H", one, 8)[0]
    second = len(one)
    thumb = struct.pack("<H", entries + 1) + struct.pack("<HHII", 254, 4, 1, 1)
    thumb += one[10 : 10 + 12 * entries] + bytes(4)
    chained = bytearray(one + thumb)
    struct.pack_into("<I", chained, 10 + 12 * entries, second)  # first IFD's next offset
    assert tiff_pages(bytes(chained)) == 1
    thumb_ifd = bytearray(thumb)
    struct.pack_into("<I", thumb_ifd, 2 + 8, 0)  # NewSubfileType 0: a full page after all
    full = bytearray(one + bytes(thumb_ifd))
    struct.pack_into("<I", full, 10 + 12 * entries, second)
    assert tiff_pages(bytes(full)) == 2


def test_no_or_malformed_exif_reads_as_stored(tmp_path):
    stored = np.arange(12, dtype=np.uint8).reshape(3, 4)
    for data in (png_bytes(stored), cv2.imencode(".jpg", stored)[1].tobytes(), b"", b"\xff\xd8"):
        assert exif_orientation(np.frombuffer(data, np.uint8)) == 1
    assert exif_orientation(np.frombuffer(oriented(".jpg", stored, 9), np.uint8)) == 1
    good = oriented(".jpg", stored, 3)
    for cut in range(2, len(good), 3):  # damaged or cut anywhere: a value or 1, no exception
        assert 1 <= exif_orientation(good[:cut] + good[cut + 7 :]) <= 8
        assert 1 <= exif_orientation(good[:cut]) <= 8


def test_exif_orientation_where_writers_put_it():
    """Fill bytes before a marker, an XMP segment before the EXIF one, eXIf after the PNG's
    image data (older ImageMagick), more tags before the orientation, a LONG value."""
    stored = np.arange(12, dtype=np.uint8).reshape(3, 4)
    jpeg = oriented(".jpg", stored, 6)
    assert exif_orientation(jpeg[:2] + b"\xff\xff" + jpeg[2:]) == 6
    xmp = b"http://ns.adobe.com/xap/1.0/\0<x:xmpmeta/>"
    assert (
        exif_orientation(jpeg[:2] + b"\xff\xe1" + struct.pack(">H", len(xmp) + 2) + xmp + jpeg[2:])
        == 6
    )
    png = oriented(".png", stored, 6)
    chunk = png[33 : png.index(b"eXIf") + 4 + int.from_bytes(png[33:37], "big") + 4]
    moved = png.replace(chunk, b"")
    iend = moved.rindex(b"IEND") - 4
    assert (
        exif_orientation(moved) == 1 and exif_orientation(moved[:iend] + chunk + moved[iend:]) == 6
    )
    tiff = b"MM" + struct.pack(">HIH", 42, 8, 3)  # three entries: width, height, orientation
    tiff += struct.pack(">HHII", 0x0100, 4, 1, 4) + struct.pack(">HHII", 0x0101, 4, 1, 3)
    tiff += struct.pack(">HHII", 0x0112, 4, 1, 8) + bytes(4)  # orientation as a LONG
    exif = b"Exif\0\0" + tiff
    plain = cv2.imencode(".jpg", stored)[1].tobytes()
    spliced = plain[:2] + b"\xff\xe1" + struct.pack(">H", len(exif) + 2) + exif + plain[2:]
    assert exif_orientation(spliced) == 8
