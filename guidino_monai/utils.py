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

"""Small shared utilities."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

__all__ = ["as_bool", "atomic_write"]


def atomic_write(path: str | os.PathLike, write: Callable[[str], None]) -> Path:
    """Write a file so that readers only ever see the old or the complete new one.

    ``write(tmp_path)`` writes a temporary file in the same folder (same suffix, so writers that pick a format from the
    name keep working); it is then renamed over ``path`` with ``os.replace``. On any error the temporary file is
    removed and ``path`` is left as it was.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    suffix = "".join(path.suffixes) or ".tmp"
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=f".partial{suffix}", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def as_bool(value: Any, name: str = "value") -> bool:
    """A strict boolean from a bool, a number or a string.

    Command-line overrides of bundle configs (``--resume false``, ``--guide no``) arrive as strings, and
    ``bool("false")`` is ``True``; this accepts ``true/false``, ``1/0``, ``yes/no``, ``on/off`` (any case) and refuses
    anything else.

    Raises:
        ValueError: for a string or value that is not one of those, naming ``name``.
    """
    if isinstance(value, bool):
        return value
    if isinstance(value, str):
        v = value.strip().lower()
        if v in ("true", "1", "yes", "on"):
            return True
        if v in ("false", "0", "no", "off"):
            return False
    elif isinstance(value, (int, float)) and value in (0, 1):
        return bool(value)
    elif hasattr(value, "item") and getattr(value, "size", getattr(value, "numel", lambda: 0)) in (1,):
        return as_bool(value.item(), name)  # numpy / torch scalars
    raise ValueError(f"{name} must be a boolean (true/false), got {value!r}.")
