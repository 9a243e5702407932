"""From a checkpoint to class probabilities at each image's own size.

The checkpoint carries everything needed (``hparams.data_info``: channels, image size,
intensity window, median blur, normalisation, class names and mask encoding), so prediction
needs no training config. Images go through ``transforms.preprocess`` and
``transforms.normalize``, the functions training uses, so the two cannot drift apart.
"""

import inspect
import logging
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import torch
import torch.nn.functional as F
from hydra.utils import _locate
from omegaconf import DictConfig, OmegaConf

from lungseg.data import context, transforms
from lungseg.data.folders import read_image
from lungseg.errors import LungsegError
from lungseg.module import SegmentationModule
from lungseg.postprocess import FLIPS, check_flips
from lungseg.run_folder import checkpoints_in, load_safely

T = TypeVar("T")
log = logging.getLogger(__name__)
# The hyper-parameters SegmentationModule builds with Hydra (net and loss when it is made,
# optimizer and scheduler in configure_optimizers), and the classes each may build: every
# _target_ in them, nested ones too (Hydra builds those first), must name a subclass.
BUILT = {
    "net": ("torch.nn.Module",),
    "loss": ("torch.nn.Module",),
    "optimizer": ("torch.optim.Optimizer",),
    "scheduler": (
        "torch.optim.lr_scheduler.LRScheduler",
        "torch.optim.lr_scheduler.ReduceLROnPlateau",
    ),
}


def resolve_device(device: str) -> torch.device:
    """The torch device for a ``device`` setting: "auto" (the first GPU if PyTorch sees one,
    else the CPU), or a torch device name such as "cpu", "cuda" or "cuda:1"."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if str(device).startswith("cuda") and not torch.cuda.is_available():
        raise LungsegError(
            f"device={device} asks for a GPU, but PyTorch sees none (this torch build is "
            f"{torch.__version__}). Use device=cpu or device=auto."
        )
    try:
        return torch.device(device)
    except RuntimeError as err:
        raise LungsegError(
            f"device={device!r} is not a device name ({err}); use auto, cpu or cuda."
        ) from None


def load_checkpoint(
    path: str | Path,
    device: torch.device,
    trusted_modules: Sequence[str] = ("lungseg", "torch.nn", "torch.optim"),
) -> SegmentationModule:
    """A trained SegmentationModule in eval mode on ``device``.

    The file is read with ``torch.load(weights_only=True)`` (plain values and tensors only: a
    pickle that would run code is refused). The hyper-parameters name the classes the module
    builds (Hydra ``_target_``). Before anything is built, so that a doctored checkpoint
    cannot make Hydra call arbitrary functions, a ``_target_`` is refused when it lies outside
    ``trusted_modules`` (package or module names: "torch.nn" trusts torch.nn.CrossEntropyLoss)
    and, in the hyper-parameters the module builds (``BUILT``, nested ``_target_`` included),
    when it does not name a class of that kind defined in ``trusted_modules``. Raises
    LungsegError for a missing, unreadable, refused or non-lungseg file.
    """
    path = Path(path).expanduser()
    if not path.is_file():
        problem = "is a folder" if path.is_dir() else "does not exist"
        raise LungsegError(
            f"ckpt_path {path} {problem}{checkpoints_in(path)}. Give the path of a checkpoint "
            f"written by `python train.py`, e.g. outputs/train/<run>/checkpoints/last.ckpt."
        )
    hparams = _read_hparams(path)
    _check_targets(path, hparams, trusted_modules)
    init_args = _init_args(path, hparams)
    try:
        # Every argument given: Lightning would otherwise fill missing ones from older
        # checkpoint keys ("hparams", "module_arguments") that the checks above never saw.
        module = SegmentationModule.load_from_checkpoint(
            path, map_location=device, weights_only=True, **init_args
        )
    except Exception as err:  # a file that passed the checks above but does not fit the code
        raise LungsegError(
            f"{path} could not be loaded as a lungseg model ({type(err).__name__}: {err}). "
            f"It may come from another lungseg version or architecture; retrain or use a "
            f"checkpoint written by this version."
        ) from None
    return module.eval()


# What the members of an Ensemble must share: the classes they predict, how masks encode them,
# and the input they take (2.5-D neighbours are read once for all members).
SHARED_INFO = (
    "class_names",
    "num_classes",
    "mask_mode",
    "palette",
    "ignore_index",
    "context_slices",
    "slice_pattern",
)


class Ensemble:
    """Several checkpoints used as one model (``ckpt_path=[a.ckpt,b.ckpt]`` in eval.py and
    predict.py): ``predict_probabilities`` averages their softmax, each member preparing the
    images with its own ``data_info`` (its size and normalisation statistics). The members must
    agree on ``SHARED_INFO``; the rest of ``hparams`` (post-processing defaults, with
    ``min_size`` in pixels at the first member's network size; the intensity window for
    overlays; the bit depths the images are checked against) is the first member's."""

    def __init__(self, members: Sequence[SegmentationModule], paths: Sequence[str]):
        first = members[0].hparams.data_info
        for member, path in zip(members[1:], paths[1:], strict=True):
            info = member.hparams.data_info
            differ = [key for key in SHARED_INFO if info.get(key) != first.get(key)]
            if differ:
                detail = "; ".join(f"{k}: {first.get(k)!r} against {info.get(k)!r}" for k in differ)
                raise LungsegError(
                    f"ckpt_path: {path} cannot join an ensemble with {paths[0]}: their "
                    f"{', '.join(differ)} differ ({detail}). An ensemble averages the members' "
                    f"class probabilities, so they must predict the same classes from the same "
                    f"input; score or use them one at a time instead."
                )
        self.members, self.paths = list(members), [str(p) for p in paths]
        self.hparams = members[0].hparams
        self.device = members[0].device


def checkpoint_paths(value: Any) -> list[str]:
    """``ckpt_path`` of conf/eval.yaml or conf/predict.yaml as a list: one path, or a list of
    them (an ensemble). LungsegError when it is unset, empty or not paths."""
    if value is None:
        raise LungsegError(
            "ckpt_path is not set. Pass the checkpoint to use, e.g. "
            "ckpt_path=outputs/train/<run>/checkpoints/last.ckpt (or a list, "
            "ckpt_path=[a.ckpt,b.ckpt], for an ensemble of them)"
        )
    paths = [value] if isinstance(value, str | Path) else value
    if (
        not isinstance(paths, Sequence)
        or not paths
        or not all(isinstance(p, str | Path) for p in paths)
    ):
        raise LungsegError(
            f"ckpt_path is {value!r}; give a checkpoint's path, or a non-empty list of them "
            f"for an ensemble, e.g. ckpt_path=[run1/checkpoints/last.ckpt,"
            f"run2/checkpoints/last.ckpt]."
        )
    return [str(p) for p in paths]


def config_checkpoints(cfg: DictConfig) -> list[str]:
    """The checkpoint paths of a config's ``ckpt_path`` (``checkpoint_paths``)."""
    value = cfg.get("ckpt_path")
    return checkpoint_paths(OmegaConf.to_object(value) if OmegaConf.is_list(value) else value)


def load_from_config(cfg: DictConfig) -> "SegmentationModule | Ensemble":
    """load_checkpoint with the ckpt_path, device and trusted_modules of conf/eval.yaml or
    conf/predict.yaml; for a list of paths, an Ensemble of them."""
    paths = config_checkpoints(cfg)
    device, trusted = resolve_device(cfg.device), list(cfg.trusted_modules)
    models = [load_checkpoint(path, device, trusted) for path in paths]
    return models[0] if len(models) == 1 else Ensemble(models, paths)


def _read_hparams(path: Path) -> dict[str, Any]:
    checkpoint = load_safely(
        path,
        "is not a lungseg checkpoint",
        "Give a checkpoint written by `python train.py` (<run>/checkpoints/*.ckpt); lungseg "
        "never loads checkpoints in the unsafe weights_only=False mode.",
    )
    hparams = checkpoint.get("hyper_parameters") if isinstance(checkpoint, dict) else None
    if not isinstance(hparams, dict) or not isinstance(hparams.get("data_info"), dict):
        raise LungsegError(
            f"{path} is a PyTorch file but not a lungseg checkpoint: it has no "
            f"hyper_parameters with data_info (image size, classes, normalisation). Give a "
            f"checkpoint written by `python train.py` (<run>/checkpoints/*.ckpt)."
        )
    return hparams


def _check_targets(path: Path, hparams: dict[str, Any], trusted_modules: Sequence[str]) -> None:
    """LungsegError unless every ``_target_`` lies in ``trusted_modules`` and each one that
    SegmentationModule builds names a class of its kind. Names are checked before any is
    imported: importing a module can run code."""
    targets = [value for key, value in _items(hparams) if key == "_target_"]
    untrusted = sorted(str(t) for t in targets if not _trusted(t, trusted_modules))
    if untrusted:
        raise LungsegError(
            f"{path} asks to build {', '.join(untrusted)}, which are outside the trusted "
            f"modules {list(trusted_modules)}; lungseg refuses to call them. If you trust "
            f"this checkpoint and these are your own classes, add their package to "
            f"trusted_modules (e.g. trusted_modules=[lungseg,mypackage])."
        )
    for name, kinds in BUILT.items():
        for key, value in _items(hparams.get(name)):
            if isinstance(value, str) and "${" in value:
                problem = f"{value!r} is an interpolation, which Hydra would resolve unchecked"
            elif key == "_target_":
                problem = _class_problem(value, kinds, trusted_modules)
            else:
                continue
            if problem:
                raise LungsegError(
                    f"{path} is refused: in its {name} hyper-parameter, {problem}. lungseg "
                    f"builds only subclasses of {' or '.join(kinds)} from {name}, from "
                    f"resolved values (as `python train.py` saves them); nothing was built."
                )


def _class_problem(target: str, kinds: Sequence[str], trusted_modules: Sequence[str]) -> str:
    """Why ``_target_`` ``target`` (inside trusted_modules) is not a class of one of
    ``kinds`` defined in trusted_modules, or "" when it is one."""
    try:
        cls = _locate(target)  # found as Hydra finds it, not called
    except Exception as err:
        return f"_target_ {target} cannot be imported ({' '.join(str(err).split())})"
    if not isinstance(cls, type):
        return f"_target_ {target} is a {type(cls).__name__}, not a class"
    if not _trusted(cls.__module__, trusted_modules):
        return f"_target_ {target} is defined in {cls.__module__}, outside the trusted modules"
    if not issubclass(cls, tuple(_locate(kind) for kind in kinds)):
        return f"_target_ {target} is not a subclass of {' or '.join(kinds)}"
    return ""


def _trusted(name: Any, trusted_modules: Sequence[str]) -> bool:
    """Whether ``name`` is one of ``trusted_modules`` or lies inside one."""
    return isinstance(name, str) and any(
        name == m or name.startswith(f"{m}.") for m in trusted_modules
    )


def _items(tree: Any) -> Iterator[tuple[Any, Any]]:
    """(key, value) of every entry of a nested dict/list, at every depth (key None in lists)."""
    if isinstance(tree, dict):
        for key, value in tree.items():
            yield key, value
            yield from _items(value)
    elif isinstance(tree, list | tuple):
        for value in tree:
            yield None, value
            yield from _items(value)


def _init_args(path: Path, hparams: dict[str, Any]) -> dict[str, Any]:
    """Every argument of SegmentationModule: its hyper-parameter, else the default."""
    args = {}
    params = list(inspect.signature(SegmentationModule.__init__).parameters.values())
    for param in params[1:]:  # after self
        if param.name in hparams:
            args[param.name] = hparams[param.name]
        elif param.default is not param.empty:
            args[param.name] = param.default
        else:
            raise LungsegError(
                f"{path} is not a lungseg checkpoint this version can load: its "
                f"hyper_parameters have no {param.name}. Give a checkpoint written by `python "
                f"train.py` (<run>/checkpoints/*.ckpt)."
            )
    return args


@torch.inference_mode()
def predict_probabilities(
    model: "SegmentationModule | Ensemble",
    images: Sequence[np.ndarray | Sequence[np.ndarray]],
    flips: Sequence[str] = (),
) -> list[np.ndarray]:
    """Softmax probabilities for a batch of raw images, each at its own size.

    images: ``read_image`` results ((H, W) or (H, W, 3), any size, 8/16-bit or float), which
    may differ in size; for a model trained with data.context_slices=n, each is instead the
    2n+1 slices ``k-n .. k+n`` (``read_inputs``), and the size is the centre slice's. Each is
    prepared for the network exactly as in training, the softmax is taken at the network's
    size, then resized bilinearly (half-pixel centres) back to the image's size, so the argmax
    is taken at the original resolution. With ``flips`` (test-time augmentation) the softmax of
    the unflipped batch and of each flipped batch (flipped back) are averaged; for an Ensemble,
    the members' too, each member preparing the images with its own data_info. Returns one
    float32 (num_classes, H, W) array per image.
    """
    members = model.members if isinstance(model, Ensemble) else [model]
    total = [_probabilities(member, images, flips) for member in members]
    if len(total) == 1:
        return total[0]
    return [sum(probs) / len(total) for probs in zip(*total, strict=True)]


def _probabilities(
    model: SegmentationModule,
    images: Sequence[np.ndarray | Sequence[np.ndarray]],
    flips: Sequence[str],
) -> list[np.ndarray]:
    """predict_probabilities for one model."""
    info = model.hparams.data_info
    batch = torch.from_numpy(np.stack([_network_input(image, info) for image in images]))
    batch = batch.to(model.device)
    probs = model(batch).softmax(dim=1)
    for flip in check_flips(flips):
        dims = FLIPS[flip]
        probs += model(batch.flip(dims)).softmax(dim=1).flip(dims)
    probs /= 1 + len(flips)
    out = []
    for image, prob in zip(images, probs, strict=True):
        size = centre_slice(image).shape[:2]
        if prob.shape[1:] != size:
            prob = F.interpolate(prob[None], size=size, mode="bilinear", align_corners=False)[0]
        out.append(prob.float().cpu().numpy())
    return out


def _network_input(raw: np.ndarray | Sequence[np.ndarray], info: Mapping[str, Any]) -> np.ndarray:
    """(C, h, w) float32 at the network's size: preprocess (each slice of a 2.5-D input, then
    stacked along the channels) + normalize, as in training."""
    n = int(info.get("context_slices", 0))
    slices = [raw] if isinstance(raw, np.ndarray) else list(raw)
    if len(slices) != 2 * n + 1:
        raise LungsegError(
            f"The model takes {2 * n + 1} slices per image (data.context_slices={n}), but "
            f"{len(slices)} were given; read the images with lungseg.inference.read_inputs "
            f"and a neighbour_table."
        )
    image = np.concatenate([transforms.preprocess(s, info) for s in slices], axis=2)
    image = transforms.normalize(image, info)
    return np.ascontiguousarray(image.transpose(2, 0, 1))


def centre_slice(item: np.ndarray | Sequence[np.ndarray]) -> np.ndarray:
    """The image itself of a ``read_inputs`` item: the item, or the middle of its 2n+1 slices."""
    return item if isinstance(item, np.ndarray) else item[len(item) // 2]


def neighbour_table(
    paths: Sequence[Path], info: Mapping[str, Any], pool: Sequence[Path] = ()
) -> dict[Path, list[Path]] | None:
    """For a model trained with data.context_slices=n, each of ``paths`` → the paths of its
    2n+1 slices, found by data.slice_pattern among ``paths`` and ``pool`` (e.g. all images of
    their folder); None for a 2-D model. Made once for all the images to score."""
    n = int(info.get("context_slices", 0))
    if not n:
        return None
    try:
        rows = context.neighbour_paths(paths, pool, n, info.get("slice_pattern"))
    except LungsegError as err:
        raise LungsegError(
            f"{err} (This model was trained on 2.5-D input, data.context_slices={n}, and "
            f"data.slice_pattern {info.get('slice_pattern')!r}: the images must be named so.)"
        ) from None
    return dict(zip(paths, rows, strict=True))


def read_inputs(
    paths: Sequence[Path], table: Mapping[Path, list[Path]] | None = None
) -> list[np.ndarray | list[np.ndarray]]:
    """What ``predict_probabilities`` takes for these image files: each image (``read_image``),
    or, with a ``neighbour_table``, its 2n+1 slices."""
    if table is None:
        return [read_image(path) for path in paths]
    cache: dict[Path, np.ndarray] = {}

    def read(path: Path) -> np.ndarray:
        if path not in cache:
            cache[path] = read_image(path)
        return cache[path]

    return [[read(path) for path in table[p]] for p in paths]


def read_usable(
    paths: Sequence[Path], table: Mapping[Path, list[Path]] | None, strict: bool
) -> tuple[list[int], list[np.ndarray | list[np.ndarray]], list[tuple[Path, str]]]:
    """``read_inputs`` of ``paths``, as (indices of the paths read, their inputs, failures).
    strict: a file that cannot be read raises its LungsegError; otherwise it is left out and
    returned in the failures as (path, error message)."""
    if strict:
        return list(range(len(paths))), read_inputs(paths, table), []
    kept, inputs, failed = [], [], []
    for i, path in enumerate(paths):
        try:
            inputs += read_inputs([path], table)
            kept.append(i)
        except LungsegError as error:
            failed.append((path, str(error)))
    return kept, inputs, failed


class InputCheck:
    """Collects, over the images read for a model (``see`` each input), those it would get
    wrong without an error, for one warning of each kind at the end (``report``):

    - images of a bit depth the model was not trained on. Each image is scaled by its type's
      range (8-bit /255, 16-bit /65535), and a window applies to the raw values, so a 16-bit
      image given to a model trained on 8-bit ones (or the other way) reaches it on another
      scale, e.g. 12-bit CT values in 16-bit files 16 times darker (not 8-bit values stored
      in 16 bits, each x 257, without a window: they reach it as they were). Checkpoints from before
      lungseg recorded the depths (data_info ``bit_depths``) are not checked, nor models
      trained on float images, nor models that normalise each image by itself without a
      window; float images are not checked either.
    - images that reach the network as one flat value: blank files, or every stored value
      outside the model's window (``transforms.flat_images_warning``), as training warns."""

    def __init__(self, info: Mapping[str, Any]) -> None:
        self.trained = [int(b) for b in info.get("bit_depths") or []]
        self.window = info.get("window")
        self.offset = float(info.get("intensity_offset") or 0.0)
        self.windowed = self.window is not None
        per_image = info.get("normalize") == "image" and not self.windowed
        self.active = bool(self.trained) and not per_image
        self.other: dict[int, list[str]] = {}
        self.flat: dict[str, tuple[float, float]] = {}
        self.seen = 0

    def see(self, path: Path, item: np.ndarray | Sequence[np.ndarray]) -> None:
        raw = centre_slice(item)
        self.seen += 1
        if self.active and raw.dtype in (np.uint8, np.uint16):
            bits = raw.dtype.itemsize * 8
            # an 8-bit image stored in 16 bits (each value x 257) is scaled as it was
            widened = bits == 16 and 8 in self.trained and not self.windowed
            if bits not in self.trained and not (widened and not (raw % 257).any()):
                self.other.setdefault(bits, []).append(str(path))
        if raw.size:  # from the stored values' range, without a float copy of the image
            low, high = float(raw.min()), float(raw.max())
            clipped = self.window is not None and transforms.outside_window(
                low, high, self.window, self.offset
            )
            if low == high or clipped:
                self.flat[str(path)] = (low, high)

    def report(self) -> None:
        trained = " and ".join(f"{b}-bit" for b in self.trained)
        retrain = "" if self.windowed else ", or train with data.normalize=image"
        for bits, paths in sorted(self.other.items()):
            log.warning(
                "%d of the images are %d-bit (e.g. %s), but the model was trained on %s images: "
                "each image is scaled by its type's range (8-bit /255, 16-bit /65535) and "
                "windowed on its raw values, so these reach the network on another scale than "
                "it learned, and its predictions on them may be wrong without any error. "
                "Convert them to the training images' bit depth (as they were exported for "
                "training)%s.",
                len(paths),
                bits,
                paths[0],
                trained,
                retrain,
            )
        flat = transforms.flat_images_warning(self.flat, self.seen, self.window, self.offset)
        if flat:
            log.warning("%s Their predictions say nothing about them.", flat)


def report_skipped(failed: Sequence[tuple[Path, str]], what: tuple[str, str]) -> None:
    """One warning for the files ``strict=false`` left out, each with its reason; ``what``
    names them for one file and for several."""
    if failed:
        log.warning(
            "%d %s left out (strict=false): %s",
            len(failed),
            what[len(failed) > 1],
            " ".join(f"({i}) {reason}" for i, (_, reason) in enumerate(failed, 1)),
        )


def batches(items: Sequence[T], size: int) -> Iterator[Sequence[T]]:
    """Consecutive slices of at most ``size`` items."""
    if not isinstance(size, int) or size < 1:
        raise LungsegError(f"batch_size is {size!r}; it must be a positive integer, e.g. 8.")
    for start in range(0, len(items), size):
        yield items[start : start + size]
