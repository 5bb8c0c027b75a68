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

"""Dictionary transforms that MONAI lacks for guided networks."""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from monai.config import KeysCollection
from monai.data import MetaTensor
from monai.transforms import MapTransform, SpatialPad, SpatialPadd

__all__ = [
    "FitEllipsed",
    "FitEllipseD",
    "FitEllipseDict",
    "KeepLargestFilledComponentd",
    "KeepLargestFilledComponentD",
    "KeepLargestFilledComponentDict",
    "AddCoordinatesd",
    "AddCoordinatesD",
    "AddCoordinatesDict",
    "SpatialPadWithCoordinatesd",
    "SpatialPadWithCoordinatesD",
    "SpatialPadWithCoordinatesDict",
    "SplitGuidedOutputd",
    "SplitGuidedOutputD",
    "SplitGuidedOutputDict",
]


class AddCoordinatesd(MapTransform):
    """Store the voxel coordinates of ``keys``' image under ``coord_key`` as a ``(dims, *spatial)`` float tensor.

    Put it after the deterministic transforms that make the image inference sees (load, orientation, spacing,
    intensity) and before any padding: the volume at this point is the one whose guide
    :class:`guidino_monai.engines.CachedGuidePrepareBatch` computes once. Pad with :class:`SpatialPadWithCoordinatesd`
    (padded voxels get coordinates outside the volume, where the guide takes its border value, as in sliding-window
    inference) and list ``coord_key`` with the image in the random spatial transforms (crops, flips, rotations):
    afterwards every voxel of a training crop knows where it came from in the whole volume.

    Args:
        keys: the image key (one).
        coord_key: where to store the coordinates. Defaults to ``"coords"``.
        allow_missing_keys: don't raise if the key is missing.
    """

    def __init__(self, keys: KeysCollection = "image", coord_key: str = "coords", allow_missing_keys: bool = False):
        super().__init__(keys, allow_missing_keys)
        self.coord_key = coord_key

    def __call__(self, data: Mapping[Hashable, object]) -> dict[Hashable, object]:
        d = dict(data)
        for key in self.key_iterator(d):
            img = d[key]
            spatial = img.shape[1:]
            axes = [torch.arange(int(n), dtype=torch.float32) for n in spatial]
            coords = torch.stack(torch.meshgrid(*axes, indexing="ij"))
            if isinstance(img, MetaTensor):
                coords = MetaTensor(coords, meta=dict(img.meta))
            d[self.coord_key] = coords
            d[f"{self.coord_key}_source_shape"] = torch.tensor([int(n) for n in spatial])
        return d


class SpatialPadWithCoordinatesd(MapTransform):
    """:class:`monai.transforms.SpatialPadd` for ``keys`` that also pads the coordinates of
    :class:`AddCoordinatesd` the same way, continuing them linearly past the border (a padded voxel's coordinate is
    its position relative to the unpadded volume, e.g. ``-1`` before its first voxel) instead of filling a constant.

    With the default ``method="symmetric"`` the padding is the one ``monai.inferers.sliding_window_inference`` applies
    to an image smaller than its ROI, so a training crop of a small volume reads the same guide values as the
    inference window at the same place.

    Args:
        keys: image (and label) keys to pad.
        spatial_size: as :class:`monai.transforms.SpatialPadd`.
        coord_key: the coordinates' key. Defaults to ``"coords"``.
        method, mode, allow_missing_keys, kwargs: as :class:`monai.transforms.SpatialPadd`.
    """

    def __init__(
        self,
        keys: KeysCollection,
        spatial_size: Sequence[int] | int,
        coord_key: str = "coords",
        method: str = "symmetric",
        mode: str = "constant",
        allow_missing_keys: bool = False,
        **kwargs: Any,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        self.coord_key = coord_key
        self.pad = SpatialPadd(keys, spatial_size, method=method, mode=mode, allow_missing_keys=allow_missing_keys,
                               **kwargs)  # fmt: skip
        self.padder = SpatialPad(spatial_size, method=method)

    def __call__(self, data: Mapping[Hashable, object]) -> dict[Hashable, object]:
        d = dict(data)
        coords = d.get(self.coord_key)
        if coords is not None:
            widths = self.padder.compute_pad_width(tuple(int(n) for n in coords.shape[1:]))[1:]
            d[self.coord_key] = extrapolate_pad(coords, [tuple(int(v) for v in w) for w in widths])
        return self.pad(d)


def extrapolate_pad(coords: torch.Tensor, widths: Sequence[tuple[int, int]]) -> torch.Tensor:
    """Pad ``coords (dims, *spatial)`` by ``widths`` (before, after) per spatial axis, continuing each channel
    linearly (the step between its last two samples along that axis; 1 along the channel's own axis where an axis
    has a single sample)."""
    is_meta = isinstance(coords, MetaTensor)
    out = coords.as_tensor() if is_meta else torch.as_tensor(coords)
    for axis, (before, after) in enumerate(widths):
        if before == 0 and after == 0:
            continue
        dim = axis + 1
        n = out.shape[dim]
        if n >= 2:
            step_lo = out.narrow(dim, 1, 1) - out.narrow(dim, 0, 1)
            step_hi = out.narrow(dim, n - 1, 1) - out.narrow(dim, n - 2, 1)
        else:
            step_lo = torch.zeros_like(out.narrow(dim, 0, 1))
            step_lo[axis] = 1.0
            step_hi = step_lo
        shape = [1] * out.ndim
        shape[dim] = -1
        k_lo = torch.arange(before, 0, -1, dtype=out.dtype).view(shape)
        k_hi = torch.arange(1, after + 1, dtype=out.dtype).view(shape)
        lo = out.narrow(dim, 0, 1) - k_lo * step_lo
        hi = out.narrow(dim, n - 1, 1) + k_hi * step_hi
        out = torch.cat([lo, out, hi], dim=dim)
    if is_meta:
        out = MetaTensor(out, meta=dict(coords.meta))
    return out


class SplitGuidedOutputd(MapTransform):
    """Split a ``(logits, guide)`` network/inferer output stored under ``keys`` into ``key`` and ``guide_key``.

    A plain tensor is left as it is (and ``guide_key`` is not set), so the same post-processing works for guided and
    plain networks.

    Args:
        keys: keys holding the output, usually ``"pred"``.
        guide_key: where to put the guide. Defaults to ``"guide"``.
        allow_missing_keys: don't raise if a key is missing.
    """

    def __init__(self, keys: KeysCollection = "pred", guide_key: str = "guide", allow_missing_keys: bool = False):
        super().__init__(keys, allow_missing_keys)
        self.guide_key = guide_key

    def __call__(self, data: Mapping[Hashable, object]) -> dict[Hashable, object]:
        d = dict(data)
        for key in self.key_iterator(d):
            value = d[key]
            if isinstance(value, (tuple, list)):
                if len(value) != 2:
                    raise ValueError(f"expected (logits, guide) under {key!r}, got {len(value)} items.")
                d[key] = value[0]
                if value[1] is not None:
                    d[self.guide_key] = value[1]
        return d


def _like(img: Any, out: np.ndarray) -> Any:
    """``out`` (numpy) as the type of ``img``: a tensor of its dtype and device, a MetaTensor with its meta data."""
    if not isinstance(img, torch.Tensor):
        return out
    result = torch.as_tensor(out, dtype=img.dtype, device=img.device)
    return img.clone().copy_(result) if isinstance(img, MetaTensor) else result


class _LabelMapTransform(MapTransform):
    """A transform of label maps, one label value of ``applied_labels`` at a time."""

    def __init__(self, keys: KeysCollection, applied_labels: Sequence[int], allow_missing_keys: bool = False):
        super().__init__(keys, allow_missing_keys)
        self.applied_labels = [int(v) for v in applied_labels]


class KeepLargestFilledComponentd(_LabelMapTransform):
    """Keep the largest connected component of each label in ``applied_labels``, with its holes filled.

    The same clean-up as MONAI's ``KeepLargestConnectedComponentd`` followed by ``FillHolesd``, for a label map (one
    channel of label values, e.g. after ``AsDiscreted(argmax=True)``), computed per 2D/3D image with
    ``scipy.ndimage`` (MONAI's version needs scikit-image). Voxels of a dropped fragment become background (0); a
    filled hole takes the label. Meta data (affine, applied operations) are kept.

    Args:
        keys: keys of the label maps, ``(1, *spatial)``.
        applied_labels: label values to clean, one at a time.
        allow_missing_keys: don't raise if a key is missing.
    """

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        from guidino_monai.metrics.head_circumference import largest_filled_component

        d = dict(data)
        for key in self.key_iterator(d):
            img = d[key]
            if img.shape[0] != 1:
                raise ValueError(f"{key!r}: expected a label map with one channel, got shape {tuple(img.shape)}.")
            values = img.detach().cpu().numpy() if isinstance(img, torch.Tensor) else np.asarray(img)
            out = values.copy()
            for label in self.applied_labels:
                mask = values[0] == label
                keep = largest_filled_component(mask)
                out[0][mask & ~keep] = 0
                out[0][keep] = label
            d[key] = _like(img, out)
        return d


class FitEllipsed(_LabelMapTransform):
    """Replace each label in ``applied_labels`` of a 2D label map by the filled ellipse fitted to it.

    For shapes that are ellipses by definition, such as the HC18 fetal head labels (filled from the annotated
    ellipse): the label's largest connected component, hole-filled, is replaced by the filled ellipse with the same
    second-order moments (:func:`guidino_monai.metrics.filled_ellipse`), so fragments, holes and a ragged edge go and
    the head circumference measured on the result is that of the same ellipse. Pixels of the label outside the ellipse
    become background (0); pixels inside take the label. Run it after ``AsDiscreted(argmax=True)`` on the image's own
    grid. An empty label stays empty; ``applied_labels=[]`` leaves the data unchanged (a config switch). Meta data are
    kept.

    Args:
        keys: keys of the 2D label maps, ``(1, H, W)`` (trailing singleton dims allowed, e.g. ``(1, H, W, 1)``).
        applied_labels: label values to replace by their ellipse, one at a time.
        allow_missing_keys: don't raise if a key is missing.
    """

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        from guidino_monai.metrics.head_circumference import filled_ellipse

        d = dict(data)
        if not self.applied_labels:
            return d
        for key in self.key_iterator(d):
            img = d[key]
            spatial = [s for s in img.shape[1:] if s != 1] if img.ndim > 3 else list(img.shape[1:])
            if img.shape[0] != 1 or len(spatial) != 2:
                raise ValueError(
                    f"{key!r}: expected a 2D label map with one channel, (1, H, W), got shape {tuple(img.shape)}."
                )
            values = img.detach().cpu().numpy() if isinstance(img, torch.Tensor) else np.asarray(img)
            out = values.copy()
            plane, out_plane = values.reshape(spatial), out.reshape(spatial)  # views: no singleton dims
            for label in self.applied_labels:
                mask = plane == label
                inside = filled_ellipse(mask)
                out_plane[mask & ~inside] = 0
                out_plane[inside] = label
            d[key] = _like(img, out)
        return d


KeepLargestFilledComponentD = KeepLargestFilledComponentDict = KeepLargestFilledComponentd
FitEllipseD = FitEllipseDict = FitEllipsed
SplitGuidedOutputD = SplitGuidedOutputDict = SplitGuidedOutputd
AddCoordinatesD = AddCoordinatesDict = AddCoordinatesd
SpatialPadWithCoordinatesD = SpatialPadWithCoordinatesDict = SpatialPadWithCoordinatesd
