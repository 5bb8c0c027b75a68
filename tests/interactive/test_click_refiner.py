"""The click-trained refiner: click maps, simulated clicks, the residual network, saving/loading, and that training it
with simulated clicks makes a click correct the segmentation it was given."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
import torch

from guidino_monai.interactive import (
    ClickRefinementNet,
    click_guidance,
    load_refiner,
    next_click,
    refine_with_clicks,
    save_refiner,
    simulate_clicks,
)
from guidino_monai.interactive.train_refiner import _click_on_own_output, train_refiner


def test_click_guidance_blobs_per_channel():
    maps = click_guidance((20, 30), [([5, 7], 1), ([15, 20], 0), ([5, 9], 1)], num_classes=3, sigma=2.0)
    assert maps.shape == (3, 20, 30)
    assert maps[1, 5, 7] == pytest.approx(1.0) and maps[1, 5, 9] == pytest.approx(1.0)
    assert maps[0, 15, 20] == pytest.approx(1.0)
    assert maps[2].max() == 0.0  # no click for class 2
    assert maps[1, 5, 8] < 1.0 and maps[1, 5, 8] > 0.8  # max-combined, not summed
    assert maps[1, 19, 29] < 1e-6
    with pytest.raises(ValueError, match="channel 3"):
        click_guidance((8, 8), [([1, 1], 3)], num_classes=3)
    with pytest.raises(ValueError, match="coordinates"):
        click_guidance((8, 8), [([1, 1, 1], 1)], num_classes=3)


def test_simulated_clicks_go_to_the_largest_remaining_error():
    label = np.zeros((40, 40), np.int64)
    label[5:20, 5:20] = 1  # 15x15: missed entirely (largest error)
    label[30:35, 30:35] = 2  # 5x5: missed
    pred = np.zeros_like(label)
    pred[25:28, 5:8] = 1  # 3x3 false positive (smallest)
    clicks = simulate_clicks(pred, label, 5)
    assert len(clicks) == 3  # three error regions, then nothing left to click
    (p1, c1), (p2, c2), (p3, c3) = clicks
    assert c1 == 1 and 5 <= p1[0] < 20 and 5 <= p1[1] < 20
    assert c2 == 2 and 30 <= p2[0] < 35
    assert c3 == 0 and 25 <= p3[0] < 28  # a background click
    # the first click is the benchmark's next_click
    assert next_click(pred, label) == (p1, True)
    assert simulate_clicks(label, label, 3) == []


def test_refiner_without_clicks_returns_the_segmentation_and_is_residual():
    torch.manual_seed(0)
    net = ClickRefinementNet(2, 3, channels=(4, 8), strides=(2,), num_res_units=0).eval()
    image = torch.rand(1, 1, 16, 16)
    probs = torch.softmax(torch.randn(1, 3, 16, 16) * 3, 1)
    assert torch.equal(refine_with_clicks(net, image, probs, []), probs)
    with torch.no_grad():
        for p in net.unet.parameters():
            p.zero_()  # a zero correction: the output is the input segmentation
    out = refine_with_clicks(net, image, probs, [([3, 3], 1)], reach=None)
    assert torch.allclose(out, probs.clamp_min(1e-4) / probs.clamp_min(1e-4).sum(1, keepdim=True), atol=1e-5)
    with torch.no_grad():
        last = [m for m in net.unet.modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.ConvTranspose2d))][-1]
        last.bias.copy_(torch.tensor([0.0, 20.0, 0.0]))  # a correction towards class 1 everywhere
    local = refine_with_clicks(net, image, probs, [([3, 3], 1)], reach=2.0)
    assert local[0, 1, 3, 3] > 0.99  # at the click the correction decides
    assert torch.allclose(local[..., 12:, 12:], probs[..., 12:, 12:], atol=1e-4)  # far from it nothing changes
    with pytest.raises(ValueError, match="3 probability"):
        net(image, probs[:, :2], probs)


def test_save_load_round_trip_and_refuses_code(tmp_path):
    net = ClickRefinementNet(3, 2, channels=(4, 8), strides=(2,), num_res_units=0)
    save_refiner(net, tmp_path / "r.pt", steps=3, guide_vit="random-init")
    loaded, info = load_refiner(tmp_path / "r.pt")
    assert info["steps"] == 3 and loaded.config == net.config
    for a, b in zip(loaded.state_dict().values(), net.state_dict().values()):
        assert torch.equal(a, b)

    class Evil:
        def __reduce__(self):
            return (print, ("owned",))

    (tmp_path / "evil.pt").write_bytes(pickle.dumps({"state_dict": Evil(), "config": {}}))
    with pytest.raises(ValueError, match="evil.pt"):
        load_refiner(tmp_path / "evil.pt")
    torch.save({"weights": 1}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="other.pt: not a click refiner"):
        load_refiner(tmp_path / "other.pt")


def _disc_case(rng: np.random.Generator, size: int = 32) -> dict[str, np.ndarray]:
    """A bright disc (class 1) on noise; the segmentation to correct misses a sector of it."""
    yy, xx = np.mgrid[:size, :size]
    cy, cx = rng.integers(11, size - 11, 2)
    r = np.hypot(yy - cy, xx - cx)
    label = (r < 8).astype(np.int64)
    image = (label * 0.6 + rng.normal(0, 0.15, (size, size))).astype(np.float32)[None]
    angle = np.arctan2(yy - cy, xx - cx)
    start = rng.uniform(-np.pi, np.pi)
    missed = (label == 1) & (np.mod(angle - start, 2 * np.pi) < 2.0)  # a wedge of about 115 degrees
    p = np.where(missed, 0.1, np.where(label == 1, 0.9, 0.1)).astype(np.float32)
    return {"image": image, "label": label, "probs": np.stack([1 - p, p]), "name": "disc"}


def _dice(pred: np.ndarray, label: np.ndarray) -> float:
    return 2.0 * ((pred == 1) & (label == 1)).sum() / ((pred == 1).sum() + (label == 1).sum())


def test_training_with_simulated_clicks_makes_a_click_correct_the_miss():
    rng = np.random.default_rng(0)
    cases = [_disc_case(rng) for _ in range(24)]
    held_out = [_disc_case(np.random.default_rng(100 + i)) for i in range(6)]
    small = {"channels": (8, 16, 32), "strides": (2, 2), "num_res_units": 1}
    net, summary = train_refiner(cases, minutes=10, max_clicks=2, batch_size=8, lr=3e-3, perturb=0.0, max_steps=120,
                                 network_kwargs=small)  # fmt: skip
    assert summary["steps"] == 120 and summary["last_loss"] < summary["first_loss"]
    before, after = [], []
    for case in held_out:
        probs = torch.from_numpy(case["probs"])[None]
        base = probs[0].numpy().argmax(0)
        point, is_fg = next_click(base, case["label"])
        assert is_fg  # the largest error is the missed wedge
        out = refine_with_clicks(net, torch.from_numpy(case["image"])[None], probs, [(point, 1)])
        before.append(_dice(base, case["label"]))
        after.append(_dice(out[0].numpy().argmax(0), case["label"]))
    assert np.mean(after) > np.mean(before) + 0.1, (before, after)


def test_click_loop_clicks_on_the_refiners_own_answer():
    """Iterative training's click goes to the largest error of what the refiner returns (blended as served), not of
    the segmentation it was given: with the correction zeroed the answer is the given segmentation, with a correction
    that fixes the wedge the next click moves elsewhere."""
    case = _disc_case(np.random.default_rng(3))
    net = ClickRefinementNet(2, 2, channels=(8, 16), strides=(2,), num_res_units=0)
    for prm in net.parameters():
        torch.nn.init.zeros_(prm)  # residual 0: the answer is the segmentation to correct
    image, probs = torch.from_numpy(case["image"])[None], torch.from_numpy(case["probs"])[None]
    label = torch.from_numpy(case["label"])[None]
    base = next_click(case["probs"].argmax(0), case["label"])
    clicks = [[]]
    _click_on_own_output(net, image, probs, label, clicks, [case["label"].shape], 2, 2.0, None)
    assert clicks == [[(base[0], 1)]]
    # a "refiner" that knows the label: its answer has no error left where it reaches (reach None: everywhere)
    perfect = torch.from_numpy(np.stack([1.0 - case["label"], case["label"]]).astype(np.float32))[None]
    clicks = [[]]
    _click_on_own_output(net, image, perfect, label, clicks, [case["label"].shape], 2, 2.0, None)
    assert clicks == [[]]  # no error: no click
    clicks = [[(base[0], 1)]]
    _click_on_own_output(net, image, probs, label, clicks, [case["label"].shape], 2, 2.0, 4.0)
    assert len(clicks[0]) == 2 and clicks[0][0] == (base[0], 1)


def test_iterative_training_runs_the_refiner_for_its_clicks():
    rng = np.random.default_rng(0)
    cases = [_disc_case(rng) for _ in range(6)]
    small = {"channels": (8, 16), "strides": (2,), "num_res_units": 0}
    calls = []
    original = ClickRefinementNet.forward

    def counting(self, *a):
        calls.append(torch.is_grad_enabled())
        return original(self, *a)

    ClickRefinementNet.forward = counting
    try:
        _, summary = train_refiner(cases, minutes=10, max_clicks=3, batch_size=2, perturb=0.0, max_steps=4,
                                   network_kwargs=small, iterative=1.0)  # fmt: skip
        assert summary["iterative"] == 1.0 and summary["steps"] == 4
        assert calls.count(True) == 4 and calls.count(False) >= 4  # 1-3 click passes without gradient per step
        calls.clear()
        train_refiner(cases, minutes=10, max_clicks=3, batch_size=2, perturb=0.0, max_steps=4, network_kwargs=small)
        assert calls == [True] * 4  # the default: clicks from the given segmentation only
    finally:
        ClickRefinementNet.forward = original


def test_focus_trains_only_where_the_answer_is_served():
    """``focus=1``: the loss is on the answer as served (the correction blended in near the clicks), so steps with no
    click leave the network as it was (bar AdamW's weight decay), while the whole-image loss (``focus=0``) trains it."""
    rng = np.random.default_rng(0)
    cases = [_disc_case(rng) for _ in range(4)]
    small = {"channels": (8, 16), "strides": (2,), "num_res_units": 0}
    changes = {}
    for focus in (0.0, 1.0):
        torch.manual_seed(0)
        start = ClickRefinementNet(2, 2, **small).state_dict()
        net, summary = train_refiner(cases, minutes=10, max_clicks=0, batch_size=2, perturb=0.0, max_steps=3,
                                     network_kwargs=small, focus=focus)  # fmt: skip
        assert summary["focus"] == focus
        changes[focus] = max(float((v - start[k]).abs().max()) for k, v in net.state_dict().items()
                             if v.dtype.is_floating_point)  # fmt: skip
    assert changes[1.0] < 1e-6 < 1e-4 < changes[0.0], changes


def test_train_refiner_command_writes_a_loadable_refiner(tmp_path):
    """``python -m guidino_monai.interactive.train_refiner`` on a bundle (demo data, random-init weights standing in
    for trained ones): the refiner file appears, loads, and records what it was trained on."""
    import shutil

    from monai.bundle import ConfigParser
    from testing_utils import REPO_ROOT

    from guidino_monai.interactive.train_refiner import main, prepare_cases

    bundle = tmp_path / "guidino_hippocampus_mri_segmentation"
    shutil.copytree(REPO_ROOT / "bundles" / bundle.name / "configs", bundle / "configs")
    with pytest.raises(FileNotFoundError, match="model.pt"):
        prepare_cases(bundle, None)
    parser = ConfigParser()
    parser.read_config(str(bundle / "configs" / "inference.json"))
    parser.update({"bundle_root": str(bundle), "device": "$torch.device('cpu')", "guide_backbone_kwargs": {"depth": 2},
                   "guide_kwargs#guide_size": 56})  # fmt: skip
    (bundle / "models").mkdir()
    torch.save(parser.get_parsed_content("network_def", instantiate=True).state_dict(), bundle / "models" / "model.pt")
    assert not (bundle / "models" / "click_refiner.pt").exists()
    main(["--bundle_dir", str(bundle), "--tiny", "--max_steps", "3", "--batch_size", "2"])
    net, info = load_refiner(bundle / "models" / "click_refiner.pt")
    assert info["steps"] == 3 and info["demo"] is True and info["guide_vit"] == "random-init"
    assert info["num_train_cases"] > 0 and net.num_classes == 3 and net.spatial_dims == 3
