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

"""Inferers for guided networks: the guide is computed once per volume, not once per sliding window."""

from __future__ import annotations

import copy
import itertools
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn as nn
from monai.data import MetaTensor
from monai.inferers import SlidingWindowInferer, sliding_window_inference
from monai.utils import BlendMode, PytorchPadMode, fall_back_tuple

from .networks.blocks.guide import crop_guide, resample_guide, window_matrix

__all__ = ["GuidedSlidingWindowInferer", "unwrap_network"]


def unwrap_network(network: nn.Module) -> nn.Module:
    """The module inside DDP / DataParallel / torch.compile wrappers."""
    while True:
        inner = getattr(network, "module", None) or getattr(network, "_orig_mod", None)
        if not isinstance(inner, nn.Module):
            return network
        network = inner


class GuidedSlidingWindowInferer(SlidingWindowInferer):
    """Sliding-window inference for guided (and plain) networks, with optional mirror test-time augmentation.

    For a guided network the guide mask is computed once on the whole image (one batched ViT call over all its
    slices, with intensity scaling taken from the whole volume rather than each window) at its token resolution;
    each window gets its part of it resampled to the window's voxels (:func:`~guidino_monai.networks.crop_guide`: a
    separable linear resampling, equal to resampling the whole guide to the image and cropping), so a window only runs
    the backbone and no full-resolution guide volume is ever made.
    A plain network (``use_guide=False`` or any MONAI network) gets ordinary sliding-window inference.

    A subclass of MONAI's :class:`~monai.inferers.SlidingWindowInferer`: windows, padding, blending, ``sw_device`` /
    ``device`` / ``cpu_thresh`` / ``buffer_steps`` are MONAI's. The guide is computed on the device of the network's
    guide branch (the volume's guide slices are moved there, e.g. a volume kept on the CPU with the network on a GPU)
    and each window's guide is moved to the window's device (``sw_device``).

    Args:
        roi_size, sw_batch_size, overlap, mode, sigma_scale, padding_mode, cval, sw_device, device, progress: as
            :class:`monai.inferers.SlidingWindowInferer`. ``mode`` defaults to ``"gaussian"``.
        mirror_axes: spatial axes (0-based) to mirror for test-time augmentation; the logits of the original and of
            every combination of mirrored axes are averaged. Defaults to ``()`` (no TTA).
        return_guide: return ``(logits, guide)`` with the guide at image resolution (``None`` for plain networks).
        guide_once: compute the guide once per image (default). ``False`` lets the network compute it per window
            (the reference path, for comparison).
        skip_unread_slices: 3D, guide once per image: run the ViT only on the slices that some window's guide is read
            from (default ``True``). A network gating at its bottleneck reads the guide on a grid 8-16x coarser than
            the window, so along the slice axis most slices' guide values are never used; the outputs are the same
            as with every slice computed. Needs the network's ``guide_read_sizes``; ``return_guide`` computes all.
    """

    def __init__(
        self,
        roi_size: Sequence[int] | int,
        sw_batch_size: int = 1,
        overlap: float = 0.25,
        mode: BlendMode | str = BlendMode.GAUSSIAN,
        sigma_scale: float = 0.125,
        padding_mode: PytorchPadMode | str = PytorchPadMode.CONSTANT,
        cval: float = 0.0,
        sw_device: torch.device | str | None = None,
        device: torch.device | str | None = None,
        progress: bool = False,
        mirror_axes: Sequence[int] = (),
        return_guide: bool = False,
        guide_once: bool = True,
        skip_unread_slices: bool = True,
        **kwargs: Any,
    ) -> None:
        super().__init__(
            roi_size, sw_batch_size=sw_batch_size, overlap=overlap, mode=mode, sigma_scale=sigma_scale,
            padding_mode=padding_mode, cval=cval, sw_device=sw_device, device=device, progress=progress, **kwargs,
        )  # fmt: skip
        self.mirror_axes = tuple(int(a) for a in mirror_axes)
        self.return_guide = return_guide
        self.guide_once = guide_once
        self.skip_unread_slices = skip_unread_slices

    def _flips(self) -> list[tuple[int, ...]]:
        combos: list[tuple[int, ...]] = [()]
        for r in range(1, len(self.mirror_axes) + 1):
            combos.extend(itertools.combinations(self.mirror_axes, r))
        return combos

    def read_guide_slices(self, net: nn.Module, spatial: Sequence[int], roi: Sequence[int]) -> list[int] | None:
        """Indices of the guide slices that some window of this inference reads, or ``None`` for all of them.

        Along the slice axis a window's guide is the separable linear resampling of the whole-image guide
        (:func:`crop_guide`), then the network resamples it (linearly) to the grids of ``guide_read_sizes``: a
        guide slice matters iff it has a nonzero weight in that product for some window. The windows' extents along
        the slice axis come from ``sliding_window_inference`` itself, run on a 1-voxel-wide proxy of the image.
        """
        guide = getattr(net, "guide", None)
        if not self.skip_unread_slices or len(spatial) != 3 or not hasattr(net, "guide_read_sizes") or guide is None:
            return None
        axis, size = guide.slice_axis, int(spatial[guide.slice_axis])
        n_low = -(-size // guide.slice_stride)
        extents: set[tuple[int, int]] = set()

        def record(x: torch.Tensor, windows: list, *a: Any, **k: Any) -> torch.Tensor:
            extents.update((int(w[2 + axis].start), int(w[2 + axis].stop)) for w in windows)
            return x

        proxy_roi = [roi[d] if d == axis else 1 for d in range(3)]
        proxy = torch.zeros(1, 1, *[size if d == axis else 1 for d in range(3)])
        sliding_window_inference(proxy, proxy_roi, 64, record, overlap=self.overlap, with_coord=True)
        read_sizes = [int(s[axis]) for s in net.guide_read_sizes(roi)]
        needed = torch.zeros(n_low, dtype=torch.bool)
        offset = max(int(roi[axis]) - size, 0) // 2
        for start, stop in extents:
            for m in read_sizes:  # the window's crop of the guide, resampled to the grid the network reads
                weights = window_matrix(n_low, size, start - offset, stop - start, m, torch.device("cpu"))
                needed |= (weights != 0).any(0)
        if axis in self.mirror_axes:  # a mirrored pass reads the mirrored slices of the guide
            needed |= needed.flip(0)
        return None if bool(needed.all()) else needed.nonzero().flatten().tolist()

    def __call__(
        self, inputs: torch.Tensor, network: nn.Module, *args: Any, guide: torch.Tensor | None = None, **kwargs: Any
    ) -> Any:
        """
        Args:
            inputs: ``(B, C, *spatial)`` image batch (a MetaTensor keeps its metadata on the outputs).
            network: a guided network in eval mode, or any segmentation network.
            guide: optional whole-image guide ``(B, 1, ...)`` at any resolution (e.g. its token grid, as
                :class:`~guidino_monai.interactive.ClickRefiner` makes it from cached tokens and clicks): used instead
                of computing one, so the ViT does not run.

        Returns:
            logits ``(B, N, *spatial)``, or ``(logits, guide)`` when ``return_guide`` is set.
        """
        spatial_dims = inputs.ndim - 2
        if any(a < 0 or a >= spatial_dims for a in self.mirror_axes):
            raise ValueError(f"mirror_axes {self.mirror_axes} out of range for {spatial_dims} spatial dims.")
        net = unwrap_network(network)
        guided = bool(getattr(net, "use_guide", False)) and getattr(net, "guide", None) is not None
        spatial = tuple(int(n) for n in inputs.shape[2:])
        roi = fall_back_tuple(self.roi_size, spatial)
        offsets = [max(r - n, 0) // 2 for r, n in zip(roi, spatial)]  # sliding_window_inference's own padding
        low = guide
        if guided and low is None and (self.guide_once or self.return_guide):
            plain = inputs.as_tensor() if isinstance(inputs, MetaTensor) else inputs  # no metadata tracking in the ViT
            slices = None if self.return_guide or not self.guide_once else self.read_guide_slices(net, spatial, roi)
            plain = plain.to(net.guide.pixel_mean.device)  # where the ViT is (the volume may stay on the CPU)
            low = net.guide(plain, slices=slices)  # (B, 1, *token grid): one ViT pass over (the read) slices
        with_coord = guided and low is not None and (self.guide_once or guide is not None)
        if with_coord:

            def predictor(x: torch.Tensor, windows: list, *a: Any, **k: Any) -> torch.Tensor:
                # each window's guide resampled from the image's low-resolution guide straight to the grid the
                # network gates on (its bottleneck): no full-resolution guide, neither for the image nor the window
                window = tuple(int(n) for n in x.shape[2:])
                read = net.guide_read_sizes(window) if hasattr(net, "guide_read_sizes") else [window]
                out_size = read[0] if len(read) == 1 else window
                guides = []
                for win in windows:
                    b = win[0].start
                    start = [w.start - o for w, o in zip(win[2:], offsets)]
                    size = [w.stop - w.start for w in win[2:]]
                    guides.append(crop_guide(low_flip[b : b + 1], start, size, spatial, out_size))
                return network(x, *a, guide=torch.cat(guides).to(x.device, x.dtype), **k)

        else:
            predictor = network  # type: ignore[assignment]
        total = None
        flips = self._flips()
        low_flip = low
        for axes in flips:
            dims = [a + 2 for a in axes]
            x = torch.flip(inputs, dims) if dims else inputs
            if low is not None:
                low_flip = torch.flip(low, dims) if dims else low
            out = self._sliding_window(x, predictor, with_coord, *args, **kwargs)
            out = torch.flip(out, dims) if dims else out
            total = out if total is None else total + out
        logits = total / len(flips) if len(flips) > 1 else total
        if not self.return_guide:
            return logits
        guide = None
        if low is not None:  # the guide as an output image: resampled to the image grid once
            guide = resample_guide(low.to(logits.device), spatial)
            if isinstance(inputs, MetaTensor):  # the guide shares the image's geometry (for Invertd / SaveImaged)
                guide = MetaTensor(guide)
                guide.copy_meta_from(inputs)
        return logits, guide

    def _sliding_window(self, x: torch.Tensor, predictor: Any, with_coord: bool, *args: Any, **kwargs: Any) -> Any:
        """MONAI's :meth:`SlidingWindowInferer.__call__` (devices, buffering, blending), with ``with_coord`` set for
        this call only (on a shallow copy, so concurrent calls, e.g. the label app's worker threads, do not race)."""
        call = copy.copy(self)
        call.with_coord = with_coord
        return SlidingWindowInferer.__call__(call, x, predictor, *args, **kwargs)
