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

"""GuiDINO for MONAI: a frozen DINOv2/DINOv3 ViT as a guide generator for medical segmentation networks."""

from __future__ import annotations

__version__ = "0.1.0"

# subpackages are imported so that `$import guidino_monai` in a bundle config reaches every component
from . import bundle, data, engines, inferers, interactive, losses, metrics, networks, transforms, utils  # noqa: E402

__all__ = [
    "__version__",
    "bundle",
    "data",
    "engines",
    "inferers",
    "interactive",
    "losses",
    "metrics",
    "networks",
    "transforms",
    "utils",
]
