import time

import numpy as np
import pytest

from lungseg.data import demo
from lungseg.data.demo import DEMO_CLASSES, DEMO_PALETTE, make_demo_dataset
from lungseg.data.folders import find_pairs, read_image
from lungseg.data.masks import decode_mask
from lungseg.errors import LungsegError

SMALL = dict(num_images=6, size=64)


def file_bytes(folder):
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*.png"))}


def test_same_seed_same_bytes_other_seed_other_images(tmp_path):
    first = make_demo_dataset(tmp_path / "a", seed=3, **SMALL)
    make_demo_dataset(tmp_path / "b", seed=3, **SMALL)
    make_demo_dataset(tmp_path / "c", seed=4, **SMALL)
    assert first == (tmp_path / "a" / "images", tmp_path / "a" / "masks")
    a, b, c = (file_bytes(tmp_path / name) for name in "abc")
    assert len(a) == 12 and a == b
    assert a.keys() == c.keys()
    assert all(a[name] != c[name] for name in a if name.startswith("images/"))


def test_second_call_reuses_the_dataset(tmp_path, monkeypatch):
    make_demo_dataset(tmp_path / "demo", **SMALL)
    before = {p: p.stat().st_mtime_ns for p in (tmp_path / "demo").rglob("*")}
    monkeypatch.setattr(demo, "_synthetic_slice", None)  # any regeneration would fail
    make_demo_dataset(tmp_path / "demo", **SMALL)
    assert {p: p.stat().st_mtime_ns for p in (tmp_path / "demo").rglob("*")} == before


def test_other_parameters_or_missing_files_regenerate(tmp_path):
    root = tmp_path / "demo"
    make_demo_dataset(root, **SMALL)
    make_demo_dataset(root, num_images=4, size=64)
    assert len(list((root / "images").iterdir())) == 4
    (root / "masks" / "demo_0002.png").unlink()
    make_demo_dataset(root, num_images=4, size=64)
    assert len(list((root / "masks").iterdir())) == 4
    assert [p.name for p in tmp_path.iterdir()] == ["demo"]  # no temporary folders left


def test_interrupted_run_leaves_nothing_that_passes_as_complete(tmp_path, monkeypatch):
    calls = []
    real_slice = demo._synthetic_slice

    def slice_then_interrupt(rng, size):
        calls.append(size)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real_slice(rng, size)

    monkeypatch.setattr(demo, "_synthetic_slice", slice_then_interrupt)
    with pytest.raises(KeyboardInterrupt):
        make_demo_dataset(tmp_path / "demo", **SMALL)
    assert list(tmp_path.iterdir()) == []
    monkeypatch.setattr(demo, "_synthetic_slice", real_slice)
    images, masks = make_demo_dataset(tmp_path / "demo", **SMALL)
    assert len(find_pairs(images, masks)) == 6


def test_existing_empty_folder_is_used_and_foreign_folder_refused(tmp_path):
    (tmp_path / "empty").mkdir()
    images, _ = make_demo_dataset(tmp_path / "empty", **SMALL)
    assert len(list(images.iterdir())) == 6
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "thesis.docx").write_bytes(b"precious")
    with pytest.raises(LungsegError, match=r"mine already exists and is not a lungseg demo"):
        make_demo_dataset(tmp_path / "mine", **SMALL)
    assert (tmp_path / "mine" / "thesis.docx").read_bytes() == b"precious"


def test_too_small_is_an_error(tmp_path):
    with pytest.raises(LungsegError, match="size >= 32"):
        make_demo_dataset(tmp_path / "demo", num_images=2, size=16)


def best_threshold_iou(histograms):
    """Best IoU of `low <= pixel < high` over all gray bands, from (2, 256) pixel counts of
    (the class, everything else)."""
    inside, outside = np.concatenate([np.zeros((2, 1)), histograms.cumsum(axis=1)], axis=1)
    hits = inside[None, :] - inside[:, None]  # [low, high]: class pixels in the band
    false = outside[None, :] - outside[:, None]
    return (hits / (inside[-1] + np.maximum(false, 0))).max()


@pytest.mark.parametrize("size", [48, 128])
def test_masks_decode_into_all_classes_and_need_learning(tmp_path, size):
    images, masks = make_demo_dataset(tmp_path / "demo", num_images=20, size=size)
    counts = np.zeros(len(DEMO_CLASSES), int)
    with_tumour = 0
    histograms = np.zeros((len(DEMO_CLASSES), 2, 256))
    for pair in find_pairs(images, masks):
        image = read_image(pair.image)
        assert image.shape == (size, size) and image.dtype == np.uint8
        raw = read_image(pair.mask)
        assert raw.shape == (size, size, 3)
        label = decode_mask(raw, "palette", pair.mask, DEMO_PALETTE, len(DEMO_CLASSES))
        counts += np.bincount(label.ravel(), minlength=len(DEMO_CLASSES))
        with_tumour += bool((label == 2).any())
        for c in range(len(DEMO_CLASSES)):
            histograms[c, 0] += np.bincount(image[label == c], minlength=256)
            histograms[c, 1] += np.bincount(image[label != c], minlength=256)
    assert (counts > 0).all()
    assert 4 <= with_tumour <= 16  # about half the slices
    assert counts[2] < 0.1 * counts[1]  # tumours are small
    # No gray-level band segments lungs or tumours well (measured IoU 0.59-0.60 and 0.32-0.35;
    # lungs as bright as 80, clear of the air, would reach 0.71).
    assert best_threshold_iou(histograms[1]) < 0.65
    assert best_threshold_iou(histograms[2]) < 0.5


def test_full_size_generation_is_fast(tmp_path):
    start = time.perf_counter()
    make_demo_dataset(tmp_path / "demo")
    # Measured about 1.1 s on 2 CPU cores; the bound leaves room for a busy machine.
    assert time.perf_counter() - start < 4
    assert len(list((tmp_path / "demo" / "images").iterdir())) == 120
