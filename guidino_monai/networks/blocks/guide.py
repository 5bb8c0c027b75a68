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

import hashlib
import math
import os
from collections import OrderedDict
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from monai.utils import StrEnum

from ...utils import as_bool
from ..backbones import DEFAULT_GUIDE_BACKBONE, create_guide_backbone
from .tokenbook import TokenBook

__all__ = [
    "GuideBranch",
    "IntensityScaling",
    "GateMode",
    "coords_to_grid",
    "crop_guide",
    "gate_features",
    "guide_slice_index",
    "guide_slice_positions",
    "resample_guide",
    "sample_guide",
]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class IntensityScaling(StrEnum):
    """How a medical image of any intensity range is mapped to [0, 1] before ImageNet normalisation."""

    PERCENTILE = "percentile"  # clip each sample to its (lo, hi) percentiles, then rescale
    MINMAX = "minmax"  # each sample's min/max
    WINDOW = "window"  # a fixed (lo, hi) window in raw units, e.g. a CT window, or (0, 1) for pre-scaled input
    NONE = "none"  # input is already in [0, 1]


class GateMode(StrEnum):
    """How the guide gates a feature map: ``feature * g`` or ``feature * (1 + g)``."""

    MULTIPLY = "multiply"
    RESIDUAL = "residual"


def _autocast_dtype(value: str | torch.dtype | None) -> torch.dtype | None:
    """``vit_dtype`` argument -> an autocast dtype, or ``None`` for the caller's precision."""
    names = {"bfloat16": torch.bfloat16, "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16,
             "half": torch.float16, "float32": None, "fp32": None, "none": None}  # fmt: skip
    if value is None or isinstance(value, torch.dtype) and value in (torch.bfloat16, torch.float16):
        return value
    if isinstance(value, torch.dtype) and value == torch.float32:
        return None
    if isinstance(value, str) and value.lower() in names:
        return names[value.lower()]
    raise ValueError(f"vit_dtype must be one of 'bfloat16', 'float16' or None, got {value!r}.")


def resample_guide(guide: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """Resample a guide ``(B, 1, *grid)`` to ``size`` ((bi/tri)linear; a no-op when the sizes match)."""
    mode = "bilinear" if guide.ndim == 4 else "trilinear"
    if torch.jit.is_tracing():  # keep sizes symbolic so a traced network accepts other input sizes
        return F.interpolate(guide, size=size, mode=mode, align_corners=False)
    if tuple(guide.shape[2:]) == tuple(size):
        return guide
    return F.interpolate(guide, size=tuple(int(s) for s in size), mode=mode, align_corners=False)


def coords_to_grid(coords: torch.Tensor, source_shape: Sequence[int]) -> torch.Tensor:
    """Voxel coordinates ``(B, dims, *spatial)`` in a volume of ``source_shape`` -> a ``grid_sample`` grid
    ``(B, *spatial, dims)`` (last axis in x, y[, z] order, ``align_corners=False`` convention)."""
    dims = coords.shape[1]
    size = torch.as_tensor(list(source_shape), dtype=coords.dtype, device=coords.device).view(1, dims, *([1] * dims))
    norm = (2.0 * coords + 1.0) / size - 1.0
    return norm.flip(1).movedim(1, -1)


def sample_guide(guide: torch.Tensor, grid: torch.Tensor) -> torch.Tensor:
    """Sample a guide ``(B, 1, *grid)`` that covers a whole volume at the points of ``grid`` (see
    :func:`coords_to_grid`). Equal to :func:`resample_guide` to the volume's size followed by the crop.

    A grid whose every coordinate varies along its own axis only (crops and flips, as in training with cached
    tokens) is sampled separably, one small matrix product per axis, which is much cheaper than ``grid_sample``
    forward and backward; any other grid (rotations, ...) goes through ``grid_sample``. Both give the same values."""
    if guide.shape[0] == 1 and grid.shape[0] == 1 and not torch.jit.is_tracing():
        lines = _axis_lines(grid[0])
        if lines is not None:
            out = guide[0]  # (1, *grid): contract each guide axis with its (L_d, n_d) interpolation matrix
            for d, u in enumerate(lines):
                w = _interp_matrix(((u.double() + 1.0) * guide.shape[2 + d] - 1.0) / 2.0, int(guide.shape[2 + d]))
                out = torch.tensordot(out, w.to(guide.dtype), dims=([1], [1]))
            return out.unsqueeze(0)
    return F.grid_sample(guide, grid.to(guide.dtype), mode="bilinear", padding_mode="border", align_corners=False)


def _axis_lines(grid: torch.Tensor) -> list[torch.Tensor] | None:
    """For a grid ``(*spatial, dims)`` whose coordinate along guide axis ``d`` depends on output axis ``d`` only, the
    per-axis lines of coordinates (normalised); otherwise ``None``."""
    dims = grid.shape[-1]
    lines = []
    for d in range(dims):
        comp = grid[..., dims - 1 - d]  # grid_sample's last component indexes the guide's last axis
        line = comp[tuple(slice(None) if a == d else 0 for a in range(dims))]
        shape = [1] * dims
        shape[d] = -1
        if not torch.equal(comp, line.view(shape).expand_as(comp)):
            return None
        lines.append(line)
    return lines


def _interp_matrix(src: torch.Tensor, n_src: int) -> torch.Tensor:
    """``(len(src), n_src)`` weights of linear interpolation at fractional indices ``src`` (clamped to the border)."""
    src = src.clamp(0.0, n_src - 1)
    i0 = src.floor().long()
    i1 = (i0 + 1).clamp(max=n_src - 1)
    w1 = src - i0
    w = torch.zeros(len(src), n_src, dtype=src.dtype, device=src.device)
    rows = torch.arange(len(src), device=src.device)
    w.index_put_((rows, i0), 1.0 - w1, accumulate=True)
    w.index_put_((rows, i1), w1, accumulate=True)
    return w


def resample_matrix(n_src: int, n_full: int, start: int, length: int, device: torch.device) -> torch.Tensor:
    """``(length, n_src)`` weights of 1D linear resampling (``align_corners=False``, border clamping) of ``n_src``
    samples to ``n_full``, rows ``start .. start + length - 1`` (which may lie outside ``0 .. n_full - 1``)."""
    c = torch.arange(start, start + length, dtype=torch.float64, device=device)
    return _interp_matrix((c + 0.5) * (n_src / n_full) - 0.5, n_src)


def window_matrix(n_src: int, n_full: int, start: int, length: int, out: int, device: torch.device) -> torch.Tensor:
    """``(out, n_src)`` weights along one axis: ``n_src`` guide samples resampled to ``n_full``, rows ``start ..
    start + length - 1`` of that kept (a window), then resampled linearly to ``out`` samples as ``F.interpolate``
    (``align_corners=False``) does. ``out == length`` is the window itself."""
    w = resample_matrix(n_src, n_full, start, length, device)
    return w if out == length else resample_matrix(length, out, 0, out, device) @ w


def crop_guide(
    guide: torch.Tensor,
    start: Sequence[int],
    size: Sequence[int],
    full_shape: Sequence[int],
    out_size: Sequence[int] | None = None,
) -> torch.Tensor:
    """The box ``start .. start + size`` of ``guide (B, 1, *grid)`` resampled to ``full_shape``, without making the
    full-resolution guide: equal to ``resample_guide(guide, full_shape)`` cropped to the box (and to
    :func:`sample_guide` at the box's voxels; positions outside the volume take the border value). With
    ``out_size``, that box is then resampled to ``out_size`` as :func:`resample_guide` would (e.g. to the grid where a
    network gates, so that it need not resample a full-resolution window itself).

    The resampling is separable, so it runs as one small matrix product per axis instead of a ``grid_sample`` at every
    voxel of the box (the sliding-window inferer's per-window guide)."""
    out_size = size if out_size is None else out_size
    out = guide[:, 0]
    for d in range(len(full_shape)):  # each contraction moves the new axis to the end: after all, the order is back
        w = window_matrix(int(guide.shape[2 + d]), int(full_shape[d]), int(start[d]), int(size[d]), int(out_size[d]),
                          guide.device)  # fmt: skip
        out = torch.tensordot(out, w.to(guide.dtype), dims=([1], [1]))
    return out.unsqueeze(1)


def gate_features(x: torch.Tensor, guide: torch.Tensor, residual: bool = True) -> torch.Tensor:
    """Gate ``x (B, C, *spatial)`` by ``guide (B, 1, *grid)`` resampled to ``x``'s grid."""
    g = resample_guide(guide, x.shape[2:]).to(x.dtype)
    return x * (1.0 + g) if residual else x * g


def guide_slice_positions(size: int, stride: int) -> torch.Tensor:
    """Voxel positions (float64) along the slice axis of the ``ceil(size / stride)`` guide slices of a volume with
    ``size`` slices: slice ``j`` sits at ``(j + 0.5) * size / D' - 0.5``, the centre of its cell.

    This is the one convention of the package: the guide is computed from the image at these positions (linearly
    interpolated between voxels where a position falls between two), and every resampling of a guide to voxels
    (:func:`resample_guide`, :func:`crop_guide`, :func:`sample_guide`, the sliding-window inferer) reads slice ``j``
    there (``align_corners=False``). With ``size`` a multiple of ``stride`` it is ``j * stride + (stride - 1) / 2``,
    the middle of the block of voxels the slice stands for; with ``stride=1`` it is ``j``."""
    n = -(-int(size) // int(stride))
    return (torch.arange(n, dtype=torch.float64) + 0.5) * (int(size) / n) - 0.5


def guide_slice_index(position: float, size: int, stride: int) -> int:
    """The guide slice nearest to voxel ``position`` along the slice axis (inverse of :func:`guide_slice_positions`),
    e.g. for a click on that voxel."""
    n = -(-int(size) // int(stride))
    return min(max(int(math.floor((float(position) + 0.5) * n / int(size))), 0), n - 1)


class GuideBranch(nn.Module):
    """Frozen (or LoRA-tuned) DINO ViT + :class:`TokenBook`: medical image -> guide mask in ``[0, 1]``.

    2D images ``(B, C, H, W)`` go through the ViT directly. 3D volumes ``(B, C, X, Y, Z)`` are cut into 2D slices
    along ``slice_axis`` (``D' = ceil(Z / slice_stride)`` of them, at :func:`guide_slice_positions`), all slices of the
    batch run in one ViT call, and the per-slice guides are stacked back. The guide keeps the volume's axis order with
    the slice axis in place, so for ``slice_axis=2`` it is ``(B, 1, h, w, D')`` (``h, w`` the token grid).

    DINO input: intensity scaling (:class:`IntensityScaling`) -> 3 channels (1 channel repeated, 3 kept, otherwise the
    channel mean) -> resize (:meth:`dino_input_size`) -> ImageNet normalisation. By default (``keep_aspect``) a slice
    keeps its aspect ratio: its longer side becomes ``guide_size`` and the shorter one scales alike, each rounded to a
    multiple of the patch size, so a 400x270 ultrasound image gives a 32x22 token grid at ``guide_size=512`` (timm's
    ``dynamic_img_size`` takes non-square grids). Pixels are taken as square: resample anisotropic in-plane spacing
    first (``monai.transforms.Spacingd``), as the bundles do. Tokens are the ViT's normalised last hidden state (the
    final norm applied, as the GuiDINO authors use them), see ``token_norm``.

    Args:
        spatial_dims: 2 or 3.
        in_channels: channels of the medical image.
        backbone: timm DINOv2/DINOv3 name, see :data:`guidino_monai.networks.SUPPORTED_GUIDE_BACKBONES`. Defaults to
            the paper's DINOv3 ViT-S/16 ``"vit_small_patch16_dinov3"``.
        backbone_kwargs: extra ``timm.create_model`` kwargs (e.g. ``{"depth": 2}`` for tests).
        pretrained_weights: local weight file/folder, ``None`` = random init (logged as such).
        lora_rank: LoRA rank for the ViT blocks, ``0`` = frozen ViT (or fully trainable with
            ``backbone_kwargs={"freeze": False}``).
        guide_size: an int: the DINO input's longer side with ``keep_aspect`` (its size with ``keep_aspect=False``); a
            pair ``(h, w)``: that fixed size whatever the image's shape. Rounded up to multiples of the patch size.
            Defaults to 512 (2D) or 224 (3D slices).
        keep_aspect: keep each slice's aspect ratio in the DINO input (non-square token grids). Defaults to ``True``;
            ``False`` squashes every slice to ``guide_size`` x ``guide_size``.
        token_norm: apply the ViT's final norm to the tokens (its normalised hidden state, as the authors and timm's
            ``forward_features`` do). Defaults to ``True``.
        slice_axis: spatial axis (0, 1 or 2) that 3D volumes are sliced along. Defaults to ``2``.
        slice_stride: use every n-th slice. Defaults to ``1``.
        intensity_scaling: see :class:`IntensityScaling`. Defaults to ``"percentile"``.
        intensity_range: percentiles (``percentile``) or raw window (``window``). Defaults to ``(0.5, 99.5)``.
        feature_index: which ViT block's tokens to use (negative counts from the end); the blocks after it are not
            run. Defaults to ``-1``.
        vit_dtype: run the ViT under autocast to this dtype (``"bfloat16"`` or ``"float16"``) whatever the caller's
            precision, and hand its tokens on in the input's dtype; ``None`` (default) runs it in the caller's
            precision. On CPUs with bf16 instructions (AVX512-BF16, AMX) ``"bfloat16"`` about halves the ViT's time
            (see docs/performance.md) at ~0.3% relative token error. Not applied while tracing for TorchScript.
        token_cache_size: in eval mode with a frozen ViT, remember the tokens of up to this many recent ViT inputs
            (keyed by a hash of the input and the ViT weights' versions, so loading weights invalidates them): a
            validation set seen every epoch then runs the ViT once per image. The tokens are a function of the input,
            so results are unchanged. ``0`` (default) keeps nothing; each entry holds ``E * h * w`` floats per slice.
        num_prototypes, proj_channels, ema_momentum, sim_dropout, token_sample_rate: see :class:`TokenBook`.

    Raises:
        ValueError: bad arguments; at call time a wrong number of dims or non-finite values.
    """

    def __init__(
        self,
        spatial_dims: int,
        in_channels: int = 1,
        backbone: str = DEFAULT_GUIDE_BACKBONE,
        backbone_kwargs: dict[str, Any] | None = None,
        pretrained_weights: str | os.PathLike | None = None,
        lora_rank: int = 0,
        guide_size: int | Sequence[int] | None = None,
        keep_aspect: bool = True,
        token_norm: bool = True,
        slice_axis: int = 2,
        slice_stride: int = 1,
        intensity_scaling: IntensityScaling | str = IntensityScaling.PERCENTILE,
        intensity_range: Sequence[float] = (0.5, 99.5),
        feature_index: int = -1,
        num_prototypes: int = 8,
        proj_channels: int = 128,
        ema_momentum: float | None = None,
        sim_dropout: float = 0.0,
        token_sample_rate: float = 1.0,
        vit_dtype: str | torch.dtype | None = None,
        token_cache_size: int = 0,
    ) -> None:
        super().__init__()
        if token_cache_size < 0:
            raise ValueError(f"token_cache_size must be >= 0, got {token_cache_size}.")
        self.token_cache_size = int(token_cache_size)
        self._token_memo: OrderedDict[tuple, torch.Tensor] = OrderedDict()
        if spatial_dims not in (2, 3):
            raise ValueError(f"`spatial_dims` can only be 2 or 3, got {spatial_dims}.")
        if in_channels < 1:
            raise ValueError(f"in_channels must be >= 1, got {in_channels}.")
        if slice_axis not in (0, 1, 2):
            raise ValueError(f"slice_axis must be a spatial axis 0, 1 or 2, got {slice_axis}.")
        if slice_stride < 1:
            raise ValueError(f"slice_stride must be >= 1, got {slice_stride}.")
        if len(intensity_range) != 2 or intensity_range[0] >= intensity_range[1]:
            raise ValueError(f"intensity_range must be (low, high) with low < high, got {intensity_range}.")
        self.spatial_dims = spatial_dims
        self.in_channels = in_channels
        self.slice_axis = slice_axis
        self.slice_stride = slice_stride
        self.intensity_scaling = IntensityScaling(intensity_scaling)
        self.intensity_range = (float(intensity_range[0]), float(intensity_range[1]))
        self.lora_rank = lora_rank
        self.backbone = create_guide_backbone(
            backbone, pretrained_weights=pretrained_weights, lora_rank=lora_rank, **dict(backbone_kwargs or {})
        )
        self.pretrained = bool(pretrained_weights)
        patch = self.backbone.patch_embed.patch_size
        self.patch_size = (int(patch[0]), int(patch[1]))
        if guide_size is None:
            guide_size = 512 if spatial_dims == 2 else 224
        self.keep_aspect = as_bool(keep_aspect, "keep_aspect") and isinstance(guide_size, int)
        self.token_norm = as_bool(token_norm, "token_norm")
        gs = (guide_size, guide_size) if isinstance(guide_size, int) else tuple(guide_size)
        if len(gs) != 2 or min(gs) < 1:
            raise ValueError(f"guide_size must be an int or a pair, got {guide_size}.")
        self.guide_size = tuple(int(math.ceil(s / p) * p) for s, p in zip(gs, self.patch_size))
        n_blocks = len(self.backbone.blocks)
        if not -n_blocks <= feature_index < n_blocks:
            raise ValueError(f"feature_index {feature_index} out of range for a {n_blocks}-block ViT.")
        self.feature_index = feature_index % n_blocks
        self.vit_dtype = _autocast_dtype(vit_dtype)
        cfg = getattr(self.backbone, "pretrained_cfg", None) or {}
        mean, std = cfg.get("mean", IMAGENET_MEAN), cfg.get("std", IMAGENET_STD)
        self.register_buffer("pixel_mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("pixel_std", torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)
        self.token_book = TokenBook(
            self.backbone.embed_dim,
            num_prototypes=num_prototypes,
            proj_channels=proj_channels,
            ema_momentum=ema_momentum,
            sim_dropout=sim_dropout,
            token_sample_rate=token_sample_rate,
        )

    def dino_input_size(self, slice_shape: Sequence[int]) -> tuple[int, int]:
        """Size of the DINO input for a 2D slice of ``slice_shape`` ``(H, W)``: with ``keep_aspect`` the longer side
        becomes ``guide_size`` and the other one keeps the ratio (each a multiple of the patch size, at least one
        patch); otherwise ``guide_size`` itself."""
        if not self.keep_aspect:
            return self.guide_size
        h, w = (int(s) for s in slice_shape)
        scale = self.guide_size[0] / max(h, w)
        return tuple(max(p, int(round(n * scale / p)) * p) for n, p in zip((h, w), self.patch_size))

    def token_grid_for(self, slice_shape: Sequence[int]) -> tuple[int, int]:
        """Token grid ``(h, w)`` of the guide of a 2D slice of ``slice_shape``."""
        size = self.dino_input_size(slice_shape)
        return (size[0] // self.patch_size[0], size[1] // self.patch_size[1])

    def slice_shape(self, x: torch.Tensor) -> tuple[int, int]:
        """``(H, W)`` of the 2D slices of the batch ``x`` (the image itself in 2D)."""
        spatial = [int(s) for s in x.shape[2:]]
        if self.spatial_dims == 3:
            del spatial[self.slice_axis]
        return spatial[0], spatial[1]

    @property
    def vit_trainable(self) -> bool:
        """Whether any ViT weight is trained (LoRA adapters or ``freeze=False``): its tokens then change every step,
        so they get gradients and are never cached."""
        return any(p.requires_grad for p in self.backbone.parameters())

    def train(self, mode: bool = True) -> GuideBranch:
        """Train the TokenBook (and LoRA adapters) but keep the ViT in eval mode."""
        super().train(mode)
        self.backbone.eval()
        return self

    def check_input(self, x: torch.Tensor) -> None:
        """Raise ``ValueError`` for a wrong number of dims, wrong channels, or NaN/Inf values."""
        if x.ndim != self.spatial_dims + 2:
            raise ValueError(
                f"expected a {self.spatial_dims}D batch (B, C, {'H, W' if self.spatial_dims == 2 else 'X, Y, Z'}),"
                f" got shape {tuple(x.shape)} ({x.ndim - 2} spatial dims)."
            )
        if x.shape[1] != self.in_channels:
            raise ValueError(f"expected {self.in_channels} input channel(s), got {x.shape[1]} ({tuple(x.shape)}).")
        if not bool(torch.isfinite(x).all()):
            raise ValueError(f"input image of shape {tuple(x.shape)} contains NaN or Inf values.")

    def to_slices(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, C, X, Y, Z)`` -> ``(B * D', C, H, W)`` slices along ``slice_axis`` at :func:`guide_slice_positions`
        (2D input passes through)."""
        if self.spatial_dims == 2:
            return x
        v = self.pick_slices(x)
        return v.reshape(-1, *v.shape[2:])

    def pick_slices(self, x: torch.Tensor, idx: Sequence[int] | None = None) -> torch.Tensor:
        """The guide's slices of ``x (B, C, X, Y, Z)`` as ``(B, k, C, H, W)``: all ``D'`` or those in ``idx``, each
        the image at :func:`guide_slice_positions` (linear interpolation between the two nearest voxel slices)."""
        v = x.movedim(2 + self.slice_axis, 1)  # (B, S, C, H, W)
        if self.slice_stride == 1 and idx is None:
            return v  # every slice (no indexing: a traced network keeps a dynamic slice count)
        pos = guide_slice_positions(v.shape[1], self.slice_stride)
        if idx is not None:
            pos = pos[list(idx)]
        lo = pos.floor().clamp(0, v.shape[1] - 1)
        frac = (pos - lo).clamp(0.0, 1.0)
        lo_i = lo.long().tolist()
        if bool((frac == 0).all()):
            return v[:, lo_i]
        hi_i = (lo.long() + 1).clamp(max=v.shape[1] - 1).tolist()
        w = frac.to(v.dtype if v.is_floating_point() else torch.float32).to(v.device).view(1, -1, 1, 1, 1)
        return v[:, lo_i] * (1.0 - w) + v[:, hi_i] * w

    def from_slices(self, g: torch.Tensor, batch: int) -> torch.Tensor:
        """``(B * D', 1, h, w)`` -> ``(B, 1, ...)`` with the slice axis back in place (2D passes through)."""
        if self.spatial_dims == 2:
            return g
        g = g.reshape(batch, -1, *g.shape[2:])  # (B, D', h, w)
        return g.unsqueeze(1).movedim(2, 2 + self.slice_axis)

    def scale_intensity(self, x: torch.Tensor, reference: torch.Tensor | None = None) -> torch.Tensor:
        """Map each sample of ``(B, C, *spatial)`` to ``[0, 1]`` according to ``intensity_scaling``; the bounds
        (min/max, percentiles) come from ``reference`` when given (e.g. the whole volume ``x`` is part of)."""
        mode = self.intensity_scaling
        x = x.float()
        if mode == IntensityScaling.NONE:
            return x.clamp(0.0, 1.0)
        if mode == IntensityScaling.WINDOW:
            lo, hi = self.intensity_range
            return ((x - lo) / (hi - lo)).clamp(0.0, 1.0)
        flat = (x if reference is None else reference).reshape(x.shape[0], -1)
        if mode == IntensityScaling.MINMAX:
            lo, hi = flat.amin(1).float(), flat.amax(1).float()
        else:
            step = max(1, flat.shape[1] // 262144)  # percentiles from at most ~256k voxels per sample
            sample = flat[:, ::step].float()
            q = torch.tensor([self.intensity_range[0] / 100.0, self.intensity_range[1] / 100.0], device=x.device)
            lo, hi = torch.quantile(sample, q, dim=1)
        shape = (-1,) + (1,) * (x.ndim - 1)
        lo, hi = lo.view(shape), hi.view(shape)
        return ((x - lo) / (hi - lo).clamp_min(1e-6)).clamp(0.0, 1.0)

    def to_dino_input(self, slices: torch.Tensor) -> torch.Tensor:
        """``(N, C, H, W)`` in [0, 1] -> ``(N, 3, *dino_input_size)`` ImageNet-normalised."""
        if slices.shape[1] not in (1, 3):
            slices = slices.mean(1, keepdim=True)
        size = self.dino_input_size(slices.shape[2:])
        if torch.jit.is_tracing() or tuple(slices.shape[2:]) != size:
            # antialias=True filters when downscaling and equals plain bilinear when upscaling; a grey image is
            # resized once and repeated to 3 channels afterwards, not resized three times
            slices = F.interpolate(slices, size=size, mode="bilinear", align_corners=False, antialias=True)
        return (slices.expand(-1, 3, -1, -1) - self.pixel_mean) / self.pixel_std

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Image batch -> DINO patch tokens ``(B * D', E, h, w)`` (one ViT call for all slices of the batch)."""
        if self.spatial_dims == 2:
            return self.encode_slices(self.scale_intensity(x))
        v = self.scale_intensity(self.pick_slices(x), reference=x)  # bounds from the whole volume
        return self.encode_slices(v.reshape(-1, *v.shape[2:]))

    def num_guide_slices(self, x: torch.Tensor) -> int:
        """``D'``: how many slices of the 3D batch ``x`` the guide has (``ceil(size / slice_stride)``)."""
        return -(-int(x.shape[2 + self.slice_axis]) // self.slice_stride)

    def encode_slices(self, slices: torch.Tensor) -> torch.Tensor:
        """2D slices ``(N, C, H, W)`` already scaled to ``[0, 1]`` -> DINO patch tokens ``(N, E, h, w)``."""
        key = self._memo_key(slices)
        if key is not None and key in self._token_memo:
            self._token_memo.move_to_end(key)
            return self._token_memo[key]
        tokens = self._encode_slices(slices)
        if key is not None:
            self._token_memo[key] = tokens.detach()
            while len(self._token_memo) > self.token_cache_size:
                self._token_memo.popitem(last=False)
        return tokens

    def _memo_key(self, slices: torch.Tensor) -> tuple | None:
        """Key of the eval-mode token memo, ``None`` when the memo does not apply (off, training, trainable ViT,
        tracing)."""
        if (
            self.token_cache_size == 0
            or self.training
            or self.vit_trainable
            or torch.jit.is_tracing()
            or torch.jit.is_scripting()
        ):
            return None
        data = slices.detach().to("cpu", torch.float32).contiguous().numpy().tobytes()
        weights = tuple(p._version for p in self.backbone.parameters())
        return (hashlib.sha1(data).hexdigest(), tuple(slices.shape), str(slices.device), self.vit_dtype, weights)

    def _encode_slices(self, slices: torch.Tensor) -> torch.Tensor:
        dino_in = self.to_dino_input(slices)
        grad = torch.is_grad_enabled() and self.vit_trainable
        amp = self.vit_dtype is not None and not torch.jit.is_tracing()
        with torch.set_grad_enabled(grad), torch.autocast(dino_in.device.type, dtype=self.vit_dtype, enabled=amp):
            feats = self.backbone.forward_intermediates(
                dino_in, indices=[self.feature_index], norm=self.token_norm, intermediates_only=True,
                output_fmt="NCHW", stop_early=True,
            )  # fmt: skip
        return feats[0].to(dino_in.dtype) if amp else feats[0]

    def tokens_to_guide(
        self,
        tokens: torch.Tensor,
        batch: int,
        positive: torch.Tensor | None = None,
        negative: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Token maps ``(B * D', E, h, w)`` -> guide ``(B, 1, ...)`` through the TokenBook."""
        return self.from_slices(self.token_book(tokens, positive=positive, negative=negative), batch)

    def guide_from_tokens(self, tokens: Sequence[torch.Tensor], grid: torch.Tensor) -> torch.Tensor:
        """Guides of crops from token maps cached for whole volumes (the frozen-ViT training shortcut).

        Args:
            tokens: per sample, the ViT tokens of its whole volume, ``(D', E, h, w)`` (``(1, E, h, w)`` in 2D), as
                :meth:`encode` returns them for that volume alone.
            grid: ``(B, *crop, dims)`` sampling grid of the crop's voxels in their volume (:func:`coords_to_grid`).

        Returns:
            guide ``(B, 1, *crop)``: the whole-volume guide at the crop's voxels (gradients reach the TokenBook).
        """
        if len(tokens) != grid.shape[0]:
            raise ValueError(f"got {len(tokens)} token maps for a batch of {grid.shape[0]}.")
        out = []
        for i, t in enumerate(tokens):
            # the TokenBook is per token: run it only on the box of the token grid that the crop's grid reads
            # (a crop of a large volume reads a small part of it), and sample that box with the grid re-based on it
            t, g = self._token_box(t, grid[i : i + 1])
            out.append(sample_guide(self.tokens_to_guide(t.to(self.pixel_mean.dtype), batch=1), g))
        return torch.cat(out)

    def _token_box(self, tokens: torch.Tensor, grid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The part of a volume's token maps ``(D', E, h, w)`` that bilinear sampling at ``grid (1, *crop, dims)``
        reads (border clamping included), and the grid expressed in that part's own normalised coordinates."""
        dims = grid.shape[-1]
        if dims == 3:  # guide axes in volume order: the slice axis in place, the token grid in the other two
            sizes = [tokens.shape[2], tokens.shape[3]]
            sizes.insert(self.slice_axis, tokens.shape[0])
        else:
            sizes = [tokens.shape[2], tokens.shape[3]]
        new_grid, box = [], []
        for d, n in enumerate(sizes):
            x = grid[..., dims - 1 - d].double()  # grid_sample's last axis is x (the last spatial dim)
            u = ((x + 1.0) * n - 1.0) / 2.0  # guide index (align_corners=False)
            lo = int(min(max(math.floor(float(u.min())), 0), n - 1))
            hi = int(min(max(math.floor(float(u.max())) + 1, 0), n - 1))
            box.append((lo, hi + 1))
            new_grid.append((2.0 * (u - lo) + 1.0) / (hi + 1 - lo) - 1.0)
        if dims == 3:
            order = [d for d in range(3) if d != self.slice_axis]
            (s0, s1), (a0, a1), (b0, b1) = box[self.slice_axis], box[order[0]], box[order[1]]
            tokens = tokens[s0:s1, :, a0:a1, b0:b1]
        else:
            (a0, a1), (b0, b1) = box
            tokens = tokens[:, :, a0:a1, b0:b1]
        return tokens, torch.stack(new_grid[::-1], -1).to(grid.dtype)

    def forward(self, x: torch.Tensor, slices: Sequence[int] | None = None) -> torch.Tensor:
        """
        Args:
            x: ``(B, C, H, W)`` or ``(B, C, X, Y, Z)`` image of any intensity range.
            slices: 3D only: compute the guide on these of its ``D'`` slices only (indices into the guide's slice
                axis), leaving the others at 0. Intensity scaling still uses the whole volume, so each computed slice
                equals the same slice of the full guide. ``None`` (default) computes all. The sliding-window inferer
                uses this to skip slices that no window reads (see :meth:`GuidedSegResNet.guide_read_sizes`).

        Returns:
            guide mask ``(B, 1, h, w)`` or ``(B, 1, ...)`` (slice axis in place) with values in ``[0, 1]``.
        """
        if not torch.jit.is_tracing() and not torch.jit.is_scripting():
            self.check_input(x)
        if slices is None or self.spatial_dims == 2:
            return self.tokens_to_guide(self.encode(x), x.shape[0])
        n = self.num_guide_slices(x)
        idx = sorted({int(i) for i in slices})
        if any(i < 0 or i >= n for i in idx):
            raise ValueError(f"guide slice indices must lie in [0, {n}), got {idx}.")
        batch = x.shape[0]
        h, w = self.token_grid_for(self.slice_shape(x))
        out = torch.zeros(batch, n, h, w, dtype=self.pixel_mean.dtype, device=x.device)
        if idx:
            picked = self.pick_slices(x, idx)  # (B, k, C, H, W)
            v = self.scale_intensity(picked, reference=x)  # bounds from the whole volume, applied to k slices
            g = self.token_book(self.encode_slices(v.reshape(-1, *v.shape[2:])))  # (B * k, 1, h, w)
            out[:, idx] = g.reshape(batch, len(idx), h, w).to(out.dtype)
        return out.unsqueeze(1).movedim(2, 2 + self.slice_axis)
