"""Fixtures for the MONAI Label app tests: a real ``monailabel start_server`` on a free loopback port."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
APP_DIR = REPO / "label_app"
HIPPO = "guidino_hippocampus_mri_segmentation"
FETAL = "guidino_fetalhead_us_segmentation"
INTERACTIVE = "guidino_interactive"
#: tiny, fast networks for CPU tests (random init)
TINY = {"guide_backbone_kwargs": {"depth": 2}, "guide_kwargs#guide_size": 56, "sw_batch_size": 2}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def make_studies(root: Path, num_cases: int = 4, final_labels: int = 1) -> Path:
    """A studies folder with demo hippocampus images; the first ``final_labels`` already have a final label."""
    from guidino_monai.data import make_demo_dataset

    demo = Path(make_demo_dataset(root / "demo", "hippocampus", num_cases=num_cases, seed=1))
    studies = root / "studies"
    (studies / "labels" / "final").mkdir(parents=True)
    for i, img in enumerate(sorted((demo / "imagesTr").glob("*.nii.gz"))):
        shutil.copy(img, studies / img.name)
        if i < final_labels:
            shutil.copy(demo / "labelsTr" / img.name, studies / "labels" / "final" / img.name)
    return studies


def seed_mixed_weights(name: str, model_dir: Path, image: Path, most: float = 0.8) -> int:
    """Pre-seed the app copy of bundle ``name`` (TINY overrides) with random weights whose answer on ``image`` gives
    no class more than ``most`` of the pixels, so a test that clicks on what the network answered or missed does not
    depend on the luck of an unseeded init (about a quarter of the fetal bundle's random inits answer one class
    everywhere). Returns the seed used."""
    import torch
    from monai.bundle import ConfigParser

    sys.path.insert(0, str(APP_DIR))
    from lib.bundles import atomic_torch_save, prepare_bundle

    dst = Path(prepare_bundle(name, model_dir, TINY, "random"))
    parser = ConfigParser()
    parser.read_config(str(dst / "configs" / "inference.json"))
    parser["bundle_root"], parser["device"] = str(dst), "$torch.device('cpu')"
    data = parser.get_parsed_content("preprocessing")({"image": str(image)})
    inferer = parser.get_parsed_content("inferer")
    for seed in range(50):
        torch.manual_seed(seed)
        net = parser.get_parsed_content("network_def", instantiate=True, lazy=False).eval()
        with torch.no_grad():
            pred = inferer(data["image"][None], net).argmax(1)
        if torch.bincount(pred.flatten()).max().item() <= most * pred.numel():
            atomic_torch_save(net.state_dict(), dst / "models" / "model.pt")
            return seed
    raise RuntimeError(f"no seed in 0..49 gives an answer with no class over {most:.0%} of {image}")


class Service:
    """A subprocess on a loopback port with its log in a file: ``proc``, ``log``, ``log_path``, ``name`` and
    ``ready_url`` (answers 200 once the service is up) are set by subclasses."""

    name = "service"
    ready_url = ""
    proc: subprocess.Popen

    def wait_ready(self, timeout: float = 240, poll: float = 1.0) -> None:
        import requests

        end = time.time() + timeout
        while time.time() < end:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited with {self.proc.returncode}:\n{self.tail()}")
            try:
                if requests.get(self.ready_url, timeout=5).status_code == 200:
                    return
            except requests.RequestException:
                pass
            time.sleep(poll)
        raise TimeoutError(f"{self.name} not ready after {timeout}s:\n{self.tail()}")

    def tail(self, n: int = 60) -> str:
        self.log.flush()
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()


class Server(Service):
    """``python -m monailabel.main start_server`` as a subprocess, with its log in a file."""

    def __init__(self, studies: str, model_dir: Path, models: str, log: Path, extra_conf: dict | None = None):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.name, self.ready_url = "server", self.url + "/info/"
        self.log_path = log
        conf = {"models": models, "model_dir": str(model_dir), "bundle_overrides": json.dumps(TINY),
                "init_weights": "random", **(extra_conf or {})}  # fmt: skip
        cmd = [sys.executable, "-m", "monailabel.main", "start_server", "--app", str(APP_DIR), "--studies", studies,
               "--host", "127.0.0.1", "--port", str(self.port)]  # fmt: skip
        for k, v in conf.items():
            cmd += ["--conf", k, v]
        env = dict(os.environ)
        env.update(
            MONAI_LABEL_AUTO_UPDATE_SCORING="false",
            MONAI_LABEL_DATASTORE_AUTO_RELOAD="false",
            MONAI_LABEL_SESSION_PATH=str(model_dir.parent / "sessions"),
            PYTHONPATH=os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")]).rstrip(os.pathsep),
            OMP_NUM_THREADS="2",
        )
        self.log = open(log, "w")
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT, env=env, cwd=str(model_dir.parent))


@pytest.fixture(scope="module")
def monailabel_ready():
    pytest.importorskip("monailabel", reason="MONAI Label is an optional extra: pip install -e .[label]")
    pytest.importorskip("requests")


def serve_all_models(root: Path):
    """A server on 4 studies (1 with a final label) serving every model, for a module fixture to yield; stopped after."""
    studies = make_studies(root, num_cases=4, final_labels=1)
    images = sorted(studies.glob("*.nii.gz"))
    seed_mixed_weights(HIPPO, root / "model", images[1])  # the image the missed-voxel clicks test uses
    yield from serve(root, studies, f"{HIPPO},{FETAL},{INTERACTIVE}")


def serve(root: Path, studies: Path, models: str, extra_conf: dict | None = None):
    """A server on ``studies`` serving ``models``, for a module fixture to yield (``root`` and ``studies`` set on it);
    stopped after."""
    srv = Server(str(studies), root / "model", models, root / "server.log", extra_conf=extra_conf)
    try:
        srv.wait_ready()
        srv.root, srv.studies = root, studies
        yield srv
    finally:
        srv.stop()
