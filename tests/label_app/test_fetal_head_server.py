"""Clicks on the 2D fetal-head bundle (``--conf interactive_bundle <fetal bundle>``) over real HTTP: the clicks on a
2D NIfTI reach the network's grid, and the answer stays as clicked: the bundle's shape clean-ups (largest component,
ellipse refit), which auto-segmentation applies, must not undo them."""

from __future__ import annotations

import gzip
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from conftest import FETAL, INTERACTIVE, seed_mixed_weights, serve

pytestmark = pytest.mark.usefixtures("monailabel_ready")


def _load(content: bytes):
    import nibabel as nib

    data = gzip.decompress(content) if content[:2] == b"\x1f\x8b" else content
    return nib.Nifti1Image.from_bytes(data)


@pytest.fixture(scope="module")
def fetal_server(tmp_path_factory):
    from guidino_monai.data import make_demo_dataset

    root = tmp_path_factory.mktemp("fetal_app")
    demo = Path(make_demo_dataset(root / "demo", "fetalhead", num_cases=2, seed=3))
    studies = root / "studies"
    (studies / "labels" / "final").mkdir(parents=True)
    images = sorted((demo / "imagesTr").glob("*.nii.gz"))
    for img in images:
        shutil.copy(img, studies / img.name)
    seed_mixed_weights(FETAL, root / "model", images[0])  # the first image (the test's) gets both classes
    yield from serve(root, studies, f"{FETAL},{INTERACTIVE}", extra_conf={"interactive_bundle": FETAL})


def _image_id(server) -> str:
    import requests

    ids = requests.get(server.url + "/datastore/", params={"output": "all"}, timeout=30).json()["objects"]
    return sorted(ids)[0]


def _infer(server, model: str, image_id: str, params: dict) -> np.ndarray:
    import requests

    r = requests.post(server.url + f"/infer/{model}", params={"image": image_id, "output": "image"},
                      data={"params": json.dumps(params)}, timeout=300)  # fmt: skip
    assert r.status_code == 200, r.text[:2000] + server.tail()
    return np.asarray(_load(r.content).dataobj).squeeze()


def test_fetal_clicks_are_not_undone_by_the_shape_cleanups(fetal_server):
    image_id = _image_id(fetal_server)
    params = {"label": "fetal head", "click_method": "clickmaps", "return_guide": "none"}
    base = _infer(fetal_server, INTERACTIVE, image_id, {**params, "foreground": [], "background": []}) == 1
    # up to five foreground clicks on background pixels 20+ px apart: separate regions, none the largest
    bg = np.argwhere(~base)
    rng = np.random.default_rng(0)
    points: list[list[int]] = []
    for i in rng.permutation(len(bg)):
        p = bg[i]
        if all(np.abs(p - q).max() > 20 for q in points):
            points.append([int(v) for v in p])
        if len(points) == 5:
            break
    assert len(points) >= 3, "too few background pixels apart in the test network's answer"
    added = _infer(fetal_server, INTERACTIVE, image_id, {**params, "foreground": points, "background": []}) == 1
    assert all(added[tuple(p)] for p in points), "each foreground click must add its pixel"
    inside = np.argwhere(base)
    assert len(inside), "the seeded test network must answer some foreground"
    p = [int(v) for v in inside[len(inside) // 2]]
    removed = _infer(fetal_server, INTERACTIVE, image_id, {**params, "foreground": [], "background": [p]}) == 1
    assert not removed[tuple(p)], "a background click must remove its pixel"
