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

"""Training-free click correction (DeepGrow-style click maps): a click's region follows the image intensities.

The TokenBook prototype update (:class:`~guidino_monai.interactive.ClickRefiner`) only helps as much as the DINO
tokens separate the structure; with a random-init guide ViT it barely does. This step needs no weights: each click
grows a region from the clicked voxel over connected voxels of similar intensity within ``radius`` voxels, and that
region is forced to the click's class (a foreground click adds it, a background click removes the class from it).
Clicks are applied in order, so a later click wins where regions overlap.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

__all__ = ["click_region", "apply_clicks"]


def click_region(
    image: np.ndarray,
    point: Sequence[float],
    radius: float = 4.0,
    tolerance: float = 1.0,
    spacing: Sequence[float] | None = None,
) -> np.ndarray:
    """Voxels connected to ``point`` whose intensity is within ``tolerance`` local standard deviations of the clicked
    voxel's neighbourhood, inside a ball of ``radius`` (voxels, or mm when ``spacing`` is given).

    Args:
        image: ``(*spatial)`` intensities (one channel), 2D or 3D.
        point: voxel coordinates of the click (rounded; clipped to the image).
        radius: size of the region.
        tolerance: intensity band, in standard deviations of the image within ``2 * radius`` of the click.
        spacing: voxel size per axis; ``None`` means 1.

    Returns:
        boolean mask of ``image``'s shape; always contains the clicked voxel.
    """
    from scipy import ndimage

    image = np.asarray(image, dtype=np.float32)
    shape = image.shape
    if len(point) != image.ndim:
        raise ValueError(f"point {list(point)} has {len(point)} coordinates for a {image.ndim}D image.")
    spacing = np.ones(image.ndim) if spacing is None else np.asarray(spacing, dtype=np.float64)
    c = [int(min(max(round(float(p)), 0), s - 1)) for p, s in zip(point, shape)]
    reach = [int(np.ceil(2 * radius / sp)) + 1 for sp in spacing]
    box = tuple(slice(max(ci - r, 0), min(ci + r + 1, s)) for ci, r, s in zip(c, reach, shape))
    sub = image[box]
    local = [ci - b.start for ci, b in zip(c, box)]
    grids = np.meshgrid(*[(np.arange(b.start, b.stop) - ci) * sp for b, ci, sp in zip(box, c, spacing)], indexing="ij")
    dist2 = sum(g**2 for g in grids)
    near = tuple(slice(max(li - 1, 0), li + 2) for li in local)
    ref = float(np.median(sub[near]))
    scale = float(np.std(sub[dist2 <= (2 * radius) ** 2])) or 1.0
    candidate = (dist2 <= radius**2) & (np.abs(sub - ref) <= tolerance * scale)
    candidate[tuple(local)] = True
    components, _ = ndimage.label(candidate)
    region_sub = components == components[tuple(local)]
    region = np.zeros(shape, dtype=bool)
    region[box] = region_sub
    return region


def apply_clicks(
    probs: np.ndarray,
    image: np.ndarray,
    foreground: Sequence[Sequence[float]] = (),
    background: Sequence[Sequence[float]] = (),
    label: int | None = None,
    radius: float = 4.0,
    tolerance: float = 1.0,
    spacing: Sequence[float] | None = None,
) -> np.ndarray:
    """Force each click's :func:`click_region` to the click's class in the class probabilities ``probs``.

    Args:
        probs: ``(C, *spatial)`` class probabilities (channel 0 = background), e.g. the softmax of the network.
        image: ``(*spatial)`` intensities the regions follow.
        foreground: foreground clicks (voxel coordinates). Class: ``label``, else the most probable foreground class
            at the click.
        background: background clicks: ``label`` (every foreground class when ``label`` is ``None``) is removed from
            the region and given to background.
        label: the class the clicks are about (DeepGrow's ``label``), or ``None``.
        radius, tolerance, spacing: as :func:`click_region`.

    Returns:
        corrected ``(C, *spatial)`` probabilities (a copy; rows still sum to 1).
    """
    out = np.array(probs, dtype=np.float32, copy=True)
    if out.ndim != np.asarray(image).ndim + 1:
        raise ValueError(f"probs {out.shape} must be (C, *spatial) for an image of shape {np.asarray(image).shape}.")
    n = out.shape[0]
    if label is not None and not 0 < int(label) < n:
        raise ValueError(f"label {label} is not a foreground class of a {n}-class output.")
    clicks = [(p, True) for p in foreground] + [(p, False) for p in background]
    for point, is_fg in clicks:
        region = click_region(image, point, radius, tolerance, spacing)
        if is_fg:
            if label is not None:
                k = int(label)
            else:
                idx = tuple(int(min(max(round(float(v)), 0), s - 1)) for v, s in zip(point, out.shape[1:]))
                k = 1 + int(np.argmax(out[(slice(1, None),) + idx])) if n > 1 else 0
            out[:, region] = 0.0
            out[k, region] = 1.0
        else:
            removed = list(range(1, n)) if label is None else [int(label)]
            moved = out[removed][:, region].sum(0)
            for k in removed:
                out[k, region] = 0.0
            out[0, region] += moved
    return out
