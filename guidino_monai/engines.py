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
import logging
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from monai.engines.utils import PrepareBatch, default_prepare_batch
from monai.transforms import Compose, Randomizable, Transform

from .inferers import unwrap_network
from .networks.blocks.guide import coords_to_grid

__all__ = ["CachedGuidePrepareBatch"]

logger = logging.getLogger(__name__)


class CachedGuidePrepareBatch(PrepareBatch):
    """``prepare_batch`` for ``SupervisedTrainer`` that runs a frozen guide ViT once per volume, not once per step.

    The first time a case appears, its whole volume (the dataset's deterministic transforms, up to the first random
    one) goes through the ViT in one batched call and the token maps are kept (``cache_dtype``, on the training
    device). Every step then only runs the TokenBook on the cached tokens and cuts each crop's guide out of the
    whole-volume guide with the voxel coordinates that :class:`~guidino_monai.transforms.AddCoordinatesd` stored and
    the random crops/flips carried along. The guide is thus computed from whole slices, as at inference
    (:class:`~guidino_monai.inferers.GuidedSlidingWindowInferer`), and its gradient still reaches the TokenBook.

    Falls back to the ordinary per-step path (the network runs the ViT itself) for plain networks, for LoRA (the ViT
    is then trained, its tokens change every step), when ``enabled`` is false, or when a batch has no coordinates.

    Args:
        network: the guided network (or a DDP wrapper of it).
        dataset: the training dataset whose ``data`` items carry ``case_key`` and whose ``transform`` is a Compose.
        case_key: key of the case identifier in the data items. Defaults to ``"case_id"``.
        coord_key: key of the coordinates (see :class:`~guidino_monai.transforms.AddCoordinatesd`).
        cache_dtype: dtype of the cached tokens. Defaults to ``"float16"``.
        enabled: switch. Defaults to ``True``.
    """

    def __init__(
        self,
        network: torch.nn.Module,
        dataset: Any,
        case_key: str = "case_id",
        coord_key: str = "coords",
        cache_dtype: str = "float16",
        enabled: bool = True,
    ) -> None:
        self.network = network
        self.dataset = dataset
        self.case_key = case_key
        self.coord_key = coord_key
        self.cache_dtype = getattr(torch, cache_dtype)
        self.enabled = enabled
        self.tokens: dict[str, torch.Tensor] = {}
        self._index: dict[str, int] | None = None

    def active(self, batchdata: Any) -> bool:
        net = unwrap_network(self.network)
        guide = getattr(net, "guide", None) if getattr(net, "use_guide", False) else None
        return (
            self.enabled
            and guide is not None
            and guide.lora_rank == 0
            and isinstance(batchdata, Mapping)
            and self.coord_key in batchdata
            and self.case_key in batchdata
        )

    def _deterministic_item(self, case_id: str) -> Mapping:
        if self._index is None:
            self._index = {str(item[self.case_key]): i for i, item in enumerate(self.dataset.data)}
        if case_id not in self._index:
            raise KeyError(f"case {case_id!r} is not in the training dataset.")
        transform = self.dataset.transform
        item = copy.deepcopy(self.dataset.data[self._index[case_id]])
        if not isinstance(transform, Compose):
            raise TypeError("CachedGuidePrepareBatch needs the dataset transform to be a Compose.")
        first_random = transform.get_index_of_first(
            lambda t: isinstance(t, Randomizable) or not isinstance(t, Transform)
        )
        return transform(item, end=first_random) if first_random is not None else transform(item)

    @torch.no_grad()
    def _tokens(self, case_id: str, device: torch.device) -> torch.Tensor:
        cached = self.tokens.get(case_id)
        if cached is None:
            item = self._deterministic_item(case_id)
            image = torch.as_tensor(item["image"])[None].to(device)
            guide = unwrap_network(self.network).guide
            cached = guide.encode(image).to(self.cache_dtype)
            self.tokens[case_id] = cached
            if len(self.tokens) == 1:
                logger.info("guide tokens are computed once per volume and cached (%s)", self.cache_dtype)
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
        case_ids: Sequence[str] = [str(c) for c in batchdata[self.case_key]]
        dev = image.device
        tokens = [self._tokens(c, dev) for c in case_ids]
        coords = torch.as_tensor(batchdata[self.coord_key]).to(dev, torch.float32)
        shapes = torch.as_tensor(batchdata[f"{self.coord_key}_source_shape"]).to(dev)
        grid = torch.cat([coords_to_grid(coords[i : i + 1], shapes[i].tolist()) for i in range(len(case_ids))])
        return image, label, (), {"tokens": tokens, "grid": grid}
