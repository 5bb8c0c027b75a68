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

"""Small synthetic Decathlon-style datasets, so that bundles can be tried and smoke-tested without real data.

``"hippocampus"`` imitates MSD Task04 (3D MRI crops, labels 1 anterior and 2 posterior) and ``"fetalhead"``
imitates HC18 (2D ultrasound, label 1 fetal head, reference head circumference per case, HC18 case names with
repeat scans). The data are learnable by a small network but are not meant to be realistic.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
from scipy import ndimage

from ..metrics.head_circumference import ellipse_circumference
from ..utils import atomic_write

__all__ = ["DEMO_TASKS", "make_demo_dataset"]

#: The tasks :func:`make_demo_dataset` can generate.
DEMO_TASKS = ("hippocampus", "fetalhead")

#: Bumped whenever the generated data change, so that older demo folders are regenerated.
_GENERATOR_VERSION = 1

_HIPPOCAMPUS_META = {
    "name": "Synthetic hippocampus (demo)",
    "description": "Synthetic 3D MRI-like crops imitating MSD Task04 Hippocampus, made by guidino_monai.data.demo.",
    "tensorImageSize": "3D",
    "modality": {"0": "MRI"},
    "labels": {"0": "background", "1": "anterior", "2": "posterior"},
}
_FETALHEAD_META = {
    "name": "Synthetic fetal head ultrasound (demo)",
    "description": "Synthetic 2D ultrasound-like images imitating HC18, made by guidino_monai.data.demo.",
    "tensorImageSize": "2D",
    "modality": {"0": "US"},
    "labels": {"0": "background", "1": "fetal head"},
}


def _smooth_noise(rng: np.random.Generator, shape: tuple[int, ...], sigma: float) -> np.ndarray:
    """Gaussian-smoothed white noise, rescaled to unit standard deviation."""
    field = ndimage.gaussian_filter(rng.standard_normal(shape).astype(np.float32), sigma)
    return field / max(float(field.std()), 1e-6)


def _hippocampus_case(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """One 3D case: a curved, tapering tube along axis 1; its front part is label 1 and its back part label 2."""
    shape = (32 + int(rng.integers(-2, 3)), 40 + int(rng.integers(-2, 3)), 32 + int(rng.integers(-2, 3)))
    centre = np.array(shape, dtype=np.float32) / 2 + rng.uniform(-1.5, 1.5, 3).astype(np.float32)
    length = rng.uniform(20.0, 25.0)
    bend = rng.uniform(3.0, 6.0) * rng.choice([-1.0, 1.0])
    tilt = rng.uniform(-4.0, 4.0)
    t = np.linspace(0.0, 1.0, 48, dtype=np.float32)
    line = np.stack(
        [
            centre[0] + bend * (1.0 - (2.0 * t - 1.0) ** 2) - bend / 2.0,
            centre[1] + length * (t - 0.5),
            centre[2] + tilt * (t - 0.5),
        ],
        axis=1,
    )
    radius = rng.uniform(3.8, 4.5) - rng.uniform(1.2, 1.8) * t  # thick head, thin tail
    split = rng.uniform(0.4, 0.5)

    # Distance to the centre line, computed in the bounding box of the structure only (outside: far away).
    lo = np.maximum(np.floor(line.min(0) - radius.max() - 3), 0).astype(int)
    hi = np.minimum(np.ceil(line.max(0) + radius.max() + 4), shape).astype(int)
    box = tuple(slice(a, b) for a, b in zip(lo, hi))
    grid = np.stack(np.meshgrid(*[np.arange(a, b, dtype=np.float32) for a, b in zip(lo, hi)], indexing="ij"), -1)
    pts = grid.reshape(-1, 3)
    d2 = ((pts[:, None, :] - line[None, :, :]) ** 2).sum(-1)  # (voxels, points)
    nearest = d2.argmin(1)
    dist = np.full(shape, 1e3, np.float32)
    dist[box] = np.sqrt(d2[np.arange(len(pts)), nearest]).reshape(grid.shape[:-1])
    local_radius = np.zeros(shape, np.float32)
    local_radius[box] = radius[nearest].reshape(grid.shape[:-1])
    t_near = np.ones(shape, np.float32)
    t_near[box] = t[nearest].reshape(grid.shape[:-1])
    inside = dist <= local_radius
    label = np.zeros(shape, np.uint8)
    label[inside & (t_near < split)] = 1
    label[inside & (t_near >= split)] = 2

    # Grey-matter-like structure on a smoothly varying background, with a dark CSF-like rim, a bias field and noise.
    image = 62.0 + 10.0 * _smooth_noise(rng, shape, 3.0)
    rim = ~inside & (dist <= local_radius + 1.5)
    image[rim] -= 22.0
    image[label == 1] = 112.0 + rng.uniform(-6, 6)
    image[label == 2] = 96.0 + rng.uniform(-6, 6)
    image = ndimage.gaussian_filter(image, 0.6)
    axis_gain = rng.uniform(-0.12, 0.12, 3)
    bias = np.ones(shape, np.float32)
    for axis, (gain, size) in enumerate(zip(axis_gain, shape)):
        ramp = gain * (np.arange(size, dtype=np.float32) / size - 0.5)
        bias = bias + ramp.reshape([-1 if k == axis else 1 for k in range(3)])
    image = image * bias + rng.normal(0.0, 6.0, shape)
    return np.clip(np.rint(image), 0, 255).astype(np.uint8), label


def _fetalhead_case(rng: np.random.Generator, semi_a: float, semi_b: float) -> tuple[np.ndarray, np.ndarray]:
    """One 2D case with a filled ellipse head label (semi-axes in pixels) inside a bright skull ring."""
    shape = (160, 112)
    angle = rng.uniform(-math.pi / 2, math.pi / 2)
    ext_y = math.sqrt((semi_a * math.sin(angle)) ** 2 + (semi_b * math.cos(angle)) ** 2)
    ext_x = math.sqrt((semi_a * math.cos(angle)) ** 2 + (semi_b * math.sin(angle)) ** 2)
    margin = 4.0
    cy = rng.uniform(ext_y + margin, shape[0] - 1 - ext_y - margin)
    cx = rng.uniform(ext_x + margin, shape[1] - 1 - ext_x - margin)

    yy, xx = np.meshgrid(np.arange(shape[0], dtype=np.float32), np.arange(shape[1], dtype=np.float32), indexing="ij")
    dy, dx = yy - cy, xx - cx
    u = dx * math.cos(angle) + dy * math.sin(angle)  # along the major axis
    v = -dx * math.sin(angle) + dy * math.cos(angle)  # along the minor axis
    rho = np.sqrt((u / semi_a) ** 2 + (v / semi_b) ** 2)
    label = (rho <= 1.0).astype(np.uint8)
    # Approximate signed distance to the ellipse, in pixels (negative inside).
    grad = np.sqrt((u / semi_a**2) ** 2 + (v / semi_b**2) ** 2) / np.maximum(rho, 1e-6)
    dist = (rho - 1.0) / np.maximum(grad, 1e-6)

    image = 70.0 + 14.0 * _smooth_noise(rng, shape, 6.0) + 25.0 * (yy / shape[0])  # tissue, deeper is brighter
    image = np.where(rho <= 1.0, 38.0 + 8.0 * _smooth_noise(rng, shape, 3.0), image)  # brain
    image += 60.0 * ((np.abs(v) < 0.8) & (rho < 0.8))  # midline echo
    thickness = rng.uniform(1.2, 2.0)
    ring = np.exp(-0.5 * ((dist + thickness) / thickness) ** 2)  # skull, just inside the label boundary
    shadow_start = rng.uniform(-math.pi, math.pi)
    phase = (np.arctan2(v / semi_b, u / semi_a) - shadow_start) % (2 * math.pi)
    ring *= np.where(phase < rng.uniform(0.3, 0.9), 0.35, 1.0)  # acoustic shadow: a weaker sector of the skull
    image += 150.0 * ring
    image = ndimage.gaussian_filter(image, 0.7)
    speckle = ndimage.gaussian_filter(rng.rayleigh(1.0, shape).astype(np.float32), 0.6)
    image = image * speckle / float(speckle.mean())
    return np.clip(np.rint(image), 0, 255).astype(np.uint8), label


def _hc18_names(num_cases: int) -> list[tuple[str, int]]:
    """HC18-style case names and their fetus index: ``000_HC``, ``001_HC``, ``001_2HC``, ``002_HC``, ..."""
    repeats = (1, 2, 1, 3)
    names: list[tuple[str, int]] = []
    fetus = 0
    while len(names) < num_cases:
        for r in range(repeats[fetus % len(repeats)]):
            names.append((f"{fetus:03d}_{'' if r == 0 else r + 1}HC", fetus))
        fetus += 1
    return names[:num_cases]


def _save_atomic(data: np.ndarray, affine: np.ndarray, path: str) -> None:
    """Save a NIfTI file under a temporary name and move it into place, so a reader never sees half a file."""
    img = nib.Nifti1Image(data, affine)
    img.header.set_xyzt_units("mm")
    atomic_write(path, lambda tmp: nib.save(img, tmp))


def _existing_demo(json_path: str) -> dict[str, Any] | None:
    """An existing demo ``dataset.json``, parsed (``None`` if it vanished); raise if this module did not write it."""
    try:
        with open(json_path, encoding="utf-8") as f:
            meta = json.load(f)
    except (UnicodeDecodeError, json.JSONDecodeError):
        meta = None  # this function writes dataset.json atomically, so a broken one is not ours
    except OSError:
        return None
    if not isinstance(meta, dict) or not isinstance(meta.get("demo"), dict):
        raise FileExistsError(
            f"{json_path}: holds a dataset.json that make_demo_dataset did not write; refusing to overwrite it. "
            "Choose an empty folder for the demo dataset."
        )
    return meta


def _is_complete(root: str, meta: dict[str, Any] | None, record: dict[str, Any]) -> bool:
    if meta is None or meta.get("demo") != record:
        return False
    training = meta.get("training")
    if not isinstance(training, list) or len(training) != record["num_cases"]:
        return False
    if meta.get("numTraining") != len(training):
        return False
    for item in training:
        for key in ("image", "label"):
            if not isinstance(item, dict) or not os.path.isfile(os.path.join(root, str(item.get(key)))):
                return False
    return True


def make_demo_dataset(root: str | os.PathLike, task: str, num_cases: int = 12, seed: int = 0) -> str:
    """Write a small synthetic Decathlon-style dataset (``imagesTr/``, ``labelsTr/``, ``dataset.json``) to ``root``.

    - ``"hippocampus"``: 3D uint8 MRI-like crops of about 32x40x32 voxels (1 mm, identity affine), labels
      ``0`` background, ``1`` anterior, ``2`` posterior: a curved, tapering structure whose front is label 1 and
      back label 2, brighter than its surroundings, with a smooth background, a bias field and noise.
    - ``"fetalhead"``: 2D uint8 ultrasound-like images of 160x112 pixels (0.5 mm), speckle noise, a bright
      elliptical skull ring with an acoustic shadow; label ``1`` is the filled ellipse at a random position, size
      and angle. Case names follow HC18 (``000_HC``, ``001_HC``, ``001_2HC``, ...; repeat scans share the head
      size), and each entry carries ``"head_circumference_mm"``, the ellipse perimeter (Ramanujan) in mm.

    The call is idempotent: when ``root`` already holds a complete demo dataset made with the same ``task``,
    ``num_cases`` and ``seed``, it returns at once. Files are written under temporary names and moved into place,
    and ``dataset.json`` is written last (and removed first when regenerating), so an interrupted run is never
    taken for a complete dataset. The data depend only on ``task``, ``num_cases`` and ``seed``.

    Args:
        root: the dataset folder (created if needed), e.g. ``"./demo_data/hippocampus"``.
        task: ``"hippocampus"`` or ``"fetalhead"``.
        num_cases: the number of cases. Defaults to ``12``.
        seed: the random seed. Defaults to ``0``.

    Returns:
        the absolute path of the dataset folder, to be used as ``dataset_dir``.

    Raises:
        ValueError: when ``task`` is unknown or ``num_cases < 1``.
        FileExistsError: when ``root`` holds a ``dataset.json`` that this function did not write.

    Example::

        dataset_dir = make_demo_dataset("/tmp/demo_hippocampus", "hippocampus")
        datalist = load_checked_datalist(dataset_dir, spatial_dims=3, label_values=[0, 1, 2])
    """
    if task not in DEMO_TASKS:
        raise ValueError(f"task must be one of {DEMO_TASKS}, got {task!r}.")
    if int(num_cases) < 1:
        raise ValueError(f"num_cases must be at least 1, got {num_cases}.")
    num_cases, seed = int(num_cases), int(seed)
    root = os.path.abspath(os.path.expanduser(os.fspath(root)))
    json_path = os.path.join(root, "dataset.json")
    record = {"task": task, "num_cases": num_cases, "seed": seed, "version": _GENERATOR_VERSION}
    if os.path.isfile(json_path):
        if _is_complete(root, _existing_demo(json_path), record):
            return root
        os.remove(json_path)
    os.makedirs(os.path.join(root, "imagesTr"), exist_ok=True)
    os.makedirs(os.path.join(root, "labelsTr"), exist_ok=True)

    training: list[dict[str, Any]] = []
    if task == "hippocampus":
        meta: dict[str, Any] = dict(_HIPPOCAMPUS_META)
        affine = np.eye(4)
        for i in range(num_cases):
            image, label = _hippocampus_case(np.random.default_rng([seed, i]))
            name = f"hippocampus_{i:03d}"
            _save_atomic(image, affine, os.path.join(root, "imagesTr", f"{name}.nii.gz"))
            _save_atomic(label, affine, os.path.join(root, "labelsTr", f"{name}.nii.gz"))
            training.append({"image": f"./imagesTr/{name}.nii.gz", "label": f"./labelsTr/{name}.nii.gz"})
    else:
        meta = dict(_FETALHEAD_META)
        spacing = 0.5
        affine = np.diag([spacing, spacing, 1.0, 1.0])
        head_sizes: dict[int, tuple[float, float]] = {}
        for i, (name, fetus) in enumerate(_hc18_names(num_cases)):
            rng = np.random.default_rng([seed, i])
            if fetus not in head_sizes:  # repeat scans of one fetus share its head size
                semi_a = float(np.random.default_rng([seed, 10_000 + fetus]).uniform(20.0, 44.0))
                ratio = float(np.random.default_rng([seed, 20_000 + fetus]).uniform(0.72, 0.88))
                head_sizes[fetus] = (semi_a, semi_a * ratio)
            semi_a, semi_b = (s * rng.uniform(0.98, 1.02) for s in head_sizes[fetus])
            image, label = _fetalhead_case(rng, semi_a, semi_b)
            _save_atomic(image, affine, os.path.join(root, "imagesTr", f"{name}.nii.gz"))
            _save_atomic(label, affine, os.path.join(root, "labelsTr", f"{name}.nii.gz"))
            hc = ellipse_circumference(semi_a * spacing, semi_b * spacing)
            training.append(
                {
                    "image": f"./imagesTr/{name}.nii.gz",
                    "label": f"./labelsTr/{name}.nii.gz",
                    "head_circumference_mm": round(hc, 3),
                }
            )
    meta.update(numTraining=len(training), training=training, demo=record)
    atomic_write(json_path, lambda tmp: Path(tmp).write_text(json.dumps(meta, indent=1), encoding="utf-8"))
    return root
