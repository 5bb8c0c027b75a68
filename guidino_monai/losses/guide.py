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

"""Losses for GuiDINO: guide-mask supervision, a boundary hinge on logits, and their composition with DiceCE.

GuiDINO (Liang et al., "GuiDINO: Rethinking Vision Foundation Model in Medical Image Segmentation",
https://arxiv.org/abs/2603.01115) trains the segmentation network together with a guide supervision objective that
aligns the guide mask to the ground-truth region, optionally with a boundary-focused hinge loss.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F
from monai.losses import DiceCELoss
from monai.networks.utils import one_hot
from monai.utils import LossReduction, StrEnum, look_up_option
from torch.nn.modules.loss import _Loss

__all__ = [
    "GuideLossMode",
    "split_guided_output",
    "boundary_band",
    "GuideSupervisionLoss",
    "BoundaryHingeLoss",
    "GuidedDiceCELoss",
]

_LINEAR_MODES = {1: "linear", 2: "bilinear", 3: "trilinear"}
_MAX_POOL = {1: F.max_pool1d, 2: F.max_pool2d, 3: F.max_pool3d}


class GuideLossMode(StrEnum):
    """
    Pointwise objective of :py:class:`GuideSupervisionLoss`.

    - ``"mse"``: mean squared error, as in the GuiDINO paper.
    - ``"bce"``: binary cross-entropy on the (probability-valued) guide.
    - ``"dice"``: soft Dice loss between the guide and the foreground fraction.
    """

    MSE = "mse"
    BCE = "bce"
    DICE = "dice"


def _plain(x: torch.Tensor) -> torch.Tensor:
    """Drop tensor subclasses such as ``MetaTensor`` (keeps the autograd graph) so that internal ops stay cheap."""
    if type(x) is not torch.Tensor:
        return x.as_subclass(torch.Tensor)
    return x


def split_guided_output(output: torch.Tensor | Sequence | Mapping) -> tuple[torch.Tensor, torch.Tensor | None]:
    """
    Split the output of a guided network into ``(logits, guide)``.

    In training mode the guided networks return ``(logits, guide)``; in eval mode they return the logits only.
    Dictionaries with the keys ``"pred"`` and (optionally) ``"guide"`` are accepted as well.

    Args:
        output: a tensor ``BNH[WD]`` (the guide is then ``None``), a 2-element tuple/list ``(logits, guide)`` where
            ``guide`` is a tensor ``B1H[WD]`` or ``None``, or a mapping with the key ``"pred"`` and an optional key
            ``"guide"``.

    Raises:
        TypeError: When ``output`` is none of the above, or its logits are not a tensor or its guide is neither a
            tensor nor ``None``.

    Returns:
        ``(logits, guide)``, with ``guide`` set to ``None`` when the output carries no guide.

    Example:
        >>> logits, guide = split_guided_output((torch.zeros(2, 3, 8, 8), torch.zeros(2, 1, 4, 4)))
        >>> split_guided_output(torch.zeros(2, 3, 8, 8))[1] is None
        True
    """
    if isinstance(output, torch.Tensor):
        return output, None
    if isinstance(output, Mapping):
        if "pred" not in output:
            raise TypeError(f"a guided output dict must have the key 'pred', got keys {sorted(map(str, output))}.")
        logits, guide = output["pred"], output.get("guide")
    elif isinstance(output, (tuple, list)):
        if len(output) != 2:
            raise TypeError(f"a guided output sequence must be (logits, guide), got {len(output)} elements.")
        logits, guide = output
    else:
        raise TypeError(
            "expected a tensor, a (logits, guide) tuple/list or a dict with keys 'pred' and 'guide', "
            f"got {type(output).__name__}."
        )
    if not isinstance(logits, torch.Tensor):
        raise TypeError(f"the logits of a guided output must be a tensor, got {type(logits).__name__}.")
    if guide is not None and not isinstance(guide, torch.Tensor):
        raise TypeError(f"the guide of a guided output must be a tensor or None, got {type(guide).__name__}.")
    return logits, guide


def _resize_to_grid(x: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """
    Resample ``x`` (``BCH[WD]``, float) to the spatial ``size``.

    Dimensions that shrink are area-averaged (each output value is the mean of the input cell it covers, i.e. the
    foreground fraction for a binary mask). Dimensions that grow are then linearly interpolated
    (``align_corners=False``), so any pair of sizes works and the values stay within the input's range.
    """
    in_size = tuple(x.shape[2:])
    size = tuple(int(s) for s in size)
    if in_size == size:
        return x
    shrunk = tuple(min(i, o) for i, o in zip(in_size, size))
    if shrunk != in_size:
        x = F.interpolate(x, size=shrunk, mode="area")
    if shrunk != size:
        x = F.interpolate(x, size=size, mode=_LINEAR_MODES[len(size)], align_corners=False)
    return x


def boundary_band(mask: torch.Tensor, band_width: int = 1) -> torch.Tensor:
    """
    Boundary band of a binary mask: morphological dilation minus erosion with a cubic structuring element.

    Both operations are max-poolings with kernel ``2 * band_width + 1``, stride 1 and same padding (erosion is
    ``-maxpool(-mask)``), so a voxel is in the band when its ``(2 * band_width + 1)``-neighbourhood (Chebyshev
    distance ``<= band_width``) contains both foreground and background. The padding is ignored by the pooling, so
    the image border is not treated as a boundary: a mask touching the border has no band along it, and a full or
    empty mask has an empty band.

    Args:
        mask: binary mask ``BCH[WD]`` (bool, integer or float with values in {0, 1}), 1 to 3 spatial dimensions.
        band_width: half-width of the structuring element, at least 1. Defaults to ``1``.

    Raises:
        ValueError: When ``band_width < 1`` or ``mask`` does not have 1 to 3 spatial dimensions.

    Returns:
        a bool tensor with the shape of ``mask``, True inside the band.

    Example:
        >>> m = torch.zeros(1, 1, 7, 7)
        >>> m[..., 2:5, 2:5] = 1
        >>> int(boundary_band(m, 1).sum())  # 5x5 dilation minus the single eroded centre voxel
        24
    """
    if int(band_width) != band_width or band_width < 1:
        raise ValueError(f"band_width must be a positive integer, got {band_width}.")
    spatial_dims = mask.ndim - 2
    if spatial_dims not in _MAX_POOL:
        raise ValueError(f"mask must be BCH[WD] with 1 to 3 spatial dimensions, got shape {tuple(mask.shape)}.")
    band_width = int(band_width)
    pool = _MAX_POOL[spatial_dims]
    m = _plain(mask).float()
    kernel = 2 * band_width + 1
    dilated = pool(m, kernel_size=kernel, stride=1, padding=band_width)
    eroded = -pool(-m, kernel_size=kernel, stride=1, padding=band_width)
    return (dilated - eroded) > 0.5


def _reduce(per_item: torch.Tensor, reduction: str, ndim: int) -> torch.Tensor:
    """Reduce a ``(B, C)`` loss per ``reduction``; ``"none"`` returns the broadcastable ``(B, C, 1, ...)``."""
    if reduction == LossReduction.MEAN.value:
        return per_item.mean()
    if reduction == LossReduction.SUM.value:
        return per_item.sum()
    return per_item.reshape(per_item.shape + (1,) * (ndim - 2))


class GuideSupervisionLoss(_Loss):
    """
    Guide supervision loss of GuiDINO: aligns the guide mask with the ground-truth foreground on the guide grid.

    The foreground of ``target`` is resampled to the guide grid by area averaging, so each target value is the
    foreground fraction of the guide cell (linear interpolation is used along dimensions where the guide grid is
    larger than the label). The guide is then compared to it with MSE (the paper's choice), BCE or soft Dice, per
    sample. Works for any number of spatial dimensions from 1 to 3 (2D images and 3D volumes).

    See: Liang et al., "GuiDINO: Rethinking Vision Foundation Model in Medical Image Segmentation",
    https://arxiv.org/abs/2603.01115.

    Args:
        mode: {``"mse"``, ``"bce"``, ``"dice"``} the pointwise objective, see :py:class:`GuideLossMode`.
            Defaults to ``"mse"``.
        reduction: {``"none"``, ``"mean"``, ``"sum"``} how the per-sample losses are reduced. ``"none"`` returns the
            per-sample losses with the broadcastable shape ``(B, 1, 1, ...)``. Defaults to ``"mean"``.
        smooth_nr: constant added to the numerator of the Dice ratio (``"dice"`` mode only). Defaults to ``1e-5``.
        smooth_dr: constant added to the denominator of the Dice ratio (``"dice"`` mode only). Defaults to ``1e-5``.

    Raises:
        ValueError: When ``mode`` or ``reduction`` is not one of the supported options.

    Example:
        >>> loss = GuideSupervisionLoss(mode="mse")
        >>> guide = torch.rand(2, 1, 16, 16, 48)  # guide grid of a 2x3x64x64x48 prediction
        >>> label = torch.randint(0, 3, (2, 1, 64, 64, 48))
        >>> loss(guide, label).shape
        torch.Size([])
    """

    eps: float = 1e-6

    def __init__(
        self,
        mode: GuideLossMode | str = GuideLossMode.MSE,
        reduction: LossReduction | str = LossReduction.MEAN,
        smooth_nr: float = 1e-5,
        smooth_dr: float = 1e-5,
    ) -> None:
        super().__init__(reduction=LossReduction(reduction).value)
        self.mode = look_up_option(mode, GuideLossMode)
        self.smooth_nr = float(smooth_nr)
        self.smooth_dr = float(smooth_dr)

    @staticmethod
    def foreground(target: torch.Tensor) -> torch.Tensor:
        """
        Binary (or soft, for soft one-hot input) foreground map ``B1H[WD]`` of ``target`` as float32.

        Args:
            target: a label map ``B1H[WD]`` (foreground: value > 0) or one-hot ``BNH[WD]`` with ``N > 1``
                (foreground: sum of the channels ``1..N-1``, clamped to 1).
        """
        target = _plain(target)
        if target.shape[1] == 1:
            return (target > 0).float()
        return target[:, 1:].float().sum(dim=1, keepdim=True).clamp(0.0, 1.0)

    def forward(self, guide: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """
        Args:
            guide: the guide mask ``B1G[G'G'']`` with values in [0, 1], on any grid with as many spatial dimensions as
                ``target``.
            target: a label map ``B1H[WD]`` (integer classes, foreground is value > 0) or a one-hot ``BNH[WD]``
                with ``N > 1`` (foreground is the union of the channels ``1..N-1``).

        Raises:
            ValueError: When ``guide`` does not have 1 channel, or the number of spatial dimensions or the batch
                size of ``guide`` and ``target`` differ, or there are not 1 to 3 spatial dimensions.

        Returns:
            a scalar for ``"mean"``/``"sum"``, or ``(B, 1, 1, ...)`` for ``"none"``; always float32.
        """
        guide, target = _plain(guide), _plain(target)
        if guide.ndim != target.ndim or guide.ndim - 2 not in _LINEAR_MODES:
            raise ValueError(
                "guide and target must have the same number of spatial dimensions (1 to 3), "
                f"got guide shape {tuple(guide.shape)} and target shape {tuple(target.shape)}."
            )
        if guide.shape[0] != target.shape[0]:
            raise ValueError(
                f"batch sizes differ: guide shape {tuple(guide.shape)} and target shape {tuple(target.shape)}."
            )
        if guide.shape[1] != 1:
            raise ValueError(f"guide must have 1 channel (B1H[WD]), got guide shape {tuple(guide.shape)}.")

        fg = _resize_to_grid(self.foreground(target).to(guide.device), guide.shape[2:])
        g = guide.float()  # float32 math keeps the loss autocast-safe
        reduce_dims = tuple(range(1, g.ndim))
        if self.mode == GuideLossMode.MSE:
            per_sample = (g - fg).pow(2).mean(dim=reduce_dims)
        elif self.mode == GuideLossMode.BCE:
            p = g.clamp(self.eps, 1.0 - self.eps)
            per_sample = -(fg * torch.log(p) + (1.0 - fg) * torch.log1p(-p)).mean(dim=reduce_dims)
        else:
            intersection = (g * fg).sum(dim=reduce_dims)
            denominator = g.sum(dim=reduce_dims) + fg.sum(dim=reduce_dims)
            per_sample = 1.0 - (2.0 * intersection + self.smooth_nr) / (denominator + self.smooth_dr)
        return _reduce(per_sample[:, None], self.reduction, g.ndim)


class BoundaryHingeLoss(_Loss):
    """
    Boundary-focused hinge loss on logits, as proposed by GuiDINO to sharpen fine structures.

    For each class channel ``c`` the boundary band of the class mask is found by max-pool dilation minus erosion
    (see :py:func:`boundary_band`). Inside the band, with ``s = +1`` inside class ``c`` and ``s = -1`` outside, each
    voxel costs ``relu(margin - s * m_c)``, where the margin score ``m_c`` is

    - ``logit_c - max_{c' != c} logit_c'`` with ``softmax=True`` (multi-class logits),
    - ``logit_c`` otherwise (``sigmoid=True``: independent per-class logits; also used for a single-channel input,
      which is a binary foreground logit).

    The voxel costs are averaged over the band of each (sample, class); an empty band contributes 0. The resulting
    ``(B, C)`` values are reduced per ``reduction``.

    See: Liang et al., "GuiDINO: Rethinking Vision Foundation Model in Medical Image Segmentation",
    https://arxiv.org/abs/2603.01115.

    Args:
        band_width: half-width of the band (Chebyshev distance to the boundary), at least 1. Defaults to ``1``.
        margin: hinge margin on the logit scale, at least 0. Defaults to ``1.0``.
        include_background: if False, channel 0 (background) is excluded. Ignored for single-channel input.
            Defaults to ``False``.
        to_onehot_y: whether ``target`` is a label map ``B1H[WD]`` to be converted to one-hot with ``N`` classes.
            Ignored for single-channel input. Defaults to ``True``.
        sigmoid: if True, the logits are independent per-class (sigmoid) logits. Defaults to ``False``.
        softmax: if True, the logits are multi-class (softmax) logits. Ignored for single-channel input.
            Defaults to ``True``.
        reduction: {``"none"``, ``"mean"``, ``"sum"``} reduction over samples and classes; ``"none"`` returns the
            broadcastable shape ``(B, C, 1, ...)``. Defaults to ``"mean"``.

    Raises:
        ValueError: When both ``sigmoid`` and ``softmax`` are True, ``band_width < 1``, ``margin < 0`` or
            ``reduction`` is not supported.

    Example:
        >>> loss = BoundaryHingeLoss(band_width=1, to_onehot_y=True, softmax=True)
        >>> logits = torch.randn(2, 3, 32, 32, requires_grad=True)
        >>> label = torch.randint(0, 3, (2, 1, 32, 32))
        >>> loss(logits, label).backward()
    """

    def __init__(
        self,
        band_width: int = 1,
        margin: float = 1.0,
        include_background: bool = False,
        to_onehot_y: bool = True,
        sigmoid: bool = False,
        softmax: bool = True,
        reduction: LossReduction | str = LossReduction.MEAN,
    ) -> None:
        super().__init__(reduction=LossReduction(reduction).value)
        if sigmoid and softmax:
            raise ValueError("Incompatible values: sigmoid=True and softmax=True.")
        if int(band_width) != band_width or band_width < 1:
            raise ValueError(f"band_width must be a positive integer, got {band_width}.")
        if margin < 0:
            raise ValueError(f"margin should be no less than 0.0, got {margin}.")
        self.band_width = int(band_width)
        self.margin = float(margin)
        self.include_background = include_background
        self.to_onehot_y = to_onehot_y
        self.sigmoid = sigmoid
        self.softmax = softmax

    def forward(self, input: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """
        Args:
            input: logits ``BNH[WD]`` with 1 to 3 spatial dimensions.
            target: a label map ``B1H[WD]`` (``to_onehot_y=True`` or single-channel input) or one-hot ``BNH[WD]``.

        Raises:
            ValueError: When ``input`` and ``target`` differ in the number of dimensions, batch size or spatial
                shape, or the target's channels do not match (1 for label maps, ``N`` for one-hot).

        Returns:
            a float32 scalar for ``"mean"``/``"sum"``, or ``(B, C, 1, ...)`` for ``"none"`` where ``C`` counts the
            classes used.
        """
        input, target = _plain(input), _plain(target)
        shapes = f"got input shape {tuple(input.shape)} and target shape {tuple(target.shape)}."
        if input.ndim != target.ndim or input.ndim - 2 not in _MAX_POOL:
            raise ValueError(f"input and target must both be BNH[WD] with 1 to 3 spatial dimensions, {shapes}")
        if input.shape[0] != target.shape[0] or input.shape[2:] != target.shape[2:]:
            raise ValueError(f"input and target must have the same batch size and spatial shape, {shapes}")

        n_pred_ch = input.shape[1]
        logits = input.float()
        if n_pred_ch == 1:
            if self.softmax:
                warnings.warn("single channel prediction, `softmax=True` ignored.", stacklevel=2)
            if self.to_onehot_y:
                warnings.warn("single channel prediction, `to_onehot_y=True` ignored.", stacklevel=2)
            if not self.include_background:
                warnings.warn("single channel prediction, `include_background=False` ignored.", stacklevel=2)
            if target.shape[1] != 1:
                raise ValueError(f"a single-channel input needs a single-channel target, {shapes}")
            mask = target > (0 if self.to_onehot_y else 0.5)
            score = logits
        else:
            if self.to_onehot_y:
                if target.shape[1] != 1:
                    raise ValueError(f"to_onehot_y=True needs a label map target B1H[WD], {shapes}")
                mask = one_hot(target.to(input.device), num_classes=n_pred_ch, dim=1) > 0.5
            else:
                if target.shape[1] != n_pred_ch:
                    raise ValueError(f"a one-hot target must have as many channels as input, {shapes}")
                mask = target > 0.5
            if self.softmax:
                top2 = logits.topk(2, dim=1)
                channels = torch.arange(n_pred_ch, device=logits.device).view((1, n_pred_ch) + (1,) * (input.ndim - 2))
                best_other = torch.where(channels == top2.indices[:, :1], top2.values[:, 1:2], top2.values[:, :1])
                score = logits - best_other
            else:
                score = logits
            if not self.include_background:
                mask, score = mask[:, 1:], score[:, 1:]

        mask = mask.to(logits.device)
        band = boundary_band(mask, self.band_width).to(logits.dtype)
        sign = mask.to(logits.dtype) * 2.0 - 1.0
        cost = F.relu(self.margin - sign * score) * band
        spatial = tuple(range(2, logits.ndim))
        per_item = cost.sum(dim=spatial) / band.sum(dim=spatial).clamp(min=1.0)
        return _reduce(per_item, self.reduction, logits.ndim)


class GuidedDiceCELoss(_Loss):
    """
    DiceCE loss of the segmentation plus GuiDINO's guide supervision and (optionally) boundary hinge terms::

        loss = DiceCELoss(logits, target)                   # lambda_dice * Dice + lambda_ce * CE
             + lambda_guide * GuideSupervisionLoss(guide, target)   # only when a guide is given
             + lambda_hinge * BoundaryHingeLoss(logits, target)     # only when lambda_hinge > 0

    ``input`` is what a guided network returns: ``(logits, guide)`` in training (or a dict with ``"pred"`` and
    ``"guide"``), the logits tensor alone in eval mode, in which case the guide term is skipped. All arguments are
    plain values, so the loss can be built from bundle JSON with
    ``"_target_": "guidino_monai.losses.GuidedDiceCELoss"``.

    See: Liang et al., "GuiDINO: Rethinking Vision Foundation Model in Medical Image Segmentation",
    https://arxiv.org/abs/2603.01115.

    Args:
        include_background: if False, channel 0 is excluded from Dice (and the hinge). Defaults to ``True``.
        to_onehot_y: whether to convert a ``B1H[WD]`` label map target to one-hot. Defaults to ``False``.
        sigmoid: apply a sigmoid to the prediction for Dice; the hinge uses per-class logits. Defaults to ``False``.
        softmax: apply a softmax to the prediction for Dice; the hinge uses multi-class margins.
            Defaults to ``False``.
        squared_pred: use squared prediction and target in the Dice denominator. Defaults to ``False``.
        jaccard: compute the Jaccard index (soft IoU) instead of Dice. Defaults to ``False``.
        reduction: {``"mean"``, ``"sum"``} reduction of every term. Defaults to ``"mean"``.
        smooth_nr: numerator smoothing of Dice and of the ``"dice"`` guide mode. Defaults to ``1e-5``.
        smooth_dr: denominator smoothing of Dice and of the ``"dice"`` guide mode. Defaults to ``1e-5``.
        batch: sum Dice intersections and unions over the batch before dividing. Defaults to ``False``.
        weight: per-class weights for CE and Dice (``pos_weight`` for single-channel BCE), a list or a tensor.
            Defaults to ``None``.
        lambda_dice: weight of the Dice term, at least 0. Defaults to ``1.0``.
        lambda_ce: weight of the cross-entropy term, at least 0. Defaults to ``1.0``.
        label_smoothing: label smoothing of the cross-entropy term, in [0, 1]. Defaults to ``0.0``.
        lambda_guide: weight of the guide supervision term, at least 0. Defaults to ``0.5``.
        guide_mode: {``"mse"``, ``"bce"``, ``"dice"``} objective of the guide term. Defaults to ``"mse"``.
        lambda_hinge: weight of the boundary hinge term, at least 0; 0 disables it. Defaults to ``0.0``.
        hinge_band_width: band half-width of the hinge term. Defaults to ``1``.
        hinge_margin: margin of the hinge term. Defaults to ``1.0``.

    Raises:
        ValueError: When a ``lambda_*`` is negative, ``guide_mode`` or ``reduction`` is unsupported (``"none"``
            is not supported, as in ``DiceCELoss``), or both ``sigmoid`` and ``softmax`` are True.

    Example:
        >>> loss = GuidedDiceCELoss(to_onehot_y=True, softmax=True, lambda_guide=0.5, lambda_hinge=0.1)
        >>> logits, guide = torch.randn(2, 3, 64, 64, 48), torch.rand(2, 1, 16, 16, 48)
        >>> label = torch.randint(0, 3, (2, 1, 64, 64, 48))
        >>> train_value = loss((logits, guide), label)  # DiceCE + 0.5 * guide + 0.1 * hinge
        >>> val_value = loss(logits, label)  # DiceCE + 0.1 * hinge
    """

    def __init__(
        self,
        include_background: bool = True,
        to_onehot_y: bool = False,
        sigmoid: bool = False,
        softmax: bool = False,
        squared_pred: bool = False,
        jaccard: bool = False,
        reduction: str = "mean",
        smooth_nr: float = 1e-5,
        smooth_dr: float = 1e-5,
        batch: bool = False,
        weight: Sequence[float] | float | torch.Tensor | None = None,
        lambda_dice: float = 1.0,
        lambda_ce: float = 1.0,
        label_smoothing: float = 0.0,
        lambda_guide: float = 0.5,
        guide_mode: GuideLossMode | str = GuideLossMode.MSE,
        lambda_hinge: float = 0.0,
        hinge_band_width: int = 1,
        hinge_margin: float = 1.0,
    ) -> None:
        super().__init__()
        for name, value in (
            ("lambda_dice", lambda_dice),
            ("lambda_ce", lambda_ce),
            ("lambda_guide", lambda_guide),
            ("lambda_hinge", lambda_hinge),
        ):
            if value < 0.0:
                raise ValueError(f"{name} should be no less than 0.0, got {value}.")
        if sigmoid and softmax:
            raise ValueError("Incompatible values: sigmoid=True and softmax=True.")
        if weight is not None and not isinstance(weight, torch.Tensor):
            weight = torch.as_tensor(weight, dtype=torch.float32)  # JSON lists -> tensor for CE and Dice
        self.dice_ce = DiceCELoss(
            include_background=include_background,
            to_onehot_y=to_onehot_y,
            sigmoid=sigmoid,
            softmax=softmax,
            squared_pred=squared_pred,
            jaccard=jaccard,
            reduction=reduction,
            smooth_nr=smooth_nr,
            smooth_dr=smooth_dr,
            batch=batch,
            weight=weight,
            lambda_dice=lambda_dice,
            lambda_ce=lambda_ce,
            label_smoothing=label_smoothing,
        )
        self.guide_loss = GuideSupervisionLoss(
            mode=guide_mode, reduction=reduction, smooth_nr=smooth_nr, smooth_dr=smooth_dr
        )
        self.hinge: BoundaryHingeLoss | None = None
        if lambda_hinge > 0.0:
            self.hinge = BoundaryHingeLoss(
                band_width=hinge_band_width,
                margin=hinge_margin,
                include_background=include_background,
                to_onehot_y=to_onehot_y,
                sigmoid=sigmoid,
                softmax=softmax,
                reduction=reduction,
            )
        self.lambda_guide = float(lambda_guide)
        self.lambda_hinge = float(lambda_hinge)

    def _segmentation_loss(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        loss: torch.Tensor = self.dice_ce(logits, target)
        if self.hinge is not None:
            loss = loss + self.lambda_hinge * self.hinge(logits, target)
        return loss

    def forward(self, input: torch.Tensor | Sequence | Mapping, target: torch.Tensor) -> torch.Tensor:
        """
        Args:
            input: logits ``BNH[WD]`` (eval/validation), or the guided network's training output ``(logits, guide)``
                (with deep supervision the logits are ``B(1+K)NH[WD]``, DynUNet's stacked heads: the DiceCE and hinge
                terms are taken at every head and weighted ``1, 1/2, 1/4, ...`` (normalised), the guide term once)
                / ``{"pred": logits, "guide": guide}`` with ``guide`` of shape ``B1G[G'G'']`` in [0, 1].
            target: a label map ``B1H[WD]`` or one-hot ``BNH[WD]``, as for ``monai.losses.DiceCELoss``.

        Raises:
            TypeError: When ``input`` is not a tensor, a ``(logits, guide)`` pair or a dict (see
                :py:func:`split_guided_output`).
            ValueError: When the shapes of ``input``, ``guide`` and ``target`` are inconsistent.

        Returns:
            the total loss, a scalar.
        """
        logits, guide = split_guided_output(input)
        if logits.ndim == target.ndim + 1:  # deep supervision: (B, 1 + heads, C, *spatial), as DynUNet stacks it
            heads = logits.unbind(1)
            weights = [0.5**i for i in range(len(heads))]
            loss = sum(w * self._segmentation_loss(h, target) for w, h in zip(weights, heads)) / sum(weights)
        else:
            loss = self._segmentation_loss(logits, target)
        if guide is not None and self.lambda_guide > 0.0:
            loss = loss + self.lambda_guide * self.guide_loss(guide, target)
        return loss
