"""bias_clicks: Gaussian click maps on the log-probabilities (the app's training-free click correction)."""

from __future__ import annotations

import numpy as np
import pytest

from guidino_monai.interactive import bias_clicks


def two_class(p_fg: np.ndarray) -> np.ndarray:
    return np.stack([1 - p_fg, p_fg]).astype(np.float32)


def test_foreground_click_on_a_sure_miss_adds_its_voxel_and_hesitant_neighbours_only():
    p = np.full((30, 30), 0.001)  # the network is sure of background ...
    p[15, 18:23] = 0.3  # ... except a hesitant strip right of the click
    probs = two_class(p)
    before = probs.copy()
    out = bias_clicks(probs, foreground=[[15, 15]], label=1, sigma=3.0, strength=4.0, margin=2.0)
    pred = out.argmax(0)
    assert pred[15, 15] == 1  # log(0.999 / 0.001) ~ 6.9 > strength: the height was raised for the clicked voxel
    assert pred[15, 18] == 1  # 3 voxels away, hesitant: the click map decides
    assert pred[12, 15] == 0  # 3 voxels away, sure background: not enough for it
    assert not pred[:, :8].any() and not pred[:, 25:].any()  # nothing far from the click
    assert np.allclose(out.sum(0), 1.0, atol=1e-5)
    assert np.array_equal(probs, before)  # the input is not modified


def test_background_click_removes_its_voxel_and_background_on_background_is_a_no_op():
    p = np.full((20, 20, 20), 0.999)
    probs = two_class(p)
    out = bias_clicks(probs, background=[[10, 10, 10]], sigma=2.0)
    assert out.argmax(0)[10, 10, 10] == 0 and out.argmax(0)[0, 0, 0] == 1
    empty = two_class(np.full((8, 8, 8), 0.01))
    assert np.allclose(bias_clicks(empty, background=[[4, 4, 4]]), empty, atol=1e-6)


def test_nothing_changes_beyond_three_sigma_even_where_the_network_hesitates():
    probs = two_class(np.full((41, 41, 41), 0.4999))  # near-uniform: any bias at all flips a voxel
    out = bias_clicks(probs, foreground=[[20, 20, 20]], sigma=2.0, spacing=[1.0, 1.0, 1.0])
    d = np.sqrt(((np.indices(probs.shape[1:]) - 20) ** 2).sum(0))
    changed = out.argmax(0) != probs.argmax(0)
    assert changed[d <= 5].all()  # hesitant voxels near the click follow it
    assert not changed[d > 6.0 + 1e-6].any()  # 3 sigma: the corners of the bounding box stay as they were


def test_three_classes_class_from_label_or_most_probable_foreground():
    probs = np.zeros((3, 16, 16), np.float32)
    probs[0], probs[1], probs[2] = 0.9, 0.04, 0.06
    assert bias_clicks(probs, foreground=[[8, 8]]).argmax(0)[8, 8] == 2  # no label: the likelier foreground class
    assert bias_clicks(probs, foreground=[[8, 8]], label=1).argmax(0)[8, 8] == 1


def test_order_of_clicks_does_not_matter_and_sigma_is_in_mm():
    rng = np.random.default_rng(0)
    p = rng.uniform(0.05, 0.95, (24, 24, 24))
    probs = two_class(p)
    fg, bg = [[5, 5, 5], [12, 12, 12]], [[18, 6, 9]]
    a = bias_clicks(probs, fg, bg, label=1)
    b = bias_clicks(probs, fg[::-1], bg, label=1)
    assert np.allclose(a, b, atol=1e-6)
    flat = two_class(np.full((40, 40), 0.3))
    iso = bias_clicks(flat, foreground=[[20, 20]], sigma=4.0).argmax(0)
    aniso = bias_clicks(flat, foreground=[[20, 20]], sigma=4.0, spacing=[2.0, 1.0]).argmax(0)
    assert iso[20].sum() == aniso[20].sum()  # along the 1 mm axis the same reach
    assert aniso[:, 20].sum() < iso[:, 20].sum()  # along the 2 mm axis half as many voxels


def test_bad_arguments_are_named():
    probs = two_class(np.full((8, 8), 0.5))
    with pytest.raises(ValueError, match="label 3"):
        bias_clicks(probs, foreground=[[1, 1]], label=3)
    with pytest.raises(ValueError, match="3 coordinates for a 2D"):
        bias_clicks(probs, foreground=[[1, 1, 1]])
    with pytest.raises(ValueError, match="sigma"):
        bias_clicks(probs, foreground=[[1, 1]], sigma=0)
    with pytest.raises(ValueError, match=r"\(C, \*spatial\)"):
        bias_clicks(np.zeros((2, 8), np.float32))
