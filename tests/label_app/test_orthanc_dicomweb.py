"""The label app on a real Orthanc DICOMweb server: list series, infer on a series, store the label as DICOM SEG.

Needs the Debian packages ``orthanc`` and ``orthanc-dicomweb`` (``.ci/services`` installs them); skips where they
are missing, except under ``CI=true`` where a missing Orthanc is a failure (CI installs it: a skip would hide that).
Orthanc runs as a subprocess on a free loopback port with its storage in a temporary folder.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import HIPPO, Server, Service, free_port
from testing_utils import HIPPOCAMPUS_DIR

pytestmark = pytest.mark.usefixtures("monailabel_ready")


HIPPO_DATA = HIPPOCAMPUS_DIR  # ../shared/data/msd_hippocampus, or $GUIDINO_SHARED_DATA/msd_hippocampus
DICOMWEB_PLUGINS = ["/usr/share/orthanc/plugins/libOrthancDicomWeb.so", "/usr/lib/orthanc/libOrthancDicomWeb.so"]
CASES = ["hippocampus_001", "hippocampus_003"]
LPS = np.diag([-1.0, -1.0, 1.0, 1.0])


def _orthanc_binary() -> str | None:
    return shutil.which("Orthanc") or next((p for p in ("/usr/sbin/Orthanc", "/usr/bin/Orthanc") if os.path.exists(p)),
                                           None)  # fmt: skip


def _dicomweb_plugin() -> str | None:
    return next((p for p in DICOMWEB_PLUGINS if os.path.exists(p)), None)


def nifti_to_dicom_series(
    nifti: Path, out_dir: Path, patient: str, study_uid: str, series_uid: str, frame_uid: str
) -> list[Path]:
    """One MR Image Storage file per slice along the NIfTI's third axis, geometry from its affine (RAS -> LPS)."""
    import nibabel as nib
    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, MRImageStorage, generate_uid

    img = nib.load(str(nifti))
    arr = np.round(np.asanyarray(img.dataobj, dtype=np.float32)).astype(np.int16)
    m = LPS @ img.affine
    spacing = np.linalg.norm(m[:3, :3], axis=0)
    col_dir, row_dir = m[:3, 0] / spacing[0], m[:3, 1] / spacing[1]  # along a row (index i), down a column (j)
    out_dir.mkdir(parents=True, exist_ok=True)
    files = []
    for k in range(arr.shape[2]):
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = MRImageStorage
        meta.MediaStorageSOPInstanceUID = generate_uid()
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        path = out_dir / f"{k:04d}.dcm"
        ds = FileDataset(str(path), {}, file_meta=meta, preamble=b"\0" * 128)
        ds.is_little_endian, ds.is_implicit_VR = True, False
        ds.SOPClassUID, ds.SOPInstanceUID = MRImageStorage, meta.MediaStorageSOPInstanceUID
        ds.PatientName, ds.PatientID = patient, patient
        ds.StudyInstanceUID, ds.SeriesInstanceUID = study_uid, series_uid
        ds.FrameOfReferenceUID = frame_uid
        ds.StudyDate, ds.StudyTime, ds.StudyID, ds.AccessionNumber = "20240101", "120000", "1", ""
        ds.Modality, ds.SeriesNumber, ds.InstanceNumber = "MR", 1, k + 1
        ds.SeriesDescription = nifti.name
        ds.ImagePositionPatient = [float(v) for v in (m @ [0, 0, k, 1])[:3]]
        ds.ImageOrientationPatient = [float(v) for v in (*col_dir, *row_dir)]
        ds.PixelSpacing = [float(spacing[1]), float(spacing[0])]  # row spacing (j), column spacing (i)
        ds.SliceThickness = float(spacing[2])
        ds.SpacingBetweenSlices = float(spacing[2])
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.Rows, ds.Columns = arr.shape[1], arr.shape[0]
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
        ds.PixelData = np.ascontiguousarray(arr[:, :, k].T).tobytes()
        ds.save_as(str(path), write_like_original=False)
        files.append(path)
    return files


class Orthanc(Service):
    """``Orthanc <config.json>`` on free loopback ports, storage in ``root``."""

    def __init__(self, root: Path):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.dicomweb = self.url + "/dicom-web"
        self.name, self.ready_url = "Orthanc", self.dicomweb + "/studies"
        config = {
            "Name": "guidino-test", "HttpPort": self.port, "DicomPort": free_port(), "DicomServerEnabled": False,
            "StorageDirectory": str(root / "storage"), "IndexDirectory": str(root / "index"),
            "RemoteAccessAllowed": False, "AuthenticationEnabled": False, "HttpServerEnabled": True,
            "Plugins": [_dicomweb_plugin()], "DicomWeb": {"Enable": True, "Root": "/dicom-web/"},
        }  # fmt: skip
        (root / "orthanc.json").write_text(json.dumps(config, indent=1))
        self.log_path = root / "orthanc.log"
        self.log = open(self.log_path, "w")
        self.proc = subprocess.Popen([_orthanc_binary(), str(root / "orthanc.json")], stdout=self.log,
                                     stderr=subprocess.STDOUT, cwd=str(root))  # fmt: skip


@pytest.fixture(scope="module")
def orthanc(tmp_path_factory, monailabel_ready):
    if not _orthanc_binary() or not _dicomweb_plugin():
        message = ("Orthanc with its DICOMweb plugin is not installed (apt-get install orthanc orthanc-dicomweb;"
                   " .ci/services does it in CI)")  # fmt: skip
        if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
            pytest.fail(f"CI=true: {message}; .ci/services must have installed it")  # a CI run must not skip it
        pytest.skip(message)
    if not (HIPPO_DATA / "imagesTr").is_dir():
        pytest.skip(f"MSD hippocampus data not found at {HIPPO_DATA}")
    import requests
    from pydicom.uid import generate_uid

    root = tmp_path_factory.mktemp("orthanc")
    srv = Orthanc(root)
    try:
        srv.wait_ready(timeout=60, poll=0.5)
        srv.series = {}
        for i, case in enumerate(CASES):
            study_uid, series_uid = generate_uid(), generate_uid()
            files = nifti_to_dicom_series(HIPPO_DATA / "imagesTr" / f"{case}.nii.gz", root / "dicom" / case,
                                          f"P{i:03d}", study_uid, series_uid, generate_uid())  # fmt: skip
            for f in files:
                r = requests.post(srv.url + "/instances", data=f.read_bytes(), timeout=30)
                assert r.status_code == 200, r.text
            srv.series[series_uid] = {"case": case, "study": study_uid, "n": len(files)}
        yield srv
    finally:
        srv.stop()


@pytest.fixture(scope="module")
def server(orthanc, tmp_path_factory):
    root = tmp_path_factory.mktemp("label_dicomweb")
    (root / "model").mkdir()
    extra_env = {
        "MONAI_LABEL_DICOMWEB_CACHE_PATH": str(root / "dicom_cache"),
        "MONAI_LABEL_DICOMWEB_SEARCH_FILTER": json.dumps({"Modality": "MR"}),
        "MONAI_LABEL_DICOMWEB_CACHE_EXPIRY": "1",
    }
    saved = {k: os.environ.get(k) for k in extra_env}
    os.environ.update(extra_env)  # the Server copies the environment when it starts
    try:
        srv = Server(orthanc.dicomweb, root / "model", HIPPO, root / "server.log")
    finally:
        for k, v in saved.items():
            os.environ.pop(k) if v is None else os.environ.__setitem__(k, v)
    try:
        srv.wait_ready()
        yield srv
    finally:
        srv.stop()


def test_datastore_lists_orthanc_series(server, orthanc):
    import requests

    stats = requests.get(server.url + "/datastore/", timeout=60).json()
    assert stats["total"] == len(CASES), stats
    objects = requests.get(server.url + "/datastore/", params={"output": "all"}, timeout=60).json()["objects"]
    assert set(orthanc.series) <= set(objects), (sorted(objects), server.tail())
    nxt = requests.post(server.url + "/activelearning/random", json={}, timeout=60).json()
    assert nxt["id"] in orthanc.series


def _infer_series(server, series_uid: str):
    import gzip

    import nibabel as nib
    import requests

    r = requests.post(server.url + f"/infer/{HIPPO}", params={"image": series_uid, "output": "image"}, timeout=300)
    assert r.status_code == 200, r.text[:2000] + server.tail()
    data = gzip.decompress(r.content) if r.content[:2] == b"\x1f\x8b" else r.content
    return nib.Nifti1Image.from_bytes(data)


def test_infer_on_dicom_series_keeps_series_geometry(server, orthanc):
    import nibabel as nib

    series_uid, meta = next(iter(orthanc.series.items()))
    src = nib.load(str(HIPPO_DATA / "imagesTr" / f"{meta['case']}.nii.gz"))
    out = _infer_series(server, series_uid)
    assert out.shape[:3] == src.shape[:3]
    np.testing.assert_allclose(out.affine, src.affine, atol=1e-3)
    assert set(np.unique(np.asarray(out.dataobj))) <= {0, 1, 2, 3}  # 3: the guide segment (return_guide "segment")


def test_final_label_stored_in_orthanc_as_dicom_seg(server, orthanc):
    import io

    import nibabel as nib
    import pydicom
    import pydicom_seg
    import requests

    series_uid, meta = list(orthanc.series.items())[-1]
    src = nib.load(str(HIPPO_DATA / "imagesTr" / f"{meta['case']}.nii.gz"))
    pred = _infer_series(server, series_uid)  # the series' own geometry; a random net: use a known label instead
    label = np.zeros(pred.shape[:3], np.uint8)
    label[5:15, 10:30, 8:20], label[18:28, 10:30, 8:20] = 1, 2
    buf = io.BytesIO(nib.Nifti1Image(label, pred.affine).to_bytes())
    params = {"label_info": [{"name": "anterior", "idx": 1}, {"name": "posterior", "idx": 2}]}
    r = requests.put(server.url + "/datastore/label", params={"image": series_uid, "tag": "final"},
                     data={"params": json.dumps(params)}, files={"label": ("label.nii", buf.getvalue())},
                     timeout=120)  # fmt: skip
    assert r.status_code == 200, r.text[:2000] + server.tail()

    found = requests.post(orthanc.url + "/tools/find", json={"Level": "Instance", "Query": {"Modality": "SEG"},
                                                             "Expand": True}, timeout=30).json()  # fmt: skip
    assert len(found) == 1, found
    raw = requests.get(orthanc.url + f"/instances/{found[0]['ID']}/file", timeout=30).content
    dcm = pydicom.dcmread(io.BytesIO(raw))
    assert dcm.Modality == "SEG" and dcm.SOPClassUID == "1.2.840.10008.5.1.4.1.1.66.4"
    assert dcm.StudyInstanceUID == meta["study"]
    assert dcm.ReferencedSeriesSequence[0].SeriesInstanceUID == series_uid
    assert [s.SegmentLabel for s in dcm.SegmentSequence] == ["anterior", "posterior"]
    # the SEG decodes to the submitted label on the source grid (pydicom-seg returns z, y, x)
    seg = pydicom_seg.MultiClassReader().read(dcm)
    back = np.transpose(seg.data, (2, 1, 0))
    assert back.shape == label.shape and np.array_equal(back, label)
    np.testing.assert_allclose(seg.origin, (LPS @ src.affine)[:3, 3], atol=1e-3)
    # also over DICOMweb (QIDO-RS), as MONAI Label and Slicer see it
    qido = requests.get(orthanc.dicomweb + "/series", params={"Modality": "SEG"}, timeout=30).json()
    assert len(qido) == 1
    # and the app now counts the series as labelled
    time.sleep(1.5)  # the DICOMweb datastore caches QIDO answers (MONAI_LABEL_DICOMWEB_CACHE_EXPIRY=1)
    stats = requests.get(server.url + "/datastore/", timeout=60).json()
    assert stats["completed"] == 1, stats
