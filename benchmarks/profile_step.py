"""Where a training step's time goes, lungseg against the bare loop of benchmarks/throughput.py
(same network, batches, loss and optimiser): what the throughput table's ratio does not say.

    python benchmarks/profile_step.py                      # CPU, DeepLab width 16, 128 px
    python benchmarks/profile_step.py --device cuda --precision bf16-mixed --channels-last \
        --width 64 --size 256 --batch 32 --workers 4 --augmentation device --models deeplab fcn

Per model it prints:
1. wall time per step: lungseg, the bare loop on prepared tensors, the bare loop fed by the
   DataModule's loader; and, on a GPU, how long the bare loop's host takes to queue one step
   on an idle GPU (where that is about the wall time, the host sets the pace and every
   millisecond lungseg adds to it shows; a full queue blocks the host, so the time is taken
   with the GPU drained before each step);
2. lungseg's host time per step by part (timers around Lightning's and lungseg's calls; on a
   GPU the parts queue work and return, unless they wait for it);
3. on a GPU, every call in lungseg's timed steps that waits for the GPU (torch's sync debug
   mode), with where it came from;
4. torch.profiler over lungseg's timed steps: the operators with the most host time (and, on a
   GPU, device time).
"""

import argparse
import collections
import functools
import statistics
import sys
import tempfile
import time
import traceback
import warnings
from pathlib import Path

import pytorch_lightning as pl
import torch
from omegaconf import open_dict
from pytorch_lightning.loops import fetchers
from pytorch_lightning.loops import training_epoch_loop as epoch_loop
from pytorch_lightning.strategies import Strategy
from pytorch_lightning.trainer.connectors.logger_connector import logger_connector

sys.path.insert(0, str(Path(__file__).resolve().parent))
import throughput  # noqa: E402

from lungseg import metrics as lungseg_metrics  # noqa: E402
from lungseg import module as lungseg_module  # noqa: E402
from lungseg.data import datamodule as lungseg_data  # noqa: E402
from lungseg.train import build_datamodule  # noqa: E402

HOST = collections.defaultdict(float)  # label -> seconds, over the timed steps
CALLS = collections.Counter()
TIMING = {"on": False}


def timed(owner, name: str, label: str) -> None:
    """Wrap ``owner.name`` so that its host time adds to HOST[label] while TIMING is on."""
    original = getattr(owner, name)

    @functools.wraps(original)
    def wrapper(*args, **kwargs):
        if not TIMING["on"]:
            return original(*args, **kwargs)
        start = time.perf_counter()
        try:
            return original(*args, **kwargs)
        finally:
            HOST[label] += time.perf_counter() - start
            CALLS[label] += 1

    setattr(owner, name, wrapper)


# The parts, outermost first; each includes the parts it calls.
PARTS = [
    (epoch_loop._TrainingEpochLoop, "advance", "step (Lightning's advance)"),
    (fetchers._PrefetchDataFetcher, "__next__", "  next batch from the loader"),
    (Strategy, "batch_to_device", "  batch to device + on_after_batch_transfer"),
    (lungseg_data.SegDataModule, "on_after_batch_transfer", "    on_after_batch_transfer"),
    (torch.optim.AdamW, "step", "  optimizer.step (with the closure)"),
    (torch.optim.Adam, "step", "  optimizer.step (with the closure)"),
    (lungseg_module.SegmentationModule, "training_step", "    training_step"),
    (lungseg_module.SegmentationModule, "forward", "      forward"),
    (lungseg_metrics.SegmentationMetrics, "update", "      metrics update"),
    (pl.LightningModule, "log", "      self.log"),
    (torch.Tensor, "backward", "    backward"),
    (logger_connector._LoggerConnector, "update_train_step_metrics", "  logged metrics"),
]


class Window(pl.Callback):
    """Turns the host timers, sync detection and the profiler on for steps
    [warmup, warmup + steps) of a lungseg run."""

    def __init__(self, warmup: int, steps: int, profiler, syncs: list | None):
        self.warmup, self.steps, self.profiler, self.syncs = warmup, steps, profiler, syncs

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == self.warmup:
            throughput.sync(pl_module.device)
            self.start = time.perf_counter()
            if self.syncs is not None:
                torch.cuda.set_sync_debug_mode("warn")
            if self.profiler is not None:
                self.profiler.start()
            TIMING["on"] = True

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step == self.warmup + self.steps:
            TIMING["on"] = False
            if self.syncs is not None:
                torch.cuda.set_sync_debug_mode("default")
            throughput.sync(pl_module.device)
            self.seconds = time.perf_counter() - self.start
            if self.profiler is not None:
                self.profiler.stop()


def record_syncs(found: collections.Counter):
    """A showwarning that counts the CUDA sync warnings by the lines they came from."""

    def show(message, category, filename, lineno, file=None, line=None):
        if "synchronizing" not in str(message):
            return
        frames = [f for f in traceback.extract_stack()[:-1] if "warnings.py" not in f.filename][-6:]
        where = " <- ".join(
            f"{Path(f.filename).name}:{f.lineno} {f.name}" for f in reversed(frames)
        )
        found[where] += 1

    return show


def top_operators(profiler) -> tuple[list, list]:
    """The operators with the most host time, and those with the most device time."""
    averages = profiler.key_averages()
    by_host = sorted(averages, key=lambda e: e.self_cpu_time_total, reverse=True)[:12]
    by_device = sorted(
        averages, key=lambda e: getattr(e, "self_device_time_total", 0.0), reverse=True
    )[:8]
    return by_host, by_device


def lungseg_run(cfg, args, profile: bool):
    """One lungseg training run with the Window callback; returns it."""
    activities = [torch.profiler.ProfilerActivity.CPU]
    if args.device == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    profiler = torch.profiler.profile(activities=activities) if profile else None
    found = collections.Counter()
    window = Window(args.warmup, args.steps, profiler, found if args.device == "cuda" else None)
    lungseg_run.window, lungseg_run.syncs = window, found
    cfg = cfg.copy()
    cfg.output_dir = f"{cfg.output_dir}-{'profiled' if profile else 'timed'}"
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.showwarning = record_syncs(found)
        throughput.train(cfg)
    return window, found, profiler


def bare_ms(net, optimizer, loss_fn, batches, args, autocast) -> tuple[float, float]:
    """(wall ms per step, host ms to queue a step on a drained device) of the bare loop on
    prepared tensors."""
    timed = batches[args.warmup : args.warmup + args.steps]
    for x, y in batches[: args.warmup]:
        throughput.bare_step(net, optimizer, loss_fn, x, y, autocast)
    throughput.sync(args.device)
    start = time.perf_counter()
    for x, y in timed:
        throughput.bare_step(net, optimizer, loss_fn, x, y, autocast)
    throughput.sync(args.device)
    wall = (time.perf_counter() - start) / len(timed)
    queued = []
    for x, y in timed:
        step = time.perf_counter()
        throughput.bare_step(net, optimizer, loss_fn, x, y, autocast)
        queued.append(time.perf_counter() - step)
        throughput.sync(args.device)
    return 1000 * wall, 1000 * statistics.median(queued)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    throughput.add_run_arguments(parser, ["deeplab"])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--no-profile", action="store_true", help="skip torch.profiler")
    args = parser.parse_args()
    args.return_freed_memory, args.repeats = False, 1
    autocast = throughput.prepare_device(args)

    for owner, name, label in PARTS:
        if name in vars(owner):  # not where it is inherited (AdamW has Adam's step)
            timed(owner, name, label)
    print(
        f"# device {args.device}, torch {torch.__version__}, width {args.width}, {args.size} px, "
        f"batch {args.batch}, {args.precision}, channels_last {args.channels_last}, compile "
        f"{args.compile}, {args.workers} workers, augmentation {args.augmentation}, device "
        f"cache {args.device_cache}, fused optimizer {args.fused_optimizer}, {args.steps} timed "
        f"steps after {args.warmup}"
    )
    with tempfile.TemporaryDirectory() as tmp:
        for model in args.models:
            cfg = throughput.make_cfg(args, model, Path(tmp))
            # The Window callback instead of throughput's StepTimer; the run's length is the same.
            with open_dict(cfg):
                del cfg.callbacks["timer"]
                cfg.callbacks["window"] = {"_target_": f"{__name__}.make_window"}
            datamodule = build_datamodule(cfg)
            batches = [
                throughput.on_device(batch, args, datamodule)
                for batch in datamodule.train_dataloader()
            ]
            net, optimizer, loss_fn = throughput.build_bare(cfg, args.device, args.channels_last)
            if args.compile:
                net = torch.compile(net)

            HOST.clear()
            CALLS.clear()
            window, syncs, _ = lungseg_run(cfg, args, profile=False)
            lungseg_ms = 1000 * window.seconds / args.steps
            host = {label: 1000 * s / CALLS[label] for label, s in HOST.items()}
            bare, queue = bare_ms(net, optimizer, loss_fn, batches, args, autocast)
            fed = throughput.bare_loader_rate(net, optimizer, loss_fn, datamodule, args, autocast)
            print(f"\n## {model}")
            print(
                f"wall ms/step: lungseg {lungseg_ms:.2f}, bare {bare:.2f} (ratio "
                f"{bare / lungseg_ms:.3f}), bare+loader {1000 * args.batch / fed:.2f}"
                + (
                    f"; the bare loop's host queues a step in {queue:.2f} ms"
                    if args.device == "cuda"
                    else ""
                )
            )
            print("lungseg host ms per call by part (each includes the indented parts below it):")
            for label in dict.fromkeys(label for _, _, label in PARTS):
                if label in host:
                    calls = CALLS[label] / args.steps
                    print(f"  {label:48s} {host[label]:8.3f}   ({calls:.1f} calls/step)")
            if args.device == "cuda":
                print(f"calls that waited for the GPU in {args.steps} lungseg steps:")
                for where, count in syncs.most_common(12) or [("none", 0)]:
                    print(f"  {count:4d}  {where}")
            if args.no_profile:
                continue
            window, _, profiler = lungseg_run(cfg, args, profile=True)
            by_host, by_device = top_operators(profiler)
            print(f"profiled lungseg: wall {1000 * window.seconds / args.steps:.2f} ms/step")
            print("operators with the most host time (self, ms/step):")
            for e in by_host:
                print(f"  {e.self_cpu_time_total / 1000 / args.steps:8.3f}  {e.count:6d}  {e.key}")
            if args.device == "cuda":
                print("operators with the most device time (self, ms/step):")
                for e in by_device:
                    busy = getattr(e, "self_device_time_total", 0.0)
                    print(f"  {busy / 1000 / args.steps:8.3f}  {e.count:6d}  {e.key}")


def make_window() -> Window:
    """The Window of the current run (Hydra instantiates callbacks by name)."""
    return lungseg_run.window


if __name__ == "__main__":
    main()
