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

from .guided_base import GateAt, GuideOptions, check_spatial_shape
from .guided_dynunet import GuidedDynUNet
from .guided_segresnet import GuidedSegResNet
from .guided_unet import GuidedUNet

GuidedUnet = GuidedUNet

__all__ = [
    "GateAt",
    "GuideOptions",
    "GuidedDynUNet",
    "GuidedSegResNet",
    "GuidedUNet",
    "GuidedUnet",
    "check_spatial_shape",
]
