"""Lightning callbacks with what a continued run needs, and a progress bar that does not wait
for the GPU."""

import logging
import math
import statistics
import time
from typing import Any

import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import Callback, Timer, TQDMProgressBar, WeightAveraging
from pytorch_lightning.callbacks import EarlyStopping as _EarlyStopping
from pytorch_lightning.trainer.states import TrainerFn
from torch.optim.lr_scheduler import CosineAnnealingLR

log = logging.getLogger(__name__)


class ProgressBar(TQDMProgressBar):
    """Lightning's TQDM bar, showing the training loss read when the bar is redrawn (every
    ``refresh_rate`` batches) instead of after every batch.

    Lightning turns each metric logged with ``prog_bar=True`` into a Python number after every
    training batch, whether or not a bar shows it: on a GPU, a wait for the step to finish, so
    the host could never queue the next step while the GPU works (measured on an H100 with
    ``benchmarks/profile_step.py``: 19 waits in 20 steps). lungseg logs ``train/loss``
    without ``prog_bar`` and this bar reads it from the callback metrics, which hold it as a
    tensor, only when it redraws."""

    SHOWN = ("train/loss_step", "train/loss_epoch")

    def on_train_end(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        # The bar's last line: its epoch-end redraw came before the module logged that epoch's
        # values (Lightning calls the bar's on_train_epoch_end first), so it showed the
        # epoch before's train/loss_epoch and train/dice.
        if self._train_progress_bar is not None and not self.train_progress_bar.disable:
            self.train_progress_bar.set_postfix(self.get_metrics(trainer, pl_module))
        super().on_train_end(trainer, pl_module)

    def get_metrics(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> dict:
        items = super().get_metrics(trainer, pl_module)
        metrics = trainer.callback_metrics
        for key in self.SHOWN:
            value = metrics.get(key)
            if isinstance(value, torch.Tensor) and value.numel() == 1:
                items[key] = value.item()
        return items


class EarlyStopping(_EarlyStopping):
    """Lightning's EarlyStopping, except that a continued run (``resume=true``, ``ckpt_path``)
    waits with the configured patience: Lightning 2.6 puts back the patience saved in the
    checkpoint, so ``callbacks.early_stopping.patience=30 resume=true`` had no effect. The
    epochs waited so far and the best score are restored as before."""

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        patience = self.patience
        super().load_state_dict(state_dict)
        if self.patience != patience:
            log.info(
                "early stopping: patience %s as configured (the checkpoint had %s)",
                patience,
                self.patience,
            )
        self.patience = patience


class EMA(WeightAveraging):
    """An exponential moving average of the weights (Lightning's WeightAveraging): validation,
    the checkpoints' ``state_dict`` (so eval.py, predict.py and export) and the test after
    fitting use the average; the trained weights travel in the checkpoint too
    (``current_model_state``), so a continued run goes on from both.

    ``half_life_epochs`` sets the averaging in epochs, not steps: the decay per optimizer step
    is ``0.5 ** (1 / (half_life_epochs * steps per epoch))``, worked out when training starts,
    so the same setting averages over the same share of training on 100 images or 10,000.
    Until ``1 / (1 - decay)`` steps are averaged, the average is the plain mean of the steps
    so far, so that it does not hold on to the first step's weights.
    Off unless ``enabled`` (``callbacks.ema.enabled=true``); train.py leaves a disabled one
    out of the trainer."""

    def __init__(self, enabled: bool = False, half_life_epochs: float = 1.0) -> None:
        if not half_life_epochs > 0:
            raise ValueError(f"callbacks.ema.half_life_epochs must be > 0, not {half_life_epochs}")
        super().__init__(avg_fn=self._average)
        self.enabled, self.half_life_epochs = bool(enabled), float(half_life_epochs)
        self.decay: float | None = None

    def setup(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        if self._average_model is not None:
            # In float32 whatever the weights' dtype: with half-precision weights
            # (trainer.precision=bf16-true) a step's share of the average falls below their
            # resolution once the decay is near 1, and the average would stop moving.
            self._average_model.module.float()

    def on_fit_start(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        # Lightning builds the average in setup, before the strategy moves the module to its
        # device: on a GPU the average stayed in host memory, and every step's update copied
        # the weights over and waited for them.
        if self._average_model is not None and self._device is None:
            self._average_model.to(pl_module.device)

    def on_train_start(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        steps = max(1, math.ceil(trainer.num_training_batches / trainer.accumulate_grad_batches))
        self.decay = 0.5 ** (1 / (self.half_life_epochs * steps))
        log.info(
            "weight averaging: EMA decay %.5f per step (half-life %.3g epochs of %d steps)",
            self.decay,
            self.half_life_epochs,
            steps,
        )

    def on_load_checkpoint(
        self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", checkpoint: dict[str, Any]
    ) -> None:
        # Lightning's hook also runs for trainer.test(ckpt_path=...) after fitting, where it
        # put the trained weights (current_model_state) back over the averaged ones it had
        # just loaded: the test after fitting scored the weights the average was meant to
        # replace. Outside fitting the checkpoint's state_dict, the average, is the model.
        if trainer.state.fn == TrainerFn.FITTING:
            super().on_load_checkpoint(trainer, pl_module, checkpoint)

    def on_validation_epoch_start(
        self, trainer: "pl.Trainer", pl_module: "pl.LightningModule"
    ) -> None:
        if trainer.state.fn == TrainerFn.FITTING:  # trainer.validate() after fit: as loaded
            super().on_validation_epoch_start(trainer, pl_module)

    def on_validation_epoch_end(
        self, trainer: "pl.Trainer", pl_module: "pl.LightningModule"
    ) -> None:
        if trainer.state.fn == TrainerFn.FITTING:
            super().on_validation_epoch_end(trainer, pl_module)

    def _average(
        self, averaged: torch.Tensor, current: torch.Tensor, num_averaged: torch.Tensor
    ) -> torch.Tensor:
        assert self.decay is not None, "on_train_start sets the decay"
        if not averaged.is_floating_point():  # BatchNorm's num_batches_tracked: a count
            return current
        # Warm-up: until 1 / (1 - decay) steps are averaged, the plain mean of the steps so
        # far (the first step's weight 1/n, not decay**n: an average that started from the
        # first step's nearly random weights kept a quarter of them after two half-lives).
        # On the device, no sync: num_averaged is a tensor there.
        weight = torch.clamp(1.0 / (num_averaged + 1), min=1 - self.decay)
        return averaged + (current.to(averaged.dtype) - averaged) * weight.to(averaged.dtype)


class FitScheduleToTime(Callback):
    """With ``trainer.max_time`` set, plan a cosine learning-rate decay over the epochs that
    fit in the time, not over ``trainer.max_epochs`` epochs that the time limit would cut
    (leaving the rate half-way down its schedule, on data larger or a machine slower than
    the recipe was planned for).

    At the end of every epoch (after its validation) the epochs still to come are estimated
    from the time left and the median epoch so far (not the first epoch of a process, which
    carries the warm-up, once there is another; a continued run starts from the epoch time
    saved with its plan), each planned ``margin`` longer, with half an epoch to spare. When
    fewer than ``trainer.max_epochs`` fit, the cosine schedule's ``T_max`` and the trainer's
    epoch limit become that count, and the rate is the one the shorter schedule has at this
    epoch; the plan follows each new estimate. The plan is saved with the schedule
    (``lungseg_time_plan``): a continued run with the same settings goes on with it, one with
    another time limit or length is planned again before its first epoch. Other schedules
    (plateau, constant) are left alone: the time limit cuts them as before. Runs without
    ``trainer.max_time`` are untouched.

    Off unless ``enabled`` (``callbacks.time_plan.enabled=true``): on lung_ct with half the
    epochs cut by the time limit it made no difference to the test Dice (README)."""

    def __init__(self, enabled: bool = False, margin: float = 0.1) -> None:
        if not 0 <= margin < 1:
            raise ValueError(f"callbacks.time_plan.margin must be in [0, 1), not {margin}")
        self.enabled, self.margin = bool(enabled), margin
        self._epoch_seconds: list[float] = []
        self._last_end: float | None = None
        self._checked_restored = False
        self._planned_epoch = -1
        self._restored_seconds: float | None = None  # a continued run's epoch time
        self._seconds: float | None = None  # the epoch time of the last plan

    @staticmethod
    def _timer(trainer: "pl.Trainer") -> Timer | None:
        timer = next((c for c in trainer.callbacks if isinstance(c, Timer)), None)
        return timer if timer is not None and timer.time_remaining() is not None else None

    @staticmethod
    def _cosine(trainer: "pl.Trainer") -> CosineAnnealingLR | None:
        for config in trainer.lr_scheduler_configs:
            if isinstance(config.scheduler, CosineAnnealingLR) and config.interval == "epoch":
                return config.scheduler
        return None

    @staticmethod
    def _configured(pl_module: "pl.LightningModule") -> dict[str, Any]:
        return dict(getattr(pl_module.hparams, "scheduler", None) or {})

    def on_train_start(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        self._epoch_seconds, self._last_end = [], time.monotonic()
        if self.enabled and (self._timer(trainer) is None or self._cosine(trainer) is None):
            self._info(
                trainer,
                "callbacks.time_plan has nothing to fit: it needs trainer.max_time and the "
                "cosine schedule (scheduler=cosine)",
            )

    def on_train_epoch_start(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        if self._checked_restored or not self.enabled:
            return
        # The first epoch of a continued run: after the module has applied the configured
        # settings (on_train_start), which leave a planned T_max to this callback.
        self._checked_restored = True
        scheduler = self._cosine(trainer)
        plan = getattr(scheduler, "lungseg_time_plan", None)
        if scheduler is None or not plan:
            return
        timer = self._timer(trainer)
        configured = self._configured(pl_module)
        self._restored_seconds = plan.get("epoch_seconds")
        limited = trainer.max_epochs is not None and trainer.max_epochs >= 0
        if timer is not None and limited and self._restored_seconds:
            same_time = plan.get("max_time") == timer._duration
            if same_time and plan.get("T_max") == configured.get("T_max"):
                # The same settings: the plan goes on as saved (an interrupted run continues
                # as it would have run on).
                length = min(configured.get("T_max") or scheduler.T_max, plan["epochs"])
                if scheduler.T_max != length:
                    set_cosine_length(scheduler, length)
                trainer.fit_loop.max_epochs = min(trainer.max_epochs, plan["epochs"])
                return
            # Other settings: planned again at once, from the epoch time the run measured,
            # so that the first epoch trains on the new plan.
            self._seconds = self._restored_seconds
            epoch = self._restored_seconds * (1 + self.margin)
            done = trainer.current_epoch
            self._fit(trainer, scheduler, configured, {}, epoch, done, trainer.max_epochs)
            return
        scheduler.lungseg_time_plan = None
        if configured.get("T_max") is not None and scheduler.T_max != configured["T_max"]:
            self._info(
                trainer,
                "the schedule fitted to %d epochs in trainer.max_time returns to "
                "scheduler.T_max=%s",
                scheduler.T_max,
                configured["T_max"],
            )
            set_cosine_length(scheduler, configured["T_max"])

    def on_validation_end(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        if trainer.state.fn == "fit" and not trainer.sanity_checking:
            self._plan(trainer, pl_module)

    def on_train_epoch_end(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        # After on_validation_end; the checkpoint callbacks run after this (Lightning runs
        # them last), so a checkpoint holds the plan its schedule follows.
        self._plan(trainer, pl_module)  # once an epoch: here for an epoch without validation

    def _plan(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        if self._planned_epoch == trainer.current_epoch or not self.enabled:
            return
        self._planned_epoch = trainer.current_epoch
        now = time.monotonic()
        if self._last_end is not None:
            self._epoch_seconds.append(now - self._last_end)
        self._last_end = now
        scheduler = self._cosine(trainer)
        if self._timer(trainer) is None or scheduler is None or not self._epoch_seconds:
            return
        plan = getattr(scheduler, "lungseg_time_plan", None) or {}
        max_epochs = plan.get("max_epochs", trainer.max_epochs)
        if max_epochs is None or max_epochs < 0:
            return
        if len(self._epoch_seconds) > 1:
            seconds = statistics.median(self._epoch_seconds[1:])
        else:  # a process's first epoch (warm-up): what a continued run measured before
            seconds = self._restored_seconds or self._epoch_seconds[0]
        self._seconds = seconds
        epoch = seconds * (1 + self.margin)
        if epoch > 0:
            configured = self._configured(pl_module)
            done = trainer.current_epoch + 1  # this epoch included
            self._fit(trainer, scheduler, configured, plan, epoch, done, max_epochs)

    def _fit(
        self,
        trainer: "pl.Trainer",
        scheduler: CosineAnnealingLR,
        configured: dict[str, Any],
        plan: dict[str, Any],
        epoch: float,
        done: int,
        max_epochs: int,
    ) -> None:
        """Fit the schedule and the epochs to the time left after ``done`` epochs, planning
        each epoch to take ``epoch`` seconds; ``plan``: the plan so far, or {}."""
        timer = self._timer(trainer)
        # Half an epoch to spare at the end as well: the last epoch may be a slow one.
        fit = done + max(0, int((timer.time_remaining() - epoch / 2) // epoch))
        epochs = trainer.strategy.broadcast(max(done, min(fit, max_epochs)), src=0)
        if epochs >= max_epochs and not plan:
            if scheduler.T_max != (configured.get("T_max") or scheduler.T_max):
                set_cosine_length(scheduler, configured["T_max"])  # a plan no longer needed
            scheduler.lungseg_time_plan = None
            trainer.fit_loop.max_epochs = max_epochs
            return  # all the planned epochs fit in the time
        if plan.get("epochs") != epochs:
            self._info(
                trainer,
                "trainer.max_time leaves time for about %d more epochs (%.0f s each): the cosine "
                "schedule now ends after epoch %d of trainer.max_epochs=%d",
                epochs - done,
                epoch,
                epochs,
                max_epochs,
            )
        length = min(configured.get("T_max") or scheduler.T_max, epochs)
        if scheduler.T_max != length:
            set_cosine_length(scheduler, length)
        scheduler.lungseg_time_plan = {
            "epochs": epochs,
            "max_time": timer._duration,
            "max_epochs": max_epochs,
            "T_max": configured.get("T_max"),
            "epoch_seconds": self._seconds,  # the median epoch, before the margin
        }
        trainer.fit_loop.max_epochs = epochs

    @staticmethod
    def _info(trainer: "pl.Trainer", message: str, *args: Any) -> None:
        if trainer.is_global_zero:
            log.info(message, *args)

    def planned_epochs(self, trainer: "pl.Trainer") -> int | None:
        """The epochs the schedule was fitted to, or None when it was not (or when all of
        trainer.max_epochs fit)."""
        plan = getattr(self._cosine(trainer), "lungseg_time_plan", None)
        return plan["epochs"] if plan and plan["epochs"] < plan["max_epochs"] else None


def set_cosine_length(scheduler: CosineAnnealingLR, length: int) -> None:
    """Give a cosine schedule a new ``T_max`` and its groups the rate it has at its current
    step with that length (torch's closed form; its CosineAnnealingLR steps recursively from
    the current rate, so the steps after go on along the new curve)."""
    scheduler.T_max = length
    progress = (1 + math.cos(math.pi * scheduler.last_epoch / length)) / 2
    for group, base in zip(scheduler.optimizer.param_groups, scheduler.base_lrs, strict=True):
        group["lr"] = scheduler.eta_min + (base - scheduler.eta_min) * progress
    scheduler._last_lr = [g["lr"] for g in scheduler.optimizer.param_groups]
