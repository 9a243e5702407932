"""lungseg: 2D medical image segmentation with PyTorch Lightning and Hydra."""

import os

# albumentations asks PyPI for its latest version when imported (a network request at run
# time, and a warning on machines without internet). lungseg is imported before it.
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

import hashlib
import re
from collections.abc import Sequence
from pathlib import Path
from typing import NoReturn

from omegaconf import ListConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException
from yaml import YAMLError

__version__ = "0.1.0"


def short_dirname(name: str, limit: int = 120) -> str:
    """A multirun job's folder name kept under file-system limits: names longer than
    ``limit`` keep their start and end a hash of the whole name."""
    if len(name) <= limit:
        return name
    digest = hashlib.sha1(name.encode()).hexdigest()[:10]
    return f"{name[: limit - 11]}-{digest}"


# Characters a folder name keeps: others would need quotes in a shell, and '=' or ',' in a
# path would need them in a Hydra override too (`ckpt_path=<sweep>/0_model-unet/...`).
UNSAFE = re.compile(r"[^A-Za-z0-9._+-]+")


def job_dirname(
    num: int, sweep_dir: str, overrides: Sequence[str], exclude_keys: Sequence[str]
) -> str:
    """A multirun job's folder name (``hydra.sweep.subdir``): its number, then its values of
    the settings the sweep sweeps, in command-line order, e.g. ``3_model-fcn_data.fold-1``.

    ``overrides`` are the job's (``hydra.overrides.task``); the swept ones are those written
    as a sweep (``model=unet,fcn``, ``range()``, ``choice()``, ``glob()``) in
    ``<sweep_dir>/multirun.yaml``, which Hydra's basic sweeper saves before it launches any
    job. Where that file cannot be read or sweeps nothing, all the job's overrides name it.
    Keys in ``exclude_keys`` (paths, resume) never do: a sweep over data.image_dir alone
    names its jobs by number. Each setting is ``key-value``, settings are joined by ``_``,
    characters other than ``[A-Za-z0-9._+-]`` become ``_`` and ``short_dirname`` cuts long
    names; the job number keeps the names of a sweep distinct."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parser = OverridesParser.create()
    job = parser.parse_overrides(list(_plain(overrides)))
    job = [o for o in job if o.key_or_group not in set(exclude_keys)]
    swept = _swept_keys(Path(sweep_dir) / "multirun.yaml", parser)
    named = [o for o in job if o.get_key_element() in swept] if swept else job
    name = "_".join(f"{o.get_key_element()}-{o.get_value_element_as_str()}" for o in named)
    return f"{num}_{short_dirname(UNSAFE.sub('_', name))}" if name else str(num)


def _swept_keys(multirun_yaml: Path, parser) -> set[str]:
    """The keys a sweep sweeps (as BasicSweeper takes them: hydra.sweeper.params, then the
    command line's overrides), from the multirun.yaml it saved; none if it cannot be read."""
    from hydra.errors import HydraException

    try:
        saved = OmegaConf.load(multirun_yaml)
        params = _plain(OmegaConf.select(saved, "hydra.sweeper.params") or {})
        lines = [f"{key}={value}" for key, value in params.items()]
        lines += _plain(OmegaConf.select(saved, "hydra.overrides.task") or [])
        return {o.get_key_element() for o in parser.parse_overrides(lines) if o.is_sweep_override()}
    except (OSError, YAMLError, OmegaConfBaseException, HydraException):
        return set()


def _plain(node):
    """A config node's values as written, interpolations (``${...}``) unresolved."""
    return OmegaConf.to_container(node, resolve=False) if OmegaConf.is_config(node) else node


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
OmegaConf.register_new_resolver("lungseg_dirname", job_dirname, replace=True)
OmegaConf.register_new_resolver("lungseg_input_channels", input_channels, replace=True)
OmegaConf.register_new_resolver("lungseg_devices", devices_per_node, replace=True)
OmegaConf.register_new_resolver("lungseg_gpus", gpus_per_node, replace=True)
