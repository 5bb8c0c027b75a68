"""The label app over real HTTP, the way the 3D Slicer extension talks to it (one server for the module)."""

from __future__ import annotations

import hashlib
import json
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import FETAL, HIPPO, INTERACTIVE, serve_all_models

pytestmark = pytest.mark.usefixtures("monailabel_ready")


@pytest.fixture(scope="module")
def server(tmp_path_factory, monailabel_ready):
    yield from serve_all_models(tmp_path_factory.mktemp("label_app"))


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
    assert models[HIPPO]["labels"] == {"hippocampus anterior": 1, "hippocampus posterior": 2}
    assert models[FETAL]["labels"] == {"fetal head": 1}
    for name in (HIPPO, FETAL, INTERACTIVE):  # every config entry is something Slicer can show and send back
        for key, value in models[name]["config"].items():
            assert value not in ([], None, {}), (name, key, value)
    # random init (init_weights=random) and no DINO file: /info/ says both
    weights = models[HIPPO]["weights"]
    assert weights["source"] == "random" and weights["trained"] is False and weights["guide_vit"] == "random"
    assert "UNTRAINED" in weights["warning"] and "guide ViT has random weights" in weights["warning"]
    assert "UNTRAINED" in info["description"]
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
    r = requests.post(server.url + f"/infer/{HIPPO}", params={"output": "image"}, files=files,
                      data={"params": json.dumps({"return_guide": "none"})}, timeout=300)  # fmt: skip
    assert r.status_code == 200, r.text[:2000] + server.tail()
    out = _load(r.content)
    assert out.shape == arr.shape and out.get_data_dtype() == np.uint8
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
    assert out.shape[:2] == arr.shape and out.get_data_dtype() == np.uint8
    assert set(np.unique(np.asarray(out.dataobj))) <= {0, 1, 2}  # 2: the guide segment (return_guide "segment")
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
    r = requests.post(url + f"/train/{HIPPO}", json={"max_epochs": 3, "val_split": 0.5}, timeout=60)
    assert r.status_code == 200, r.text
    t0 = time.time()
    progress = served.parent / "train_progress.json"
    while (
        not (progress.is_file() and json.loads(progress.read_text())["start_ts"] >= t0 - 5) and time.time() - t0 < 120
    ):
        time.sleep(0.5)  # the training subprocess has started its run
    # inference is served while training runs (training is a subprocess)
    infer_start = time.time()
    r = requests.post(url + f"/infer/{HIPPO}", params={"image": image_id, "output": "json"}, timeout=300)
    infer_end = time.time()
    assert r.status_code == 200
    status = requests.get(url + "/train/", timeout=30).json()
    while status["status"] in ("SUBMITTED", "RUNNING") and time.time() - t0 < 300:
        time.sleep(2)
        status = requests.get(url + "/train/", timeout=30).json()
    assert status["status"] == "DONE", json.dumps(status, indent=1)[-3000:]
    history = json.loads((served.parent / "train_history.json").read_text())
    last = history[-1]
    assert last["start_ts"] < infer_end and last["end_ts"] > infer_start, "the inference did not overlap the training"
    assert last["train_cases"] == 1 and last["val_cases"] == 1
    assert last["swapped"] == (last["val_dice_after"] >= last["val_dice_before"])
    assert (_sha(served) != before_sha) == last["swapped"]
    info = requests.get(url + "/info/", timeout=30).json()
    stats = info["train_stats"][HIPPO]
    assert stats["end_ts"] == last["end_ts"] and stats["epoch"] == stats["total_epochs"] == 3
    assert stats["total_time"] > 0 and stats["best_metric"] == (last["val_dice_after"] if last["swapped"] else
                                                                  last["val_dice_before"])  # fmt: skip
    if last["swapped"]:
        assert info["models"][HIPPO]["weights"]["source"] == "app training"
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
    assert len(list(runs.glob("*/checkpoint_last.pt"))) > n_before, "training wrote no epoch checkpoint in 240 s"
    assert requests.get(server.url + "/train/", params={"check_if_running": "true"}, timeout=30).status_code == 200
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


def test_interactive_clicks_change_voxels_without_vit_rerun(server):
    import nibabel as nib
    import requests

    ids = sorted(requests.get(server.url + "/datastore/", params={"output": "all"}, timeout=30).json()["objects"])
    image_id = ids[0]
    truth = np.asarray(nib.load(server.root / "demo" / "labelsTr" / f"{image_id}.nii.gz").dataobj).astype(int)
    anterior = np.argwhere(truth == 1)
    fg = [int(v) for v in anterior[len(anterior) // 2]]
    bg = [1, 1, 1]

    def click(params: dict, output: str = "image"):
        r = requests.post(server.url + f"/infer/{INTERACTIVE}", params={"image": image_id, "output": output},
                          data={"params": json.dumps(params)}, timeout=300)  # fmt: skip
        assert r.status_code == 200, r.text[:2000]
        return np.asarray(_load(r.content).dataobj) if output == "image" else r.json()

    first = click({"foreground": [fg], "background": [bg], "label": "hippocampus anterior", "return_guide": "none"})
    assert first.dtype == np.uint8 and set(np.unique(first)) <= {0, 1}
    assert first[tuple(fg)] == 1 and first[tuple(bg)] == 0  # the clicks' voxels went the clicked way
    # a background click on the same voxel removes it; the bundle's own name "anterior" is accepted too
    second = click({"foreground": [], "background": [fg], "label": "anterior"})
    assert second[tuple(fg)] == 0
    # without label: the full label map; the foreground click's voxel gets a foreground class
    full = click({"foreground": [fg], "background": []})
    assert full[tuple(fg)] in (1, 2) and set(np.unique(full)) <= {0, 1, 2}
    # the image's tokens were computed once: more clicks on the same image cost no ViT pass
    a = click({"foreground": [fg], "background": []}, output="json")
    b = click({"foreground": [fg, bg], "background": []}, output="json")
    assert a["clicks"]["vit_passes"] == b["clicks"]["vit_passes"] >= 1


@pytest.mark.parametrize("method", ["clickmaps", "regions"])
def test_foreground_clicks_on_missed_voxels_turn_them_foreground(server, method):
    """Issue 11: every foreground click on a voxel the model missed adds it (whatever the guide ViT's weights), every
    background click on it removes it again, and nothing changes far from the clicks."""
    import nibabel as nib
    import requests

    ids = requests.get(server.url + "/datastore/", params={"output": "all"}, timeout=30).json()["objects"]
    image_id = sorted(ids)[1]
    truth_img = nib.load(server.root / "demo" / "labelsTr" / f"{image_id}.nii.gz")
    truth = np.asarray(truth_img.dataobj).astype(int)
    zooms = np.asarray(truth_img.header.get_zooms()[:3], dtype=float)

    def click(fg: list, bg: list) -> np.ndarray:
        params = {"foreground": fg, "background": bg, "label": "hippocampus anterior", "click_method": method}
        r = requests.post(server.url + f"/infer/{INTERACTIVE}", params={"image": image_id, "output": "image"},
                          data={"params": json.dumps(params)}, timeout=300)  # fmt: skip
        assert r.status_code == 200, r.text[:2000]
        return np.asarray(_load(r.content).dataobj)

    base = click([], [])
    missed = np.argwhere((truth == 1) & (base == 0))
    assert len(missed) >= 5, "the random-init test network should miss part of the anterior label"
    points = [[int(v) for v in missed[i]] for i in np.linspace(0, len(missed) - 1, 5).astype(int)]
    added = click(points, [])
    assert all(added[tuple(p)] == 1 for p in points), "each foreground click must add its voxel"
    grid = np.indices(base.shape)
    near = np.zeros(base.shape, bool)
    for p in points:  # 3 sigma (12 mm) of a click map, 6 mm of a region; a voxel of slack for the resampling
        near |= np.sqrt(sum(((g - c) * z) ** 2 for g, c, z in zip(grid, p, zooms))) <= 12.0 + 2 * zooms.max()
    assert np.array_equal(added[~near], base[~near]), "clicks must not change voxels far from them"
    removed = click([], points)
    assert all(removed[tuple(p)] == 0 for p in points), "each background click must remove its voxel"


def test_mirror_uncertainty_strategy(server):
    import requests

    r = requests.post(server.url + "/activelearning/mirror_uncertainty", json={"max_candidates": 1}, timeout=300)
    assert r.status_code == 200, r.text
    res = r.json()
    assert 0.0 <= res["score"] <= 1.0
    info = requests.get(server.url + "/datastore/image/info", params={"image": res["id"]}, timeout=30).json()
    assert info["mirror_uncertainty"]["score"] == res["score"]


def _upload(arr: np.ndarray, name: str = "x.nii.gz", affine=None):
    import nibabel as nib

    return {"file": (name, _save(nib.Nifti1Image(arr, np.eye(4) if affine is None else affine)))}


@pytest.mark.parametrize(
    "model, params, needle",
    [
        ("no_such_model", {}, "unknown model"),
        (HIPPO, {"mirror_axes": [5]}, "mirror_axes"),
        (HIPPO, {"mirror_axes": "0,x"}, "mirror_axes"),
        (HIPPO, {"return_guide": "maybe"}, "return_guide"),
        (INTERACTIVE, {"foreground": [["a", "b", "c"]]}, "foreground"),
        (INTERACTIVE, {"foreground": "16,20,16"}, "foreground"),
        (INTERACTIVE, {"background": [[1, 2]]}, "background"),
        (INTERACTIVE, {"foreground": [[16, 20, 16]], "label": "Segment_1"}, "Segment_1"),
    ],
)
def test_bad_infer_parameters_get_400_with_reason(server, model, params, needle):
    import requests

    ids = sorted(requests.get(server.url + "/datastore/", params={"output": "all"}, timeout=30).json()["objects"])
    r = requests.post(server.url + f"/infer/{model}", params={"image": ids[0], "output": "json"},
                      data={"params": json.dumps(params)}, timeout=120)  # fmt: skip
    assert 400 <= r.status_code < 500, (r.status_code, r.text[:500])
    assert needle in r.json()["detail"], r.json()


def test_wrong_dimension_images_get_400(server):
    import requests

    r = requests.post(server.url + f"/infer/{HIPPO}", params={"output": "json"},
                      files=_upload(np.zeros((40, 30), np.float32)), timeout=120)  # fmt: skip
    assert r.status_code == 400 and "2D" in r.json()["detail"] and "3D" in r.json()["detail"], r.text
    r = requests.post(server.url + f"/infer/{FETAL}", params={"output": "json"},
                      files=_upload(np.zeros((20, 30, 24), np.float32)), timeout=120)  # fmt: skip
    assert r.status_code == 400 and "3D" in r.json()["detail"] and "2D" in r.json()["detail"], r.text


def test_absolute_path_image_refused(server):
    """``image=<server path>`` would segment any NIfTI on the server's disk: only datastore ids (or uploads)."""
    import requests

    some_file = str(server.studies / "hippocampus_000.nii.gz")  # exists, readable, but not an id
    r = requests.post(server.url + f"/infer/{HIPPO}", params={"image": some_file, "output": "json"}, timeout=60)
    assert r.status_code == 400 and "datastore image id" in r.json()["detail"], r.text


def test_clicks_outside_the_image_are_reported(server):
    import nibabel as nib
    import requests

    image_id = "hippocampus_000"
    shape = nib.load(server.studies / f"{image_id}.nii.gz").shape
    outside = [shape[0] + 10, 2, 2]
    params = {"foreground": [[shape[0] // 2, shape[1] // 2, shape[2] // 2], outside], "background": [[-5, 0, 0]]}
    r = requests.post(server.url + f"/infer/{INTERACTIVE}", params={"image": image_id, "output": "json"},
                      data={"params": json.dumps(params)}, timeout=300)  # fmt: skip
    assert r.status_code == 200, r.text
    clicks = r.json()["clicks"]
    assert clicks["foreground"] == 1 and clicks["background"] == 0
    assert sorted(tuple(o["point"]) for o in clicks["outside"]) == sorted(
        [tuple(map(float, outside)), (-5.0, 0.0, 0.0)]
    )


def test_info_answers_while_inference_runs(server):
    """One /infer must not block the server: /info/ and the datastore answer while it runs."""
    import requests

    arr = (np.random.default_rng(3).random((96, 96, 64)) * 100).astype(np.float32)
    done = {}

    def infer() -> None:
        r = requests.post(server.url + f"/infer/{HIPPO}", params={"output": "json"}, files=_upload(arr),
                          data={"params": json.dumps({"mirror_axes": "0,1,2"})}, timeout=600)  # fmt: skip
        done["t"], done["status"] = time.time(), r.status_code

    thread = threading.Thread(target=infer)
    thread.start()
    time.sleep(1.5)  # the upload is in and inference has started
    t0 = time.time()
    info = requests.get(server.url + "/info/", timeout=60)
    ds = requests.get(server.url + "/datastore/", timeout=60)
    answered = time.time()
    thread.join()
    assert info.status_code == 200 and ds.status_code == 200 and done["status"] == 200
    assert answered < done["t"], "the inference finished before /info/ was asked: make it longer"
    assert answered - t0 < 5.0, f"/info/ and /datastore/ took {answered - t0:.1f} s behind a running inference"


def test_mirror_uncertainty_with_a_2d_image_in_the_datastore(server):
    import requests

    arr = (np.random.default_rng(4).random((60, 50)) * 255).astype(np.float32)
    r = requests.put(server.url + "/datastore/image", params={"image": "us_2d"}, files=_upload(arr, "us_2d.nii.gz"),
                     timeout=60)  # fmt: skip
    assert r.status_code == 200, r.text
    r = requests.post(server.url + "/activelearning/mirror_uncertainty", json={"max_candidates": 8}, timeout=600)
    assert r.status_code == 200, r.text
    assert r.json().get("id") != "us_2d"  # the 3D model scores only 3D images
    r = requests.post(server.url + "/activelearning/mirror_uncertainty", json={"model": FETAL}, timeout=600)
    assert r.status_code == 200 and r.json()["id"] == "us_2d", r.text


def test_final_label_with_unknown_values_refused_unless_guide_is_named(server):
    """The guide segment (value 3 for the hippocampus model) must never reach training as a class."""
    import nibabel as nib
    import requests

    image_id = "hippocampus_000"
    img = nib.load(server.studies / f"{image_id}.nii.gz")
    truth = np.asarray(nib.load(server.root / "demo" / "labelsTr" / f"{image_id}.nii.gz").dataobj).astype(np.uint8)
    label = truth.copy()
    label[0, 0, 0] = 3
    payload = _save(nib.Nifti1Image(label, img.affine))
    r = requests.put(server.url + "/datastore/label", params={"image": image_id, "tag": "final"},
                     files={"label": (f"{image_id}.nii.gz", payload)}, timeout=60)  # fmt: skip
    assert r.status_code == 400 and "[3]" in r.json()["detail"] and "guide" in r.json()["detail"], r.text
    info = {"label_info": [{"name": "hippocampus anterior", "idx": 1}, {"name": "hippocampus posterior", "idx": 2},
                           {"name": "guide", "idx": 3}], "model": HIPPO}  # fmt: skip
    r = requests.put(server.url + "/datastore/label", params={"image": image_id, "tag": "final"},
                     data={"params": json.dumps(info)}, files={"label": (f"{image_id}.nii.gz", payload)},
                     timeout=60)  # fmt: skip
    assert r.status_code == 200, r.text
    stored = np.asarray(nib.load(server.studies / "labels" / "final" / f"{image_id}.nii.gz").dataobj)
    assert np.array_equal(stored, truth)


def _constant_refiner(path: Path, num_classes: int, favoured: int, **info) -> None:
    """A click refiner whose correction is a constant +10 for class ``favoured`` (weights zero, last bias set)."""
    import torch

    from guidino_monai.interactive import ClickRefinementNet, save_refiner

    net = ClickRefinementNet(3, num_classes, channels=(4, 8), strides=(2,), num_res_units=0)
    with torch.no_grad():
        for p in net.parameters():
            p.zero_()
        last = [m for m in net.unet.modules() if isinstance(m, (torch.nn.Conv3d, torch.nn.ConvTranspose3d))][-1]
        last.bias[favoured] = 10.0
    save_refiner(net, path, steps=7, num_train_cases=3, guide_vit="random-init", **info)


def test_click_refiner_is_used_when_the_bundle_has_one(server):
    """``models/click_refiner.pt`` in the served bundle: /info/ reports it, clicks go through it (``click_method``
    ``auto``), ``regions`` and ``clickmaps`` bypass it; a broken file is named in /info/, 'auto' falls back to the click
    maps, 'refiner' gets a 400."""
    import requests

    refiner = server.root / "model" / HIPPO / "models" / "click_refiner.pt"
    assert not refiner.exists()
    status = requests.get(server.url + "/info/", timeout=30).json()["models"][INTERACTIVE]["click_refiner"]
    assert status["present"] is False and "train_refiner" in status["how"]
    assert "click_method" in requests.get(server.url + "/info/", timeout=30).json()["models"][INTERACTIVE]["config"]

    def click(method: str, output: str = "image"):
        params = {"foreground": [[10, 12, 10]], "background": [], "click_method": method}
        return requests.post(server.url + f"/infer/{INTERACTIVE}", params={"image": "hippocampus_001", "output": output},
                             data={"params": json.dumps(params)}, timeout=300)  # fmt: skip

    r = click("refiner", "json")
    assert r.status_code == 400 and "no click refiner" in r.json()["detail"], r.text
    assert click("auto", "json").json()["clicks"]["method"] == "clickmaps"  # no refiner: the training-free maps
    assert click("regions", "json").json()["clicks"]["method"] == "regions"
    maps = np.asarray(_load(click("auto").content).dataobj)
    regions = np.asarray(_load(click("regions").content).dataobj)
    favoured = int(np.argmin([(maps == c).sum() for c in range(3)]))  # the class the random network gives least
    assert (maps == favoured).mean() < 0.5
    try:
        _constant_refiner(refiner, 3, favoured=favoured)
        status = requests.get(server.url + "/info/", timeout=30).json()["models"][INTERACTIVE]["click_refiner"]
        assert status["present"] is True and status["steps"] == 7 and status["guide_vit"] == "random-init"
        used = click("auto", "json")
        assert used.status_code == 200 and used.json()["clicks"]["method"] == "refiner", used.text
        refined = np.asarray(_load(click("auto").content).dataobj)
        grid = np.indices(refined.shape)
        dist = np.sqrt(sum((g - c) ** 2 for g, c in zip(grid, (10, 12, 10))))
        assert (refined[dist <= 2] == favoured).mean() > 0.9  # the refiner's +10 for that class decided near the click
        assert (refined[dist > 20] == favoured).mean() < 0.5  # and it reaches no further than the click's neighbourhood
        assert np.array_equal(np.asarray(_load(click("regions").content).dataobj), regions)  # 'regions' bypasses it
        assert np.array_equal(np.asarray(_load(click("clickmaps").content).dataobj), maps)  # and so does 'clickmaps'
        _constant_refiner(refiner, 3, favoured=favoured, reach=8.0)  # trained with a wider reach: served with it
        status = requests.get(server.url + "/info/", timeout=30).json()["models"][INTERACTIVE]["click_refiner"]
        assert status["present"] is True and status["reach"] == 8.0
        wide = np.asarray(_load(click("auto").content).dataobj)
        assert np.all(wide[refined == favoured] == favoured)  # a wider blend keeps what the default reach changed
        assert (wide == favoured).sum() > (refined == favoured).sum()  # and changes voxels further from the click
        assert (wide[(dist > 5) & (dist <= 7)] == favoured).mean() > 0.9
        refiner.write_bytes(b"not a torch file")
        status = requests.get(server.url + "/info/", timeout=30).json()["models"][INTERACTIVE]["click_refiner"]
        assert status["present"] is False and "click_refiner.pt" in status["error"]
        fallback = click("auto", "json")
        assert fallback.status_code == 200 and fallback.json()["clicks"]["method"] == "clickmaps"
        assert "click_refiner.pt" in fallback.json()["clicks"]["refiner_error"]
        bad = click("refiner", "json")
        assert bad.status_code == 400 and "click_refiner.pt" in bad.json()["detail"], bad.text
    finally:
        refiner.unlink(missing_ok=True)
