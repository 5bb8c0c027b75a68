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

"""Pack a bundle into the zip layout that ``python -m monai.bundle download --url ...`` unpacks, and publish it.

Usage::

    python -m guidino_monai.bundle.pack bundles/guidino_hippocampus_mri_segmentation --output dist
    # publish: the zip and the weights as release assets, large_files.yml with their URLs and sha256
    python -m guidino_monai.bundle.pack bundles/guidino_hippocampus_mri_segmentation --output dist \
        --release-url https://github.com/<owner>/<repo>/releases/download/<tag> --write-large-files

The zip ``<name>_v<version>.zip`` holds ``<name>/configs``, ``docs``, ``LICENSE``, ``large_files.yml``, the trained
weights ``models/model.pt`` (if present), a TorchScript export ``models/model.ts`` (traced at the inference ROI:
the networks are not scriptable, see the bundle README) and ``scripts/guidino_monai``, a copy of the library the
configs need. ``guidino-monai`` is on no package index, so the bundle carries it (the model zoo's convention for custom
code, ``<bundle>/scripts``); the zip then runs with only the PyPI packages of ``configs/metadata.json``. The bundle's
``scripts/__init__.py`` (imported first by the configs) puts ``scripts/`` on ``sys.path``.

With ``--release-url URL`` the weights are also written next to the zip as ``<name>_v<version>_model.pt`` / ``.ts``
(upload them and the zip to ``URL``), and ``large_files.yml`` (in the zip, and with ``--write-large-files`` in the
bundle folder) gets ``URL/<file>`` and its sha256. All files written are mode 0644.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import stat
import tempfile
import zipfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..utils import atomic_write
from .weights import file_hash, placeholder_url, write_large_files

__all__ = ["pack_bundle", "export_torchscript", "sha256", "library_dir"]

_BUNDLE_ITEMS = ("configs", "docs", "LICENSE", "large_files.yml", "scripts")
_WEIGHTS = ("model.pt", "model.ts")
_IGNORE = shutil.ignore_patterns("__pycache__", "*.pyc", "*.pyo")
_MODE = 0o644


def sha256(path: str | os.PathLike) -> str:
    return file_hash(path, "sha256")


def library_dir() -> Path:
    """The folder of the ``guidino_monai`` package that is running (the one the bundle is packed with)."""
    import guidino_monai

    return Path(guidino_monai.__file__).resolve().parent


def export_torchscript(bundle_dir: str | os.PathLike, ckpt_file: str | os.PathLike, filepath: str | os.PathLike,
                       **override: Any) -> str:  # fmt: skip
    """TorchScript export of ``network_def`` from ``inference.json`` with the given weights, traced at the ROI size.

    Tracing, not scripting: ``torch.jit.script`` cannot compile the guided networks (optional sub-modules typed
    ``X | None``, timm's ViT). The trace records the network at ``[1, in_channels, *roi_size]``, the window size the
    bundle's sliding-window inferer feeds it; other input sizes are not supported by the traced module.
    """
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


def _publish_entries(stage: Path, name: str, version: str, release_url: str | None) -> list[dict[str, Any]]:
    """``large_files`` entries for the packed weights: the release URL (or the placeholder) and their sha256."""
    entries = []
    for w in _WEIGHTS:
        rel = f"models/{w}"
        f = stage / rel
        if not f.is_file():  # only what is packed (and published)
            continue
        asset = f"{name}_v{version}_{w}"
        url = f"{release_url.rstrip('/')}/{asset}" if release_url else placeholder_url(name, version, w)
        entries.append({"path": rel, "url": url, "hash_val": sha256(f), "hash_type": "sha256"})
    return entries


def _zip_dir(stage: Path, zip_path: Path) -> None:
    def write_zip(tmp: str) -> None:
        with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_DEFLATED) as zf:
            for path in sorted(stage.rglob("*")):
                if path.is_file():
                    info = zipfile.ZipInfo.from_file(path, str(path.relative_to(stage.parent)))
                    info.external_attr = (stat.S_IFREG | _MODE) << 16  # rw-r--r-- for whoever unzips it
                    info.compress_type = zipfile.ZIP_DEFLATED
                    with open(path, "rb") as src, zf.open(info, "w", force_zip64=True) as dst:
                        shutil.copyfileobj(src, dst, 1 << 20)

    atomic_write(zip_path, write_zip)
    os.chmod(zip_path, _MODE)


def pack_bundle(
    bundle_dir: str | os.PathLike,
    output: str | os.PathLike,
    weights: str | os.PathLike | None = None,
    export: bool = True,
    override: dict[str, Any] | None = None,
    release_url: str | None = None,
    write_large_files_to_bundle: bool = False,
    carry_library: bool = True,
) -> str:
    """Write ``<output>/<name>_v<version>.zip`` (or ``output`` itself if it ends in ``.zip``) and return its path.

    Args:
        bundle_dir: the bundle folder (``configs/metadata.json`` inside).
        output: a folder or a ``.zip`` path.
        weights: trained weights; defaults to ``<bundle>/models/model.pt`` when it exists (else no weights).
        export: also add a traced TorchScript ``models/model.ts`` (needs weights).
        override: config overrides used for the export (e.g. a smaller test network).
        release_url: where the zip and weights will be uploaded (a folder URL, e.g. a GitHub release download URL):
            the weights are written next to the zip as release assets and ``large_files.yml`` points at them.
        write_large_files_to_bundle: also write that ``large_files.yml`` into ``bundle_dir`` (to commit it).
        carry_library: put the running ``guidino_monai`` package into ``scripts/guidino_monai``.

    Raises:
        FileNotFoundError: no ``configs/metadata.json`` in ``bundle_dir`` or a missing weight file.
        ValueError: ``release_url`` is not an http(s) URL, or release options without weights.
    """
    bundle_dir = Path(bundle_dir).resolve()
    meta_file = bundle_dir / "configs" / "metadata.json"
    if not meta_file.is_file():
        raise FileNotFoundError(f"{bundle_dir} is not a bundle: configs/metadata.json is missing.")
    name = bundle_dir.name
    version = str(json.loads(meta_file.read_text()).get("version", "0"))
    default_weights = bundle_dir / "models" / "model.pt"
    if weights is None and default_weights.is_file():
        weights = default_weights
    if weights is not None and not Path(weights).is_file():
        raise FileNotFoundError(f"weight file {weights} does not exist.")
    if release_url is not None and not str(release_url).startswith(("https://", "http://")):
        raise ValueError(f"release_url must be an http(s) URL, got {release_url!r}.")
    if (release_url or write_large_files_to_bundle) and weights is None:
        raise ValueError(f"nothing to publish: {name} has no weights ({default_weights} does not exist; pass weights).")
    output = Path(output)
    zip_path = output if output.suffix == ".zip" else output / f"{name}_v{version}.zip"
    zip_path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        stage = Path(tmp) / name
        stage.mkdir()
        for item in _BUNDLE_ITEMS:
            src = bundle_dir / item
            if src.is_dir():
                shutil.copytree(src, stage / item, ignore=_IGNORE)
            elif src.is_file():
                shutil.copy2(src, stage / item)
        if carry_library:
            (stage / "scripts").mkdir(exist_ok=True)
            if not (stage / "scripts" / "__init__.py").is_file():
                raise FileNotFoundError(f"{bundle_dir}/scripts/__init__.py is missing: the configs import it first.")
            shutil.copytree(library_dir(), stage / "scripts" / "guidino_monai", ignore=_IGNORE)
        manifest: dict[str, Any] = {"name": name, "version": version, "files": {}}
        (stage / "models").mkdir()
        if weights is not None:
            shutil.copy2(weights, stage / "models" / "model.pt")
            if export:
                export_torchscript(
                    stage, stage / "models" / "model.pt", stage / "models" / "model.ts", **(override or {})
                )
            for f in sorted((stage / "models").iterdir()):
                manifest["files"][f"models/{f.name}"] = {"sha256": sha256(f), "bytes": f.stat().st_size}
            entries = _publish_entries(stage, name, version, release_url)
            comment = f"Weights of {name} v{version}" + (f", published at {release_url}" if release_url else
                                                         " (packed in the zip; not published yet)")  # fmt: skip
            write_large_files(stage, entries, comment)
            if write_large_files_to_bundle:
                write_large_files(bundle_dir, entries, comment)
            if release_url:
                for e in entries:
                    asset = zip_path.parent / e["url"].rsplit("/", 1)[-1]
                    shutil.copyfile(stage / e["path"], asset)
                    os.chmod(asset, _MODE)
        (stage / "models" / "MANIFEST.json").write_text(json.dumps(manifest, indent=2))
        _zip_dir(stage, zip_path)
    return str(zip_path)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("bundle_dir", help="bundle folder, e.g. bundles/guidino_hippocampus_mri_segmentation")
    parser.add_argument("--output", default="dist", help="output folder or .zip path (default: dist)")
    parser.add_argument("--weights", default=None, help="weights to include (default: <bundle>/models/model.pt)")
    parser.add_argument("--no-export", action="store_true", help="do not add a TorchScript export")
    parser.add_argument("--override", default="{}", help="JSON dict of config overrides for the export")
    parser.add_argument("--release-url", default=None, help="folder URL the zip and weights will be uploaded to")
    parser.add_argument("--write-large-files", action="store_true", help="write large_files.yml into the bundle")
    parser.add_argument("--no-library", action="store_true", help="do not carry guidino_monai in scripts/")
    args = parser.parse_args(argv)
    path = pack_bundle(args.bundle_dir, args.output, args.weights, not args.no_export, json.loads(args.override),
                       release_url=args.release_url, write_large_files_to_bundle=args.write_large_files,
                       carry_library=not args.no_library)  # fmt: skip
    print(path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
