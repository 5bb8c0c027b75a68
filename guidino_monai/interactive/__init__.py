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

"""Click-based correction for guided networks (used by the MONAI Label app): training-free click maps, click regions
and TokenBook prototypes, and a click-trained refiner (:class:`ClickRefinementNet`)."""

from __future__ import annotations

from .click_maps import apply_clicks, bias_clicks, click_region
from .clicks import ClickRefiner, ClickSessions, image_digest, next_click, point_to_token, world_points_to_grid
from .refinement import (
    ClickRefinementNet,
    click_guidance,
    load_refiner,
    refine_with_clicks,
    save_refiner,
    simulate_clicks,
)

__all__ = [
    "ClickRefinementNet",
    "ClickRefiner",
    "ClickSessions",
    "apply_clicks",
    "bias_clicks",
    "click_guidance",
    "click_region",
    "image_digest",
    "load_refiner",
    "next_click",
    "point_to_token",
    "refine_with_clicks",
    "save_refiner",
    "simulate_clicks",
    "world_points_to_grid",
]
