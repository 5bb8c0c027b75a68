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
"""Request parameters as 3D Slicer's MONAI Label plugin sends them, checked (a bad one is a 400 naming it).

The plugin shows every ``config`` entry of ``/info/`` in its options table and sends back ``v[0]`` of list entries
(``getParamsFromConfig``); its table puts list items in a combo box and moves the chosen one to the front. So list
entries are non-empty lists of strings whose first item is the default, and the server accepts both that string
(``"0,1"``) and the plain JSON form (``[0, 1]``) other clients send. MONAI Label also merges the task's own
``config`` into each request, so an absent parameter arrives as the whole list: its first item is the default.

Label names and colours shown in Slicer are defined here (the bundles name their channels ``anterior``/``posterior``;
a radiologist sees ``hippocampus anterior``/``hippocampus posterior``; the bundle names stay accepted).
"""

from __future__ import annotations

import itertools
import math
from typing import Any

from fastapi import HTTPException

__all__ = [
    "GUIDE_MODES",
    "GUIDE_SEGMENT",
    "LABEL_COLORS",
    "LABEL_NAMES",
    "axes_choices",
    "bad_request",
    "label_index",
    "parse_bool",
    "parse_mirror_axes",
    "parse_points",
    "parse_return_guide",
]

#: name of the extra segment that carries the guide mask (``return_guide: "segment"``)
GUIDE_SEGMENT = "guide"
#: ``return_guide`` values: ``none``; ``segment`` (an extra ``guide`` label in the returned label map, where the guide
#: is >= 0.5 and the model found no structure); ``datastore`` (the float guide stored as label tag ``guide``);
#: ``image`` (the float guide returned instead of the label map, for scripts, not for Slicer)
GUIDE_MODES = ("none", "segment", "datastore", "image")

#: display names (Slicer segment names) per bundle channel name
LABEL_NAMES = {
    "anterior": "hippocampus anterior",
    "posterior": "hippocampus posterior",
    "fetal head": "fetal head",
}
#: colours (0-255 RGB) shown in Slicer for the display names and the guide segment
LABEL_COLORS = {
    "hippocampus anterior": [220, 180, 140],
    "hippocampus posterior": [110, 184, 209],
    "fetal head": [177, 122, 101],
    GUIDE_SEGMENT: [255, 255, 0],
}


def bad_request(detail: str) -> HTTPException:
    """A 400 with ``detail`` as the reason."""
    return HTTPException(status_code=400, detail=detail)


def axes_choices(dimension: int) -> list[str]:
    """``mirror_axes`` choices for the Slicer options table: ``"none"`` first, then every non-empty axis set."""
    axes = list(range(int(dimension)))
    combos = [c for n in range(1, len(axes) + 1) for c in itertools.combinations(axes, n)]
    return ["none"] + [",".join(str(a) for a in c) for c in combos]


def _first_if_choices(value: Any) -> Any:
    """A list of strings is a config choice list: the first item is the chosen value."""
    if isinstance(value, (list, tuple)) and value and all(isinstance(v, str) for v in value):
        return value[0]
    return value


def parse_mirror_axes(value: Any, dimension: int) -> tuple[int, ...]:
    """``None``/``"none"``/``""``/``[]`` -> ``()``; ``"0,1"``, ``[0, 1]``, ``1`` -> axes; checked against the model.

    Raises:
        HTTPException: 400 for an axis outside ``0 .. dimension - 1``, a repeated axis or a non-integer.
    """
    value = _first_if_choices(value)
    if value is None or value is False or (isinstance(value, str) and value.strip().lower() in ("", "none")):
        return ()
    if isinstance(value, str):
        items: list[Any] = [v for v in value.replace(" ", "").split(",") if v]
    elif isinstance(value, (list, tuple)):
        items = list(value)
    else:
        items = [value]
    axes = []
    for v in items:
        if isinstance(v, bool) or not (isinstance(v, int) or (isinstance(v, str) and v.lstrip("-").isdigit())):
            raise bad_request(f"mirror_axes: {v!r} is not an axis; use one of {axes_choices(dimension)}")
        a = int(v)
        if not 0 <= a < dimension:
            raise bad_request(f"mirror_axes: axis {a} does not exist in a {dimension}D image (axes 0..{dimension - 1})")
        axes.append(a)
    if len(set(axes)) != len(axes):
        raise bad_request(f"mirror_axes: axis repeated in {items}")
    return tuple(axes)


def parse_bool(value: Any, name: str) -> bool:
    """``true``/``false`` as JSON booleans or the strings Slicer's table sends.

    Raises:
        HTTPException: 400 for anything else.
    """
    value = _first_if_choices(value)
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    if isinstance(value, str) and value.strip().lower() in ("true", "yes", "1", "on", "false", "no", "0", "off", ""):
        return value.strip().lower() in ("true", "yes", "1", "on")
    raise bad_request(f"{name}: expected true or false, got {value!r}")


def parse_return_guide(value: Any, allowed: tuple[str, ...] = GUIDE_MODES) -> str:
    """One of ``allowed``; ``true``/``false`` (older clients) mean ``datastore``/``none``.

    Raises:
        HTTPException: 400 for any other value (e.g. ``"maybe"``).
    """
    value = _first_if_choices(value)
    if value is None or value is False:
        return "none"
    if value is True:
        value = "datastore"
    if isinstance(value, str):
        v = value.strip().lower()
        v = {"true": "datastore", "false": "none", "": "none"}.get(v, v)
        if v in allowed:
            return v
    raise bad_request(f"return_guide: {value!r} is not one of {list(allowed)}")


def label_index(label: Any, labels: dict[str, int]) -> int | None:
    """The label id of ``label`` (display name, bundle channel name or id); ``None`` when no label is given.

    Raises:
        HTTPException: 400 naming the known labels for an unknown one (e.g. Slicer's default ``"Segment_1"``).
    """
    if label is None or label == "" or label == []:
        return None
    if isinstance(label, bool):
        raise bad_request(f"label: {label!r} is not a label name")
    if isinstance(label, int) or (isinstance(label, str) and label.isdigit()):
        idx = int(label)
        if idx in labels.values():
            return idx
    elif isinstance(label, str):
        name = label.strip().lower()
        name = LABEL_NAMES.get(name, name)
        if name in labels:
            return labels[name]
    raise bad_request(
        f"unknown label {label!r}: name the segment one of {sorted(labels)} (in Slicer: rename the segment, or add one"
        " from the label list)"
    )


def parse_points(value: Any, name: str, dimension: int) -> list[list[float]]:
    """A list of ``[x, y(, z)]`` voxel indices (numbers; extra coordinates, e.g. a 2D slice index, are dropped).

    Raises:
        HTTPException: 400 naming ``name`` for anything else (strings, NaN, too few coordinates).
    """
    if value is None or value == "":
        return []
    shape = "[x, y" + (", z" if dimension == 3 else "") + "]"
    if not isinstance(value, (list, tuple)):
        raise bad_request(f"{name!r} must be a list of {shape} points, got {value!r}")
    out = []
    for p in value:
        if (
            not isinstance(p, (list, tuple))
            or len(p) < dimension
            or any(isinstance(v, bool) or not isinstance(v, (int, float)) for v in p[:dimension])
            or any(not math.isfinite(float(v)) for v in p[:dimension])
        ):
            raise bad_request(f"{name!r} must be a list of {shape} points (numbers), got {p!r}")
        out.append([float(v) for v in p[:dimension]])
    return out
