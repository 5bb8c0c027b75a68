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

    def test_out_size_equals_resampling_the_box(self):
        torch.manual_seed(0)
        low = torch.rand(1, 1, 6, 5, 40, dtype=torch.float64)
        box = crop_guide(low, (-4, 10, 8), (32, 32, 16), (40, 37, 40))
        direct = crop_guide(low, (-4, 10, 8), (32, 32, 16), (40, 37, 40), out_size=(4, 4, 2))
        torch.testing.assert_close(direct, resample_guide(box, (4, 4, 2)), rtol=0, atol=1e-12)


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

    @parameterized.expand([("autocast",), ("vit_dtype",)])
    def test_bf16_within_tolerance_of_fp32_reference(self, mode):
        """The optimised inference path in bf16 (everything under autocast, as on GPU; or only the ViT, ``vit_dtype``)
        against the reference path in fp32."""
        torch.manual_seed(0)
        net = GuidedSegResNet(3, 8, 1, 3, guide_backbone_kwargs=SMALL_VIT, guide_kwargs={"guide_size": 28}).eval()
        image, roi = torch.rand(1, 1, 40, 37, 29), (24, 24, 16)
        with torch.no_grad():
            ref_logits, ref_guide = reference(net, image, roi)
        inferer = GuidedSlidingWindowInferer(roi, sw_batch_size=2, overlap=0.25, return_guide=True)
        if mode == "vit_dtype":
            net.guide.vit_dtype = torch.bfloat16
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=mode == "autocast"):
            logits, guide = inferer(image, net)
        self.assertFalse(torch.equal(guide, ref_guide))  # bf16 really ran
        torch.testing.assert_close(guide.float(), ref_guide, rtol=0, atol=1e-2)
        rel = float((logits.float() - ref_logits).norm() / ref_logits.norm())
        self.assertLess(rel, 3e-2 if mode == "autocast" else 5e-3)

    @parameterized.expand(
        [
            ("unet", {}, (), (1, 1, 30, 26, 45), (16, 16, 16), True),  # several windows along the slice axis
            ("segresnet", {}, (2,), (2, 1, 20, 24, 37), (16, 16, 24), True),  # mirrored along the slice axis, batch 2
            ("segresnet", {}, (), (1, 1, 20, 18, 12), (16, 16, 16), True),  # padded: image thinner than the ROI
            # every second slice only: each guide slice is read by some window, so all are computed
            ("unet", {"slice_axis": 0, "slice_stride": 2}, (0, 1), (1, 1, 41, 20, 18), (16, 16, 16), False),
        ]
    )
    def test_skipping_unread_slices_keeps_outputs(self, kind, guide_kw, mirror_axes, shape, roi, fewer):
        torch.manual_seed(0)
        kw = {"guide_backbone_kwargs": SMALL_VIT, "guide_kwargs": {"guide_size": 28, **guide_kw}}
        if kind == "unet":
            net = GuidedUNet(3, 1, 2, (4, 8, 16), (2, 2), **kw).eval()  # bottleneck at 1/4
        else:
            net = GuidedSegResNet(3, 8, 1, 2, blocks_down=(1, 1, 1, 1), blocks_up=(1, 1, 1), **kw).eval()  # 1/8
        image = torch.rand(*shape)
        encoded = []
        net.guide.backbone.patch_embed.register_forward_hook(lambda m, i, o: encoded.append(i[0].shape[0]))
        kwargs = dict(sw_batch_size=2, overlap=0.25, mirror_axes=mirror_axes)
        full = GuidedSlidingWindowInferer(roi, skip_unread_slices=False, **kwargs)
        lazy = GuidedSlidingWindowInferer(roi, **kwargs)
        with torch.no_grad():
            ref = full(image, net)
            out = lazy(image, net)
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)
        n_slices = -(-shape[2 + net.guide.slice_axis] // net.guide.slice_stride)
        self.assertEqual(encoded[0], shape[0] * n_slices)
        read = lazy.read_guide_slices(net, shape[2:], roi)
        if not fewer:
            self.assertIsNone(read)
            self.assertEqual(encoded[1], encoded[0])
            return
        self.assertEqual(encoded[1], shape[0] * len(read))
        self.assertLess(encoded[1], encoded[0])  # fewer slices through the ViT, same outputs
        # negative control: leaving out one slice that is read changes the outputs
        lazy.read_guide_slices = lambda *a: read[1:]
        with torch.no_grad():
            wrong = lazy(image, net)
        self.assertGreater(float((wrong - ref).abs().max()), 1e-4)

    @parameterized.expand([("unet", "bottleneck"), ("unet", "decoder"), ("segresnet", "bottleneck"),
                           ("segresnet", "input"), ("segresnet", "decoder")])  # fmt: skip
    def test_guide_read_sizes_cover_the_gates(self, kind, gate_at):
        import guidino_monai.networks.nets.guided_segresnet as seg_mod
        import guidino_monai.networks.nets.guided_unet as unet_mod

        kw = {"guide_backbone_kwargs": SMALL_VIT, "guide_kwargs": {"guide_size": 28}, "gate_at": gate_at}
        if kind == "unet":
            net, mod = GuidedUNet(3, 1, 2, (4, 8, 16, 32), (2, 2, 2), **kw).eval(), unet_mod
        else:
            net, mod = GuidedSegResNet(3, 8, 1, 2, **kw).eval(), seg_mod
        seen = []
        real = mod.gate_features

        def spy(x, guide, residual=True):
            seen.append(tuple(x.shape[2:]))
            return real(x, guide, residual)

        mod.gate_features = spy
        try:
            with torch.no_grad():
                net(torch.rand(1, 1, 32, 24, 40))
        finally:
            mod.gate_features = real
        declared = net.guide_read_sizes((32, 24, 40))
        self.assertTrue(seen)
        if gate_at == "bottleneck":
            self.assertEqual(set(seen), set(declared))
        else:  # an upper bound: every grid read is at most the declared one
            self.assertTrue(all(all(a <= b for a, b in zip(s, declared[0])) for s in seen), (seen, declared))

    def test_precomputed_guide_and_click_refiner_share_the_path(self):
        """A guide handed to the inferer is used as is (no ViT call); ClickRefiner without clicks gives the same
        logits as plain guided inference (it runs through the same inferer)."""
        from guidino_monai.interactive import ClickRefiner

        torch.manual_seed(0)
        net = GuidedSegResNet(3, 8, 1, 3, guide_backbone_kwargs=SMALL_VIT, guide_kwargs={"guide_size": 28}).eval()
        image, roi = torch.rand(1, 1, 40, 37, 29), (24, 24, 16)
        inferer = GuidedSlidingWindowInferer(roi, sw_batch_size=2, overlap=0.25)
        with torch.no_grad():
            ref = inferer(image, net)
            low = net.guide(image)
            calls = []
            hook = net.guide.backbone.patch_embed.register_forward_hook(lambda *a: calls.append(1))
            given = inferer(image, net, guide=low)
            hook.remove()
            refiner = ClickRefiner(net, roi, sw_batch_size=2, overlap=0.25)
            refiner.set_image(image)
            clicked, _ = refiner.predict()
        self.assertEqual(calls, [])
        torch.testing.assert_close(given, ref, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(clicked, ref, rtol=1e-5, atol=1e-6)

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
