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
"""Auto-segmentation with a GuiDINO bundle: MONAI Label's BundleInferTask plus the guide mask as a second output."""

from __future__ import annotations

import logging
import os
import tempfile
from typing import Any

import nibabel as nib
import numpy as np
import torch
from monai.data import MetaTensor
from monailabel.tasks.infer.bundle import BundleInferTask
from monailabel.utils.others.generic import strtobool

from guidino_monai.inferers import GuidedSlidingWindowInferer

from ..transforms import wrap_spacing

__all__ = ["GuidedBundleInferTask", "wants_guide"]

logger = logging.getLogger(__name__)


def wants_guide(data: dict[str, Any] | None) -> bool:
    """Whether the request asks for the guide mask: ``"return_guide"`` is ``true`` (stored in the datastore as label
    tag ``guide``) or ``"image"`` (returned as the response image instead of the label)."""
    value = (data or {}).get("return_guide", False)
    if value == "image":
        return True
    return bool(strtobool(str(value))) if isinstance(value, (str, bool)) else bool(value)


class GuidedBundleInferTask(BundleInferTask):
    """A GuiDINO bundle served by MONAI Label.

    Differences from :class:`~monailabel.tasks.infer.bundle.BundleInferTask`:

    - ``Spacingd`` runs through :class:`~lib.transforms.HideNonDictMetad` (monai 1.6.1 ``image_path`` bug);
    - request ``{"return_guide": true}`` also writes the guide mask (float32 in ``[0, 1]``, the input's geometry);
      its file is
      reported under ``result_json["guide_file"]`` for the app to store or return;
    - request ``{"mirror_axes": [0, 1]}`` turns on mirror test-time augmentation.
    """

    def __init__(self, path: str, conf: dict[str, str], **kwargs: Any) -> None:
        super().__init__(path, conf, **kwargs)
        if self.valid:
            self._config.update({"return_guide": False, "mirror_axes": []})

    def pre_transforms(self, data: dict[str, Any] | None = None) -> list:
        return wrap_spacing(list(super().pre_transforms(data)))

    def inferer(self, data: dict[str, Any] | None = None) -> Any:
        inferer = super().inferer(data)
        if isinstance(inferer, GuidedSlidingWindowInferer):
            inferer.return_guide = wants_guide(data)
            axes = (data or {}).get("mirror_axes") or []
            inferer.mirror_axes = tuple(int(a) for a in axes)
        flip = (data or {}).get("flip_axes") or []
        return FlippedInferer(inferer, flip) if flip else inferer

    def run_inferer(self, data: dict[str, Any], convert_to_batch: bool = True, device: str = "cuda") -> dict:
        """As :meth:`BasicInferTask.run_inferer`, but a ``(logits, guide)`` output keeps both (``pred``, ``guide``)."""
        inferer = self.inferer(data)
        network = self._get_network(device, data)
        inputs = data[self.input_key]
        inputs = inputs if torch.is_tensor(inputs) else torch.from_numpy(inputs)
        inputs = (inputs[None] if convert_to_batch else inputs).to(torch.device(device))
        with torch.no_grad():
            outputs = inferer(inputs, network)
        guide = None
        if isinstance(outputs, (tuple, list)):
            outputs, guide = outputs
        if convert_to_batch:
            outputs = outputs[0]
            guide = guide[0] if guide is not None else None
        data[self.output_label_key] = outputs
        if guide is not None:
            data["guide"] = guide
        return data

    def writer(self, data: dict[str, Any], extension: str | None = None, dtype: Any = None) -> tuple[Any, Any]:
        pred = data.get(self.output_label_key)
        if self.dimension == 2 and isinstance(pred, torch.Tensor) and not data.get("skip_writer"):
            # MONAI Label's Writer writes 2D labels through ITK without their affine (spacing lost): write it here
            result_file = save_like_pred(pred, data, suffix=".nii.gz", dtype=np.uint8)
            result_json = dict(data.get(self.output_json_key) or {})
        else:
            result_file, result_json = super().writer(data, extension, dtype)
        guide = data.get("guide")
        if wants_guide(data) and isinstance(guide, torch.Tensor):
            result_json["guide_file"] = save_like_pred(guide, data, suffix="_guide.nii.gz")
        return result_file, result_json


class FlippedInferer:
    """Run ``inferer`` on the input mirrored along ``axes`` (spatial, 0-based) and mirror the outputs back."""

    def __init__(self, inferer: Any, axes: Any) -> None:
        self.inferer = inferer
        self.dims = [int(a) + 2 for a in axes]

    def __call__(self, inputs: torch.Tensor, network: Any, *args: Any, **kwargs: Any) -> Any:
        out = self.inferer(torch.flip(inputs, self.dims), network, *args, **kwargs)
        if isinstance(out, (tuple, list)):
            return type(out)(None if o is None else torch.flip(o, self.dims) for o in out)
        return torch.flip(out, self.dims)


def save_like_pred(volume: torch.Tensor, data: dict[str, Any], suffix: str, dtype: Any = np.float32) -> str:
    """Save a ``(1, *spatial)`` volume with the affine the writer gave the label (the input's geometry)."""
    arr = volume.detach().cpu().float().numpy()
    arr = arr[0] if arr.ndim > 2 and arr.shape[0] == 1 else arr
    meta = data.get("pred_meta_dict") or {}
    affine = meta.get("affine")
    if affine is None:
        image = data.get("image")
        affine = image.meta.get("original_affine") if isinstance(image, MetaTensor) else None
    if affine is None and isinstance(volume, MetaTensor):
        affine = volume.affine
    affine = np.asarray(affine if affine is not None else np.eye(4), dtype=np.float64)
    if affine.shape == (3, 3):  # 2D affine -> 4x4
        full = np.eye(4)
        full[:2, :2], full[:2, 3] = affine[:2, :2], affine[:2, 2]
        affine = full
    fd, path = tempfile.mkstemp(suffix=suffix)
    os.close(fd)
    nib.save(nib.Nifti1Image(arr.astype(dtype), affine), path)
    return path
