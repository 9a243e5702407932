import numpy as np

from lungseg.postprocess import apply, min_pixels, remove_small_components, settings


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
    assert settings({"min_size": None}, {"min_size": 8}) == {"min_size": 8.0}
    assert settings({"min_size": 0}, {"min_size": 8}) == {"min_size": 0.0}
    assert settings(None, None) == {"min_size": 0.0}
