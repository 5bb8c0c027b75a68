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

"""Training helpers for guided networks: cache the frozen ViT's tokens once per volume."""

from __future__ import annotations

import copy
import hashlib
import logging
import os
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from monai.engines.utils import PrepareBatch, default_prepare_batch
from monai.transforms import Compose, Randomizable, Transform

from .inferers import unwrap_network
from .networks.blocks.guide import coords_to_grid
from .transforms import AddCoordinatesd
from .utils import as_bool

__all__ = ["CachedGuidePrepareBatch"]

logger = logging.getLogger(__name__)


class CachedGuidePrepareBatch(PrepareBatch):
    """``prepare_batch`` for ``SupervisedTrainer`` that runs a frozen guide ViT once per volume, not once per step.

    The first time a volume appears, it goes through the ViT whole, as the dataset's transforms make it up to and
    including :class:`~guidino_monai.transforms.AddCoordinatesd` (which marks the volume the coordinates refer to:
    put it before any padding, so that the ViT sees the image as inference does), and the token maps are kept
    (``cache_dtype``, on the training device). Every step then only runs the TokenBook on the cached tokens and cuts
    each crop's guide out of the whole-volume guide at the voxel coordinates that ``AddCoordinatesd`` stored and the
    padding, crops and flips carried along. The guide is thus the one inference computes
    (:class:`~guidino_monai.inferers.GuidedSlidingWindowInferer`), and its gradient still reaches the TokenBook.

    Volumes are keyed by their file path and a hash of the file's content (``image.meta["filename_or_obj"]``), so two
    folders with the same file names never share tokens and a file rewritten in place is encoded again; any data item
    with a file path works (no ``case_id`` needed, e.g. MONAI Label's ``{"image": ..., "label": ...}``).

    Falls back to the ordinary per-step path (the network runs the ViT itself) for plain networks, for a trainable ViT
    (LoRA or ``freeze=False``: its tokens change every step), when ``enabled`` is false, or when a batch has no
    coordinates or no file path; the log says once which path training uses and why.

    Args:
        network: the guided network (or a DDP wrapper of it).
        dataset: the training dataset, whose ``data`` items hold the image path under ``image_key`` and whose
            ``transform`` is a Compose.
        image_key: key of the image. Defaults to ``"image"``.
        coord_key: key of the coordinates (see :class:`~guidino_monai.transforms.AddCoordinatesd`).
        cache_dtype: dtype of the cached tokens. Defaults to ``"float16"``.
        enabled: switch (strict: the string ``"false"`` from a command line is false). Defaults to ``True``.
    """

    def __init__(
        self,
        network: torch.nn.Module,
        dataset: Any,
        image_key: str = "image",
        coord_key: str = "coords",
        cache_dtype: str = "float16",
        enabled: bool = True,
    ) -> None:
        self.network = network
        self.dataset = dataset
        self.image_key = image_key
        self.coord_key = coord_key
        self.cache_dtype = getattr(torch, cache_dtype)
        self.enabled = as_bool(enabled, "cache_guide_tokens")
        self.tokens: dict[str, torch.Tensor] = {}
        self._index: dict[str, int] | None = None
        self._digests: dict[tuple[str, int, int], str] = {}
        self._logged: str | None = None

    def _why_not(self, batchdata: Any) -> str | None:
        """Why this batch takes the per-step path, or ``None`` when the cache applies."""
        net = unwrap_network(self.network)
        guide = getattr(net, "guide", None) if getattr(net, "use_guide", False) else None
        if guide is None:
            return "the network has no guide"
        if not self.enabled:
            return "token caching is disabled (cache_guide_tokens=false)"
        if guide.vit_trainable:
            return "the guide ViT is trained (LoRA or freeze=False), its tokens change every step"
        if not isinstance(batchdata, Mapping):
            return "the batch is not a dict"
        if self.coord_key not in batchdata:
            return f"the batch has no {self.coord_key!r} (add guidino_monai.transforms.AddCoordinatesd)"
        if self._paths(batchdata) is None:
            return f"the batch's {self.image_key!r} carries no file path (meta 'filename_or_obj')"
        return None

    def active(self, batchdata: Any) -> bool:
        why = self._why_not(batchdata)
        msg = "the ViT runs every step: " + why if why else "tokens are computed once per volume and cached"
        if msg != self._logged:
            logger.info("guide: %s", msg if why else f"{msg} ({self.cache_dtype}, keyed by file path + content hash)")
            self._logged = msg
        return why is None

    def _paths(self, batchdata: Mapping) -> list[str] | None:
        img = batchdata.get(self.image_key)
        meta = getattr(img, "meta", None) or batchdata.get(f"{self.image_key}_meta_dict") or {}
        names = meta.get("filename_or_obj") if isinstance(meta, Mapping) else None
        if names is None:
            return None
        names = [names] if isinstance(names, (str, os.PathLike)) else list(names)
        if not names or not all(isinstance(n, (str, os.PathLike)) and str(n) for n in names):
            return None
        return [os.path.abspath(str(n)) for n in names]

    def cache_key(self, path: str) -> str:
        """``path#sha1`` of the file's content (hashed once per size and modification time)."""
        st = os.stat(path)
        stamp = (path, st.st_size, st.st_mtime_ns)
        digest = self._digests.get(stamp)
        if digest is None:
            h = hashlib.sha1()
            with open(path, "rb") as f:
                for chunk in iter(lambda: f.read(1 << 20), b""):
                    h.update(chunk)
            digest = self._digests[stamp] = h.hexdigest()
        return f"{path}#{digest}"

    def _source_item(self, path: str) -> Mapping:
        """The data item of ``path`` through the dataset's transforms up to and including ``AddCoordinatesd``."""
        if self._index is None:
            self._index = {}
            for i, item in enumerate(self.dataset.data):
                img = item.get(self.image_key) if isinstance(item, Mapping) else None
                if isinstance(img, (str, os.PathLike)):
                    self._index.setdefault(os.path.abspath(str(img)), i)
        if path not in self._index:
            raise KeyError(f"image {path!r} is not in the training dataset.")
        transform = self.dataset.transform
        if not isinstance(transform, Compose):
            raise TypeError("CachedGuidePrepareBatch needs the dataset transform to be a Compose.")
        item = copy.deepcopy(self.dataset.data[self._index[path]])
        end = transform.get_index_of_first(lambda t: isinstance(t, AddCoordinatesd))
        if end is None:
            raise ValueError("the training transforms have no AddCoordinatesd; it marks the volume the ViT sees.")
        random = transform.get_index_of_first(lambda t: isinstance(t, Randomizable) or not isinstance(t, Transform))
        if random is not None and random < end:
            raise ValueError("AddCoordinatesd must come before the first random transform.")
        return transform(item, end=end + 1)

    @torch.no_grad()
    def _tokens(self, path: str, device: torch.device) -> torch.Tensor:
        key = self.cache_key(path)
        cached = self.tokens.get(key)
        if cached is None:
            item = self._source_item(path)
            image = torch.as_tensor(item[self.image_key])[None].to(device)
            guide = unwrap_network(self.network).guide
            cached = guide.encode(image).to(self.cache_dtype)
            self.tokens[key] = cached
        return cached

    def __call__(
        self,
        batchdata: dict[str, torch.Tensor],
        device: str | torch.device | None = None,
        non_blocking: bool = False,
        **kwargs: Any,
    ) -> Any:
        image, label = default_prepare_batch(batchdata, device, non_blocking, **kwargs)
        if not self.active(batchdata):
            return image, label
        paths = self._paths(batchdata)
        dev = image.device
        tokens = [self._tokens(p, dev) for p in paths]
        coords = torch.as_tensor(batchdata[self.coord_key]).to(dev, torch.float32)
        shapes = torch.as_tensor(batchdata[f"{self.coord_key}_source_shape"]).to(dev)
        grid = torch.cat([coords_to_grid(coords[i : i + 1], shapes[i].tolist()) for i in range(len(paths))])
        return image, label, (), {"tokens": tokens, "grid": grid}
