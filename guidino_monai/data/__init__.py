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

"""Datasets: checked Decathlon-style datalists, grouped splits and synthetic demo data."""

from __future__ import annotations

from .datalist import (
    MAX_CHANNELS,
    DatasetError,
    case_id,
    check_case,
    check_image,
    hc18_fetus_id,
    load_checked_datalist,
    split_by_group,
)
from .demo import DEMO_TASKS, make_demo_dataset

__all__ = [
    "DEMO_TASKS",
    "MAX_CHANNELS",
    "DatasetError",
    "case_id",
    "check_case",
    "check_image",
    "hc18_fetus_id",
    "load_checked_datalist",
    "make_demo_dataset",
    "split_by_group",
]
