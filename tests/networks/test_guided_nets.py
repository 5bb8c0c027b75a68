"""Shapes, modes, export and bad input for GuidedSegResNet / GuidedUNet (2D and 3D), on tiny random-init ViTs."""

from __future__ import annotations

import itertools
import os
import tempfile
import unittest

import torch
from monai.bundle import ConfigParser
from monai.inferers import sliding_window_inference
from monai.networks import eval_mode
from parameterized import parameterized
from testing_utils import SMALL_VIT, quiet_random_init_warning

from guidino_monai.networks import GuideBranch, GuidedSegResNet, GuidedUNet

quiet_random_init_warning()

BACKBONES = ["vit_small_patch14_dinov2", "vit_small_patch16_dinov3"]
GATES = ["input", "bottleneck", "decoder"]


def make_net(kind: str, spatial_dims: int, backbone: str, gate_at: str, **kwargs):
    common = dict(
        guide_backbone=backbone,
        guide_backbone_kwargs=SMALL_VIT,
        gate_at=gate_at,
        guide_kwargs={"guide_size": 56 if spatial_dims == 3 else 64},
        **kwargs,
    )
    if kind == "segresnet":
        return GuidedSegResNet(spatial_dims, init_filters=8, in_channels=1, out_channels=3, **common)
    return GuidedUNet(spatial_dims, 1, 3, channels=(8, 16, 32), strides=(2, 2), num_res_units=1, **common)


CASES = []
for kind, sd, bb, gate in itertools.product(["segresnet", "unet"], range(2, 4), BACKBONES, GATES):
    shape = (2, 1, 32, 40, 24) if sd == 3 else (2, 1, 64, 48)
    CASES.append((kind, sd, bb, gate, shape))


class TestGuidedNets(unittest.TestCase):
    @parameterized.expand(CASES)
    def test_shape(self, kind, spatial_dims, backbone, gate_at, shape):
        torch.manual_seed(0)
        net = make_net(kind, spatial_dims, backbone, gate_at)
        x = torch.rand(shape) * 300.0  # any intensity range
        net.train()
        self.assertFalse(net.guide.backbone.training, "the frozen ViT must stay in eval mode while training")
        logits, guide = net(x)
        self.assertEqual(logits.shape, (shape[0], 3, *shape[2:]))
        self.assertEqual(logits.dtype, torch.float32)
        self.assertEqual(guide.shape[:2], (shape[0], 1))
        self.assertEqual(guide.ndim, x.ndim)
        self.assertTrue(bool(((guide >= 0) & (guide <= 1)).all()))
        if spatial_dims == 3:  # slice axis 2 kept in place, one guide slice per input slice
            self.assertEqual(guide.shape[-1], shape[-1])
        with eval_mode(net):
            out = net(x)
        self.assertIsInstance(out, torch.Tensor)
        self.assertEqual(out.shape, (shape[0], 3, *shape[2:]))

    @parameterized.expand([(k, sd) for k in ("segresnet", "unet") for sd in (2, 3)])
    def test_gradients_reach_tokenbook_not_vit(self, kind, spatial_dims):
        net = make_net(kind, spatial_dims, BACKBONES[0], "bottleneck")
        shape = (1, 1, 32, 32, 16) if spatial_dims == 3 else (1, 1, 64, 64)
        logits, guide = net.train()(torch.rand(shape))
        (logits.mean() + guide.mean()).backward()
        self.assertIsNotNone(net.guide.token_book.prototypes.grad)
        self.assertGreater(float(net.guide.token_book.prototypes.grad.abs().sum()), 0.0)
        self.assertTrue(all(p.grad is None for p in net.guide.backbone.parameters()))
        self.assertFalse(any(p.requires_grad for p in net.guide.backbone.parameters()))

    @parameterized.expand([("segresnet", 3, (40, 40, 24)), ("unet", 3, (36, 28, 20)), ("unet", 2, (52, 44))])
    def test_sliding_window_roi_not_patch_multiple(self, kind, spatial_dims, roi):
        net = make_net(kind, spatial_dims, BACKBONES[0], "decoder")
        image = torch.rand(1, 1, 70, 61, 50) if spatial_dims == 3 else torch.rand(1, 1, 130, 97)
        with eval_mode(net), torch.no_grad():
            out = sliding_window_inference(image, roi, 2, net, overlap=0.25, mode="gaussian")
        self.assertIsInstance(out, torch.Tensor)
        self.assertEqual(out.shape, (1, 3, *image.shape[2:]))
        self.assertTrue(bool(torch.isfinite(out).all()))

    def test_precomputed_guide_equals_internal(self):
        net = make_net("segresnet", 3, BACKBONES[0], "bottleneck").eval()
        x = torch.rand(1, 1, 32, 32, 16)
        with torch.no_grad():
            ref = net(x)
            same = net(x, guide=net.guide(x))
            other = net(x, guide=torch.zeros(1, 1, 4, 4, 16))
        torch.testing.assert_close(ref, same)
        self.assertGreater(float((ref - other).abs().max()), 0.0)

    def test_return_guide_in_eval(self):
        net = make_net("unet", 2, BACKBONES[1], "input").eval()
        net.return_guide = True
        with torch.no_grad():
            out = net(torch.rand(1, 1, 64, 64))
        self.assertIsInstance(out, tuple)
        self.assertEqual(out[1].shape, (1, 1, 4, 4))

    @parameterized.expand([("segresnet", 3, BACKBONES[0]), ("unet", 2, BACKBONES[1]), ("unet", 3, BACKBONES[0])])
    def test_torchscript_export(self, kind, spatial_dims, backbone):
        """Eval-mode nets trace to TorchScript (as `monai.bundle ckpt_export --use_trace` does) and the saved
        program gives the same logits, also for an input size other than the traced one whose slices have the same
        aspect ratio (the DINO input size, and so the token grid, is fixed when tracing; a sliding-window inferer
        always hands the network ROI-sized windows)."""
        net = make_net(kind, spatial_dims, backbone, "decoder").eval()
        x = torch.rand(1, 1, 32, 32, 16) if spatial_dims == 3 else torch.rand(1, 1, 64, 64)
        x2 = torch.rand(1, 1, 40, 40, 24) if spatial_dims == 3 else torch.rand(1, 1, 48, 48)
        with torch.no_grad(), tempfile.TemporaryDirectory() as d:
            ts = torch.jit.trace(net, x, check_trace=False)
            path = os.path.join(d, "model.ts")
            torch.jit.save(ts, path)
            loaded = torch.jit.load(path)
            torch.testing.assert_close(loaded(x), net(x), rtol=1e-4, atol=1e-5)
            torch.testing.assert_close(loaded(x2), net(x2), rtol=1e-4, atol=1e-5)

    def test_bundle_target_instantiation(self):
        config = {
            "net": {
                "_target_": "guidino_monai.networks.GuidedSegResNet",
                "spatial_dims": 3,
                "init_filters": 8,
                "in_channels": 1,
                "out_channels": 3,
                "guide_backbone": "vit_small_patch14_dinov2",
                "guide_backbone_kwargs": {"depth": 2},
                "gate_at": "decoder",
                "guide_kwargs": {"guide_size": 56, "slice_stride": 2, "slice_axis": 0},
            },
            "unet": {
                "_target_": "guidino_monai.networks.GuidedUNet",
                "spatial_dims": 2,
                "in_channels": 1,
                "out_channels": 2,
                "channels": [8, 16],
                "strides": [2],
                "guide_backbone": "vit_small_patch16_dinov3",
                "guide_backbone_kwargs": {"depth": 2},
            },
        }
        parser = ConfigParser(config)
        net = parser.get_parsed_content("net")
        self.assertIsInstance(net, GuidedSegResNet)
        self.assertEqual(net.guide.slice_stride, 2)
        _, guide = net.train()(torch.rand(1, 1, 16, 32, 32))
        self.assertEqual(guide.shape, (1, 1, 8, 4, 4))  # slice axis 0 in place, every 2nd slice
        self.assertIsInstance(parser.get_parsed_content("unet"), GuidedUNet)

    @parameterized.expand([("segresnet", 3), ("unet", 2), ("unet", 3)])
    def test_plain_switch_matches_monai(self, kind, spatial_dims):
        """use_guide=False is exactly the MONAI base network (same weights give the same logits), with no ViT."""
        from monai.networks.nets import SegResNet, UNet

        torch.manual_seed(0)
        plain = make_net(kind, spatial_dims, BACKBONES[0], "bottleneck", use_guide=False)
        self.assertIsNone(plain.guide)
        if kind == "segresnet":
            ref = SegResNet(spatial_dims, init_filters=8, in_channels=1, out_channels=3)
        else:
            ref = UNet(spatial_dims, 1, 3, channels=(8, 16, 32), strides=(2, 2), num_res_units=1)
        ref_state = ref.state_dict()
        own = plain.state_dict()
        self.assertEqual(len(own), len(ref_state))
        plain.load_state_dict(dict(zip(own.keys(), ref_state.values())))
        x = torch.rand(1, 1, 32, 32, 16) if spatial_dims == 3 else torch.rand(2, 1, 32, 48)
        with torch.no_grad():
            torch.testing.assert_close(plain.eval()(x), ref.eval()(x))
            out = plain.train()(x)
        self.assertIsInstance(out, torch.Tensor)  # no guide, so plain logits in training too

    def test_random_init_warns(self):
        with self.assertWarnsRegex(UserWarning, "no foundation-model prior"):
            GuideBranch(2, 1, backbone_kwargs=SMALL_VIT)


class TestBadInput(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.net3 = make_net("segresnet", 3, BACKBONES[0], "bottleneck").eval()
        cls.unet2 = make_net("unet", 2, BACKBONES[0], "bottleneck").eval()

    def test_wrong_number_of_spatial_dims(self):
        with self.assertRaisesRegex(ValueError, "spatial dims"):
            self.net3(torch.rand(1, 1, 32, 32))
        with self.assertRaisesRegex(ValueError, "spatial dims"):
            self.unet2(torch.rand(1, 1, 32, 32, 32))

    def test_one_voxel_thin_volume(self):
        with self.assertRaisesRegex(ValueError, "1 voxel thin"):
            self.net3(torch.rand(1, 1, 32, 32, 1))

    def test_not_divisible(self):
        with self.assertRaisesRegex(ValueError, "divisible by 8"):
            self.net3(torch.rand(1, 1, 30, 32, 32))

    def test_nan_and_inf(self):
        x = torch.rand(1, 1, 32, 32, 16)
        x[0, 0, 3, 4, 5] = float("nan")
        with self.assertRaisesRegex(ValueError, "NaN"):
            self.net3(x)
        y = torch.rand(1, 1, 32, 32)
        y[0, 0, 1, 1] = float("inf")
        with self.assertRaisesRegex(ValueError, "NaN or Inf"):
            self.unet2(y)

    def test_wrong_channels(self):
        with self.assertRaisesRegex(ValueError, "input channel"):
            self.net3.guide(torch.rand(1, 2, 32, 32, 16))

    def test_ill_args(self):
        with self.assertRaises(ValueError):
            GuidedSegResNet(spatial_dims=4)
        with self.assertRaises(ValueError):
            make_net("segresnet", 3, BACKBONES[0], "everywhere")
        with self.assertRaises(ValueError):
            make_net("unet", 2, BACKBONES[0], "input", gate_mode="add")
        with self.assertRaisesRegex(ValueError, "unsupported guide backbone"):
            GuidedUNet(2, 1, 2, (8, 16), (2,), guide_backbone="resnet50")
        with self.assertRaisesRegex(ValueError, "slice_axis"):
            GuideBranch(3, 1, backbone_kwargs=SMALL_VIT, slice_axis=3)
        with self.assertRaisesRegex(ValueError, "intensity_range"):
            GuideBranch(3, 1, backbone_kwargs=SMALL_VIT, intensity_range=(5, 1))


if __name__ == "__main__":
    unittest.main()
