"""channels_last: same outputs and gradients, channels-last strides, state dicts across layouts, the off switch."""

from __future__ import annotations

import unittest

import torch
from testing_utils import REPO_ROOT, SMALL_VIT, quiet_random_init_warning

from guidino_monai.bundle import read_bundle_config
from guidino_monai.networks import GuidedSegResNet, GuidedUNet, channels_last

quiet_random_init_warning()


def guided_3d() -> GuidedSegResNet:  # a 3D backbone with a 2D guide ViT: the mixed case module.to() refuses
    return GuidedSegResNet(3, init_filters=8, in_channels=1, out_channels=3, guide_backbone_kwargs=SMALL_VIT,
                           gate_at="bottleneck", guide_kwargs={"guide_size": 56})  # fmt: skip


def is_channels_last(t: torch.Tensor) -> bool:
    fmt = torch.channels_last_3d if t.dim() == 5 else torch.channels_last
    return t.stride() == t.contiguous(memory_format=fmt).stride()  # also true where both layouts coincide


def distinct(params) -> torch.Tensor:  # a weight whose two layouts differ (more than one input channel, kernel > 1)
    return next(p for p in params if p.dim() in (4, 5) and p.shape[1] > 1 and p.shape[2] > 1)


class TestChannelsLast(unittest.TestCase):
    def test_same_outputs_and_gradients_3d_guided(self):
        torch.manual_seed(0)
        ref = guided_3d().train()
        net = guided_3d().train()
        net.load_state_dict(ref.state_dict())
        with self.assertRaises(RuntimeError):  # why the helper exists: one memory format cannot fit 2D and 3D weights
            guided_3d().to(memory_format=torch.channels_last_3d)
        self.assertIs(channels_last(net), net)
        ranks = {p.dim() for p in net.parameters()}
        self.assertTrue({4, 5} <= ranks, ranks)
        self.assertFalse(distinct(net.parameters()).is_contiguous())
        for name, p in net.named_parameters():
            if p.dim() in (4, 5):
                self.assertTrue(is_channels_last(p), f"{name} {tuple(p.shape)} strides {p.stride()}")
        x = torch.rand(2, 1, 32, 40, 24)
        out_ref, guide_ref = ref(x)
        out, guide = net(x)
        self.assertTrue(out.is_contiguous(memory_format=torch.channels_last_3d), out.stride())
        torch.testing.assert_close(out, out_ref, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(guide, guide_ref, rtol=1e-4, atol=1e-4)
        out.square().mean().backward()
        out_ref.square().mean().backward()
        grads = {n: p.grad for n, p in ref.named_parameters() if p.grad is not None}
        self.assertGreater(len(grads), 10)
        for n, p in net.named_parameters():
            if n in grads:
                torch.testing.assert_close(p.grad, grads[n], rtol=1e-3, atol=1e-5, msg=n)

    def test_state_dict_loads_across_layouts_2d(self):
        torch.manual_seed(1)
        net = channels_last(GuidedUNet(2, 1, 2, channels=(8, 16, 32), strides=(2, 2), num_res_units=1, use_guide=False))
        fresh = GuidedUNet(2, 1, 2, channels=(8, 16, 32), strides=(2, 2), num_res_units=1, use_guide=False)
        fresh.load_state_dict(net.state_dict())  # a checkpoint saved from a channels-last network
        self.assertFalse(distinct(net.parameters()).is_contiguous(), "the saved network is channels-last")
        self.assertTrue(distinct(fresh.parameters()).is_contiguous(), "loading keeps the destination's layout")
        x = torch.rand(1, 1, 48, 40)
        with torch.no_grad():
            torch.testing.assert_close(net.eval()(x), fresh.eval()(x), rtol=1e-4, atol=1e-5)

    def test_disabled_is_a_no_op(self):
        net = GuidedUNet(3, 1, 2, channels=(8, 16), strides=(2,), num_res_units=0, use_guide=False)
        strides = {n: p.stride() for n, p in net.named_parameters()}
        channels_last(net, enabled=False)
        channels_last(net, enabled="false")  # a command-line override arrives as a string
        self.assertEqual(strides, {n: p.stride() for n, p in net.named_parameters()})

    def test_bundles_switch(self):
        for bundle in ("guidino_hippocampus_mri_segmentation",):  # the fetal 2D UNet gains 3-14%: left as it is
            for cfg, on in (("train.json", True), ("inference.json", False), ("inference.json", True)):
                overrides = {"device": "$torch.device('cpu')", "guide": False, "channels_last": on}
                parser = read_bundle_config(REPO_ROOT / "bundles" / bundle, cfg, overrides)
                net = parser.get_parsed_content("network")
                weight = distinct(net.parameters())
                self.assertEqual(is_channels_last(weight), on, f"{bundle} {cfg} channels_last={on}")


if __name__ == "__main__":
    unittest.main()
