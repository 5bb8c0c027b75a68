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

from guidino_monai.inferers import GuidedSlidingWindowInferer
from guidino_monai.networks import channels_last
from guidino_monai.utils import as_bool

from ..params import GUIDE_SEGMENT, LABEL_COLORS, LABEL_NAMES, axes_choices, parse_mirror_axes, parse_return_guide
from ..transforms import wrap_spacing

__all__ = ["GuidedBundleInferTask", "guide_mode", "wants_guide", "add_guide_segment"]

logger = logging.getLogger(__name__)


def guide_mode(data: dict[str, Any] | None) -> str:
    """The request's ``return_guide`` mode (:data:`lib.params.GUIDE_MODES`)."""
    return parse_return_guide((data or {}).get("return_guide"))


def wants_guide(data: dict[str, Any] | None) -> bool:
    """Whether the request needs the guide mask computed (any ``return_guide`` mode but ``none``)."""
    return guide_mode(data) != "none"


def add_guide_segment(pred: Any, guide: Any, value: int, threshold: float = 0.5) -> Any:
    """Label ``value`` where the guide is ``>= threshold`` and ``pred`` is background (a label map holds one value per
    voxel, so the guide segment shows where the guide points and the network found nothing)."""
    g = guide.detach().cpu() if isinstance(guide, torch.Tensor) else torch.as_tensor(np.asarray(guide))
    p = pred if isinstance(pred, torch.Tensor) else torch.as_tensor(np.asarray(pred))
    g = g.reshape(p.shape) if g.numel() == p.numel() else g
    out = p.clone()
    out[(g.to(out.device) >= threshold) & (p == 0)] = value
    return out


class GuidedBundleInferTask(BundleInferTask):
    """A GuiDINO bundle served by MONAI Label.

    Differences from :class:`~monailabel.tasks.infer.bundle.BundleInferTask`:

    - ``Spacingd`` runs through :class:`~lib.transforms.HideNonDictMetad` (monai 1.6.1 ``image_path`` bug);
    - labels carry display names (``hippocampus anterior``, ...; :data:`lib.params.LABEL_NAMES`) and colours
      (``label_colors`` in ``/info/``); labels come back as uint8;
    - ``return_guide`` (:data:`lib.params.GUIDE_MODES`): ``segment`` adds a ``guide`` label to the returned label map
      (listed in ``label_names``, so 3D Slicer shows it as one more segment); ``datastore`` stores the float guide
      (``[0, 1]``, the input's geometry) as label tag ``guide``; ``image`` returns the float guide instead of the
      label map. The guide file is reported under ``result_json["guide_file"]`` for the app to store or return;
    - ``mirror_axes`` (``"none"``, ``"0,1"`` or ``[0, 1]``) turns on mirror test-time augmentation.

    ``config`` in ``/info/`` holds only what 3D Slicer's options table can show and send back: non-empty lists of
    strings (first item = default) and scalars.
    """

    guide_modes: tuple[str, ...] = ("segment", "none", "datastore", "image")

    def __init__(self, path: str, conf: dict[str, str], **kwargs: Any) -> None:
        super().__init__(path, conf, **kwargs)
        if self.valid:
            self.bundle_labels = dict(self.labels or {})
            self.labels = {LABEL_NAMES.get(k, k): v for k, v in self.bundle_labels.items()}
            self._config.update({"return_guide": list(self.guide_modes), "mirror_axes": axes_choices(self.dimension)})
        self.weights_info: dict[str, Any] = {}
        self._channels_last: bool | None = None
        self._laid_out: Any = None  # the network last converted (MONAI Label reloads a new one when weights change)

    def info(self) -> dict[str, Any]:
        info = super().info()
        info["label_colors"] = {k: LABEL_COLORS.get(k, [128, 128, 128]) for k in (self.labels or {})}
        info["label_colors"][GUIDE_SEGMENT] = LABEL_COLORS[GUIDE_SEGMENT]
        info.update(self.weights_info)
        return info

    def check_request(self, request: dict[str, Any]) -> dict[str, Any]:
        """Normalise ``return_guide`` and ``mirror_axes`` of ``request`` in place (400 on bad values)."""
        request["return_guide"] = parse_return_guide(request.get("return_guide", self.guide_modes[0]),
                                                      self.guide_modes)  # fmt: skip
        request["mirror_axes"] = list(parse_mirror_axes(request.get("mirror_axes"), self.dimension))
        return request

    def __call__(self, request: dict[str, Any], *args: Any, **kwargs: Any) -> Any:
        result = super().__call__(request, *args, **kwargs)
        if (
            isinstance(result, tuple)
            and len(result) == 2
            and isinstance(result[1], dict)
            and not request.get("skip_writer")
        ):
            names = result[1].pop("_label_names", None)
            if names is not None:
                result[1]["label_names"] = names
        return result

    def _get_network(self, device: Any, data: Any) -> Any:
        """MONAI Label's network (built from ``network_def``, cached per device), stored channels-last where the
        bundle's ``inference.json`` says ``channels_last`` is on (this bundle's CPU default; same values, faster 3D
        convolutions), once per network MONAI Label builds. A TorchScript file is served as it is."""
        network = super()._get_network(device, data)
        if network is self._laid_out:  # MONAI Label's cached network, already converted: nothing to do per request
            return network
        if isinstance(network, torch.nn.Module) and not isinstance(network, torch.jit.ScriptModule):
            if self._channels_last is None:
                self._channels_last = self._read_channels_last()
            channels_last(network, self._channels_last)
        self._laid_out = network
        return network

    def _read_channels_last(self) -> bool:
        if "channels_last" not in self.bundle_config.config:
            return False
        try:
            return as_bool(self.bundle_config.get_parsed_content("channels_last", instantiate=True), "channels_last")
        except Exception as e:  # a bad value must not stop the served model: default layout, and say why
            logger.warning("%s: channels_last not read (%s); the default layout is used", self.path, e)
            return False

    def pre_transforms(self, data: dict[str, Any] | None = None) -> list:
        return wrap_spacing(list(super().pre_transforms(data)))

    def inferer(self, data: dict[str, Any] | None = None) -> Any:
        inferer = super().inferer(data)
        if isinstance(inferer, GuidedSlidingWindowInferer):
            inferer.return_guide = wants_guide(data) and not (data or {}).get("skip_writer")
            inferer.mirror_axes = parse_mirror_axes((data or {}).get("mirror_axes"), self.dimension)
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
        mode = guide_mode(data)
        guide = data.get("guide")
        label_names = dict(self.labels or {})
        if data.get(self.output_label_key) is not None and not data.get("skip_writer"):
            pred = data[self.output_label_key]
            if mode == "segment" and guide is not None:
                value = max(label_names.values(), default=0) + 1
                pred = add_guide_segment(pred, guide, value)
                label_names[GUIDE_SEGMENT] = value
            data[self.output_label_key] = pred.to(torch.uint8) if isinstance(pred, torch.Tensor) else pred
        dtype = np.uint8 if dtype is None else dtype
        pred = data.get(self.output_label_key)
        if self.dimension == 2 and isinstance(pred, torch.Tensor) and not data.get("skip_writer"):
            # MONAI Label's Writer writes 2D labels through ITK without their affine (spacing lost): write it here
            result_file = save_like_pred(pred, data, suffix=".nii.gz", dtype=np.uint8)
            result_json = dict(data.get(self.output_json_key) or {})
        else:
            result_file, result_json = super().writer(data, extension, dtype)
        result_json = dict(result_json or {})
        result_json["_label_names"] = label_names  # BasicInferTask.__call__ overwrites "label_names" afterwards
        if mode in ("datastore", "image") and isinstance(guide, torch.Tensor):
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
