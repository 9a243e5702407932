import numpy as np
import pytest

from lungseg.errors import LungsegError
from lungseg.postprocess import (
    active,
    apply,
    classes,
    min_pixels,
    remove_small_components,
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
    assert settings({"min_size": None}, {"min_size": 8}) == {"min_size": 8.0, "threshold": None}
    assert settings({"min_size": 0}, {"min_size": 8})["min_size"] == 0.0
    assert settings(None, None) == {"min_size": 0.0, "threshold": None}
    assert not active(settings(None, None))
    assert settings({"threshold": None}, {"threshold": 0.7})["threshold"] == 0.7
    assert settings({"threshold": 0.3}, {"threshold": 0.7})["threshold"] == 0.3
    assert active(settings(None, {"threshold": 0.7}))
    assert settings({"threshold": "argmax"}, {"threshold": 0.7})["threshold"] is None
    for bad in (1.5, 0, "high"):
        with pytest.raises(LungsegError, match=f"postprocess.threshold is {bad!r}"):
            settings({"threshold": bad}, None)


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
