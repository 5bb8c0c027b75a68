"""Unit tests of the label app's pieces and of the install fixes (no server)."""

from __future__ import annotations

import sys

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
    assert fg and point == [9, 9, 9] or all(5 <= p < 15 for p in point)
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
