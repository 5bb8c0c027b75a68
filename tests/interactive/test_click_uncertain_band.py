"""apply_clicks(uncertain_band=...): a click where the network hesitated follows its probabilities, not intensities."""

from __future__ import annotations

import numpy as np

from guidino_monai.interactive import apply_clicks


def setup():
    """Uniform intensities (an intensity region floods its whole ball); the network is sure of a disc of radius 6,
    hesitant (p=0.3) on a ring from 6 to 8, sure of background beyond."""
    yy, xx = np.mgrid[:40, :40]
    r = np.hypot(yy - 20, xx - 20)
    p = np.where(r < 6, 0.95, np.where(r < 8, 0.3, 0.01))
    probs = np.stack([1 - p, p]).astype(np.float32)
    return probs, np.ones((40, 40), np.float32), r


def test_foreground_click_in_hesitant_ring_adds_the_ring_only():
    probs, image, r = setup()
    out = apply_clicks(probs, image, foreground=[[20, 27]], label=1, radius=4, max_radius=12, uncertain_band=0.2)
    pred = out.argmax(0)
    added = (pred == 1) & (probs.argmax(0) == 0)
    assert added[20, 27]
    assert not added[r >= 8].any()  # never beyond what the network hesitated on
    assert added[(r >= 6) & (r < 8)].sum() > 10
    # without the band the intensity region (uniform image) reaches past the ring into sure background
    plain = apply_clicks(probs, image, foreground=[[20, 27]], label=1, radius=4, max_radius=12)
    assert ((plain.argmax(0) == 1) & (r >= 8)).any()


def test_sure_miss_falls_back_to_intensity_region():
    probs, image, r = setup()
    out = apply_clicks(probs, image, foreground=[[20, 35]], label=1, radius=3, uncertain_band=0.2)
    assert out.argmax(0)[20, 35] == 1  # the network was sure (p=0.01): the click still adds its region


def test_background_click_in_hesitant_zone():
    probs, image, r = setup()
    probs[1][(r >= 6) & (r < 8)] = 0.7  # now predicted foreground, hesitantly
    probs[0] = 1 - probs[1]
    out = apply_clicks(probs, image, background=[[20, 27]], label=1, radius=4, max_radius=12, uncertain_band=0.2)
    pred = out.argmax(0)
    assert pred[20, 27] == 0
    assert (pred[r < 6] == 1).all()  # the sure core stays
