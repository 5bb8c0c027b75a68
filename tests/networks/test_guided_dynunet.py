"""GuidedDynUNet: MONAI's DynUNet (nnU-Net) with the guide gate, deep supervision and every guide path."""

from __future__ import annotations

import os
import tempfile
import unittest

import torch
from monai.losses import DiceCELoss
from monai.networks.nets import DynUNet
from parameterized import parameterized
from testing_utils import SMALL_VIT, quiet_random_init_warning

from guidino_monai.inferers import GuidedSlidingWindowInferer
from guidino_monai.losses import GuidedDiceCELoss, GuideSupervisionLoss
from guidino_monai.networks import GuidedDynUNet, coords_to_grid, resample_guide
from guidino_monai.transforms import AddCoordinatesd

quiet_random_init_warning()


def args(dims: int, **kw):
    k = [3, 3, 3, 3]
    s = [1, 2, 2, 2] if dims == 2 else [1, 2, 2, [2, 2, 1]]
    return dict(spatial_dims=dims, in_channels=1, out_channels=3, kernel_size=k, strides=s,
                upsample_kernel_size=s[1:], filters=[8, 16, 32, 32], **kw)  # fmt: skip


def guided(dims: int, **kw):
    return GuidedDynUNet(**args(dims, **kw), guide_backbone_kwargs=SMALL_VIT, guide_kwargs={"guide_size": 32})


class TestGuidedDynUNet(unittest.TestCase):
    @parameterized.expand([(2,), (3,)])
    def test_plain_is_monai_dynunet(self, dims):
        torch.manual_seed(0)
        ref = DynUNet(**args(dims, deep_supervision=True, deep_supr_num=2)).eval()
        plain = GuidedDynUNet(**args(dims, deep_supervision=True, deep_supr_num=2), use_guide=False).eval()
        plain.load_state_dict(ref.state_dict(), strict=True)
        x = torch.rand(2, 1, *([32] * dims))
        with torch.no_grad():
            torch.testing.assert_close(plain(x), ref(x))
            torch.testing.assert_close(plain.train()(x), ref.train()(x))  # the stacked deep-supervision output
        net = guided(dims, deep_supervision=True, deep_supr_num=2)
        missing, unexpected = net.load_state_dict(ref.state_dict(), strict=False)
        self.assertEqual(unexpected, [])
        self.assertTrue(all(k.startswith("guide.") for k in missing))

    @parameterized.expand([("bottleneck",), ("decoder",)])
    def test_gate_reaches_its_stage(self, gate_at):
        """A zero guide with the paper's multiplicative gate zeroes the gated stage's output (and nothing else)."""
        torch.manual_seed(0)
        net = guided(3, gate_at=gate_at, gate_mode="multiply").eval()
        x = torch.rand(1, 1, 32, 32, 16)
        stages = [net.bottleneck] if gate_at == "bottleneck" else list(net.upsamples)
        seen = []
        for m in stages:
            m.register_forward_hook(lambda mod, a, out: seen.append(float(out.abs().max())))
        down = []
        net.input_block.register_forward_hook(lambda mod, a, out: down.append(float(out.abs().max())))
        with torch.no_grad():
            out = net(x, guide=torch.zeros(1, 1, 2, 2, 16))
        self.assertEqual(len(seen), len(stages))
        self.assertTrue(all(v == 0.0 for v in seen), seen)
        self.assertGreater(down[0], 0.0)
        with torch.no_grad():  # and a guide of ones leaves it alone: the plain DynUNet's output
            plain = GuidedDynUNet(**args(3), use_guide=False).eval()
            plain.load_state_dict(net.state_dict(), strict=False)
            torch.testing.assert_close(net(x, guide=torch.ones(1, 1, 2, 2, 16)), plain(x))
        self.assertFalse(torch.allclose(out, plain(x)))

    def test_deep_supervision_loss(self):
        torch.manual_seed(0)
        net = guided(2, deep_supervision=True, deep_supr_num=2).train()
        x, label = torch.rand(2, 1, 32, 32), torch.randint(0, 3, (2, 1, 32, 32)).float()
        out, g = net(x)
        self.assertEqual(tuple(out.shape), (2, 3, 3, 32, 32))  # main output + 2 heads
        loss = GuidedDiceCELoss(to_onehot_y=True, softmax=True, lambda_guide=0.5, guide_mode="dice")((out, g), label)
        dce = DiceCELoss(to_onehot_y=True, softmax=True)  # MONAI's own loss, weights 1, 1/2, 1/4 (normalised)
        ref = (dce(out[:, 0], label) + 0.5 * dce(out[:, 1], label) + 0.25 * dce(out[:, 2], label)) / 1.75
        ref = ref + 0.5 * GuideSupervisionLoss(mode="dice")(g, label)
        torch.testing.assert_close(loss, ref)
        loss.backward()
        self.assertGreater(float(net.guide.token_book.prototypes.grad.abs().sum()), 0.0)
        self.assertIsNotNone(net.deep_supervision_heads[1].conv.conv.weight.grad)

    def test_cached_tokens_equal_reference(self):
        torch.manual_seed(0)
        net = guided(3).train()
        vol = torch.rand(1, 1, 40, 40, 20)
        with torch.no_grad():
            tokens = net.guide.encode(vol)
            full = resample_guide(net.guide.tokens_to_guide(tokens, 1), vol.shape[2:])
        d = AddCoordinatesd("image")({"image": vol[0]})
        sl = (slice(4, 36), slice(0, 32), slice(2, 18))
        grid = coords_to_grid(d["coords"][(slice(None), *sl)][None], (40, 40, 20))
        x = vol[(slice(None), slice(None), *sl)]
        with torch.no_grad():
            a, ga = net(x, tokens=[tokens], grid=grid)
            b, gb = net(x, guide=full[(slice(None), slice(None), *sl)])
        torch.testing.assert_close(ga, gb, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)

    def test_inferer_guide_once_equals_per_window(self):
        torch.manual_seed(0)
        net = guided(3).eval()
        x = torch.rand(1, 1, 48, 40, 28)
        with torch.no_grad():
            once = GuidedSlidingWindowInferer((32, 32, 16), overlap=0.5)(x, net)
            per_window = GuidedSlidingWindowInferer((32, 32, 16), overlap=0.5, guide_once=False)(x, net)
        self.assertEqual(tuple(once.shape), (1, 3, 48, 40, 28))
        self.assertEqual(net.guide_read_sizes((32, 32, 16)), [(4, 4, 4)])
        # per-window guides see each window's own intensity range and slices: close, not equal
        self.assertLess(float((once - per_window).abs().mean()), 0.1 * float(per_window.abs().mean()) + 1e-3)

    def test_traces_and_checks_input(self):
        net = guided(2).eval()
        x = torch.rand(1, 1, 64, 64)
        with torch.no_grad(), tempfile.TemporaryDirectory() as d:
            ts = torch.jit.trace(net, x, check_trace=False)
            torch.jit.save(ts, os.path.join(d, "m.ts"))
            torch.testing.assert_close(torch.jit.load(os.path.join(d, "m.ts"))(x), net(x), rtol=1e-4, atol=1e-5)
        with self.assertRaisesRegex(ValueError, "divisible by"):
            net(torch.rand(1, 1, 60, 64))


if __name__ == "__main__":
    unittest.main()
