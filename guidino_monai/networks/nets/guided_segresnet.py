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

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import torch
from monai.networks.nets import SegResNet
from monai.utils import UpsampleMode

from ..backbones import DEFAULT_GUIDE_BACKBONE
from ..blocks.guide import GateMode, gate_features
from .guided_base import GateAt, GuideOptions, check_spatial_shape

__all__ = ["GuidedSegResNet"]


class GuidedSegResNet(GuideOptions, SegResNet):
    """MONAI :class:`~monai.networks.nets.SegResNet` gated by a GuiDINO guide mask.

    GuiDINO ("Rethinking Vision Foundation Model in Medical Image Segmentation", 2026): a frozen DINOv2/DINOv3 ViT and
    a :class:`~guidino_monai.networks.TokenBook` produce a guide mask that multiplies the backbone's features at
    ``gate_at``. 2D and 3D (slice-wise guide, see :class:`~guidino_monai.networks.GuideBranch`).

    In ``eval()`` :meth:`forward` returns the logits tensor only (so inferers, bundles and TorchScript work
    unchanged). In training it returns ``(logits, guide)``; :class:`~guidino_monai.losses.GuidedDiceCELoss` takes
    that pair. Set ``return_guide = True`` to get the pair in eval too.

    Args:
        spatial_dims ... upsample_mode: as :class:`monai.networks.nets.SegResNet`.
        guide_backbone: timm DINOv2/DINOv3 model name. Defaults to the paper's DINOv3 ViT-S/16
            ``"vit_small_patch16_dinov3"``.
        guide_backbone_kwargs: extra ``timm.create_model`` arguments (e.g. ``{"depth": 2}``).
        pretrained_weights: local DINO weight file/folder; ``None`` = random-init ViT (a warning says so).
        lora_rank: LoRA rank for the ViT, ``0`` keeps it frozen. Defaults to ``0``.
        gate_at: ``"input"``, ``"bottleneck"`` or ``"decoder"``. Defaults to ``"bottleneck"``.
        gate_mode: ``"residual"`` (``f * (1 + g)``) or ``"multiply"`` (``f * g``). Defaults to ``"residual"``.
        guide_kwargs: further :class:`~guidino_monai.networks.GuideBranch` arguments (``guide_size``,
            ``slice_axis``, ``slice_stride``, ``intensity_scaling``, ``num_prototypes``, ...).
        use_guide: ``False`` builds no guide branch at all: the plain MONAI network, for the same recipe without the
            guide (it then returns logits only, also in training). Defaults to ``True``.

    Raises:
        ValueError: bad arguments; at call time a wrong number of dims, a 1-voxel-thin axis, sizes not divisible by
            ``2 ** (len(blocks_down) - 1)``, NaN/Inf in the image.

    Example::

        >>> net = GuidedSegResNet(3, init_filters=8, in_channels=1, out_channels=3,
        ...                       guide_backbone_kwargs={"depth": 2}).eval()
        >>> net(torch.rand(1, 1, 32, 32, 32)).shape
        torch.Size([1, 3, 32, 32, 32])
    """

    def __init__(
        self,
        spatial_dims: int = 3,
        init_filters: int = 8,
        in_channels: int = 1,
        out_channels: int = 2,
        dropout_prob: float | None = None,
        act: tuple | str = ("RELU", {"inplace": True}),
        norm: tuple | str = ("GROUP", {"num_groups": 8}),
        norm_name: str = "",
        num_groups: int = 8,
        use_conv_final: bool = True,
        blocks_down: Sequence[int] = (1, 2, 2, 4),
        blocks_up: Sequence[int] = (1, 1, 1),
        upsample_mode: UpsampleMode | str = UpsampleMode.NONTRAINABLE,
        guide_backbone: str = DEFAULT_GUIDE_BACKBONE,
        guide_backbone_kwargs: dict[str, Any] | None = None,
        pretrained_weights: str | os.PathLike | None = None,
        lora_rank: int = 0,
        gate_at: GateAt | str = GateAt.BOTTLENECK,
        gate_mode: GateMode | str = GateMode.RESIDUAL,
        guide_kwargs: dict[str, Any] | None = None,
        use_guide: bool = True,
    ) -> None:
        SegResNet.__init__(
            self,
            spatial_dims=spatial_dims,
            init_filters=init_filters,
            in_channels=in_channels,
            out_channels=out_channels,
            dropout_prob=dropout_prob,
            act=act,
            norm=norm,
            norm_name=norm_name,
            num_groups=num_groups,
            use_conv_final=use_conv_final,
            blocks_down=tuple(blocks_down),
            blocks_up=tuple(blocks_up),
            upsample_mode=upsample_mode,
        )
        self._init_guide(
            use_guide, spatial_dims, in_channels, guide_backbone, guide_backbone_kwargs, pretrained_weights, lora_rank,
            gate_at, gate_mode, guide_kwargs,
        )  # fmt: skip
        self.size_divisor = 2 ** (len(self.blocks_down) - 1)

    def forward(
        self,
        x: torch.Tensor,
        guide: torch.Tensor | None = None,
        tokens: list[torch.Tensor] | None = None,
        grid: torch.Tensor | None = None,
    ) -> Any:
        """
        Args:
            x: ``(B, C, H, W[, D])`` image.
            guide: optional precomputed guide ``(B, 1, ...)`` (e.g. computed once per volume); skips the ViT.
            tokens, grid: optional ViT tokens cached for each sample's whole volume and the crop's sampling grid
                (see :class:`guidino_monai.engines.CachedGuidePrepareBatch`); skips the ViT, keeps the TokenBook.

        Returns:
            logits ``(B, out_channels, *spatial)`` in eval mode, ``(logits, guide)`` in training mode.
        """
        if not torch.jit.is_tracing() and not torch.jit.is_scripting():
            check_spatial_shape(x, self.spatial_dims, self.size_divisor, type(self).__name__)
        g = self.compute_guide(x, guide, tokens, grid)
        gate = g is not None
        h = gate_features(x, g, self.gate_residual) if gate and self.gate_at == GateAt.INPUT else x
        h = self.convInit(h)
        if self.dropout_prob is not None:
            h = self.dropout(h)
        down_x = []
        for down in self.down_layers:
            h = down(h)
            down_x.append(h)
        if gate and self.gate_at == GateAt.BOTTLENECK:
            h = gate_features(h, g, self.gate_residual)
        down_x.reverse()
        for i, (up, upl) in enumerate(zip(self.up_samples, self.up_layers)):
            h = upl(up(h) + down_x[i + 1])
            if gate and self.gate_at == GateAt.DECODER:
                h = gate_features(h, g, self.gate_residual)
        if self.use_conv_final:
            h = self.conv_final(h)
        if gate and (self.training or self.return_guide):
            return h, g
        return h
