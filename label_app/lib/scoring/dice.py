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
"""Scoring: Dice of the submitted (``final``) labels against the model's prediction."""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
from monai.transforms import LoadImage
from monailabel.interfaces.datastore import Datastore, DefaultLabelTag
from monailabel.interfaces.tasks.scoring import ScoringMethod

from ..datastore import image_dimension

__all__ = ["GuidedDice", "label_dice"]

logger = logging.getLogger(__name__)


def label_dice(y: np.ndarray, y_pred: np.ndarray, labels: list[int] | None = None) -> float:
    """Mean Dice over the foreground labels present in ``y`` or ``y_pred`` (1.0 when both are empty).

    Unlike MONAI Label's ``Dice`` (which treats the maps as binary and multiplies label values), each label is
    compared on its own, so label 2 predicted as 1 counts as an error.
    """
    y, y_pred = np.asarray(y).squeeze(), np.asarray(y_pred).squeeze()
    if y.shape != y_pred.shape:
        raise ValueError(f"label shape {y.shape} differs from prediction shape {y_pred.shape}.")
    if labels is None:
        labels = sorted(int(v) for v in (set(np.unique(y)) | set(np.unique(y_pred))) if v != 0)
    scores = []
    for lab in labels:
        a, b = y == lab, y_pred == lab
        total = a.sum() + b.sum()
        if total:
            scores.append(2.0 * np.logical_and(a, b).sum() / total)
    return float(np.mean(scores)) if scores else 1.0


class GuidedDice(ScoringMethod):
    """Per-image Dice of the ``final`` label (``y``) against the model's prediction.

    The prediction is the ``original`` label when the client stored one (``y_pred`` tag); otherwise, with
    ``"model": <name>`` in the request, the model is run on the image. Each score is written to the image info
    (``dice``) and returned as ``{image_id: dice}``.

    Args:
        infers: the app's inference tasks (to run a model when no stored prediction exists).
    """

    def __init__(self, infers: dict[str, Any] | None = None) -> None:
        super().__init__("Dice of submitted labels against the model's prediction")
        self.infers = infers if infers is not None else {}

    def info(self) -> dict[str, Any]:
        """Description and a ``config`` 3D Slicer can show and send back (the model to run where no ``original``
        label is stored; first = default)."""
        return {"description": self.description, "config": {"model": list(self.infers)}} if self.infers else {
            "description": self.description}  # fmt: skip

    def predict(self, model: str, image_uri: str) -> np.ndarray:
        task = self.infers.get(model)
        if task is None:
            raise ValueError(f"no model {model!r} to score with; available: {sorted(self.infers)}")
        _, data = task({"image": image_uri, "skip_writer": True})
        pred = data["pred"]
        return np.asarray(pred.detach().cpu().numpy() if hasattr(pred, "detach") else pred)

    def __call__(self, request: dict[str, Any], datastore: Datastore) -> dict[str, float]:
        loader = LoadImage(image_only=True)
        tag_y = request.get("y", DefaultLabelTag.FINAL.value)
        tag_pred = request.get("y_pred", DefaultLabelTag.ORIGINAL.value)
        model = request.get("model")
        model = model[0] if isinstance(model, list) and model else model
        result: dict[str, float] = {}
        for image_id in datastore.list_images():
            y_id = datastore.get_label_by_image_id(image_id, tag_y)
            if not y_id:
                continue
            y = np.asarray(loader(datastore.get_label_uri(y_id, tag_y)))
            pred_id = datastore.get_label_by_image_id(image_id, tag_pred) if tag_pred else None
            if pred_id:
                y_pred = np.asarray(loader(datastore.get_label_uri(pred_id, tag_pred)))
            elif model:
                uri = datastore.get_image_uri(image_id)
                task = self.infers.get(model)
                if task is not None and image_dimension(uri) not in (int(task.dimension), None):
                    continue  # a 2D image is not scored with a 3D model (nor 3D with 2D)
                y_pred = self.predict(model, uri)
            else:
                continue
            dice = label_dice(y, y_pred)
            datastore.update_image_info(image_id, {"dice": dice})
            result[image_id] = dice
            logger.info("Dice for %s: %.4f", image_id, dice)
        return result
