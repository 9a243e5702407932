"""Checks of the training settings a user commonly types (``data.batch_size=0``,
``trainer.max_epochs=abc``, ``+data.imagesize=64``), made before anything is built or written.

Left to the libraries, such a value fails deep inside Lightning, torch or Hydra's instantiate
with a bare traceback, some only when fitting starts, after the run folder already holds
config.yaml, split.csv and environment.json (and a rerun into it is refused). Each check names
the setting, its value and what to give instead; the first bad setting raises.
"""

import inspect
import math
import re
from collections.abc import Callable, Mapping, Sequence
from difflib import get_close_matches
from pathlib import Path
from typing import Any, get_args

from hydra.core.hydra_config import HydraConfig
from hydra.utils import _locate
from lightning_fabric import connector
from omegaconf import DictConfig, OmegaConf
from pytorch_lightning.callbacks import Timer
from pytorch_lightning.utilities.exceptions import MisconfigurationException

from lungseg import postprocess
from lungseg.cli_hints import ABSENT
from lungseg.data.folders import check_data_dirs
from lungseg.errors import LungsegError

# What Lightning's Trainer accepts for `precision` (it refuses anything else), from its private
# type aliases: where a Lightning version lacks them, the value is left to Lightning.
_NAMES = get_args(getattr(connector, "_PRECISION_INPUT_STR", None))
PRECISIONS = _NAMES + tuple(
    value
    for alias in ("_PRECISION_INPUT_INT", "_PRECISION_INPUT_STR_ALIAS")
    for value in get_args(getattr(connector, alias, None))
)


def is_whole(value: Any, low: int, high: int | None = None) -> bool:
    """Whether value is an int (a bool is not) in [low, high]."""
    return isinstance(value, int) and is_number(value, low, high)


def is_number(value: Any, low: float, high: float | None = None) -> bool:
    """Whether value is an int or a float (a bool is neither) in [low, high]; NaN is not."""
    return (
        isinstance(value, int | float)
        and not isinstance(value, bool)
        and low <= value
        and (high is None or value <= high)
    )


def require(ok: bool, key: str, value: Any, wanted: str, example: str) -> None:
    """LungsegError "<key> is <value>; give <wanted> (e.g. <example>)." unless ok."""
    if not ok:
        raise LungsegError(f"{key} is {shown(value)}; give {wanted} (e.g. {example}).")


def same(current: Any, configured: Any, rel_tol: float = 1e-9) -> bool:
    """A restored setting equals the configured one: numbers within ``rel_tol`` (rounding), a
    list equal to a tuple item by item (Adam's betas, a checkpoint's mean/std)."""
    if isinstance(current, tuple | list) and isinstance(configured, tuple | list):
        return len(current) == len(configured) and all(
            same(a, b, rel_tol) for a, b in zip(current, configured, strict=True)
        )
    if isinstance(current, float | int) and isinstance(configured, float | int):
        return math.isclose(current, configured, rel_tol=rel_tol, abs_tol=0.0)
    return current == configured


def check_overwrite(value: Any) -> None:
    """eval.py's, predict.py's and export.py's ``overwrite``: true or false (Hydra passes
    ``overwrite=no`` as the string 'no', which Python would take as true)."""
    require(isinstance(value, bool), "overwrite", value, "true or false", "overwrite=true")


# On/off words Hydra's command line keeps as text (only true and false become booleans), and
# which Python then takes as true: resume=no resumed, compile=off compiled.
SWITCH_WORDS = frozenset({"yes", "no", "on", "off", "true", "false"})


def check_switch_words(cfg: DictConfig) -> None:
    """LungsegError for a setting given as the text yes, no, on, off (or a quoted 'true' or
    'false'), e.g. ``resume=no``: every on/off setting would take it as true. Settings of any
    kind are looked at (no setting of lungseg's takes these words as a name); lists are not
    (class names), nor Hydra's own node."""

    def walk(node: Any, prefix: str) -> None:
        for key, value in node.items():
            name = f"{prefix}{key}"
            if isinstance(value, Mapping):
                walk(value, f"{name}.")
            elif isinstance(value, str) and value.strip().lower() in SWITCH_WORDS:
                meant = "false" if value.strip().lower() in ("no", "off", "false") else "true"
                raise LungsegError(
                    f"{name} is {value!r}, which Hydra keeps as text (it reads only unquoted true "
                    f"and false as on and off), and any text counts as on. Give {name}={meant} "
                    f"(or {name}={'true' if meant == 'false' else 'false'})."
                )

    settings = OmegaConf.to_container(cfg, resolve=False)
    walk({k: v for k, v in settings.items() if k != "hydra"}, "")


def shown(value: Any) -> str:
    """A value as the command line writes it: null, true, 'abc', [32, 0]."""
    if value is None:
        return "null"
    return str(value).lower() if isinstance(value, bool) else repr(value)


def _size(value: Any) -> bool:
    pair = isinstance(value, Sequence) and not isinstance(value, str) and len(value) == 2
    return is_whole(value, 1) or (pair and all(is_whole(v, 1) for v in value))


def _numbers(value: Any) -> bool:
    """Whether value is a non-empty list of numbers, each 0 or more."""
    listed = isinstance(value, Sequence) and not isinstance(value, str) and len(value) > 0
    return listed and all(is_number(v, 0) for v in value)


def _batches(value: Any) -> bool:
    return value is None or is_whole(value, 0) or is_number(value, 0, 1)


def _duration(value: Any) -> bool:
    """Whether Lightning's Timer, which the trainer builds from trainer.max_time, parses it
    ("DD:HH:MM:SS" with two digits for hours, minutes and seconds, or timedelta's arguments)."""
    if value is None:
        return True
    if isinstance(value, Mapping):
        value = dict(value)
    elif not isinstance(value, str):
        return False
    try:
        Timer(duration=value)
    except (ValueError, TypeError, MisconfigurationException):
        return False
    return True


def _devices(value: Any) -> bool:
    if isinstance(value, str):  # "auto", "2", "0,1": Lightning parses them
        return bool(re.fullmatch(r"auto|-1|\d+|(\d+,)+\d*", value.strip()))
    if isinstance(value, Sequence):
        return len(value) > 0 and all(is_whole(v, 0) for v in value)
    return is_whole(value, -1) and value != 0


# key → (accepts the value, what to give, an example). Keys the config lacks are skipped
# (model.depth is the U-Net's, optimizer.momentum SGD's). In this order: trainer.max_epochs
# before scheduler.T_max, which follows it.
RULES: dict[str, tuple[Callable[[Any], bool], str, str]] = {
    "seed": (
        lambda v: is_whole(v, 0, 2**32 - 1),
        "a whole number from 0 to 4294967295 for the random generators (the data split is "
        "drawn from it, so it cannot be left to chance)",
        "seed=42",
    ),
    "data.batch_size": (
        lambda v: is_whole(v, 1),
        "a whole number of images per batch, 1 or more",
        "data.batch_size=8",
    ),
    "data.image_size": (
        _size,
        "the network's input size in pixels: a whole number 1 or more (square), or [height, width]",
        "data.image_size=128 or data.image_size=[128,160]",
    ),
    "data.num_workers": (
        lambda v: is_whole(v, 0),
        "a whole number of DataLoader worker processes, 0 or more (0: load in the training "
        "process)",
        "data.num_workers=2",
    ),
    "data.demo_num_images": (
        lambda v: is_whole(v, 1),
        "a whole number of demo images to generate, 1 or more",
        "data.demo_num_images=120",
    ),
    "data.demo_size": (
        lambda v: is_whole(v, 1),
        "the side of the demo images in pixels, a whole number 1 or more",
        "data.demo_size=256",
    ),
    "model.width": (
        lambda v: is_whole(v, 1),
        "a whole number of channels for the network's first layer, 1 or more",
        "model.width=16",
    ),
    "model.depth": (
        lambda v: is_whole(v, 1),
        "a whole number of down-sampling stages, 1 or more",
        "model.depth=4",
    ),
    "model.dropout": (
        lambda v: is_number(v, 0) and v < 1,
        "a dropout probability from 0 up to (not including) 1",
        "model.dropout=0.1",
    ),
    "trainer.max_epochs": (
        lambda v: v is None or (is_whole(v, -1) and v != 0),
        "a whole number of epochs, 1 or more, or -1 for no limit (0 would train nothing)",
        "trainer.max_epochs=40",
    ),
    "trainer.max_steps": (
        lambda v: v is None or is_whole(v, -1),
        "a whole number of optimiser steps, 0 or more, or -1 for no limit",
        "trainer.max_steps=1000",
    ),
    "trainer.max_time": (
        _duration,
        'a duration "DD:HH:MM:SS", or null for no time limit',
        'trainer.max_time="00:12:00:00"',
    ),
    "trainer.log_every_n_steps": (
        lambda v: is_whole(v, 1),
        "a whole number of training batches between log writes and progress-bar redraws, 1 or more",
        "trainer.log_every_n_steps=5",
    ),
    "trainer.num_sanity_val_steps": (
        lambda v: v is None or is_whole(v, -1),
        "a whole number of validation batches to run before training, 0 to skip, -1 for all",
        "trainer.num_sanity_val_steps=1",
    ),
    **{
        f"trainer.limit_{stage}_batches": (
            _batches,
            "a whole number of batches (0 or more), a fraction of them from 0.0 to 1.0, or "
            "null for all",
            f"trainer.limit_{stage}_batches=0.25",
        )
        for stage in ("train", "val", "test")
    },
    "trainer.precision": (
        lambda v: (
            v is None or not PRECISIONS or (not isinstance(v, bool | float) and v in PRECISIONS)
        ),
        f"one of {', '.join(map(str, _NAMES))}",
        "trainer.precision=bf16-mixed",
    ),
    "trainer.devices": (
        _devices,
        "a number of devices, 1 or more (-1: all), a list of device indices, or auto",
        "trainer.devices=2 or trainer.devices=[0,2]",
    ),
    "optimizer.lr": (
        lambda v: is_number(v, 0) and v > 0,
        "a learning rate, a number above 0",
        "optimizer.lr=1e-3",
    ),
    "optimizer.weight_decay": (
        lambda v: is_number(v, 0),
        "a weight decay, a number 0 or more",
        "optimizer.weight_decay=1e-4",
    ),
    "optimizer.momentum": (
        lambda v: is_number(v, 0),
        "a momentum, a number 0 or more",
        "optimizer.momentum=0.9",
    ),
    "test_postprocessed": (
        lambda v: isinstance(v, bool),
        "true or false: after the test, score the test split with the post-processing",
        "test_postprocessed=false",
    ),
    "callbacks.time_plan.enabled": (
        lambda v: isinstance(v, bool),
        "true or false: fit the cosine decay to trainer.max_time",
        "callbacks.time_plan.enabled=true",
    ),
    "callbacks.time_plan.margin": (
        lambda v: is_number(v, 0, 0.99),
        "the share of an epoch to plan on top of the median epoch, from 0 to 0.99",
        "callbacks.time_plan.margin=0.1",
    ),
    # -1 (trainer.max_epochs=-1) is no length: torch's cosine then swings between lr and
    # eta_min every epoch.
    "scheduler.T_max": (
        lambda v: is_whole(v, 1),
        "the number of epochs the cosine schedule decays over, a whole number 1 or more; it "
        "follows trainer.max_epochs, so for training without an epoch limit choose "
        "scheduler=none or scheduler=plateau",
        "trainer.max_epochs=40",
    ),
    "loss.label_smoothing": (
        lambda v: is_number(v, 0, 1),
        "a label smoothing from 0 (none) to 1",
        "loss.label_smoothing=0.1",
    ),
    "loss.gamma": (
        lambda v: is_number(v, 0),
        "the focal loss's focusing exponent, a number 0 or more (0: cross-entropy)",
        "loss.gamma=2",
    ),
    **{
        f"loss.{key}": (lambda v: is_number(v, 0), f"{wanted}, a number 0 or more", example)
        for key, wanted, example in (
            ("smooth", "the Dice or Tversky loss's smoothing term", "loss.smooth=1"),
            ("alpha", "the Tversky loss's weight of false positives", "loss.alpha=0.3"),
            ("beta", "the Tversky loss's weight of false negatives", "loss.beta=0.7"),
            ("dice_weight", "the weight of the Dice term", "loss.dice_weight=1"),
            ("ce_weight", "the weight of the cross-entropy term", "loss.ce_weight=1"),
        )
    },
    "loss.class_weights": (
        lambda v: v is None or (_numbers(v) and any(w > 0 for w in v)),
        "a list of one weight per class, background first, each a number 0 or more and not "
        "all 0, or null for equal weights",
        "loss.class_weights=[0.5,1,2]",
    ),
    **{
        f"loss.{key}": (lambda v: isinstance(v, bool), f"true or false: {wanted}", example)
        for key, wanted, example in (
            (
                "include_background",
                "whether the Dice or Tversky loss scores the background class too",
                "loss.include_background=false",
            ),
            ("per_image", "Dice per image, averaged", "loss.per_image=true"),
            ("skip_empty", "leave images without a class out of its Dice", "loss.skip_empty=true"),
        )
    },
}


# The groups built as ``_target_(**group)``: group → (the arguments lungseg passes itself, which
# would override a key of that name in the group; the keys it takes out before building). As in
# train.build_datamodule and SegmentationModule's __init__ and configure_optimizers.
BUILT: dict[str, tuple[frozenset[str], frozenset[str]]] = {
    "data": (frozenset({"augmentation"}), frozenset()),
    "model": (frozenset(), frozenset()),
    "loss": (frozenset(), frozenset()),
    "optimizer": (frozenset({"params"}), frozenset()),
    "scheduler": (frozenset({"optimizer"}), frozenset({"monitor", "interval"})),
    # train.accelerator_settings takes Lightning 1.x's gpus out; train passes the callbacks
    # and loggers of their own groups
    "trainer": (frozenset({"callbacks", "logger"}), frozenset({"gpus"})),
}
# Keys Hydra's instantiate reads itself rather than passing them on.
HYDRA_KEYS = frozenset({"_target_", "_recursive_", "_convert_", "_partial_", "_args_"})
# The config each entry point composes (@hydra.main's config_name).
CONFIGS = {"train.py": "config", "eval.py": "eval", "predict.py": "predict", "export.py": "export"}
# Where the entry points' config_path points, when Hydra's search path does not say.
CONF = Path(__file__).resolve().parents[1] / "conf"
_GLOBAL_PACKAGE = re.compile(r"#\s*@package\s+_global_\s*$")


def check_top_keys(cfg: DictConfig, script: str = "train.py") -> None:
    """LungsegError for a key that ``script``'s config (``CONFIGS``) does not define, at the top
    (``+sed=1``) or in one of its own sections (``+postprocess.treshold=0.3``), naming the
    nearest setting, or else a group's or section's (``+max_epochs=5``: trainer.max_epochs).
    Hydra adds such a key after a +, and nothing would read it. The keys are the config
    file's own, its groups' (``config_settings``) and Hydra's node, which
    ``compose(return_hydra_config=True)`` keeps; where the config file cannot be found
    (lungseg installed without conf/, outside Hydra) nothing is checked."""
    hydra = _hydra(cfg)
    config = CONFIGS[script]
    primary = _config_file(hydra, f"{config}.yaml")
    if primary is None:
        return
    settings, global_groups = config_settings(primary, hydra)
    for key in map(str, cfg):
        if key in global_groups:
            raise LungsegError(
                f"{key} is not a setting of {script}: Hydra put the settings of "
                f"{_group_file(key, hydra)} under {key}, where nothing reads them. Make "
                "'# @package _global_' its first line, as in conf/experiment/article.yaml."
            )
    unknown = _unknown(cfg, settings)
    if unknown is None:
        return
    name, close = unknown
    origin = _origin(cfg, name, config)
    raise LungsegError(
        f"{name} is not a setting of {script}"
        + (f"; did you mean {' or '.join(close)}?" if close else ".")
        + (f" {origin[0]} sets it: remove it there" if origin else f" Remove +{name}")
        + f", or see {_named(primary)} for the settings."
    )


def _unknown(cfg: DictConfig, settings: dict[str, Any]) -> tuple[str, list[str]] | None:
    """The first key of cfg that ``settings`` (``config_settings``) lacks, as a dotted name,
    and the nearest settings' names; None if there is none."""
    sections = [("", cfg, settings)]
    for prefix, node, known in sections:
        for key, child in node.items_ex(resolve=False):
            name = f"{prefix}{key}"
            if key not in known:
                close = get_close_matches(str(key), sorted(known.keys() - {"hydra"}), cutoff=0.7)
                close = [f"{prefix}{c}" for c in close]
                if not prefix:  # a section's or group's setting given without its name
                    close = close or _group_settings_like(cfg, str(key), settings)
                return name, close
            if known[key] is not None and isinstance(child, DictConfig):
                sections.append((f"{name}.", child, known[key]))
    return None


def _group_settings_like(cfg: DictConfig, key: str, settings: dict[str, Any]) -> list[str]:
    """The settings of cfg's groups and sections named ``key`` (max_epochs:
    trainer.max_epochs), else named most like it (epochs: trainer.max_epochs), without
    resolving any."""
    named: dict[str, list[str]] = {}
    for group, node in cfg.items_ex(resolve=False):
        if group in settings.keys() - {"hydra"} and isinstance(node, DictConfig):
            for name in node:
                named.setdefault(str(name), []).append(f"{group}.{name}")
    close = [key] if key in named else get_close_matches(key, named, n=2, cutoff=0.7)
    return [setting for name in close for setting in named[name]]


def config_settings(
    primary: Path, hydra: DictConfig | None = None
) -> tuple[dict[str, Any], list[str]]:
    """The keys a primary config file (conf/predict.yaml) defines, as ``{key: None}`` (any
    value or sub-key: a group's key, checked by ``check_keys``, a plain value, Hydra's node) or
    ``{key: {its keys}}`` for a section the file spells out (eval.yaml's data and
    postprocess); and the groups of its defaults list whose files set top-level keys
    (``# @package _global_``: experiment, recipe, hparams_search), which hold no key of their
    own. Read from the file, not the composed config: a key the file lacks is one that a +
    added (Hydra refuses a + for a key the config has)."""
    data = _load(primary)
    groups = list(_defaults(data))
    global_groups = [group for group in groups if _sets_global(hydra, group)]
    settings = {str(key): _sections(value) for key, value in data.items() if key != "defaults"}
    for group in groups:
        if group not in global_groups:  # data@foo: under foo; hydra/job_logging: under hydra
            settings[group.split("@")[-1].split("/")[0]] = None
    settings["hydra"] = None
    return settings, global_groups


def _sections(value: Any) -> dict[str, Any] | None:
    if not isinstance(value, dict):
        return None
    return {str(key): _sections(inner) for key, inner in value.items()}


def _defaults(data: dict[str, Any]) -> dict[str, Any]:
    """A config file's defaults list as {group: option} (``override /model: unet``: model:
    unet; ``optional recipe: ...``: recipe); ``_self_`` and plain config names left out."""
    chosen = {}
    for entry in data.get("defaults") or []:
        if isinstance(entry, dict):
            for name, option in entry.items():
                chosen[str(name).split()[-1].lstrip("/")] = option
    return chosen


def _sets_global(hydra: DictConfig | None, group: str) -> bool:
    """Whether a file of a config group declares ``# @package _global_`` among its leading
    comments (where Hydra reads it)."""
    files = [path for folder in _folders(hydra) for path in sorted(folder.glob(f"{group}/*.yaml"))]
    for path in files:
        with path.open() as f:
            for line in f:
                if not line.lstrip().startswith("#") and line.strip():
                    break
                if _GLOBAL_PACKAGE.search(line):
                    return True
    return False


def _load(path: Path) -> dict[str, Any]:
    """A config file's content, uninterpolated."""
    return OmegaConf.to_container(OmegaConf.load(path), resolve=False) or {}


def _hydra(cfg: DictConfig) -> DictConfig | None:
    """The run's Hydra node (its choices, command-line overrides, search path): cfg's own
    after ``compose(return_hydra_config=True)``, HydraConfig's under ``@hydra.main``, else
    None."""
    node = cfg._get_node("hydra") if "hydra" in cfg else None
    if isinstance(node, DictConfig):
        return node
    return HydraConfig.get() if HydraConfig.initialized() else None


def _folders(hydra: DictConfig | None) -> list[Path]:
    """The config folders in the order Hydra searches them (the entry point's, then
    --config-dir's), then ``CONF`` (for a config composed elsewhere)."""
    sources = hydra.runtime.config_sources if hydra is not None else []
    folders = [Path(str(s.path)) for s in sources if s.schema == "file"]
    return [*folders, CONF]


def _config_file(hydra: DictConfig | None, name: str) -> Path | None:
    """The config file Hydra composes as ``name`` (experiment/article.yaml): the first of
    ``_folders`` that holds it; None where none does."""
    return next((f / name for f in _folders(hydra) if (f / name).is_file()), None)


def _named(path: Path) -> str:
    """A config file as messages name it: conf/experiment/article.yaml, or its full path
    outside ``CONF``."""
    return f"conf/{path.relative_to(CONF)}" if path.is_relative_to(CONF) else str(path)


def _group_file(group: str, hydra: DictConfig | None) -> str:
    """The run's file of ``group`` (conf/model/unet.yaml), or its folder without Hydra's node."""
    choice = hydra.runtime.choices.get(group) if hydra is not None else None
    path = _config_file(hydra, f"{group}/{choice}.yaml") if choice else None
    return _named(path) if path else f"conf/{group}/"


def _origin(cfg: DictConfig, key: str, config: str) -> tuple[str, str | None, dict] | None:
    """Where the dotted ``key`` comes from when the command line did not give it: the config
    file that sets it (of the chosen experiment, recipe or hparams_search, which win over
    conf/<config>.yaml, which wins over the group's own file), the choice that picked that
    file (experiment=article, or None) and the file's own defaults (``_defaults``). None
    where the command line gave it, where the file is not found, and where Hydra's node is
    not at hand (``compose`` without ``return_hydra_config``): what the user typed is then
    unknown."""
    hydra = _hydra(cfg)
    if hydra is None:
        return None
    choices = hydra.runtime.choices
    for override in hydra.overrides.task:
        typed = str(override).split("=", 1)[0].lstrip("+~")
        if typed == key or (key.startswith(f"{typed}.") and typed not in choices):
            return None
    primary = _config_file(hydra, f"{config}.yaml")
    if primary is None:
        return None
    _, global_groups = config_settings(primary, hydra)
    top = key.split(".")[0]
    # the files that set keys, the one that wins first
    candidates = [
        (_config_file(hydra, f"{group}/{choices[group]}.yaml"), "", f"{group}={choices[group]}")
        for group in reversed(global_groups)
        if choices.get(group)
    ]
    candidates.append((primary, "", None))
    if choices.get(top):
        own = _config_file(hydra, f"{top}/{choices[top]}.yaml")
        candidates.append((own, f"{top}.", f"{top}={choices[top]}"))
    for path, prefix, choice in candidates:
        if path is None or not key.startswith(prefix):
            continue
        data = _load(path)
        if _has(data, key[len(prefix) :]):
            return _named(path), choice, _defaults(data)
    return None


def _has(data: dict[str, Any], key: str) -> bool:
    """Whether a config file's content sets the dotted ``key``."""
    for part in key.split("."):
        if not isinstance(data, dict) or part not in data:
            return False
        data = data[part]
    return True


def check_keys(cfg: DictConfig) -> None:
    """LungsegError for a key of a ``BUILT`` group that its ``_target_`` does not take
    (``+data.imagesize=64``, which Hydra advises for a key the group lacks), naming the nearest
    settings, and, for a key that an experiment (or recipe) file sets rather than the command
    line, that file and the choice it was made for (experiment=article sets the U-Net's
    model.depth; with model=fcn). A target that cannot be imported, or that takes
    ``**kwargs``, is left to Hydra's instantiate, which imports it the same way."""
    groups = [(group, cfg.get(group), given, taken) for group, (given, taken) in BUILT.items()]
    callbacks = cfg.get("callbacks")
    if isinstance(callbacks, DictConfig):  # each callback built as _target_(**its settings)
        for name, node in callbacks.items():
            groups.append((f"callbacks.{name}", node, frozenset(), frozenset()))
    for group, node, given, taken in groups:
        target = node.get("_target_") if isinstance(node, DictConfig) else None
        settings = _keywords(target) if isinstance(target, str) else None
        if settings is None:
            continue
        settings = (settings - given) | taken
        for key in node:
            if key in settings or key in HYDRA_KEYS:
                continue
            raise LungsegError(
                f"{group}.{key} is not a setting of {group} ({target})"
                + _key_fix(cfg, group, str(key), sorted(settings))
            )


def _key_fix(cfg: DictConfig, group: str, key: str, settings: list[str]) -> str:
    """check_keys' message after "<group>.<key> is not a setting of <group> (<target>)": the
    nearest settings and what to remove, on the command line or in the file that sets it."""
    close = get_close_matches(key, settings, cutoff=0.7)
    guess = f"; did you mean {' or '.join(f'{group}.{name}' for name in close)}?" if close else "."
    top, hydra = group.split(".")[0], _hydra(cfg)
    see = f", or see {_group_file(top, hydra)} for the settings."
    origin = _origin(cfg, f"{group}.{key}", "config")
    if origin is None:
        return f"{guess} Remove +{group}.{key}{see}"
    file, choice, chosen = origin
    made_for = chosen.get(top)
    runs = hydra.runtime.choices.get(top)
    if choice is None or made_for is None or made_for == runs:
        return f"{guess} {file} sets it: remove it there{see}"
    kind = choice.split("=")[0]
    return (
        f". It comes from {file}: {choice} is made for {top}={made_for}, and {top}={runs} does "
        f"not take {group}.{key}. Leave out {top}={runs}, or copy {file} to a new {kind} for "
        f"{top}={runs} without {group}.{key}."
    )


def _keywords(target: str) -> frozenset[str] | None:
    """The keyword arguments ``target`` takes, or None for any (``**kwargs``) or unknown."""
    try:
        parameters = inspect.signature(_locate(target)).parameters.values()
    except Exception:  # not importable, or no signature: instantiate reports or builds it
        return None
    if any(p.kind is p.VAR_KEYWORD for p in parameters):
        return None
    return frozenset(
        p.name for p in parameters if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
    )


def check_settings(cfg: DictConfig) -> None:
    """LungsegError for a top-level key train.py does not read (``check_top_keys``), then for
    an on/off word given as text (``check_switch_words``), then for a key a group's
    constructor does not take (``check_keys``), then for the first setting of
    ``RULES`` the config holds with a wrong type or range, then for a data folder that does not
    exist, then for bad ``postprocess`` values (the checkpoint keeps them for eval.py and
    predict.py). Reads nothing but the config and the data folders' existence, imports the
    groups' targets, writes nothing."""
    check_top_keys(cfg)
    check_switch_words(cfg)
    check_keys(cfg)
    for key, (accepts, wanted, example) in RULES.items():
        value = OmegaConf.select(cfg, key, default=ABSENT)
        if value is not ABSENT:
            require(accepts(value), key, value, wanted, example)
    check_data_dirs(
        OmegaConf.select(cfg, "data.image_dir"),
        OmegaConf.select(cfg, "data.mask_dir"),
        bool(OmegaConf.select(cfg, "data.recursive", default=False)),
    )
    postprocess.settings(cfg.get("postprocess"), None)
    postprocess.flips(None, None, cfg.get("postprocess"))
