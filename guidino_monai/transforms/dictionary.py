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

from monai.config import KeysCollection
from monai.transforms import MapTransform

__all__ = ["SplitGuidedOutputd", "SplitGuidedOutputD", "SplitGuidedOutputDict"]


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
