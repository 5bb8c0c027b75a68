"""Shared helpers for the test suite (small random-init ViTs, paths to the shared real data)."""

from __future__ import annotations

import os
import warnings
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("GUIDINO_SHARED_DATA", REPO_ROOT.parent / "shared" / "data"))
HIPPOCAMPUS_DIR = SHARED_DATA / "msd_hippocampus"
HC18_DIR = SHARED_DATA / "hc18"
NO_HIPPOCAMPUS = f"real MSD hippocampus data not found at {HIPPOCAMPUS_DIR} (set GUIDINO_SHARED_DATA)"
NO_HC18 = f"real HC18 data not found at {HC18_DIR} (set GUIDINO_SHARED_DATA)"

#: a tiny random-init ViT for fast CPU tests
SMALL_VIT = {"depth": 2}


def quiet_random_init_warning() -> None:
    warnings.filterwarnings("ignore", message=".*has random weights.*")
