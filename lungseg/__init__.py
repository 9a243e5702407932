"""lungseg: 2D medical image segmentation with PyTorch Lightning and Hydra."""

import os

# albumentations asks PyPI for its latest version when imported (a network request at run
# time, and a warning on machines without internet). lungseg is imported before it.
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

import hashlib

from omegaconf import OmegaConf

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


def devices_per_node(gpus, devices):
    """The processes (and GPUs) each node runs: ``trainer.gpus`` where it is set (Lightning
    1.x's key, mapped onto accelerator/devices only when the run starts: N, a list of GPU
    indices, 0 for the CPU), else ``trainer.devices``. For SLURM's tasks_per_node and
    gpus_per_node, which are written before the run starts."""
    if gpus is None:
        return devices
    if isinstance(gpus, int):
        if gpus < 0:
            raise ValueError(
                "trainer.gpus=-1 (all GPUs) cannot size a SLURM job: give the number, e.g. "
                "trainer.gpus=4"
            )
        return max(gpus, 1)
    return len(gpus)


# Used by hydra.sweep.subdir in conf/config.yaml, by conf/model/*.yaml and by
# conf/hydra/launcher/slurm.yaml; registered on import
# of the package.
OmegaConf.register_new_resolver("lungseg_dirname", short_dirname, replace=True)
OmegaConf.register_new_resolver("lungseg_input_channels", input_channels, replace=True)
OmegaConf.register_new_resolver("lungseg_devices", devices_per_node, replace=True)
