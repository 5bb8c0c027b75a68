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

from .backbones import (
    DEFAULT_GUIDE_BACKBONE,
    LORA_TARGET_MODULES,
    SUPPORTED_GUIDE_BACKBONES,
    GuideWeightsError,
    apply_lora,
    create_guide_backbone,
    load_guide_weights,
    load_lora_adapters,
    lora_state_dict,
    read_state_dict,
    save_lora_adapters,
)
from .blocks import (
    GateMode,
    GuideBranch,
    IntensityScaling,
    TokenBook,
    coords_to_grid,
    crop_guide,
    gate_features,
    guide_slice_index,
    guide_slice_positions,
    resample_guide,
    sample_guide,
)
from .layout import channels_last
from .nets import GateAt, GuidedDynUNet, GuidedSegResNet, GuidedUNet, GuidedUnet

__all__ = [
    "DEFAULT_GUIDE_BACKBONE",
    "LORA_TARGET_MODULES",
    "SUPPORTED_GUIDE_BACKBONES",
    "GateAt",
    "GateMode",
    "GuideBranch",
    "GuideWeightsError",
    "GuidedDynUNet",
    "GuidedSegResNet",
    "GuidedUNet",
    "GuidedUnet",
    "IntensityScaling",
    "TokenBook",
    "apply_lora",
    "channels_last",
    "coords_to_grid",
    "crop_guide",
    "create_guide_backbone",
    "gate_features",
    "guide_slice_index",
    "guide_slice_positions",
    "load_guide_weights",
    "load_lora_adapters",
    "lora_state_dict",
    "read_state_dict",
    "resample_guide",
    "sample_guide",
    "save_lora_adapters",
]
