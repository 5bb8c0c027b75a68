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
"""Active learning by mirrored-prediction disagreement: label next the image the model is least consistent on."""

from __future__ import annotations

import logging
import os
import random
import time
from typing import Any

import numpy as np
from monailabel.interfaces.datastore import Datastore
from monailabel.interfaces.tasks.strategy import Strategy

from ..datastore import image_dimension
from ..scoring.dice import label_dice

__all__ = ["MirrorUncertainty", "mirror_disagreement"]

logger = logging.getLogger(__name__)


def mirror_disagreement(predictions: list[np.ndarray]) -> float:
    """``1 - mean Dice`` between the first (unmirrored) label map and each mirrored one, in ``[0, 1]``."""
    if len(predictions) < 2:
        raise ValueError("need the plain prediction and at least one mirrored prediction.")
    ref = predictions[0]
    return float(1.0 - np.mean([label_dice(ref, p) for p in predictions[1:]]))


class MirrorUncertainty(Strategy):
    """Pick the unlabelled image whose predictions disagree most when the input is mirrored.

    A segmentation that changes when the image is flipped left-right (or along any spatial axis) is one the model is
    unsure of. For each candidate the model runs once plain and once per mirrored axis; the score is
    :func:`mirror_disagreement`. Scores are cached in the image info (``mirror_uncertainty``) with the weights'
    mtime, so an image is scored again only after training swapped in new weights. At most ``max_candidates``
    unscored images (random ones) are scored per request, which keeps the request short on large studies. Images
    whose dimension differs from the model's (2D images in a datastore served by a 3D model) are skipped.

    Args:
        infer_tasks: model name -> inference task; the request's ``"model"`` picks one.
        default_model: the model used when the request names none.
        axes: spatial axes to mirror. Defaults to all axes of the model.
        max_candidates: the most unscored images to score per request. Defaults to ``8``.
    """

    def __init__(self, infer_tasks: dict[str, Any], default_model: str, axes: list[int] | None = None,
                 max_candidates: int = 8) -> None:  # fmt: skip
        super().__init__("Uncertainty: disagreement of mirrored predictions")
        if default_model not in infer_tasks:
            raise ValueError(f"default_model {default_model!r} is not one of {sorted(infer_tasks)}.")
        self.tasks = infer_tasks
        self.default_model = default_model
        self.axes = axes
        self.max_candidates = max_candidates

    def info(self) -> dict[str, Any]:
        """Description and a ``config`` 3D Slicer can show and send back (model choice first = default)."""
        models = [self.default_model] + sorted(m for m in self.tasks if m != self.default_model)
        return {"description": self.description, "config": {"model": models, "max_candidates": self.max_candidates}}

    def predictions(self, task: Any, image_uri: str) -> list[np.ndarray]:
        axes = self.axes if self.axes is not None else list(range(int(task.dimension)))
        out = []
        for flip in [[]] + [[a] for a in axes]:
            _, data = task({"image": image_uri, "skip_writer": True, "flip_axes": flip})
            pred = data["pred"]
            out.append(np.asarray(pred.detach().cpu().numpy() if hasattr(pred, "detach") else pred))
        return out

    def __call__(self, request: dict[str, Any], datastore: Datastore) -> dict[str, Any] | None:
        images = datastore.get_unlabeled_images(request.get("label_tag"), request.get("labels"))
        if not images:
            return None
        model = request.get("model") or self.default_model
        model = model[0] if isinstance(model, list) and model else model
        task = self.tasks.get(model)
        if task is None:
            raise ValueError(f"unknown model {model!r} for mirror_uncertainty; available: {sorted(self.tasks)}")
        dim = int(task.dimension)
        fitting = [i for i in images if image_dimension(datastore.get_image_uri(i)) in (dim, None)]
        if not fitting:
            logger.info("mirror uncertainty: no unlabelled %dD image for %s among %d", dim, model, len(images))
            return None
        if len(fitting) < len(images):
            logger.info("mirror uncertainty: %d images of another dimension skipped", len(images) - len(fitting))
        images = fitting
        path = task.get_path()
        model_ts = os.stat(path).st_mtime if path and os.path.exists(path) else 0
        scores: dict[str, float] = {}
        unscored = []
        for image in images:
            cached = datastore.get_image_info(image).get("mirror_uncertainty", {})
            if cached.get("model_ts") == model_ts and cached.get("model") == model and "score" in cached:
                scores[image] = float(cached["score"])
            else:
                unscored.append(image)
        budget = int(request.get("max_candidates", self.max_candidates))
        for image in random.sample(unscored, min(budget, len(unscored))):
            score = mirror_disagreement(self.predictions(task, datastore.get_image_uri(image)))
            scores[image] = score
            # own key: MONAI Label rewrites info["strategy"] after every selection
            datastore.update_image_info(
                image,
                {"mirror_uncertainty": {"score": score, "model": model, "model_ts": model_ts, "ts": int(time.time())}},
            )
        best = max(scores, key=lambda k: scores[k])
        logger.info("mirror uncertainty: picked %s (%.4f) from %d scored images", best, scores[best], len(scores))
        return {"id": best, "score": scores[best], "model": model}
