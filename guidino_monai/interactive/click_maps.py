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
grows a region from the clicked voxel over connected voxels of similar intensity that are on the wrong side of the
current segmentation (not yet the class for a foreground click, the class for a background click), and that region is
forced to the click's class (a foreground click adds it, a background click removes the class from it). The region's
reach adapts to the error: twice the clicked voxel's distance to the edge of that wrong side, between ``radius`` and
``max_radius`` (a click in the middle of a large false-positive blob removes much of it, one in a thin miss adds a
thin region). Clicks are applied in order, so a later click wins where regions overlap.

:func:`bias_clicks` is the soft alternative (the app's default without a click refiner): each click adds a Gaussian
click map (DeepGrow's click encoding) to the network's log-probabilities of its class, so the correction follows the
network's own probability landscape near the click instead of a hard intensity region.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

__all__ = ["click_region", "apply_clicks", "bias_clicks"]


def click_region(
    image: np.ndarray,
    point: Sequence[float],
    radius: float = 4.0,
    tolerance: float | None = 1.0,
    spacing: Sequence[float] | None = None,
    within: np.ndarray | None = None,
    max_radius: float | None = None,
) -> np.ndarray:
    """Voxels connected to ``point`` whose intensity is within ``tolerance`` local standard deviations of the clicked
    voxel's neighbourhood, inside a ball of ``radius`` (voxels, or mm when ``spacing`` is given).

    Args:
        image: ``(*spatial)`` intensities (one channel), 2D or 3D.
        point: voxel coordinates of the click (rounded; clipped to the image).
        radius: size of the region (the smallest size when ``within`` and ``max_radius`` are given).
        tolerance: intensity band, in standard deviations of the image within ``2 * radius`` of the click; ``None``:
            no band (the region is the connected part of ``within`` inside the ball).
        spacing: voxel size per axis; ``None`` means 1.
        within: optional boolean mask the region must stay in (where the click's correction applies).
        max_radius: with ``within``: the ball grows to twice the click's distance to the edge of ``within``, up to
            this size.

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
    if within is not None and max_radius is not None and max_radius > radius and within[tuple(c)]:
        far = [int(np.ceil(max_radius / sp)) + 1 for sp in spacing]
        wbox = tuple(slice(max(ci - r, 0), min(ci + r + 1, s)) for ci, r, s in zip(c, far, shape))
        inside = np.pad(within[wbox], 1, constant_values=False)  # the box edge is not an edge of `within`
        dist = ndimage.distance_transform_edt(inside, sampling=spacing)
        depth = float(dist[tuple(ci - b.start + 1 for ci, b in zip(c, wbox))])
        radius = float(min(max(radius, 2.0 * depth), max_radius))
    reach = [int(np.ceil(2 * radius / sp)) + 1 for sp in spacing]
    box = tuple(slice(max(ci - r, 0), min(ci + r + 1, s)) for ci, r, s in zip(c, reach, shape))
    sub = image[box]
    local = [ci - b.start for ci, b in zip(c, box)]
    grids = np.meshgrid(*[(np.arange(b.start, b.stop) - ci) * sp for b, ci, sp in zip(box, c, spacing)], indexing="ij")
    dist2 = sum(g**2 for g in grids)
    near = tuple(slice(max(li - 1, 0), li + 2) for li in local)
    ref = float(np.median(sub[near]))
    scale = float(np.std(sub[dist2 <= (2 * radius) ** 2])) or 1.0
    candidate = dist2 <= radius**2
    if tolerance is not None:
        candidate &= np.abs(sub - ref) <= tolerance * scale
    if within is not None:
        candidate &= within[box]
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
    max_radius: float | None = 12.0,
    background_tolerance: float | None = None,
    uncertain_band: float | None = None,
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
        radius, tolerance, spacing, max_radius: as :func:`click_region`; the region stays where the current
            segmentation is wrong for the click (not the class yet for a foreground click, the class for a background
            click) and its reach adapts to that region's thickness (``max_radius=None``: fixed ``radius``).
        background_tolerance: intensity band of background clicks; ``None`` (default): none, a background click
            removes the connected part of the wrongly labelled region around it whatever its intensities.
        uncertain_band: where the network hesitated, trust it: a foreground click's region is then the connected
            part of the voxels whose probability of the class is at least ``uncertain_band`` (a background click's:
            at most ``1 - uncertain_band``) instead of the intensity band, so it follows the network's own boundary
            (still within the ball). Used only when the clicked voxel itself lies in that band; otherwise (a miss or
            a false positive the network is sure about) the intensity region applies. ``None`` (default): off.

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
        idx = tuple(int(min(max(round(float(v)), 0), s - 1)) for v, s in zip(point, out.shape[1:]))
        pred = out.argmax(0)
        if is_fg:
            if label is not None:
                k = int(label)
            else:
                k = 1 + int(np.argmax(out[(slice(1, None),) + idx])) if n > 1 else 0
            within = pred != k
        else:
            removed = list(range(1, n)) if label is None else [int(label)]
            within = np.isin(pred, removed)
        if not within[idx]:  # the click agrees with the segmentation already: nothing to correct there
            within = None
        band = tolerance if is_fg else background_tolerance
        if uncertain_band is not None and within is not None:
            k_prob = out[k] if is_fg else out[removed].sum(0)
            hesitant = k_prob >= uncertain_band if is_fg else k_prob <= 1.0 - uncertain_band
            if hesitant[idx]:
                within, band = within & hesitant, None
        region = click_region(image, point, radius, band, spacing, within=within, max_radius=max_radius)
        if is_fg:
            out[:, region] = 0.0
            out[k, region] = 1.0
        else:
            moved = out[removed][:, region].sum(0)
            for k in removed:
                out[k, region] = 0.0
            out[0, region] += moved
    return out


def bias_clicks(
    probs: np.ndarray,
    foreground: Sequence[Sequence[float]] = (),
    background: Sequence[Sequence[float]] = (),
    label: int | None = None,
    sigma: float = 4.0,
    strength: float = 4.0,
    margin: float = 2.0,
    spacing: Sequence[float] | None = None,
) -> np.ndarray:
    """Add a Gaussian click map per click to the log-probabilities of the click's class (training-free, soft).

    A foreground click of class ``k`` adds ``A * exp(-d^2 / (2 sigma^2))`` to ``log p_k`` (``d``: distance to the
    click); a background click subtracts it from the class it removes. The height ``A`` is ``strength``, raised where
    the network was sure of the wrong answer so that the clicked voxel itself always ends ``margin`` above every other
    class (``A = max(strength, log(p_max / p_k) + margin)`` at the click, from ``probs``): a foreground click always
    adds its voxel and the neighbours where the network hesitated, a background click always removes its voxel. The
    heights come from ``probs`` alone, so the result does not depend on the clicks' order.

    Args:
        probs: ``(C, *spatial)`` class probabilities (channel 0 = background).
        foreground: foreground clicks (voxel coordinates). Class: ``label``, else the most probable foreground class
            at the click.
        background: background clicks: they remove ``label``, else the class predicted at the click (nothing when
            that is background already).
        label: the class the clicks are about (DeepGrow's ``label``), or ``None``.
        sigma: width of each click map (voxels, or mm when ``spacing`` is given); the map is cut at 3 ``sigma``.
        strength: smallest height of a click map (log-probability units).
        margin: how far above every other class the clicked class ends at the clicked voxel.
        spacing: voxel size per axis; ``None`` means 1.

    Returns:
        corrected ``(C, *spatial)`` probabilities (a copy; rows sum to 1).
    """
    probs = np.asarray(probs, dtype=np.float32)
    if probs.ndim < 3:
        raise ValueError(f"probs of shape {probs.shape} must be (C, *spatial) with 2 or 3 spatial axes.")
    n, shape = probs.shape[0], probs.shape[1:]
    if label is not None and not 0 < int(label) < n:
        raise ValueError(f"label {label} is not a foreground class of a {n}-class output.")
    if sigma <= 0:
        raise ValueError(f"sigma must be positive, got {sigma}.")
    spacing = np.ones(len(shape)) if spacing is None else np.asarray(spacing, dtype=np.float64)
    logp = np.log(np.clip(probs, 1e-6, 1.0))
    bias = np.zeros_like(logp)
    for point, is_fg in [(p, True) for p in foreground] + [(p, False) for p in background]:
        if len(point) != len(shape):
            raise ValueError(f"click {list(point)} has {len(point)} coordinates for a {len(shape)}D image.")
        c = tuple(int(min(max(round(float(v)), 0), s - 1)) for v, s in zip(point, shape))
        at = logp[(slice(None),) + c]
        if is_fg:
            k = int(label) if label is not None else (1 + int(np.argmax(at[1:])) if n > 1 else 0)
            need = float(at.max() - at[k])
        else:
            k = int(label) if label is not None else int(np.argmax(at))
            if k == 0:  # a background click on background: nothing to remove
                continue
            need = float(at[k] - np.delete(at, k).max())
        height = max(float(strength), need + float(margin))
        reach = [int(np.ceil(3 * sigma / sp)) for sp in spacing]
        box = tuple(slice(max(ci - r, 0), min(ci + r + 1, s)) for ci, r, s in zip(c, reach, shape))
        grids = np.meshgrid(*[(np.arange(b.start, b.stop) - ci) * sp for b, ci, sp in zip(box, c, spacing)],
                            indexing="ij")  # fmt: skip
        d2 = sum(g**2 for g in grids)
        bump = np.where(d2 <= (3.0 * sigma) ** 2, height * np.exp(-d2 / (2.0 * sigma**2)), 0.0)  # a ball, not the box
        bias[(k,) + box] += bump if is_fg else -bump
    logits = logp + bias
    logits -= logits.max(0, keepdims=True)
    out = np.exp(logits)
    return (out / out.sum(0, keepdims=True)).astype(np.float32)
