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

"""Click-based correction for guided networks, without retraining (used by the MONAI Label app)."""

from __future__ import annotations

from .click_maps import apply_clicks, click_region
from .clicks import ClickRefiner, ClickSessions, image_digest, next_click, point_to_token, world_points_to_grid

__all__ = [
    "ClickRefiner",
    "ClickSessions",
    "apply_clicks",
    "click_region",
    "image_digest",
    "next_click",
    "point_to_token",
    "world_points_to_grid",
]
