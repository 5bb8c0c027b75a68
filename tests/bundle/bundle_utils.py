"""Helpers to run the bundles' configs through monai.bundle in a scratch copy of the bundle."""

from __future__ import annotations

import shutil
import warnings
from pathlib import Path
from typing import Any

from monai.bundle import ConfigWorkflow
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
        "network_def#init_filters": 8,
        "num_demo_cases": 6,
    },
    FETAL: {
        "epochs": 1,
        "roi_size": [64, 64],
        "batch_size": 4,
        "num_workers": 0,
        "progress": False,
        "guide_backbone_kwargs": {"depth": 2},
        "guide_kwargs#guide_size": 56,
        "network_def#channels": [8, 16, 32],
        "network_def#strides": [2, 2],
        "network_def#num_res_units": 1,
        "num_demo_cases": 8,
    },
}

INFER_KEYS = ("roi_size", "guide_backbone_kwargs", "guide_kwargs#guide_size", "network_def#init_filters",
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
