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

"""Checked loading of Medical-Segmentation-Decathlon style datalists, and grouped train/validation splits.

Every problem a training run would otherwise hit after minutes (or hours) is found here, before the first
iteration: missing, unreadable or truncated NIfTI files, 2D/3D mix-ups, image/label shape or spacing mismatches,
non-finite intensities, unexpected or missing label values. Each problem is reported as a :class:`DatasetError`
whose message names the file (absolute path) and the problem.
"""

from __future__ import annotations

import gzip
import json
import os
import random
import re
import struct
import zlib
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import nibabel as nib
import numpy as np
from nibabel.filebasedimages import ImageFileError
from nibabel.spatialimages import HeaderDataError
from nibabel.wrapstruct import WrapStructError

__all__ = [
    "DatasetError",
    "MAX_CHANNELS",
    "check_image",
    "check_case",
    "load_checked_datalist",
    "case_id",
    "hc18_fetus_id",
    "split_by_group",
]

#: Largest 4th dimension accepted as the MSD channel layout ``(x, y, z, channel)`` of a 3D image; a larger 4th
#: dimension is taken to be a time series, which no bundle of this package handles.
MAX_CHANNELS = 16

#: Errors nibabel, gzip and zlib raise on a corrupt, truncated or non-NIfTI file.
_READ_ERRORS = (EOFError, OSError, zlib.error, ImageFileError, HeaderDataError, WrapStructError, ValueError)

#: How many per-case problems are spelled out in the message of an aggregated :class:`DatasetError`.
_MAX_LISTED_ERRORS = 20

_NIFTI_SUFFIX = re.compile(r"\.nii(\.gz)?$", re.IGNORECASE)
_HC18_NAME = re.compile(r"^(\d+)_(\d*)HC$", re.IGNORECASE)


class DatasetError(ValueError):
    """A dataset or one of its files cannot be used for training or inference.

    The message names the offending file (absolute path) and the problem. When
    :func:`load_checked_datalist` finds several problems, they are all listed in one message and kept, one string
    per problem, in :attr:`errors`.

    Args:
        message: what is wrong, naming the file.
        errors: the individual problems, when the message aggregates several; defaults to ``[message]``.
    """

    def __init__(self, message: str, errors: Sequence[str] | None = None) -> None:
        super().__init__(message)
        self.errors: list[str] = list(errors) if errors is not None else [message]


def _read_nifti(path: str) -> tuple[np.ndarray, np.ndarray, tuple[float, ...]]:
    """Load a NIfTI file and read all of its data, so that corrupt or truncated files fail here.

    Returns:
        the data array, the 4x4 affine and the header zooms.

    Raises:
        DatasetError: when the file is missing, not a file, or cannot be read completely.
    """
    if not os.path.exists(path):
        raise DatasetError(f"{path}: file not found.")
    if not os.path.isfile(path):
        raise DatasetError(f"{path}: is not a file.")
    try:
        img = _load_nifti_verified(path)
        data = np.asanyarray(img.dataobj)
        affine = np.asarray(img.affine, dtype=np.float64)
        zooms = tuple(float(z) for z in img.header.get_zooms())
    except _READ_ERRORS as e:
        raise DatasetError(
            f"{path}: cannot be read as NIfTI (corrupt, truncated or not a NIfTI file): {type(e).__name__}: {e}"
        ) from e
    return data, affine, zooms


def _load_nifti_verified(path: str) -> nib.Nifti1Image | nib.Nifti2Image:
    """Load a ``.nii``/``.nii.gz`` file from memory, after decompressing it completely.

    Decompressing the whole file with :func:`gzip.decompress` checks the gzip trailer (CRC and length) too, which
    ``nibabel.load`` skips, so a file truncated by a few bytes is found as well. Other extensions go to
    ``nibabel.load``, which rejects what is not NIfTI.
    """
    lower = path.lower()
    if not (lower.endswith(".nii") or lower.endswith(".nii.gz")):
        img = nib.load(path)
        if not isinstance(img, (nib.Nifti1Image, nib.Nifti2Image)):
            raise ImageFileError(f"is a {type(img).__name__}, expected a NIfTI (.nii or .nii.gz) file")
        return img
    with open(path, "rb") as f:
        raw = f.read()
    if not raw:
        raise ImageFileError("empty file")
    if lower.endswith(".gz"):
        raw = gzip.decompress(raw)
    if len(raw) < 4:
        raise ImageFileError(f"file too small for a NIfTI header ({len(raw)} bytes)")
    sizes = (struct.unpack("<i", raw[:4])[0], struct.unpack(">i", raw[:4])[0])
    if 348 in sizes:
        return nib.Nifti1Image.from_bytes(raw)
    if 540 in sizes:
        return nib.Nifti2Image.from_bytes(raw)
    raise ImageFileError("no NIfTI-1 or NIfTI-2 header (sizeof_hdr is neither 348 nor 540)")


def _spatial_layout(path: str, shape: tuple[int, ...], spatial_dims: int, allow_channels: bool) -> tuple[int, ...]:
    """Split ``shape`` into its spatial shape and a channel count, or raise when it is not ``spatial_dims``-D.

    Trailing singleton dimensions beyond ``spatial_dims`` are dropped. With ``allow_channels``, a 3D image may carry
    a 4th, channel-last dimension (the MSD layout ``(x, y, z, channel)``, e.g. BraTS) of at most
    :data:`MAX_CHANNELS` channels.

    Returns:
        the spatial shape followed by the number of channels.
    """
    if spatial_dims not in (2, 3):
        raise ValueError(f"spatial_dims must be 2 or 3, got {spatial_dims}.")
    dims = list(shape)
    while len(dims) > spatial_dims and dims[-1] == 1:
        dims.pop()
    kind = "image" if allow_channels else "label"
    if len(dims) == spatial_dims:
        return (*dims, 1)
    if len(dims) < spatial_dims:
        raise DatasetError(
            f"{path}: is {len(dims)}D but this bundle expects {spatial_dims}D {kind}s (shape {tuple(shape)})."
        )
    if allow_channels and spatial_dims == 3 and len(dims) == 4:
        if dims[3] <= MAX_CHANNELS:
            return (*dims[:3], dims[3])
        raise DatasetError(
            f"{path}: has shape {tuple(shape)}; a 4th dimension of {dims[3]} is too large for the MSD channel "
            f"layout (x, y, z, channel) with at most {MAX_CHANNELS} channels (time series are not supported)."
        )
    if spatial_dims == 2 and len(dims) == 3:
        raise DatasetError(
            f"{path}: is 3D but this bundle expects 2D {kind}s (shape {tuple(shape)}; a 2D {kind} may have a "
            "trailing singleton dimension only)."
        )
    raise DatasetError(
        f"{path}: is {len(dims)}D but this bundle expects {spatial_dims}D {kind}s (shape {tuple(shape)})."
    )


def check_image(path: str | os.PathLike, spatial_dims: int) -> dict[str, Any]:
    """Check that one image can be used as a network input, e.g. a single inference input.

    The file must be a readable, complete NIfTI file with exactly ``spatial_dims`` spatial dimensions (a trailing
    singleton dimension is allowed; for 3D, a 4th channel-last dimension as in the MSD layout is allowed), and its
    intensities must be finite.

    Args:
        path: the image file (``.nii`` or ``.nii.gz``).
        spatial_dims: ``2`` or ``3``, the dimensionality the bundle expects.

    Returns:
        a dict with ``"image"`` (absolute path), ``"shape"`` (spatial shape), ``"channels"``, ``"spacing"`` (per
        spatial axis, from the header zooms), ``"affine"`` (4x4 numpy array) and ``"dtype"``.

    Raises:
        DatasetError: when any check fails; the message names the file and the problem.
        ValueError: when ``spatial_dims`` is not 2 or 3.
    """
    if spatial_dims not in (2, 3):
        raise ValueError(f"spatial_dims must be 2 or 3, got {spatial_dims}.")
    path = os.path.abspath(os.fspath(path))
    data, affine, zooms = _read_nifti(path)
    *shape, channels = _spatial_layout(path, data.shape, spatial_dims, allow_channels=True)
    if min(shape) < 1:
        raise DatasetError(f"{path}: has an empty spatial shape {tuple(shape)}.")
    if np.issubdtype(data.dtype, np.inexact):
        finite = np.isfinite(data)
        if not finite.all():
            n_nan = int(np.isnan(data).sum())
            n_inf = int(data.size - finite.sum()) - n_nan
            raise DatasetError(f"{path}: image contains non-finite values ({n_nan} NaN, {n_inf} Inf voxels).")
    elif not np.issubdtype(data.dtype, np.number) and data.dtype != np.bool_:
        raise DatasetError(f"{path}: has a non-numeric data type {data.dtype}.")
    spacing = tuple(zooms[:spatial_dims]) if len(zooms) >= spatial_dims else (1.0,) * spatial_dims
    if not all(np.isfinite(s) and s > 0 for s in spacing):
        raise DatasetError(f"{path}: has an invalid voxel spacing {spacing} in its header.")
    return {
        "image": path,
        "shape": tuple(int(s) for s in shape),
        "channels": int(channels),
        "spacing": spacing,
        "affine": affine,
        "dtype": str(data.dtype),
    }


def _as_label_values(label_values: Sequence[int] | Mapping[str, str]) -> list[float]:
    """Sorted allowed label values from a sequence, or from an MSD ``"labels"`` mapping such as ``{"0": "bg"}``."""
    values = list(label_values.keys()) if isinstance(label_values, Mapping) else list(label_values)
    try:
        result = sorted({float(v) for v in values})
    except (TypeError, ValueError) as e:
        raise ValueError(f"label_values must be numbers, got {label_values!r}.") from e
    if not result:
        raise ValueError("label_values must not be empty.")
    return result


def _fmt_value(value: float) -> str:
    """``7`` for integral values, the full ``repr`` otherwise (so ``1.0000001`` is not shown as ``1``)."""
    value = float(value)
    return str(int(value)) if value.is_integer() else repr(value)


def _fmt_spacing(spacing: Sequence[float]) -> str:
    return "(" + ", ".join(f"{s:.6g}" for s in spacing) + ")"


def check_case(
    image_path: str | os.PathLike,
    label_path: str | os.PathLike,
    spatial_dims: int,
    label_values: Sequence[int] | Mapping[str, str],
    allow_empty_label: bool = False,
) -> dict[str, Any]:
    """Check one image/label pair for training or evaluation.

    On top of :func:`check_image`: the label must be readable, have the image's spatial shape, contain only values
    in ``label_values``, hold some foreground (unless ``allow_empty_label``), and its spacing and affine must agree
    with the image's within ``1e-3`` (relative).

    Args:
        image_path: the image file.
        label_path: the label file.
        spatial_dims: ``2`` or ``3``.
        label_values: the values a label may contain, e.g. ``[0, 1, 2]`` (or the ``"labels"`` mapping of a
            ``dataset.json``, whose keys are the values); ``0`` is background.
        allow_empty_label: accept a label that holds only background. Defaults to ``False``.

    Returns:
        the dict of :func:`check_image`, plus ``"label"`` (absolute path) and ``"label_values"`` (sorted values
        present in the label).

    Raises:
        DatasetError: when any check fails; the message names the file and the problem.
        ValueError: when ``spatial_dims`` is not 2 or 3, or ``label_values`` is empty.
    """
    allowed_values = _as_label_values(label_values)
    info = check_image(image_path, spatial_dims)
    image_path = info["image"]
    label_path = os.path.abspath(os.fspath(label_path))
    data, affine, zooms = _read_nifti(label_path)
    *shape, _ = _spatial_layout(label_path, data.shape, spatial_dims, allow_channels=False)
    shape = tuple(int(s) for s in shape)
    if shape != info["shape"]:
        raise DatasetError(
            f"{label_path}: label spatial shape {shape} does not match the image's {info['shape']} "
            f"(image {image_path})."
        )
    if data.dtype == np.bool_:
        data = data.astype(np.uint8)
    present = np.unique(data)
    allowed = np.asarray(allowed_values, dtype=np.float64)
    unexpected = present[~np.isin(present, allowed)]
    if unexpected.size:
        shown = ", ".join(_fmt_value(v) for v in unexpected[:10].tolist())
        more = f" and {unexpected.size - 10} more" if unexpected.size > 10 else ""
        raise DatasetError(
            f"{label_path}: label contains unexpected values [{shown}{more}]; allowed values are "
            f"[{', '.join(_fmt_value(v) for v in allowed.tolist())}]."
        )
    if not allow_empty_label and not np.any(present != 0):
        raise DatasetError(f"{label_path}: label is empty (only background 0); set allow_empty_label=True to allow.")
    label_spacing = tuple(zooms[:spatial_dims]) if len(zooms) >= spatial_dims else (1.0,) * spatial_dims
    image_spacing = info["spacing"]
    for si, sl in zip(image_spacing, label_spacing):
        if abs(si - sl) > 1e-3 * max(abs(si), abs(sl)):
            raise DatasetError(
                f"{label_path}: label spacing {_fmt_spacing(label_spacing)} differs from the image spacing "
                f"{_fmt_spacing(image_spacing)} of {image_path}."
            )
    if not np.allclose(affine, info["affine"], rtol=1e-3, atol=1e-3 * max(1.0, *image_spacing)):
        raise DatasetError(
            f"{label_path}: label affine differs from the affine of {image_path} (same spacing "
            f"{_fmt_spacing(image_spacing)} but different orientation or origin):\n"
            f"label affine:\n{np.array2string(affine, precision=4)}\n"
            f"image affine:\n{np.array2string(info['affine'], precision=4)}"
        )
    info["label"] = label_path
    info["label_values"] = [int(v) if float(v).is_integer() else float(v) for v in present.tolist()]
    return info


def _resolve(base: str, path: Any, json_path: str, index: int, key: str) -> str:
    if not isinstance(path, str) or not path:
        raise DatasetError(f"{json_path}: entry {index} of '{key}' has an invalid path {path!r}.")
    return os.path.normpath(os.path.join(base, os.path.expanduser(path)))


def load_checked_datalist(
    dataset_dir: str | os.PathLike,
    spatial_dims: int,
    label_values: Sequence[int] | Mapping[str, str],
    key: str = "training",
    allow_empty_label: bool = False,
    check_files: bool = True,
) -> list[dict]:
    """Read the ``dataset.json`` of a Decathlon-style folder, make its paths absolute and validate every case.

    The folder holds ``dataset.json`` with a list under ``key`` whose entries look like
    ``{"image": "./imagesTr/x.nii.gz", "label": "./labelsTr/x.nii.gz", ...}`` (extra keys are kept; an entry may
    also be a bare image path, as in the MSD ``"test"`` list). Relative paths are resolved against ``dataset_dir``.
    Each case is checked with :func:`check_case` (or :func:`check_image` when it has no ``"label"``), and all
    problems are gathered before one :class:`DatasetError` is raised, so a user can fix them in one pass.

    Args:
        dataset_dir: the dataset folder (or the path of its ``dataset.json``).
        spatial_dims: ``2`` or ``3``, the dimensionality the bundle expects.
        label_values: the values a label may contain, e.g. ``[0, 1, 2]``, or a ``"labels"`` mapping.
        key: the list to read from ``dataset.json``. Defaults to ``"training"``.
        allow_empty_label: accept labels holding only background. Defaults to ``False``.
        check_files: open and check every file; when ``False``, only the JSON structure is checked. Defaults to
            ``True``.

    Returns:
        the entries, as new dicts with absolute ``"image"``/``"label"`` paths.

    Raises:
        DatasetError: when the folder or ``dataset.json`` is missing or invalid, the list is empty, or any case
            fails its checks.
        ValueError: when ``spatial_dims`` is not 2 or 3, or ``label_values`` is empty.

    Example::

        datalist = load_checked_datalist("/data/msd_hippocampus", spatial_dims=3, label_values=[0, 1, 2])
        train, val = split_by_group(datalist, val_fraction=0.2, seed=0)
    """
    if spatial_dims not in (2, 3):
        raise ValueError(f"spatial_dims must be 2 or 3, got {spatial_dims}.")
    _as_label_values(label_values)
    dataset_dir = os.path.abspath(os.path.expanduser(os.fspath(dataset_dir)))
    if os.path.isfile(dataset_dir) and dataset_dir.lower().endswith(".json"):
        json_path, dataset_dir = dataset_dir, os.path.dirname(dataset_dir)
    else:
        json_path = os.path.join(dataset_dir, "dataset.json")
    if not os.path.isdir(dataset_dir):
        raise DatasetError(f"{dataset_dir}: dataset folder not found.")
    if not os.path.isfile(json_path):
        raise DatasetError(f"{json_path}: file not found; a Decathlon-style dataset folder needs a dataset.json.")
    try:
        with open(json_path, encoding="utf-8") as f:
            meta = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DatasetError(f"{json_path}: is not valid JSON: {e}") from e
    if not isinstance(meta, dict):
        raise DatasetError(f"{json_path}: must hold a JSON object, found {type(meta).__name__}.")
    entries = meta.get(key)
    if entries is None:
        raise DatasetError(f"{json_path}: has no '{key}' list (keys found: {sorted(meta)}).")
    if not isinstance(entries, list):
        raise DatasetError(f"{json_path}: '{key}' must be a list, found {type(entries).__name__}.")
    if not entries:
        raise DatasetError(f"{json_path}: the '{key}' list is empty.")

    datalist: list[dict] = []
    errors: list[str] = []
    for i, entry in enumerate(entries):
        try:
            if isinstance(entry, str):
                entry = {"image": entry}
            if not isinstance(entry, dict) or "image" not in entry:
                raise DatasetError(f"{json_path}: entry {i} of '{key}' has no 'image': {entry!r}.")
            item = dict(entry)
            item["image"] = _resolve(dataset_dir, entry["image"], json_path, i, key)
            if "label" in entry:
                item["label"] = _resolve(dataset_dir, entry["label"], json_path, i, key)
            datalist.append(item)
            if check_files:
                if "label" in item:
                    check_case(item["image"], item["label"], spatial_dims, label_values, allow_empty_label)
                else:
                    check_image(item["image"], spatial_dims)
        except DatasetError as e:
            errors.extend(e.errors)
    if errors:
        if len(errors) == 1:
            raise DatasetError(errors[0])
        listed = "\n".join(f"  - {e}" for e in errors[:_MAX_LISTED_ERRORS])
        more = f"\n  ... and {len(errors) - _MAX_LISTED_ERRORS} more" if len(errors) > _MAX_LISTED_ERRORS else ""
        raise DatasetError(
            f"{json_path}: {len(errors)} problems in {len(entries)} '{key}' entries:\n{listed}{more}", errors
        )
    return datalist


def case_id(item: dict | str) -> str:
    """The case name of a datalist entry: the image file name without ``.nii``/``.nii.gz``.

    Args:
        item: a datalist entry with an ``"image"`` path, or the path itself.

    Returns:
        e.g. ``"hippocampus_001"`` for ``".../imagesTr/hippocampus_001.nii.gz"``.
    """
    path = item["image"] if isinstance(item, dict) else item
    if isinstance(path, (list, tuple)):
        path = path[0]
    return _NIFTI_SUFFIX.sub("", os.path.basename(os.fspath(path)))


def hc18_fetus_id(item: dict | str) -> str:
    """The fetus of an HC18 case: ``NNN_HC``, ``NNN_2HC`` and ``NNN_3HC`` are repeat scans of fetus ``NNN``.

    Args:
        item: a datalist entry with an ``"image"`` path, or the path itself.

    Returns:
        e.g. ``"012"`` for both ``.../012_HC.nii.gz`` and ``.../012_2HC.nii.gz``; names that do not follow the
        HC18 pattern fall back to :func:`case_id`.
    """
    name = case_id(item)
    m = _HC18_NAME.match(name)
    return m.group(1) if m else name


def split_by_group(
    datalist: Sequence[dict],
    val_fraction: float = 0.2,
    seed: int = 0,
    group_key: Callable[[dict], Any] | None = None,
) -> tuple[list[dict], list[dict]]:
    """Split a datalist into training and validation lists, keeping every group on one side.

    Groups (e.g. the repeat scans of one fetus, see :func:`hc18_fetus_id`) are shuffled with ``seed`` after
    sorting, so the split depends only on the set of groups, not on the order of ``datalist``. Whole groups are
    moved to the validation side until it holds about ``val_fraction`` of the cases. With two or more groups,
    both sides get at least one group; with a single group, everything is training data. The original order is
    kept within each side.

    Args:
        datalist: the entries, e.g. from :func:`load_checked_datalist`.
        val_fraction: the fraction of cases for validation, in ``(0, 1)``. Defaults to ``0.2``.
        seed: the shuffling seed. Defaults to ``0``.
        group_key: maps an entry to its group; ``None`` uses :func:`case_id` (one group per case).

    Returns:
        ``(train, val)``.

    Raises:
        ValueError: when ``val_fraction`` is not in ``(0, 1)``.
        TypeError: when ``group_key`` is neither callable nor ``None``.
    """
    if not 0.0 < float(val_fraction) < 1.0:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}.")
    if group_key is None:
        group_key = case_id
    if not callable(group_key):
        raise TypeError(f"group_key must be a callable or None, got {type(group_key).__name__}.")
    datalist = list(datalist)
    groups: dict[str, list[int]] = {}
    for i, item in enumerate(datalist):
        groups.setdefault(str(group_key(item)), []).append(i)
    names = sorted(groups)
    random.Random(seed).shuffle(names)
    val_idx: set[int] = set()
    if len(names) >= 2:
        target = max(1, round(float(val_fraction) * len(datalist)))
        for name in names[:-1]:  # the last group always stays in training
            if len(val_idx) >= target:
                break
            val_idx.update(groups[name])
    train = [item for i, item in enumerate(datalist) if i not in val_idx]
    val = [item for i, item in enumerate(datalist) if i in val_idx]
    return train, val
