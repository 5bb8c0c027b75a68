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
"""``guidino_interactive``: click refinement (DeepGrow-style ``foreground``/``background`` points), no retraining."""

from __future__ import annotations

import logging
import os
import threading
from collections import OrderedDict
from typing import Any

import numpy as np
import torch
from fastapi import HTTPException
from monai.data import MetaTensor
from monailabel.interfaces.tasks.infer_v2 import InferType

from guidino_monai.interactive import ClickRefiner, world_points_to_grid

from .guided_bundle import GuidedBundleInferTask, wants_guide

__all__ = ["GuidedInteractiveInferTask"]

logger = logging.getLogger(__name__)


class GuidedInteractiveInferTask(GuidedBundleInferTask):
    """Click refinement on top of a GuiDINO bundle.

    Request parameters (MONAI Label's DeepGrow format): ``foreground`` and ``background``, lists of ``[x, y, z]``
    voxel indices of the input image, and optionally ``label`` (a label name or id): then the result holds only that
    label (as ``1``), as DeepGrow clients expect; without it the full label map is returned.

    The clicked voxels' DINO tokens become extra positive/negative prototypes of the TokenBook for this image, the guide
    is recomputed and the segmentation re-run (:class:`guidino_monai.interactive.ClickRefiner`). A session per image
    (the last ``max_sessions`` images, keyed by image path and weights mtime) keeps the preprocessed image and its
    token maps, so after the first request each click costs one TokenBook + backbone pass and no ViT pass.
    """

    def __init__(self, path: str, conf: dict[str, str], max_sessions: int = 4, **kwargs: Any) -> None:
        super().__init__(path, conf, type=InferType.DEEPGROW, **kwargs)
        self.description = "GuiDINO click refinement: clicks become TokenBook prototypes (no retraining)"
        self.max_sessions = max_sessions
        self._sessions: OrderedDict[tuple, ClickRefiner] = OrderedDict()
        self._lock = threading.Lock()
        self.stats = {"vit_passes": 0, "refinements": 0}

    def is_valid(self) -> bool:
        return self.valid

    def _refiner(self, data: dict[str, Any], network: torch.nn.Module) -> ClickRefiner:
        image = data[self.input_key]
        path = self.get_path()
        key = (str(data.get("image_path")), os.stat(path).st_mtime if path else 0, tuple(image.shape))
        with self._lock:
            refiner = self._sessions.get(key)
            if refiner is not None and refiner.network is network:
                self._sessions.move_to_end(key)
                return refiner
            inferer = super().inferer(data)
            refiner = ClickRefiner(network, getattr(inferer, "roi_size", None), **getattr(inferer, "sw_kwargs", {}))
            refiner.set_image(image[None])
            self.stats["vit_passes"] += 1
            self._sessions[key] = refiner
            while len(self._sessions) > self.max_sessions:
                self._sessions.popitem(last=False)
            return refiner

    def _points(self, data: dict[str, Any], name: str) -> list[list[float]]:
        points = data.get(name) or []
        if not isinstance(points, (list, tuple)) or any(
            not isinstance(p, (list, tuple)) or len(p) < self.dimension for p in points
        ):
            raise HTTPException(
                status_code=400,
                detail=f"{name!r} must be a list of [x, y{', z' if self.dimension == 3 else ''}] points.",
            )
        points = [[float(v) for v in p[: self.dimension]] for p in points]
        image = data[self.input_key]
        meta = image.meta if isinstance(image, MetaTensor) else {}
        original = meta.get("original_affine")
        if original is not None and isinstance(image, MetaTensor):  # file voxel indices -> preprocessed grid
            points = world_points_to_grid(points, np.asarray(original), np.asarray(image.affine))
        return points

    def run_inferer(self, data: dict[str, Any], convert_to_batch: bool = True, device: str = "cuda") -> dict:
        network = self._get_network(device, data)
        refiner = self._refiner(data, network)
        fg, bg = self._points(data, "foreground"), self._points(data, "background")
        logits, guide = refiner.predict(fg, bg)
        self.stats["refinements"] += 1
        image = data[self.input_key]
        pred = MetaTensor(logits[0])
        if isinstance(image, MetaTensor):
            pred.copy_meta_from(image)
        data[self.output_label_key] = pred
        if wants_guide(data):
            g = MetaTensor(guide[0])
            if isinstance(image, MetaTensor):
                g.copy_meta_from(image)
            data["guide"] = g
        return data

    def writer(self, data: dict[str, Any], extension: str | None = None, dtype: Any = None) -> tuple[Any, Any]:
        label = data.get("label")
        if label not in (None, "", []) and isinstance(self.labels, dict):
            idx = self.labels.get(str(label).lower(), None) if not str(label).isdigit() else int(label)
            if idx is None:
                raise HTTPException(status_code=400, detail=f"unknown label {label!r}; known: {self.labels}")
            pred = data[self.output_label_key]
            mask = pred == idx
            data[self.output_label_key] = (
                mask.astype(np.uint8) if isinstance(mask, np.ndarray) else mask.to(torch.uint8)
            )
        result_file, result_json = super().writer(data, extension, dtype)
        result_json["clicks"] = {"foreground": len(data.get("foreground") or []),
                                 "background": len(data.get("background") or [])}  # fmt: skip
        return result_file, result_json
