"""Unit tests of the label app's pieces and of the install fixes (no server)."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import APP_DIR, TINY


def test_install_fixes_hold():
    """numpy < 2 (numpymaxflow, pydicom-seg), pydicom < 3 (pydicom-seg's pydicom._storage_sopclass_uids)."""
    pytest.importorskip("monailabel", reason="MONAI Label is an optional extra: pip install -e .[label]")
    import numpy
    import pydicom

    assert int(numpy.__version__.split(".")[0]) < 2, numpy.__version__
    assert int(pydicom.__version__.split(".")[0]) < 3, pydicom.__version__
    import numpymaxflow  # noqa: F401  (built against numpy 1.x)
    import pydicom._storage_sopclass_uids  # noqa: F401
    import pydicom_seg  # noqa: F401
    from monailabel.datastore.utils.convert import nifti_to_dicom_seg  # noqa: F401


def test_install_doc_lists_the_fixes():
    text = (APP_DIR / "INSTALL.md").read_text()
    for needle in ("numpy<2", "pydicom<3", "SAM2_BUILD_CUDA=0", "--no-build-isolation", "pip check"):
        assert needle in text, needle


def test_spacingd_image_path_bug_is_worked_around():
    """monai 1.6.1 Spacingd calls .update on every ``image_*`` entry: MONAI Label's ``image_path`` is a string."""
    from monai.data import MetaTensor
    from monai.transforms import Spacingd

    sys.path.insert(0, str(APP_DIR))
    from lib.transforms import HideNonDictMetad, wrap_spacing

    affine = torch.diag(torch.tensor([2.0, 2.0, 2.0, 1.0]))
    img = MetaTensor(torch.rand(1, 8, 8, 8), affine=affine, meta={"filename_or_obj": "/x/case.nii.gz"})
    data = {"image": img, "image_path": "/x/case.nii.gz", "image_meta_dict": {"a": 1}}
    spacing = Spacingd(keys="image", pixdim=(1.0, 1.0, 1.0))
    wrapped = wrap_spacing([spacing])
    assert isinstance(wrapped[0], HideNonDictMetad)
    out = wrapped[0](dict(data, image=img.clone()))
    assert out["image_path"] == "/x/case.nii.gz" and out["image"].shape[1:] == (15, 15, 15)
    assert "filename_or_obj" in out["image_meta_dict"]  # dict entries still get MONAI's merge
    try:  # upstream state, for the record: if MONAI fixes it, the wrapper is harmless
        spacing(dict(data, image=img.clone()))
    except AttributeError as e:
        assert "update" in str(e)


def test_split_labels_keeps_validation():
    pytest.importorskip("monailabel")
    sys.path.insert(0, str(APP_DIR))
    from lib.trainers.guided_bundle import split_labels

    items = [{"image": f"i{i}", "label": f"l{i}"} for i in range(10)]
    train, val = split_labels(items, 0.2)
    assert len(val) == 2 and len(train) == 8 and not {d["image"] for d in train} & {d["image"] for d in val}
    assert split_labels(items[::-1], 0.2) == (train, val)  # order-independent
    train, val = split_labels(items[:2], 0.2)
    assert len(train) == 1 and len(val) == 1
    assert split_labels(items[:1], 0.2) == (items[:1], items[:1])


def test_label_dice_and_mirror_disagreement():
    pytest.importorskip("monailabel")
    sys.path.insert(0, str(APP_DIR))
    from lib.activelearning import mirror_disagreement
    from lib.scoring import label_dice

    y = np.zeros((6, 6), np.uint8)
    y[1:3, 1:3], y[3:5, 3:5] = 1, 2
    assert label_dice(y, y) == 1.0
    swapped = np.where(y == 1, 2, np.where(y == 2, 1, 0))
    assert label_dice(y, swapped) == 0.0  # labels are compared one by one, not as binary masks
    assert label_dice(np.zeros_like(y), np.zeros_like(y)) == 1.0
    assert mirror_disagreement([y, y, y]) == 0.0
    assert mirror_disagreement([y, swapped]) == 1.0


@pytest.mark.parametrize("bad", ["../x", "..", "a/b", "/abs", ".hidden", "", "x\\y"])
def test_check_id_refuses_paths(bad):
    pytest.importorskip("monailabel")
    from fastapi import HTTPException

    sys.path.insert(0, str(APP_DIR))
    from lib.datastore import check_id

    with pytest.raises(HTTPException) as e:
        check_id(bad)
    assert e.value.status_code == 400
    assert check_id("hippocampus_001.v2") == "hippocampus_001.v2"


def test_next_click_and_token_mapping():
    from guidino_monai.interactive import next_click, point_to_token, world_points_to_grid

    label = np.zeros((20, 20, 20), np.uint8)
    label[5:15, 5:15, 5:15] = 1
    pred = np.zeros_like(label)
    point, fg = next_click(pred, label)
    assert fg and all(5 <= p < 15 for p in point)
    pred = label.copy()
    pred[0:3, 0:3, 0:3] = 2
    point, fg = next_click(pred, label)
    assert not fg and all(p < 3 for p in point)
    assert next_click(label, label) is None
    assert point_to_token([10, 0, 19], (20, 20, 20), (20, 4, 4), slice_axis=2) == (19, 2, 0)
    assert point_to_token([10, 7, 8], (20, 20, 20), (5, 4, 4), slice_axis=2, slice_stride=4) == (2, 2, 1)
    a = np.diag([2.0, 2.0, 2.0, 1.0])
    assert world_points_to_grid([[1, 2, 3]], a, np.eye(4)) == [[2.0, 4.0, 6.0]]


def test_click_refiner_changes_guide_with_one_vit_pass():
    from guidino_monai.interactive import ClickRefiner
    from guidino_monai.networks import GuidedSegResNet

    torch.manual_seed(0)
    net = GuidedSegResNet(spatial_dims=3, in_channels=1, out_channels=3, init_filters=8,
                          guide_backbone_kwargs=TINY["guide_backbone_kwargs"],
                          guide_kwargs={"guide_size": 56, "intensity_scaling": "none"}).eval()  # fmt: skip
    calls = {"n": 0}
    vit = net.guide.backbone
    orig = vit.forward_intermediates

    def counted(*a, **k):
        calls["n"] += 1
        return orig(*a, **k)

    vit.forward_intermediates = counted
    image = torch.rand(1, 1, 24, 32, 16)
    ref = ClickRefiner(net, roi_size=(24, 32, 16), sw_batch_size=1)
    ref.set_image(image)
    g0 = ref.guide()
    g_plain = net.guide(image)
    torch.testing.assert_close(g0, torch.nn.functional.interpolate(g_plain, size=(24, 32, 16), mode="trilinear"))
    logits, g1 = ref.predict(foreground=[[12, 16, 8]], background=[[1, 1, 1]])
    assert logits.shape == (1, 3, 24, 32, 16) and not torch.allclose(g0, g1)
    near_bg = g1[0, 0, 0:4, 0:4, 1]
    assert near_bg.mean() < g0[0, 0, 0:4, 0:4, 1].mean()  # a background click lowers the guide there
    ref.predict(foreground=[[12, 16, 8], [4, 4, 4]])
    assert calls["n"] == 2  # net.guide(image) above + set_image; clicks reuse the cached tokens


def test_click_sessions_key_by_image_content():
    """A re-uploaded image with the same id and shape but other voxels must not reuse the old image's tokens."""
    from guidino_monai.interactive import ClickRefiner, ClickSessions
    from guidino_monai.networks import GuidedSegResNet

    torch.manual_seed(0)
    net = GuidedSegResNet(spatial_dims=3, in_channels=1, out_channels=3, init_filters=8,
                          guide_backbone_kwargs=TINY["guide_backbone_kwargs"],
                          guide_kwargs={"guide_size": 56, "intensity_scaling": "none"}).eval()  # fmt: skip
    sessions = ClickSessions(lambda n: ClickRefiner(n, roi_size=None), max_sessions=2)
    a = torch.rand(1, 1, 16, 16, 8)
    b = torch.rand(1, 1, 16, 16, 8)  # same id, same shape, other voxels
    ra = sessions.get("case_1", a, net)
    assert sessions.get("case_1", a.clone(), net) is ra and sessions.vit_passes == 1  # same content: cached
    rb = sessions.get("case_1", b, net)
    assert rb is not ra and sessions.vit_passes == 2
    torch.testing.assert_close(rb.tokens, net.guide.encode(b))  # the new image's tokens, not the old ones
    assert not torch.allclose(rb.tokens, ra.tokens)
    sessions.get("case_2", a, net)
    assert len(sessions) == 2  # LRU bound


def test_apply_clicks_adds_and_removes_the_clicked_region():
    from guidino_monai.interactive import apply_clicks, click_region

    image = np.zeros((30, 30, 20), np.float32)
    image[10:20, 10:20, 5:15] = 100.0  # a bright block the network missed
    image += np.random.default_rng(0).normal(0, 1, image.shape).astype(np.float32)
    block = np.zeros(image.shape, bool)
    block[10:20, 10:20, 5:15] = True
    probs = np.zeros((3,) + image.shape, np.float32)
    probs[0] = 1.0  # the network sees nothing
    region = click_region(image, [15, 15, 10], radius=4)
    assert region[15, 15, 10] and region.sum() > 50
    assert not (region & ~block).any()  # stops at the intensity edge
    # a foreground click in the middle of the missed block adds (most of) the block, nothing outside it
    out = apply_clicks(probs, image, foreground=[[15, 15, 10]], label=2, radius=4)
    pred = out.argmax(0)
    assert (pred[block] == 2).mean() > 0.9 and (pred[~block] == 0).all()
    np.testing.assert_allclose(out.sum(0), 1.0, atol=1e-6)
    # a background click with a fixed small reach removes only its own region of the class, leaves the rest
    out2 = apply_clicks(out, image, background=[[15, 15, 10]], label=2, radius=2, max_radius=None)
    removed = click_region(image, [15, 15, 10], radius=2, tolerance=None, within=pred == 2)
    assert removed.sum() > 5 and (out2.argmax(0)[removed] == 0).all()
    assert (out2.argmax(0)[(pred == 2) & ~removed] == 2).all()
    # with the adaptive reach, a background click in the middle of a wrong blob removes most of it
    out3 = apply_clicks(out, image, background=[[15, 15, 10]], label=2, radius=2)
    assert (out3.argmax(0)[pred == 2] == 0).mean() > 0.9
    # a click that agrees with the segmentation changes nothing outside its small region
    assert (apply_clicks(out, image, foreground=[[15, 15, 10]], label=2).argmax(0) == pred).all()
    # without label, a foreground click takes the most probable foreground class at the click
    probs[1, 15, 15, 10] = 0.3
    assert apply_clicks(probs, image, foreground=[[15, 15, 10]]).argmax(0)[15, 15, 10] == 1
    with pytest.raises(ValueError):
        apply_clicks(probs, image, foreground=[[15, 15, 10]], label=3)


def test_slicer_config_values_parse():
    pytest.importorskip("monailabel")
    from fastapi import HTTPException

    sys.path.insert(0, str(APP_DIR))
    from lib.params import axes_choices, label_index, parse_mirror_axes, parse_points, parse_return_guide

    choices = axes_choices(3)
    assert choices[0] == "none" and "0,1,2" in choices and all(isinstance(c, str) for c in choices)
    assert parse_mirror_axes(choices, 3) == ()  # the whole config list (no value sent): its default
    assert parse_mirror_axes("0,2", 3) == (0, 2) and parse_mirror_axes([1], 2) == (1,)
    assert parse_return_guide(["segment", "none"]) == "segment" and parse_return_guide(True) == "datastore"
    labels = {"hippocampus anterior": 1, "hippocampus posterior": 2}
    assert label_index("hippocampus anterior", labels) == 1 and label_index("anterior", labels) == 1
    assert label_index("2", labels) == 2 and label_index(None, labels) is None
    assert parse_points([[1, 2, 3.5, 9]], "foreground", 3) == [[1.0, 2.0, 3.5]]
    for call in (lambda: parse_mirror_axes([5], 3), lambda: parse_mirror_axes("0,0", 3),
                 lambda: parse_return_guide("maybe"), lambda: label_index("Segment_1", labels),
                 lambda: parse_points([["a", 1, 2]], "foreground", 3), lambda: parse_points([[1, 2]], "x", 3),
                 lambda: parse_points([[float("nan"), 1, 2]], "x", 3)):  # fmt: skip
        with pytest.raises(HTTPException) as e:
            call()
        assert e.value.status_code == 400


def test_click_conf_numbers_are_checked_and_named():
    pytest.importorskip("monailabel")
    sys.path.insert(0, str(APP_DIR))
    from lib.infers.interactive import conf_number

    assert conf_number({}, "click_sigma", 4.0, positive=True) == 4.0
    assert conf_number({"click_sigma": "2.5"}, "click_sigma", 4.0, positive=True) == 2.5
    assert conf_number({"click_margin": "-1"}, "click_margin", 2.0) == -1.0
    bad = (({"click_sigma": "wide"}, True), ({"click_sigma": "0"}, True), ({"click_sigma": "nan"}, False))
    for conf, positive in bad:
        with pytest.raises(ValueError, match="--conf click_sigma"):
            conf_number(conf, "click_sigma", 4.0, positive=positive)


def test_drop_guide_segment(tmp_path):
    pytest.importorskip("monailabel")
    import nibabel as nib

    sys.path.insert(0, str(APP_DIR))
    from lib.datastore import drop_guide_segment

    arr = np.array([[[0, 1], [2, 3]]], np.uint8)
    path = str(tmp_path / "l.nii.gz")
    nib.save(nib.Nifti1Image(arr, np.eye(4)), path)
    info = {"label_info": [{"name": "hippocampus anterior", "idx": 1}, {"name": "guide", "idx": 3}]}
    out, cleaned = drop_guide_segment(path, info)
    assert cleaned and np.array_equal(np.asarray(nib.load(out).dataobj), [[[0, 1], [2, 0]]])
    assert drop_guide_segment(path, {"label_info": [{"name": "hippocampus anterior", "idx": 1}]}) == (path, False)
    assert drop_guide_segment(path, {}) == (path, False)


@pytest.fixture
def hippo_app_copy(tmp_path):
    """``(name, bundles_dir, model_dir)``: the hippocampus bundle's configs alone (no weights) in a bundles folder of
    its own, and an empty app model folder, for :func:`lib.bundles.prepare_bundle`."""
    pytest.importorskip("monailabel")
    import shutil

    sys.path.insert(0, str(APP_DIR))
    from lib.bundles import BUNDLES_DIR

    name = "guidino_hippocampus_mri_segmentation"
    bundles = tmp_path / "bundles"
    shutil.copytree(BUNDLES_DIR / name / "configs", bundles / name / "configs")
    return name, bundles, tmp_path / "model"


def test_bundle_weights_replace_random_ones_at_restart(hippo_app_copy):
    """No trained weights: random ones, recorded as such; once the bundle has trained weights, a restart serves them."""
    from lib.bundles import prepare_bundle, read_provenance, weights_status

    name, bundles, model_dir = hippo_app_copy
    overrides = {"guide_backbone_kwargs": {"depth": 2}}
    path = prepare_bundle(name, model_dir, overrides, "bundle", bundles_dir=bundles)
    status = weights_status(path)
    assert (
        read_provenance(path)["source"] == "random" and status["trained"] is False and "UNTRAINED" in status["warning"]
    )
    assert status["guide_vit"] == "random"
    served = model_dir / name / "models" / "model.pt"
    random_bytes = served.read_bytes()
    # the user trains the bundle: its models/model.pt appears; the app serves it after a restart
    (bundles / name / "models").mkdir()
    state = torch.load(served, weights_only=True)
    trained = {k: v + 1.0 if v.is_floating_point() else v for k, v in state.items()}
    torch.save(trained, bundles / name / "models" / "model.pt")
    path = prepare_bundle(name, model_dir, overrides, "bundle", bundles_dir=bundles)
    assert served.read_bytes() == (bundles / name / "models" / "model.pt").read_bytes() != random_bytes
    assert weights_status(path)["source"] == "bundle" and weights_status(path)["trained"] is True
    # weights trained in the app are kept at the next restart
    from lib.bundles import write_provenance

    torch.save(state, served)
    write_provenance(path, {"source": "app training", "base_sha256": read_provenance(path)["sha256"]})
    app_trained = served.read_bytes()
    prepare_bundle(name, model_dir, overrides, "bundle", bundles_dir=bundles)
    assert served.read_bytes() == app_trained and weights_status(path)["source"] == "app training"


def test_random_weights_of_another_network_are_replaced_trained_ones_are_not(hippo_app_copy):
    """A start with a changed network (a new bundle release, other overrides) re-initialises weights that an earlier
    start wrote at random; weights trained in the app that do not fit stop the start with the file named."""
    from lib.bundles import load_weights, prepare_bundle, read_provenance, write_provenance

    name, bundles, model_dir = hippo_app_copy
    small = {"guide_backbone_kwargs": {"depth": 2}, "network_def#filters": [8, 16, 32, 64]}
    path = prepare_bundle(name, model_dir, small, "bundle", bundles_dir=bundles)
    served = Path(path) / "models" / "model.pt"
    old = torch.load(served, weights_only=True)
    wide = {"guide_backbone_kwargs": {"depth": 2}}  # the bundle's own filters: other shapes
    path = prepare_bundle(name, model_dir, wide, "bundle", bundles_dir=bundles)
    new = torch.load(served, weights_only=True)
    assert read_provenance(path)["source"] == "random"
    assert any(new[k].shape != old[k].shape for k in old if k in new)
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config(str(Path(path) / "configs" / "inference.json"))
    load_weights(parser.get_parsed_content("network_def"), served)  # the served weights fit the served network
    write_provenance(path, {"source": "app training"})
    with pytest.raises(RuntimeError, match="does not fit"):
        prepare_bundle(name, model_dir, small, "bundle", bundles_dir=bundles)
    kept = torch.load(served, weights_only=True)
    assert all(torch.equal(kept[k], new[k]) for k in new)  # the trained weights were not overwritten


def test_label_constraints_pin_torch_and_matching_torchvision(monkeypatch):
    sys.path.insert(0, str(APP_DIR))
    from importlib import metadata

    import constraints

    assert constraints.matching_torchvision("2.14.1+cu130") == "0.29.*"
    assert constraints.matching_torchvision("2.5.0") == "0.20.*"
    versions = {"torch": "2.14.1+cpu", "torchvision": "0.20.0"}

    def fake_version(name):
        if name not in versions:
            raise metadata.PackageNotFoundError(name)
        return versions[name]

    monkeypatch.setattr(constraints.metadata, "version", fake_version)
    lines = constraints.constraints()
    assert lines[:2] == ["torch==2.14.1", "torchvision==0.29.*"]  # the installed 0.20 does not fit torch 2.14
    versions["torchvision"] = "0.29.1"
    assert constraints.constraints()[1] == "torchvision==0.29.1"
    del versions["torch"]
    with pytest.raises(RuntimeError, match="torch is not installed"):
        constraints.constraints()


@pytest.mark.parametrize(
    "bundle, rank, expect",
    [("guidino_hippocampus_mri_segmentation", 5, True), ("guidino_fetalhead_us_segmentation", 4, False)],
)
def test_served_network_layout_follows_the_bundle(bundle, rank, expect, tmp_path):
    """MONAI Label builds the served network from ``network_def``; the task applies the bundle's ``channels_last``."""
    pytest.importorskip("monailabel")
    sys.path.insert(0, str(APP_DIR))
    from lib.bundles import prepare_bundle
    from lib.infers.guided_bundle import GuidedBundleInferTask

    task = GuidedBundleInferTask(prepare_bundle(bundle, tmp_path, {"guide": False}), {})  # as the app serves it
    assert task.valid, bundle
    net = task._get_network("cpu", {})
    weight = next(p for p in net.parameters() if p.dim() == rank and p.shape[1] > 1 and p.shape[2] > 1)
    fmt = torch.channels_last_3d if rank == 5 else torch.channels_last
    assert (weight.is_contiguous(memory_format=fmt) and not weight.is_contiguous()) == expect, weight.stride()
    assert task._get_network("cpu", {}) is net  # still MONAI Label's cached network
