import numpy as np
import pytest

from lungseg.errors import LungsegError
from lungseg.postprocess import (
    active,
    apply,
    classes,
    describe,
    flips,
    min_pixels,
    remove_small_components,
    remove_unsure_components,
    settings,
)


def test_small_components_of_each_class_are_removed_large_ones_kept():
    pred = np.zeros((20, 20), np.int64)
    pred[2:8, 2:8] = 1  # 36 px: kept
    pred[15, 15] = 1  # 1 px: removed
    pred[10:12, 0:2] = 2  # 4 px of class 2: removed at min 5
    pred[0:3, 17:20] = 2  # 9 px: kept
    pred[18, 0] = pred[19, 1] = 1  # diagonal neighbours: one 2-px component (8-connectivity)
    out = remove_small_components(pred, 5, 3)
    assert out[15, 15] == 0 and (out[10:12, 0:2] == 0).all() and out[18, 0] == 0
    assert (out[2:8, 2:8] == 1).all() and (out[0:3, 17:20] == 2).all()
    assert (remove_small_components(pred, 2, 3)[18:, :2] == pred[18:, :2]).all()
    assert (remove_small_components(pred, 0, 3) == pred).all()
    assert pred[15, 15] == 1  # the input is not changed


def test_size_is_given_at_the_network_grid_and_scaled_to_the_image():
    assert min_pixels(10, (128, 128), (512, 512)) == 160
    assert min_pixels(10, (128, 128), (64, 64)) == 2
    pred = np.zeros((256, 256), np.int64)
    pred[0:3, 0:3] = 1  # 9 px at 256 px = 2.25 px at the 128-px network grid
    info = {"image_size": [128, 128], "num_classes": 2}
    assert apply(pred, {"min_size": 2}, info)[0, 0] == 1
    assert apply(pred, {"min_size": 3}, info)[0, 0] == 0


def test_command_setting_overrides_the_checkpoint_and_null_keeps_it():
    assert settings({"min_size": None}, {"min_size": 8}) == {
        "min_size": 8.0,
        "threshold": None,
        "min_confidence": 0.0,
    }
    assert settings({"min_size": 0}, {"min_size": 8})["min_size"] == 0.0
    assert settings(None, None) == {"min_size": 0.0, "threshold": None, "min_confidence": 0.0}
    assert not active(settings(None, None))
    assert settings({"threshold": None}, {"threshold": 0.7})["threshold"] == 0.7
    assert settings({"threshold": 0.3}, {"threshold": 0.7})["threshold"] == 0.3
    assert active(settings(None, {"threshold": 0.7}))
    assert settings({"threshold": "argmax"}, {"threshold": 0.7})["threshold"] is None
    for bad in (1.5, 0, "high"):
        with pytest.raises(LungsegError, match=f"postprocess.threshold is {bad!r}"):
            settings({"threshold": bad}, None)


def test_negative_or_non_numeric_min_size_is_refused():
    # Accepted in silence before (summary.json recorded min_size -5), from the command line
    # or from the checkpoint's training config.
    for bad in (-5, "abc", float("nan")):
        with pytest.raises(LungsegError, match=f"postprocess.min_size is {bad!r}; give the size"):
            settings({"min_size": bad}, None)
    with pytest.raises(LungsegError, match="postprocess.min_size is -5"):
        settings(None, {"min_size": -5})
    assert settings({"min_size": 12}, {"min_size": -5})["min_size"] == 12.0


def test_threshold_is_on_the_summed_foreground_probability():
    info = {"image_size": [2, 2], "num_classes": 3}
    prob = np.zeros((3, 2, 2))
    prob[:, 0, 0] = [0.4, 0.35, 0.25]  # argmax: background; foreground 0.6 in all
    prob[:, 0, 1] = [0.2, 0.3, 0.5]  # foreground 0.8, class 2 most probable
    prob[:, 1, 0] = [0.9, 0.05, 0.05]
    prob[:, 1, 1] = [0.3, 0.6, 0.1]  # foreground 0.7
    assert (classes(prob, settings(None, None), info) == [[0, 2], [0, 1]]).all()
    assert (classes(prob, settings({"threshold": 0.5}, None), info) == [[1, 2], [0, 1]]).all()
    assert (classes(prob, settings({"threshold": 0.75}, None), info) == [[0, 2], [0, 0]]).all()


def test_components_whose_peak_confidence_is_low_are_removed_whole():
    pred = np.zeros((12, 12), np.int64)
    confidence = np.zeros((12, 12))
    pred[1:5, 1:5] = 1  # a sure blob with an unsure rim: kept whole
    confidence[1:5, 1:5] = 0.6
    confidence[2, 2] = 0.97
    pred[8:11, 8:11] = 1  # a faint blob: removed
    confidence[8:11, 8:11] = 0.8
    pred[8:10, 0:2] = 2  # class 2, sure: kept
    confidence[8:10, 0:2] = 0.99
    out = remove_unsure_components(pred, confidence, 0.95, 3)
    assert (out[1:5, 1:5] == 1).all() and (out[8:11, 8:11] == 0).all()
    assert (out[8:10, 0:2] == 2).all()
    assert (remove_unsure_components(pred, confidence, 0.0, 3) == pred).all()
    assert (remove_unsure_components(pred, confidence, 0.8, 3) == pred).all()  # peak == bar
    assert pred[9, 9] == 1  # the input is not changed


def test_min_confidence_gates_components_on_the_foreground_probability():
    info = {"image_size": [6, 6], "num_classes": 2}
    prob = np.zeros((2, 6, 6))
    prob[1] = 0.1
    prob[1, 0:2, 0:2] = 0.7  # above the argmax, peak 0.7: goes at min_confidence 0.9
    prob[1, 3:6, 3:6] = 0.6
    prob[1, 4, 4] = 0.95  # peak 0.95: the whole component stays
    prob[0] = 1 - prob[1]
    chosen = settings({"min_confidence": 0.9}, None)
    assert active(chosen) and "peaking under 0.9" in describe(chosen)
    pred = classes(prob, chosen, info)
    assert (pred[0:2, 0:2] == 0).all() and (pred[3:6, 3:6] == 1).all()
    assert (classes(prob, settings(None, None), info)[0:2, 0:2] == 1).all()
    # with a threshold, the extent follows it and the gate still looks at the peak
    pred = classes(prob, settings({"min_confidence": 0.9, "threshold": 0.65}, None), info)
    assert pred.sum() == 1 and pred[4, 4] == 1
    for bad in (1, -0.1, "sure"):
        with pytest.raises(LungsegError, match=f"postprocess.min_confidence is {bad!r}"):
            settings({"min_confidence": bad}, None)
    assert settings({"min_confidence": None}, {"min_confidence": 0.9})["min_confidence"] == 0.9


def test_test_time_flips_are_the_checkpoints_unless_the_command_says_otherwise():
    recipe = {"min_size": 4, "tta_flips": ["horizontal", "vertical"]}
    assert flips(None, ["horizontal"], recipe) == ["horizontal", "vertical"]  # tta=null
    assert flips(None, ["horizontal"], {"min_size": 4}) == []  # trained before the setting
    assert flips(None, ["horizontal"], None) == []
    # a checkpoint trained before a flip named twice was refused: each once
    assert flips(None, None, {"tta_flips": ["vertical", "vertical"]}) == ["vertical"]
    assert flips(True, ["vertical"], recipe) == ["vertical"]
    assert flips(True, [], recipe) == []
    assert flips(False, ["horizontal"], recipe) == []
    for tta, tta_flips, checkpoint, message in [
        ("yes", ["horizontal"], None, "tta is 'yes'; give true"),
        (True, ["diagonal"], None, r"tta_flips \['diagonal'\] holds \['diagonal'\]"),
        (True, "horizontal", None, "tta_flips 'horizontal' is not a list"),
        # twice would weigh it double in the average
        (True, ["vertical", "vertical"], None, r"tta_flips \['vertical', 'vertical'\] names "),
        (None, None, {"tta_flips": ["up"]}, r"postprocess.tta_flips \['up'\] holds"),
    ]:
        with pytest.raises(LungsegError, match=message):
            flips(tta, tta_flips, checkpoint)
