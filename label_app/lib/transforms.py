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
"""Transforms the app needs around MONAI / MONAI Label (workarounds, each named after what it works around)."""

from __future__ import annotations

from collections.abc import Hashable, Mapping
from typing import Any

from monai.transforms import MapTransform, Spacingd, Transform

__all__ = ["HideNonDictMetad", "wrap_spacing"]


class HideNonDictMetad(Transform):
    """Run a dictionary transform with every ``<key>_*`` entry that is not a dict hidden from it, then put them back.

    monai 1.6.1's ``Spacingd`` merges the image metadata into every dict entry whose name starts with ``<key>_``
    (``monai/transforms/spatial/dictionary.py``, ``d[meta_key].update(d[key].meta)``). MONAI Label puts the image's
    path string under ``image_path``, so ``/infer`` failed with ``AttributeError: 'str' object has no attribute
    'update'``. Only the entries that ``.update`` cannot take (strings, numbers, lists, ...) are hidden; metadata dicts
    such as ``image_meta_dict`` still receive the merge, as MONAI intends.

    Args:
        transform: the wrapped :class:`~monai.transforms.MapTransform` (e.g. ``Spacingd``).
    """

    def __init__(self, transform: MapTransform) -> None:
        if not isinstance(transform, MapTransform):
            raise TypeError(f"expected a MapTransform, got {type(transform).__name__}.")
        self.transform = transform
        self.keys = transform.keys

    def __call__(self, data: Mapping[Hashable, Any], *args: Any, **kwargs: Any) -> dict[Hashable, Any]:
        d = dict(data)
        prefixes = tuple(f"{k}_" for k in self.transform.keys)
        hidden = {
            k: d.pop(k)
            for k in list(d)
            if isinstance(k, str) and k.startswith(prefixes) and not hasattr(d[k], "update")
        }
        out = dict(self.transform(d, *args, **kwargs))
        out.update(hidden)
        return out

    def inverse(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        return self.transform.inverse(data)  # type: ignore[attr-defined]

    def __repr__(self) -> str:
        return f"HideNonDictMetad({self.transform.__class__.__name__})"


def wrap_spacing(transforms: list) -> list:
    """Wrap every ``Spacingd`` of a pre-transform list in :class:`HideNonDictMetad`."""
    return [HideNonDictMetad(t) if isinstance(t, Spacingd) else t for t in transforms]
