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

from __future__ import annotations

from .guide import (
    GateMode,
    GuideBranch,
    IntensityScaling,
    coords_to_grid,
    crop_guide,
    gate_features,
    guide_slice_index,
    guide_slice_positions,
    resample_guide,
    sample_guide,
)
from .tokenbook import TokenBook

__all__ = [
    "GateMode",
    "GuideBranch",
    "IntensityScaling",
    "TokenBook",
    "coords_to_grid",
    "crop_guide",
    "gate_features",
    "guide_slice_index",
    "guide_slice_positions",
    "resample_guide",
    "sample_guide",
]
