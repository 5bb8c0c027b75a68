"""GuidedSlidingWindowInferer: the guide computed once per image and sampled per window equals the reference
(the whole-image guide resampled to the image grid, then cropped with each window), with and without mirror TTA."""

from __future__ import annotations

import unittest

import torch
from monai.data import MetaTensor
from monai.inferers import sliding_window_inference
from parameterized import parameterized
from testing_utils import SMALL_VIT, quiet_random_init_warning

from guidino_monai.inferers import GuidedSlidingWindowInferer
from guidino_monai.networks import GuidedSegResNet, GuidedUNet, coords_to_grid, crop_guide, resample_guide, sample_guide

quiet_random_init_warning()


def reference(net, image, roi, mirror_axes=()):
    """Full-resolution guide as an extra channel, cropped by the sliding window itself (the straightforward path)."""
    full = resample_guide(net.guide(image), image.shape[2:])
    data = torch.cat([image, full], 1)
    flips = [()] + [(a,) for a in mirror_axes]
    total = 0
    for axes in flips:
        dims = [a + 2 for a in axes]
        x = torch.flip(data, dims) if dims else data
        out = sliding_window_inference(x, roi, 2, lambda w: net(w[:, :1], guide=w[:, 1:]), overlap=0.25,
                                       mode="gaussian")  # fmt: skip
        total = total + (torch.flip(out, dims) if dims else out)
    return total / len(flips), full


class TestCropGuide(unittest.TestCase):
    @parameterized.expand(
        [
            ((8, 8, 24), (64, 128, 24), (24, 48, 0), (32, 32, 24)),  # inside, slice axis 1:1
            ((5, 7, 29), (40, 37, 29), (-3, 10, 8), (24, 24, 16)),  # partly outside (padded windows)
            ((16, 16), (70, 53), (-5, 30), (32, 32)),  # 2D
        ]
    )
    def test_equals_resample_then_crop(self, grid, full, start, size):
        torch.manual_seed(0)
        low = torch.rand(2, 1, *grid, dtype=torch.float64)
        out = crop_guide(low, start, size, full)
        self.assertEqual(tuple(out.shape), (2, 1, *size))
        # reference 1: the full-resolution guide, border-padded, cropped
        ref = resample_guide(low, full)
        pad = [p for s, z, n in reversed(list(zip(start, size, full))) for p in (max(0, -s), max(0, s + z - n))]
        ref = torch.nn.functional.pad(ref, pad, mode="replicate")
        box = tuple(slice(s + max(0, -s), s + max(0, -s) + z) for s, z in zip(start, size))
        torch.testing.assert_close(out, ref[(..., *box)], rtol=0, atol=1e-12)
        # reference 2: grid_sample at the box's voxels (what the inferer used before)
        axes = [torch.arange(s, s + z, dtype=torch.float64) for s, z in zip(start, size)]
        coords = torch.stack(torch.meshgrid(*axes, indexing="ij"))[None].expand(2, *([-1] * (len(full) + 1)))
        torch.testing.assert_close(out, sample_guide(low, coords_to_grid(coords, full)), rtol=0, atol=1e-10)


class TestGuidedInferer(unittest.TestCase):
    @parameterized.expand([(3, ()), (3, (0,)), (2, (1,))])
    def test_equals_reference(self, dims, mirror_axes):
        torch.manual_seed(0)
        if dims == 3:
            net = GuidedSegResNet(3, 8, 1, 3, guide_backbone_kwargs=SMALL_VIT, guide_kwargs={"guide_size": 28})
            image, roi = torch.rand(1, 1, 40, 37, 29), (24, 24, 16)
        else:
            net = GuidedUNet(2, 1, 3, (8, 16), (2,), guide_backbone_kwargs=SMALL_VIT, gate_at="input")
            image, roi = torch.rand(2, 1, 70, 53), (32, 32)
        net.eval()
        inferer = GuidedSlidingWindowInferer(roi, sw_batch_size=2, overlap=0.25, mirror_axes=mirror_axes,
                                             return_guide=True)  # fmt: skip
        with torch.no_grad():
            logits, guide = inferer(MetaTensor(image), net)
            ref_logits, ref_guide = reference(net, image, roi, mirror_axes)
        torch.testing.assert_close(logits.as_tensor(), ref_logits, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(guide.as_tensor(), ref_guide, rtol=1e-5, atol=1e-6)
        self.assertIsInstance(guide, MetaTensor)

    def test_vit_once_per_image(self):
        net = GuidedSegResNet(3, 8, 1, 3, guide_backbone_kwargs=SMALL_VIT, guide_kwargs={"guide_size": 28}).eval()
        calls = []
        hook = net.guide.backbone.patch_embed.register_forward_hook(lambda *a: calls.append(1))
        with torch.no_grad():
            GuidedSlidingWindowInferer((16, 16, 16), mirror_axes=(0, 1))(torch.rand(1, 1, 40, 40, 24), net)
        hook.remove()
        self.assertEqual(len(calls), 1)  # 4 mirror passes x many windows, one ViT call


if __name__ == "__main__":
    unittest.main()
