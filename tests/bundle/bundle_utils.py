"""Helpers to run the bundles' configs through monai.bundle in a scratch copy of the bundle."""

from __future__ import annotations

import functools
import http.server
import os
import shutil
import subprocess
import sysconfig
import threading
import warnings
from pathlib import Path
from typing import Any

import torch
from monai.bundle import ConfigParser, ConfigWorkflow
from testing_utils import REPO_ROOT, SHARED_DATA

BUNDLES = REPO_ROOT / "bundles"
HIPPO = "guidino_hippocampus_mri_segmentation"
FETAL = "guidino_fetalhead_us_segmentation"
SCHEMA = SHARED_DATA.parent / "schemas" / "meta_schema_20240725.json"

#: small, fast settings for CPU tests (1 epoch, tiny ROI, 2-block random-init ViT, no workers)
FAST = {
    HIPPO: {
        "epochs": 1,
        "roi_size": [16, 24, 16],
        "num_workers": 0,
        "progress": False,
        "guide_backbone_kwargs": {"depth": 2},
        "guide_kwargs#guide_size": 28,
        "network_def#filters": [8, 16, 32, 64],
        "num_demo_cases": 6,
    },
    FETAL: {
        "epochs": 1,
        "learning_rate": 0.01,  # with 16 cases in batches of 2, one epoch is enough for a map that is not constant
        "roi_size": [64, 64],
        "batch_size": 2,
        "num_workers": 0,
        "progress": False,
        "guide_backbone_kwargs": {"depth": 2},
        "guide_kwargs#guide_size": 56,
        "network_def#channels": [8, 16, 32],
        "network_def#strides": [2, 2],
        "network_def#num_res_units": 1,
        "num_demo_cases": 16,
    },
}

INFER_KEYS = ("roi_size", "guide_backbone_kwargs", "guide_kwargs#guide_size", "network_def#filters",
              "network_def#channels", "network_def#strides", "network_def#num_res_units")  # fmt: skip


def copy_bundle(name: str, dst: Path) -> Path:
    target = Path(dst) / name
    shutil.copytree(BUNDLES / name, target, ignore=shutil.ignore_patterns("models", "runs", "eval", "demo_data"))
    return target


def infer_overrides(name: str) -> dict[str, Any]:
    return {k: v for k, v in FAST[name].items() if k in INFER_KEYS}


def run_workflow(bundle: Path, configs: list[str], workflow_type: str = "train", **override: Any) -> ConfigWorkflow:
    files = [str(bundle / "configs" / c) for c in configs]
    warnings.filterwarnings("ignore", message=".*has random weights.*")
    wf = ConfigWorkflow(
        config_file=files if len(files) > 1 else files[0],
        meta_file=str(bundle / "configs" / "metadata.json"),
        logging_file=False,
        workflow_type=workflow_type,
        bundle_root=str(bundle),
        **override,
    )
    wf.initialize()
    wf.run()
    wf.finalize()
    return wf


def clean_python(venv: Path) -> Path:
    """A venv that sees this environment's packages but not guidino_monai (the editable install's .pth never runs).

    ``--system-site-packages`` would process the global ``.pth`` files, among them the editable install's import
    hook; a plain path line in a ``.pth`` of the venv adds the global folders without processing theirs.
    """
    import venv as venv_mod

    venv_mod.create(venv, with_pip=False, symlinks=True)
    py = venv / "bin" / "python"
    site = subprocess.run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          capture_output=True, text=True, check=True).stdout.strip()  # fmt: skip
    paths = dict.fromkeys([sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]])
    Path(site, "_global_packages.pth").write_text("\n".join(paths) + "\n")
    return py


def run_py(py: Path, *args: str, cwd: Path, env: dict | None = None, timeout: int = 900) -> subprocess.CompletedProcess:
    base = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    return subprocess.run([str(py), *args], cwd=str(cwd), env={**base, "OMP_NUM_THREADS": "1", **(env or {})},
                          capture_output=True, text=True, timeout=timeout)  # fmt: skip


def network_from_config(bundle: Path, **override) -> torch.nn.Module:
    parser = ConfigParser()
    parser.read_config(str(bundle / "configs" / "inference.json"))
    parser.update(override)
    return parser.get_parsed_content("network_def")


class LoopbackRelease:
    """A folder served over HTTP on 127.0.0.1 (the "release" the weights are uploaded to)."""

    def __init__(self, folder: Path):
        handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(folder))
        handler.log_message = lambda *a, **k: None
        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()
