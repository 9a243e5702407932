import struct
from pathlib import Path

import numpy as np
from matplotlib.image import imread
from torch.utils.tensorboard import SummaryWriter

from lungseg.train import train
from lungseg.visualize import CURVES, plot_curves, read_epoch_scalars

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def png_size(path: Path) -> tuple[int, int]:
    """(width, height) from the IHDR chunk of a PNG file, after checking the signature."""
    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE and data[12:16] == b"IHDR", f"{path} is not a PNG"
    return struct.unpack(">II", data[16:24])


def assert_drawn(path: Path) -> None:
    """A real figure: a sensible size, and many distinct colours (lines, text, not a blank)."""
    width, height = png_size(path)
    assert width > 600 and 200 < height < width
    pixels = imread(path)[..., :3].reshape(-1, 3)
    assert len(np.unique(pixels, axis=0)) > 50


def test_plot_curves_draws_three_panels_from_histories(tmp_path):
    epochs = range(6)
    history = {
        "train/loss_epoch": [(e, 1.0 / (e + 1)) for e in epochs],
        "val/loss": [(e, 1.2 / (e + 1)) for e in epochs],
        "train/acc": [(e, 0.5 + 0.08 * e) for e in epochs],
        "val/acc": [(e, 0.45 + 0.08 * e) for e in epochs],
        "train/dice": [(e, 0.1 * e) for e in epochs],
        "val/dice": [(e, 0.09 * e) for e in epochs],
    }
    path = tmp_path / "curves.png"
    plot_curves(history, path, best_epoch=4)
    assert_drawn(path)
    # Missing tags (e.g. no validation) leave their lines out rather than failing.
    plot_curves({"train/loss_epoch": history["train/loss_epoch"]}, tmp_path / "partial.png")
    assert png_size(tmp_path / "partial.png") == png_size(path)


def test_read_epoch_scalars_maps_steps_to_epochs_and_keeps_the_latest(tmp_path):
    # Lightning's layout: values at step = optimiser steps, an "epoch" scalar at the same step.
    with SummaryWriter(tmp_path) as writer:
        for epoch, step in enumerate([4, 8, 12]):
            writer.add_scalar("epoch", epoch, step)
            writer.add_scalar("val/loss", 1.0 - 0.25 * epoch, step)
            writer.add_scalar("train/loss_step", 5.0, step - 1)  # per step: not an epoch curve
        # A resumed run writes epoch 2 again, later.
        writer.add_scalar("epoch", 2, 13)
        writer.add_scalar("val/loss", 0.125, 13)
    history = read_epoch_scalars(tmp_path, ["val/loss", "train/loss_step", "val/dice"])
    assert history == {"val/loss": [(0, 1.0), (1, 0.75), (2, 0.125)]}
    assert set(read_epoch_scalars(tmp_path)) == {"val/loss"}  # default: the CURVES tags


def test_training_run_writes_curves_png(make_cfg):
    cfg = make_cfg("trainer.max_epochs=2")
    train(cfg)
    run = Path(cfg.output_dir)
    assert_drawn(run / "curves.png")
    history = read_epoch_scalars(run / "tensorboard")
    assert set(history) == {tag for _, *tags in CURVES for tag in tags}
    for values in history.values():
        assert [epoch for epoch, _ in values] == [0, 1]
        assert all(np.isfinite(value) for _, value in values)


def test_runs_without_epoch_scalars_skip_the_figure(make_cfg):
    cfg = make_cfg("trainer.fast_dev_run=true")  # Lightning swaps the loggers for a dummy
    train(cfg)
    assert not (Path(cfg.output_dir) / "curves.png").exists()
