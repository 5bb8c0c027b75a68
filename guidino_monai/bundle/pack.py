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

"""Pack a bundle into the zip layout that ``python -m monai.bundle download --url ...`` unpacks.

Usage::

    python -m guidino_monai.bundle.pack bundles/guidino_hippocampus_mri_segmentation --output dist

The zip holds ``<name>/configs``, ``<name>/docs``, ``LICENSE``, ``large_files.yml``, the trained weights
``models/model.pt`` (if present) and a TorchScript export ``models/model.ts`` made with ``monai.bundle ckpt_export``
(traced at the inference ROI size).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import tempfile
import zipfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..utils import atomic_write

__all__ = ["pack_bundle", "export_torchscript", "sha256"]

_BUNDLE_ITEMS = ("configs", "docs", "LICENSE", "large_files.yml", "scripts")


def sha256(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def export_torchscript(bundle_dir: str | os.PathLike, ckpt_file: str | os.PathLike, filepath: str | os.PathLike,
                       **override: Any) -> str:  # fmt: skip
    """TorchScript export of ``network_def`` from ``inference.json`` with the given weights (traced at the ROI)."""
    from monai.bundle import ConfigParser, ckpt_export

    bundle_dir = Path(bundle_dir)
    config_file = bundle_dir / "configs" / "inference.json"
    parser = ConfigParser()
    parser.read_config(str(config_file))
    parser.update(override)
    roi = list(parser["roi_size"])
    in_channels = int(parser["network_def"]["in_channels"]) if "in_channels" in parser["network_def"] else 1
    ckpt_export(
        net_id="network_def",
        filepath=str(filepath),
        ckpt_file=str(ckpt_file),
        meta_file=str(bundle_dir / "configs" / "metadata.json"),
        config_file=str(config_file),
        bundle_root=str(bundle_dir),
        use_trace=True,
        input_shape=[1, in_channels, *roi],
        **override,
    )
    return str(filepath)


def pack_bundle(
    bundle_dir: str | os.PathLike,
    output: str | os.PathLike,
    weights: str | os.PathLike | None = None,
    export: bool = True,
    override: dict[str, Any] | None = None,
) -> str:
    """Write ``<output>/<name>.zip`` (or ``output`` itself if it ends in ``.zip``) and return its path.

    Args:
        bundle_dir: the bundle folder (``configs/metadata.json`` inside).
        output: a folder or a ``.zip`` path.
        weights: trained weights; defaults to ``<bundle>/models/model.pt`` when it exists (else no weights).
        export: also add a TorchScript ``models/model.ts`` (needs weights).
        override: config overrides used for the export (e.g. a smaller test network).

    Raises:
        FileNotFoundError: no ``configs/metadata.json`` in ``bundle_dir`` or a missing weight file.
    """
    bundle_dir = Path(bundle_dir).resolve()
    if not (bundle_dir / "configs" / "metadata.json").is_file():
        raise FileNotFoundError(f"{bundle_dir} is not a bundle: configs/metadata.json is missing.")
    name = bundle_dir.name
    default_weights = bundle_dir / "models" / "model.pt"
    if weights is None and default_weights.is_file():
        weights = default_weights
    if weights is not None and not Path(weights).is_file():
        raise FileNotFoundError(f"weight file {weights} does not exist.")
    output = Path(output)
    zip_path = output if output.suffix == ".zip" else output / f"{name}.zip"
    zip_path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        stage = Path(tmp) / name
        stage.mkdir()
        for item in _BUNDLE_ITEMS:
            src = bundle_dir / item
            if src.is_dir():
                shutil.copytree(src, stage / item, ignore=shutil.ignore_patterns("__pycache__"))
            elif src.is_file():
                shutil.copy2(src, stage / item)
        manifest: dict[str, Any] = {"name": name, "files": {}}
        if weights is not None:
            (stage / "models").mkdir()
            shutil.copy2(weights, stage / "models" / "model.pt")
            if export:
                export_torchscript(
                    stage, stage / "models" / "model.pt", stage / "models" / "model.ts", **(override or {})
                )
            for f in sorted((stage / "models").iterdir()):
                manifest["files"][f"models/{f.name}"] = {"sha256": sha256(f), "bytes": f.stat().st_size}
        (stage / "models").mkdir(exist_ok=True)
        (stage / "models" / "MANIFEST.json").write_text(json.dumps(manifest, indent=2))

        def write_zip(tmp: str) -> None:
            with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_DEFLATED) as zf:
                for path in sorted(stage.rglob("*")):
                    if path.is_file():
                        zf.write(path, str(path.relative_to(stage.parent)))

        atomic_write(zip_path, write_zip)
    return str(zip_path)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("bundle_dir", help="bundle folder, e.g. bundles/guidino_hippocampus_mri_segmentation")
    parser.add_argument("--output", default="dist", help="output folder or .zip path (default: dist)")
    parser.add_argument("--weights", default=None, help="weights to include (default: <bundle>/models/model.pt)")
    parser.add_argument("--no-export", action="store_true", help="do not add a TorchScript export")
    parser.add_argument("--override", default="{}", help="JSON dict of config overrides for the export")
    args = parser.parse_args(argv)
    path = pack_bundle(args.bundle_dir, args.output, args.weights, not args.no_export, json.loads(args.override))
    print(path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
