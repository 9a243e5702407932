"""Predict a folder of images: a mask and an overlay per image, at the image's own size.

For input ``<name>.<ext>`` the outputs are ``<stem>.png`` (with ``recursive``, below the
input's sub-folders; for an input_dir pattern such as ``scans/*/images``, below the names its
wildcards matched), the mask in the encoding the model was trained on (index: class ids;
binary: 0/255; palette: the training colours), and ``<stem>_overlay.png``, the image with the
classes blended in colour. ``<stem>`` is the input's stem with characters that could leave the
output folder (path separators, control and Windows-reserved characters) replaced by "_" and
leading dots dropped.
"""

import logging
import re
from pathlib import Path
from typing import Any

import numpy as np
from omegaconf import DictConfig
from tqdm import tqdm

from lungseg import hostmem, postprocess
from lungseg.checks import (
    check_overwrite,
    check_switch_words,
    check_top_keys,
    is_number,
    is_whole,
    require,
)
from lungseg.data.folders import (
    IMAGE_EXTENSIONS,
    OUTPUT_MARKER,
    _list_images,
    _listing,
    _shown,
    _walk,
    check_output_folder,
    check_writable,
    is_pattern,
    one_unread_warning,
    pattern_folders,
    suffix_list,
    write_image,
    writing,
)
from lungseg.data.folders import existing as taken
from lungseg.data.masks import default_colors, encode_mask
from lungseg.data.transforms import scale_intensity
from lungseg.errors import LungsegError, counted
from lungseg.inference import (
    InputCheck,
    batches,
    centre_slice,
    load_from_config,
    neighbour_table,
    predict_probabilities,
    read_usable,
    report_skipped,
)
from lungseg.visualize import overlay

_UNSAFE = re.compile(r'[\x00-\x1f\x7f/\\:*?"<>|]')
_WRITE_FIX = "Choose an output_dir you can write to, on a disk with room."
log = logging.getLogger(__name__)


def output_stem(stem: str) -> str:
    """A file stem that names a file directly inside the output folder on any OS."""
    return _UNSAFE.sub("_", stem).lstrip(". ") or "_"


def output_paths(
    images: list[Path], output_dir: Path, input_dir: Path | None = None, overlays: bool = True
) -> dict[Path, tuple[Path, ...]]:
    """image → (mask path, overlay path), or (mask path,) without ``overlays``, in output_dir,
    below the same sub-folders as the image below ``input_dir`` (directly in output_dir
    without it, or for an image directly in input_dir); LungsegError when two images would
    write the same file (compared without letter case, as macOS and Windows do)."""
    if input_dir is None:
        placed = {image: ((), image.name) for image in images}
    else:
        placed = {
            image: (image.parent.relative_to(input_dir).parts, _shown(image, input_dir))
            for image in images
        }
    return _placed_outputs(placed, output_dir, overlays)


def _placed_outputs(
    placed: dict[Path, tuple[tuple[str, ...], str]], output_dir: Path, overlays: bool
) -> dict[Path, tuple[Path, ...]]:
    """output_paths for images placed in output_dir's sub-folders: image → (the folder names
    below output_dir, the image as messages name it)."""
    outputs, claimed, clashes = {}, {}, []
    for image, (below, shown) in placed.items():
        folder = output_dir.joinpath(*(output_stem(part) for part in below))
        stem = output_stem(image.stem)
        paths = (folder / f"{stem}.png", folder / f"{stem}_overlay.png")[: 2 if overlays else 1]
        for path in paths:
            assert path.parent == folder and folder.is_relative_to(output_dir), path
            name = path.relative_to(output_dir).as_posix()
            other = claimed.setdefault(name.casefold(), shown)
            if other != shown:
                clashes.append(f"{other} and {shown} → {name}")
        outputs[image] = paths
    if clashes:
        raise LungsegError(
            f"{counted(len(clashes), 'output file')} would be written twice: "
            f"{_listing(clashes)}. Each image writes <stem>.png"
            f"{' and <stem>_overlay.png' if overlays else ''}; rename the inputs so that no "
            f"two of them map to the same names."
        )
    return outputs


def _pattern_outputs(
    pattern: Path, output_dir: Path, recursive: bool, overlays: bool
) -> tuple[dict[Path, tuple[Path, ...]], list[Path]]:
    """output_paths for an input_dir pattern (`scans/*/images`): the images of every folder
    it matches, each written below the names the wildcards matched (`<output_dir>/p01/`, then
    the image's sub-folders with ``recursive``); and the matched folders read. Matched
    folders that predict.py wrote (an earlier run's output_dir that the pattern also matches)
    are left out."""
    found, _ = pattern_folders(pattern, [], setting="input_dir")
    folders = [(prefix, f) for prefix, f, _ in found if not (f / OUTPUT_MARKER).exists()]
    if len(folders) < len(found):
        log.info(
            "Leaving out %d folders that input_dir %s matches: they hold predict.py's outputs",
            len(found) - len(folders),
            pattern,
        )
    if not folders:
        raise LungsegError(
            f"Every folder that input_dir {pattern} matches holds predict.py's outputs (a "
            f"hidden {OUTPUT_MARKER} file). Point input_dir at the folders of your images."
        )
    with one_unread_warning(pattern):
        placed = _place_pattern_images(folders, output_dir, pattern, recursive)
    return _placed_outputs(placed, output_dir, overlays), [folder for _, folder in folders]


def _place_pattern_images(
    folders: list[tuple[str, Path]], output_dir: Path, pattern: Path, recursive: bool
) -> dict[Path, tuple[tuple[str, ...], str]]:
    """_pattern_outputs' images: each placed below the names its folder's wildcards matched."""
    placed = {}
    for prefix, folder in folders:
        if folder.resolve() == output_dir.resolve():
            raise LungsegError(
                f"output_dir {output_dir} is one of the folders that input_dir {pattern} "
                f"matches: the masks <stem>.png would replace its images. Choose another "
                f"output_dir."
            )
        if recursive:
            _check_new_inside(output_dir, folder, pattern)
        for image in _list_images(folder, "input", "input_dir", recursive, [output_dir]):
            below = image.parent.relative_to(folder).parts
            placed[image] = ((*prefix.split("/"), *below), f"{prefix}/{_shown(image, folder)}")
    return placed


def _check_outside_inputs(
    outputs: dict[Path, tuple[Path, ...]],
    read: list[Path],
    output_dir: Path,
    recursive: bool,
    input_dir: Path,
) -> None:
    """LungsegError when an output would land in a folder that input_dir reads images from:
    one of the folders ``read`` or, with ``recursive``, a folder below one (unless output_dir
    itself lies below it: the search leaves output_dir out). The outputs would mix with the
    user's images, and a later run would read them as inputs. (Such an output_dir was
    checked by _check_new_inside before the folders were listed.)"""
    out = output_dir.resolve()
    searched = [
        root
        for root in (folder.resolve() for folder in read)
        if not (recursive and out != root and out.is_relative_to(root))
    ]
    folders = {path.parent.resolve(): path.parent for paths in outputs.values() for path in paths}
    inside = sorted(
        str(shown)
        for real, shown in folders.items()
        if any(real == root or (recursive and real.is_relative_to(root)) for root in searched)
    )
    if inside:
        raise LungsegError(
            f"output_dir {output_dir} would put masks and overlays into "
            f"{counted(len(inside), 'folder')} that input_dir {input_dir} reads images "
            f"from: {_listing(inside)}. They would mix with your images, and the next run "
            f"would read them as images. Nothing was written. Choose an output_dir outside "
            f"these folders, e.g. a new folder beside {output_dir}."
        )


def _check_new_inside(output_dir: Path, folder: Path, input_dir: Path) -> None:
    """LungsegError when output_dir lies below ``folder``, which input_dir reads with
    recursive=true, and holds image files that the search would read without it (in it or
    its sub-folders). The search leaves output_dir out, so they would not be predicted, and
    the OUTPUT_MARKER written into output_dir would hide them from later recursive searches,
    training's included. A new output_dir, an earlier output folder (it holds the marker),
    one without image files, or one inside a hidden or output folder (which the search
    passes over anyway) is accepted. Called before ``folder`` is listed, so that the message
    is this one even where output_dir holds all its images."""
    out, root = output_dir.resolve(), folder.resolve()
    if out == root or not out.is_relative_to(root) or not out.is_dir():
        return
    for part in (out, *out.parents):
        if part == root:
            break
        if part.name.startswith(".") or (part / OUTPUT_MARKER).exists():
            return
    held = sum(
        1
        for p in _walk(out, [])
        if p.suffix.lower() in IMAGE_EXTENSIONS and not p.name.startswith(".") and p.is_file()
    )
    if held:
        where = (
            f"input_dir {input_dir}"
            if folder == input_dir
            else f"{folder}, a folder that input_dir {input_dir} matches,"
        )
        they, them = ("it", "it") if held == 1 else ("they", "them")
        raise LungsegError(
            f"output_dir {output_dir} is a folder inside {where} read with recursive=true, "
            f"and it holds {counted(held, 'image file')} (in it or its sub-folders). The "
            f"search leaves output_dir out, so {they} would not be predicted, and the hidden "
            f"{OUTPUT_MARKER} file that marks it as an output folder would hide {them} from "
            f"later recursive=true runs, training included. Nothing was written. Choose an "
            f"output_dir outside input_dir, e.g. a new folder beside {folder}, or a new "
            f"folder inside it."
        )


def predict(cfg: DictConfig) -> list[Path]:
    """Write a mask and an overlay for every image in ``cfg.input_dir`` (or for the one image
    it names) into
    ``cfg.output_dir`` (conf/predict.yaml). Existing output files stop the run before anything
    is written, unless ``cfg.overwrite``. Returns the files written."""
    check_top_keys(cfg, "predict.py")
    check_switch_words(cfg)
    hostmem.configure(cfg.get("retain_freed_memory", True))
    outputs = _plan_outputs(cfg)
    model = load_from_config(cfg)
    info = model.hparams.data_info
    colors = np.array(info["palette"] or default_colors(info["num_classes"]), np.uint8)
    flips = postprocess.flips(cfg.tta, cfg.tta_flips, model.hparams.get("postprocess"))
    if flips:
        log.info("test-time flips: %s (tta=false for none)", ", ".join(flips))
    postprocess.warn_sided_flips(flips, model.hparams.data_info["class_names"])
    post = postprocess.settings(cfg.get("postprocess"), model.hparams.get("postprocess"))
    table = neighbour_table(list(outputs), info)  # 2.5-D models: each image's neighbours
    output_dir = Path(cfg.output_dir).expanduser()  # created by the first write
    written: list[Path] = []
    done = 0  # images whose outputs are written
    failed: list[tuple[Path, str]] = []  # strict=false: images that cannot be read
    checks = InputCheck(info)
    with tqdm(total=len(outputs), unit="image", disable=not cfg.progress_bar) as bar:
        for batch in batches(list(outputs), cfg.batch_size):
            try:
                kept, inputs, unread = read_usable(batch, table, cfg.strict)
            except LungsegError as err:
                if not written:
                    raise
                raise LungsegError(
                    f"{err} The outputs of the {done} images before it are in "
                    f"{output_dir}; rerun with overwrite=true once the file is fixed, or with "
                    f"strict=false to skip the images that cannot be read."
                ) from None
            failed += unread
            for i, item in zip(kept, inputs, strict=True):
                checks.see(batch[i], item)
            probs = predict_probabilities(model, inputs, flips) if inputs else []
            for path, item, prob in zip([batch[i] for i in kept], inputs, probs, strict=True):
                raw = centre_slice(item)  # 2.5-D input: the image itself
                pred = postprocess.classes(prob, post, info)
                mask_path, *overlay_paths = outputs[path]  # none with overlays=false
                if not written:  # a later recursive=true search must not read these
                    with writing(output_dir / OUTPUT_MARKER, _WRITE_FIX):
                        output_dir.mkdir(parents=True, exist_ok=True)
                        (output_dir / OUTPUT_MARKER).touch()
                _write(mask_path, encode_mask(pred, info["mask_mode"], info["palette"]))
                written.append(mask_path)
                for overlay_path in overlay_paths:
                    display = scale_intensity(raw, info["window"], info["intensity_offset"])
                    _write(overlay_path, overlay(display, pred, colors, cfg.overlay_alpha))
                    written.append(overlay_path)
                done += 1
            bar.update(len(batch))
    if failed and not written:  # strict=false, and every image left out
        n, first = len(failed), failed[0][1]
        what = (
            f"The one image of input_dir {cfg.input_dir} cannot be read: "
            if n == 1
            else f"None of the {n} images of input_dir {cfg.input_dir} can be read, e.g. "
        )
        raise LungsegError(
            f"{what}{first} Nothing was written: strict=false leaves out the images that "
            f"cannot be read, and here that is every one. Point input_dir at your images, "
            f"or fix or convert the files."
        )
    report_skipped(failed, ("image that cannot be read is", "images that cannot be read are"))
    checks.report()
    log.info(
        "%s%s written to %s",
        counted(done, "mask"),
        "" if len(written) == done else " and its overlay" if done == 1 else " and their overlays",
        output_dir,
    )
    return written


def _plan_outputs(cfg: DictConfig) -> dict[Path, tuple[Path, ...]]:
    """output_paths for the images of cfg.input_dir, after checking the settings, that no
    output lands in a folder input_dir reads, that no output file exists (unless
    cfg.overwrite) and that output_dir can be written: these LungsegErrors come before any
    write (and the output folder is made by the first write)."""
    for key in ("input_dir", "output_dir"):
        if cfg.get(key) is None:
            raise LungsegError(
                f"{key} is not set. Usage: python predict.py ckpt_path=<checkpoint> "
                f"input_dir=<folder of images> output_dir=<folder for the masks>"
            )
    require(
        is_whole(cfg.batch_size, 1),
        "batch_size",
        cfg.batch_size,
        "a whole number of images per batch, 1 or more",
        "batch_size=8",
    )
    _switch(cfg, "strict", True, "true or false", "strict=false")
    require(
        is_number(cfg.overlay_alpha, 0, 1),
        "overlay_alpha",
        cfg.overlay_alpha,
        "the opacity of the class colours in the overlays, from 0 to 1",
        "overlay_alpha=0.5",
    )
    postprocess.flips(cfg.tta, cfg.tta_flips, None)  # the checkpoint's are checked once loaded
    input_dir, output_dir = Path(cfg.input_dir).expanduser(), Path(cfg.output_dir).expanduser()
    recursive = _switch(
        cfg, "recursive", False, "true (also the images in input_dir's sub-folders) or false"
    )
    check_overwrite(cfg.overwrite)
    overlays = _switch(
        cfg, "overlays", True, "true (<stem>_overlay.png beside each mask) or false (masks alone)"
    )
    check_output_folder(output_dir)
    if is_pattern(input_dir):
        outputs, read = _pattern_outputs(input_dir, output_dir, recursive, overlays)
        images = list(outputs)
    elif input_dir.is_file():  # one image: its outputs directly in output_dir
        if input_dir.suffix.lower() not in IMAGE_EXTENSIONS:
            raise LungsegError(
                f"input_dir {input_dir} is a file but not an image lungseg reads. Accepted "
                f"extensions: {', '.join(IMAGE_EXTENSIONS)} (in any letter case). Point "
                f"input_dir at an image, or at the folder of your images."
            )
        read, images = [input_dir.parent], [input_dir]
        outputs = output_paths(images, output_dir, overlays=overlays)
    else:
        read = [input_dir]
        if recursive:
            _check_new_inside(output_dir, input_dir, input_dir)
        images = _list_images(input_dir, "input", "input_dir", recursive, [output_dir])
        if output_dir.resolve() == input_dir.resolve():
            raise LungsegError(
                f"output_dir is input_dir ({input_dir}): the masks <stem>.png would replace "
                f"the input images. Choose another output_dir."
            )
        outputs = output_paths(images, output_dir, input_dir if recursive else None, overlays)
    if not input_dir.is_file():  # an image named by itself is predicted whatever its name
        suffixes = cfg.get("mask_suffixes", ["_mask"])
        images, masks = _without_masks(images, suffixes)
        if masks:
            log.info(
                "%s left out: the masks of images beside them (e.g. %s for %s, by "
                "mask_suffixes=%s; mask_suffixes=[] to predict them too)",
                counted(len(masks), "file"),
                masks[0][0].name,
                masks[0][1].name,
                list(suffixes),
            )
            outputs = {image: outputs[image] for image in images}
    inputs = {image.resolve() for image in images}
    clobbered = [p for ps in outputs.values() for p in ps if p.resolve() in inputs]
    if clobbered:
        raise LungsegError(
            f"{counted(len(clobbered), 'output file')} would replace input images: "
            f"{_listing(str(p) for p in clobbered)}. Nothing was written. Choose an "
            f"output_dir outside input_dir's tree."
        )
    _check_outside_inputs(outputs, read, output_dir, recursive, input_dir)
    _check_not_users_images(output_dir)
    existing = taken(p for ps in outputs.values() for p in ps)
    if existing and not cfg.overwrite:
        raise LungsegError(
            f"{counted(len(existing), 'output file')} already "
            f"{'exists' if len(existing) == 1 else 'exist'} in {output_dir}: "
            f"{_listing(p.relative_to(output_dir).as_posix() for p in existing)}. Nothing was "
            f"written. Set overwrite=true to replace them, or choose another output_dir."
        )
    check_writable(output_dir, _WRITE_FIX)
    return outputs


def _switch(cfg: DictConfig, key: str, default: bool, wanted: str, example: str = "") -> bool:
    """``cfg``'s on/off setting ``key`` (``default`` where the config lacks it), checked."""
    value = cfg.get(key, default)
    require(
        isinstance(value, bool), key, value, wanted, example or f"{key}={str(not default).lower()}"
    )
    return value


def _without_masks(images: list[Path], suffixes: Any) -> tuple[list[Path], list[tuple[Path, Path]]]:
    """``images`` without the masks kept beside them (``a_mask.png`` in the folder of
    ``a.png``, as training pairs them with data.image_dir and data.mask_dir the same folder):
    predicted, they would be written as ``a_mask.png``, named like the ground truth. A file
    is left out only where its image is there too. Returns the images kept and (mask, its
    image) for each left out."""
    suffixes = [s for s in suffix_list(suffixes) if s]
    by_folder: dict[Path, dict[str, Path]] = {}
    for image in images:
        by_folder.setdefault(image.parent, {}).setdefault(image.stem, image)
    kept, masks = [], []
    for image in images:
        stems = by_folder[image.parent]
        owner = next(
            (
                stems[image.stem[: -len(s)]]
                for s in suffixes
                if image.stem.endswith(s) and image.stem[: -len(s)] in stems
            ),
            None,
        )
        if owner is None:
            kept.append(image)
        else:
            masks.append((image, owner))
    return kept, masks


def _check_not_users_images(output_dir: Path) -> None:
    """LungsegError where output_dir is an existing folder of the user's images, not one that
    predict.py made (it holds the OUTPUT_MARKER): the masks and overlays would mix with them
    (a training image folder would then hold images without masks), and overwrite=true would
    replace images of the same names. Checked whatever overwrite says."""
    if not output_dir.is_dir() or (output_dir / OUTPUT_MARKER).exists():
        return
    held = [
        p
        for p in output_dir.iterdir()
        if p.suffix.lower() in IMAGE_EXTENSIONS and not p.name.startswith(".") and p.is_file()
    ]
    if held:
        raise LungsegError(
            f"output_dir {output_dir} holds {counted(len(held), 'image file')} that predict.py "
            f"did not write (e.g. {held[0].name}): the masks and overlays would mix with them, "
            f"and overwrite=true would replace those of the same names. Nothing was written. "
            f"Choose a new output_dir, or an earlier output folder of predict.py."
        )


def _write(path: Path, pixels: np.ndarray) -> None:
    with writing(path, _WRITE_FIX):
        # A link in place of an output file would redirect the write; replace the link itself.
        if path.is_symlink():
            path.unlink()
        path.parent.mkdir(parents=True, exist_ok=True)
        write_image(path, pixels)
