"""The export task: a checkpoint's network → ONNX, torch.export's ExportedProgram (``.pt2``) or
TorchScript, checked against PyTorch, with a JSON file beside it that says how to prepare images
and read the logits without lungseg."""

import json
import logging
from importlib.util import find_spec
from pathlib import Path
from typing import Any

import numpy as np
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig

from lungseg import input_channels, postprocess
from lungseg.checks import check_overwrite, check_switch_words, check_top_keys, is_number, require
from lungseg.data.folders import check_writable, writing
from lungseg.data.folders import existing as taken
from lungseg.errors import LungsegError
from lungseg.inference import load_checkpoint

log = logging.getLogger(__name__)

FORMATS = {"onnx": ".onnx", "pt2": ".pt2", "torchscript": ".pt"}
ONNX_PACKAGES = ("onnx", "onnxscript", "onnxruntime")
# torch.export specialises batch sizes 0 and 1 to constants, so the example batch holds 2; the
# check runs a third size, which only works if the exported batch axis is really free.
TRACE_BATCH = 2
CHECK_BATCH = 3
_WRITE_FIX = (
    "Give output=<file> in a folder you can write to, on a disk with room (without it, the "
    "model is written next to the checkpoint)."
)

# For people without lungseg: what lungseg.data does to an image before the network sees it.
PREPROCESSING = [
    "read the image as image viewers show it: turned as its EXIF orientation tag says (JPEG, "
    "PNG, TIFF), alpha dropped, e.g. cv2.imdecode(np.fromfile(path, np.uint8), "
    "cv2.IMREAD_ANYDEPTH | cv2.IMREAD_ANYCOLOR), then BGR to RGB (IMREAD_UNCHANGED would "
    "ignore the tag); (H, W) grayscale or (H, W, 3) RGB, uint8, uint16 or float32",
    "in_channels 1: RGB to gray as 0.299 R + 0.587 G + 0.114 B; in_channels 3: gray repeated",
    "resize to image_size [height, width]: cv2.INTER_AREA when shrinking, INTER_LINEAR else",
    "median_blur > 1: cv2.medianBlur with that kernel on each channel",
    "to float32 in [0, 1]: with window, clip(x - intensity_offset, lo, hi) mapped to [0, 1]; "
    "without, uint8 / 255, uint16 / 65535, float unchanged",
    "context_slices n > 0 (2.5-D): slices k-n .. k+n of the image's volume, each prepared as "
    "above, concatenated along the channel axis (a missing one repeats the nearest towards k)",
    "normalize 'dataset': (x - mean[c]) / std[c]; 'image': per-channel z-score of the image; "
    "'none': unchanged",
    "to (N, C, H, W) float32",
]
POSTPROCESSING = [
    "softmax over the class axis (1); at each image's own size (probabilities resized "
    "bilinearly), class ids: argmax, or with postprocess.threshold t: background where "
    "1 - p[0] < t, else the most probable other class",
    "postprocess.min_confidence c > 0: per foreground class, 8-connected components whose "
    "largest 1 - p[0] is under c become background",
    "postprocess.min_size s > 0: per foreground class, 8-connected components of fewer than "
    "s x (H x W) / (image_size[0] x image_size[1]) pixels become background",
    "class ids name class_names[id] and, for palette masks, colour palette[id]",
]


def load_network(cfg: DictConfig) -> tuple[torch.nn.Module, dict[str, Any]]:
    """The network of ``cfg.ckpt_path`` in eval mode on the CPU, and its hyper-parameters."""
    if not cfg.ckpt_path:
        raise LungsegError(
            "ckpt_path is not set. Name the checkpoint to export, e.g. `python export.py "
            "ckpt_path=outputs/train/<run>/checkpoints/last.ckpt format=onnx`."
        )
    if not isinstance(cfg.ckpt_path, str):
        raise LungsegError(
            f"ckpt_path is {cfg.ckpt_path}; export writes one network, so give one checkpoint "
            f"(eval.py and predict.py take a list, an ensemble; export each member on its own)."
        )
    module = load_checkpoint(cfg.ckpt_path, torch.device("cpu"), list(cfg.trusted_modules))
    hparams = dict(module.hparams)
    # A fresh copy: with compile=true the module compiled its network in place, and compiled
    # code can be neither traced nor exported by the TorchScript-based tools.
    net = instantiate(hparams["net"])
    net.load_state_dict(module.net.state_dict())
    return net.eval(), hparams


def write_model(
    net: torch.nn.Module, example: torch.Tensor, path: Path, fmt: str, opset: int
) -> None:
    """Write ``net`` to ``path`` in ``fmt`` with a free batch axis, traced on ``example``.

    ONNX (input ``images``, output ``logits``) through torch's dynamo exporter: the legacy
    TorchScript-based one, like torch.jit.trace, cannot trace SegNet's MaxUnpool2d with torch
    2.13 (pytorch/pytorch#189298). pt2: torch.export's ExportedProgram, the graph that
    exporter starts from, saved by torch.export.save (the successor torch 2.13 points to from
    TorchScript, which it deprecates). TorchScript by tracing, which records shapes as
    operations on the input, so the batch stays free (scripting fails on SegNet too).
    Converting and saving fail apart: only a failed conversion is the format's fault
    (torch.jit.save reports a file it cannot open as a RuntimeError, not an OSError)."""
    batch = ({0: torch.export.Dim("batch")},)
    try:
        if fmt == "onnx":
            converted = torch.onnx.export(
                net,
                (example,),
                input_names=["images"],
                output_names=["logits"],
                opset_version=opset,
                dynamo=True,
                dynamic_shapes=batch,
                verbose=False,
            )
        elif fmt == "pt2":
            converted = torch.export.export(net, (example,), dynamic_shapes=batch)
        else:
            # check_trace would run the network twice more; export() checks it on a new batch.
            converted = torch.jit.trace(net, example, check_trace=False)
    except Exception as error:
        others = " or ".join(f"format={other}" for other in FORMATS if other != fmt)
        raise LungsegError(
            f"{type(net).__name__} could not be exported to {fmt} with torch {torch.__version__} "
            f"({_first_line(error)}). Export it with {others} instead."
        ) from error
    try:
        if fmt == "onnx":
            # one self-contained file (fine below ONNX's 2 GB limit)
            converted.save(str(path), external_data=False)
        elif fmt == "pt2":
            torch.export.save(converted, str(path))
        else:
            torch.jit.save(converted, str(path))
    except Exception as error:
        raise LungsegError(
            f"The exported model could not be written to {path.parent} ({_first_line(error)}). "
            f"{_WRITE_FIX}"
        ) from error


def _first_line(error: Exception) -> str:
    return f"{type(error).__name__}: {str(error).strip().splitlines()[0]}"


def check_onnx_packages() -> None:
    missing = [name for name in ONNX_PACKAGES if find_spec(name) is None]
    if missing:
        raise LungsegError(
            f"format=onnx needs the packages {', '.join(ONNX_PACKAGES)}, and "
            f"{', '.join(missing)} {'is' if len(missing) == 1 else 'are'} not installed. Install "
            f'them with `pip install -e ".[onnx]"` in the lungseg folder (or `pip install '
            f"{' '.join(ONNX_PACKAGES)}`), or export with format=pt2 (torch.export: PyTorch alone)."
        )


def run_exported(path: Path, fmt: str, images: torch.Tensor) -> np.ndarray:
    """Logits of an exported model, run by onnxruntime, torch.export or torch.jit."""
    if fmt == "onnx":
        import onnxruntime  # optional dependency, checked by check_onnx_packages

        session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        return session.run(["logits"], {"images": images.numpy()})[0]
    with torch.no_grad():
        if fmt == "pt2":
            return torch.export.load(str(path)).module()(images).numpy()
        return torch.jit.load(str(path), map_location="cpu")(images).numpy()


def check_outputs(path: Path, ckpt_path: Path, cfg: DictConfig) -> Path:
    """The JSON file's path beside the model file ``path``. LungsegError, before anything is
    written, when ``path`` is the checkpoint or a folder, when that JSON path holds anything
    but an earlier export's JSON for this model file (``output=<run>/metrics`` would replace
    the run's metrics.json), whatever ``cfg.overwrite`` says, when the model or its JSON
    exists and not ``cfg.overwrite`` (as predict.py treats its outputs), or when its folder
    cannot be written."""
    suffix = FORMATS[cfg.format]
    if path.resolve() == ckpt_path.resolve():
        raise _replaces_checkpoint(path, cfg.format)
    if path.is_dir():
        raise LungsegError(
            f"output {path} is a folder; give the model file's name, e.g. "
            f"output={path / ('model' + suffix)}."
        )
    info_path = path.with_name(path.name + ".json")
    if taken((info_path,)) and not _is_export_json(info_path, path.name):
        other = (
            path.with_name(path.name + suffix)
            if path.suffix != suffix
            else path.with_name(f"{path.stem}-export{suffix}")
        )
        raise LungsegError(
            f"{info_path} exists and is not an earlier export's JSON file for {path.name}, "
            f"where export would write the model's description (<model file>.json): it could "
            f"be a run's or checkpoint's file, so it is not replaced, whatever overwrite says. "
            f"Nothing was written. Give another output=<file>, e.g. output={other}, or move "
            f"{info_path} away."
        )
    if taken((path,)) and not _is_export_json(info_path, path.name):
        # not an earlier export's model (it would have its JSON beside it): a run's
        # split.csv, train.log or curves.png, or any other file of the user's
        raise LungsegError(
            f"{path} exists and is not a model an earlier export wrote (no {info_path.name} "
            f"of an export beside it), so it is not replaced, whatever overwrite says. "
            f"Nothing was written. Give another output=<file>, e.g. "
            f"output={path.with_name(path.stem + '-model' + suffix)}."
        )
    existing = taken((path, info_path))
    if existing and not cfg.overwrite:
        one = len(existing) == 1
        raise LungsegError(
            f"{' and '.join(str(p) for p in existing)} already {'exists' if one else 'exist'}. "
            f"Nothing was written. Set overwrite=true to replace {'it' if one else 'them'}, "
            f"or give another output=<file>."
        )
    check_writable(path.parent, _WRITE_FIX)
    return info_path


def _replaces_checkpoint(path: Path, fmt: str) -> LungsegError:
    return LungsegError(
        f"output is ckpt_path ({path}): the export would replace the checkpoint. Give "
        f"another file, e.g. output={path.with_name('model' + FORMATS[fmt])}."
    )


def _is_export_json(info_path: Path, model_name: str) -> bool:
    """Whether ``info_path`` is a file an earlier export wrote beside the model file
    ``model_name`` (its ``model`` names that file), which overwrite=true may replace."""
    try:
        if not info_path.is_file() or info_path.stat().st_size > 10_000_000:
            return False
        record = json.loads(info_path.read_text(encoding="utf-8"))
    except (OSError, ValueError):  # UnicodeDecodeError and JSONDecodeError are ValueErrors
        return False
    return (
        isinstance(record, dict)
        and record.get("model") == model_name
        and record.get("format") in FORMATS
        and "data_info" in record
    )


def write_checked(
    net: torch.nn.Module, shape: tuple[int, ...], path: Path, cfg: DictConfig
) -> float:
    """Write ``net`` for inputs of ``shape`` (C, H, W) to ``path`` and return the largest
    difference of its logits to PyTorch's on a batch of another size; LungsegError when the
    shapes differ or the difference is above ``cfg.tolerance`` (the caller removes ``path``)."""
    generator = torch.Generator().manual_seed(0)
    example = torch.randn(TRACE_BATCH, *shape, generator=generator)
    write_model(net, example, path, cfg.format, cfg.opset)

    images = torch.randn(CHECK_BATCH, *shape, generator=generator)
    with torch.no_grad():
        expected = net(images).numpy()
    actual = run_exported(path, cfg.format, images)
    if actual.shape != expected.shape:
        raise LungsegError(
            f"The exported model gives logits of shape {actual.shape} for a batch of "
            f"{CHECK_BATCH}, PyTorch {expected.shape}; nothing was written. The batch axis "
            f"is not free in this export: please report it with the checkpoint's config."
        )
    diff = float(np.abs(actual - expected).max())
    if not diff <= cfg.tolerance:
        raise LungsegError(
            f"The exported {cfg.format} model's logits differ from PyTorch's by up to {diff:.3g} "
            f"(tolerance {cfg.tolerance:g}); nothing was written. Try the other format, or "
            f"raise tolerance if the difference is acceptable for your use."
        )
    return diff


def check_suffix(output: str | None, fmt: str, ckpt_path: Any = None) -> None:
    """LungsegError where ``output`` ends in ``.ckpt`` (a training checkpoint's, which eval.py,
    predict.py and resuming training read: never replaced, whatever overwrite says; the
    message says so where it is ``ckpt_path`` itself), in
    another format's suffix (``m.pt`` for ONNX: a file torch.jit.load would then fail to
    read), or, for pt2, not in ``.pt2`` (which torch.export.load expects)."""
    if not output:
        return
    path = Path(output)
    suffix = FORMATS[fmt]
    if path.suffix.lower() == ".ckpt":
        if isinstance(ckpt_path, str) and path.expanduser().resolve() == (
            Path(ckpt_path).expanduser().resolve()
        ):
            raise _replaces_checkpoint(path, fmt)
        raise LungsegError(
            f"output={output} ends in {path.suffix}, the suffix of training checkpoints "
            f"(which eval.py, predict.py and resuming training read): an export never writes "
            f"one, whatever overwrite says. Nothing was written. Give "
            f"output={path.with_suffix(suffix)}, format={fmt}'s suffix."
        )
    other = next((f for f, s in FORMATS.items() if s == path.suffix and f != fmt), None)
    if other is not None:
        raise LungsegError(
            f"output={output} ends in {path.suffix}, the suffix of format={other} files, but "
            f"format={fmt}. Give output={path.with_suffix(suffix)} or format={other}."
        )
    if fmt == "pt2" and path.suffix != suffix:
        raise LungsegError(
            f"output={output}: torch.export's files end in .pt2 (torch.export.load expects "
            f"it). Give output={output}.pt2."
        )


def export(cfg: DictConfig) -> dict[str, Any]:
    """Export ``cfg.ckpt_path``'s network to ``cfg.format``, check it against PyTorch on a batch
    of another size than the traced one and write ``<model file>.json`` beside the model.
    Existing output files stop the export before anything is written, unless
    ``cfg.overwrite``; an output ending in ``.ckpt``, and a JSON path that holds anything but
    an earlier export's JSON, stop it whatever ``cfg.overwrite`` says. The model is written
    under a temporary name and takes its place only once checked, so a failed export leaves
    every file as it was. Returns the JSON's content."""
    check_top_keys(cfg, "export.py")
    check_switch_words(cfg)
    check_overwrite(cfg.overwrite)
    if cfg.format not in FORMATS:
        raise LungsegError(
            f"format={cfg.format!r}; choose format=onnx (onnxruntime and most inference "
            f"servers), format=pt2 (torch.export.load, PyTorch alone) or format=torchscript "
            f"(torch.jit.load, C++ libtorch; deprecated by torch)."
        )
    check_suffix(cfg.output, cfg.format, cfg.ckpt_path)
    require(
        is_number(cfg.tolerance, 0),
        "tolerance",
        cfg.tolerance,
        "the largest accepted difference of the exported logits to PyTorch's, 0 or more",
        "tolerance=1e-4",
    )
    if cfg.format == "onnx":
        check_onnx_packages()
    net, hparams = load_network(cfg)
    ckpt_path = Path(cfg.ckpt_path).expanduser()
    info = hparams["data_info"]
    path = Path(cfg.output or ckpt_path.with_suffix(FORMATS[cfg.format])).expanduser()
    info_path = check_outputs(path, ckpt_path, cfg)

    channels = input_channels(info["in_channels"], info.get("context_slices", 0))
    shape = (channels, *info["image_size"])
    with writing(path.parent, _WRITE_FIX):
        path.parent.mkdir(parents=True, exist_ok=True)
    # hidden, and with the model's suffix, which torch.export.load looks for
    partial = path.with_name(f".{path.stem}.partial{path.suffix}")
    try:
        diff = write_checked(net, shape, partial, cfg)
        with writing(path, _WRITE_FIX):
            partial.replace(path)
    finally:
        partial.unlink(missing_ok=True)
    log.info("%s written; max abs difference to PyTorch %.3g", path, diff)

    record = {
        "format": cfg.format,
        "model": path.name,
        "checkpoint": str(ckpt_path.resolve()),
        "architecture": hparams["net"]["_target_"],
        "input": {"name": "images", "shape": ["batch", *shape], "dtype": "float32"},
        "output": {
            "name": "logits",
            "shape": ["batch", info["num_classes"], *info["image_size"]],
            "dtype": "float32",
        },
        "max_abs_diff": diff,
        "data_info": info,
        "preprocessing": PREPROCESSING,
        "postprocessing": POSTPROCESSING,
        # what eval.py and predict.py apply to this checkpoint unless told otherwise
        "postprocess": postprocess.settings(None, hparams.get("postprocess")),
        # eval.py and predict.py average over these flips; the exported network does not
        "tta_flips": postprocess.flips(None, None, hparams.get("postprocess")),
    }
    with writing(info_path, _WRITE_FIX):
        info_path.unlink(missing_ok=True)  # a link in its place: replaced, not written through
        info_path.write_text(json.dumps(record, indent=2) + "\n")
    log.info("preprocessing and classes written to %s", info_path)
    return record
