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
from monai.networks.layers.factories import Act, Norm
from monai.networks.nets import UNet

from ..backbones import DEFAULT_GUIDE_BACKBONE
from ..blocks.guide import GateMode, gate_features
from .guided_base import GateAt, GuideOptions, check_spatial_shape

__all__ = ["GuidedUNet"]


class _GuidedSkip(nn.Module):
    """MONAI's ``SkipConnection(submodule)`` (``cat([x, submodule(x)])``, same ``submodule`` key) that passes the
    guide down and may gate the bottom layer's output with it."""

    def __init__(self, submodule: nn.Module) -> None:
        super().__init__()
        self.submodule = submodule
        self.gate = False
        self.residual = True

    def forward(self, x: torch.Tensor, guide: torch.Tensor) -> torch.Tensor:
        if isinstance(self.submodule, _GuidedConnection):
            y = self.submodule(x, guide)
        else:  # the bottom layer
            y = self.submodule(x)
            if self.gate:
                y = gate_features(y, guide, self.residual)
        return torch.cat([x, y], dim=1)


class _GuidedConnection(nn.Sequential):
    """``down -> skip(subblock) -> up`` exactly as MONAI's ``nn.Sequential(down, SkipConnection(sub), up)`` (same
    state-dict keys, so MONAI ``UNet`` checkpoints load), with the guide passed down and optionally gating the
    decoder output."""

    def __init__(self, down: nn.Module, sub: nn.Module, up: nn.Module) -> None:
        super().__init__(down, _GuidedSkip(sub), up)
        self.gate = False
        self.residual = True

    def forward(self, x: torch.Tensor, guide: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        down, skip, up = self[0], self[1], self[2]
        u = up(skip(down(x), guide))
        if self.gate:
            u = gate_features(u, guide, self.residual)
        return u


class GuidedUNet(GuideOptions, UNet):
    """MONAI :class:`~monai.networks.nets.UNet` gated by a GuiDINO guide mask (2D and 3D).

    Same contract as :class:`~guidino_monai.networks.GuidedSegResNet`: logits only in ``eval()``, ``(logits,
    guide)`` in training. The state-dict keys of the UNet part are MONAI ``UNet``'s (``model.0.*``,
    ``model.1.submodule.*``, ...): ``use_guide=False`` loads a MONAI ``UNet`` checkpoint strictly, and a guided one
    loads it with only the ``guide.*`` keys missing. ``gate_at="input"`` gates the image, ``"bottleneck"`` the bottom
    layer's output, ``"decoder"`` each decoder stage except the top one (which emits the logits).

    Args:
        spatial_dims ... adn_ordering: as :class:`monai.networks.nets.UNet`.
        guide_backbone, guide_backbone_kwargs, pretrained_weights, lora_rank, gate_at, gate_mode, guide_kwargs,
            use_guide: as :class:`~guidino_monai.networks.GuidedSegResNet`.

    Raises:
        ValueError: bad arguments; at call time a wrong number of dims, a 1-voxel-thin axis, sizes not divisible by
            the product of ``strides``, NaN/Inf in the image.

    Example::

        >>> net = GuidedUNet(2, 1, 2, channels=(8, 16, 32), strides=(2, 2),
        ...                  guide_backbone_kwargs={"depth": 2}).eval()
        >>> net(torch.rand(1, 1, 64, 64)).shape
        torch.Size([1, 2, 64, 64])
    """

    def __init__(
        self,
        spatial_dims: int,
        in_channels: int,
        out_channels: int,
        channels: Sequence[int],
        strides: Sequence[int],
        kernel_size: Sequence[int] | int = 3,
        up_kernel_size: Sequence[int] | int = 3,
        num_res_units: int = 0,
        act: tuple | str = Act.PRELU,
        norm: tuple | str = Norm.INSTANCE,
        dropout: float = 0.0,
        bias: bool = True,
        adn_ordering: str = "NDA",
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
        UNet.__init__(
            self,
            spatial_dims=spatial_dims,
            in_channels=in_channels,
            out_channels=out_channels,
            channels=channels,
            strides=strides,
            kernel_size=kernel_size,
            up_kernel_size=up_kernel_size,
            num_res_units=num_res_units,
            act=act,
            norm=norm,
            dropout=dropout,
            bias=bias,
            adn_ordering=adn_ordering,
        )
        self._init_guide(
            use_guide, spatial_dims, in_channels, guide_backbone, guide_backbone_kwargs, pretrained_weights, lora_rank,
            gate_at, gate_mode, guide_kwargs,
        )  # fmt: skip
        self.spatial_dims = spatial_dims
        divisor = 1
        for s in list(strides)[: len(channels) - 1]:
            divisor *= int(s)
        self.size_divisor = divisor
        for m in self.model.modules():
            if isinstance(m, _GuidedSkip):
                bottom = not isinstance(m.submodule, _GuidedConnection)
                m.gate = self.use_guide and self.gate_at == GateAt.BOTTLENECK and bottom
                m.residual = self.gate_residual
            elif isinstance(m, _GuidedConnection):
                m.gate = self.use_guide and self.gate_at == GateAt.DECODER and m is not self.model
                m.residual = self.gate_residual

    def _get_connection_block(self, down_path: nn.Module, up_path: nn.Module, subblock: nn.Module) -> nn.Module:
        return _GuidedConnection(down_path, subblock, up_path)

    def forward(
        self,
        x: torch.Tensor,
        guide: torch.Tensor | None = None,
        tokens: list[torch.Tensor] | None = None,
        grid: torch.Tensor | None = None,
    ) -> Any:
        """See :meth:`GuidedSegResNet.forward`."""
        if not torch.jit.is_tracing() and not torch.jit.is_scripting():
            check_spatial_shape(x, self.spatial_dims, self.size_divisor, type(self).__name__)
        g = self.compute_guide(x, guide, tokens, grid)
        if g is None:
            return self.model(x, x.new_zeros(()))  # plain UNet: no gate reads the placeholder
        h = gate_features(x, g, self.gate_residual) if self.gate_at == GateAt.INPUT else x
        h = self.model(h, g)
        if self.training or self.return_guide:
            return h, g
        return h
