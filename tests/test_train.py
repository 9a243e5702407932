import json
import logging
import math
import re
import shutil
import subprocess
import sys
import types
from pathlib import Path

import cv2
import numpy as np
import pytest
import pytorch_lightning
import pytorch_lightning.callbacks.timer
import torch
from conftest import ROOT, TINY
from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf import OmegaConf

import lungseg.callbacks
from lungseg.errors import LungsegError
from lungseg.module import SegmentationModule
from lungseg.run_folder import LOCK_FILE, hold_run_folder
from lungseg.train import (
    accelerator_settings,
    build_datamodule,
    cpu_bf16_hint,
    postprocessed_test,
    stop_reason,
    train,
)

ARCHITECTURES = ["unet", "fcn", "segnet", "deeplab"]


@pytest.mark.parametrize("model", ARCHITECTURES)
def test_training_run_writes_the_run_record(make_cfg, model):
    cfg = make_cfg(f"model={model}")
    metrics = train(cfg)
    run = Path(cfg.output_dir)
    saved = json.loads((run / "metrics.json").read_text())
    assert saved["test/loss"] == pytest.approx(metrics["test/loss"])
    for key in ("test/acc", "test/dice", "test/dice_lung", "test/iou_tumour", "best_epoch"):
        assert key in saved
    assert 0.0 <= saved["test/acc"] <= 1.0 and saved["stopped_by"] == "max_epochs"
    assert (run / "checkpoints" / "last.ckpt").is_file()
    assert saved["best_checkpoint"] and list((run / "checkpoints").glob("best-epoch*.ckpt"))
    assert list((run / "tensorboard").glob("events.out.tfevents.*"))
    split = (run / "split.csv").read_text().splitlines()
    assert split[0] == "file,split" and len(split) == 17
    resolved = OmegaConf.load(run / "config.yaml")
    assert resolved.model.num_classes == 3  # inferred from the demo's palette masks


def test_a_time_limit_that_cuts_the_planned_epochs_is_named(make_cfg, caplog):
    """trainer.max_time ending fit before trainer.max_epochs: a warning says so (the cosine
    schedule was planned for all epochs; callbacks.time_plan is off by default) and
    metrics.json records why training stopped."""
    cfg = make_cfg(
        "trainer.max_epochs=1000", "trainer.max_time=00:00:00:02", "test_after_fit=false"
    )
    metrics = train(cfg)
    assert metrics["stopped_by"] == "max_time" and metrics["epochs_trained"] < 1000
    assert f"trainer.max_time stopped training after {metrics['epochs_trained']} of" in caplog.text
    # the rate and its share of the first (was: the rate, read as a share of the schedule)
    assert re.search(
        r"trainer\.max_epochs=1000 epochs, with the learning rate at 0\.00\d+, \d+ % of its "
        r"first 0\.002, on a schedule planned for 1000 epochs",
        caplog.text,
    )


class Interrupted(Exception):
    pass


@pytest.fixture
def half_second_epochs(monkeypatch):
    """Lightning's Timer and callbacks.time_plan read a clock that each epoch moves by 0.5 s,
    so the number of epochs does not depend on this machine's speed or load. Returns
    {epoch: learning rate it trained with}, filled as runs train, and a setter for the epoch
    at whose end a run is interrupted (an exception, as a crash would)."""
    clock = types.SimpleNamespace(now=1000.0, stop_at=None)
    fake = types.SimpleNamespace(monotonic=lambda: clock.now)
    monkeypatch.setattr(lungseg.callbacks, "time", fake)
    monkeypatch.setattr(pytorch_lightning.callbacks.timer, "time", fake)
    rates: dict[int, float] = {}
    original = SegmentationModule.on_train_epoch_end

    def epoch_start(self):  # after the callbacks' hooks: the rate this epoch trains with
        rates[self.current_epoch] = self.trainer.optimizers[0].param_groups[0]["lr"]
        clock.now += 0.5

    def epoch_end(self):
        if self.current_epoch == clock.stop_at:
            raise Interrupted
        original(self)

    monkeypatch.setattr(SegmentationModule, "on_train_epoch_start", epoch_start, raising=False)
    monkeypatch.setattr(SegmentationModule, "on_train_epoch_end", epoch_end)
    return rates, lambda epoch: setattr(clock, "stop_at", epoch)


TIME_PLAN = (
    "callbacks.time_plan.enabled=true",
    "trainer.max_epochs=100",
    "trainer.max_time=00:00:00:05",
    "test_after_fit=false",
)


def cosine(step: int, length: int, base: float = 2e-3, low: float = 1e-5) -> float:
    return low + (base - low) * (1 + math.cos(math.pi * step / length)) / 2


def test_a_cosine_schedule_is_fitted_to_the_time_limit(make_cfg, half_second_epochs, caplog):
    """With trainer.max_time and callbacks.time_plan.enabled=true the cosine decay ends in
    the epochs that fit in the time (the time limit cuts it half-way otherwise): the last
    epochs train on a schedule of that length, training stops there, metrics.json says so,
    and the same command again is refused as finished. Without the limit it trains on with
    the configured schedule."""
    rates, _ = half_second_epochs
    caplog.set_level(logging.INFO, logger="lungseg.callbacks")
    metrics = train(make_cfg(*TIME_PLAN))
    run = Path(make_cfg().output_dir)
    # 5 s of 0.5-s epochs, each planned 10 % longer with half an epoch to spare: 8 planned
    # after the first epoch, 9 from the fifth on, as the time kept spare is not used
    assert metrics["epochs_trained"] == 9 and metrics["planned_epochs"] == 9
    assert metrics["stopped_by"] == "max_time"
    assert "the cosine schedule now ends after epoch 8 of trainer.max_epochs=100" in caplog.text
    assert "the cosine schedule now ends after epoch 9 of trainer.max_epochs=100" in caplog.text
    assert "trainer.max_time stopped training" not in caplog.text  # not cut by the Timer
    # Epochs 5-8 train on the cosine of 9 epochs (before, the rate stayed near its start).
    assert [rates[k] for k in range(5, 9)] == pytest.approx([cosine(k, 9) for k in range(5, 9)])
    last = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    schedule = last["lr_schedulers"][0]
    assert schedule["T_max"] == 9 and schedule["lungseg_time_plan"]["epochs"] == 9

    with pytest.raises(LungsegError, match="left time for"):
        train(make_cfg(*TIME_PLAN, "resume=true"))
    more = train(
        make_cfg(*TIME_PLAN, "trainer.max_time=null", "resume=true", "trainer.max_epochs=10")
    )
    assert more["epochs_trained"] == 10 and more["planned_epochs"] is None
    assert more["stopped_by"] == "max_epochs"
    assert rates[9] == pytest.approx(cosine(9, 10))  # the configured length, 10 epochs


def test_a_fitted_run_continues_as_it_would_have_run_on(make_cfg, half_second_epochs, tmp_path):
    """An interrupted run continued with the same settings trains every epoch at the rate of
    the uninterrupted run; one continued with more time is planned again before its first
    epoch (not one epoch on the configured 100-epoch schedule first)."""
    rates, interrupt_after = half_second_epochs
    train(make_cfg(*TIME_PLAN))
    whole = dict(rates)
    rates.clear()
    cut = (*TIME_PLAN, f"output_dir={tmp_path / 'cut'}")
    interrupt_after(3)
    with pytest.raises(Interrupted):
        train(make_cfg(*cut))
    interrupt_after(None)
    metrics = train(make_cfg(*cut, "resume=true"))
    assert metrics["epochs_trained"] == len(whole) == 9
    assert rates == pytest.approx(whole)

    rates.clear()
    longer = train(make_cfg(*cut, "resume=true", "trainer.max_time=00:00:00:08"))
    # 3.5 s left after 9 epochs: planned at once for 14 (0.55 s an epoch, half an epoch
    # spare), 15 later as the spare time is not used
    assert rates[9] == pytest.approx(cosine(9, 14))
    assert longer["epochs_trained"] == longer["planned_epochs"] == 15


def files_of(run: Path) -> dict[Path, int]:
    return {p: p.stat().st_mtime_ns for p in run.rglob("*") if p.is_file()}


@pytest.mark.parametrize(
    ("stop", "limit", "refused", "longer"),
    [
        (
            "max_steps",
            ["trainer.max_epochs=5", "trainer.max_steps=3"],  # in epoch 1 of 2 batches each
            "has trained 3 optimiser steps and trainer.max_steps is 3: nothing is left",
            "trainer.max_steps=5",
        ),
        (
            "max_time",
            ["trainer.max_epochs=100", "trainer.max_time=00:00:00:02"],  # 4 epochs of 0.5 s
            r"has trained for 0:00:02 \(h:mm:ss\), all of trainer.max_time=00:00:00:02",
            "trainer.max_time=00:00:00:03",
        ),
    ],
    ids=["max_steps", "max_time"],
)
def test_a_run_that_a_step_or_time_limit_ended_is_not_trained_again(
    make_cfg, half_second_epochs, stop, limit, refused, longer
):
    """Running the command of such a run again changes nothing (it trained nothing, tested
    again and rewrote metrics.json, keeping the first as metrics.1.json, with another
    epochs_trained); a larger limit trains it further."""
    first = train(make_cfg(*limit, "test_after_fit=false"))
    run = Path(make_cfg().output_dir)
    before = files_of(run)
    with pytest.raises(LungsegError, match=refused) as error:
        train(make_cfg(*limit, "test_after_fit=false", "resume=true"))
    assert files_of(run) == before
    # the model to score is the best checkpoint, not last.ckpt (the run validated)
    (best,) = (run / "checkpoints").glob("best-epoch*.ckpt")
    assert f"score it with `python eval.py ckpt_path={best}`" in str(error.value)
    more = train(make_cfg(*limit, longer, "test_after_fit=false", "resume=true"))
    assert more["epochs_trained"] > first["epochs_trained"]
    assert more["stopped_by"] == first["stopped_by"] == stop


# The epoch number as the best checkpoint's score: each new epoch is better (max) or none (min).
BY_EPOCH = ("callbacks.model_checkpoint.monitor=epoch", "test_after_fit=false")


@pytest.mark.parametrize("mode", ["max", "min"])
def test_continuing_a_finished_run_keeps_its_earlier_best_checkpoint(make_cfg, caplog, mode):
    """Was: continued with more epochs, a finished run's best checkpoint was removed by the
    top-k of the callback that keeps the best, when a new epoch beat it, while metrics.1.json
    (the earlier run's record) still named it. It is kept, and named there, only then."""
    by_epoch = (*BY_EPOCH, f"callbacks.model_checkpoint.mode={mode}")
    train(make_cfg(*by_epoch))
    run = Path(make_cfg().output_dir)
    folder = run / "checkpoints"
    with caplog.at_level(logging.INFO):
        more = train(make_cfg(*by_epoch, "resume=true", "trainer.max_epochs=2"))
    earlier = json.loads((run / "metrics.1.json").read_text())["best_checkpoint"]
    assert torch.load(earlier, map_location="cpu", weights_only=True)["epoch"] == 0
    if mode == "max":
        assert more["best_checkpoint"] == str(folder / "best-epoch001.ckpt")
        assert earlier == str(folder / "earlier-best-epoch000.ckpt")
        said = "best-epoch000.ckpt, the best checkpoint of the run's record metrics.json, is kept "
        assert said + "as earlier-best-epoch000.ckpt (which the record names now)" in caplog.text
    else:  # nothing removed: nothing kept beside
        assert earlier == more["best_checkpoint"] == str(folder / "best-epoch000.ckpt")
    names = {Path(earlier).name, Path(more["best_checkpoint"]).name, "last.ckpt"}
    assert sorted(p.name for p in folder.iterdir()) == sorted(names)


def test_a_moved_run_folder_keeps_its_best_checkpoint_when_resumed(make_cfg, tmp_path, caplog):
    """Was: Lightning's checkpoint callback forgets the best it recorded when its folder has
    changed, so a run folder moved elsewhere and resumed tested a new epoch's checkpoint
    (epoch 0 stays the best here) and kept the earlier best beside it for good."""
    by_epoch = (*BY_EPOCH, "callbacks.model_checkpoint.mode=min")
    train(make_cfg(*by_epoch))
    moved = tmp_path / "elsewhere" / "moved"
    shutil.move(tmp_path / "run", moved)
    with caplog.at_level(logging.INFO):
        metrics = train(
            make_cfg(*by_epoch, f"output_dir={moved}", "resume=true", "trainer.max_epochs=3")
        )
    folder = moved / "checkpoints"
    assert f"and now names the same files in {folder}" in caplog.text
    assert metrics["best_checkpoint"] == str(folder / "best-epoch000.ckpt")
    assert metrics["best_epoch"] == 0 and metrics["best_score"] == 0
    assert sorted(p.name for p in folder.iterdir()) == ["best-epoch000.ckpt", "last.ckpt"]


def test_a_checkpoint_callback_of_the_users_elsewhere_keeps_its_own_record(
    make_cfg, tmp_path, caplog, monkeypatch
):
    """A checkpoint callback the user adds that saves elsewhere (a mirror on another disk) is
    not the run's: resumed in its unmoved run folder, whose checkpoints/ holds a file of the
    same name, its record was taken for a moved run's, pointed at the run's file, and the
    log said the folder was moved (found by a review)."""
    backup = tmp_path / "backup"
    mirror = {
        "_target_": "pytorch_lightning.callbacks.ModelCheckpoint",
        "dirpath": backup,
        "filename": "last",
        "monitor": "null",
        "mode": "max",  # another state key than callbacks.last_checkpoint's
    }
    settings = [f"+callbacks.mirror.{key}={value}" for key, value in mirror.items()]
    settings.append("test_after_fit=false")
    train(make_cfg(*settings, "trainer.max_epochs=2"))  # last.ckpt records the mirror's file
    loaded = {}
    original = pytorch_lightning.callbacks.ModelCheckpoint.load_state_dict

    def spy(self, state_dict):
        loaded[self.dirpath] = state_dict["dirpath"]
        original(self, state_dict)

    monkeypatch.setattr(pytorch_lightning.callbacks.ModelCheckpoint, "load_state_dict", spy)
    with caplog.at_level(logging.INFO):
        train(make_cfg(*settings, "resume=true", "trainer.max_epochs=3"))
    assert loaded[str(backup)] == str(backup)
    assert "moved or renamed" not in caplog.text
    assert (backup / "last.ckpt").is_file()


def test_patience_that_runs_out_in_the_last_planned_epoch_is_not_an_early_stop():
    """metrics.json said early_stopping for a run that trained all its 40 epochs (its best
    epoch 29, patience 10), while Lightning printed that max_epochs was reached."""
    stopped = types.SimpleNamespace(stopping_reason=None, stopped_epoch=39)
    trainer = types.SimpleNamespace(
        fast_dev_run=False,
        current_epoch=40,
        max_epochs=40,
        early_stopping_callbacks=[stopped],
        callbacks=[stopped],
        max_steps=-1,
        global_step=400,
    )
    assert stop_reason(trainer, 40) == "max_epochs"
    # a run tested after its training (the trainer's max_epochs set to the epochs trained)
    assert stop_reason(types.SimpleNamespace(**{**vars(trainer), "max_epochs": 40}), 50) == (
        "early_stopping"
    )
    stopped.stopped_epoch, trainer.current_epoch = 20, 21
    assert stop_reason(trainer, 40) == "early_stopping"


def test_a_second_training_in_a_run_folder_in_use_is_refused(make_cfg):
    """resume=true while the run still trained (its first process not stopped) trained both
    into one folder, each writing over the other's checkpoints, logs and metrics.json."""
    cfg = make_cfg("resume=true")
    run = Path(cfg.output_dir)
    run.mkdir()
    with hold_run_folder(run):  # another process's training, as the OS sees the lock
        with pytest.raises(LungsegError, match=r"is in use: a training runs in it \(pid \d+ on"):
            train(cfg)
        assert [p.name for p in run.iterdir()] == [LOCK_FILE]
    # a lock file left by a killed run holds nothing
    (run / LOCK_FILE).write_text("pid 1 on elsewhere, since 2026-01-01 00:00:00\n")
    train(cfg)
    assert (run / "metrics.json").is_file() and not (run / LOCK_FILE).exists()


def test_a_run_continued_with_other_model_settings_is_refused(make_cfg, tmp_path, caplog):
    """Settings that keep the weights' shapes but change what the network computes (DeepLab's
    output_stride and atrous_rates, a dropout) were taken by a resumed run, and its checkpoint
    then claimed them. A continued run now stops, naming them; into a new folder they fine-tune
    the weights, with a warning. A checkpoint without a setting (an older lungseg's) is not
    refused for it."""
    deeplab = ["model=deeplab", "model.width=4", "test_after_fit=false"]
    train(make_cfg(*deeplab))
    run = Path(make_cfg().output_dir)
    last = run / "checkpoints" / "last.ckpt"
    before = files_of(run)
    other = ["model.output_stride=8", "model.dropout=0.5", "trainer.max_epochs=2"]
    with pytest.raises(LungsegError) as error:
        train(make_cfg(*deeplab, *other, "resume=true"))
    message = str(error.value)
    assert f"{last} was trained with other model settings than this run gives: " in message
    assert "model.dropout 0.5 (the checkpoint: 0.1); model.output_stride 8 (the check" in message
    assert f"in a new run folder: ckpt_path={last} with hydra.run.dir unset" in message
    assert files_of(run) == before

    finetuned = tmp_path / "finetuned"
    train(make_cfg(*deeplab, *other, f"ckpt_path={last}", f"output_dir={finetuned}"))
    assert f"ckpt_path {last}: its weights are fine-tuned with other model settings" in caplog.text
    assert "trained with: model.dropout 0.5 (the checkpoint: 0.1); model.output_str" in caplog.text
    saved = torch.load(finetuned / "checkpoints" / "last.ckpt", weights_only=True)
    assert saved["hyper_parameters"]["net"]["output_stride"] == 8

    older = torch.load(last, weights_only=True)
    del older["hyper_parameters"]["net"]["atrous_rates"]
    torch.save(older, last)
    more = train(
        make_cfg(*deeplab, "model.atrous_rates=[1,2,3]", "trainer.max_epochs=2", "resume=true")
    )
    assert more["epochs_trained"] == 2


def test_a_run_continued_on_data_prepared_otherwise_is_refused(make_cfg, tmp_path, caplog):
    """Another data.image_size, normalisation or image folder (a 16-bit copy of 8-bit images:
    other statistics) on resume trained on images the weights never saw, and tested the best
    checkpoint, made from the earlier ones, on the new (test Dice 0.98 -> 0.95 on lung_ct at
    128 -> 64 px). A continued run now stops, naming them; into a new folder they fine-tune,
    with a warning."""
    train(make_cfg("test_after_fit=false"))
    run = Path(make_cfg().output_dir)
    last = run / "checkpoints" / "last.ckpt"
    before = files_of(run)
    other = ["data.image_size=24", "data.normalize=image", "trainer.max_epochs=2"]
    with pytest.raises(LungsegError) as error:
        train(make_cfg(*other, "resume=true"))
    message = str(error.value)
    assert f"{last} was trained on data prepared otherwise than this run's: " in message
    assert "image_size [24, 24] (the checkpoint: [32, 32]); normalize 'image' (the" in message
    assert f"in a new run folder: ckpt_path={last} with hydra.run.dir unset" in message
    assert files_of(run) == before
    finetuned = tmp_path / "finetuned"
    train(make_cfg(*other, f"ckpt_path={last}", f"output_dir={finetuned}"))
    assert f"ckpt_path {last}: its weights are fine-tuned on data prepared otherwise" in caplog.text
    assert "whose run trained on" not in caplog.text  # the same split
    assert train(make_cfg("trainer.max_epochs=2", "resume=true"))["epochs_trained"] == 2
    # Fine-tuned with another split, it would test on what the checkpoint's run trained on.
    reseeded = ["data.seed=7", "trainer.max_epochs=3", f"ckpt_path={last}"]
    train(make_cfg(*reseeded, f"output_dir={tmp_path / 'reseeded'}"))
    assert f"This run fine-tunes {last}, whose run trained on " in caplog.text
    assert f"Give data.split_file={run / 'split.csv'} to keep that run's split." in caplog.text


@pytest.mark.parametrize(
    ("first", "then"),
    [("adamw", "sgd"), ("sgd", "adam")],
)
def test_a_checkpoint_continued_with_another_optimiser_is_refused(make_cfg, tmp_path, first, then):
    """A ckpt_path restores the optimiser's state, which another optimiser class cannot take:
    torch stopped at the first step with a KeyError ('momentum', 'step'), after the run folder
    was written."""
    train(make_cfg(f"optimizer={first}", "test_after_fit=false"))
    last = Path(make_cfg().output_dir) / "checkpoints" / "last.ckpt"
    names = {"adamw": "torch.optim.AdamW", "adam": "torch.optim.Adam", "sgd": "torch.optim.SGD"}
    new = tmp_path / "new"
    with pytest.raises(LungsegError) as error:
        train(
            make_cfg(
                f"optimizer={then}",
                f"ckpt_path={last}",
                f"output_dir={new}",
                "trainer.max_epochs=2",
            )
        )
    message = str(error.value)
    assert f"{last} was trained with the optimiser {names[first]}, but this run" in message
    assert f"configures {names[then]}: continuing from a checkpoint restores" in message
    assert f"Continue with the optimiser it was trained with ({names[first]}, with" in message
    assert "or start a new run without ckpt_path" in message
    assert not any(new.iterdir())


def test_a_new_cosine_length_keeps_the_position():
    """set_cosine_length gives the rate the new length has at the current step, and torch's
    recursive steps go on along the new curve."""
    weights = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.SGD([weights], lr=2e-3)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=100, eta_min=1e-5)
    for _ in range(3):
        optimizer.step()
        schedule.step()
    lungseg.callbacks.set_cosine_length(schedule, 10)
    seen = []
    for _ in range(7):
        seen.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        schedule.step()
    assert seen == pytest.approx([cosine(k, 10) for k in range(3, 10)])


def test_a_time_limit_that_leaves_room_changes_nothing(make_cfg):
    cfg = make_cfg(
        "callbacks.time_plan.enabled=true",
        "trainer.max_epochs=2",
        "trainer.max_time=00:01:00:00",
        "test_after_fit=false",
    )
    metrics = train(cfg)
    assert metrics["stopped_by"] == "max_epochs" and metrics["planned_epochs"] is None
    last = torch.load(
        Path(cfg.output_dir) / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True
    )
    assert last["lr_schedulers"][0]["T_max"] == 2


def test_soft_masks_train_with_every_loss_family(make_cfg, tmp_path):
    """data.soft_masks: the module hands the class fractions to the loss and the arg-max mask to
    the metrics, for the Dice, cross-entropy and focal families alike."""
    seen = []
    original = SegmentationModule._step

    def step(self, batch, stage, batch_idx=0):
        seen.append((batch["target"].dtype, batch["target"].dim(), batch["mask"].dtype))
        forward = self.loss_fn.forward
        self.loss_fn.forward = lambda logits, target: (
            seen.append(("loss", target.dtype, tuple(target.shape) == tuple(logits.shape)))
            or forward(logits, target)
        )
        return original(self, batch, stage, batch_idx)

    for loss in ("dice_ce", "focal", "tversky"):
        cfg = make_cfg("data.soft_masks=true", f"loss={loss}", f"output_dir={tmp_path / loss}")
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(SegmentationModule, "_step", step)
            metrics = train(cfg)
        assert torch.isfinite(torch.tensor(metrics["test/loss"]))
        assert 0.0 <= metrics["test/dice"] <= 1.0
    assert seen and (torch.float32, 4, torch.int64) in seen
    assert {entry for entry in seen if entry[0] == "loss"} == {("loss", torch.float32, True)}


def test_checkpoint_loads_with_weights_only_and_predicts(make_cfg):
    cfg = make_cfg("model=unet")
    metrics = train(cfg)
    # load_from_checkpoint uses torch.load(weights_only=True): hparams must be plain values.
    module = SegmentationModule.load_from_checkpoint(metrics["best_checkpoint"], map_location="cpu")
    info = module.hparams.data_info
    assert info["class_names"] == ["background", "lung", "tumour"]
    x = torch.randn(2, info["in_channels"], 37, 41)
    assert module.eval()(x).shape == (2, 3, 37, 41)
    raw = torch.load(metrics["best_checkpoint"], map_location="cpu", weights_only=True)
    assert raw["hyper_parameters"]["net"]["width"] == 4


def test_tensorboard_gets_scalars_images_and_hparams(make_cfg):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    cfg = make_cfg("trainer.max_epochs=2")
    train(cfg)
    events = sorted((Path(cfg.output_dir) / "tensorboard").glob("events.out.tfevents.*"))
    tags: dict[str, list] = {"scalars": [], "images": []}
    plugins = set()
    for path in events:
        acc = EventAccumulator(str(path)).Reload()
        tags["scalars"] += acc.Tags()["scalars"]
        tags["images"] += acc.Tags()["images"]
        plugins |= {tag for tag in acc.summary_metadata if tag.startswith("_hparams_/")}
    for scalar in (
        "train/loss_epoch",
        "val/loss",
        "val/dice",
        "val/dice_lung",
        "val/acc",
        "lr-AdamW",
    ):
        assert scalar in tags["scalars"], tags["scalars"]
    assert "val/predictions" in tags["images"]
    assert "_hparams_/session_start_info" in plugins, "hyper-parameters were not logged"
    assert "hp/test/dice" in tags["scalars"], "final metrics were not logged beside them"


def test_the_progress_bar_reads_the_loss_every_log_every_n_steps(make_cfg, monkeypatch):
    """Each redraw of the bar turns the logged loss into a number: on a GPU, a wait for it.
    Lightning's default bar redraws every batch; lungseg's every trainer.log_every_n_steps."""
    from pytorch_lightning.callbacks import TQDMProgressBar

    reads = []
    original = TQDMProgressBar.get_metrics

    def counted(self, trainer, pl_module):
        if trainer.training:
            reads.append(trainer.global_step)
        return original(self, trainer, pl_module)

    monkeypatch.setattr(TQDMProgressBar, "get_metrics", counted)
    cfg = make_cfg(
        "trainer.enable_progress_bar=true",
        "data.batch_size=1",
        "trainer.limit_train_batches=10",
        "trainer.log_every_n_steps=4",  # not the config's 5: the bar follows the setting
    )
    train(cfg)
    steps = max(reads)  # global steps at the last read: the epoch's batches
    assert steps >= 8, reads
    # batches 4, 8 and the epoch's last, the epoch's end and the fit's end (the last line
    # shows the last epoch's values); the default bar: every batch
    assert {4, 8} <= set(reads) and len(reads) <= steps // 4 + 3, reads


def test_a_resumed_run_hides_the_points_of_the_epoch_it_trains_again(make_cfg, monkeypatch):
    """Was: TensorBoard showed the points an interrupted run had logged in the epoch it did
    not finish beside those of the resumed run, which trains that epoch again (the curves
    zig-zagged there). The run's TensorBoard folder, read as TensorBoard reads it, has one
    point a step, at the steps of an uninterrupted run."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    original = SegmentationModule.on_train_epoch_end

    def killed_in_epoch_2(self):  # after its validation logged, before last.ckpt took it in
        if self.current_epoch == 2:
            raise Interrupted
        original(self)

    settings = ("trainer.max_epochs=3", "trainer.log_every_n_steps=1", "test_after_fit=false")
    monkeypatch.setattr(SegmentationModule, "on_train_epoch_end", killed_in_epoch_2)
    with pytest.raises(Interrupted):
        train(make_cfg(*settings))
    monkeypatch.setattr(SegmentationModule, "on_train_epoch_end", original)
    train(make_cfg(*settings, "resume=true"))
    events = EventAccumulator(str(Path(make_cfg().output_dir) / "tensorboard")).Reload()
    steps = {tag: [e.step for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}
    assert steps["val/dice"] == steps["train/loss_epoch"] == [1, 3, 5]  # 2 batches an epoch
    assert steps["lr-AdamW"] == [0, 2, 4] and steps["train/loss_step"] == list(range(6))
    # the prediction grid too: at the val points' steps, the killed epoch's hidden
    assert [e.step for e in events.Images("val/predictions")] == [1, 3, 5]
    del steps["epoch"]  # Lightning adds it to every log call, so a step can have several
    assert all(points == sorted(set(points)) for points in steps.values()), steps


def scalar_points(run_dir, tag: str) -> list[tuple[int, float]]:
    """(step, value) of a TensorBoard scalar over a run's event files."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    points = []
    for path in sorted((Path(run_dir) / "tensorboard").glob("events.out.tfevents.*")):
        acc = EventAccumulator(str(path)).Reload()
        if tag in acc.Tags()["scalars"]:
            points += [(event.step, event.value) for event in acc.Scalars(tag)]
    return points


def bar_redraws(monkeypatch) -> list[tuple]:
    """(epoch, batch index, shown items) at each redraw of lungseg's progress bar while it
    trains (the redraw at the fit's end counts as the last epoch's: by then the epoch count
    has moved on)."""
    from lungseg.callbacks import ProgressBar

    redraws = []
    get_metrics = ProgressBar.get_metrics

    def showing(self, trainer, pl_module):
        items = get_metrics(self, trainer, pl_module)
        if trainer.training:
            epoch = min(trainer.current_epoch, trainer.max_epochs - 1)
            redraws.append((epoch, self.train_progress_bar.n - 1, items))
        return items

    monkeypatch.setattr(ProgressBar, "get_metrics", showing)
    return redraws


def test_a_float32_run_on_a_cpu_with_bf16_hardware_is_told_of_bf16_mixed(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: True, raising=False)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False, raising=False)
    hint = cpu_bf16_hint(accelerator_settings({"precision": "32-true"}))
    assert hint and "(AVX512-BF16)" in hint and "trainer.precision=bf16-mixed" in hint
    assert cpu_bf16_hint({"precision": "bf16-mixed"}) is None  # already
    assert cpu_bf16_hint({"accelerator": "gpu", "precision": "32-true"}) is None
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False, raising=False)
    assert cpu_bf16_hint({"precision": "32-true"}) is None  # e.g. AVX2 only: bf16 is slower
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: True, raising=False)
    assert "(AMX)" in cpu_bf16_hint({"precision": "32"})


def test_the_step_loss_is_logged_on_the_steps_lightning_writes(make_cfg, monkeypatch):
    """self.log costs host time (about 0.5 ms a call on a 2-core CPU): the step loss is logged
    on the steps whose values Lightning writes to TensorBoard and on the first (for the
    progress bar), the epoch means once an epoch; TensorBoard gets the same points as when
    every step logged them."""

    logged = []
    log = SegmentationModule.log

    def counting(self, name, value, *args, **kwargs):
        logged.append((name, self.global_step, self.trainer.training))
        return log(self, name, value, *args, **kwargs)

    monkeypatch.setattr(SegmentationModule, "log", counting)
    cfg = make_cfg(
        "trainer.max_epochs=2",
        "data.batch_size=1",
        "trainer.limit_train_batches=7",
        "trainer.log_every_n_steps=3",
    )
    train(cfg)
    assert [step for name, step, _ in logged if name == "train/loss_step"] == [0, 2, 5, 8, 11]
    for name in ("train/loss_epoch", "val/loss"):
        # once an epoch (val/loss also in the sanity check and the test's own)
        assert 2 <= sum(n == name for n, _, _ in logged) <= 4, logged
    assert [step for step, _ in scalar_points(cfg.output_dir, "train/loss_step")] == [2, 5, 8, 11]


STOPPED: dict[str, float] = {}


class StopAtStep(pytorch_lightning.Callback):
    """Stops the fit in on_train_batch_end after ``step`` optimiser steps, as the Timer of
    trainer.max_time does, and notes that batch's loss."""

    def __init__(self, step: int):
        self.step = step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        STOPPED["loss"] = float(outputs["loss"])
        if trainer.global_step == self.step:
            trainer.should_stop = True


def test_a_stop_between_logging_steps_writes_that_steps_loss(make_cfg):
    """A stop decided in a callback's on_train_batch_end makes Lightning write that step's
    values: the step loss it writes is that step's, not the last one logged."""

    cfg = make_cfg(
        "data.batch_size=1",
        "trainer.limit_train_batches=7",
        "trainer.log_every_n_steps=5",
        "+callbacks.stop._target_=test_train.StopAtStep",
        "+callbacks.stop.step=3",
    )
    train(cfg)
    points = scalar_points(cfg.output_dir, "train/loss_step")
    assert [step for step, _ in points] == [2]
    assert points[0][1] == pytest.approx(STOPPED["loss"], rel=1e-5)


def test_the_progress_bar_shows_the_loss_of_the_batch_it_redraws_at(make_cfg, monkeypatch):
    """The bar redraws every refresh_rate batches of an epoch and at its last: the step loss
    is logged at those batches too, though Lightning writes it at other steps."""
    losses = {}
    step = SegmentationModule._step

    def noting(self, batch, stage, batch_idx=0):
        loss = step(self, batch, stage, batch_idx)
        if stage == "train":
            losses[(self.current_epoch, batch_idx)] = float(loss)
        return loss

    monkeypatch.setattr(SegmentationModule, "_step", noting)
    redraws = bar_redraws(monkeypatch)
    cfg = make_cfg(
        "trainer.enable_progress_bar=true",
        "trainer.max_epochs=2",
        "data.batch_size=1",
        "trainer.limit_train_batches=7",  # the bar redraws at batches 4 and 7 of each epoch
        "trainer.log_every_n_steps=4",
    )
    train(cfg)
    shown = [
        (e, b, items["train/loss_step"]) for e, b, items in redraws if "train/loss_step" in items
    ]
    assert {(epoch, batch) for epoch, batch, _ in shown} >= {(0, 3), (0, 6), (1, 3), (1, 6)}
    for epoch, batch, value in shown:
        assert value == pytest.approx(losses[(epoch, batch)], rel=1e-5), (epoch, batch)


def test_the_progress_bar_ends_with_the_last_epochs_loss(make_cfg, monkeypatch):
    redraws = bar_redraws(monkeypatch)
    cfg = make_cfg("trainer.enable_progress_bar=true", "trainer.max_epochs=2")
    train(cfg)
    epochs = [value for _, value in scalar_points(cfg.output_dir, "train/loss_epoch")]
    assert len(epochs) == 2 and epochs[0] != pytest.approx(epochs[1])
    last = [items for _, _, items in redraws if "train/loss_epoch" in items][-1]
    assert last["train/loss_epoch"] == pytest.approx(epochs[-1], rel=1e-5)


def test_no_training_batch_turns_a_logged_value_into_a_number(make_cfg, monkeypatch):
    """Turning a tensor into a number waits for the GPU. Lightning does that after every batch
    for each value logged with prog_bar=True, even with the bar off: lungseg logs the training
    loss without it, and its bar (lungseg.callbacks.ProgressBar) still shows the loss."""
    from pytorch_lightning.trainer.connectors.logger_connector import logger_connector, result

    from lungseg.callbacks import ProgressBar

    inside, converted, shown = [], [], []
    on_batch_end = logger_connector._LoggerConnector.on_batch_end
    convert = result.convert_tensors_to_scalars
    get_metrics = ProgressBar.get_metrics

    def batch_end(self):
        inside.append(True)
        try:
            return on_batch_end(self)
        finally:
            inside.pop()

    def counted(value):
        if inside:
            converted.append(value)
        return convert(value)

    def showing(self, trainer, pl_module):
        items = get_metrics(self, trainer, pl_module)
        if trainer.training:
            shown.append(items)
        return items

    monkeypatch.setattr(logger_connector._LoggerConnector, "on_batch_end", batch_end)
    monkeypatch.setattr(result, "convert_tensors_to_scalars", counted)
    monkeypatch.setattr(ProgressBar, "get_metrics", showing)
    cfg = make_cfg(
        "trainer.enable_progress_bar=true",
        "data.batch_size=1",
        "trainer.limit_train_batches=6",
    )
    train(cfg)
    assert converted == [], converted
    assert shown and all(isinstance(items.get("train/loss_step"), float) for items in shown)


def test_article_experiment_composes_the_tutorial_recipe(make_cfg):
    cfg = make_cfg("experiment=article")
    # TINY shrinks sizes for speed; the recipe's other choices must come from the experiment.
    assert cfg.model._target_ == "lungseg.models.unet.UNet" and cfg.model.dropout == 0.5
    assert cfg.loss._target_ == "lungseg.losses.CrossEntropyLoss"
    assert cfg.optimizer._target_ == "torch.optim.Adam"
    assert cfg.data.median_blur == 3 and list(cfg.data.split) == [0.6, 0.2, 0.2]
    assert cfg.callbacks.early_stopping.patience == 3 and cfg.trainer.max_epochs == 1
    full = make_cfg("experiment=article", "model.width=64", "data.image_size=256")
    assert full.model.width == 64 and full.data.image_size == 256 and full.seed == 42
    train(cfg)


@pytest.mark.parametrize("experiment", ["lung_ct", "lidc_nodules"])
def test_the_recipes_set_up_on_data_named_otherwise(make_cfg, tmp_path, experiment):
    """The recipes are also run as they are on other lung data (chest X-rays named like
    Shenzhen's, 0/1 masks): lidc_nodules' LIDC-IDRI patient pattern stopped every such run."""
    rng = np.random.default_rng(0)
    for folder in ("images", "masks"):
        (tmp_path / folder).mkdir()
    for i in range(10):
        mask = np.zeros((40, 48), np.uint8)
        mask[8 : 30 + i % 5, 6:20] = mask[8:30, 26:42] = 1
        image = (rng.integers(0, 60, mask.shape) + 150 * mask).astype(np.uint8)
        cv2.imwrite(str(tmp_path / "images" / f"CHNCXR_{i:04d}_{i % 2}.png"), image)
        cv2.imwrite(str(tmp_path / "masks" / f"CHNCXR_{i:04d}_{i % 2}.png"), mask)
    cfg = make_cfg(
        f"experiment={experiment}",
        f"data.image_dir={tmp_path / 'images'}",
        f"data.mask_dir={tmp_path / 'masks'}",
        "data.image_size=32",
    )
    datamodule = build_datamodule(cfg)
    sizes = [len(datamodule.train_dataset), len(datamodule.val_dataset)]
    assert sizes + [len(datamodule.test_dataset)] == (
        [6, 2, 2] if experiment == "lung_ct" else [8, 0, 2]  # fold 0 of 5, no validation
    )
    assert datamodule.num_classes == 2


def test_gpus_key_maps_to_accelerator(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert accelerator_settings({"gpus": 1, "devices": 1}) == {"accelerator": "gpu", "devices": 1}
    assert accelerator_settings({"gpus": [0, 1]})["devices"] == [0, 1]
    assert accelerator_settings({"gpus": 0}) == {"accelerator": "cpu", "devices": 1}
    assert accelerator_settings({"gpus": None, "accelerator": "auto"}) == {"accelerator": "auto"}
    with pytest.raises(LungsegError, match="has 2"):
        accelerator_settings({"gpus": 4})
    # GPU indices the machine lacks: one sentence naming them, not Lightning's traceback
    with pytest.raises(
        LungsegError, match=r"asks for GPU 2, .*has 2 \(numbered 0 to 1\).*\[0, 1\]"
    ):
        accelerator_settings({"gpus": [0, 2]})


def test_float16_mixed_precision_on_the_cpu_is_one_clear_error(monkeypatch):
    """Lightning would warn and run bf16-mixed instead, while config.yaml records 16-mixed."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(LungsegError, match=r"precision=16-mixed .* needs a CUDA GPU.*bf16-mixed"):
        accelerator_settings({"accelerator": "auto", "precision": "16-mixed"})
    assert accelerator_settings({"accelerator": "cpu", "precision": "bf16-mixed"})["precision"]
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert accelerator_settings({"gpus": 1, "precision": "16-mixed"})["precision"] == "16-mixed"


def test_gpus_on_a_cpu_machine_is_one_clear_error(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(LungsegError, match=r"trainer.gpus=1 asks for a GPU.*trainer=cpu"):
        accelerator_settings({"gpus": 1})
    with pytest.raises(LungsegError, match="trainer.accelerator=gpu"):
        accelerator_settings({"accelerator": "gpu", "devices": 1})


def run_cli(args, cwd, timeout=600):
    return subprocess.run(
        [sys.executable, str(ROOT / "train.py"), *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only message")
def test_cli_gpus_without_gpu_prints_one_line(tmp_path):
    result = run_cli(
        ["model=deeplab", "trainer.gpus=1", f"data.demo_dir={tmp_path}/demo", *TINY], tmp_path
    )
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    assert "lungseg: error: trainer.gpus=1 asks for a GPU" in result.stderr
    # the run folder Hydra made, with nothing of the run in it, is not left behind, nor the
    # outputs/train/ it made around it
    assert not (tmp_path / "outputs").exists()


def test_cli_data_error_leaves_no_run_folder_and_is_in_the_log_of_one_that_stays(tmp_path):
    """Was, on a CPU with bf16 hardware: its speed hint went into train.log before the data was
    read, so the folder of a command refused for its data was kept, without the error in it
    (and a refused command added the hint to a finished run's log)."""
    images, masks = tmp_path / "images", tmp_path / "masks"
    images.mkdir()
    masks.mkdir()
    for name in ("a", "b"):
        (images / f"{name}.png").write_bytes(b"")  # never read: b's mask is missing
    (masks / "a.png").write_bytes(b"")
    data = [f"data.image_dir={images}", f"data.mask_dir={masks}", "data.mask_mode=binary", *TINY]
    result = run_cli(data, tmp_path)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    error = next(line for line in result.stderr.splitlines() if line.startswith("lungseg: e"))
    assert error.startswith("lungseg: error: Found 1 image without a mask"), result.stderr
    assert not (tmp_path / "outputs").exists()
    kept = tmp_path / "kept"  # a folder of the user's: it stays, and its log tells why
    kept.mkdir()
    (kept / "notes.txt").write_text("mine")
    result = run_cli([*data, f"hydra.run.dir={kept}"], tmp_path)
    assert result.returncode == 1
    log = (kept / "train.log").read_text().strip().splitlines()
    assert log[-1].endswith(error) and "[ERROR]" in log[-1]
    assert not any("computes bf16" in line for line in log)
    assert (kept / "notes.txt").read_text() == "mine"


def test_cli_output_dir_other_than_the_run_folder_is_refused(tmp_path):
    """Was: checkpoints, metrics and TensorBoard files in output_dir, train.log and .hydra/ in
    outputs/train/<date>: one run in two folders."""
    result = run_cli([f"output_dir={tmp_path / 'mine'}", *TINY], tmp_path)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert f"lungseg: error: output_dir={tmp_path / 'mine'} is not the run folder" in result.stderr
    assert f"Give hydra.run.dir={tmp_path / 'mine'} instead" in result.stderr
    assert not (tmp_path / "mine").exists()
    assert not (tmp_path / "outputs").exists()
    # a sweep: every job refused, the error in its own folder of the sweep
    result = run_cli(["-m", "model=unet,fcn", f"output_dir={tmp_path / 'mine'}", *TINY], tmp_path)
    assert result.returncode == 1 and "2 of 2 runs failed" in result.stderr
    assert not (tmp_path / "mine").exists()
    (sweep,) = (tmp_path / "outputs" / "train").iterdir()
    errors = sorted(sweep.glob("*/error.txt"))
    assert len(errors) == 2 and "Leave output_dir out" in errors[0].read_text()


def test_cli_commands_in_a_run_folder_keep_its_hydra_record(tmp_path):
    """Was: Hydra wrote the later command's .hydra/ files over the run's own, also when
    lungseg then refused the command."""
    run = tmp_path / "run"
    common = [f"hydra.run.dir={run}", f"data.demo_dir={tmp_path}/demo", *TINY]
    first = run_cli([*common, "trainer.max_epochs=1"], tmp_path)
    assert first.returncode == 0
    # 2 batches an epoch, log_every_n_steps=5: Lightning's misleading warning is left out
    assert "logging interval" not in first.stderr + (run / "train.log").read_text()
    record = {p.name: p.read_bytes() for p in (run / ".hydra").iterdir()}
    assert set(record) == {"config.yaml", "hydra.yaml", "overrides.yaml"}
    log = (run / "train.log").read_bytes()
    refused = run_cli([*common, "trainer.max_epochs=2"], tmp_path)  # no resume=true
    assert "already holds a run" in refused.stderr
    assert {p.name: p.read_bytes() for p in (run / ".hydra").iterdir()} == record
    assert (run / "train.log").read_bytes() == log  # the finished run's log as it was
    resumed = run_cli([*common, "trainer.max_epochs=2", "resume=true"], tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    now = {p.name: p.read_bytes() for p in (run / ".hydra").iterdir()}
    assert {f"{Path(n).stem}.1.yaml": now[f"{Path(n).stem}.1.yaml"] for n in record} == {
        f"{Path(n).stem}.1.yaml": data for n, data in record.items()
    }
    assert b"resume=true" in now["overrides.yaml"]
    assert "earlier Hydra record is kept as .hydra/" in (run / "train.log").read_text()


def test_cli_a_run_refused_in_a_data_folder_leaves_the_folder_as_it_was(tmp_path):
    """Was: Hydra's .hydra/ and train.log, written before lungseg refused the image folder as
    the run folder, stayed among the user's images."""
    from test_inference import write_pairs

    images, masks = write_pairs(tmp_path / "data", [(40, 48)] * 4, "binary")

    def listing() -> dict[Path, bytes | None]:
        return {p: p.read_bytes() if p.is_file() else None for p in images.rglob("*")}

    before = listing()
    data = [f"data.image_dir={images}", f"data.mask_dir={masks}", "data.mask_mode=binary"]
    # the second: a typo that another check refuses, which ran first and left the files there
    for typo in ([], ["+sed=1"]):
        result = run_cli([*data, f"hydra.run.dir={images}", *TINY, *typo], tmp_path)
        assert result.returncode == 1 and "Traceback" not in result.stderr
        assert f"lungseg: error: The run folder {images} is data.image_dir" in result.stderr
        assert listing() == before


def test_cli_a_sweep_job_refused_in_a_data_folder_is_counted_as_failed(tmp_path):
    """A sweep's job refused in a data folder stays listed as failed and the sweep exits 1
    (was, while the refusal removed Hydra's files: the job vanished from the summary and the
    sweep exited 0, found by a review)."""
    from test_inference import write_pairs

    images, masks = write_pairs(tmp_path / "data", [(40, 48)] * 4, "binary")
    data = [f"data.image_dir={images}", f"data.mask_dir={masks}", "data.mask_mode=binary"]
    sweep = [f"hydra.sweep.dir={images.parent}", f"hydra.sweep.subdir={images.name}", "seed=1"]
    result = run_cli(["-m", *data, *sweep, *TINY], tmp_path)
    assert result.returncode == 1, result.stderr[-2000:]
    assert "1 of 1 runs failed" in result.stderr


def test_a_refusal_keeps_a_linked_hydra_folder_and_its_files(tmp_path):
    """A data folder whose .hydra is the user's link to a folder of their own: the refusal
    leaves the link and its files (was: every file there deleted, found by a review)."""
    from lungseg import hydra_files

    folder, own = tmp_path / "images", tmp_path / "own"
    folder.mkdir()
    own.mkdir()
    (own / "notes.txt").write_text("mine\n")
    (folder / ".hydra").symlink_to(own, target_is_directory=True)
    hydra_files.remember(folder)
    (own / "config.yaml").write_text("hydra's: 1\n")  # Hydra writes through the link
    hydra_files.withdraw(folder)
    assert (folder / ".hydra").is_symlink() and (own / "notes.txt").read_text() == "mine\n"


def test_the_users_trainer_plugins_are_kept_beside_lungsegs(make_cfg, monkeypatch):
    """trainer.plugins given by the user reach the Trainer beside lungseg's checkpoint plugin
    (was: replaced by it without a word, found by a review)."""
    import pytorch_lightning as pl
    from pytorch_lightning.plugins.environments import LightningEnvironment

    given = {}
    original = pl.Trainer.__init__

    def spy(self, *args, **kwargs):
        given["plugins"] = kwargs.get("plugins")
        original(self, *args, **kwargs)

    monkeypatch.setattr(pl.Trainer, "__init__", spy)
    target = "pytorch_lightning.plugins.environments.LightningEnvironment"
    train(make_cfg(f"+trainer.plugins=[{{_target_:{target}}}]", "test_after_fit=false"))
    kinds = [type(p).__name__ for p in given["plugins"]]
    assert kinds == [LightningEnvironment.__name__, "RunCheckpointIO"]


def test_a_refusal_in_a_data_folder_keeps_what_was_there(tmp_path):
    """What Hydra wrote for a command refused in a data folder is removed (see above), but a
    train.log that was there already is only cut back to its length, and nothing more is
    logged into it."""
    from lungseg import hydra_files

    folder = tmp_path / "images"
    folder.mkdir()
    (folder / "train.log").write_text("mine\n")
    hydra_files.remember(folder)  # as KeepHydraFiles does before Hydra writes
    (folder / ".hydra").mkdir()
    (folder / ".hydra" / "config.yaml").write_text("hydra's: 1\n")
    handler = logging.FileHandler(folder / "train.log")  # Hydra's, which appends
    logging.getLogger().addHandler(handler)
    try:
        logging.getLogger("lungseg").warning("a line of the refused command")
        hydra_files.withdraw(folder)
        logging.getLogger("lungseg").warning("a line after")
    finally:
        logging.getLogger().removeHandler(handler)
        handler.close()
    assert [p.name for p in folder.iterdir()] == ["train.log"]
    assert (folder / "train.log").read_text() == "mine\n"


def test_eval_and_predict_in_a_run_folder_keep_its_hydra_record(tmp_path):
    """eval.py or predict.py with hydra.run.dir=<run> replaced the run's .hydra/ with their
    own (predict kept no copy): eval.py then read its own working folder as the run's, and
    the run's relative data paths pointed nowhere (found by a tester)."""
    from test_inference import write_pairs

    write_pairs(tmp_path / "data", [(40, 48)] * 12, "binary")
    run = tmp_path / "run"
    data = ["data.image_dir=data/images", "data.mask_dir=data/masks", "data.mask_mode=binary"]
    trained = run_cli([f"hydra.run.dir={run}", *data, *TINY], tmp_path)  # relative paths
    assert trained.returncode == 0, trained.stderr[-2000:]
    record = {p.name: p.read_bytes() for p in (run / ".hydra").iterdir()}
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    commands = {
        "eval": [f"ckpt_path={run}/checkpoints/last.ckpt", "progress_bar=false"],
        "predict": [
            f"ckpt_path={run}/checkpoints/last.ckpt",
            f"input_dir={tmp_path / 'data' / 'images'}",
            f"output_dir={tmp_path / 'predicted'}",
            "progress_bar=false",
        ],
    }
    for n, (script, args) in enumerate([*commands.items(), ("eval", commands["eval"])], 1):
        if n == 3:
            args = [*args, "overwrite=true"]
        done = subprocess.run(
            [sys.executable, str(ROOT / f"{script}.py"), *args, f"hydra.run.dir={run}"],
            cwd=elsewhere,
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert done.returncode == 0, done.stderr[-2000:]
        now = {p.name: p.read_bytes() for p in (run / ".hydra").iterdir()}
        assert {name: now[name] for name in record} == record  # the run's record in place
        assert f"name: {script}".encode() in now[f"hydra.{n}.yaml"]  # the command's beside
    assert (run / "per_image.csv").is_file() and len(list((tmp_path / "predicted").iterdir()))


def test_a_sweep_job_that_did_not_run_keeps_its_hydra_record(tmp_path):
    from lungseg.hydra_files import KeepHydraFiles

    job = tmp_path / "sweep" / "0_model-unet"
    (job / ".hydra").mkdir(parents=True)
    (job / ".hydra" / "config.yaml").write_text("mine: 1\n")
    (job / "train.log").write_text("the run\n")
    callback = KeepHydraFiles()
    sweep = {"sweep": {"dir": str(tmp_path / "sweep")}, "output_subdir": ".hydra"}
    callback.on_multirun_start(config=OmegaConf.create({"hydra": sweep}))
    (job / ".hydra" / "config.yaml").write_text("hydra's: 2\n")  # as Hydra writes them
    (job / ".hydra" / "overrides.yaml").write_text("- model=unet\n")
    with (job / "train.log").open("a") as log:
        log.write("this job found its run finished\n")
    ended = {"hydra": {**sweep, "runtime": {"output_dir": str(job)}}}
    callback.on_job_end(config=OmegaConf.create(ended), job_return=None)
    assert sorted(p.name for p in (job / ".hydra").iterdir()) == ["config.yaml"]
    assert (job / ".hydra" / "config.yaml").read_text() == "mine: 1\n"
    assert (job / "train.log").read_text() == "the run\n"


def test_only_a_run_folder_with_nothing_in_it_is_discarded(tmp_path, monkeypatch):
    from lungseg import hydra_files
    from lungseg.errors import discard_if_empty

    monkeypatch.chdir(tmp_path)
    for name, files in {
        "empty": {"train.log": ""},
        "logged": {"train.log": "120 image/mask pairs\n"},
        "yours": {"train.log": "", "notes.txt": "mine"},
    }.items():
        hydra_files.remember(tmp_path / name)  # as KeepHydraFiles does before Hydra makes it
        (tmp_path / name / ".hydra").mkdir(parents=True)
        (tmp_path / name / ".hydra" / "config.yaml").write_text("a: 1\n")
        for file, text in files.items():
            (tmp_path / name / file).write_text(text)
        discard_if_empty(tmp_path / name)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["logged", "yours"]
    hydra_files.remember(tmp_path)
    (tmp_path / ".hydra").mkdir()
    discard_if_empty(tmp_path)  # hydra.run.dir=. : the working directory stays
    assert tmp_path.is_dir()


def test_a_refusal_removes_only_the_folders_it_made(tmp_path, monkeypatch):
    """Was: a command refused in an empty folder of the user's (hydra.run.dir=<it>) removed
    the folder, and a refused eval.py or predict.py left the outputs/eval/ (outputs/predict/)
    it had made around its run folder (found by a review)."""
    from lungseg import hydra_files
    from lungseg.errors import run_cli

    def refused() -> None:
        raise LungsegError("refused")

    def refuse_in(folder: Path) -> None:
        hydra_files.remember(folder)  # as KeepHydraFiles does before Hydra makes the folder
        (folder / ".hydra").mkdir(parents=True, exist_ok=True)
        (folder / "eval.log").touch()
        with pytest.raises(SystemExit):
            run_cli(refused, folder)

    monkeypatch.chdir(tmp_path)
    yours = tmp_path / "yours"
    yours.mkdir()
    refuse_in(yours)
    assert yours.is_dir()
    refuse_in(tmp_path / "outputs" / "eval" / "first")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["yours"]
    (tmp_path / "outputs" / "eval").mkdir(parents=True)  # the user's, though empty
    refuse_in(tmp_path / "outputs" / "eval" / "second")
    assert list((tmp_path / "outputs" / "eval").iterdir()) == []


def test_cli_a_refusal_in_an_empty_folder_of_the_users_keeps_it(tmp_path):
    """Was: an empty mask folder given as the run folder too (data.mask_dir=<it>
    hydra.run.dir=<it>) was refused as a data folder, and then removed as an empty run folder
    (found by a review). An eval.py refused in a fresh working directory leaves no outputs/
    there (was: outputs/eval/)."""
    images, masks = tmp_path / "images", tmp_path / "masks"
    images.mkdir()
    masks.mkdir()
    data = [f"data.image_dir={images}", f"data.mask_dir={masks}", f"hydra.run.dir={masks}"]
    result = run_cli([*data, *TINY], tmp_path)
    assert result.returncode == 1 and f"The run folder {masks} is data.mask_dir" in result.stderr
    assert masks.is_dir() and list(masks.iterdir()) == []
    work = tmp_path / "work"
    work.mkdir()
    result = subprocess.run(
        [sys.executable, str(ROOT / "eval.py"), f"ckpt_path={tmp_path / 'none.ckpt'}"],
        cwd=work,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 1 and "none.ckpt does not exist" in result.stderr
    assert list(work.iterdir()) == []


def test_cli_multirun_writes_one_folder_per_model(tmp_path):
    """Each folder is named by the swept setting alone: the shared TINY overrides (over 120
    characters) filled the names, and cut model= off."""
    result = run_cli(["-m", "model=unet,fcn", f"data.demo_dir={tmp_path}/demo", *TINY], tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    sweeps = list((tmp_path / "outputs" / "train").glob("multirun_*"))
    assert len(sweeps) == 1
    runs = sorted(p.name for p in sweeps[0].iterdir() if (p / "metrics.json").is_file())
    assert runs == ["0_model-unet", "1_model-fcn"]
    # A checkpoint's path is a plain override, without quotes.
    last = sweeps[0] / "1_model-fcn" / "checkpoints" / "last.ckpt"
    (override,) = OverridesParser.create().parse_overrides([f"ckpt_path={last}"])
    assert override.value() == str(last) and last.is_file()


def test_a_recipe_that_post_processes_is_also_tested_with_it(make_cfg):
    """postprocess (flips, min_size) reaches train.py's own test scores: test_post/* in
    metrics.json are eval.py's on the same checkpoint and split, and a second evaluation of
    the run (a resumed one) keeps the first as test_postprocessed.1; a recipe without
    post-processing gets none."""
    from lungseg.evaluate import evaluate, scores, test_config

    cfg = make_cfg("postprocess.tta_flips=[horizontal,vertical]", "postprocess.min_size=3")
    metrics = train(cfg)
    run = Path(cfg.output_dir)
    saved = json.loads((run / "metrics.json").read_text())
    summary = json.loads((run / "test_postprocessed" / "summary.json").read_text())
    assert summary["tta_flips"] == ["horizontal", "vertical"]
    assert summary["postprocess"]["min_size"] == 3
    assert summary["n_images"] == sum(
        line.endswith(",test") for line in (run / "split.csv").read_text().splitlines()
    )
    for key in ("test_post/dice", "test_post/dice_nonempty_tumour", "test_post/fp_empty_lung"):
        assert key in saved and saved[key] == metrics[key]
    again = evaluate(test_config(saved["best_checkpoint"], run / "again"))
    assert scores(again, "test_post") == {k: v for k, v in saved.items() if "test_post/" in k}
    assert saved["test_post/dice"] == pytest.approx(
        (saved["test_post/dice_lung"] + saved["test_post/dice_tumour"]) / 2
    )

    first = (run / "test_postprocessed" / "per_image.csv").read_text()
    assert postprocessed_test(cfg, saved["best_checkpoint"], run) == scores(again, "test_post")
    assert (run / "test_postprocessed.1" / "per_image.csv").read_text() == first

    plain = make_cfg("output_dir=" + str(run.parent / "plain"))
    assert not any(k.startswith("test_post/") for k in train(plain))
    assert not (run.parent / "plain" / "test_postprocessed").exists()


def test_limit_val_batches_zero_trains_as_a_fit_without_validation(make_cfg):
    """trainer.limit_val_batches=0 validates nothing: early stopping and the best checkpoint
    (they watch val/*) are left out as for a val fraction of 0, instead of Lightning's
    "Early stopping conditioned on metric 'val/loss' which is not available" after epoch 0."""
    cfg = make_cfg("trainer.limit_val_batches=0", "trainer.max_epochs=2")
    metrics = train(cfg)
    assert metrics["epochs_trained"] == 2 and metrics["monitor"] is None
    assert metrics["best_checkpoint"] == str(Path(cfg.output_dir) / "checkpoints" / "last.ckpt")


def test_a_fast_dev_run_says_so_in_its_record(make_cfg):
    """fast_dev_run trains one batch: metrics.json must not read as a finished training."""
    metrics = train(make_cfg("trainer.fast_dev_run=true"))
    assert metrics["stopped_by"] == "fast_dev_run"


def test_the_fine_tune_leak_warning_gives_advice_that_works_when_files_were_added(tmp_path, caplog):
    """A split file must list every file in the data: with files added since the checkpoint's
    run, "give data.split_file=<its split.csv>" would stop the run. The warning says to add
    them to a copy."""
    from lungseg.data.splits import write_split
    from lungseg.run_folder import warn_trained_on

    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    write_split({"a": "train", "b": "train", "c": "val", "d": "test"}, run / "split.csv")
    ckpt = str(run / "checkpoints" / "last.ckpt")
    with caplog.at_level(logging.WARNING):
        warn_trained_on(ckpt, {"a": "test", "b": "train", "c": "val", "d": "train"})
        assert f"Give data.split_file={run / 'split.csv'} to keep that run's split." in caplog.text
        caplog.clear()
        warn_trained_on(ckpt, {"a": "test", "b": "train", "c": "val", "d": "train", "e": "val"})
    assert "whose run trained on 1 of its test files (e.g. a;" in caplog.text
    assert f"give data.split_file a copy of {run / 'split.csv'} with the 1 files" in caplog.text
    assert "(e.g. e; a split file must list every file in the data)" in caplog.text
