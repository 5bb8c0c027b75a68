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

"""Pieces shared by the guided networks: where the guide gates, input checks, and the guide-argument mixin."""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import torch
from monai.utils import StrEnum

from ...utils import as_bool
from ..blocks.guide import GateMode, GuideBranch

__all__ = ["GateAt", "GuideOptions", "check_spatial_shape"]


class GateAt(StrEnum):
    """Where the guide multiplies the backbone's features."""

    INPUT = "input"  # the network input, at full resolution
    BOTTLENECK = "bottleneck"  # the deepest encoder features
    DECODER = "decoder"  # every decoder stage's output (not the final logits)


def check_spatial_shape(x: torch.Tensor, spatial_dims: int, divisor: int, name: str) -> None:
    """Validate a network input: dims, 1-voxel-thin axes and divisibility, with messages a user can act on."""
    if x.ndim != spatial_dims + 2:
        axes = "H, W" if spatial_dims == 2 else "X, Y, Z"
        raise ValueError(
            f"{name} with spatial_dims={spatial_dims} expects input (B, C, {axes}),"
            f" got shape {tuple(x.shape)} with {x.ndim - 2} spatial dims."
        )
    spatial = tuple(x.shape[2:])
    thin = [i for i, s in enumerate(spatial) if s < 2]
    if thin:
        raise ValueError(
            f"{name} got a volume only 1 voxel thin along spatial axis {thin[0]} (shape {tuple(x.shape)});"
            f" use spatial_dims={spatial_dims - 1} for single slices{'' if spatial_dims == 3 else ' (not possible)'}."
        )
    bad = [s for s in spatial if s % divisor]
    if bad:
        raise ValueError(
            f"{name} needs every spatial size divisible by {divisor}, got {spatial}; pad the input first"
            f" (e.g. monai.transforms.DivisiblePad(k={divisor})) or use an ROI that is a multiple of {divisor}."
        )


class GuideOptions:
    """Shared constructor handling of the guide arguments of the guided networks (a mixin)."""

    guide: GuideBranch | None

    def _init_guide(
        self,
        use_guide: bool,
        spatial_dims: int,
        in_channels: int,
        guide_backbone: str,
        guide_backbone_kwargs: dict[str, Any] | None,
        pretrained_weights: str | os.PathLike | None,
        lora_rank: int,
        gate_at: GateAt | str,
        gate_mode: GateMode | str,
        guide_kwargs: dict[str, Any] | None,
    ) -> None:
        self.gate_at = GateAt(gate_at)
        self.gate_residual = GateMode(gate_mode) == GateMode.RESIDUAL
        self.use_guide = as_bool(use_guide, "use_guide")
        self.return_guide = False
        if not self.use_guide:  # the plain backbone, same recipe without the guide (for fair comparisons)
            self.guide = None
            return
        self.guide = GuideBranch(
            spatial_dims,
            in_channels,
            backbone=guide_backbone,
            backbone_kwargs=guide_backbone_kwargs,
            pretrained_weights=pretrained_weights,
            lora_rank=lora_rank,
            **dict(guide_kwargs or {}),
        )

    def guide_read_sizes(self, spatial_size: Sequence[int]) -> list[tuple[int, ...]]:
        """Grids at which a guide given for an input of ``spatial_size`` is read (resampled to gate features): the
        bottleneck's for ``gate_at="bottleneck"``; the input's for ``"input"`` and, as an upper bound, ``"decoder"``.
        Lets the sliding-window inferer skip guide slices that no window reads."""
        if self.gate_at == GateAt.BOTTLENECK:
            return [tuple(int(s) // self.size_divisor for s in spatial_size)]
        return [tuple(int(s) for s in spatial_size)]

    def compute_guide(
        self,
        x: torch.Tensor,
        guide: torch.Tensor | None,
        tokens: list[torch.Tensor] | None = None,
        grid: torch.Tensor | None = None,
    ) -> torch.Tensor | None:
        if not self.use_guide:
            return None
        if tokens is not None:
            if grid is None or tuple(grid.shape[1:-1]) != tuple(x.shape[2:]):
                raise ValueError("cached guide tokens need a sampling grid (B, *spatial, dims) matching the input.")
            return self.guide.guide_from_tokens(tokens, grid)
        if guide is None:
            return self.guide(x)
        if guide.ndim != x.ndim or guide.shape[0] != x.shape[0] or guide.shape[1] != 1:
            raise ValueError(
                f"a precomputed guide must be (B, 1, ...) like {tuple(x.shape)}, got {tuple(guide.shape)}."
            )
        return guide
