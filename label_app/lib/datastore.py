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
"""A local-folder datastore that checks what it is given and never leaves a torn file."""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
from fastapi import HTTPException
from filelock import FileLock
from monailabel.datastore.local import DataModel, LocalDatastore
from monailabel.interfaces.datastore import DefaultLabelTag

from guidino_monai.utils import atomic_write

__all__ = ["GuidedLocalDatastore", "check_id", "check_nifti", "drop_guide_segment", "image_dimension"]

logger = logging.getLogger(__name__)

_SAFE_ID = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.\-]{0,200}$")


def check_id(value: str, what: str = "image id") -> str:
    """Refuse ids that could leave the datastore folder (``../``, ``/``, ``\\``, empty, leading dot)."""
    if not isinstance(value, str) or not _SAFE_ID.match(value) or ".." in value:
        raise HTTPException(status_code=400, detail=f"invalid {what} {value!r}: use letters, digits, '_', '-', '.'"
                            " only, no path separators or '..'")  # fmt: skip
    return value


def image_dimension(path: str) -> int | None:
    """Number of spatial axes longer than 1 in a NIfTI header (``None`` when it cannot be read)."""
    try:
        return len([s for s in nib.load(path).shape[:3] if s > 1])
    except Exception:
        return None


def check_nifti(path: str, what: str, shape: tuple[int, ...] | None = None, integer: bool = False) -> tuple:
    """Open a NIfTI fully (header and voxels) and check it; a 400 ``HTTPException`` names what is wrong.

    Returns the spatial shape.
    """
    try:
        img = nib.load(path)
        data = np.asanyarray(img.dataobj)
    except Exception as e:  # any reader error is the client's file, not the server
        raise HTTPException(
            status_code=400, detail=f"{what} is not a readable NIfTI file: {type(e).__name__}: {e}"
        ) from e
    if data.ndim < 2 or data.size == 0:
        raise HTTPException(status_code=400, detail=f"{what} has shape {data.shape}: not an image")
    if np.issubdtype(data.dtype, np.floating) and not np.isfinite(data).all():
        raise HTTPException(status_code=400, detail=f"{what} contains NaN or Inf values")
    spatial = tuple(int(s) for s in data.shape[:3]) if data.ndim >= 3 else tuple(int(s) for s in data.shape)
    if integer and np.issubdtype(data.dtype, np.floating) and not np.all(np.equal(np.round(data), data)):
        raise HTTPException(status_code=400, detail=f"{what} has non-integer values: a label map must hold class ids")
    if shape is not None:
        squeezed = tuple(s for s in data.shape if s != 1)
        if spatial != tuple(shape) and squeezed != tuple(s for s in shape if s != 1):
            raise HTTPException(status_code=400, detail=f"{what} has shape {data.shape}, the image has {tuple(shape)}")
    return spatial


def drop_guide_segment(label_file: str, label_info: dict[str, Any] | None) -> tuple[str, bool]:
    """3D Slicer submits every segment, the ``guide`` segment of ``return_guide: "segment"`` too: set its voxels to 0.

    Slicer's ``PUT /datastore/label`` carries ``{"label_info": [{"name": ..., "idx": ...}, ...]}``; the entry named
    ``guide`` gives the value to clear.

    Returns:
        ``(file, cleaned)``: a new temporary file (``cleaned`` True, the caller removes it) or ``label_file`` as is.
    """
    from .params import GUIDE_SEGMENT

    entries = (label_info or {}).get("label_info") if isinstance(label_info, dict) else None
    if not isinstance(entries, list):
        return label_file, False
    values = []
    for e in entries:
        if isinstance(e, dict) and str(e.get("name", "")).strip().lower() == GUIDE_SEGMENT:
            v = e.get("idx", e.get("id"))
            if isinstance(v, int) and not isinstance(v, bool) and v > 0:
                values.append(v)
    if not values:
        return label_file, False
    img = nib.load(label_file)
    data = np.asanyarray(img.dataobj)
    if not np.isin(data, values).any():
        return label_file, False
    data = np.where(np.isin(data, values), 0, data).astype(data.dtype)
    ext = ".nii.gz" if label_file.endswith(".nii.gz") else ".nii"
    fd, out = tempfile.mkstemp(suffix=ext)
    os.close(fd)
    nib.save(nib.Nifti1Image(data, img.affine, img.header), out)
    logger.info("dropped the guide segment (values %s) from the submitted label", values)
    return out, True


def _atomic_copy(src: str, dest: str) -> None:
    atomic_write(dest, lambda tmp: shutil.copyfile(src, tmp))


class GuidedLocalDatastore(LocalDatastore):
    """MONAI Label's :class:`LocalDatastore` with checked ids and uploads and atomic writes.

    - image ids and label tags are plain names (no ``../``): anything else is a 400;
    - uploaded images and labels are opened completely before they are stored: an unreadable file, NaN/Inf, a
      non-integer label or a label whose shape differs from its image is a 400 naming the problem;
    - files and ``datastore_v2.json`` are written to a temporary file and renamed, under the datastore's file lock, so
      two submissions for the same image leave one complete file (the later one), never a mix.
    """

    def get_image_uri(self, image_id: str) -> str:
        check_id(image_id)
        return super().get_image_uri(image_id)

    def get_image_info(self, image_id: str) -> dict[str, Any]:
        check_id(image_id)
        self.refresh()
        return super().get_image_info(image_id)

    def get_label_uri(self, label_id: str, label_tag: str) -> str:
        check_id(label_id, "label id")
        check_id(label_tag, "label tag")
        return super().get_label_uri(label_id, label_tag)

    def add_image(self, image_id: str, image_filename: str, image_info: dict[str, Any]) -> str:
        id_from_file, image_ext = self._to_id(os.path.basename(image_filename))
        image_id = check_id(image_id or id_from_file)
        if image_ext not in (".nii", ".nii.gz"):
            raise HTTPException(status_code=400, detail=f"image must be a .nii or .nii.gz file, got {image_ext!r}")
        check_nifti(image_filename, f"image {image_id!r}")
        name = self._filename(image_id, image_ext)
        dest = os.path.realpath(os.path.join(self._datastore.image_path(), name))
        with FileLock(self._lock_file):
            _atomic_copy(image_filename, dest)
            info = dict(image_info or {})
            info.update(ts=int(time.time()), name=name)
            from monailabel.datastore.local import ImageLabelModel

            self._datastore.objects[image_id] = ImageLabelModel(image=DataModel(info=info, ext=image_ext))
            self._update_datastore_file(lock=False)
        return image_id

    def save_label(self, image_id: str, label_filename: str, label_tag: str, label_info: dict[str, Any]) -> str:
        check_id(image_id)
        check_id(label_tag, "label tag")
        self._init_from_datastore_file()
        obj = self._datastore.objects.get(image_id)
        if not obj:
            raise HTTPException(status_code=404, detail=f"image {image_id!r} not found in the datastore")
        _, label_ext = self._to_id(os.path.basename(label_filename))
        if label_ext not in (".nii", ".nii.gz"):
            raise HTTPException(status_code=400, detail=f"label must be a .nii or .nii.gz file, got {label_ext!r}")
        image_shape = check_nifti(self.get_image_uri(image_id), f"image {image_id!r}")
        check_nifti(label_filename, f"label for {image_id!r}", shape=image_shape, integer=label_tag != "guide")
        label_filename, cleaned = drop_guide_segment(label_filename, label_info) if label_tag != "guide" else (
            label_filename, False)  # fmt: skip
        if label_tag == DefaultLabelTag.FINAL.value:
            try:
                self.check_label_values(label_filename, label_info)
            except HTTPException:
                if cleaned:
                    os.unlink(label_filename)
                raise
        name = self._filename(image_id, label_ext)
        dest = os.path.join(self._datastore.label_path(label_tag), name)
        with FileLock(self._lock_file):
            self._reload_unlocked()  # another process (training, scoring) may have written it
            obj = self._datastore.objects.get(image_id) or obj
            _atomic_copy(label_filename, dest)
            info = dict(label_info or {})
            info.update(ts=int(time.time()), name=name)
            obj.labels[label_tag] = DataModel(info=info, ext=label_ext)
            self._datastore.objects[image_id] = obj
            self._update_datastore_file(lock=False)
        if cleaned:
            os.unlink(label_filename)
        return image_id

    #: model name -> class ids its labels may hold (0 included); set by the app. A final label with other values
    #: (the ``guide`` segment submitted without ``label_info``, a Slicer segment the models do not know) would break
    #: training, so it is refused with the reason.
    label_values: dict[str, set[int]] = {}

    def check_label_values(self, label_file: str, label_info: dict[str, Any] | None) -> None:
        """400 when a final label holds values that are no class of its model (or of any model).

        Raises:
            HTTPException: naming the unknown values and the allowed ones.
        """
        if not self.label_values:
            return
        model = (label_info or {}).get("model") if isinstance(label_info, dict) else None
        allowed = self.label_values.get(model) if isinstance(model, str) else None
        if allowed is None:
            allowed = set().union(*self.label_values.values())
        values = {int(v) for v in np.unique(np.asanyarray(nib.load(label_file).dataobj))}
        extra = sorted(values - allowed)
        if extra:
            raise HTTPException(
                status_code=400,
                detail=f"label values {extra} are no class of {model or 'the app models'} (allowed {sorted(allowed)}):"
                " remove the 'guide' segment (or send label_info naming it) and segments the model does not know",
            )

    def remove_label(self, label_id: str, label_tag: str) -> None:
        check_id(label_id, "label id")
        check_id(label_tag, "label tag")
        super().remove_label(label_id, label_tag)

    def update_image_info(self, image_id: str, info: dict[str, Any]) -> None:
        check_id(image_id)
        with FileLock(self._lock_file):
            self._reload_unlocked()
            obj = self._datastore.objects.get(image_id)
            if not obj:
                raise HTTPException(status_code=404, detail=f"image {image_id!r} not found in the datastore")
            obj.image.info.update(info)
            self._update_datastore_file(lock=False)

    def _reload_unlocked(self) -> None:
        """Re-read ``datastore_v2.json`` if it changed on disk; the caller holds the file lock."""
        from monailabel.datastore.local import LocalDatastoreModel

        if os.path.exists(self._datastore_config_path):
            ts = os.stat(self._datastore_config_path).st_mtime
            if ts != self._config_ts:
                with open(self._datastore_config_path) as fp:
                    self._datastore = LocalDatastoreModel.model_validate_json(fp.read())
                self._datastore.base_path = self._datastore_path
                self._config_ts = ts

    def _update_datastore_file(self, lock: bool = True) -> None:
        def write() -> None:
            self._ignore_event_config = True
            text = json.dumps(self._datastore.model_dump(exclude={"base_path"}), indent=2, default=str)
            atomic_write(self._datastore_config_path, lambda tmp: Path(tmp).write_text(text))
            self._config_ts = os.stat(self._datastore_config_path).st_mtime

        if lock:
            with FileLock(self._lock_file):
                write()
        else:
            write()

    def refresh(self) -> None:
        """Re-read ``datastore_v2.json`` if another process (scoring, training, strategies run in subprocesses) wrote
        it, so ``GET /datastore`` and ``/info/`` show their results."""
        with FileLock(self._lock_file):
            self._reload_unlocked()

    def json(self) -> dict[str, Any]:
        self.refresh()
        return super().json()

    def status(self) -> dict[str, Any]:
        self.refresh()
        return super().status()

    def datalist(self, full_path: bool = True) -> list[dict[str, Any]]:
        self._init_from_datastore_file()
        return super().datalist(full_path)

    def final_labels(self) -> list[str]:
        """Ids of the images with a ``final`` label."""
        self._init_from_datastore_file()
        return sorted(self._datastore.filter_by_tag(DefaultLabelTag.FINAL.value))
