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
import torch.nn as nn
from monai.networks.nets import DynUNet

from ..backbones import DEFAULT_GUIDE_BACKBONE
from ..blocks.guide import GateMode, gate_features
from .guided_base import GateAt, GuideOptions

__all__ = ["GuidedDynUNet"]


class GuidedDynUNet(GuideOptions, DynUNet):
    """MONAI :class:`~monai.networks.nets.DynUNet` (the nnU-Net architecture) gated by a GuiDINO guide mask, 2D and 3D.

    Same contract as :class:`~guidino_monai.networks.GuidedSegResNet`: logits only in ``eval()``, ``(output, guide)``
    in training, where ``output`` is DynUNet's own training output: the logits, or with ``deep_supervision`` the
    stacked ``(B, 1 + deep_supr_num, C, *spatial)`` tensor of the main output and the heads (upsampled), which
    :class:`~guidino_monai.losses.GuidedDiceCELoss` takes as it is (segmentation and hinge terms at every head,
    weighted ``1, 1/2, 1/4, ...`` as nnU-Net does; the guide term once).

    The guide gates the input (``gate_at="input"``), the bottleneck's output (``"bottleneck"``) or every decoder
    stage's output (``"decoder"``) through forward hooks on DynUNet's own modules, so the state-dict keys are
    DynUNet's: ``use_guide=False`` loads a MONAI ``DynUNet`` checkpoint strictly.

    Args:
        spatial_dims ... trans_bias: as :class:`monai.networks.nets.DynUNet`.
        guide_backbone, guide_backbone_kwargs, pretrained_weights, lora_rank, gate_at, gate_mode, guide_kwargs,
            use_guide: as :class:`~guidino_monai.networks.GuidedSegResNet`.

    Raises:
        ValueError: bad arguments; at call time a wrong number of dims, sizes not divisible by the product of the
            strides along each axis, NaN/Inf in the image.

    Example::

        >>> net = GuidedDynUNet(2, 1, 2, kernel_size=[3, 3, 3], strides=[1, 2, 2], upsample_kernel_size=[2, 2],
        ...                     guide_backbone_kwargs={"depth": 2}).eval()
        >>> net(torch.rand(1, 1, 64, 64)).shape
        torch.Size([1, 2, 64, 64])
    """

    def __init__(
        self,
        spatial_dims: int,
        in_channels: int,
        out_channels: int,
        kernel_size: Sequence[Sequence[int] | int],
        strides: Sequence[Sequence[int] | int],
        upsample_kernel_size: Sequence[Sequence[int] | int],
        filters: Sequence[int] | None = None,
        dropout: tuple | str | float | None = None,
        norm_name: tuple | str = ("INSTANCE", {"affine": True}),
        act_name: tuple | str = ("leakyrelu", {"inplace": True, "negative_slope": 0.01}),
        deep_supervision: bool = False,
        deep_supr_num: int = 1,
        res_block: bool = False,
        trans_bias: bool = False,
        guide_backbone: str = DEFAULT_GUIDE_BACKBONE,
        guide_backbone_kwargs: dict[str, Any] | None = None,
        pretrained_weights: str | os.PathLike | None = None,
        lora_rank: int = 0,
        gate_at: GateAt | str = GateAt.BOTTLENECK,
        gate_mode: GateMode | str = GateMode.RESIDUAL,
        guide_kwargs: dict[str, Any] | None = None,
        use_guide: bool = True,
    ) -> None:
        if spatial_dims not in (2, 3):
            raise ValueError(f"`spatial_dims` can only be 2 or 3, got {spatial_dims}.")
        DynUNet.__init__(
            self,
            spatial_dims=spatial_dims,
            in_channels=in_channels,
            out_channels=out_channels,
            kernel_size=kernel_size,
            strides=strides,
            upsample_kernel_size=upsample_kernel_size,
            filters=filters,
            dropout=dropout,
            norm_name=norm_name,
            act_name=act_name,
            deep_supervision=deep_supervision,
            deep_supr_num=deep_supr_num,
            res_block=res_block,
            trans_bias=trans_bias,
        )
        self._init_guide(
            use_guide, spatial_dims, in_channels, guide_backbone, guide_backbone_kwargs, pretrained_weights, lora_rank,
            gate_at, gate_mode, guide_kwargs,
        )  # fmt: skip
        divisors = [1] * spatial_dims
        for s in strides:
            per_axis = [int(s)] * spatial_dims if isinstance(s, int) else [int(v) for v in s]
            divisors = [d * v for d, v in zip(divisors, per_axis)]
        self.axis_divisors = tuple(divisors)
        self._gate_guide: torch.Tensor | None = None
        if self.use_guide and self.gate_at == GateAt.BOTTLENECK:
            self.bottleneck.register_forward_hook(self._gate_hook)
        elif self.use_guide and self.gate_at == GateAt.DECODER:
            for up in self.upsamples:
                up.register_forward_hook(self._gate_hook)

    def _gate_hook(self, module: nn.Module, args: Any, output: torch.Tensor) -> torch.Tensor | None:
        if self._gate_guide is None:
            return None
        return gate_features(output, self._gate_guide, self.gate_residual)

    def guide_read_sizes(self, spatial_size: Sequence[int]) -> list[tuple[int, ...]]:
        """Grids at which the guide is read: the bottleneck's for ``gate_at="bottleneck"``, else (an upper bound)
        the input's."""
        if self.gate_at == GateAt.BOTTLENECK:
            return [tuple(int(s) // d for s, d in zip(spatial_size, self.axis_divisors))]
        return [tuple(int(s) for s in spatial_size)]

    def _check(self, x: torch.Tensor) -> None:
        name = type(self).__name__
        if x.ndim != self.spatial_dims + 2:
            raise ValueError(
                f"{name} with spatial_dims={self.spatial_dims} expects (B, C, *spatial), got {tuple(x.shape)}."
            )
        bad = [(s, d) for s, d in zip(x.shape[2:], self.axis_divisors) if int(s) % d]
        if bad:
            raise ValueError(
                f"{name} needs spatial sizes divisible by {self.axis_divisors} (the strides' products per axis), got"
                f" {tuple(x.shape[2:])}; pad the input first (monai.transforms.DivisiblePad) or change the ROI."
            )

    def forward(  # type: ignore[override]
        self,
        x: torch.Tensor,
        guide: torch.Tensor | None = None,
        tokens: list[torch.Tensor] | None = None,
        grid: torch.Tensor | None = None,
    ) -> Any:
        """See :meth:`GuidedSegResNet.forward`; in training with ``deep_supervision`` the first element of the pair
        is DynUNet's stacked deep-supervision output."""
        if not torch.jit.is_tracing() and not torch.jit.is_scripting():
            self._check(x)
        g = self.compute_guide(x, guide, tokens, grid)
        if g is None:
            return DynUNet.forward(self, x)
        h = gate_features(x, g, self.gate_residual) if self.gate_at == GateAt.INPUT else x
        self._gate_guide = g
        try:
            out = DynUNet.forward(self, h)
        finally:
            self._gate_guide = None
        if self.training or self.return_guide:
            return out, g
        return out
