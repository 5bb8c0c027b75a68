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

"""A bundle's published weights: ``large_files.yml`` (the model zoo's format), its download, and clear errors.

Each entry of ``large_files.yml`` names a file of the bundle (``path``), where it is published (``url``) and its
``hash_val``/``hash_type`` (sha256). Until weights are published the entries point at the reserved host
``no-weights-published-yet.invalid`` (RFC 2606: it never resolves), so every downloader fails and its message carries
that name; :func:`download_weights` and :func:`require_weights` say it in words. Publishing
(``python -m guidino_monai.bundle.pack <bundle> --release-url URL``) fills in the release URL and the hashes.

Usage::

    python -m guidino_monai.bundle.download bundles/guidino_hippocampus_mri_segmentation   # download + check sha256
"""

from __future__ import annotations

import argparse
import hashlib
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

__all__ = [
    "PLACEHOLDER_HOST",
    "WeightsNotPublishedError",
    "download_weights",
    "file_hash",
    "is_published",
    "large_files_entries",
    "placeholder_url",
    "require_weights",
    "write_large_files",
]

#: host of the URLs of weights that are not published yet (a reserved name that never resolves)
PLACEHOLDER_HOST = "no-weights-published-yet.invalid"
_LARGE_FILES = ("large_files.yml", "large_files.yaml", "large_files.json")
_HASHES = {"md5": hashlib.md5, "sha1": hashlib.sha1, "sha256": hashlib.sha256, "sha512": hashlib.sha512}


class WeightsNotPublishedError(FileNotFoundError):
    """The bundle's weights are neither in the bundle nor published anywhere yet."""


def placeholder_url(bundle_name: str, version: str, filename: str) -> str:
    """The URL written for a file that is not published yet."""
    return f"https://{PLACEHOLDER_HOST}/{bundle_name}/v{version}/{filename}"


def is_published(entry: dict[str, Any]) -> bool:
    """Whether a ``large_files`` entry has a real download URL (not empty, not the placeholder host)."""
    url = str(entry.get("url") or "")
    return bool(urlparse(url).scheme) and urlparse(url).hostname != PLACEHOLDER_HOST


def file_hash(path: str | os.PathLike, hash_type: str = "sha256") -> str:
    """Hex digest of a file (``md5``, ``sha1``, ``sha256`` or ``sha512``)."""
    if hash_type.lower() not in _HASHES:
        raise ValueError(f"unsupported hash_type {hash_type!r}; choose one of {sorted(_HASHES)}.")
    h = _HASHES[hash_type.lower()]()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _large_files_path(bundle_dir: Path) -> Path | None:
    for name in _LARGE_FILES:
        if (bundle_dir / name).is_file():
            return bundle_dir / name
    return None


def large_files_entries(bundle_dir: str | os.PathLike) -> list[dict[str, Any]]:
    """The ``large_files`` list of a bundle (empty if it has no ``large_files.yml``).

    Raises:
        ValueError: the file is not a mapping with a ``large_files`` list of entries with ``path`` and ``url``.
    """
    from monai.bundle import ConfigParser

    path = _large_files_path(Path(bundle_dir))
    if path is None:
        return []
    content = ConfigParser.load_config_file(str(path))
    entries = content.get("large_files") if isinstance(content, dict) else None
    if not isinstance(entries, list) or not all(isinstance(e, dict) and "path" in e and "url" in e for e in entries):
        raise ValueError(f"{path}: expected a 'large_files' list of entries with 'path' and 'url'.")
    return entries


def write_large_files(bundle_dir: str | os.PathLike, entries: Sequence[dict[str, Any]], comment: str = "") -> Path:
    """Write ``<bundle_dir>/large_files.yml`` (plain YAML the zoo's ``ConfigParser`` reads; no YAML library needed)."""

    def q(v: Any) -> str:
        return '"' + str(v).replace("\\", "\\\\").replace('"', '\\"') + '"'

    lines = [f"# {c}".rstrip() for c in comment.splitlines()] + ["large_files:"]
    for e in entries:
        lines.append(f"  - path: {q(e['path'])}")
        for key in ("url", "hash_val", "hash_type"):
            lines.append(f"    {key}: {q(e.get(key, ''))}")
    path = Path(bundle_dir) / "large_files.yml"
    path.write_text("\n".join(lines) + "\n")
    return path


def _not_published_message(bundle_dir: Path, rel: str) -> str:
    return (
        f"no trained weights have been published for bundle {bundle_dir.name} yet: {rel} is not in the bundle and"
        f" large_files.yml points at the placeholder host {PLACEHOLDER_HOST}. Train them (configs/train.json), or"
        " publish trained weights with `python -m guidino_monai.bundle.pack <bundle> --release-url <URL>` and upload"
        " the files it writes to that release URL."
    )


def require_weights(path: str | os.PathLike, bundle_root: str | os.PathLike | None = None) -> str:
    """Return ``path`` if the weight file exists; else raise an error that says why it is missing and what to do.

    Args:
        path: the weight file the checkpoint loader will read (``<bundle>/models/model.pt``).
        bundle_root: the bundle folder, to read ``large_files.yml`` (default: the parent of ``path``'s folder).

    Raises:
        WeightsNotPublishedError: no file and no published URL for it.
        FileNotFoundError: no file, but a published URL (the message gives the download command).
    """
    if os.path.isfile(path):
        return str(path)
    p = Path(path).resolve()
    root = Path(bundle_root).resolve() if bundle_root else p.parent.parent
    try:
        rel = p.relative_to(root).as_posix()
    except ValueError:
        rel = p.name
    try:
        entries = {e["path"]: e for e in large_files_entries(root)}
    except Exception:  # noqa: BLE001 - an unreadable large_files.yml must not hide the real problem
        entries = {}
    entry = entries.get(rel)
    if entry is not None and not is_published(entry):
        raise WeightsNotPublishedError(f"trained weights: {p} does not exist; " + _not_published_message(root, rel))
    if entry is not None:
        raise FileNotFoundError(
            f"trained weights: {p} does not exist. They are published at {entry['url']}: download and check them with"
            f" `python -m guidino_monai.bundle.download {root}`."
        )
    raise FileNotFoundError(f"trained weights: {p} does not exist (run configs/train.json first).")


def require_loader_weights(handlers: Sequence[Any] | None, bundle_root: str | os.PathLike | None = None) -> list[str]:
    """:func:`require_weights` for the file of every checkpoint loader among ``handlers`` (a bundle's handler list).

    A loader disabled in the config (``"handlers#0#_disabled_": true``, as the model zoo's inference test does) is not
    in the list, so inference then starts without weights.

    Returns:
        the weight files the loaders will read.
    """
    files = []
    for h in handlers or []:
        load_path = getattr(h, "load_path", None)
        if load_path is not None and hasattr(h, "load_dict"):
            files.append(require_weights(load_path, bundle_root))
    return files


def download_weights(bundle_dir: str | os.PathLike, progress: bool = False) -> list[str]:
    """Fetch every file of ``large_files.yml`` that the bundle lacks and check the hash of every file.

    The same rules as the model zoo's CI (``monai.apps.download_url``; an empty ``hash_val`` skips the check).

    Returns:
        the paths of the files, present or downloaded.

    Raises:
        WeightsNotPublishedError: a file is missing and its entry still has the placeholder URL.
        monai.apps.utils.HashCheckError: a present or downloaded file has another hash.
    """
    from monai.apps.utils import download_url

    bundle_dir = Path(bundle_dir).resolve()
    paths = []
    for entry in large_files_entries(bundle_dir):
        target = bundle_dir / entry["path"]
        if not target.is_file() and not is_published(entry):
            raise WeightsNotPublishedError(_not_published_message(bundle_dir, entry["path"]))
        download_url(url=entry["url"], filepath=target, hash_val=entry.get("hash_val") or None,
                     hash_type=entry.get("hash_type") or "sha256", progress=progress)  # fmt: skip
        paths.append(str(target))
    return paths


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("bundle_dir", help="bundle folder with large_files.yml")
    args = parser.parse_args(argv)
    try:
        paths = download_weights(args.bundle_dir, progress=True)
    except WeightsNotPublishedError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    for path in paths:
        print(path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
