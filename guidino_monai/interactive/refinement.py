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

"""Click-trained correction (DeepEdit-style): a small network that reads the image, the segmentation to correct and
the user's clicks, and returns the corrected segmentation.

The training-free click regions (:func:`~guidino_monai.interactive.apply_clicks`) can only follow intensities; the
errors of a good network are thin boundary shells that intensity regions barely touch. :class:`ClickRefinementNet`
learns what a click means from simulated users (:func:`simulate_clicks`: the centre of the largest error region, as
the click benchmark clicks), as MONAI Label's DeepEdit does, but on top of a segmentation that is already there:

- input channels: the image (1), the segmentation to correct as class probabilities (``C``), one click map per class
  (``C``; background clicks in channel 0, as DeepEdit's guidance), each click a Gaussian blob (:func:`click_guidance`);
- output: ``C`` logits, added to the log-probabilities of the segmentation to correct (a residual: an untrained or
  click-free pass returns that segmentation), so the network only learns corrections.

It does not use the guide ViT, so a click helps whether or not DINO weights are present. Train it with
``python -m guidino_monai.interactive.train_refiner`` on the bundle's training split (the base network's predictions
on those cases are the segmentations it learns to correct).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn
from monai.inferers import sliding_window_inference
from monai.networks.nets import UNet

__all__ = [
    "ClickRefinementNet",
    "blend_near_clicks",
    "click_guidance",
    "load_refiner",
    "refine_with_clicks",
    "save_refiner",
    "simulate_clicks",
]

#: Gaussian width of a click in the click maps (voxels of the network's grid)
DEFAULT_SIGMA = 2.0

#: how far a click's correction reaches (Gaussian width in voxels of the network's grid; see :func:`refine_with_clicks`)
DEFAULT_REACH = 4.0


def click_guidance(
    shape: Sequence[int], clicks: Sequence[tuple[Sequence[float], int]], num_classes: int, sigma: float = DEFAULT_SIGMA
) -> np.ndarray:
    """Click maps ``(num_classes, *shape)``: each click ``(point, channel)`` a Gaussian blob (peak 1) in its class's
    channel (``0`` for a background click), blobs of one channel combined by maximum.

    Raises:
        ValueError: a channel outside ``[0, num_classes)`` or a point of another dimensionality than ``shape``.
    """
    maps = np.zeros((num_classes, *shape), dtype=np.float32)
    if not clicks:
        return maps
    grid = np.indices(tuple(shape), dtype=np.float32)
    for point, channel in clicks:
        if not 0 <= int(channel) < num_classes:
            raise ValueError(f"click channel {channel} is not a class of 0..{num_classes - 1}.")
        if len(point) != len(shape):
            raise ValueError(f"click {list(point)} has {len(point)} coordinates, the image has {len(shape)} axes.")
        d2 = sum((grid[i] - float(point[i])) ** 2 for i in range(len(shape)))
        np.maximum(maps[int(channel)], np.exp(-d2 / (2.0 * sigma**2)), out=maps[int(channel)])
    return maps


def _largest_component_centre(error: np.ndarray, rng: np.random.Generator | None) -> tuple[list[int], np.ndarray]:
    from scipy import ndimage

    components, n = ndimage.label(error)
    sizes = ndimage.sum(error, components, index=range(1, n + 1))
    largest = components == (int(np.argmax(sizes)) + 1)
    dist = ndimage.distance_transform_edt(np.pad(largest, 1))[tuple(slice(1, -1) for _ in largest.shape)]
    if rng is not None and rng.random() < 0.5:  # training: anywhere in the deeper half of the region, not only its centre
        candidates = np.argwhere(dist >= 0.5 * dist.max())
        point = candidates[rng.integers(len(candidates))]
    else:
        point = np.unravel_index(int(np.argmax(dist)), largest.shape)
    return [int(i) for i in point], largest


def simulate_clicks(
    pred: np.ndarray, label: np.ndarray, num_clicks: int, rng: np.random.Generator | None = None
) -> list[tuple[list[int], int]]:
    """A simulated user's clicks on ``pred`` (the segmentation to correct) against ``label``: ``(point, channel)``.

    Each click goes to the centre of the largest remaining error region (:func:`~guidino_monai.interactive.next_click`'s
    rule; with ``rng``, anywhere in that region's deeper half, for training variety); its channel is the true class
    there (``0``: a background click). The clicked region is then taken as corrected, so the next click goes to the
    next largest error, as with a user whose clicks are each answered by a correction of that region.
    """
    pred, label = np.asarray(pred), np.asarray(label)
    error = pred != label
    clicks = []
    for _ in range(num_clicks):
        if not error.any():
            break
        point, region = _largest_component_centre(error, rng)
        clicks.append((point, int(label[tuple(point)])))
        error = error & ~region
    return clicks


class ClickRefinementNet(nn.Module):
    """Corrects a segmentation from clicks: ``forward(image, probs, guidance)`` -> logits ``(B, C, *spatial)``.

    Args:
        spatial_dims: 2 or 3.
        num_classes: classes of the segmentation (background included).
        in_image_channels: image channels.
        channels, strides, num_res_units: the MONAI ``UNet`` that predicts the correction.
    """

    def __init__(
        self,
        spatial_dims: int,
        num_classes: int,
        in_image_channels: int = 1,
        channels: Sequence[int] = (16, 32, 64, 128),
        strides: Sequence[int] = (2, 2, 2),
        num_res_units: int = 2,
    ) -> None:
        super().__init__()
        self.config = {"spatial_dims": spatial_dims, "num_classes": num_classes, "in_image_channels": in_image_channels,
                       "channels": list(channels), "strides": list(strides), "num_res_units": num_res_units}  # fmt: skip
        self.spatial_dims, self.num_classes = spatial_dims, num_classes
        self.unet = UNet(spatial_dims, in_image_channels + 2 * num_classes, num_classes, channels=channels,
                         strides=strides, num_res_units=num_res_units)  # fmt: skip

    def forward(self, image: torch.Tensor, probs: torch.Tensor, guidance: torch.Tensor) -> torch.Tensor:
        if probs.shape[1] != self.num_classes or guidance.shape[1] != self.num_classes:
            raise ValueError(f"expected {self.num_classes} probability and click channels, got {probs.shape[1]} and "
                             f"{guidance.shape[1]}.")  # fmt: skip
        x = torch.cat([image, probs, guidance], dim=1)
        return self.unet(x) + torch.log(probs.clamp_min(1e-4))


def save_refiner(net: ClickRefinementNet, path: str | Path, **info: Any) -> None:
    """Save weights and architecture (plain tensors and numbers: loadable with ``weights_only=True``)."""
    torch.save({"state_dict": net.state_dict(), "config": net.config, "info": info}, str(path))


def load_refiner(path: str | Path) -> tuple[ClickRefinementNet, dict[str, Any]]:
    """Load a :func:`save_refiner` file (``weights_only=True``: no code in the file is run).

    Raises:
        ValueError: naming the file, when it is not a click refiner file.
    """
    try:
        state = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as e:  # pickle with code, truncated file, not a torch file
        raise ValueError(f"{path}: not a loadable click refiner file ({type(e).__name__}: {e}).") from e
    if not isinstance(state, dict) or "state_dict" not in state or "config" not in state:
        raise ValueError(f"{path}: not a click refiner file (expected the keys 'state_dict' and 'config').")
    net = ClickRefinementNet(**state["config"])
    try:
        net.load_state_dict(state["state_dict"])
    except RuntimeError as e:
        raise ValueError(f"{path}: weights do not fit the click refiner it describes: {e}") from e
    return net.eval(), dict(state.get("info", {}))


@torch.no_grad()
def refine_with_clicks(
    net: ClickRefinementNet,
    image: torch.Tensor,
    probs: torch.Tensor,
    clicks: Sequence[tuple[Sequence[float], int]],
    sigma: float = DEFAULT_SIGMA,
    roi_size: Sequence[int] | None = None,
    reach: float | None = DEFAULT_REACH,
) -> torch.Tensor:
    """Corrected probabilities ``(1, C, *spatial)`` for one image ``(1, 1, *spatial)``, the probabilities to correct
    ``(1, C, *spatial)`` and all clicks so far (``(point, channel)`` on that grid). No clicks: ``probs`` unchanged.

    ``reach`` (voxels): the correction is blended in with a Gaussian weight of that width around the clicks (1 at a
    click), so a click changes its neighbourhood and leaves the rest of the segmentation as it was; ``None``: the
    refiner's output everywhere."""
    if not clicks:
        return probs
    guidance = torch.from_numpy(click_guidance(image.shape[2:], clicks, probs.shape[1], sigma)).to(probs)[None]
    x = torch.cat([image.to(probs), probs, guidance], dim=1)
    c = image.shape[1]

    def run(t: torch.Tensor) -> torch.Tensor:
        n = net.num_classes
        return net(t[:, :c], t[:, c : c + n], t[:, c + n :])

    shape = image.shape[2:]
    factor = int(np.prod(net.config["strides"]))
    if roi_size is None:  # whole image, padded to what the UNet's strides divide
        roi_size = [int(np.ceil(s / factor) * factor) for s in shape]
    logits = sliding_window_inference(x, roi_size, 1, run, overlap=0.25, mode="gaussian", padding_mode="replicate")
    return blend_near_clicks(torch.softmax(logits.float(), dim=1), probs, clicks, reach)


def blend_near_clicks(
    refined: torch.Tensor, probs: torch.Tensor, clicks: Sequence[tuple[Sequence[float], int]], reach: float | None
) -> torch.Tensor:
    """``refined`` within a Gaussian weight of width ``reach`` voxels around ``clicks`` (1 at a click), ``probs``
    elsewhere; both ``(B, C, *spatial)`` or ``(C, *spatial)``. ``reach`` ``None``: ``refined`` everywhere."""
    if reach is None:
        return refined
    if not clicks:
        return probs.float()
    shape = refined.shape[-len(clicks[0][0]) :]
    near = torch.from_numpy(click_guidance(shape, [(p, 0) for p, _ in clicks], 1, reach)).to(refined)  # (1, *shape)
    return near * refined + (1 - near) * probs.float()
