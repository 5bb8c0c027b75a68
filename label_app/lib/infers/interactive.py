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
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai.data import MetaTensor
from monailabel.interfaces.tasks.infer_v2 import InferType

from guidino_monai.interactive import (
    ClickRefiner,
    ClickSessions,
    apply_clicks,
    bias_clicks,
    load_refiner,
    refine_with_clicks,
    world_points_to_grid,
)
from guidino_monai.interactive.refinement import DEFAULT_REACH

from ..params import bad_request, label_index, parse_points, parse_return_guide
from .guided_bundle import GuidedBundleInferTask, guide_mode

__all__ = ["GuidedInteractiveInferTask", "PROTOTYPE_MODES", "CLICK_METHODS", "REFINER_FILE", "conf_number"]

#: default click settings, chosen with benchmarks/click_refinement.py on a trained hippocampus model (radius 2 mm,
#: up to 6 mm, band 0.1: +0.005 mean Dice after 5 clicks on held-out cases; 4 / 12 mm without the band: -0.009)
DEFAULT_UNCERTAIN_BAND = "0.1"

#: ``click_prototypes``: ``auto`` uses the clicked tokens as TokenBook prototypes only when the guide ViT has
#: foundation-model weights (random-init tokens carry no meaning: prototypes from them move the whole guide at random)
PROTOTYPE_MODES = ("auto", "on", "off")

#: ``click_method``: ``auto`` uses the bundle's click-trained refiner when ``models/click_refiner.pt`` is there
#: (corrections within a few voxels of the clicks), else the training-free click maps; ``refiner`` requires the file;
#: ``clickmaps`` (Gaussian click maps on the log-probabilities) and ``regions`` (intensity regions) never use it
CLICK_METHODS = ("auto", "refiner", "clickmaps", "regions")

#: default click map settings (:func:`guidino_monai.interactive.bias_clicks`), chosen with
#: benchmarks/click_refinement.py on 17 held-out hippocampus cases, then measured on 20 others (INSTALL.md)
DEFAULT_CLICK_SIGMA, DEFAULT_CLICK_STRENGTH, DEFAULT_CLICK_MARGIN = 4.0, 4.0, 2.0

#: the click refiner's file in the bundle (``python -m guidino_monai.interactive.train_refiner`` writes it)
REFINER_FILE = "click_refiner.pt"

logger = logging.getLogger(__name__)


#: post-processing transforms a clicked answer skips (see ``GuidedInteractiveInferTask.post_transforms``)
SHAPE_CLEANUPS = ("KeepLargestFilledComponentd", "FitEllipsed")


def conf_number(conf: dict[str, str] | None, name: str, default: float, positive: bool = False) -> float:
    """``--conf name <number>`` as a float, or ``ValueError`` naming the option and what it got."""
    raw = (conf or {}).get(name, default)
    try:
        value = float(raw)
    except (TypeError, ValueError):
        raise ValueError(f"--conf {name} must be a number, got {raw!r}") from None
    if not np.isfinite(value) or (positive and value <= 0):
        raise ValueError(f"--conf {name} must be a {'positive ' if positive else ''}finite number, got {raw!r}")
    return value


class GuidedInteractiveInferTask(GuidedBundleInferTask):
    """Click refinement on top of a GuiDINO bundle.

    Request parameters (MONAI Label's DeepGrow format, as 3D Slicer sends them): ``foreground`` and ``background``,
    lists of ``[x, y, z]`` voxel indices of the input image, and ``label`` (the Slicer segment name: a label name or
    id): then the result holds only that label (as ``1``), as DeepGrow clients expect; without it the full label map
    is returned. An unknown label (e.g. Slicer's default ``Segment_1``) is a 400 naming the known ones; clicks outside
    the image are ignored and listed under ``clicks.outside`` in the response.

    With a click-trained refiner in the bundle (``models/click_refiner.pt``, written by ``python -m
    guidino_monai.interactive.train_refiner``; :class:`guidino_monai.interactive.ClickRefinementNet`), the
    segmentation is corrected by it from all clicks of the request near the clicks (``click_method: auto`` or
    ``refiner``; the corrections of step 2 are then not applied);
    ``/info/`` says whether the file is there and how it was trained (``click_refiner``). Without it, two corrections
    without retraining:

    1. the clicked voxels' DINO tokens become extra positive/negative prototypes of the TokenBook for this image, the
       guide is recomputed and the segmentation re-run (:class:`guidino_monai.interactive.ClickRefiner`); with
       ``click_prototypes: auto`` (the default) only when the guide ViT has foundation-model weights, ``on``/``off``
       force it;
    2. ``click_method: auto`` / ``clickmaps``: each click adds a Gaussian click map (``click_sigma`` mm) to the
       log-probability of its class (:func:`guidino_monai.interactive.bias_clicks`), high enough that the clicked
       voxel always takes the click's class: a foreground click always adds its voxel and the hesitant neighbours
       around it, a background click removes them, whatever the guide ViT's weights. ``click_method: regions``:
       instead each click's region (connected voxels of similar intensity within ``click_radius`` mm,
       :func:`guidino_monai.interactive.apply_clicks`) is forced to the click's class.

    Sessions (:class:`guidino_monai.interactive.ClickSessions`) keep the last ``max_sessions`` images' preprocessed
    tensors and token maps, keyed by image path, weights mtime and image content, so after the first request each
    click costs one TokenBook + backbone pass and no ViT pass, and a re-uploaded image never reuses stale tokens.
    ``--conf click_sigma <mm>``, ``--conf click_strength`` and ``--conf click_margin`` tune the click maps (defaults
    4, 4 and 2); ``--conf click_radius <mm>``, ``--conf click_max_radius <mm>`` and ``--conf click_tolerance <std>``
    the regions (defaults 2, 6 and 1);
    ``--conf click_uncertain_band <p>`` makes a click where the network hesitated (class probability at least ``p``
    for a foreground click, at most ``1 - p`` for a background one) follow the network's probabilities instead of the
    intensities (``apply_clicks``' ``uncertain_band``; ``none`` turns it off).
    """

    guide_modes = ("none", "datastore", "image")

    def __init__(self, path: str, conf: dict[str, str], max_sessions: int = 4, **kwargs: Any) -> None:
        super().__init__(path, conf, type=InferType.DEEPGROW, **kwargs)
        self.description = "GuiDINO click refinement: click maps (or a click-trained refiner) and TokenBook prototypes"
        self._config.pop("mirror_axes", None)  # no test-time mirroring for clicks
        default = str((conf or {}).get("click_prototypes", "auto")).lower()
        if default not in PROTOTYPE_MODES:
            raise ValueError(f"--conf click_prototypes must be one of {PROTOTYPE_MODES}, got {default!r}")
        self._config["click_prototypes"] = [default] + [m for m in PROTOTYPE_MODES if m != default]
        self.click_radius = conf_number(conf, "click_radius", 2.0, positive=True)
        self.click_max_radius = conf_number(conf, "click_max_radius", 6.0, positive=True)
        self.click_tolerance = conf_number(conf, "click_tolerance", 1.0)
        self.click_sigma = conf_number(conf, "click_sigma", DEFAULT_CLICK_SIGMA, positive=True)
        self.click_strength = conf_number(conf, "click_strength", DEFAULT_CLICK_STRENGTH)
        self.click_margin = conf_number(conf, "click_margin", DEFAULT_CLICK_MARGIN)
        band = str((conf or {}).get("click_uncertain_band", DEFAULT_UNCERTAIN_BAND)).lower()
        self.click_uncertain_band = None if band in ("none", "off", "") else float(band)
        self._config["click_method"] = list(CLICK_METHODS)
        self.refiner_path = Path(self.bundle_path) / "models" / REFINER_FILE if self.valid else None
        self._refiner: tuple[float, Any, dict[str, Any]] | None = None  # (mtime, network, info)
        self._refiner_lock = threading.Lock()
        self.sessions = ClickSessions(self._make_refiner, max_sessions=max_sessions)
        self.stats = {"vit_passes": 0, "refinements": 0}
        self._data: dict[str, Any] = {}

    def is_valid(self) -> bool:
        return self.valid

    def click_refiner(self) -> tuple[Any, dict[str, Any]] | None:
        """The bundle's click refiner ``(network, info)``, reloaded when its file changed; ``None`` without the file.

        Raises:
            ValueError: the file is there but is not a click refiner (naming it).
        """
        path = self.refiner_path
        if path is None or not path.is_file():
            return None
        mtime = path.stat().st_mtime
        with self._refiner_lock:
            if self._refiner is None or self._refiner[0] != mtime:
                net, info = load_refiner(path)
                self._refiner = (mtime, net, info)
            return self._refiner[1], self._refiner[2]

    def info(self) -> dict[str, Any]:
        info = super().info()
        status: dict[str, Any] = {"file": str(self.refiner_path), "present": False}
        try:
            refiner = self.click_refiner()
        except ValueError as e:
            status["error"] = str(e)
            refiner = None
        if refiner is not None:
            keep = ("steps", "seconds", "num_train_cases", "demo", "guide_vit", "weights", "max_clicks", "reach")
            status.update(present=True, **{k: v for k, v in refiner[1].items() if k in keep})
        else:
            status["how"] = ("python -m guidino_monai.interactive.train_refiner --bundle_dir <bundle> --dataset_dir "
                             "<data> writes it; without it clicks use the training-free click maps")  # fmt: skip
        info["click_refiner"] = status
        return info

    def check_request(self, request: dict[str, Any]) -> dict[str, Any]:
        """Check ``return_guide``, ``label`` and the click lists (400 naming the bad one)."""
        request["return_guide"] = parse_return_guide(request.get("return_guide", "none"), self.guide_modes)
        request.pop("mirror_axes", None)
        mode = request.get("click_prototypes", "auto")
        mode = mode[0] if isinstance(mode, list) and mode else mode
        if str(mode).lower() not in PROTOTYPE_MODES:
            raise bad_request(f"click_prototypes: {mode!r} is not one of {list(PROTOTYPE_MODES)}")
        request["click_prototypes"] = str(mode).lower()
        method = request.get("click_method", "auto")
        method = method[0] if isinstance(method, list) and method else method
        if str(method).lower() not in CLICK_METHODS:
            raise bad_request(f"click_method: {method!r} is not one of {list(CLICK_METHODS)}")
        request["click_method"] = str(method).lower()
        if request["click_method"] == "refiner" and (self.refiner_path is None or not self.refiner_path.is_file()):
            raise bad_request(f"click_method 'refiner': the bundle has no click refiner ({self.refiner_path}); train "
                              "one with python -m guidino_monai.interactive.train_refiner, or use 'auto'")  # fmt: skip
        label_index(request.get("label"), self.labels or {})
        for name in ("foreground", "background"):
            request[name] = parse_points(request.get(name), name, self.dimension)
        return request

    def post_transforms(self, data: dict[str, Any] | None = None) -> list:
        """The bundle's post-processing without its shape clean-ups, ``KeepLargestFilledComponentd`` and
        ``FitEllipsed``: they would undo the clicks (drop a clicked region apart from the largest one, refit the
        fetal head's ellipse), so a clicked answer stays as clicked while auto-segmentation keeps them. Matched by
        class name, so the copy of ``guidino_monai`` a packed bundle carries is matched too."""
        return [t for t in super().post_transforms(data) if type(t).__name__ not in SHAPE_CLEANUPS]

    def _make_refiner(self, network: torch.nn.Module) -> ClickRefiner:
        inferer = GuidedBundleInferTask.inferer(self, self._data)
        return ClickRefiner(network, getattr(inferer, "roi_size", None), **getattr(inferer, "sw_kwargs", {}))

    def _grid_points(self, data: dict[str, Any], name: str, outside: list) -> list[list[float]]:
        """Clicks (file voxel indices) -> preprocessed grid; clicks outside the image go to ``outside``."""
        points = parse_points(data.get(name), name, self.dimension)
        image = data[self.input_key]
        meta = image.meta if isinstance(image, MetaTensor) else {}
        original_shape = meta.get("spatial_shape")
        if original_shape is not None:
            original_shape = [int(v) for v in np.asarray(original_shape).ravel()[: self.dimension]]
        grid_shape = list(image.shape[1:])
        inside = []
        for p in points:
            limit = original_shape or grid_shape
            if any(v < -0.5 or v > s - 0.5 for v, s in zip(p, limit)):
                outside.append({"point": p, "kind": name, "image_shape": limit})
            else:
                inside.append(p)
        original = meta.get("original_affine")
        if original is not None and isinstance(image, MetaTensor) and inside:
            inside = world_points_to_grid(inside, np.asarray(original), np.asarray(image.affine))
        return [[min(max(v, 0.0), s - 1.0) for v, s in zip(p, grid_shape)] for p in inside]

    def run_inferer(self, data: dict[str, Any], convert_to_batch: bool = True, device: str = "cuda") -> dict:
        network = self._get_network(device, data)
        image = data[self.input_key]
        path = self.get_path()
        key = (str(data.get("image_path")), os.stat(path).st_mtime if path else 0)
        self._data = data
        refiner = self.sessions.get(key, image[None], network)
        self.stats["vit_passes"] = self.sessions.vit_passes
        outside: list[dict[str, Any]] = []
        fg, bg = self._grid_points(data, "foreground", outside), self._grid_points(data, "background", outside)
        mode = data.get("click_prototypes", "auto")
        mode = mode[0] if isinstance(mode, list) and mode else mode
        prototypes = mode == "on" or (mode == "auto" and bool(getattr(refiner.branch, "pretrained", False)))
        logits, guide = refiner.predict(fg, bg) if prototypes else refiner.predict()
        idx = label_index(data.get("label"), self.labels or {})
        probs = torch.softmax(logits[0].float(), dim=0).cpu().numpy()
        intensities = image[0].detach().cpu().numpy() if isinstance(image, torch.Tensor) else np.asarray(image)[0]
        spacing = None
        if isinstance(image, MetaTensor):
            spacing = [float(v) for v in image.pixdim[: self.dimension]]
        method = data.get("click_method", "auto")
        refiner, refiner_error = None, None
        if method in ("auto", "refiner") and (fg or bg):
            try:
                refiner = self.click_refiner()
            except ValueError as e:  # a broken file: 'auto' falls back to the click maps and says why
                if method == "refiner":
                    raise bad_request(str(e)) from e
                refiner_error = str(e)
                logger.warning("click refiner not used: %s", e)
        if refiner is not None:
            clicks = [(p, self._click_class(probs, p, idx)) for p in fg] + [(p, 0) for p in bg]
            plain = image.as_tensor() if isinstance(image, MetaTensor) else torch.as_tensor(np.asarray(image))
            refined = refine_with_clicks(refiner[0], plain[None].float().cpu(), torch.from_numpy(probs)[None], clicks,
                                         reach=refiner[1].get("reach", DEFAULT_REACH))  # as it was trained
            probs = refined[0].numpy()  # the refiner alone: adding the click regions measured lower (+0.006 vs +0.009)
            used = "refiner"
        elif method == "regions":
            probs = apply_clicks(probs, intensities, fg, bg, label=idx, radius=self.click_radius,
                                 tolerance=self.click_tolerance, spacing=spacing,
                                 max_radius=self.click_max_radius, uncertain_band=self.click_uncertain_band)  # fmt: skip
            used = "regions"
        else:
            probs = bias_clicks(probs, fg, bg, label=idx, sigma=self.click_sigma, strength=self.click_strength,
                                margin=self.click_margin, spacing=spacing)  # fmt: skip
            used = "clickmaps"
        self.stats["refinements"] += 1
        pred = MetaTensor(torch.log(torch.from_numpy(probs).clamp_min(1e-6)))
        if isinstance(image, MetaTensor):
            pred.copy_meta_from(image)
        data[self.output_label_key] = pred
        data["clicks_report"] = {"foreground": len(fg), "background": len(bg), "outside": outside,
                                 "vit_passes": self.sessions.vit_passes,
                                 "method": used}  # fmt: skip
        if refiner_error:
            data["clicks_report"]["refiner_error"] = refiner_error
        if guide_mode(data) != "none":
            g = MetaTensor(guide[0])
            if isinstance(image, MetaTensor):
                g.copy_meta_from(image)
            data["guide"] = g
        return data

    @staticmethod
    def _click_class(probs: np.ndarray, point: list[float], idx: int | None) -> int:
        """A foreground click's class: the request's label, else the most probable foreground class there."""
        if idx is not None:
            return int(idx)
        at = tuple(int(min(max(round(v), 0), s - 1)) for v, s in zip(point, probs.shape[1:]))
        return 1 + int(np.argmax(probs[(slice(1, None),) + at]))

    def writer(self, data: dict[str, Any], extension: str | None = None, dtype: Any = None) -> tuple[Any, Any]:
        idx = label_index(data.get("label"), self.labels or {})
        names = None
        if idx is not None and data.get(self.output_label_key) is not None:
            pred = data[self.output_label_key]
            mask = pred == idx
            data[self.output_label_key] = (
                mask.astype(np.uint8) if isinstance(mask, np.ndarray) else mask.to(torch.uint8)
            )
            names = {next(k for k, v in self.labels.items() if v == idx): 1}
        result_file, result_json = super().writer(data, extension, dtype)
        if names is not None:
            result_json["_label_names"] = names
        result_json["clicks"] = data.get("clicks_report", {})
        return result_file, result_json
