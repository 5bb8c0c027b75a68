# Copyright (c) guidino-monai contributors
# Licensed under the Apache License, Version 2.0 (the "License");
# you may not use this file except in compliance with the License.
# You may obtain a copy of the License at
#     http://www.apache.org/licenses/LICENSE-2.0
# Unless required by applicable law or agreed to in writing, software
# distributed under the License is distributed on an "AS IS" BASIS,
# WITHOUT WARRANTIES OR CONDITIONS OF ANY KIND, either express or implied.
# See the License for the specific language governing permissions and
# limitations under the License.

"""Helpers for the guidino MONAI bundles (called from their JSON configs)."""

from __future__ import annotations

from .report import HeadCircumferenceReport, SegmentationReport, case_metrics, save_overlay
from .utils import (
    TASKS,
    LabelDice,
    ProgressBar,
    TrainingCheckpoint,
    find_bundle_root,
    inference_datalist,
    is_main_process,
    loss_of,
    prepare_datalists,
    read_bundle_config,
    require_file,
)
from .weights import WeightsNotPublishedError, download_weights, require_loader_weights, require_weights

__all__ = [
    "HeadCircumferenceReport",
    "LabelDice",
    "TASKS",
    "ProgressBar",
    "SegmentationReport",
    "TrainingCheckpoint",
    "WeightsNotPublishedError",
    "case_metrics",
    "download_weights",
    "find_bundle_root",
    "inference_datalist",
    "is_main_process",
    "loss_of",
    "prepare_datalists",
    "read_bundle_config",
    "require_file",
    "require_loader_weights",
    "require_weights",
    "save_overlay",
]
