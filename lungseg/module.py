"""One LightningModule for every architecture: a network, a loss, metrics and an optimiser,
each built from a plain dict of its Hydra config."""

import logging
from typing import Any

import pytorch_lightning as pl
import torch
from hydra.utils import instantiate

from lungseg.errors import LungsegError
from lungseg.metrics import SegmentationMetrics

STAGES = ("train", "val", "test")
log = logging.getLogger(__name__)


class SegmentationModule(pl.LightningModule):
    """Trains any ``net`` (logits (N, C, H, W) at the input size) with any ``loss``.

    Every argument is a plain dict (``OmegaConf.to_container(cfg.x, resolve=True)``) with a
    Hydra ``_target_``. They are saved as hyper-parameters and the objects are built here, so a
    checkpoint loads with ``torch.load(weights_only=True)`` and carries everything needed to
    rebuild the network. ``data_info`` describes the data the network expects (image size,
    channels, normalisation, class names, mask encoding) for prediction on new images.
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
    ):
        super().__init__()
        # Logged to TensorBoard at the end of training together with the final metrics.
        self.save_hyperparameters(logger=False)
        self.net = instantiate(net)
        self.loss_fn = instantiate(loss)
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
            setattr(self, f"{stage}_metrics", SegmentationMetrics(self.class_names))
        if channels_last:
            self.net = self.net.to(memory_format=torch.channels_last)
        if compile:
            # In place: the state_dict keys stay those of the plain network, so checkpoints of
            # compiled and uncompiled runs are interchangeable.
            self.net.compile()

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if self.hparams.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        return self.net(images)

    def _step(self, batch: dict[str, torch.Tensor], stage: str) -> torch.Tensor:
        images, masks = batch["image"], batch["mask"]
        logits = self(images)
        loss = self.loss_fn(logits, masks)
        if not torch.isfinite(loss):
            raise LungsegError(
                f"the {stage} loss became {loss.item()} at epoch {self.current_epoch}, step "
                f"{self.global_step}. Lower optimizer.lr, check the images for NaN/inf pixels, "
                f"or train in 32-bit precision (trainer.precision=32-true). {self._kept()}"
            )
        # Metrics accumulate on the device; nothing here forces a host sync per step.
        getattr(self, f"{stage}_metrics").update(logits.argmax(dim=1), masks)
        self.log(
            f"{stage}/loss",
            loss,
            on_step=stage == "train",
            on_epoch=True,
            prog_bar=True,
            batch_size=images.shape[0],
            sync_dist=stage != "train",
        )
        return loss

    def _kept(self) -> str:
        """Where the last good weights are: a non-finite loss stops the run before any
        checkpoint callback could save the broken ones."""
        callback = self.trainer.checkpoint_callback
        last = getattr(callback, "last_model_path", "") or getattr(callback, "best_model_path", "")
        if not last:
            return "No checkpoint had been saved yet."
        return f"The last good checkpoint is kept: {last}."

    def training_step(self, batch, batch_idx):
        return self._step(batch, "train")

    def validation_step(self, batch, batch_idx):
        self._step(batch, "val")

    def test_step(self, batch, batch_idx):
        self._step(batch, "test")

    def _log_epoch_metrics(self, stage: str) -> None:
        metrics = getattr(self, f"{stage}_metrics")
        values = metrics.compute()
        metrics.reset()
        # The metric states are already reduced across processes by torchmetrics.
        dice = values.pop("dice")
        self.log(f"{stage}/dice", dice, prog_bar=True)
        self.log_dict({f"{stage}/{k}": v for k, v in values.items()})
        if stage == "val" and not self.trainer.sanity_checking:
            # One line per epoch in train.log, also when the progress bar is off.
            loss = self.trainer.callback_metrics.get("val/loss", float("nan"))
            log.info(
                "epoch %d: val/loss %.4f  val/dice %.4f  val/acc %.4f",
                self.current_epoch,
                float(loss),
                dice,
                values["acc"],
            )

    def on_train_epoch_end(self):
        self._log_epoch_metrics("train")

    def on_validation_epoch_end(self):
        self._log_epoch_metrics("val")

    def on_test_epoch_end(self):
        self._log_epoch_metrics("test")

    def configure_optimizers(self):
        optimizer = instantiate(self.hparams.optimizer, params=self.parameters())
        scheduler = dict(self.hparams.scheduler or {})
        if not scheduler:
            return optimizer
        # Lightning-specific keys live beside the scheduler's own arguments in the config.
        monitor = scheduler.pop("monitor", "val/loss")
        interval = scheduler.pop("interval", "epoch")
        return {
            "optimizer": optimizer,
            "lr_scheduler": {
                "scheduler": instantiate(scheduler, optimizer=optimizer),
                "monitor": monitor,
                "interval": interval,
            },
        }
