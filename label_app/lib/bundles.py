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
"""Put the repository's bundles into the app's model folder the way MONAI Label expects them.

``<model_dir>/<bundle>/configs`` is refreshed from ``bundles/<bundle>/configs`` at every start (so bundle edits reach
the app), with the app's overrides applied; ``<model_dir>/<bundle>/models`` belongs to the app: the served weights,
which training replaces. The repository's ``bundles/`` folder is never written to.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from monai.bundle import ConfigParser

from guidino_monai.utils import atomic_write

__all__ = ["BUNDLES_DIR", "available_bundles", "prepare_bundle", "atomic_torch_save", "load_weights"]

logger = logging.getLogger(__name__)

#: the repository's bundles
BUNDLES_DIR = Path(__file__).resolve().parents[2] / "bundles"

CONFIGS_WITH_OVERRIDES = ("inference.json", "train.json")


def available_bundles(bundles_dir: str | os.PathLike = BUNDLES_DIR) -> list[str]:
    """Names of the bundles (folders with ``configs/inference.json``)."""
    root = Path(bundles_dir)
    return (
        sorted(p.name for p in root.iterdir() if (p / "configs" / "inference.json").is_file()) if root.is_dir() else []
    )


def atomic_torch_save(obj: Any, path: str | os.PathLike) -> None:
    """``torch.save`` to a temporary file in the same folder, then ``os.replace``: readers never see a torn file."""
    atomic_write(path, lambda tmp: torch.save(obj, tmp))


def load_weights(network: torch.nn.Module, path: str | os.PathLike) -> None:
    """Load a bundle checkpoint (a plain state dict or ``{"model": state_dict}``) strictly into ``network``."""
    state = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(state, dict) and "model" in state and isinstance(state["model"], dict):
        state = state["model"]
    network.load_state_dict(state, strict=True)


def _write_config(src: Path, dst: Path, overrides: dict[str, Any]) -> None:
    parser = ConfigParser()
    parser.read_config(str(src))
    for key, value in overrides.items():
        if key.split("#", 1)[0] in parser.config:  # only keys this config has (inference vs train)
            parser[key] = value
    atomic_write(dst, lambda tmp: Path(tmp).write_text(json.dumps(parser.config, indent=4)))


def prepare_bundle(
    name: str,
    model_dir: str | os.PathLike,
    overrides: dict[str, Any] | None = None,
    init_weights: str = "bundle",
    bundles_dir: str | os.PathLike = BUNDLES_DIR,
) -> str:
    """Copy bundle ``name`` into ``model_dir`` and make sure it has servable weights.

    Args:
        name: bundle folder name under ``bundles_dir``.
        model_dir: the app's model folder.
        overrides: config ids -> values applied to ``inference.json`` and ``train.json`` (``"a#b"`` ids allowed),
            e.g. ``{"guide_backbone_kwargs": {"depth": 2}}``.
        init_weights: when the app copy has no ``models/model.pt`` yet: ``"bundle"`` copies the bundle's trained
            ``models/model.pt`` (random init when the bundle has none), ``"random"`` always starts from a random init.
        bundles_dir: where the bundles are.

    Returns:
        the path of the app's copy of the bundle.

    Raises:
        FileNotFoundError: no such bundle. RuntimeError: the weights do not fit the (overridden) network.
    """
    src = Path(bundles_dir) / name
    if not (src / "configs" / "inference.json").is_file():
        raise FileNotFoundError(
            f"bundle {name!r} not found in {bundles_dir} (available: {available_bundles(bundles_dir)})"
        )
    if init_weights not in ("bundle", "random"):
        raise ValueError(f"init_weights must be 'bundle' or 'random', got {init_weights!r}.")
    dst = Path(model_dir) / name
    (dst / "configs").mkdir(parents=True, exist_ok=True)
    (dst / "models").mkdir(parents=True, exist_ok=True)
    for f in sorted((src / "configs").iterdir()):
        if f.name in CONFIGS_WITH_OVERRIDES:
            _write_config(f, dst / "configs" / f.name, dict(overrides or {}))
        elif f.is_file():
            shutil.copyfile(f, dst / "configs" / f.name)
    served = dst / "models" / "model.pt"
    parser = ConfigParser()
    parser.read_config(str(dst / "configs" / "inference.json"))
    parser["bundle_root"] = str(dst)
    parser["device"] = "$torch.device('cpu')"
    network = parser.get_parsed_content("network_def", instantiate=True)
    if not served.is_file():
        trained = src / "models" / "model.pt"
        if init_weights == "bundle" and trained.is_file():
            atomic_write(served, lambda tmp: shutil.copyfile(trained, tmp))
            logger.info("%s: serving the bundle's trained weights %s", name, trained)
        else:
            atomic_torch_save(network.state_dict(), served)
            logger.warning(
                "%s: no trained weights: serving a RANDOMLY INITIALISED network (train it from labels)", name
            )
    try:
        load_weights(network, served)
    except RuntimeError as e:
        raise RuntimeError(
            f"{served} does not fit the network of {dst / 'configs' / 'inference.json'} (overrides {overrides}): {e}."
            " Remove it to start from other weights."
        ) from e
    return str(dst)
