"""Interruptions lose nothing, runs repeat exactly, run folders are never written over, and
untrusted checkpoint files stay inert.

Related tests elsewhere: test_inference.py::test_bad_checkpoints_are_refused (every way a
checkpoint file can be refused by load_checkpoint) and
test_predict.py::test_names_cannot_leave_the_output_folder (predict writes nothing outside
output_dir whatever the input names; eval writes only per_image.csv and summary.json there)."""

import json
import logging
import math
import os
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
import pytorch_lightning
import torch
from conftest import ROOT, TINY
from hydra import compose, initialize_config_dir

from lungseg.data.folders import write_image
from lungseg.errors import LungsegError
from lungseg.evaluate import evaluate
from lungseg.inference import load_checkpoint
from lungseg.models.unet import UNet
from lungseg.module import SegmentationModule
from lungseg.predict import predict
from lungseg.run_folder import (
    PACKAGES,
    _git_state,
    apply_initial_weights,
    read_initial_weights,
)
from lungseg.train import train

DETERMINISTIC = "trainer.deterministic=true"
# Leaves out what these tests do not look at (TensorBoard, and the curves.png drawn from it).
LEAN = ["logger.tensorboard=null", "callbacks.lr_monitor=null", "callbacks.prediction_grid=null"]
# Only these may differ between two runs of the same command.
RUN_SPECIFIC = {"best_checkpoint", "train_minutes"}


@pytest.fixture(autouse=True)
def restore_deterministic_mode(monkeypatch):
    """trainer.deterministic=true switches torch's global deterministic mode on (and sets
    CUBLAS_WORKSPACE_CONFIG); other test modules must not inherit it."""
    monkeypatch.setenv("CUBLAS_WORKSPACE_CONFIG", os.environ.get("CUBLAS_WORKSPACE_CONFIG", ""))
    enabled = torch.are_deterministic_algorithms_enabled()
    yield
    torch.use_deterministic_algorithms(enabled)


@pytest.fixture
def lean_cfg(make_cfg):
    return lambda *overrides: make_cfg(*LEAN, *overrides)


def comparable(metrics: dict) -> dict:
    assert metrics.get("test/dice") is not None
    return {k: v for k, v in metrics.items() if k not in RUN_SPECIFIC}


def assert_same_metrics(a: dict, b: dict, tolerance: float = 1e-6) -> None:
    a, b = comparable(a), comparable(b)
    assert a.keys() == b.keys()
    for key in a:
        if isinstance(a[key], float):
            assert b[key] == pytest.approx(a[key], abs=tolerance), key
        else:
            assert a[key] == b[key], key


def test_same_command_twice_gives_identical_metrics_and_records_the_environment(make_cfg, tmp_path):
    runs = [make_cfg(DETERMINISTIC, f"output_dir={tmp_path / name}") for name in ("a", "b")]
    first, second = (train(cfg) for cfg in runs)
    assert_same_metrics(first, second, tolerance=0.0)
    run = Path(runs[0].output_dir)
    assert (run / "config.yaml").is_file() and (run / "split.csv").is_file()
    environment = json.loads((run / "environment.json").read_text())
    for name, module in PACKAGES.items():
        assert environment[name] == module.__version__
    assert environment["python"] == ".".join(map(str, sys.version_info[:3]))
    assert environment["platform"]
    assert len(environment["git_commit"]) == 40 or environment["git_commit"] == "unknown"
    assert environment["git_dirty"] in (True, False, None)


def test_git_state_is_unknown_outside_a_checkout_or_without_git(tmp_path, monkeypatch):
    assert _git_state(tmp_path) == ("unknown", None)
    commit, dirty = _git_state(ROOT)
    assert commit == "unknown" or (len(commit) == 40 and isinstance(dirty, bool))
    monkeypatch.setenv("PATH", str(tmp_path))  # no git executable at all
    assert _git_state(ROOT) == ("unknown", None)


def nan_pixels_from_epoch_1(monkeypatch) -> None:
    """From epoch 1 on, every batch's images are NaN."""
    step = SegmentationModule._step

    def patched(self, batch, stage, batch_idx=0):
        if self.current_epoch >= 1:
            batch = {**batch, "image": batch["image"] * float("nan")}
        return step(self, batch, stage, batch_idx)

    monkeypatch.setattr(SegmentationModule, "_step", patched)


def test_non_finite_loss_stops_the_run_and_keeps_the_last_good_checkpoint(lean_cfg, monkeypatch):
    nan_pixels_from_epoch_1(monkeypatch)
    cfg = lean_cfg("trainer.max_epochs=3")
    with pytest.raises(LungsegError) as error:
        train(cfg)
    last = Path(cfg.output_dir) / "checkpoints" / "last.ckpt"
    message = str(error.value)
    assert "the train loss became nan at epoch 1" in message and "Lower optimizer.lr" in message
    assert f"The last good checkpoint is kept: {last}" in message
    assert not (Path(cfg.output_dir) / "metrics.json").exists()
    assert torch.load(last, map_location="cpu", weights_only=True)["epoch"] == 0
    model = load_checkpoint(last, torch.device("cpu"))
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_deferred_non_finite_check_of_gpu_and_ddp_runs_also_keeps_the_good_checkpoint(
    lean_cfg, monkeypatch
):
    """On a GPU or under DDP the loss is not looked at every step (that would wait for the
    device): a NaN is noted on the device and caught before the next validation or save."""
    nan_pixels_from_epoch_1(monkeypatch)
    monkeypatch.setattr(SegmentationModule, "_eager_check", lambda self: False)
    cfg = lean_cfg("trainer.max_epochs=3")
    with pytest.raises(LungsegError) as error:
        train(cfg)
    message = str(error.value)
    assert "a loss became nan or inf" in message and "epoch 1" in message
    last = Path(cfg.output_dir) / "checkpoints" / "last.ckpt"
    assert f"The last good checkpoint is kept: {last}" in message
    assert torch.load(last, map_location="cpu", weights_only=True)["epoch"] == 0


@pytest.mark.parametrize("epoch, kind", [(0, "parameters"), (1, "buffers")])
def test_weights_broken_by_an_epochs_last_step_are_never_saved_without_validation(
    lean_cfg, monkeypatch, epoch, kind
):
    """No loss looks at the weights of an epoch's last optimiser step before last.ckpt is
    saved, and without a val split no val loss does either (a training loss never looks at
    the batch-norm running statistics, which optimizer.lr=1e12 made inf with finite losses):
    what the checkpoint would save is looked at itself, and the error names the last
    checkpoint that holds only finite values (or none)."""
    broken = []

    def on_train_batch_end(self, outputs, batch, batch_idx):
        if self.current_epoch == epoch and batch_idx == self.trainer.num_training_batches - 1:
            name, value = next(getattr(self.net, f"named_{kind}")())
            with torch.no_grad():  # the step's loss was finite
                value.fill_(float("nan"))
            broken.append(f"net.{name}")

    monkeypatch.setattr(SegmentationModule, "on_train_batch_end", on_train_batch_end)
    cfg = lean_cfg("data.split=[0.8,0.0,0.2]", "trainer.max_epochs=3")
    with pytest.raises(LungsegError) as error:
        train(cfg)
    message = str(error.value)
    where = f"became nan or inf by the end of epoch {epoch} (step {2 * epoch + 2}), first"
    assert f"{where} {broken[0]}. Lower optimizer.lr" in message
    last = Path(cfg.output_dir) / "checkpoints" / "last.ckpt"
    if epoch == 0:
        assert "No checkpoint had been saved yet." in message and not last.exists()
    else:
        assert f"The last good checkpoint is kept: {last}" in message
        saved = torch.load(last, map_location="cpu", weights_only=True)
        assert saved["epoch"] == epoch - 1
        assert all(torch.isfinite(v).all() for v in saved["state_dict"].values())


@pytest.mark.parametrize("accumulate", [1, 2])
def test_deferred_check_looks_after_the_step_on_logging_steps_only(
    make_cfg, monkeypatch, tmp_path, accumulate
):
    """The deferred check waits for the device: it looks once every trainer.log_every_n_steps
    optimiser steps (also when gradients accumulate over several batches), after the step's
    update is queued (not inside training_step, where the wait would keep the host from
    queueing the backward pass) and before a checkpoint callback saves, and stops a run of
    one long epoch there."""
    monkeypatch.setattr(SegmentationModule, "_eager_check", lambda self: False)
    looks, inside = [], []
    step, check = SegmentationModule.training_step, SegmentationModule._raise_if_nonfinite

    def training_step(self, batch, batch_idx):
        inside.append(True)
        try:
            if self.global_step == 2:  # the third optimiser step's loss is NaN
                batch = {**batch, "image": batch["image"] * float("nan")}
            return step(self, batch, batch_idx)
        finally:
            inside.pop()

    def raise_if_nonfinite(self, where):
        looks.append((self.global_step, bool(inside)))
        return check(self, where)

    monkeypatch.setattr(SegmentationModule, "training_step", training_step)
    monkeypatch.setattr(SegmentationModule, "_raise_if_nonfinite", raise_if_nonfinite)
    saved = tmp_path / "every_2_steps"
    cfg = make_cfg(
        "data.batch_size=1",
        "trainer.limit_train_batches=10",  # the demo's training images, one a batch
        f"trainer.accumulate_grad_batches={accumulate}",
        "trainer.log_every_n_steps=2",
        "trainer.num_sanity_val_steps=0",
        "callbacks.model_checkpoint=null",
        "callbacks.last_checkpoint=null",
        "+callbacks.steps._target_=pytorch_lightning.callbacks.ModelCheckpoint",
        f"+callbacks.steps.dirpath={saved}",
        "+callbacks.steps.every_n_train_steps=2",
        "+callbacks.steps.save_top_k=-1",
        "+callbacks.steps.filename='{step}'",
    )
    with pytest.raises(LungsegError, match="a loss became nan or inf .* at epoch 0, step 4"):
        train(cfg)
    assert looks == [(2, False), (4, False)]
    # the step-2 checkpoint, taken before the NaN; none after it
    assert sorted(p.name for p in saved.iterdir()) == ["step=2.ckpt"]


# Runs train.py, but stops in the middle of epoch 1 (its epoch-0 checkpoint written) and says
# so on stdout, then waits to be killed.
PAUSING_TRAIN_PY = """
import runpy, sys, threading
from lungseg.module import SegmentationModule

step = SegmentationModule.training_step

def training_step(self, batch, batch_idx):
    if self.current_epoch == 1 and batch_idx == 1:
        print("PAUSED", flush=True)
        threading.Event().wait()
    return step(self, batch, batch_idx)

SegmentationModule.training_step = training_step
sys.argv[0] = {train_py!r}
runpy.run_path(sys.argv[0], run_name="__main__")
"""


# Validation every other epoch, or twice an epoch: last.ckpt is still written at every
# epoch's end (Lightning would write it after a validation: mid-epoch, or every other epoch,
# and the resumed run then repeated part of an epoch with the next epoch's seed).
@pytest.mark.parametrize(
    "validation",
    [[], ["trainer.check_val_every_n_epoch=2"], ["trainer.val_check_interval=0.5"]],
    ids=["every_epoch", "every_other_epoch", "twice_an_epoch"],
)
def test_run_killed_mid_epoch_resumes_to_the_metrics_of_an_uninterrupted_run(
    lean_cfg, tmp_path, demo_dir, validation
):
    epochs = [DETERMINISTIC, "trainer.max_epochs=3", *validation]  # of two batches each
    whole = train(lean_cfg(*epochs, f"output_dir={tmp_path / 'whole'}"))

    killed = tmp_path / "killed"
    script = tmp_path / "pausing_train.py"
    script.write_text(PAUSING_TRAIN_PY.format(train_py=str(ROOT / "train.py")))
    args = [f"hydra.run.dir={killed}", f"data.demo_dir={demo_dir}", *TINY, *LEAN, *epochs]
    with (tmp_path / "stderr.txt").open("w") as stderr:
        child = subprocess.Popen(
            [sys.executable, str(script), *args],
            cwd=tmp_path,
            stdout=subprocess.PIPE,
            stderr=stderr,
            text=True,
        )
        watchdog = threading.Timer(300, child.kill)  # never hang the suite
        watchdog.start()
        try:
            paused = any(line.strip() == "PAUSED" for line in iter(child.stdout.readline, ""))
            assert paused, (tmp_path / "stderr.txt").read_text()[-3000:]
            assert (killed / "checkpoints" / "last.ckpt").is_file()
            child.kill()  # SIGKILL: no handler, no clean-up, no checkpoint on the way out
            assert child.wait() == -9
        finally:
            watchdog.cancel()
            child.kill()
            child.stdout.close()
    assert not (killed / "metrics.json").exists()
    last = torch.load(killed / "checkpoints" / "last.ckpt", weights_only=True)
    assert last["epoch"] == 0  # the kill came in epoch 1: that epoch is trained again

    resumed = train(lean_cfg(*epochs, f"output_dir={killed}", "resume=true"))
    assert resumed["epochs_trained"] == 3
    assert_same_metrics(whole, resumed)
    assert json.loads((killed / "metrics.json").read_text())["test/dice"] == resumed["test/dice"]


# Sends itself SIGTERM (a cluster's pre-emption) in the middle of epoch 1.
SIGTERM_TRAIN_PY = """
import os, runpy, signal, sys
from lungseg.module import SegmentationModule

step = SegmentationModule.training_step

def training_step(self, batch, batch_idx):
    if self.current_epoch == 1 and batch_idx == 1:
        os.kill(os.getpid(), signal.SIGTERM)
    return step(self, batch, batch_idx)

SegmentationModule.training_step = training_step
sys.argv[0] = {train_py!r}
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def test_a_run_stopped_by_sigterm_exits_with_143_and_can_be_continued(lean_cfg, tmp_path, demo_dir):
    """Lightning stops a run on SIGTERM with SystemExit() (status 0, as if it had finished):
    `train.py && eval.py` went on, and SLURM saw a pre-empted job as completed."""
    run = tmp_path / "run"
    script = tmp_path / "sigterm_train.py"
    script.write_text(SIGTERM_TRAIN_PY.format(train_py=str(ROOT / "train.py")))
    args = [f"hydra.run.dir={run}", f"data.demo_dir={demo_dir}", *TINY, *LEAN]
    result = subprocess.run(
        [sys.executable, str(script), *args, "trainer.max_epochs=3"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 143, result.stderr[-3000:]
    said = result.stdout + result.stderr
    assert "Interrupted" in said and "resume=true" in said
    # Lightning stops at its next check, after the epoch's last batch: epoch 1 was finished
    assert torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)["epoch"] == 1
    assert not (run / "metrics.json").exists()
    resumed = train(lean_cfg("trainer.max_epochs=3", f"output_dir={run}", "resume=true"))
    assert resumed["epochs_trained"] == 3 and (run / "metrics.json").is_file()


def test_a_run_stopped_by_sigterm_in_its_test_exits_with_143(lean_cfg, tmp_path, monkeypatch):
    """Lightning's shutdown after a SIGTERM in the test after training ends it with
    SystemExit(0), and train.py exited 0 without metrics.json, so `train.py && eval.py` went
    on (found by a tester); resume=true then tests it."""

    def stopped(self, *args, **kwargs):  # as Lightning ends a test on SIGTERM
        self._signal_connector.received_sigterm = True
        raise SystemExit(0)

    with monkeypatch.context() as patch:
        patch.setattr(pytorch_lightning.Trainer, "test", stopped)
        with pytest.raises(SystemExit) as stop:
            train(lean_cfg("trainer.max_epochs=2"))
    assert stop.value.code == 143
    run = tmp_path / "run"
    assert not (run / "metrics.json").exists()
    finished = train(lean_cfg("trainer.max_epochs=2", "resume=true"))
    assert finished["epochs_trained"] == 2 and (run / "metrics.json").is_file()


def test_a_run_folder_is_never_written_over(lean_cfg, tmp_path):
    cfg = lean_cfg("test_after_fit=false")
    train(cfg)
    run = Path(cfg.output_dir)
    before = {p: p.stat().st_mtime_ns for p in run.rglob("*") if p.is_file()}

    with pytest.raises(LungsegError) as error:
        train(lean_cfg("test_after_fit=false"))
    assert f"The run folder {run} already holds a run" in str(error.value)
    assert "Continue it with resume=true" in str(error.value)
    with pytest.raises(LungsegError, match="holds another network than this run builds"):
        train(lean_cfg("test_after_fit=false", "resume=true", "model.width=8"))
    assert {p: p.stat().st_mtime_ns for p in run.rglob("*") if p.is_file()} == before

    # resume=true continues it (here for one more epoch), as does a ckpt_path inside it.
    more = train(lean_cfg("test_after_fit=false", "resume=true", "trainer.max_epochs=2"))
    assert more["epochs_trained"] == 2
    last = run / "checkpoints" / "last.ckpt"
    assert torch.load(last, weights_only=True)["epoch"] == 1
    again = train(lean_cfg("test_after_fit=false", f"ckpt_path={last}", "trainer.max_epochs=3"))
    assert again["epochs_trained"] == 3


def record_epoch_starts(monkeypatch, record=None) -> list[int]:
    """The epochs that training starts from now on (``record(module)`` also runs at each)."""
    started = []

    def on_train_epoch_start(self):
        started.append(self.current_epoch)
        if record is not None:
            record(self)

    monkeypatch.setattr(
        SegmentationModule, "on_train_epoch_start", on_train_epoch_start, raising=False
    )
    return started


def test_last_checkpoint_is_the_newest_epoch_when_the_best_is_older(lean_cfg, monkeypatch, caplog):
    """resume=true continues from the newest epoch, not from the best one: epochs after the
    best are not trained again. (Lightning 2.6's save_last writes last.ckpt only in epochs
    that improve the monitor.) Monitoring the epoch number for its minimum keeps epoch 0 best."""
    oldest_is_best = [
        "callbacks.model_checkpoint.monitor=epoch",
        "callbacks.model_checkpoint.mode=min",
    ]
    first = train(lean_cfg("test_after_fit=false", "trainer.max_epochs=3", *oldest_is_best))
    checkpoints = Path(first["best_checkpoint"]).parent
    assert sorted(p.name for p in checkpoints.iterdir()) == ["best-epoch000.ckpt", "last.ckpt"]
    assert first["best_epoch"] == 0
    assert torch.load(checkpoints / "last.ckpt", weights_only=True)["epoch"] == 2

    started = record_epoch_starts(monkeypatch)
    caplog.set_level(logging.INFO, logger="lungseg")
    more = train(
        lean_cfg("test_after_fit=false", "trainer.max_epochs=4", "resume=true", *oldest_is_best)
    )
    assert started == [3]
    # train.log says where the continued run picks up (was: only a scheduler's line hinted it)
    assert (
        f"continuing from {checkpoints / 'last.ckpt'}: 3 epochs trained, the next is epoch 3"
        in (caplog.text)
    )
    assert more["epochs_trained"] == 4 and more["best_epoch"] == 0
    assert torch.load(checkpoints / "last.ckpt", weights_only=True)["epoch"] == 3


def test_a_continued_run_keeps_its_split_and_its_earlier_records(lean_cfg):
    first = lean_cfg("test_after_fit=false")
    train(first)
    run = Path(first.output_dir)
    split = (run / "split.csv").read_text()
    with pytest.raises(LungsegError) as error:  # another seed splits the files otherwise
        train(lean_cfg("test_after_fit=false", "resume=true", "trainer.max_epochs=2", "seed=7"))
    message = str(error.value)
    assert f"{run / 'split.csv'} holds the split this run started with" in message
    assert "files in another split than before" in message and "data.split_file=" in message
    assert (run / "split.csv").read_text() == split

    config, metrics = (run / "config.yaml").read_text(), (run / "metrics.json").read_text()
    train(lean_cfg("test_after_fit=false", "resume=true", "trainer.max_epochs=2"))
    assert (run / "split.csv").read_text() == split
    assert (run / "config.1.yaml").read_text() == config  # what it started with
    assert "max_epochs: 2" in (run / "config.yaml").read_text()
    earlier, kept = json.loads(metrics), json.loads((run / "metrics.1.json").read_text())
    if kept["best_checkpoint"] != earlier["best_checkpoint"]:  # epoch 1 saved a better best:
        best = Path(kept["best_checkpoint"])  # the earlier one is kept, and its record says so
        assert best.name == f"earlier-{Path(earlier['best_checkpoint']).name}" and best.is_file()
    assert kept == {**earlier, "best_checkpoint": kept["best_checkpoint"]}
    assert json.loads((run / "metrics.json").read_text())["epochs_trained"] == 2


def test_a_finished_run_is_not_trained_again(lean_cfg, monkeypatch):
    """Running the command of a finished run again (resume=true) changes nothing: its epochs
    are done, or early stopping ended it and would end it again."""
    stops_at_epoch_1 = [
        "test_after_fit=false",
        "trainer.max_epochs=6",
        "callbacks.early_stopping.patience=1",
        "callbacks.early_stopping.min_delta=10",  # val/loss must fall by 10: never after epoch 0
    ]
    first = train(lean_cfg(*stops_at_epoch_1))
    assert first["epochs_trained"] == 2
    run = Path(lean_cfg().output_dir)
    before = {p: p.stat().st_mtime_ns for p in run.rglob("*") if p.is_file()}
    with pytest.raises(LungsegError, match="early stopping ended the run of .* after epoch 1"):
        train(lean_cfg(*stops_at_epoch_1, "resume=true"))
    with pytest.raises(LungsegError, match="has trained 2 epochs and trainer.max_epochs is 2"):
        train(lean_cfg(*stops_at_epoch_1, "resume=true", "trainer.max_epochs=2"))
    assert {p: p.stat().st_mtime_ns for p in run.rglob("*") if p.is_file()} == before

    # More patience continues it, with that patience (Lightning restores the saved one):
    # epochs 2 and 3 do not improve either, and patience 3 is spent after epoch 3.
    started = record_epoch_starts(monkeypatch)
    more = train(lean_cfg(*stops_at_epoch_1, "resume=true", "callbacks.early_stopping.patience=3"))
    assert started == [2, 3] and more["epochs_trained"] == 4

    # Stopped by a threshold, not by patience: more patience would not train it further.
    threshold = ["trainer.max_epochs=6", "+callbacks.early_stopping.stopping_threshold=1e9"]
    other = f"output_dir={run.parent / 'threshold'}"
    stopped = train(lean_cfg("test_after_fit=false", other, *threshold))
    assert stopped["epochs_trained"] == 1 and stopped["stopped_by"] == "early_stopping"
    with pytest.raises(
        LungsegError,
        match=r"after epoch 0: Stopping threshold reached.*stop\. Give callbacks.early_stopping=",
    ):
        train(lean_cfg("test_after_fit=false", other, *threshold, "resume=true"))


def test_a_continued_run_trains_with_the_configured_schedule_and_rate(lean_cfg, monkeypatch):
    """The cosine decay of a run resumed with more epochs is the one planned for them (not the
    restored one for the old epochs), and a new learning rate applies."""
    rates = {}
    record_epoch_starts(
        monkeypatch,
        lambda m: rates.setdefault(m.current_epoch, m.optimizers().param_groups[0]["lr"]),
    )
    train(lean_cfg("test_after_fit=false", "trainer.max_epochs=2"))
    lr, eta_min = 2e-3, 1e-5  # conf/optimizer/adamw.yaml, conf/scheduler/cosine.yaml
    assert rates[1] == pytest.approx(eta_min + (lr - eta_min) * (1 + math.cos(math.pi / 2)) / 2)

    train(lean_cfg("test_after_fit=false", "trainer.max_epochs=8", "resume=true"))
    planned = [eta_min + (lr - eta_min) * (1 + math.cos(math.pi * e / 8)) / 2 for e in range(8)]
    assert [rates[e] for e in range(2, 8)] == pytest.approx(planned[2:], rel=1e-6)

    run = Path(lean_cfg().output_dir)
    rates.clear()
    last = run / "checkpoints" / "last.ckpt"
    train(
        lean_cfg(
            "test_after_fit=false",
            f"output_dir={run.parent / 'finetuned'}",
            f"ckpt_path={last}",
            "trainer.max_epochs=9",
            "optimizer.lr=1e-3",
            "optimizer.weight_decay=0.05",
        )
    )
    assert rates[8] == pytest.approx(
        eta_min + (1e-3 - eta_min) * (1 + math.cos(math.pi * 8 / 9)) / 2
    )
    saved = torch.load(run.parent / "finetuned" / "checkpoints" / "last.ckpt", weights_only=True)
    assert saved["optimizer_states"][0]["param_groups"][0]["weight_decay"] == 0.05

    # A rate the plateau schedule has lowered stays lowered (it is no new optimizer.lr), and
    # the schedule's step at the end of the checkpoint's epoch is taken (Lightning skips it):
    # the rates of an uninterrupted run.
    rates.clear()
    never_better = ["scheduler=plateau", "scheduler.patience=0", "+scheduler.threshold=10"]
    plateau = [*never_better, f"output_dir={run.parent / 'plateau'}", "test_after_fit=false"]
    train(lean_cfg(*plateau, "trainer.max_epochs=2"))
    train(lean_cfg(*plateau, "trainer.max_epochs=3", "resume=true"))
    assert [rates[e] for e in range(3)] == pytest.approx([lr, lr / 2, lr / 4])


def test_a_continued_run_with_another_schedule_starts_it_from_the_configured_rate(
    lean_cfg, monkeypatch
):
    """A schedule of another kind than the checkpoint's (or none) starts from optimizer.lr, not
    from the rate the checkpoint's schedule had moved it to (with scheduler=none the whole
    fine-tune used to train at the old cosine's eta_min); a cosine decay takes the rate it
    plans for this epoch."""
    rates = {}
    record_epoch_starts(
        monkeypatch,
        lambda m: rates.setdefault(m.current_epoch, m.optimizers().param_groups[0]["lr"]),
    )
    first = lean_cfg("test_after_fit=false", "trainer.max_epochs=2")
    train(first)
    run = Path(first.output_dir)
    lr, eta_min = 2e-3, 1e-5  # conf/optimizer/adamw.yaml, conf/scheduler/cosine.yaml

    def go_on(name: str, start: Path, *overrides: str) -> Path:
        rates.clear()
        out = run.parent / name
        train(
            lean_cfg(
                "test_after_fit=false",
                f"output_dir={out}",
                f"ckpt_path={start / 'checkpoints' / 'last.ckpt'}",
                *overrides,
            )
        )
        return out

    constant = go_on("constant", run, "scheduler=none", "trainer.max_epochs=4", "optimizer.lr=1e-3")
    assert rates == pytest.approx({2: 1e-3, 3: 1e-3}, rel=1e-12)
    saved = torch.load(constant / "checkpoints" / "last.ckpt", weights_only=True)
    assert saved["lr_schedulers"] == []
    assert saved["optimizer_states"][0]["param_groups"][0]["lr"] == pytest.approx(1e-3)

    go_on("plateau", run, "scheduler=plateau", "trainer.max_epochs=3")
    assert rates == pytest.approx({2: lr}, rel=1e-12)

    go_on("cosine", constant, "trainer.max_epochs=6")
    planned = [eta_min + (lr - eta_min) * (1 + math.cos(math.pi * e / 6)) / 2 for e in range(6)]
    assert [rates[e] for e in (4, 5)] == pytest.approx(planned[4:], rel=1e-6)


def test_a_continued_plateau_schedule_takes_the_configured_min_lr_and_mode(lean_cfg, monkeypatch):
    """ReduceLROnPlateau keeps min_lr per group as min_lrs, and its mode beside the best value
    seen: both used to stay as the checkpoint had them (scheduler.min_lr had no effect, and a
    new mode compared with a best value counted the other way)."""
    rates = {}
    record_epoch_starts(
        monkeypatch,
        lambda m: rates.setdefault(m.current_epoch, m.optimizers().param_groups[0]["lr"]),
    )
    never_better = ["scheduler=plateau", "scheduler.patience=0", "+scheduler.threshold=10"]
    plateau = [*never_better, "test_after_fit=false"]
    train(lean_cfg(*plateau, "trainer.max_epochs=2"))
    lr = rates[0]
    # The step pending at the checkpoint (lr / 4) is floored by the new min_lr too.
    floor = f"scheduler.min_lr={lr / 3}"
    train(lean_cfg(*plateau, floor, "trainer.max_epochs=4", "resume=true"))
    assert [rates[e] for e in range(4)] == pytest.approx([lr, lr / 2, lr / 3, lr / 3])

    # Now watching the Dice: the best loss seen (inf: the threshold allows no improvement) is
    # forgotten, so that the first Dice is an improvement. (last.ckpt precedes that step.)
    maximise = ["scheduler.mode=max", "scheduler.monitor=val/dice"]
    train(lean_cfg(*plateau, floor, *maximise, "trainer.max_epochs=5", "resume=true"))
    last = Path(lean_cfg().output_dir) / "checkpoints" / "last.ckpt"
    state = torch.load(last, weights_only=True)["lr_schedulers"][0]
    assert state["mode"] == "max" and state["mode_worse"] == -math.inf
    assert state["min_lrs"] == pytest.approx([lr / 3])
    assert state["best"] == -math.inf and state["num_bad_epochs"] == 0


@pytest.mark.parametrize(
    "schedule",
    [
        ["+scheduler._target_=torch.optim.lr_scheduler.OneCycleLR", "+scheduler.max_lr=0.01"]
        + ["+scheduler.total_steps=8", "+scheduler.interval=step"],
        ["+scheduler._target_=torch.optim.lr_scheduler.CyclicLR", "+scheduler.base_lr=1e-4"]
        + ["+scheduler.max_lr=1e-2", "+scheduler.step_size_up=3"]
        + ["+scheduler.cycle_momentum=false", "+scheduler.interval=step"],
    ],
    ids=["one_cycle", "cyclic"],
)
def test_schedules_that_set_their_own_rates_resume_as_uninterrupted(
    lean_cfg, monkeypatch, schedule
):
    """Their start rate is not optimizer.lr (OneCycleLR's initial_lr is max_lr / div_factor,
    CyclicLR's base rate its base_lr): a resume must not take them for a new optimizer.lr."""
    rates = {}
    record_epoch_starts(
        monkeypatch,
        lambda m: rates.setdefault(m.current_epoch, m.optimizers().param_groups[0]["lr"]),
    )
    runs = ["scheduler=none", *schedule, "test_after_fit=false"]
    train(lean_cfg(*runs, "trainer.max_epochs=4", f"output_dir={lean_cfg().output_dir}_whole"))
    whole = dict(rates)
    rates.clear()
    train(lean_cfg(*runs, "trainer.max_epochs=2"))
    train(lean_cfg(*runs, "trainer.max_epochs=4", "resume=true"))
    assert rates == pytest.approx(whole, rel=1e-9)


def test_a_scheduler_setting_a_continued_schedule_cannot_take_is_named(lean_cfg, caplog):
    one_cycle = ["scheduler=none", "+scheduler._target_=torch.optim.lr_scheduler.OneCycleLR"]
    one_cycle += ["+scheduler.max_lr=0.01", "+scheduler.total_steps=8", "+scheduler.interval=step"]
    train(lean_cfg(*one_cycle, "test_after_fit=false", "trainer.max_epochs=1"))
    caplog.clear()
    more = [*one_cycle, "test_after_fit=false", "trainer.max_epochs=2", "resume=true"]
    train(lean_cfg(*more, "+scheduler.pct_start=0.5"))
    assert "scheduler.pct_start=0.5 is not applied to the continued run" in caplog.text


def test_a_best_checkpoint_of_the_unfinished_epoch_is_not_left_beside_the_new_best(
    lean_cfg, tmp_path, caplog
):
    """An interruption after validation saved best-epoch002.ckpt and before last.ckpt took in
    epoch 2: the continued run trains epoch 2 again, and that file stayed for good beside the
    new best (its restored callback does not know it)."""
    folder = tmp_path / "run" / "checkpoints"
    first = train(lean_cfg("trainer.max_epochs=2", "test_after_fit=false"))
    best = Path(first["best_checkpoint"])
    shutil.copy(best, folder / "best-epoch002.ckpt")  # the interrupted epoch's
    stale = best.read_bytes()
    (folder / "mine.ckpt").write_bytes(b"mine")  # not lungseg's name: left alone
    # an earlier interruption's file of the name is kept (was replaced by the rename)
    (folder / "interrupted-best-epoch002.ckpt").write_bytes(b"earlier")
    with caplog.at_level(logging.INFO):
        resumed = train(lean_cfg("trainer.max_epochs=4", "test_after_fit=false", "resume=true"))
    said = "best-epoch002.ckpt set aside as interrupted-best-epoch002.1.ckpt: saved in the epoch"
    assert said in caplog.text
    bests = sorted(p.name for p in folder.glob("best-*.ckpt"))
    assert bests == [Path(resumed["best_checkpoint"]).name]
    assert (folder / "interrupted-best-epoch002.1.ckpt").read_bytes() == stale
    assert (folder / "interrupted-best-epoch002.ckpt").read_bytes() == b"earlier"
    assert (folder / "mine.ckpt").read_bytes() == b"mine" and (folder / "last.ckpt").is_file()

    # continuing from another checkpoint of the run than last.ckpt sets nothing aside (the
    # later epochs' files are finished ones)
    earlier = folder / "epoch1.ckpt"
    shutil.copy(tmp_path / "run" / "checkpoints" / "interrupted-best-epoch002.1.ckpt", earlier)
    later = folder / "best-epoch002.ckpt"
    shutil.copy(earlier, later)
    caplog.clear()
    previous = (folder / "last.ckpt").read_bytes()
    with caplog.at_level(logging.INFO):
        train(lean_cfg("trainer.max_epochs=3", "test_after_fit=false", f"ckpt_path={earlier}"))
    assert "set aside" not in caplog.text and later.read_bytes() == earlier.read_bytes()
    # the run's later last.ckpt is kept, not written over by the continuation (found by a
    # tester)
    assert (folder / "last.1.ckpt").read_bytes() == previous
    kept = "last.ckpt, the run's last epoch before this continuation from epoch1.ckpt, is kept "
    assert kept + "as last.1.ckpt" in caplog.text


def _record_best(last: Path, epoch: int) -> Path:
    """Make ``last``'s monitored checkpoint callback record best-epoch<epoch>.ckpt, with a
    score no later epoch beats, as the state an interrupted run leaves: its earlier best
    removed when the epoch it did not finish saved a better one."""
    saved = torch.load(last, map_location="cpu", weights_only=False)
    best = last.parent / f"best-epoch{epoch:03d}.ckpt"
    for key, state in saved["callbacks"].items():
        if key.startswith("ModelCheckpoint") and state.get("monitor"):
            for old in [state["best_model_path"], *state.get("best_k_models", {})]:
                Path(old).unlink(missing_ok=True)
            state["best_model_path"] = state["kth_best_model_path"] = str(best)
            state["best_model_score"] = state["kth_value"] = torch.tensor(1.0)
            state["best_k_models"] = {str(best): torch.tensor(1.0)}
    torch.save(saved, last)
    return best


@pytest.mark.parametrize("moved", [False, True])
@pytest.mark.parametrize("epoch", [1, 0])
def test_a_best_checkpoint_an_interrupted_run_removed_is_restored_or_replaced(
    lean_cfg, tmp_path, caplog, epoch, moved
):
    """Killed after the unfinished epoch 2 saved its best (removing the earlier one) and
    before last.ckpt took it in: the continued run's restored callback pointed at the removed
    file, and the run ended in a FileNotFoundError without metrics.json (found by a tester).
    A best of last.ckpt's epoch (1) is restored from last.ckpt; an older one (0) cannot be,
    and the final weights are tested, with a warning. The same in a run folder moved after
    the interruption (was: the best was looked for in the old folder and not restored, and
    the record, which named a missing file, not followed, so a new epoch's best was tested;
    found by a review)."""
    run = tmp_path / "run"
    train(lean_cfg("trainer.max_epochs=2", "test_after_fit=false"))
    _record_best(run / "checkpoints" / "last.ckpt", epoch)
    (run / "checkpoints" / "best-epoch002.ckpt").write_bytes(
        (run / "checkpoints" / "last.ckpt").read_bytes()
    )
    if moved:
        run = Path(shutil.move(run, tmp_path / "elsewhere" / "moved"))
    folder = run / "checkpoints"
    best = folder / f"best-epoch{epoch:03d}.ckpt"
    with caplog.at_level(logging.INFO):
        resumed = train(lean_cfg("trainer.max_epochs=3", "resume=true", f"output_dir={run}"))
    assert resumed["test/dice"] is not None and resumed["epochs_trained"] == 3
    assert (f"and now names the same files in {folder}" in caplog.text) == moved
    if epoch == 1:
        assert "best-epoch001.ckpt restored from last.ckpt (the same epoch's weights)" in (
            caplog.text
        )
        assert resumed["best_checkpoint"] == str(best) and resumed["best_epoch"] == 1
    else:
        assert f"{best}, the best checkpoint the continued run recorded, is gone" in caplog.text
        assert resumed["best_checkpoint"] == str(folder / "last.ckpt")
        assert resumed["best_epoch"] == 2 and resumed["best_score"] is None
    assert (run / "metrics.json").is_file()


def test_a_run_stopped_in_its_test_is_finished_by_resume(lean_cfg, tmp_path):
    """Ctrl-C or SIGTERM in the test after training left no metrics.json, and resume=true
    refused: 'nothing is left to train' (found by a tester). It now tests the run and writes
    the record, training nothing; a tested run is still refused."""
    first = train(lean_cfg("trainer.max_epochs=2"))
    run = tmp_path / "run"
    last = (run / "checkpoints" / "last.ckpt").read_bytes()
    (run / "metrics.json").unlink()  # as a stop in the test leaves the run
    finished = train(lean_cfg("trainer.max_epochs=2", "resume=true"))
    assert finished["epochs_trained"] == 2 and finished["best_epoch"] == first["best_epoch"]
    assert finished["test/dice"] == pytest.approx(first["test/dice"])
    assert (run / "checkpoints" / "last.ckpt").read_bytes() == last  # nothing trained
    assert json.loads((run / "metrics.json").read_text())["test/dice"] == finished["test/dice"]
    with pytest.raises(LungsegError, match="nothing is left to train"):
        train(lean_cfg("trainer.max_epochs=2", "resume=true"))
    # a run that early stopping ended: tested as it was, not trained an epoch further
    stop = ["callbacks.early_stopping.patience=0", "callbacks.early_stopping.min_delta=10"]
    more = ["trainer.max_epochs=5", f"output_dir={tmp_path / 'early'}", *stop]
    first = train(lean_cfg(*more))
    assert first["stopped_by"] == "early_stopping" and first["epochs_trained"] < 5
    (tmp_path / "early" / "metrics.json").unlink()
    finished = train(lean_cfg(*more, "resume=true"))
    assert finished["stopped_by"] == "early_stopping"
    assert finished["epochs_trained"] == first["epochs_trained"]


def test_a_continued_runs_minutes_count_its_earlier_segments(lean_cfg, tmp_path):
    """train_minutes counted only the last segment of a continued run (found by testers); a
    run from another run's checkpoint in a new folder counts its own time only."""
    first = train(lean_cfg("trainer.max_epochs=2", "test_after_fit=false"))
    last = tmp_path / "run" / "checkpoints" / "last.ckpt"
    saved = torch.load(last, map_location="cpu", weights_only=True)
    assert 0 < saved["lungseg_train_seconds"] <= first["train_minutes"] * 60
    saved["lungseg_train_seconds"] = 3600.0  # an hour before the interruption
    torch.save(saved, last)
    resumed = train(lean_cfg("trainer.max_epochs=3", "test_after_fit=false", "resume=true"))
    assert 60 < resumed["train_minutes"] < 70  # the hour and this segment's minutes
    new = [f"ckpt_path={tmp_path / 'run' / 'checkpoints' / 'last.ckpt'}", "test_after_fit=false"]
    tuned = train(lean_cfg("trainer.max_epochs=4", f"output_dir={tmp_path / 'new'}", *new))
    assert tuned["train_minutes"] < 1  # its own, not the source run's hour


def test_init_weights_starts_a_new_run_from_another_runs_network(
    lean_cfg, tmp_path, demo_dir, caplog
):
    """Was: only ckpt_path, which continues its run's epoch count, optimiser and schedule (a
    run of 2 epochs could not start a 1-epoch fine-tuning) and refuses another class count."""
    source = tmp_path / "source"
    train(lean_cfg("trainer.max_epochs=2", "test_after_fit=false", f"output_dir={source}"))
    last = source / "checkpoints" / "last.ckpt"
    tuned = tmp_path / "tuned"
    # the same images with 0/non-zero masks: 2 classes where the source had 3
    with caplog.at_level(logging.INFO):
        metrics = train(
            lean_cfg(
                f"data.image_dir={demo_dir / 'images'}",
                f"data.mask_dir={demo_dir / 'masks'}",
                "data.mask_mode=binary",
                f"init_weights={last}",
                f"output_dir={tuned}",
            )
        )
    assert metrics["epochs_trained"] == 1 and metrics["test/dice"] is not None
    assert f"init_weights {last}: the network starts from" in caplog.text
    assert "start fresh: head.weight, head.bias" in caplog.text

    # the weights that fit are loaded, the others keep their fresh initialisation
    source_net = load_checkpoint(last, torch.device("cpu")).net
    net = UNet(in_channels=1, num_classes=2, width=4)
    head = net.head.weight.clone()
    weights = read_initial_weights(last, {"_target_": "lungseg.models.unet.UNet"})
    apply_initial_weights(net, weights, last)
    for name, value in net.state_dict().items():
        if name.startswith("head."):
            continue
        assert torch.equal(value, source_net.state_dict()[name]), name
    assert torch.equal(net.head.weight, head)

    with pytest.raises(LungsegError, match="holds the weights of a UNet, and this run trains a"):
        train(lean_cfg("model=fcn", f"init_weights={last}", f"output_dir={tmp_path / 'fcn'}"))
    with pytest.raises(LungsegError, match="fit only 0% of this run's network"):
        train(lean_cfg("model.width=8", f"init_weights={last}", f"output_dir={tmp_path / 'w8'}"))
    with pytest.raises(LungsegError, match="init_weights and ckpt_path are both given"):
        train(lean_cfg(f"ckpt_path={last}", f"init_weights={last}", f"output_dir={tmp_path / 'b'}"))
    assert not (tmp_path / "b").exists()  # refused before anything is written
    with pytest.raises(LungsegError, match=r"init_weights .*nope.ckpt does not exist"):
        train(lean_cfg(f"init_weights={tmp_path / 'nope.ckpt'}", f"output_dir={tmp_path / 'n'}"))


def test_resume_true_starts_a_run_that_saved_no_checkpoint_yet(lean_cfg, tmp_path):
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)  # as left by a run killed in its first epoch
    (run / "split.csv").write_text("file,split\n")
    # was: 'Continue it with resume=true (from its checkpoints/last.ckpt)', which it has not
    with pytest.raises(
        LungsegError, match="already holds a run .* no checkpoint yet: resume=true starts it again"
    ):
        train(lean_cfg("test_after_fit=false"))
    cfg = lean_cfg("resume=true", "test_after_fit=false", "trainer.limit_train_batches=1")
    assert train(cfg)["epochs_trained"] == 1
    assert (run / "checkpoints" / "last.ckpt").is_file()


def test_default_run_folders_differ_for_runs_started_in_the_same_second():
    with initialize_config_dir(str(ROOT / "conf"), version_base="1.3"):
        dirs = {compose("config", return_hydra_config=True).hydra.run.dir for _ in range(3)}
        sweeps = {compose("config", return_hydra_config=True).hydra.sweep.dir for _ in range(3)}
    assert len(dirs) == 3 and len(sweeps) == 3


class _RunsShell:
    """Unpickling this calls os.system: a checkpoint that would run code when loaded unsafely."""

    def __init__(self, marker: Path):
        self.command = f"touch '{marker}'"

    def __reduce__(self):
        return os.system, (self.command,)


@pytest.mark.parametrize("entry", ["train", "eval", "predict"])
@pytest.mark.parametrize("zipped", [True, False], ids=["zip", "legacy"])
def test_a_malicious_checkpoint_runs_nothing(lean_cfg, tmp_path, entry, zipped):
    marker = tmp_path / "code_ran"
    bad = tmp_path / "model.ckpt"
    payload = {"state_dict": _RunsShell(marker), "hyper_parameters": {"data_info": {}}}
    torch.save(payload, bad, _use_new_zipfile_serialization=zipped)  # both formats pickle
    out = tmp_path / "out"
    if entry == "train":
        task, cfg = train, lean_cfg(f"ckpt_path={bad}", f"output_dir={out}")
    else:
        (tmp_path / "in").mkdir()
        write_image(tmp_path / "in" / "scan.png", np.zeros((8, 8), np.uint8))
        overrides = [f"ckpt_path={bad}", f"output_dir={out}", "device=cpu", "progress_bar=false"]
        if entry == "predict":
            overrides.append(f"input_dir={tmp_path / 'in'}")
        with initialize_config_dir(str(ROOT / "conf"), version_base="1.3"):
            cfg = compose(entry, overrides=overrides)
        task = evaluate if entry == "eval" else predict
    with pytest.raises(LungsegError, match=r"weights_only=True\) refused it") as error:
        task(cfg)
    assert str(bad) in str(error.value)
    assert not marker.exists() and not out.exists()
    torch.load(bad, weights_only=False)  # the control: an unsafe load does run the payload
    assert marker.exists()


def test_ctrl_c_says_how_to_continue(lean_cfg, monkeypatch, caplog):
    """Lightning ends a run interrupted by Ctrl-C with its graceful shutdown and exit status 1,
    saying only that; the log now names last.ckpt and the command that continues the run."""

    def on_train_batch_end(self, outputs, batch, batch_idx):
        if self.current_epoch == 1:
            raise KeyboardInterrupt

    monkeypatch.setattr(SegmentationModule, "on_train_batch_end", on_train_batch_end)
    monkeypatch.setattr("signal.signal", lambda *args: None)  # Lightning ignores further Ctrl-C
    cfg = lean_cfg("trainer.max_epochs=3")
    with pytest.raises(SystemExit):
        train(cfg)
    last = Path(cfg.output_dir) / "checkpoints" / "last.ckpt"
    assert f"Interrupted. {last} holds the last finished epoch; continue the run" in caplog.text
    assert f"hydra.run.dir={cfg.output_dir} resume=true." in caplog.text
    assert torch.load(last, weights_only=True)["epoch"] == 0


def test_a_run_is_not_continued_with_another_ignore_label():
    """Continuing with another data.ignore_index reads the masks otherwise (an unlabelled
    area turned foreground), and the best checkpoint would be chosen across two labellings:
    refused like another mask mode (was: accepted without a word, found by a tester)."""
    from lungseg.run_folder import check_same_preparation

    checkpoint = {"hyper_parameters": {"data_info": {"ignore_index": 128, "mask_mode": "binary"}}}
    with pytest.raises(LungsegError, match=r"ignore_index null \(the checkpoint: 128\)"):
        check_same_preparation("last.ckpt", checkpoint, {"ignore_index": None}, continuing=True)
    check_same_preparation("last.ckpt", checkpoint, {"ignore_index": 128}, continuing=True)
