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
"""Print the pip constraints of the label venv (label_app/INSTALL.md): the installed torch, the torchvision built
for it, numpy<2 and pydicom<3.

    python label_app/constraints.py > .venv-label/constraints.txt

Exits with status 1 (and a message on stderr) when torch is not installed: install torch first, never write an empty
``torch==`` pin. torchvision releases pair with torch minors (torch 2.N <-> torchvision 0.(N+15)); a torchvision
built for another torch fails at import with ``operator torchvision::nms does not exist``, so it is pinned to the
installed one when that one matches, else to the matching minor.
"""

from __future__ import annotations

import sys
from importlib import metadata

__all__ = ["base_version", "matching_torchvision", "constraints"]


def base_version(version: str) -> str:
    """``"2.14.1+cu130"`` -> ``"2.14.1"``."""
    return version.split("+", 1)[0]


def matching_torchvision(torch_version: str) -> str:
    """The torchvision minor series released with ``torch_version``: ``"2.14.1"`` -> ``"0.29.*"``.

    Raises:
        ValueError: a torch version this pairing does not cover (torch 1.x, or not ``major.minor...``).
    """
    parts = base_version(torch_version).split(".")
    if len(parts) < 2 or not parts[0].isdigit() or not parts[1].isdigit() or int(parts[0]) != 2:
        raise ValueError(f"cannot pair torchvision with torch {torch_version!r} (torch 2.x expected)")
    return f"0.{int(parts[1]) + 15}.*"


def constraints() -> list[str]:
    """Constraint lines for the installed torch.

    Raises:
        RuntimeError: torch is not installed.
    """
    try:
        torch_version = base_version(metadata.version("torch"))
    except metadata.PackageNotFoundError:
        raise RuntimeError(
            "torch is not installed: `python -m pip install torch` first (label_app/INSTALL.md)"
        ) from None
    wanted = matching_torchvision(torch_version)
    try:
        installed = base_version(metadata.version("torchvision"))
    except metadata.PackageNotFoundError:
        installed = ""
    tv = f"torchvision=={installed}" if installed.startswith(wanted[:-1]) else f"torchvision=={wanted}"
    return [f"torch=={torch_version}", tv, "numpy<2", "pydicom<3"]


if __name__ == "__main__":
    try:
        print("\n".join(constraints()))
    except (RuntimeError, ValueError) as e:
        print(f"label_app/constraints.py: {e}", file=sys.stderr)
        sys.exit(1)
