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
"""DICOMweb datastore that writes DICOM SEG with pydicom-seg (no dcmqi/ITK ``itkimage2segimage`` download)."""

from __future__ import annotations

import logging
import os
import pathlib
from typing import Any

from fastapi import HTTPException
from monailabel.datastore.dicom import DICOMWebDatastore
from monailabel.datastore.local import LocalDatastore
from monailabel.datastore.utils.convert import binary_to_image, nifti_to_dicom_seg
from monailabel.datastore.utils.dicom import dicom_web_upload_dcm
from monailabel.interfaces.datastore import DefaultLabelTag

__all__ = ["GuidedDICOMWebDatastore", "label_to_dicom_seg"]

logger = logging.getLogger(__name__)


def label_to_dicom_seg(series_dir: str, label_file: str, label_info: Any = None) -> str:
    """A NIfTI label map on the geometry of the DICOM series in ``series_dir`` -> a DICOM SEG file (pydicom-seg
    ``MultiClassWriter``); ``""`` when the label is empty."""
    return nifti_to_dicom_seg(series_dir, label_file, label_info, use_itk=False)


class GuidedDICOMWebDatastore(DICOMWebDatastore):
    """MONAI Label's :class:`DICOMWebDatastore` with DICOM SEG written by pydicom-seg, and ``json()`` listing every
    series of the server (not only the ones already fetched to the cache).

    ``PUT /datastore/label?image=<SeriesInstanceUID>&tag=final`` converts the NIfTI label to DICOM SEG referencing the
    image series and stores it on the server with STOW-RS; other tags stay in the local cache.
    """

    def save_label(
        self, image_id: str, label_filename: str, label_tag: str, label_info: dict[str, Any], label_id: str = ""
    ) -> str:
        label_info = dict(label_info or {})
        if image_id not in self.list_images():
            raise HTTPException(status_code=404, detail=f"image {image_id!r} not found on the DICOMweb server")
        image_uri = self.get_image_uri(image_id)
        output_file = ""
        if "".join(pathlib.Path(label_filename).suffixes) == ".bin":
            output_file = label_filename = binary_to_image(image_uri, label_filename)
        try:
            if label_tag == DefaultLabelTag.FINAL:
                image_dir = os.path.realpath(os.path.join(self._datastore.image_path(), image_id))
                seg_file = label_to_dicom_seg(image_dir, label_filename, label_info.get("label_info"))
                if not seg_file:
                    raise HTTPException(status_code=400, detail="the label is empty: no DICOM SEG to store")
                try:
                    seg_series = dicom_web_upload_dcm(seg_file, self._client)
                finally:
                    os.unlink(seg_file)
                image_info = self.get_image_info(image_id)
                label_info.update(
                    SeriesInstanceUID=seg_series,
                    Modality="SEG",
                    PatientID=image_info.get("PatientID"),
                    StudyInstanceUID=image_info.get("StudyInstanceUID"),
                )
            return LocalDatastore.save_label(self, image_id, label_filename, label_tag, label_info)
        finally:
            if output_file and os.path.exists(output_file):
                os.unlink(output_file)

    def json(self) -> dict[str, Any]:
        out = super().json()
        objects = out.setdefault("objects", {})
        for series in self.list_images():
            objects.setdefault(series, {"image": {"info": {"SeriesInstanceUID": series}}, "labels": {}})
        return out
