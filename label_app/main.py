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
"""GuiDINO MONAI Label app: serves the repository's bundles to 3D Slicer (install: label_app/INSTALL.md).

    monailabel start_server --app label_app --studies <folder or DICOMweb URL> --conf models all

``--conf`` keys (all optional):

- ``models``: ``all`` or a comma list of bundle names under ``bundles/`` and/or ``guidino_interactive``;
- ``model_dir``: where the app keeps its copies of the bundles and their served weights (``<app>/model``);
- ``bundle_overrides``: JSON of bundle config ids -> values for both ``inference.json`` and ``train.json``
  (e.g. ``{"guide_backbone_kwargs": {"depth": 2}}``); ``train_overrides``: JSON for ``train.json`` only;
- ``init_weights``: ``bundle`` (copy a bundle's trained ``models/model.pt`` if it has one) or ``random``;
- ``interactive_bundle``: the bundle behind ``guidino_interactive`` (the hippocampus bundle).
"""

from __future__ import annotations

import asyncio
import inspect
import json
import logging
import os
import sys
import tempfile
from typing import Any

import nibabel as nib
from fastapi import HTTPException
from monailabel.config import settings
from monailabel.interfaces.app import MONAILabelApp
from monailabel.interfaces.datastore import Datastore
from monailabel.tasks.activelearning.random import Random

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # so `lib` resolves in MONAI Label's subprocesses too

from lib.activelearning import MirrorUncertainty  # noqa: E402
from lib.bundles import available_bundles, prepare_bundle, weights_status  # noqa: E402
from lib.datastore import GuidedLocalDatastore, check_id, check_nifti  # noqa: E402
from lib.dicom_seg import GuidedDICOMWebDatastore  # noqa: E402
from lib.infers import GuidedBundleInferTask, GuidedInteractiveInferTask  # noqa: E402
from lib.scoring import GuidedDice  # noqa: E402
from lib.trainers import GuidedBundleTrainTask  # noqa: E402

logger = logging.getLogger(__name__)

INTERACTIVE = "guidino_interactive"
DEFAULT_INTERACTIVE_BUNDLE = "guidino_hippocampus_mri_segmentation"
#: endpoints MONAI Label declares ``async`` although they compute for seconds (inference, strategies, scoring): run in
#: worker threads instead, so ``/info/``, the datastore and training keep answering meanwhile
THREADED_ENDPOINTS = {
    ("/infer/{model}", "POST"),
    ("/activelearning/{strategy}", "POST"),
    ("/scoring/{method}", "POST"),
    ("/scoring/", "POST"),
}


def _refuse_path_image(kwargs: dict[str, Any]) -> None:
    """``POST /infer/<model>?image=<path>`` without an uploaded file: only datastore ids are accepted."""
    image = kwargs.get("image") or ""
    if not kwargs.get("file") and isinstance(image, str) and (os.path.isabs(image) or "/" in image or "\\" in image):
        raise HTTPException(
            status_code=400, detail=f"image {image!r}: give a datastore image id or upload the file, not a server path"
        )


def _threaded(async_endpoint: Any, check_image: bool) -> Any:
    """A plain ``def`` with ``async_endpoint``'s parameters that runs it to completion in the calling thread."""

    def endpoint(*args: Any, **kwargs: Any) -> Any:
        if check_image:
            _refuse_path_image(kwargs)
        return asyncio.run(async_endpoint(*args, **kwargs))

    endpoint.__signature__ = inspect.signature(async_endpoint)  # type: ignore[attr-defined]
    endpoint.__name__ = async_endpoint.__name__
    endpoint.__doc__ = async_endpoint.__doc__
    return endpoint


def serve_blocking_endpoints_in_threads(fastapi_app: Any) -> list[str]:
    """Replace the ``async`` routes of :data:`THREADED_ENDPOINTS` by plain ``def`` routes with the same parameters.

    FastAPI runs ``def`` endpoints in its thread pool; an ``async def`` that computes blocks the event loop, and with
    it every other request (``GET /info/`` waited 14.6 s behind one ``/infer``).

    Returns:
        the replaced ``"METHOD path"`` entries.
    """
    from fastapi.routing import APIRoute

    replaced: list[str] = []

    def walk(router: Any) -> None:
        routes = router.routes
        changed = False
        for i, route in enumerate(list(routes)):
            inner = getattr(route, "original_router", None)  # FastAPI >= 0.16x wraps included routers
            if inner is not None:
                walk(inner)
                continue
            if not isinstance(route, APIRoute) or not inspect.iscoroutinefunction(route.endpoint):
                continue
            path = route.path[len(settings.MONAI_LABEL_API_STR) :] if settings.MONAI_LABEL_API_STR else route.path
            if not {(path, m) for m in route.methods} & THREADED_ENDPOINTS:
                continue
            routes[i] = APIRoute(
                route.path,
                _threaded(route.endpoint, check_image=path.startswith("/infer")),
                methods=list(route.methods),
                summary=route.summary,
                name=route.name,
                dependencies=route.dependencies,
                include_in_schema=route.include_in_schema,
                deprecated=route.deprecated,
            )
            replaced.extend(f"{m} {route.path}" for m in route.methods)
            changed = True
        if changed and hasattr(router, "_routes_version"):
            router._routes_version += 1  # FastAPI caches the effective routes per version

    walk(fastapi_app.router)
    return replaced


class GuiDINOApp(MONAILabelApp):
    """MONAI Label app for the GuiDINO bundles: auto-segmentation (+ guide mask), click refinement, training on
    submitted labels, random and mirror-uncertainty active learning, Dice scoring."""

    def __init__(self, app_dir: str, studies: str, conf: dict[str, str]) -> None:
        conf = dict(conf or {})
        self.model_dir = conf.get("model_dir") or os.path.join(app_dir, "model")
        overrides = json.loads(conf.get("bundle_overrides", "{}") or "{}")
        bundles = available_bundles()
        requested = [m.strip() for m in conf.get("models", "all").split(",") if m.strip()]
        if "all" in requested:
            requested = bundles + [INTERACTIVE]
        unknown = [m for m in requested if m not in bundles and m != INTERACTIVE]
        if unknown:
            raise ValueError(f"unknown models {unknown}; available: {bundles + [INTERACTIVE]}")
        self.interactive_bundle = conf.get("interactive_bundle", DEFAULT_INTERACTIVE_BUNDLE)
        wanted = [m for m in requested if m != INTERACTIVE]
        if INTERACTIVE in requested and self.interactive_bundle not in wanted:
            wanted.append(self.interactive_bundle)
        self.bundle_paths = {
            name: prepare_bundle(name, self.model_dir, overrides, conf.get("init_weights", "bundle")) for name in wanted
        }
        self.requested = requested
        self.weights = {name: weights_status(path) for name, path in self.bundle_paths.items()}
        super().__init__(
            app_dir=app_dir,
            studies=studies,
            conf=conf,
            name="GuiDINO",
            description="GuiDINO-guided segmentation (DINO guide mask gating a MONAI DynUNet/UNet)",
            version="0.1.0",
        )
        if isinstance(self._datastore, GuidedLocalDatastore):
            self._datastore.label_values = {
                name: {0} | {int(v) for v in (task.labels or {}).values()}
                for name, task in self._infers.items()
                if name != INTERACTIVE
            }

    # -- tasks --------------------------------------------------------------------------------------------------
    def init_infers(self) -> dict[str, Any]:
        infers: dict[str, Any] = {}
        for name, path in self.bundle_paths.items():
            if name in self.requested:
                infers[name] = GuidedBundleInferTask(path, self.conf)
        if INTERACTIVE in self.requested:
            infers[INTERACTIVE] = GuidedInteractiveInferTask(self.bundle_paths[self.interactive_bundle], self.conf)
        for name, task in infers.items():
            if not task.is_valid():
                raise RuntimeError(f"model {name} could not be loaded from {self.model_dir}")
            bundle = self.interactive_bundle if name == INTERACTIVE else name
            task.weights_info = {"weights": self.weights.get(bundle, {})}
        return infers

    def init_trainers(self) -> dict[str, Any]:
        return {
            name: GuidedBundleTrainTask(path, self.conf)
            for name, path in self.bundle_paths.items()
            if name in self.requested
        }

    def init_strategies(self) -> dict[str, Any]:
        strategies: dict[str, Any] = {"random": Random()}
        served = [n for n in self.bundle_paths if n in self.requested]
        if served:  # scored with the model named in the request ("model"), by default this one
            default = self.conf.get("strategy_model") or (DEFAULT_INTERACTIVE_BUNDLE if DEFAULT_INTERACTIVE_BUNDLE in
                                                          served else served[0])  # fmt: skip
            strategies["mirror_uncertainty"] = MirrorUncertainty({n: self._infers[n] for n in served}, default)
        return strategies

    def init_scoring_methods(self) -> dict[str, Any]:
        served = [n for n in self.bundle_paths if n in self.requested]
        served.sort(key=lambda n: n != DEFAULT_INTERACTIVE_BUNDLE)  # the default model first (Slicer sends v[0])
        return {"dice": GuidedDice({n: self._infers[n] for n in served})}

    def init_datastore(self) -> Datastore:
        if self.studies.startswith(("http://", "https://")):
            self.studies = self.studies.rstrip("/").strip()
            return self.init_remote_datastore()
        return GuidedLocalDatastore(
            self.studies,
            extensions=settings.MONAI_LABEL_DATASTORE_FILE_EXT,
            auto_reload=settings.MONAI_LABEL_DATASTORE_AUTO_RELOAD,
            read_only=settings.MONAI_LABEL_DATASTORE_READ_ONLY,
        )

    def _download_dcmqi_tools(self) -> None:
        """No download at run time: DICOM SEG is written with pydicom-seg (``use_itk=False``) instead of dcmqi."""

    def _init_dicomweb_datastore(self) -> Datastore:
        """MONAI Label's DICOMweb datastore, with final labels stored back as DICOM SEG written by pydicom-seg."""
        datastore = super()._init_dicomweb_datastore()
        if type(datastore).__name__ == "DICOMWebDatastore":
            datastore.__class__ = GuidedDICOMWebDatastore  # same state, our save_label/json
        return datastore

    def on_init_complete(self) -> None:
        super().on_init_complete()
        fastapi_module = sys.modules.get("monailabel.app")
        if fastapi_module is not None and hasattr(fastapi_module, "app"):
            replaced = serve_blocking_endpoints_in_threads(fastapi_module.app)
            logger.info("served in worker threads: %s", replaced)

    def info(self) -> dict[str, Any]:
        """MONAI Label's ``/info/``, with the weights' status per model and per trainer (``weights``: ``source``
        ``bundle``/``app training``/``random``, ``trained``, ``guide_vit``: ``pretrained``/``random``, ``warning``)."""
        for name in self.bundle_paths:  # training may have replaced the served weights since the start
            self.weights[name] = weights_status(self.bundle_paths[name])
        for name, task in self._infers.items():
            bundle = self.interactive_bundle if name == INTERACTIVE else name
            if hasattr(task, "weights_info"):
                task.weights_info = {"weights": self.weights.get(bundle, {})}
        meta = super().info()
        for name, trainer in meta.get("trainers", {}).items():
            trainer["weights"] = self.weights.get(name, {})
        warnings = [f"{n}: {w['warning']}" for n, w in self.weights.items() if w.get("warning")]
        if warnings:
            meta["description"] = f"{meta.get('description', '')} -- WARNING: " + "; ".join(warnings)
        return meta

    # -- requests -----------------------------------------------------------------------------------------------
    def _check_image_dimension(self, task: Any, path: str, what: str) -> None:
        """A 2D image to a 3D model (or 3D to 2D) is a 400 naming both."""
        try:
            shape = nib.load(path).shape
        except Exception:  # unreadable files are reported by check_nifti
            return
        spatial = [s for s in shape[:3] if s > 1]
        dim = int(getattr(task, "dimension", 3))
        if (dim == 3 and len(spatial) < 3) or (dim == 2 and len(spatial) > 2):
            raise HTTPException(
                status_code=400,
                detail=f"{what} has shape {tuple(shape)} ({len(spatial)}D) but model {task_name(task)!r} is {dim}D",
            )

    def _check_image_request(self, request: dict[str, Any]) -> None:
        model = request.get("model")
        if model not in self._infers:
            raise HTTPException(status_code=404, detail=f"unknown model {model!r}; available: {sorted(self._infers)}")
        task = self._infers[model]
        if hasattr(task, "check_request"):
            task.check_request(request)
        image = request.get("image")
        if not isinstance(image, str):
            return
        allowed_roots = [os.path.realpath(tempfile.gettempdir())]
        if settings.MONAI_LABEL_SESSION_PATH:
            allowed_roots.append(os.path.realpath(settings.MONAI_LABEL_SESSION_PATH))
        real = os.path.realpath(image)
        if os.path.isabs(image) and os.path.exists(image):  # an upload (the endpoint stored it in the temp folder)
            if not any(real.startswith(root + os.sep) for root in allowed_roots):
                raise HTTPException(status_code=400, detail="image must be a datastore id or an uploaded file")
            if os.path.isfile(real) and real.endswith((".nii", ".nii.gz")):
                check_nifti(real, "uploaded image")
                self._check_image_dimension(task, real, "the uploaded image")
            return
        if self.studies.startswith(("http://", "https://")):
            if "/" in image or "\\" in image or ".." in image:
                raise HTTPException(status_code=400, detail=f"invalid image id {image!r}")
            return
        check_id(image)
        uri = self.datastore().get_image_uri(image)
        if not uri:
            raise HTTPException(status_code=404, detail=f"image {image!r} not found in the datastore")
        if os.path.isfile(uri):
            self._check_image_dimension(task, uri, f"image {image!r}")

    def infer(self, request: dict[str, Any], datastore: Datastore | None = None) -> dict[str, Any]:
        self._check_image_request(request)
        result = super().infer(request, datastore)
        params = result.get("params") or {}
        guide_file = params.pop("guide_file", None)
        if guide_file and os.path.exists(guide_file):
            image_id = request.get("image")
            stored = isinstance(image_id, str) and not os.path.isabs(image_id)
            if stored:
                label_id = (datastore or self.datastore()).save_label(
                    image_id, guide_file, "guide", {"model": request.get("model")}
                )
                params["guide"] = {"label": label_id, "tag": "guide"}
            if request.get("return_guide") == "image":
                if result.get("file") and os.path.exists(result["file"]):
                    os.unlink(result["file"])
                result["file"] = guide_file
                result["label"] = guide_file
            else:
                os.unlink(guide_file)
        return result

    def train(self, request: dict[str, Any]) -> dict[str, Any]:
        return super().train(request)


def task_name(task: Any) -> str:
    """The bundle folder name of an inference task (for messages)."""
    return os.path.basename(str(getattr(task, "bundle_path", "") or "model"))
