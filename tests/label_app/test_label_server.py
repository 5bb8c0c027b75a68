"""The label app over real HTTP, the way the 3D Slicer extension talks to it (one server for the module)."""

from __future__ import annotations

import hashlib
import json
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import FETAL, HIPPO, INTERACTIVE, Server, make_studies

pytestmark = pytest.mark.usefixtures("monailabel_ready")


@pytest.fixture(scope="module")
def server(tmp_path_factory, monailabel_ready):
    root = tmp_path_factory.mktemp("label_app")
    studies = make_studies(root, num_cases=4, final_labels=1)
    srv = Server(str(studies), root / "model", f"{HIPPO},{FETAL},{INTERACTIVE}", root / "server.log")
    try:
        srv.wait_ready()
        srv.root, srv.studies = root, studies
        yield srv
    finally:
        srv.stop()


def _save(img) -> bytes:
    import gzip

    return gzip.compress(img.to_bytes())


def _load(content: bytes):
    import gzip

    import nibabel as nib

    data = gzip.decompress(content) if content[:2] == b"\x1f\x8b" else content
    return nib.Nifti1Image.from_bytes(data)


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_info_lists_models_with_labels(server):
    import requests

    info = requests.get(server.url + "/info/", timeout=30).json()
    models = info["models"]
    assert set(models) == {HIPPO, FETAL, INTERACTIVE}
    assert models[HIPPO]["labels"] == {"anterior": 1, "posterior": 2}
    assert models[FETAL]["labels"] == {"fetal head": 1}
    assert models[INTERACTIVE]["type"] == "deepgrow"
    assert set(info["trainers"]) == {HIPPO, FETAL}
    assert {"random", "mirror_uncertainty"} <= set(info["strategies"])
    assert "dice" in info["scoring"]


def test_infer_upload_keeps_input_geometry_and_returns_guide(server):
    """An oblique, anisotropic, non-RAS upload: Orientationd + Spacingd (the monai 1.6.1 image_path bug) and back."""
    import requests

    rng = np.random.default_rng(0)
    arr = (rng.random((30, 36, 20)) * 200).astype(np.float32)
    affine = np.array([[-1.2, 0.0, 0.0, 10.0], [0.0, 0.0, 0.9, -5.0], [0.0, 1.5, 0.0, 3.0], [0, 0, 0, 1]])
    files = {"file": ("oblique.nii.gz", _save(__import__("nibabel").Nifti1Image(arr, affine)))}
    r = requests.post(server.url + f"/infer/{HIPPO}", params={"output": "image"}, files=files, timeout=300)
    assert r.status_code == 200, r.text[:2000] + server.tail()
    out = _load(r.content)
    assert out.shape == arr.shape
    np.testing.assert_allclose(out.affine, affine, atol=1e-4)
    assert set(np.unique(np.asarray(out.dataobj))) <= {0, 1, 2}
    # the guide mask as the returned image, same geometry, values in [0, 1]
    r = requests.post(server.url + f"/infer/{HIPPO}", params={"output": "image"}, files=files,
                      data={"params": json.dumps({"return_guide": "image"})}, timeout=300)  # fmt: skip
    assert r.status_code == 200, r.text[:2000]
    guide = _load(r.content)
    g = np.asarray(guide.dataobj)
    assert guide.shape == arr.shape and g.min() >= 0.0 and g.max() <= 1.0 and g.std() > 0


def test_infer_2d_fetal_head(server):
    import nibabel as nib
    import requests

    arr = (np.random.default_rng(1).random((96, 80)) * 255).astype(np.uint8)
    affine = np.diag([0.2, 0.2, 1.0, 1.0])
    files = {"file": ("us.nii.gz", _save(nib.Nifti1Image(arr, affine)))}
    r = requests.post(server.url + f"/infer/{FETAL}", params={"output": "image"}, files=files, timeout=300)
    assert r.status_code == 200, r.text[:2000] + server.tail()
    out = _load(r.content)
    assert out.shape[:2] == arr.shape and set(np.unique(np.asarray(out.dataobj))) <= {0, 1}
    np.testing.assert_allclose(out.header.get_zooms()[:2], (0.2, 0.2), atol=1e-5)


def test_slicer_flow_train_and_reinfer(server):
    """/info/ -> /activelearning/random -> /infer -> PUT /datastore/label (final) -> /train -> /infer again."""
    import requests

    url = server.url
    assert requests.get(url + "/info/", timeout=30).status_code == 200
    nxt = requests.post(url + "/activelearning/random", json={}, timeout=60).json()
    image_id = nxt["id"]
    final_dir = server.studies / "labels" / "final"
    assert not (final_dir / f"{image_id}.nii.gz").exists()  # random picks an unlabelled image
    r = requests.post(url + f"/infer/{HIPPO}", params={"image": image_id, "output": "image"},
                      data={"params": json.dumps({"return_guide": True})}, timeout=300)  # fmt: skip
    assert r.status_code == 200, r.text[:2000]
    pred = _load(r.content)
    # the guide went to the datastore as label tag "guide"
    g = requests.get(url + "/datastore/label", params={"label": image_id, "tag": "guide"}, timeout=30)
    assert g.status_code == 200 and _load(g.content).shape == pred.shape
    # the clinician "corrects" it: submit the ground truth as final
    truth = (server.root / "demo" / "labelsTr" / f"{image_id}.nii.gz").read_bytes()
    r = requests.put(url + "/datastore/label", params={"image": image_id, "tag": "final"},
                     files={"label": (f"{image_id}.nii.gz", truth)}, timeout=60)  # fmt: skip
    assert r.status_code == 200, r.text
    assert (final_dir / f"{image_id}.nii.gz").read_bytes() == truth
    served = server.root / "model" / HIPPO / "models" / "model.pt"
    before_sha = _sha(served)
    r = requests.post(url + f"/train/{HIPPO}", json={"max_epochs": 2, "val_split": 0.5}, timeout=60)
    assert r.status_code == 200, r.text
    # inference is served while training runs (training is a subprocess)
    t0 = time.time()
    r = requests.post(url + f"/infer/{HIPPO}", params={"image": image_id, "output": "json"}, timeout=300)
    assert r.status_code == 200
    status = requests.get(url + "/train/", timeout=30).json()
    while status["status"] in ("SUBMITTED", "RUNNING") and time.time() - t0 < 300:
        time.sleep(2)
        status = requests.get(url + "/train/", timeout=30).json()
    assert status["status"] == "DONE", json.dumps(status, indent=1)[-3000:]
    history = json.loads((served.parent / "train_history.json").read_text())
    last = history[-1]
    assert last["train_cases"] == 1 and last["val_cases"] == 1
    assert last["swapped"] == (last["val_dice_after"] >= last["val_dice_before"])
    assert (_sha(served) != before_sha) == last["swapped"]
    info = requests.get(url + "/info/", timeout=30).json()
    assert info["train_stats"][HIPPO]["end_ts"] == last["end_ts"]
    r = requests.post(url + f"/infer/{HIPPO}", params={"image": image_id, "output": "image"}, timeout=300)
    assert r.status_code == 200 and _load(r.content).shape == pred.shape
    # scoring: Dice of the submitted labels against the model's prediction
    scores = requests.post(url + "/scoring/dice", params={"run_sync": "true"}, json={"model": HIPPO}, timeout=300)
    assert scores.status_code == 200, scores.text
    assert set(scores.json()) == {"hippocampus_000", image_id}  # the images with a final label
    info = requests.get(url + "/datastore/image/info", params={"image": image_id}, timeout=30).json()
    assert info["dice"] == scores.json()[image_id] and 0.0 <= info["dice"] <= 1.0


def test_killed_training_leaves_served_model(server):
    import requests

    served = server.root / "model" / HIPPO / "models" / "model.pt"
    sha = _sha(served)
    r = requests.post(server.url + f"/train/{HIPPO}", json={"max_epochs": 500}, timeout=60)
    assert r.status_code == 200, r.text
    runs = server.root / "model" / HIPPO / "train_runs"
    t0 = time.time()
    n_before = len(list(runs.glob("*/checkpoint_last.pt")))
    while len(list(runs.glob("*/checkpoint_last.pt"))) <= n_before and time.time() - t0 < 240:
        time.sleep(1)  # wait until it is well into training (an epoch checkpoint written)
    assert requests.delete(server.url + "/train/", timeout=60).status_code == 200
    status = requests.get(server.url + "/train/", timeout=30).json()
    assert status["status"] == "STOPPED"
    assert _sha(served) == sha
    ids = requests.get(server.url + "/datastore/", params={"output": "all"}, timeout=30).json()["objects"]
    r = requests.post(server.url + f"/infer/{HIPPO}", params={"image": sorted(ids)[0], "output": "json"}, timeout=300)
    assert r.status_code == 200


def test_corrupt_uploads_get_4xx_and_server_keeps_serving(server):
    import requests

    ids = sorted(requests.get(server.url + "/datastore/", params={"output": "all"}, timeout=30).json()["objects"])
    bad = {"label": ("x.nii.gz", b"\x1f\x8bthis is not a nifti")}
    r = requests.put(server.url + "/datastore/label", params={"image": ids[0], "tag": "final"}, files=bad, timeout=30)
    assert 400 <= r.status_code < 500 and "NIfTI" in r.json()["detail"]
    wrong = {"label": ("x.nii.gz", _save(__import__("nibabel").Nifti1Image(np.zeros((5, 5, 5), np.uint8), np.eye(4))))}
    r = requests.put(server.url + "/datastore/label", params={"image": ids[0], "tag": "final"}, files=wrong, timeout=30)
    assert 400 <= r.status_code < 500 and "shape" in r.json()["detail"]
    r = requests.post(server.url + f"/infer/{HIPPO}", files={"file": ("bad.nii.gz", b"garbage")}, timeout=60)
    assert 400 <= r.status_code < 500 and "NIfTI" in r.json()["detail"]
    r = requests.put(server.url + "/datastore/image", params={"image": "new"}, files={"file": ("n.nii.gz", b"zz")},
                     timeout=30)  # fmt: skip
    assert 400 <= r.status_code < 500
    assert requests.get(server.url + "/info/", timeout=30).status_code == 200
    r = requests.post(server.url + f"/infer/{HIPPO}", params={"image": ids[0], "output": "json"}, timeout=300)
    assert r.status_code == 200


@pytest.mark.parametrize("bad_id", ["../hippocampus_000", "..", "a/../../etc/passwd", "/etc/passwd"])
def test_path_traversal_ids_refused(server, bad_id):
    import requests

    r = requests.post(server.url + f"/infer/{HIPPO}", params={"image": bad_id, "output": "json"}, timeout=60)
    assert 400 <= r.status_code < 500, r.text
    label = {"label": ("x.nii.gz", b"whatever")}
    r = requests.put(server.url + "/datastore/label", params={"image": bad_id, "tag": "final"}, files=label, timeout=30)
    assert 400 <= r.status_code < 500
    r = requests.get(server.url + "/datastore/image", params={"image": bad_id}, timeout=30)
    assert 400 <= r.status_code < 500
    r = requests.put(server.url + "/datastore/label", params={"image": "hippocampus_000", "tag": "../../x"},
                     files=label, timeout=30)  # fmt: skip
    assert 400 <= r.status_code < 500


def test_concurrent_label_submissions_leave_one_complete_file(server):
    import nibabel as nib
    import requests

    ids = sorted(requests.get(server.url + "/datastore/", params={"output": "all"}, timeout=30).json()["objects"])
    image_id = ids[-1]
    shape = nib.load(server.studies / f"{image_id}.nii.gz").shape
    payloads = []
    for v in (1, 2):
        arr = np.full(shape, v, np.uint8)
        arr[0] = 0
        payloads.append(_save(nib.Nifti1Image(arr, np.eye(4))))
    results = []

    def put(data: bytes) -> None:
        r = requests.put(server.url + "/datastore/label", params={"image": image_id, "tag": "final"},
                         files={"label": (f"{image_id}.nii.gz", data)}, timeout=60)  # fmt: skip
        results.append(r.status_code)

    for _ in range(3):
        threads = [threading.Thread(target=put, args=(p,)) for p in payloads]
        [t.start() for t in threads]
        [t.join() for t in threads]
        stored = (server.studies / "labels" / "final" / f"{image_id}.nii.gz").read_bytes()
        assert stored in payloads  # exactly one of the two, byte for byte
    assert results == [200] * 6
    leftovers = [p.name for p in (server.studies / "labels" / "final").iterdir() if p.name.startswith(".")]
    assert not [n for n in leftovers if ".partial" in n]


def test_interactive_clicks_refine_without_vit_rerun(server):
    import requests

    ids = sorted(requests.get(server.url + "/datastore/", params={"output": "all"}, timeout=30).json()["objects"])
    params = {"foreground": [[16, 20, 16]], "background": [[1, 1, 1]]}
    outs, times = [], []
    for extra in ([], [[12, 22, 16]]):
        p = dict(params, foreground=params["foreground"] + extra)
        t = time.time()
        r = requests.post(server.url + f"/infer/{INTERACTIVE}", params={"image": ids[0], "output": "image"},
                          data={"params": json.dumps(p)}, timeout=300)  # fmt: skip
        times.append(time.time() - t)
        assert r.status_code == 200, r.text[:2000]
        outs.append(np.asarray(_load(r.content).dataobj))
    assert outs[0].shape == outs[1].shape
    r = requests.post(server.url + f"/infer/{INTERACTIVE}", params={"image": ids[0], "output": "image"},
                      data={"params": json.dumps(dict(params, label="anterior"))}, timeout=300)  # fmt: skip
    assert r.status_code == 200 and set(np.unique(np.asarray(_load(r.content).dataobj))) <= {0, 1}
    r = requests.post(server.url + f"/infer/{INTERACTIVE}", params={"image": ids[0], "output": "json"},
                      data={"params": json.dumps({"foreground": [[1, 2]]})}, timeout=300)  # fmt: skip
    assert r.status_code == 400 and "foreground" in r.json()["detail"]


def test_mirror_uncertainty_strategy(server):
    import requests

    r = requests.post(server.url + "/activelearning/mirror_uncertainty", json={"max_candidates": 1}, timeout=300)
    assert r.status_code == 200, r.text
    res = r.json()
    assert 0.0 <= res["score"] <= 1.0
    info = requests.get(server.url + "/datastore/image/info", params={"image": res["id"]}, timeout=30).json()
    assert info["mirror_uncertainty"]["score"] == res["score"]
