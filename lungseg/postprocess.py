"""Post-processing of predicted probabilities into class maps: a foreground threshold, and
removal of connected components that are small or that the network is not sure of.

Small isolated blobs are the typical false positives of a segmentation network on lesion data
(a speck predicted on a slice without a nodule). ``postprocess.threshold`` makes a pixel
foreground only where the network gives foreground (all classes but background together) at
least that probability, instead of the argmax (0.5 for two classes); the pixel's class is then
the most probable foreground class. ``postprocess.min_size`` removes, per foreground class,
every 8-connected component with fewer pixels than that; the removed pixels become background.
The size is given in pixels of the network's input grid (``data.image_size``) and scaled to
each image's own resolution, so one setting means the same physical share of the image
whatever the size of the files. ``postprocess.min_confidence`` removes every component whose
most confident pixel has a foreground probability below it: a threshold with hysteresis, where
``threshold`` sets a lesion's extent and ``min_confidence`` whether the lesion is there at all
(a faint blob on a slice without a nodule goes, the rim of a sure nodule stays). All three are
best chosen on validation data (``benchmarks/crossval.py`` does, over the folds). With several
foreground classes, components are taken class by class (for ``min_confidence`` too: a rim
of class 2 around a sure core of class 1 is judged by its own peak).

``postprocess.tta_flips`` are the test-time flips a recipe chose (``[]``: none): eval.py and
predict.py average the softmax over these flipped copies unless their ``tta`` says otherwise
(``flips``).
"""

import logging
import re
from collections.abc import Callable, Sequence
from typing import Any

import cv2
import numpy as np
from omegaconf import OmegaConf

from lungseg.errors import LungsegError

log = logging.getLogger(__name__)
SIDES = re.compile(r"left|right", re.IGNORECASE)  # class names of one side of the body


def min_pixels(min_size: float, network_size: tuple[int, int], image_size: tuple[int, int]) -> int:
    """``min_size`` pixels of the network grid, in pixels of an image of ``image_size``."""
    scale = (image_size[0] * image_size[1]) / (network_size[0] * network_size[1])
    return int(round(min_size * scale))


def _remove_components(
    pred: np.ndarray, num_classes: int, select: Callable[[np.ndarray, np.ndarray], np.ndarray]
) -> np.ndarray:
    """A copy of ``pred`` (H, W class ids) in which, per foreground class, the 8-connected
    components that ``select(labels, areas)`` names (labels: cv2's component map of the class,
    0 outside it; areas: pixels per label) become background."""
    out = pred.copy()
    for c in range(1, num_classes):
        mask = (pred == c).astype(np.uint8)
        if not mask.any():
            continue
        _, labels, stats, _ = cv2.connectedComponentsWithStats(mask, connectivity=8)
        drop = select(labels, stats[:, cv2.CC_STAT_AREA])
        drop = drop[drop != 0]  # label 0 is everything that is not class c
        if drop.size:
            out[np.isin(labels, drop)] = 0
    return out


def remove_small_components(pred: np.ndarray, min_pixels: int, num_classes: int) -> np.ndarray:
    """A copy of ``pred`` (H, W class ids) without the components of fewer than ``min_pixels``
    pixels (8-connectivity), per foreground class; ``min_pixels`` <= 1 changes nothing."""
    if min_pixels <= 1:
        return pred.copy()
    return _remove_components(
        pred, num_classes, lambda _, areas: np.flatnonzero(areas < min_pixels)
    )


def remove_unsure_components(
    pred: np.ndarray, confidence: np.ndarray, min_confidence: float, num_classes: int
) -> np.ndarray:
    """A copy of ``pred`` (H, W class ids) without the components (8-connectivity, per
    foreground class) in which no pixel's ``confidence`` (H, W) reaches ``min_confidence``;
    0 changes nothing."""
    if min_confidence <= 0:
        return pred.copy()

    def unsure(labels: np.ndarray, areas: np.ndarray) -> np.ndarray:
        peak = np.zeros(len(areas))
        np.maximum.at(peak, labels, confidence)  # label 0's peak is never used
        return np.flatnonzero(peak < min_confidence)

    return _remove_components(pred, num_classes, unsure)


def settings(cfg_value: Any, checkpoint_value: Any) -> dict[str, Any]:
    """The post-processing to apply: the command's ``postprocess`` where it sets a value,
    else what the checkpoint was trained with (``postprocess`` of its training config).
    ``threshold: argmax`` asks for the most probable class whatever the checkpoint says.
    LungsegError for a value of the wrong type or out of its range."""
    chosen = dict(checkpoint_value or {})
    chosen.update({k: v for k, v in dict(cfg_value or {}).items() if v is not None})
    threshold = chosen.get("threshold")
    if threshold == "argmax":  # explicit, where null means "the checkpoint's"
        threshold = None
    if threshold is not None and not (
        isinstance(threshold, int | float) and 0 < float(threshold) < 1
    ):
        raise LungsegError(
            f"postprocess.threshold is {threshold!r}; give a foreground probability between 0 "
            "and 1 (exclusive), or argmax for the most probable class."
        )
    confidence = chosen.get("min_confidence") or 0
    if not (isinstance(confidence, int | float) and 0 <= float(confidence) < 1):
        raise LungsegError(
            f"postprocess.min_confidence is {confidence!r}; give the foreground probability "
            "in [0, 1) that a predicted component must reach somewhere to be kept (0 keeps "
            "every component)."
        )
    min_size = chosen.get("min_size") or 0
    if not (isinstance(min_size, int | float) and float(min_size) >= 0):
        raise LungsegError(
            f"postprocess.min_size is {min_size!r}; give the size in pixels (at "
            "data.image_size) under which predicted components are removed, 0 or more (0 "
            "keeps every component), e.g. postprocess.min_size=20."
        )
    return {
        "min_size": float(min_size),
        "threshold": None if threshold is None else float(threshold),
        "min_confidence": float(confidence),
    }


FLIPS = {"horizontal": (-1,), "vertical": (-2,)}  # flip name -> the tensor dims it reverses


def check_flips(flips: Any, key: str = "tta_flips") -> list[str]:
    """The test-time flips as a list; LungsegError for a value that is not a list of names in
    FLIPS (``key`` names the setting in the message)."""
    names = list(flips) if isinstance(flips, list | tuple) or OmegaConf.is_list(flips) else None
    unknown = [f for f in names if f not in FLIPS] if names is not None else None
    # a flip named twice would count twice in the average
    twice = sorted({f for f in names if names.count(f) > 1}) if names is not None else None
    if names is None or unknown or twice:
        held = (
            f"holds {unknown}"
            if unknown
            else f"names {', '.join(twice)} twice"
            if twice
            else "is not a list"
        )
        raise LungsegError(
            f"{key} {flips!r} {held}; give a list of the test-time flips "
            f"{', '.join(FLIPS)} ([] for none), e.g. {key}=[horizontal,vertical]."
        )
    return names


def flips(tta: Any, tta_flips: Any, checkpoint_value: Any) -> list[str]:
    """The test-time flips of eval.py and predict.py: ``tta`` true: ``tta_flips``; false: none;
    null: the checkpoint's ``postprocess.tta_flips`` (the recipe's choice; none for a
    checkpoint trained without the setting). LungsegError for a bad value."""
    if tta is None:
        chosen = dict(checkpoint_value or {}).get("tta_flips") or []
        if isinstance(chosen, list | tuple) and len(set(chosen)) < len(chosen):
            # trained before a flip named twice was refused: each counts once
            log.warning("the checkpoint's tta_flips %s name a flip twice: used once", chosen)
            chosen = list(dict.fromkeys(chosen))
        return check_flips(chosen, "postprocess.tta_flips")
    if not isinstance(tta, bool):
        raise LungsegError(
            f"tta is {tta!r}; give true (average over the flips of tta_flips), false (no "
            "test-time flips) or null (the checkpoint's postprocess.tta_flips)."
        )
    return check_flips(tta_flips) if tta else []


def warn_sided_flips(flips: Sequence[str], class_names: Sequence[str]) -> None:
    """A warning when test-time flips include the horizontal one while classes are named for
    a side of the body: the flipped copy predicts each side under the other's label, and the
    average mixes the two."""
    sided = [name for name in class_names if SIDES.search(name)]
    if "horizontal" in flips and sided:
        log.warning(
            "The test-time flips include horizontal, but the classes %s name a side of the "
            "body: the flipped copy predicts each side under the other's label, and the "
            "average mixes them. Give tta=false, or tta=true tta_flips=[vertical].",
            sided,
        )


def active(chosen: dict[str, Any]) -> bool:
    """Whether ``chosen`` (``settings``) changes anything against the plain argmax."""
    return (
        bool(chosen.get("min_size"))
        or bool(chosen.get("min_confidence"))
        or chosen.get("threshold") is not None
    )


def describe(chosen: dict[str, Any]) -> str:
    """``chosen`` (``settings``) in words, for the log."""
    threshold = chosen.get("threshold")
    words = f"foreground {'argmax' if threshold is None else f'>= {threshold:g}'}"
    if chosen.get("min_confidence"):
        words += f", components peaking under {chosen['min_confidence']:g} removed"
    if chosen.get("min_size"):
        words += f", components under {chosen['min_size']:g} px removed"
    return words


def classes(prob: np.ndarray, chosen: dict[str, Any], data_info: dict[str, Any]) -> np.ndarray:
    """The class map (H, W) of ``prob`` (C, H, W softmax probabilities at the image's
    resolution) post-processed as ``chosen`` says (``settings``), for a checkpoint whose network
    input size is ``data_info["image_size"]``."""
    threshold = chosen.get("threshold")
    if threshold is None:
        pred = prob.argmax(axis=0)
    else:
        foreground = prob[1:].argmax(axis=0) + 1
        pred = np.where(1 - prob[0] >= threshold, foreground, 0)
    if chosen.get("min_confidence"):
        num_classes = int(data_info["num_classes"])
        pred = remove_unsure_components(pred, 1 - prob[0], chosen["min_confidence"], num_classes)
    return apply(pred, chosen, data_info)


def apply(pred: np.ndarray, chosen: dict[str, Any], data_info: dict[str, Any]) -> np.ndarray:
    """``pred`` (H, W class ids at the image's resolution) with the components under
    ``chosen["min_size"]`` removed (``settings``; the threshold needs the probabilities:
    ``classes``)."""
    if not chosen.get("min_size"):
        return pred
    threshold = min_pixels(chosen["min_size"], tuple(data_info["image_size"]), pred.shape[:2])
    return remove_small_components(pred, threshold, int(data_info["num_classes"]))
