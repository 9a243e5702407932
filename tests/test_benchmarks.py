"""The benchmark scripts run end to end at toy sizes and print their tables; the recipes compose
with their per-architecture settings (conf/recipe/)."""

import importlib.util
import re
import subprocess
import sys

import cv2
import numpy as np
import pytest
from conftest import ROOT
from hydra import compose, initialize_config_dir


def run(script: str, *args: str, cwd=None) -> str:
    result = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / script), *args],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=cwd,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


def table(stdout: str) -> list[list[str]]:
    """The rows of the last Markdown table in ``stdout`` (header first), cells stripped
    (quality.py prints its table again after every run)."""
    lines = stdout.splitlines()
    start = max(i for i, line in enumerate(lines) if line.startswith("|---")) - 1
    rows = [line for line in lines[start:] if line.startswith("|") and "---" not in line]
    return [[cell.strip() for cell in row.strip("|").split("|")] for row in rows]


def test_throughput_prints_one_row_per_architecture_with_positive_rates(tmp_path):
    out = run(
        "throughput.py",
        *("--models", "unet", "fcn", "--width", "4", "--size", "32", "--batch", "2"),
        *("--steps", "2", "--warmup", "1", "--repeats", "2"),
        cwd=tmp_path,
    )
    header, *rows = table(out)
    assert header[:5] == [
        "model",
        "params (M)",
        "lungseg train img/s",
        "bare train img/s",
        "ratio (range)",
    ]
    assert [row[0] for row in rows] == ["unet", "fcn"]
    for row in rows:
        assert len(row) == len(header)
        lungseg, bare, infer, data = (float(row[i]) for i in (2, 3, 5, 10))
        assert min(lungseg, bare, infer, data) > 0
        # The median of the repeats' ratios, and the ratio of the median rates, both lie within
        # the repeats' range of ratios, however much a busy machine slows single repeats.
        ratio, low, high = (float(x) for x in re.findall(r"[\d.]+", row[4]))
        assert low - 0.01 <= ratio <= high + 0.01
        assert low * 0.99 - 0.01 <= lungseg / bare <= high * 1.01 + 0.01
    # The reference product is the better of the CPU's two libraries (MKL's alone made a U-Net
    # look faster than the machine's matrix product on an AMD CPU)
    reference = re.search(
        r"matrix product \(\d+\^3\): ([\d.]+) GFLOP/s \(the better of (.*)\)", out
    )
    assert reference, out[:500]
    rates = dict(re.findall(r"(BLAS|oneDNN) ([\d.]+)", reference.group(2)))
    assert set(rates) == {"BLAS", "oneDNN"}
    assert float(reference.group(1)) == max(float(r) for r in rates.values())


def test_throughput_with_device_augmentation(tmp_path):
    out = run(
        "throughput.py",
        *("--models", "deeplab", "--width", "4", "--size", "32", "--batch", "2"),
        *("--steps", "2", "--warmup", "1", "--repeats", "1", "--augmentation", "device"),
        "--fused-optimizer",
        cwd=tmp_path,
    )
    assert "augmentation device" in out.splitlines()[0]
    assert "fused optimizer True" in out.splitlines()[0]
    header, row = table(out)
    assert row[0] == "deeplab" and float(row[2]) > 0 and float(row[10]) > 0


def write_binary_set(root, n: int = 12, size: int = 40):
    """``n`` image/mask pairs: a bright square on noise, masks 0/1."""
    rng = np.random.default_rng(0)
    for folder in ("images", "masks"):
        (root / folder).mkdir(parents=True)
    for i in range(n):
        mask = np.zeros((size, size), np.uint8)
        y, x = rng.integers(4, size - 16, 2)
        mask[y : y + 12, x : x + 12] = 1
        image = (rng.normal(60, 10, (size, size)) + 120 * mask).clip(0, 255).astype(np.uint8)
        cv2.imwrite(str(root / "images" / f"s{i:02d}.png"), image)
        cv2.imwrite(str(root / "masks" / f"s{i:02d}.png"), mask)


def test_quality_mask_dir_override_takes_one_folder_or_a_list(tmp_path):
    spec = importlib.util.spec_from_file_location("quality", ROOT / "benchmarks" / "quality.py")
    quality = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(quality)
    one = quality.mask_dir_override([str(tmp_path / "masks")])
    assert one == f"data.mask_dir='{tmp_path / 'masks'}'"
    two = quality.mask_dir_override([str(tmp_path / "left"), str(tmp_path / "right")])
    assert two == f"data.mask_dir=['{tmp_path / 'left'}','{tmp_path / 'right'}']"


def test_quality_trains_each_run_and_scores_it_on_the_same_test_images(tmp_path):
    """Masks split over two folders (left and right half of each square; the recipe's binary
    mode unites them), as --mask-dir takes them."""
    data = tmp_path / "data"
    write_binary_set(data)
    for side in ("left", "right"):
        (data / side).mkdir()
    for path in sorted((data / "masks").glob("*.png")):
        mask = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
        left = mask.copy()
        left[:, 20:] = 0
        cv2.imwrite(str(data / "left" / path.name), left)
        cv2.imwrite(str(data / "right" / path.name), mask - left)
    out = run(
        "quality.py",
        *("--image-dir", str(data / "images")),
        *("--mask-dir", str(data / "left"), str(data / "right")),
        *("--experiment", "lung_ct", "--runs", "fcn", "article"),
        *("--out", str(tmp_path / "quality"), "--"),
        *("trainer.max_epochs=1", "data.image_size=32", "model.width=4", "data.batch_size=4"),
    )
    header, *rows = table(out)
    assert header[:6] == [
        "run",
        "parameters (M)",
        "training min",
        "val Dice",
        "val Dice, net px",
        "test Dice mean",
    ]
    assert [row[0] for row in rows] == ["fcn", "article"]
    # lung_ct's test-time flip, not the article's: the footer says which run had which
    assert "# test-time flips: fcn ['horizontal'], article none" in out
    for row in rows:
        assert all(0 <= float(row[i]) <= 1 for i in (3, 5))
    # the checkpoint's own validation Dice: the article's recipe chooses by val/loss instead
    assert 0 <= float(rows[0][4]) <= 1 and rows[1][4] == "n/a"
    # val Dice: eval.py on the validation split, at the masks' resolution
    val_names, test_names = (
        {
            line.split(",")[0]
            for line in (tmp_path / "quality" / "fcn" / f / "per_image.csv")
            .read_text()
            .splitlines()[1:]
        }
        for f in ("eval_val", "eval")
    )
    assert val_names and test_names and not val_names & test_names
    # Both scored on the recipe's test split: the same images.
    fcn_csv = (tmp_path / "quality" / "fcn" / "eval" / "per_image.csv").read_text()
    article_csv = (tmp_path / "quality" / "article" / "eval" / "per_image.csv").read_text()
    names = [[line.split(",")[0] for line in text.splitlines()] for text in (fcn_csv, article_csv)]
    assert names[0] == names[1] and len(names[0]) > 1
    # The FCN row ran lung_ct's FCN settings (conf/recipe/lung_ct_fcn.yaml).
    config = (tmp_path / "quality" / "fcn" / "config.yaml").read_text()
    assert "skips: 4" in config
    assert f"- {data / 'left'}\n  - {data / 'right'}\n" in config  # data.mask_dir, the list


@pytest.mark.parametrize(
    "overrides,skips,size",
    [
        (["experiment=lung_ct"], None, 192),
        (["experiment=lung_ct", "model=fcn"], 4, 256),
        (["experiment=lung_ct", "model=deeplab"], None, 256),
        (["experiment=lung_ct", "model=deeplab", "data.image_size=160"], None, 160),
        (["model=fcn"], 2, 128),
        (["experiment=lidc_nodules", "model=fcn"], 2, 128),
    ],
)
def test_recipes_pick_up_their_per_architecture_settings(overrides, skips, size):
    with initialize_config_dir(str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("config", overrides=overrides)
    assert cfg.model.get("skips") == skips
    assert cfg.data.image_size == size  # the command line still wins


@pytest.mark.parametrize("script", ["prepare.sh", "env.sh", "speed.sh", "nodules.sh"])
def test_device_scripts_parse(script):
    """benchmarks/device/ runs only in a GPU lending (SMOKE=1 runs it on the CPU in minutes):
    at least a syntax error must not wait for one."""
    result = subprocess.run(
        ["bash", "-n", str(ROOT / "benchmarks" / "device" / script)], capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr


def test_quality_reports_user_errors_in_one_line_and_names_out(tmp_path):
    """Were tracebacks; a rerun into the same --out was told to leave hydra.run.dir unset."""
    write_binary_set(tmp_path / "data")
    (tmp_path / "out" / "fcn").mkdir(parents=True)
    (tmp_path / "out" / "fcn" / "metrics.json").write_text("{}")
    for image_dir, out, message in [
        (tmp_path / "missing", "new", f"The image folder {tmp_path / 'missing'} does not exist"),
        (tmp_path / "data/images", "out", f"--out {tmp_path / 'out'} already holds the run fcn"),
    ]:
        result = subprocess.run(
            [sys.executable, str(ROOT / "benchmarks" / "quality.py")]
            + ["--image-dir", str(image_dir), "--mask-dir", str(tmp_path / "data" / "masks")]
            + ["--runs", "fcn", "--out", str(tmp_path / out), "--", "data.image_size=32"],
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr[-3000:]
        assert result.stderr.startswith(f"lungseg: error: {message}"), result.stderr
        assert "hydra.run.dir" not in result.stderr


@pytest.mark.parametrize(
    "override, message",
    [
        (
            "model.widht=8",
            "Could not override 'model.widht': the config has no such key; did you mean "
            "model.width?",
        ),
        ("experiment=lung_cd", "In 'config': Could not find 'experiment/lung_cd'"),
        ("data.split=[0.5", "no viable alternative at input '[0.5'"),
    ],
)
def test_quality_reports_config_errors_in_one_line(tmp_path, override, message):
    """Were Hydra's tracebacks (a misspelt key, an unknown recipe, an override that does not
    parse), where train.py gives Hydra's message alone."""
    write_binary_set(tmp_path / "data")
    result = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "quality.py")]
        + ["--image-dir", str(tmp_path / "data" / "images")]
        + ["--mask-dir", str(tmp_path / "data" / "masks"), "--runs", "fcn"]
        + ["--out", str(tmp_path / "out"), "--", override],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr[-3000:]
    (line,) = result.stderr.splitlines()
    assert line.startswith(f"lungseg: error: {message}"), line
    assert not (tmp_path / "out").exists()
