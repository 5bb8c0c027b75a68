"""TokenBook options (EMA, similarity dropout, token sampling, click prototypes) and GuideBranch input handling."""

from __future__ import annotations

import unittest

import torch
import torch.nn.functional as F
from parameterized import parameterized
from testing_utils import SMALL_VIT, quiet_random_init_warning

from guidino_monai.networks import GuideBranch, TokenBook

quiet_random_init_warning()


class TestTokenBook(unittest.TestCase):
    def test_formula(self):
        """guide = (mean_n cos(proj(t), p_n) + 1) / 2, checked against a direct computation."""
        torch.manual_seed(0)
        book = TokenBook(6, num_prototypes=3, proj_channels=4).eval()
        tokens = torch.randn(2, 6, 3, 5)
        t = book.proj(tokens.permute(0, 2, 3, 1))  # (B, h, w, P)
        cos = torch.nn.functional.cosine_similarity(t[..., None, :], book.prototypes[None, None, None], dim=-1)
        expected = ((cos.mean(-1) + 1) / 2)[:, None]
        torch.testing.assert_close(book(tokens), expected, rtol=1e-5, atol=1e-6)

    @parameterized.expand([((2, 8, 4, 4),), ((1, 8, 3, 4, 5),), ((3, 8, 7),)])
    def test_any_grid(self, shape):
        out = TokenBook(8, 4, 8)(torch.randn(shape))
        self.assertEqual(out.shape, (shape[0], 1, *shape[2:]))
        self.assertTrue(bool(((out >= 0) & (out <= 1)).all()))

    def test_ema(self):
        torch.manual_seed(0)
        book = TokenBook(8, 4, 8, ema_momentum=0.5)
        ema0 = book.ema_prototypes.clone()
        with torch.no_grad():
            book.prototypes.add_(1.0)
        book.train()(torch.randn(1, 8, 2, 2))
        torch.testing.assert_close(book.ema_prototypes, 0.5 * ema0 + 0.5 * book.prototypes.detach())
        self.assertIn("ema_prototypes", book.state_dict())
        x = torch.randn(1, 8, 2, 2)
        book.eval()
        out_ema = book(x)
        book.use_ema = False
        self.assertFalse(torch.allclose(out_ema, book(x)), "eval must use the EMA prototypes")
        self.assertNotIn("ema_prototypes", TokenBook(8, 4, 8).state_dict())

    def test_similarity_dropout_train_only(self):
        torch.manual_seed(0)
        book = TokenBook(8, 16, 8, sim_dropout=0.5)
        x = torch.randn(2, 8, 4, 4)
        book.train()
        a, b = book(x), book(x)
        self.assertFalse(torch.allclose(a, b), "training outputs must vary with dropped prototypes")
        book.eval()  # no dropout at eval: the mean over all prototypes, written out here
        t = F.normalize(book.proj(x.flatten(2).transpose(1, 2)), dim=-1)
        ref = (t @ F.normalize(book.prototypes, dim=-1).T).mean(-1).add(1).div(2).reshape(2, 1, 4, 4)
        torch.testing.assert_close(book(x), ref)

    def test_token_sampling_masks_gradient(self):
        torch.manual_seed(0)
        book = TokenBook(8, 4, 8, token_sample_rate=0.25).train()
        x = torch.randn(1, 8, 16, 16, requires_grad=True)
        book(x).sum().backward()
        per_token = x.grad.abs().sum(1).flatten()
        frac = float((per_token > 0).float().mean())
        self.assertTrue(0.1 < frac < 0.45, frac)

    def test_click_prototypes(self):
        """A positive prototype raises the guide at tokens like it; a negative one suppresses them."""
        torch.manual_seed(0)
        book = TokenBook(8, 4, 8).eval()
        x = torch.randn(1, 8, 4, 4)
        click = x[0, :, 1, 2]
        base = book(x)
        pos = book(x, positive=click[None])
        neg = book(x, negative=click[None])
        self.assertGreater(float(pos[0, 0, 1, 2]), float(base[0, 0, 1, 2]))
        self.assertLess(float(neg[0, 0, 1, 2]), float(base[0, 0, 1, 2]))
        self.assertLess(float(neg[0, 0, 1, 2]), 0.05)
        with self.assertRaises(ValueError):
            book(x, positive=torch.randn(2, 5))

    def test_ill_args(self):
        for kwargs in ({"ema_momentum": 1.0}, {"sim_dropout": 1.0}, {"token_sample_rate": 0.0}, {"num_prototypes": 0}):
            with self.assertRaises(ValueError):
                TokenBook(8, **{"num_prototypes": 4, **kwargs})
        with self.assertRaises(ValueError):
            TokenBook(8)(torch.randn(1, 7, 2, 2))


class TestGuideBranchInput(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.branch = GuideBranch(3, 1, backbone_kwargs=SMALL_VIT, guide_size=28).eval()

    @parameterized.expand([("percentile", (0.5, 99.5)), ("minmax", (0.5, 99.5)), ("window", (-100.0, 300.0))])
    def test_intensity_scaling_range(self, mode, rng):
        self.branch.intensity_scaling = type(self.branch.intensity_scaling)(mode)
        self.branch.intensity_range = rng
        x = torch.randn(2, 1, 8, 8, 4) * 500 + 100
        s = self.branch.scale_intensity(x)
        self.assertGreaterEqual(float(s.min()), 0.0)
        self.assertLessEqual(float(s.max()), 1.0)
        if mode == "minmax":
            self.assertAlmostEqual(float(s[0].min()), 0.0, places=5)
            self.assertAlmostEqual(float(s[0].max()), 1.0, places=5)
        # monotone: a brighter voxel never maps darker
        flat_x, flat_s = x[0].flatten(), s[0].flatten()
        order = flat_x.argsort()
        self.assertTrue(bool((flat_s[order].diff() >= -1e-6).all()))

    def test_dino_input_normalised(self):
        self.branch.intensity_scaling = type(self.branch.intensity_scaling)("minmax")
        slices = self.branch.to_dino_input(torch.ones(3, 1, 40, 20))
        self.assertEqual(slices.shape, (3, 3, 32, 16))  # guide_size 28 -> 32 (patch 16), aspect ratio kept
        expected = (1 - torch.tensor([0.485, 0.456, 0.406])) / torch.tensor([0.229, 0.224, 0.225])
        torch.testing.assert_close(slices[0, :, 5, 5], expected, rtol=1e-4, atol=1e-4)

    @parameterized.expand([(0, 1), (1, 2), (2, 3)])
    def test_slice_axis_and_stride(self, axis, stride):
        branch = GuideBranch(3, 1, backbone_kwargs=SMALL_VIT, guide_size=28, slice_axis=axis, slice_stride=stride)
        x = torch.rand(2, 1, 9, 10, 11)
        with torch.no_grad():
            g = branch.eval()(x)
        expected = [2, 2]
        expected.insert(axis, -(-x.shape[2 + axis] // stride))
        self.assertEqual(tuple(g.shape), (2, 1, *expected))
        # slice k of the guide comes from the volume at position (k + 0.5) * n / D' - 0.5 alone (linear between the
        # two nearest voxel slices), written out here by hand
        k, n = 1, x.shape[2 + axis]
        d = -(-n // stride)
        pos = (k + 0.5) * n / d - 0.5
        lo, w = int(pos), pos - int(pos)
        vol = x.movedim(2 + axis, 1)
        raw = vol[:, lo] * (1 - w) + vol[:, min(lo + 1, n - 1)] * w  # (2, C, H, W)
        with torch.no_grad():
            scaled = branch.scale_intensity(raw, reference=x)
            tokens = branch.backbone.forward_features(branch.to_dino_input(scaled))[:, 5:]  # 4 registers + cls
            ref = branch.token_book(tokens.transpose(1, 2).reshape(2, -1, 2, 2))
        torch.testing.assert_close(g.movedim(2 + axis, 2)[:, :, k], ref, rtol=1e-5, atol=1e-6)

    def test_frozen_backbone_no_grad_and_eval(self):
        branch = GuideBranch(2, 3, backbone_kwargs=SMALL_VIT, guide_size=28).train()
        self.assertFalse(branch.backbone.training)
        tokens = branch.encode(torch.rand(1, 3, 30, 30))
        self.assertFalse(tokens.requires_grad, "a frozen ViT runs without autograd")


class TestGuideBranchSpeedOptions(unittest.TestCase):
    def test_blocks_after_feature_index_not_run(self):
        torch.manual_seed(0)
        branch = GuideBranch(2, 1, backbone_kwargs={"depth": 4}, guide_size=28, feature_index=1).eval()
        ran = []
        for i, blk in enumerate(branch.backbone.blocks):
            blk.register_forward_hook(lambda *a, i=i: ran.append(i))
        x = torch.rand(2, 1, 30, 30)
        with torch.no_grad():
            tokens = branch.encode(x)
            self.assertEqual(ran, [0, 1])  # encode stopped after block 1
            full = branch.backbone.forward_intermediates(
                branch.to_dino_input(branch.scale_intensity(x)), indices=[1], intermediates_only=True, norm=True
            )[0]
        self.assertEqual(ran, [0, 1, 0, 1, 2, 3])  # the reference ran all four blocks
        torch.testing.assert_close(tokens, full, rtol=0, atol=0)

    def test_vit_dtype_bf16_within_tolerance(self):
        torch.manual_seed(0)
        ref = GuideBranch(3, 1, backbone_kwargs=SMALL_VIT, guide_size=28).eval()
        bf16 = GuideBranch(3, 1, backbone_kwargs=SMALL_VIT, guide_size=28, vit_dtype="bfloat16").eval()
        bf16.load_state_dict(ref.state_dict())
        seen = []
        bf16.backbone.blocks[0].attn.qkv.register_forward_hook(lambda m, i, o: seen.append(o.dtype))
        x = torch.rand(1, 1, 20, 24, 6)
        with torch.no_grad():
            t_ref, t_bf16 = ref.encode(x), bf16.encode(x)
            g_ref, g_bf16 = ref(x), bf16(x)
        self.assertEqual(seen[0], torch.bfloat16)  # the ViT's matmuls really ran in bf16
        self.assertEqual(t_bf16.dtype, torch.float32)  # and the tokens come back in the input's precision
        self.assertFalse(torch.equal(t_ref, t_bf16))
        rel = float((t_bf16 - t_ref).norm() / t_ref.norm())
        self.assertLess(rel, 2e-2)
        torch.testing.assert_close(g_bf16, g_ref, rtol=0, atol=2e-2)

    def test_vit_dtype_ill_value(self):
        with self.assertRaisesRegex(ValueError, "vit_dtype"):
            GuideBranch(2, 1, backbone_kwargs=SMALL_VIT, vit_dtype="int8")


if __name__ == "__main__":
    unittest.main()
