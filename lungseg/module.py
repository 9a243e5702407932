"""One LightningModule for every architecture: a network, a loss, metrics and an optimiser,
each built from a plain dict of its Hydra config."""

import logging
import time
import warnings
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from hydra.utils import instantiate
from torchmetrics import MeanMetric

from lungseg.callbacks import FitScheduleToTime, set_cosine_length
from lungseg.checks import same as _same
from lungseg.data.masks import IGNORE
from lungseg.errors import LungsegError
from lungseg.metrics import Float32States, SegmentationMetrics, predicted_classes

STAGES = ("train", "val", "test")
_UNSET = object()
log = logging.getLogger(__name__)

# Lightning warns when an epoch has fewer batches than trainer.log_every_n_steps "if you want
# to see logs for the training epoch", on every small dataset (the demo under DDP, tests). Its
# step count runs on across epochs, so the training loss is still written every N steps, and
# this module logs each epoch's losses and metrics itself.
warnings.filterwarnings(
    "ignore", r"The number of training batches \(\d+\) is smaller than the logging interval"
)

# The epoch metrics and loss means this module logs are already reduced across DDP processes
# (torchmetrics' states, summed at compute), so Lightning's advice, given once for each of
# them (48 warnings in a DDP run with 3 classes), to add sync_dist=True would only average
# equal values again. A key of the user's own keeps it.
warnings.filterwarnings(
    "ignore",
    r"It is recommended to use `self\.log\('(train|val|test)/"
    r"(loss|loss_epoch|acc|dice|iou|dice_nonempty|fp_empty)(_[^']*)?', \.\.\., sync_dist=True\)`",
)


class _LossMean(Float32States, MeanMetric):
    """A loss's mean over an epoch, weighted by images, without torchmetrics' NaN check: its
    ``if nans.any()`` waits for the GPU at every update (a non-finite loss has its own check,
    ``_check_finite``, and a NaN mean shows it). Not ``nan_strategy="disable"``, which in
    torchmetrics 1.9 also drops the weights (every batch then counts alike)."""

    def _cast_and_nan_check_input(
        self, x: torch.Tensor, weight: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        weight = torch.ones_like(x) if weight is None else weight
        return x.to(self.dtype), weight.to(self.dtype)

    def update(
        self, value: torch.Tensor | float, weight: torch.Tensor | float | None = None
    ) -> None:
        if isinstance(value, torch.Tensor) and not isinstance(weight, torch.Tensor):
            # A number of images as the weight: multiplied in on the device. MeanMetric would
            # make it a tensor there first (torch.as_tensor(weight, device=cuda)), a copy from
            # host memory that waited for the GPU at every step (benchmarks/profile_step.py
            # on an H200, 2026-11-28).
            weight = 1.0 if weight is None else float(weight)
            value = value.detach().to(self.dtype)
            self.mean_value += value.sum() * weight
            self.weight += weight * value.numel()
            return
        super().update(value, weight)


class SegmentationModule(pl.LightningModule):
    """Trains any ``net`` (logits (N, C, H, W) at the input size) with any ``loss``.

    Every argument is a plain dict (``OmegaConf.to_container(cfg.x, resolve=True)``) with a
    Hydra ``_target_``. They are saved as hyper-parameters and the objects are built here, so a
    checkpoint loads with ``torch.load(weights_only=True)`` and carries everything needed to
    rebuild the network. ``data_info`` describes the data the network expects (image size,
    channels, normalisation, class names, mask encoding) for prediction on new images;
    ``postprocess`` is the post-processing eval.py and predict.py apply by default
    (``lungseg.postprocess``).

    Nothing in a training step waits for the device: training metrics are updated on every
    ``train_metrics_every_n_steps``-th batch (validation and test metrics on every batch), and
    on a GPU or under DDP a non-finite loss is noted on the device and looked at after every
    ``trainer.log_every_n_steps``-th step (where the logger waits for the device anyway) and
    before each validation (on one CPU process, where looking is free, at once). The weights
    themselves are looked at once an epoch, before the checkpoint callbacks save them: no loss
    has seen those of the epoch's last optimiser step (and without validation none would), nor
    the batch-norm running statistics, which a loss in training mode does not use.
    """

    def __init__(
        self,
        net: dict[str, Any],
        loss: dict[str, Any],
        optimizer: dict[str, Any],
        scheduler: dict[str, Any] | None = None,
        data_info: dict[str, Any] | None = None,
        channels_last: bool = False,
        compile: bool = False,
        train_metrics_every_n_steps: int = 1,
        postprocess: dict[str, Any] | None = None,
    ):
        super().__init__()
        # Logged to TensorBoard at the end of training together with the final metrics.
        self.save_hyperparameters(logger=False)
        self.net = instantiate(net)
        # data.ignore_index set: the masks hold masks.IGNORE where pixels are left out of the
        # loss and the metrics
        ignore = None if (data_info or {}).get("ignore_index") is None else IGNORE
        self.loss_fn = _build_loss(loss, ignore)
        num_classes = net["num_classes"]
        weights = loss.get("class_weights")
        if weights is not None and len(weights) != num_classes:
            raise LungsegError(
                f"loss.class_weights has {len(weights)} values but the data has {num_classes} "
                f"classes; give one weight per class (background first) or set it to null."
            )
        names = (data_info or {}).get("class_names") or [f"class_{i}" for i in range(num_classes)]
        self.class_names = list(names)
        # Separate attributes: a ModuleDict key "train" would shadow nn.Module.train().
        for stage in STAGES:
            setattr(self, f"{stage}_metrics", SegmentationMetrics(self.class_names, ignore))
        # The loss of an epoch: a mean weighted by images, summed across DDP processes once at
        # the epoch's end (their shares of a split can differ by an image: no padding repeats).
        self.val_loss_mean, self.test_loss_mean = _LossMean(), _LossMean()
        self.train_loss_mean = _LossMean()  # logged as train/loss_epoch
        if channels_last:
            self.net = self.net.to(memory_format=torch.channels_last)
        if train_metrics_every_n_steps < 1:
            raise LungsegError(
                f"train_metrics_every_n_steps is {train_metrics_every_n_steps}; give 1 (every "
                "training batch) or more."
            )
        self._nonfinite: torch.Tensor | None = None  # device flag, see _check_finite
        self._plateau_pending: dict[str, float] = {}  # see on_save_checkpoint
        self._saved_scheduler: dict[str, Any] = {}  # see on_load_checkpoint
        self._new_schedule = False  # see on_load_checkpoint
        # Training time: this process's from ``run_started`` (train() sets it), and the
        # segments' before it of a continued run (``seconds_before``, from its checkpoint)
        self.run_started = time.monotonic()
        self.seconds_before = 0.0
        self.time_restored = False  # train() sets it True where none is to be restored
        self._fresh_groups: list[dict[str, Any]] = []  # see configure_optimizers
        self._checked_step = 0  # the optimiser step after which _check_after_step last looked
        self._loss_step_logged = False  # see _logs_loss_step
        self._step_loss: torch.Tensor | None = None  # this training step's, see _step
        self._step_loss_logged = False
        if compile:
            # In place: the state_dict keys stay those of the plain network, so checkpoints of
            # compiled and uncompiled runs are interchangeable.
            self.net.compile()
        size = (data_info or {}).get("image_size")
        if size is not None and not compile:
            # One image as the network gets it: Lightning's model summary then prints each
            # layer's input/output shapes and the FLOPs of a forward pass (else "0"). Not
            # when compiled: the summary would compile the network for a batch of one first.
            height, width = (size, size) if isinstance(size, int) else size
            self.example_input_array = torch.zeros(1, int(net["in_channels"]), height, width)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if images.dtype != self.dtype and images.is_floating_point():
            # Weights in another dtype (trainer.precision=bf16-true) and images that no
            # precision plugin converted: the model summary's example, the prediction grid's.
            images = images.to(self.dtype)
        if self.hparams.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        return self.net(images)

    def _step(self, batch: dict[str, torch.Tensor], stage: str, batch_idx: int = 0) -> torch.Tensor:
        images, masks = batch["image"], batch["mask"]
        logits = self(images)
        # "target": class fractions (N, C, H, W) with data.soft_masks; masks are then their arg-max
        loss = self.loss_fn(logits, batch.get("target", masks))
        self._check_finite(loss, stage)
        if stage != "train" or batch_idx % self.hparams.train_metrics_every_n_steps == 0:
            # Metrics accumulate on the device; updating them forces no host sync.
            getattr(self, f"{stage}_metrics").update(predicted_classes(logits.detach()), masks)
        # The loss's means (val/test, and train's epoch) through metrics weighted by images,
        # summed across DDP processes at the epoch's end: Lightning's own epoch mean of a
        # logged value is each process's own (and a scheduler watching train/loss_epoch
        # would step each process's learning rate apart).
        # Logged once, at the epoch's end (_log_epoch_metrics), not at every batch.
        getattr(self, f"{stage}_loss_mean").update(loss.detach(), weight=images.shape[0])
        if stage == "train":
            self._step_loss = loss.detach()
            self._step_loss_logged = self._logs_loss_step(batch_idx)
            if self._step_loss_logged:
                self._log_step_loss()
        return loss

    def _log_step_loss(self) -> None:
        # Not in the progress bar: Lightning would turn it into a number after every batch,
        # waiting for the GPU; lungseg.callbacks.ProgressBar shows it when it redraws.
        self.log("train/loss_step", self._step_loss, on_step=True, on_epoch=False)
        self._loss_step_logged = True

    def on_train_batch_end(self, outputs, batch, batch_idx):
        # A stop decided in the callbacks' on_train_batch_end, which run before this hook
        # (trainer.max_time's Timer): Lightning writes this step's values too.
        if self.trainer.should_stop and not self._step_loss_logged:
            self._log_step_loss()

    def _logs_loss_step(self, batch_idx: int) -> bool:
        """Whether to log this training step's loss: on the steps whose values Lightning writes
        to the logger (every ``trainer.log_every_n_steps``-th optimiser step, every one with
        ``fast_dev_run``), on those where the progress bar redraws (counted in the epoch's
        batches) and on a run's first, so that the bar has a loss to show from the start.
        Lightning's ``self.log`` costs about 0.5 ms of host time a call
        (benchmarks/profile_step.py, DeepLab on a 2-core CPU: 1 % of its step), spent in vain
        on the other steps."""
        trainer = self.trainer
        connector = getattr(trainer, "_logger_connector", None)
        if getattr(connector, "should_update_logs", True):  # every step if Lightning changes
            return True
        if not self._loss_step_logged or not trainer.log_every_n_steps or trainer.fast_dev_run:
            return True
        bar = trainer.progress_bar_callback
        if bar is None or not bar.is_enabled:
            return False
        batch = batch_idx + 1  # as the bar counts
        every = max(int(getattr(bar, "refresh_rate", 1) or 1), 1)
        return batch % every == 0 or batch == trainer.num_training_batches

    def _eager_check(self) -> bool:
        """Look at the loss at once only where that costs nothing: one process on the CPU."""
        return self.device.type == "cpu" and self.trainer.world_size == 1

    def _step_where(self) -> str:
        return f"at epoch {self.current_epoch}, step {self.global_step}"

    def _check_finite(self, loss: torch.Tensor, stage: str) -> None:
        if self._eager_check():
            if not torch.isfinite(loss):
                self._raise_nonfinite(f"the {stage} loss became {loss.item()} {self._step_where()}")
            return
        bad = ~torch.isfinite(loss.detach())
        if self._nonfinite is None:
            self._nonfinite = bad
        else:
            self._nonfinite |= bad

    def configure_callbacks(self) -> list[pl.Callback]:
        # Once: Lightning asks again for trainer.test, and would log that it replaces it.
        if self._trainer is not None and any(
            isinstance(c, CheckFiniteAfterStep) for c in self.trainer.callbacks
        ):
            return []
        return [CheckFiniteAfterStep()]

    def _check_after_step(self) -> None:
        """The deferred check after every ``trainer.log_every_n_steps``-th optimiser step
        (once, also while gradients accumulate over several batches after it), when the
        logger waits for the GPU anyway; not in the middle of a step, where the wait would
        keep the host from queueing the backward pass."""
        step, every = self.global_step, self.trainer.log_every_n_steps
        if self._eager_check() or not every or step % every:
            return
        if step != self._checked_step:
            self._checked_step = step
            self._raise_if_nonfinite(self._step_where())

    def _raise_if_nonfinite(self, where: str) -> None:
        """One host sync (and, under DDP, one all-reduce, so that every process stops
        together instead of the others waiting for the stopped one)."""
        if self._nonfinite is None and self.trainer.world_size == 1:
            return
        bad = self._nonfinite is not None and bool(self._nonfinite)
        bad = self.trainer.strategy.reduce_boolean_decision(bad, all=False)
        self._nonfinite = None
        if bad:
            self._raise_nonfinite(
                f"a loss became nan or inf (on some process) between the last check and {where}"
            )

    def _raise_if_weights_nonfinite(self) -> None:
        """The values a checkpoint saves: the weights and the batch-norm running statistics
        (which a loss in training mode never uses, so a step can make them inf with a finite
        loss). One pass and one host sync (under DDP one all-reduce) an epoch."""
        saved = {k: v for k, v in self.state_dict().items() if v.is_floating_point()}
        finite = torch.stack([v.isfinite().all() for v in saved.values()]).all()
        if self.trainer.strategy.reduce_boolean_decision(not bool(finite), all=False):
            first = next((f", first {k}" for k, v in saved.items() if not v.isfinite().all()), "")
            self._raise_nonfinite(
                f"some weights or running statistics became nan or inf by {self._where()}{first}"
            )

    def _raise_nonfinite(self, what: str) -> None:
        raise LungsegError(
            f"{what}. Lower optimizer.lr, check the images for NaN/inf pixels, "
            f"or train in 32-bit precision (trainer.precision=32-true). {self._kept()}"
        )

    def _kept(self) -> str:
        """Where the last good weights are: a non-finite loss or weight stops the run before
        any checkpoint callback could save the broken ones."""
        saved = [
            Path(path)
            for callback in self.trainer.checkpoint_callbacks
            for path in (callback.last_model_path, callback.best_model_path)
            if path and Path(path).is_file()
        ]
        if not saved:
            return "No checkpoint had been saved yet."
        # The newest file; on a tie the later callback's (last.ckpt is saved after the best).
        _, last = max(enumerate(saved), key=lambda item: (item[1].stat().st_mtime_ns, item[0]))
        return f"The last good checkpoint is kept: {last}."

    def training_step(self, batch, batch_idx):
        return self._step(batch, "train", batch_idx)

    def validation_step(self, batch, batch_idx):
        self._step(batch, "val")

    def test_step(self, batch, batch_idx):
        self._step(batch, "test")

    def _log_epoch_metrics(self, stage: str) -> None:
        metrics, mean = getattr(self, f"{stage}_metrics"), getattr(self, f"{stage}_loss_mean")
        values, loss = metrics.compute(), mean.compute()
        metrics.reset()
        mean.reset()
        # The metric states are already reduced across processes by torchmetrics. The loss's
        # mean is logged here, not with every batch's update (host time, see _logs_loss_step).
        self.log(
            "train/loss_epoch" if stage == "train" else f"{stage}/loss",
            loss,
            prog_bar=stage != "train",
        )
        dice = values.pop("dice")
        self.log(f"{stage}/dice", dice, prog_bar=True)
        self.log_dict({f"{stage}/{k}": v for k, v in values.items()})
        if stage == "train" and self.trainer.limit_val_batches == 0:
            # A fit without validation (train.py, data.split's val fraction 0): one line per
            # epoch in train.log all the same.
            log.info(
                "epoch %d: train/loss %.4f  train/dice %.4f  train/acc %.4f (no validation)",
                self.current_epoch,
                float(loss),
                dice,
                values["acc"],
            )
        if stage == "val" and not self.trainer.sanity_checking:
            # One line per epoch in train.log, also when the progress bar is off.
            log.info(
                "epoch %d: val/loss %.4f  val/dice %.4f  val/acc %.4f",
                self.current_epoch,
                float(loss),
                dice,
                values["acc"],
            )

    def _where(self) -> str:
        return f"the end of epoch {self.current_epoch} (step {self.global_step})"

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """A checkpoint saved at the end of a training epoch precedes that epoch's
        ReduceLROnPlateau step (Lightning steps it after the checkpoint callbacks, and skips it
        when it continues the run, as its checkpoints hold no metric): the values the plateau
        schedules watch are saved with it, so that a continued run takes the step."""
        # a continued run's train_minutes count the time of the segments before it
        checkpoint["lungseg_train_seconds"] = self.trained_seconds()
        progress = self.trainer.fit_loop.epoch_progress.current
        if progress.processed > progress.completed:  # in the epoch's end, before the step
            metrics = self.trainer.callback_metrics
            checkpoint["lungseg_plateau_pending"] = {
                c.monitor: float(metrics[c.monitor])
                for c in self.trainer.lr_scheduler_configs
                if c.reduce_on_plateau and c.monitor in metrics
            }

    def trained_seconds(self) -> float:
        """The run's time so far: this process's since ``run_started`` and, for a continued
        run, its earlier segments' up to the checkpoint it continues from."""
        return self.seconds_before + time.monotonic() - self.run_started

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        if not self.time_restored:  # the checkpoint fit continues from, not the tested best
            self.seconds_before = float(checkpoint.get("lungseg_train_seconds") or 0.0)
            self.time_restored = True
        self._plateau_pending = dict(checkpoint.get("lungseg_plateau_pending") or {})
        # The scheduler settings the checkpoint's run was configured with (see
        # _apply_configured_settings).
        saved = (checkpoint.get("hyper_parameters") or {}).get("scheduler")
        self._saved_scheduler = dict(saved) if isinstance(saved, dict) else {}
        configured = (self.hparams.scheduler or {}).get("_target_")
        self._new_schedule = self._saved_scheduler.get("_target_") != configured
        if self._new_schedule:
            # Lightning would load the other schedule's state into the configured one.
            checkpoint["lr_schedulers"] = []

    def on_train_start(self):
        self._loss_step_logged = False  # a second fit's bar starts empty too
        hold = getattr(self.trainer.datamodule, "hold_on_device", None)
        if hold is not None:  # data.device_cache: on every process at once, before a batch
            hold(self.device, self.trainer.strategy)
        if self.trainer.ckpt_path is None:
            return
        # The settings first: the plateau step left pending below takes its configured min_lr.
        for change in self._apply_configured_settings():
            log.info("continued with the configured %s", change)
        epoch = self.trainer.current_epoch  # the epoch after the checkpoint's
        for config in self.trainer.lr_scheduler_configs:
            value = self._plateau_pending.get(config.monitor)
            if config.reduce_on_plateau and value is not None and epoch % config.frequency == 0:
                config.scheduler.step(value)
        self._plateau_pending = {}

    def _apply_configured_settings(self) -> list[str]:
        """A continued run (``resume=true``, ``ckpt_path``) trains with the optimiser and
        scheduler settings configured now, not with those its checkpoint restored (Lightning
        restores the saved optimiser and scheduler as they were, so ``trainer.max_epochs=60
        resume=true`` kept a cosine decay planned for the old epochs, and ``optimizer.lr``
        had no effect). The schedule keeps its position: a new ``optimizer.lr`` scales the
        current rate by new/old, and a cosine decay takes the rate it would have at this epoch
        had it been planned with its new ``T_max`` from the start. A schedule of another kind
        starts afresh (``_start_schedule_afresh``). Returns what changed."""
        changed = []
        optimizer_cfg = {k: v for k, v in (self.hparams.optimizer or {}).items() if k[0] != "_"}
        schedulers = [c.scheduler for c in self.trainer.lr_scheduler_configs]
        planner = any(
            isinstance(c, FitScheduleToTime) and c.enabled for c in self.trainer.callbacks
        )
        for optimizer in self.trainer.optimizers:
            groups = optimizer.param_groups
            for key, value in optimizer_cfg.items():
                if key == "lr":
                    if not self._new_schedule:
                        changed += self._apply_lr(groups, value, schedulers)
                elif key in groups[0] and not _same(groups[0][key], value):
                    changed.append(f"optimizer.{key} {value} (the checkpoint had {groups[0][key]})")
                    for group in groups:
                        group[key] = tuple(value) if isinstance(group[key], tuple) else value
        if self._new_schedule:
            return [*changed, self._start_schedule_afresh()]
        lightning_keys = {"interval", "monitor", "frequency"}
        scheduler_cfg = {
            k: v
            for k, v in (self.hparams.scheduler or {}).items()
            if k[0] != "_" and k not in lightning_keys
        }
        for scheduler in schedulers:
            settings = dict(scheduler_cfg)
            if getattr(scheduler, "lungseg_time_plan", None):
                # A cosine length fitted to trainer.max_time: callbacks.time_plan
                # (lungseg.callbacks.FitScheduleToTime) sets T_max before the first epoch
                # (kept, planned again, or the configured one); without it, the configured
                # T_max applies.
                if planner:
                    settings.pop("T_max", None)
                else:
                    scheduler.lungseg_time_plan = None
            if isinstance(scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
                changed += _apply_plateau_settings(scheduler, settings)
            for key, value in settings.items():
                if hasattr(scheduler, key) and not _same(getattr(scheduler, key), value):
                    changed.append(
                        f"scheduler.{key} {value} (the checkpoint had {getattr(scheduler, key)})"
                    )
                    setattr(scheduler, key, value)
                elif not hasattr(scheduler, key) and not _same(
                    self._saved_scheduler.get(key, _UNSET), value
                ):
                    log.warning(
                        "scheduler.%s=%s is not applied to the continued run: %s keeps the "
                        "schedule its checkpoint planned with %s. Start a new run from the "
                        "checkpoint (ckpt_path=<its last.ckpt> and another output_dir) to "
                        "change it.",
                        key,
                        value,
                        type(scheduler).__name__,
                        self._saved_scheduler.get(key, "its default"),
                    )
            if changed and isinstance(scheduler, torch.optim.lr_scheduler.CosineAnnealingLR):
                set_cosine_length(scheduler, scheduler.T_max)
        return changed

    def _start_schedule_afresh(self) -> str:
        """The configured schedule is of another kind than the checkpoint's (or one of the two
        is none), so its state was not restored (on_load_checkpoint): the optimiser's groups
        take the settings a new run starts with (optimizer.lr, or the start rate of a schedule
        that sets its own), not the rate the old schedule had moved them to, and keep the
        optimiser's state. A cosine decay then takes the rate it plans for this epoch (as
        when it is stretched); other schedules start from here."""
        (optimizer,) = self.trainer.optimizers
        before = optimizer.param_groups[0]["lr"]
        for group, fresh in zip(optimizer.param_groups, self._fresh_groups, strict=True):
            for key in set(group) - set(fresh) - {"params", "param_names"}:
                del group[key]  # the old schedule's own (initial_lr, OneCycleLR's max_lr, ...)
            group.update(fresh)
        for config in self.trainer.lr_scheduler_configs:
            if isinstance(config.scheduler, torch.optim.lr_scheduler.CosineAnnealingLR):
                step = config.interval == "step"
                config.scheduler.last_epoch = self.global_step if step else self.current_epoch
                set_cosine_length(config.scheduler, config.scheduler.T_max)

        def name(scheduler: dict[str, Any]) -> str:
            return str(scheduler.get("_target_", "none")).rsplit(".", 1)[-1]

        return (
            f"scheduler {name(self.hparams.scheduler or {})} from the rate "
            f"{optimizer.param_groups[0]['lr']:g} (the checkpoint had "
            f"{name(self._saved_scheduler)} at the rate {before:g})"
        )

    @staticmethod
    def _apply_lr(groups: list[dict], lr: float, schedulers: list) -> list[str]:
        """A new ``optimizer.lr`` scales every group's rate, and the base rates of the schedules
        that start from it, by new/old: the schedule keeps its position and the groups their
        ratios. "Old" is the configured rate saved with the optimiser (``lungseg_lr``, see
        configure_optimizers), not its current rate, which the schedule has moved."""
        old = groups[0].get("lungseg_lr")
        if old is None and not schedulers:
            old = groups[0]["lr"]  # a constant rate, saved before lungseg_lr was
        if old is None:
            log.warning(
                "optimizer.lr=%s is not applied: the checkpoint predates lungseg's record of "
                "its configured rate, and its schedule has moved the rate since",
                lr,
            )
            return []
        if _same(old, lr):
            return []
        ratio = lr / old
        for scheduler in schedulers:  # those that start from initial_lr (not CyclicLR)
            bases = getattr(scheduler, "base_lrs", None)
            pairs = zip(bases or [], groups, strict=False)
            if bases and all(_same(b, g.get("initial_lr")) for b, g in pairs):
                scheduler.base_lrs = [b * ratio for b in bases]
        for group in groups:
            group["lr"] *= ratio
            group["lungseg_lr"] = group.get("lungseg_lr", old) * ratio
            if "initial_lr" in group:
                group["initial_lr"] *= ratio
        return [f"optimizer.lr {lr} (the checkpoint had {old})"]

    def on_train_epoch_end(self):
        # Before the checkpoint callbacks, which run after this hook: broken weights are
        # never saved.
        self._raise_if_nonfinite(self._where())
        self._raise_if_weights_nonfinite()
        self._log_epoch_metrics("train")

    def on_validation_epoch_start(self):
        self._raise_if_nonfinite(self._where())

    def on_validation_epoch_end(self):
        self._raise_if_nonfinite(self._where())
        self._log_epoch_metrics("val")

    def on_test_epoch_end(self):
        self._raise_if_nonfinite(self._where())
        self._log_epoch_metrics("test")

    def configure_optimizers(self):
        optimizer = instantiate(self.hparams.optimizer, params=self.parameters())
        for group in optimizer.param_groups:
            # The configured rate, saved with the optimiser's state before a schedule moves it
            # (torch's initial_lr is the schedule's start: OneCycleLR's is not optimizer.lr),
            # so that a continued run tells a new optimizer.lr from a moved rate.
            group["lungseg_lr"] = group["lr"]
        scheduler = dict(self.hparams.scheduler or {})
        # Lightning-specific keys live beside the scheduler's own arguments in the config.
        monitor = scheduler.pop("monitor", "val/loss")
        interval = scheduler.pop("interval", "epoch")
        built = instantiate(scheduler, optimizer=optimizer) if self.hparams.scheduler else None
        # The groups' settings as a new run starts (a schedule sets its start rate), for a
        # continued run whose schedule is of another kind (_start_schedule_afresh).
        self._fresh_groups = [
            {k: v for k, v in group.items() if k not in ("params", "param_names")}
            for group in optimizer.param_groups
        ]
        if built is None:
            return optimizer
        return {
            "optimizer": optimizer,
            "lr_scheduler": {"scheduler": built, "monitor": monitor, "interval": interval},
        }


def _build_loss(loss: dict[str, Any], ignore: int | None) -> torch.nn.Module:
    """The loss of its config, given ``ignore_index=ignore`` where pixels are ignored."""
    if ignore is None:
        return instantiate(loss)
    try:
        return instantiate(loss, ignore_index=ignore)
    except Exception as error:  # Hydra wraps the TypeError of an unknown argument
        if "ignore_index" not in str(error):
            raise
        raise LungsegError(
            f"data.ignore_index is set, but the loss {loss.get('_target_')} takes no "
            "ignore_index argument to leave the ignored pixels out. Use a loss of "
            "conf/loss/ (all take it), give yours an ignore_index argument, or set "
            "data.ignore_index=null."
        ) from None


class CheckFiniteAfterStep(pl.Callback):
    """Runs ``SegmentationModule._check_after_step`` at the end of each training batch, before
    the checkpoint callbacks (Lightning puts those last; the module's own hook would run after
    them): a checkpoint saved every k steps, k a multiple of ``trainer.log_every_n_steps``,
    never holds weights a non-finite loss broke (other step intervals and time intervals can
    save up to ``log_every_n_steps`` - 1 steps before the check)."""

    def on_train_start(self, trainer, pl_module):
        pl_module._checked_step = trainer.global_step  # a second fit starts its count anew

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        pl_module._check_after_step()


def _apply_plateau_settings(
    scheduler: torch.optim.lr_scheduler.ReduceLROnPlateau, settings: dict[str, Any]
) -> list[str]:
    """The ReduceLROnPlateau settings that are not plain attributes of the same name, taken out
    of ``settings`` and applied: ``min_lr`` (kept per group as ``min_lrs``), and ``mode``,
    ``threshold`` and ``threshold_mode`` (set together by torch; a new mode also forgets the
    best value and the epochs without improvement, which were counted the other way)."""
    changed = []
    if "min_lr" in settings:
        value = settings.pop("min_lr")
        groups = len(scheduler.optimizer.param_groups)
        lrs = [float(v) for v in value] if isinstance(value, list | tuple) else [value] * groups
        if len(lrs) != groups:
            raise LungsegError(
                f"scheduler.min_lr has {len(lrs)} values for {groups} parameter groups; give "
                "one number."
            )
        if not _same(scheduler.min_lrs, lrs):
            changed.append(f"scheduler.min_lr {value} (the checkpoint had {scheduler.min_lrs})")
            scheduler.min_lrs = lrs
    keys = ("mode", "threshold", "threshold_mode")
    wanted = {k: settings.pop(k, getattr(scheduler, k)) for k in keys}
    new = [k for k in keys if not _same(getattr(scheduler, k), wanted[k])]
    if new:
        changed += [
            f"scheduler.{k} {wanted[k]} (the checkpoint had {getattr(scheduler, k)})" for k in new
        ]
        mode_changed = "mode" in new
        scheduler._init_is_better(**wanted)
        if mode_changed:
            scheduler.best, scheduler.num_bad_epochs = scheduler.mode_worse, 0
    return changed
