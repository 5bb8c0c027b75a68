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

from collections.abc import Hashable, Mapping

import torch
from monai.config import KeysCollection
from monai.data import MetaTensor
from monai.transforms import MapTransform

__all__ = [
    "AddCoordinatesd",
    "AddCoordinatesD",
    "AddCoordinatesDict",
    "SplitGuidedOutputd",
    "SplitGuidedOutputD",
    "SplitGuidedOutputDict",
]


class AddCoordinatesd(MapTransform):
    """Store the voxel coordinates of ``keys``' image under ``coord_key`` as a ``(dims, *spatial)`` float tensor.

    Put it after the deterministic transforms and list ``coord_key`` with the image in the random spatial transforms
    (crops, flips, rotations): afterwards every voxel of a training crop knows where it came from in the whole
    volume, which is what :class:`guidino_monai.engines.CachedGuidePrepareBatch` needs to cut the crop's guide out of
    a guide computed once for the whole volume.

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


SplitGuidedOutputD = SplitGuidedOutputDict = SplitGuidedOutputd
AddCoordinatesD = AddCoordinatesDict = AddCoordinatesd
