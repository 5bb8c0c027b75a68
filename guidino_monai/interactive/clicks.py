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

"""Clicks -> extra TokenBook prototypes -> new guide -> new segmentation, with the ViT run once per image."""

from __future__ import annotations

import hashlib
import threading
from collections import OrderedDict
from collections.abc import Callable, Hashable, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn as nn

from ..inferers import GuidedSlidingWindowInferer, unwrap_network
from ..networks.blocks.guide import guide_slice_index, resample_guide

__all__ = ["ClickRefiner", "ClickSessions", "image_digest", "next_click", "point_to_token", "world_points_to_grid"]


def image_digest(image: torch.Tensor | np.ndarray) -> str:
    """A digest of an image's shape, dtype and voxel values (BLAKE2b), to tell re-uploaded images apart."""
    arr = image.detach().cpu().numpy() if isinstance(image, torch.Tensor) else np.asarray(image)
    arr = np.ascontiguousarray(arr)
    h = hashlib.blake2b(digest_size=16)
    h.update(repr((arr.shape, str(arr.dtype))).encode())
    h.update(arr.tobytes())
    return h.hexdigest()


def point_to_token(point: Sequence[float], spatial_shape: Sequence[int], token_shape: Sequence[int],
                   slice_axis: int = 2, slice_stride: int = 1) -> tuple[int, ...]:  # fmt: skip
    """Index into the token maps ``(N, E, h, w)`` of :meth:`GuideBranch.encode` for a voxel ``point`` of the image.

    2D: ``(0, row, col)``. 3D: ``(slice, row, col)``, the slice being the guide slice nearest to the point along
    ``slice_axis`` (:func:`~guidino_monai.networks.guide_slice_index`, the package's one slice convention), row/col
    from the other two axes in order.

    Args:
        point: voxel coordinates in the image grid (``len == len(spatial_shape)``).
        spatial_shape: the image's spatial shape.
        token_shape: ``(N, h, w)``: number of token maps (slices) and the token grid.
        slice_axis, slice_stride: as the network's :class:`~guidino_monai.networks.GuideBranch`.
    """
    if len(point) != len(spatial_shape):
        raise ValueError(f"point {list(point)} has {len(point)} coordinates for a {len(spatial_shape)}D image.")
    n, h, w = (int(s) for s in token_shape)
    if len(spatial_shape) == 2:
        k, (ah, aw) = 0, (0, 1)
    else:
        k = guide_slice_index(float(point[slice_axis]), int(spatial_shape[slice_axis]), slice_stride)
        ah, aw = [a for a in range(3) if a != slice_axis]
    row = int((float(point[ah]) + 0.5) * h / spatial_shape[ah])
    col = int((float(point[aw]) + 0.5) * w / spatial_shape[aw])
    return max(k, 0), min(max(row, 0), h - 1), min(max(col, 0), w - 1)


def world_points_to_grid(points: Sequence[Sequence[float]], from_affine: Any, to_affine: Any) -> list[list[float]]:
    """Map voxel points of one grid (``from_affine``) to voxel coordinates of another (``to_affine``), via world space.

    Used to bring clicks given on the original image (MONAI Label sends ``[x, y, z]`` voxel indices of the file) onto
    the preprocessed (reoriented, resampled) grid the network sees. The two affines may differ in size: a 2D image
    read from NIfTI keeps the file's 4x4 affine as its original affine while its grid has a 3x3 one; the smaller one
    is embedded (identity on the missing axes), points are padded with 0 on them, and each point comes back with as
    many coordinates as it had.
    """
    a = np.asarray(from_affine, dtype=np.float64)
    b = np.asarray(to_affine, dtype=np.float64)
    dims = max(a.shape[0], b.shape[0]) - 1
    a, b = _embed_affine(a, dims), _embed_affine(b, dims)
    out = []
    for p in points:
        n = min(len(p), dims)
        hom = np.zeros(dims + 1)
        hom[:n], hom[dims] = np.asarray(p[:n], dtype=np.float64), 1.0
        q = np.linalg.solve(b, a @ hom)
        out.append([float(v) for v in q[:n]])
    return out


def _embed_affine(affine: np.ndarray, dims: int) -> np.ndarray:
    """A ``(k+1)x(k+1)`` affine as a ``(dims+1)x(dims+1)`` one, identity on the axes beyond ``k``."""
    k = affine.shape[0] - 1
    if k == dims:
        return affine
    out = np.eye(dims + 1)
    out[:k, :k], out[:k, dims] = affine[:k, :k], affine[:k, k]
    return out


def next_click(pred: np.ndarray, label: np.ndarray) -> tuple[list[int], bool] | None:
    """The simulated user's next click: the centre of the largest error region.

    The error is ``pred != label``; its largest connected component is found, and the click goes to the voxel of
    that component farthest from its border (maximum of the distance transform). It is a foreground click when the
    true label there is foreground (the model missed or mislabelled it), a background click otherwise.

    Returns:
        ``(point, is_foreground)``, or ``None`` when there is no error.
    """
    from scipy import ndimage

    pred, label = np.asarray(pred).squeeze(), np.asarray(label).squeeze()
    error = pred != label
    if not error.any():
        return None
    components, n = ndimage.label(error)
    sizes = ndimage.sum(error, components, index=range(1, n + 1))
    largest = components == (int(np.argmax(sizes)) + 1)
    dist = ndimage.distance_transform_edt(np.pad(largest, 1))[tuple(slice(1, -1) for _ in largest.shape)]
    point = [int(i) for i in np.unravel_index(int(np.argmax(dist)), largest.shape)]
    return point, bool(label[tuple(point)] > 0)


class ClickRefiner:
    """Refine a guided network's segmentation with foreground/background clicks, without retraining.

    :meth:`set_image` runs the frozen ViT once and keeps the token maps. Each :meth:`predict` takes all clicks so far,
    picks the DINO tokens under them and hands them to the TokenBook as extra positive/negative prototypes
    (:meth:`TokenBook.forward`), recomputes the guide from the cached tokens and re-runs the gated backbone (sliding
    window). So a click costs one TokenBook pass and one backbone pass, not a ViT pass.

    Args:
        network: a guided network (``GuidedSegResNet`` / ``GuidedUNet`` / ``GuidedDynUNet``) with ``use_guide=True``,
            in eval mode.
        roi_size: sliding-window size; ``None`` runs the whole image at once.
        sw_kwargs: further :class:`~guidino_monai.inferers.GuidedSlidingWindowInferer` arguments (``sw_batch_size``,
            ``overlap``, ``mode``, ...).
    """

    def __init__(self, network: nn.Module, roi_size: Sequence[int] | None = None, **sw_kwargs: Any) -> None:
        net = unwrap_network(network)
        if getattr(net, "guide", None) is None:
            raise ValueError("click refinement needs a guided network (use_guide=True).")
        self.network = network
        self.branch = net.guide
        self.roi_size = roi_size
        # each window gets its part of the low-resolution guide, as in ordinary guided inference
        self.inferer = None if roi_size is None else GuidedSlidingWindowInferer(roi_size, **sw_kwargs)
        self.image: torch.Tensor | None = None
        self.tokens: torch.Tensor | None = None
        self.digest: str | None = None

    @torch.no_grad()
    def set_image(self, image: torch.Tensor) -> None:
        """Cache the image ``(1, C, *spatial)`` and its DINO tokens (the one ViT pass for this image)."""
        if image.ndim != self.branch.spatial_dims + 2 or image.shape[0] != 1:
            raise ValueError(f"expected one image (1, C, *spatial), got {tuple(image.shape)}.")
        plain = image.as_tensor() if hasattr(image, "as_tensor") else image
        self.branch.check_input(plain)
        self.image = plain
        self.digest = image_digest(plain)
        self.tokens = self.branch.encode(plain)

    def _tokens_at(self, points: Sequence[Sequence[float]]) -> torch.Tensor | None:
        if not points:
            return None
        assert self.image is not None and self.tokens is not None
        shape = self.image.shape[2:]
        n, _, h, w = self.tokens.shape
        picked = []
        for p in points:
            k, r, c = point_to_token(p, shape, (n, h, w), getattr(self.branch, "slice_axis", 2),
                                     getattr(self.branch, "slice_stride", 1))  # fmt: skip
            picked.append(self.tokens[k, :, r, c])
        return torch.stack(picked)

    def _low_guide(self, foreground: Sequence[Sequence[float]], background: Sequence[Sequence[float]]) -> torch.Tensor:
        if self.image is None or self.tokens is None:
            raise RuntimeError("call set_image() first.")
        return self.branch.tokens_to_guide(
            self.tokens, 1, positive=self._tokens_at(foreground), negative=self._tokens_at(background)
        )

    @torch.no_grad()
    def guide(
        self, foreground: Sequence[Sequence[float]] = (), background: Sequence[Sequence[float]] = ()
    ) -> torch.Tensor:
        """The guide ``(1, 1, *spatial)`` at image resolution for the given clicks (image grid voxel coordinates)."""
        return resample_guide(self._low_guide(foreground, background), self.image.shape[2:])

    @torch.no_grad()
    def predict(
        self, foreground: Sequence[Sequence[float]] = (), background: Sequence[Sequence[float]] = ()
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Logits ``(1, N, *spatial)`` and guide ``(1, 1, *spatial)`` for all clicks so far."""
        low = self._low_guide(foreground, background)
        guide = resample_guide(low, self.image.shape[2:])  # the guide output, at image resolution
        if self.inferer is None:
            return self.network(self.image, guide=guide.to(self.image.dtype)), guide
        return self.inferer(self.image, self.network, guide=low), guide


class ClickSessions:
    """The last ``max_sessions`` :class:`ClickRefiner` s (an LRU), keyed by the caller's key **and the image content**.

    A client may upload another image under the same id and shape (a corrected scan, another patient saved under the
    same name): keyed by id alone, the cached DINO tokens of the old image would be reused silently. Here the key is
    ``(key, image_digest(image))``, so changed voxels always mean a new ViT pass.

    Args:
        factory: ``network -> ClickRefiner`` (sliding-window settings of the task).
        max_sessions: how many images to keep.
    """

    def __init__(self, factory: Callable[[nn.Module], ClickRefiner], max_sessions: int = 4) -> None:
        if max_sessions < 1:
            raise ValueError(f"max_sessions must be >= 1, got {max_sessions}.")
        self.factory = factory
        self.max_sessions = max_sessions
        self._sessions: OrderedDict[tuple, ClickRefiner] = OrderedDict()
        self._lock = threading.Lock()
        self.vit_passes = 0

    def __len__(self) -> int:
        return len(self._sessions)

    def get(self, key: Hashable, image: torch.Tensor, network: nn.Module) -> ClickRefiner:
        """The session for ``image`` (``(1, C, *spatial)``) under ``key``, created (one ViT pass) when absent, when the
        image content differs from the cached one, or when ``network`` is another object (reloaded weights)."""
        full = (key, image_digest(image))
        with self._lock:
            refiner = self._sessions.get(full)
            if refiner is not None and refiner.network is network:
                self._sessions.move_to_end(full)
                return refiner
            refiner = self.factory(network)
            refiner.set_image(image)
            self.vit_passes += 1
            self._sessions[full] = refiner
            while len(self._sessions) > self.max_sessions:
                self._sessions.popitem(last=False)
            return refiner
