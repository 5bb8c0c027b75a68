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

Where the served ``models/model.pt`` came from is recorded next to it in ``models/weights.json`` (``source``:
``bundle``, ``app training`` or ``random``). At every start the bundle's trained ``bundles/<bundle>/models/model.pt``
replaces served weights that were random or an older copy of the bundle's; weights trained in the app are kept (with a
warning naming the bundle file when that one changed). :func:`weights_status` is what ``/info/`` reports. The
bundle's click refiner ``models/click_refiner.pt``, when there, is copied likewise (it is not trained in the app).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
from pathlib import Path
from typing import Any

import torch
from monai.bundle import ConfigParser

from guidino_monai.utils import atomic_write

__all__ = [
    "BUNDLES_DIR",
    "PROVENANCE_FILE",
    "available_bundles",
    "prepare_bundle",
    "atomic_torch_save",
    "load_weights",
    "read_provenance",
    "write_provenance",
    "weights_status",
]

logger = logging.getLogger(__name__)

#: the repository's bundles
BUNDLES_DIR = Path(__file__).resolve().parents[2] / "bundles"

CONFIGS_WITH_OVERRIDES = ("inference.json", "train.json")
#: provenance of the served weights, next to them
PROVENANCE_FILE = "weights.json"


def _sha256(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def read_provenance(bundle_path: str | os.PathLike) -> dict[str, Any]:
    """``models/weights.json`` of an app bundle copy (``{}`` when absent or unreadable)."""
    try:
        return dict(json.loads((Path(bundle_path) / "models" / PROVENANCE_FILE).read_text()))
    except (OSError, ValueError, TypeError):
        return {}


def write_provenance(bundle_path: str | os.PathLike, info: dict[str, Any]) -> None:
    """Write ``models/weights.json`` (atomically), adding the time."""
    info = dict(info, ts=int(time.time()))
    target = Path(bundle_path) / "models" / PROVENANCE_FILE
    atomic_write(target, lambda tmp: Path(tmp).write_text(json.dumps(info, indent=2)))


def weights_status(bundle_path: str | os.PathLike) -> dict[str, Any]:
    """What ``/info/`` says about an app bundle copy's served weights.

    Returns:
        ``{"source": "bundle" | "app training" | "random", "trained": bool, "guide_vit": "pretrained" | "random",
        "warning": str}`` (``warning`` empty when the network is trained and its guide ViT has foundation weights).
    """
    prov = read_provenance(bundle_path)
    source = prov.get("source", "random")
    name = Path(bundle_path).name
    pretrained = None
    try:
        pretrained = json.loads((Path(bundle_path) / "configs" / "inference.json").read_text()).get(
            "pretrained_weights"
        )
    except (OSError, ValueError):
        pass
    vit_pretrained = isinstance(pretrained, str) and bool(pretrained.strip())
    if vit_pretrained and not pretrained.startswith(("$", "@")) and not os.path.isfile(pretrained):
        vit_pretrained = False
    warnings = []
    if source == "random":
        warnings.append(
            "UNTRAINED: randomly initialised network, its segmentations are noise until trained (submit labels and"
            f" train, or put trained weights at bundles/{name}/models/model.pt and restart)"
        )
    if not vit_pretrained:
        warnings.append(
            "guide ViT has random weights (no DINO file: start with --conf bundle_overrides"
            ' \'{"pretrained_weights": "/path/to/dino_weights.pth"}\')'
        )
    return {
        "source": source,
        "trained": source != "random",
        "guide_vit": "pretrained" if vit_pretrained else "random",
        "warning": "; ".join(warnings),
    }


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


def _fits(network: torch.nn.Module, path: Path) -> bool:
    """Whether the checkpoint at ``path`` loads strictly into ``network`` (loading it if so)."""
    try:
        load_weights(network, path)
    except RuntimeError:  # missing / unexpected keys or other shapes
        return False
    return True


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
    prov = read_provenance(dst)
    if served.is_file() and not prov and (dst / "models" / "train_history.json").is_file():
        prov = {"source": "app training"}  # an app version before weights.json: trained here
    trained = src / "models" / "model.pt"
    if init_weights == "bundle" and trained.is_file():
        sha = _sha256(trained)
        source = prov.get("source", "random") if served.is_file() else "random"
        if source == "random" or (source == "bundle" and prov.get("sha256") != sha):
            atomic_write(served, lambda tmp: shutil.copyfile(trained, tmp))
            write_provenance(dst, {"source": "bundle", "sha256": sha, "from": str(trained)})
            logger.info("%s: serving the bundle's trained weights %s", name, trained)
        elif source == "app training" and prov.get("base_sha256") != sha:
            logger.warning(
                "%s: serving the weights trained in the app (%s); the bundle has other trained weights at %s: remove %s"
                " to serve those",
                name, served, trained, served,
            )  # fmt: skip
    elif not served.is_file() or (prov.get("source") == "random" and not _fits(network, served)):
        # random weights written by an earlier start for another network (e.g. the bundle's SegResNet before 0.4.0)
        # carry nothing: a new random init replaces them; trained weights that do not fit raise below instead
        atomic_torch_save(network.state_dict(), served)
        write_provenance(dst, {"source": "random"})
        logger.warning(
            "%s: no trained weights (bundles/%s/models/model.pt absent): serving a RANDOMLY INITIALISED network, /info/"
            " says so (train it from labels, or put trained weights there and restart)",
            name, name,
        )  # fmt: skip
    refiner = src / "models" / "click_refiner.pt"  # the bundle's click-trained refiner (not trained in the app)
    if refiner.is_file() and (
        not (dst / "models" / refiner.name).is_file() or _sha256(refiner) != _sha256(dst / "models" / refiner.name)
    ):
        atomic_write(dst / "models" / refiner.name, lambda tmp: shutil.copyfile(refiner, tmp))
        logger.info("%s: serving the bundle's click refiner %s", name, refiner)
    try:
        load_weights(network, served)
    except RuntimeError as e:
        raise RuntimeError(
            f"{served} does not fit the network of {dst / 'configs' / 'inference.json'} (overrides {overrides}): {e}."
            " Remove it to start from other weights."
        ) from e
    return str(dst)
