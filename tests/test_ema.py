"""callbacks.ema: an exponential moving average of the weights is validated, checkpointed and
tested; the trained weights travel along, so a continued run goes on as an uninterrupted one."""

import logging
import math
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf
from test_robustness import DETERMINISTIC, LEAN, assert_same_metrics, restore_deterministic_mode

from lungseg.callbacks import EMA
from lungseg.inference import load_checkpoint
from lungseg.train import train

__all__ = ["restore_deterministic_mode"]  # the autouse fixture, for this module too
EMA_ON = "callbacks.ema.enabled=true"


def test_half_life_is_counted_in_epochs():
    ema = EMA(enabled=True, half_life_epochs=2)
    trainer = type("T", (), {"num_training_batches": 10, "accumulate_grad_batches": 1})()
    ema.on_train_start(trainer, None)
    assert ema.decay == pytest.approx(0.5 ** (1 / 20))
    assert ema.decay**20 == pytest.approx(0.5)
    # after 1 / (1 - decay) = 29.4 steps the exponential average; before, the plain mean
    averaged = ema._average(torch.zeros(3), torch.ones(3), torch.tensor(30))
    assert torch.allclose(averaged, torch.full((3,), 1 - ema.decay))
    mean = torch.full((3,), 4.0)  # the first step's weights, copied (then num_averaged = 1)
    for n, step in enumerate([8.0, 0.0], start=1):
        mean = ema._average(mean, torch.full((3,), step), torch.tensor(n))
    assert torch.allclose(mean, torch.full((3,), 4.0))
    count = ema._average(torch.tensor(7), torch.tensor(9), torch.tensor(2))  # BatchNorm's count
    assert count.dtype == torch.int64 and count.item() == 9
    with pytest.raises(ValueError, match="half_life_epochs must be > 0"):
        EMA(enabled=True, half_life_epochs=0)


def retest(ckpt, state_dict=None) -> float:
    """The test Dice of a checkpoint, scored anew (eval.py's loader: the state_dict)."""
    run = ckpt.parent.parent
    cfg = OmegaConf.load(run / "config.yaml")
    datamodule = instantiate(
        cfg.data, augmentation=OmegaConf.to_container(cfg.augmentation), _convert_="all"
    )
    model = load_checkpoint(ckpt, torch.device("cpu"))
    if state_dict is not None:
        model.load_state_dict(state_dict)
    trainer = pl.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False)
    return trainer.test(model, datamodule=datamodule, verbose=False)[0]["test/dice"]


def test_the_average_is_validated_saved_and_tested(make_cfg, caplog):
    with caplog.at_level(logging.INFO, logger="lungseg"):
        metrics = train(make_cfg(*LEAN, EMA_ON, "trainer.max_epochs=2"))
    assert "weight averaging: EMA decay 0.70711 per step (half-life 1 epochs of 2 steps)" in (
        caplog.text
    )
    ckpt = Path(metrics["best_checkpoint"])
    saved = torch.load(ckpt, map_location="cpu", weights_only=True)
    trained = saved["current_model_state"]
    assert saved["state_dict"].keys() == trained.keys()
    assert any(not torch.equal(saved["state_dict"][k], trained[k]) for k in trained)
    # the test after fitting scored the average, which eval.py and predict.py load too
    assert retest(ckpt) == pytest.approx(metrics["test/dice"], abs=1e-6)
    assert retest(ckpt, trained) != pytest.approx(metrics["test/dice"], abs=1e-6)


def test_off_by_default(make_cfg):
    metrics = train(make_cfg(*LEAN, "trainer.max_epochs=1"))
    saved = torch.load(metrics["best_checkpoint"], map_location="cpu", weights_only=True)
    assert "current_model_state" not in saved and "averaging_state" not in saved


def test_a_continued_run_averages_as_an_uninterrupted_one(make_cfg, tmp_path):
    common = [*LEAN, EMA_ON, DETERMINISTIC, "scheduler=none"]
    whole = train(make_cfg(*common, "trainer.max_epochs=3", f"output_dir={tmp_path / 'whole'}"))
    part = tmp_path / "part"
    train(make_cfg(*common, "trainer.max_epochs=2", f"output_dir={part}"))
    resumed = train(make_cfg(*common, "trainer.max_epochs=3", f"output_dir={part}", "resume=true"))
    assert resumed["epochs_trained"] == 3
    assert_same_metrics(whole, resumed)
    a, b = (
        torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
        for run in (tmp_path / "whole", part)
    )
    for key in ("state_dict", "current_model_state"):
        for name, value in a[key].items():
            assert torch.allclose(value.float(), b[key][name].float(), atol=1e-6), (key, name)
    assert math.isfinite(resumed["test/dice"])


def test_the_prediction_grid_shows_the_weights_validation_scores(make_cfg, monkeypatch):
    """val/predictions is drawn from the weights validation scores: with weight averaging the
    average, which EMA swaps back out in its own on_validation_epoch_end (before the grid's,
    in the callbacks' order), so the grid is drawn during the epoch."""
    import lungseg.visualize
    from lungseg.module import SegmentationModule

    scored, drawn = [], []
    step, grid = SegmentationModule.validation_step, lungseg.visualize.prediction_grid

    def validation_step(self, batch, batch_idx):
        module[:] = [self]
        if batch_idx == 0 and not self.trainer.sanity_checking:
            scored.append({k: v.clone() for k, v in self.state_dict().items()})
        return step(self, batch, batch_idx)

    def prediction_grid(*args, **kwargs):
        drawn.append({k: v.clone() for k, v in module[0].state_dict().items()})
        return grid(*args, **kwargs)

    module = []
    monkeypatch.setattr(SegmentationModule, "validation_step", validation_step)
    monkeypatch.setattr(lungseg.visualize, "prediction_grid", prediction_grid)
    train(make_cfg(EMA_ON, "trainer.max_epochs=2"))  # TensorBoard and the grid on
    assert len(drawn) == len(scored) == 2
    for at_grid, at_validation in zip(drawn, scored, strict=True):
        assert all(torch.equal(at_grid[k], at_validation[k]) for k in at_grid)


def test_bf16_weights_are_averaged_in_float32(make_cfg):
    """trainer.precision=bf16-true keeps the weights in bfloat16, whose resolution a step's
    share of the average falls below once the decay nears 1 (the average stopped moving):
    the average is kept in float32. The run, with the model summary and the prediction grid
    feeding float32 images to bf16 weights, goes through."""
    cfg = make_cfg(EMA_ON, "trainer.max_epochs=2", "trainer.precision=bf16-true")
    metrics = train(cfg)
    assert math.isfinite(metrics["test/dice"])
    saved = torch.load(Path(cfg.output_dir) / "checkpoints" / "last.ckpt", weights_only=True)
    trained = saved["current_model_state"]
    assert {v.dtype for k, v in trained.items() if k.endswith(".weight")} == {torch.bfloat16}
    assert {v.dtype for k, v in saved["state_dict"].items() if k.endswith(".weight")} == {
        torch.float32
    }
    ema = EMA(enabled=True, half_life_epochs=1)
    ema.on_train_start(
        type("T", (), {"num_training_batches": 200, "accumulate_grad_batches": 1})(), None
    )
    averaged, target = torch.zeros(1000), torch.full((1000,), 0.02, dtype=torch.bfloat16)
    for n in range(1000, 1200):  # one half-life after the warm-up: halfway to the weights
        averaged = ema._average(averaged, target, torch.tensor(n))
    assert averaged.dtype == torch.float32
    assert averaged.mean().item() == pytest.approx(0.01, rel=0.01)


def test_the_average_follows_the_module_to_its_device():
    """Lightning builds the average in setup, before the strategy moves the module: it is
    moved after it (on a GPU it stayed in host memory, and every step copied the weights)."""
    module = pl.LightningModule()
    module.layer = torch.nn.Linear(2, 2)
    ema = EMA(enabled=True)
    ema.setup(None, module, "fit")
    module.to("meta")  # as the strategy moves it to the training device
    ema.on_fit_start(None, module)
    assert {p.device.type for p in ema._average_model.parameters()} == {"meta"}
