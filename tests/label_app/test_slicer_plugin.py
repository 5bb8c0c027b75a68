"""3D Slicer's MONAI Label plugin against the live server over real HTTP (issue 11's "done when").

The plugin's client logic is reproduced in ``slicer_client.py`` (getParamsFromConfig, the options table, the request
building and the answer parsing). One server for the module; the test walks a radiologist's session: Fetch info ->
Next sample -> Auto-segmentation -> DeepGrow clicks -> Submit label -> Train (progress bar) -> Scoring.
"""

from __future__ import annotations

import time

import numpy as np
import pytest
from conftest import HIPPO, INTERACTIVE, serve_all_models
from slicer_client import SlicerClient, check_options_table, params_from_config, segments_of

pytestmark = pytest.mark.usefixtures("monailabel_ready")


@pytest.fixture(scope="module")
def server(tmp_path_factory, monailabel_ready):
    pytest.importorskip("SimpleITK")
    yield from serve_all_models(tmp_path_factory.mktemp("slicer"))


def _truth(server, image_id: str) -> np.ndarray:
    import nibabel as nib

    return np.asarray(nib.load(server.root / "demo" / "labelsTr" / f"{image_id}.nii.gz").dataobj).astype(np.int64)


def _zyx(array_xyz_point):
    """An IJK (x, y, z) point of the NIfTI grid -> index into SimpleITK's (z, y, x) array."""
    return tuple(int(v) for v in reversed(array_xyz_point))


def test_slicer_session_end_to_end(server):
    import nibabel as nib

    client = SlicerClient(server.url)
    # Fetch info: every options table entry can be shown and sent back, for every section and name
    info = client.info()
    assert check_options_table(info) == []
    for section, key in (("infer", "models"), ("train", "trainers"), ("activelearning", "strategies"),
                         ("scoring", "scoring")):  # fmt: skip
        for name in info[key]:
            params_from_config(info, section, name)  # IndexError here is Slicer's crash on an empty list
    # label names and colours for Slicer's segments
    assert info["models"][HIPPO]["labels"] == {"hippocampus anterior": 1, "hippocampus posterior": 2}
    assert set(info["models"][HIPPO]["label_colors"]) >= {"hippocampus anterior", "hippocampus posterior", "guide"}
    assert {"hippocampus anterior", "hippocampus posterior", "fetal head"} <= set(info["labels"])
    assert info["models"][INTERACTIVE]["type"] == "deepgrow"

    # Next sample (the strategy box's first entry, then the uncertainty strategy with its config)
    sample = client.next_sample("random", params_from_config(info, "activelearning", "random"))
    image_id = sample["id"]
    assert image_id in client.datastore()["objects"]
    sample2 = client.next_sample("mirror_uncertainty", params_from_config(info, "activelearning", "mirror_uncertainty"))
    assert sample2["id"] in client.datastore()["objects"]

    # Auto-segmentation: uint8 label map whose values are the segments of label_names, the guide one of them
    result_file, params = client.infer(HIPPO, image_id, params_from_config(info, "infer", HIPPO))
    assert result_file is not None, params
    array, segments = segments_of(result_file, params.get("label_names") or info["models"][HIPPO]["labels"])
    assert array.dtype == np.uint8
    assert segments == {"hippocampus anterior": 1, "hippocampus posterior": 2, "guide": 3}
    assert set(np.unique(array)) <= {0, 1, 2, 3}
    shape = nib.load(server.studies / f"{image_id}.nii.gz").shape
    assert array.shape == tuple(reversed(shape))

    # DeepGrow: the current segment is "hippocampus anterior"; a foreground click inside the true anterior region
    truth = _truth(server, image_id)
    inside = np.argwhere(truth == 1)
    fg = [int(v) for v in inside[len(inside) // 2]]
    dg = {"label": "hippocampus anterior", "foreground": [fg], "background": []}
    dg.update(params_from_config(info, "infer", INTERACTIVE))
    result_file, params = client.infer(INTERACTIVE, image_id, dg)
    clicked, segments = segments_of(result_file, ["hippocampus anterior"])
    assert clicked.dtype == np.uint8 and set(np.unique(clicked)) <= {0, 1}
    assert clicked[_zyx(fg)] == 1, "a foreground click must add its voxel to the segment"
    assert params["clicks"]["foreground"] == 1 and params["clicks"]["outside"] == []
    # then a background click on that voxel removes it again
    dg.update(background=[fg], foreground=[])
    result_file, _ = client.infer(INTERACTIVE, image_id, dg)
    unclicked, _ = segments_of(result_file, ["hippocampus anterior"])
    assert unclicked[_zyx(fg)] == 0, "a background click must remove its voxel from the segment"

    # Submit label: Slicer exports every segment, the guide one included (label_info names them)
    label = truth.astype(np.uint8)
    label.flat[0] = 3  # one voxel of the guide segment
    label_file = str(server.root / f"{image_id}_slicer.nii.gz")
    nib.save(nib.Nifti1Image(label, nib.load(server.studies / f"{image_id}.nii.gz").affine), label_file)
    label_info = [{"name": "hippocampus anterior", "idx": 1}, {"name": "hippocampus posterior", "idx": 2},
                  {"name": "guide", "idx": 3}]  # fmt: skip
    client.save_label(image_id, label_file, {"label_info": label_info, "model": HIPPO})
    stored = np.asarray(nib.load(server.studies / "labels" / "final" / f"{image_id}.nii.gz").dataobj)
    assert 3 not in np.unique(stored) and np.array_equal(stored, truth), "the guide segment must not become a class"
    assert client.info()["datastore"]["completed"] == 2

    # Train with the trainer's table (max_epochs edited to 2, as a user would), progress bar while it runs
    train_params = params_from_config(info, "train", HIPPO)
    assert {"max_epochs", "val_split", "learning_rate"} <= set(train_params)
    train_params["max_epochs"] = 2
    status = client.train_start(HIPPO, train_params)
    assert status.get("status") in ("SUBMITTED", "RUNNING"), status
    t0 = time.time()
    # a task is SUBMITTED before it runs (check_if_running answers 404 then): wait on the full status
    while client.train_status().get("status") in ("SUBMITTED", "RUNNING") and time.time() - t0 < 900:
        client.train_status(check_if_running=True)  # monitorTraining's own poll: must answer, running or not
        client.progress(client.info())  # monitorTraining: must not raise while a run goes
        time.sleep(2)
    final = client.train_status()
    assert final["status"] == "DONE", final
    stats = client.info()["train_stats"][HIPPO]
    assert stats["epoch"] == stats["total_epochs"] == 2 and stats["total_time"] > 0
    assert 0.0 <= stats["best_metric"] <= 1.0
    percent, accuracy = client.progress(client.info())
    assert accuracy == stats["best_metric"]

    # Scoring, as the options table configures it; the scores show in the datastore listing
    scoring_params = params_from_config(info, "scoring", "dice")
    assert scoring_params["model"] == HIPPO
    client.scoring("dice", scoring_params)
    t0 = time.time()
    while client.scoring_status().get("status") not in ("DONE", "ERROR", "FAILED") and time.time() - t0 < 900:
        time.sleep(2)
    assert client.scoring_status()["status"] == "DONE", client.scoring_status()
    objects = client.datastore()["objects"]
    scored = {k: v["image"]["info"].get("dice") for k, v in objects.items() if "final" in v.get("labels", {})}
    assert set(scored) == {"hippocampus_000", image_id}
    assert all(isinstance(d, float) and 0.0 <= d <= 1.0 for d in scored.values()), scored
