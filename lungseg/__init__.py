"""lungseg: 2D medical image segmentation with PyTorch Lightning and Hydra."""

import os

# albumentations asks PyPI for its latest version when imported (a network request at run
# time, and a warning on machines without internet). lungseg is imported before it.
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

import hashlib
from typing import NoReturn

from omegaconf import ListConfig, OmegaConf

__version__ = "0.1.0"


def short_dirname(name: str, limit: int = 120) -> str:
    """A multirun job's folder name (Hydra's override_dirname) kept under file-system limits:
    names longer than ``limit`` keep their start and end a hash of the whole name."""
    if len(name) <= limit:
        return name
    digest = hashlib.sha1(name.encode()).hexdigest()[:10]
    return f"{name[: limit - 11]}-{digest}"


def input_channels(in_channels: int, context_slices: int) -> int:
    """The network's input channels: in_channels for each of the 2 * context_slices + 1 slices
    (``lungseg.data.context``)."""
    return int(in_channels) * (2 * int(context_slices) + 1)


def _count(value, key: str) -> int:
    """The devices a trainer setting names: N, a list of indices (or "0,1"), never "auto" or
    -1 (all of a node's GPUs, which is only known once the job runs)."""
    if isinstance(value, str):
        text = value.strip().strip("[]")
        if text.lstrip("-").isdigit():
            value = int(text)
        elif "," in text:
            value = [part for part in text.split(",") if part.strip()]
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return value
    if isinstance(value, list | tuple | ListConfig):
        return len(value)
    _refuse(
        f"{key}={value} cannot size a SLURM job: its tasks and GPUs per node are written into "
        f"the sbatch script before the job starts. Give the number of GPUs per node, e.g. "
        f"{key}=4 (or a list of GPU indices)."
    )


def _refuse(message: str) -> NoReturn:
    """End the command with ``lungseg: error: <message>``, status 1. For the resolvers of
    conf/hydra/launcher/slurm.yaml, which Hydra resolves while it builds the launcher: an
    exception there reaches the user as Hydra's traceback of OmegaConf's wrapper of it."""
    raise SystemExit(f"lungseg: error: {message}")


def devices_per_node(gpus, devices) -> int:
    """The processes (tasks) each node runs: ``trainer.gpus`` where it is set (Lightning
    1.x's key, mapped onto accelerator/devices only when the run starts: N, a list of GPU
    indices, 0 for the CPU: one process), else ``trainer.devices`` (N or a list). For SLURM's
    tasks_per_node, which is written before the run starts; "auto" and -1 are refused."""
    if gpus is None:
        count = _count(devices, "trainer.devices")
        if count == 0:
            _refuse("trainer.devices=0 runs nothing on a SLURM node: give 1 or more.")
        return count
    return max(_count(gpus, "trainer.gpus"), 1)


def gpus_per_node(gpus, devices, accelerator="auto") -> int | None:
    """SLURM's gpus_per_node: ``devices_per_node``'s count, or None (no GPU asked of SLURM)
    for a run on the CPU: ``trainer.gpus=0``, or ``trainer.accelerator=cpu`` without gpus."""
    if gpus is None and str(accelerator).lower() == "cpu":
        return None
    if gpus is not None and _count(gpus, "trainer.gpus") == 0:
        return None
    return devices_per_node(gpus, devices)


# Used by hydra.sweep.subdir in conf/config.yaml, by conf/model/*.yaml and by
# conf/hydra/launcher/slurm.yaml (lungseg_devices, lungseg_gpus); registered on import
# of the package.
OmegaConf.register_new_resolver("lungseg_dirname", short_dirname, replace=True)
OmegaConf.register_new_resolver("lungseg_input_channels", input_channels, replace=True)
OmegaConf.register_new_resolver("lungseg_devices", devices_per_node, replace=True)
OmegaConf.register_new_resolver("lungseg_gpus", gpus_per_node, replace=True)
