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

import unittest

import torch
import torch.nn.functional as F
from monai.bundle import ConfigParser
from monai.losses import DiceCELoss
from parameterized import parameterized

from guidino_monai.losses import BoundaryHingeLoss, GuidedDiceCELoss, GuideSupervisionLoss, split_guided_output
from guidino_monai.losses.guide import boundary_band

# A 4x4 label map (classes 0, 1, 2) and a 2x2 guide.
# Foreground (value > 0) fraction of each 2x2 cell: top-left 3/4, top-right 0, bottom-left 0, bottom-right 1.
LABEL_4X4 = torch.tensor([[1, 1, 0, 0], [1, 0, 0, 0], [0, 0, 2, 2], [0, 0, 2, 2]])
GUIDE_2X2 = torch.tensor([[0.5, 0.25], [0.0, 1.0]])
TARGET_2X2 = torch.tensor([[0.75, 0.0], [0.0, 1.0]])

# mse:  ((0.5 - 0.75)^2 + (0.25 - 0)^2 + 0 + 0) / 4 = (0.0625 + 0.0625) / 4 = 0.03125
# bce:  cell TL: -(0.75 ln 0.5 + 0.25 ln 0.5) = ln 2 = 0.6931472
#       cell TR: -ln(1 - 0.25) = 0.2876821
#       cells BL (g=0, t=0) and BR (g=1, t=1): -ln(1 - 1e-6) = 1e-6 each after clamping to [1e-6, 1 - 1e-6]
#       mean = (0.6931472 + 0.2876821 + 2e-6) / 4 = 0.2452078
# dice: sum(g t) = 0.5 * 0.75 + 1 * 1 = 1.375; sum(g) = 1.75; sum(t) = 1.75
#       1 - (2 * 1.375 + 1e-5) / (3.5 + 1e-5) = 1 - 2.75001 / 3.50001 = 0.2142837
GUIDE_VALUE_CASES = [("mse", 0.03125), ("bce", 0.2452078), ("dice", 0.2142837)]


def _label_2d() -> torch.Tensor:
    return LABEL_4X4.view(1, 1, 4, 4)


def _onehot_2d() -> torch.Tensor:
    return F.one_hot(LABEL_4X4, 3).permute(2, 0, 1)[None].float()  # (1, 3, 4, 4)


def _label_3d() -> torch.Tensor:
    # the 4x4 pattern on 2 slices along the last axis: (1, 1, 4, 4, 2)
    return LABEL_4X4[..., None].repeat(1, 1, 2).view(1, 1, 4, 4, 2)


class TestSplitGuidedOutput(unittest.TestCase):
    def test_tensor(self):
        x = torch.zeros(2, 3, 8, 8)
        logits, guide = split_guided_output(x)
        self.assertIs(logits, x)
        self.assertIsNone(guide)

    @parameterized.expand([("tuple", tuple), ("list", list)])
    def test_sequence(self, _, container):
        x, g = torch.zeros(2, 3, 8, 8), torch.zeros(2, 1, 4, 4)
        logits, guide = split_guided_output(container([x, g]))
        self.assertIs(logits, x)
        self.assertIs(guide, g)

    def test_dict(self):
        x, g = torch.zeros(2, 3, 8, 8), torch.zeros(2, 1, 4, 4)
        logits, guide = split_guided_output({"pred": x, "guide": g})
        self.assertIs(logits, x)
        self.assertIs(guide, g)
        logits, guide = split_guided_output({"pred": x})
        self.assertIs(logits, x)
        self.assertIsNone(guide)

    @parameterized.expand(
        [
            ("int", 3),
            ("none", None),
            ("three_elements", (torch.zeros(1), torch.zeros(1), torch.zeros(1))),
            ("no_pred_key", {"logits": torch.zeros(1)}),
            ("logits_not_tensor", ([1.0], torch.zeros(1))),
            ("guide_not_tensor", (torch.zeros(1), "guide")),
        ]
    )
    def test_type_error(self, _, output):
        with self.assertRaises(TypeError):
            split_guided_output(output)


class TestGuideSupervisionLoss(unittest.TestCase):
    @parameterized.expand(GUIDE_VALUE_CASES)
    def test_value_label_map_2d(self, mode, expected):
        loss = GuideSupervisionLoss(mode=mode)(GUIDE_2X2.view(1, 1, 2, 2), _label_2d())
        self.assertEqual(loss.shape, torch.Size([]))
        self.assertAlmostEqual(loss.item(), expected, places=5)

    def test_downsampled_target(self):
        # a guide equal to the hand-computed foreground fractions has zero MSE, for label-map and one-hot targets
        for target in (_label_2d(), _onehot_2d()):
            loss = GuideSupervisionLoss(mode="mse")(TARGET_2X2.view(1, 1, 2, 2), target)
            self.assertAlmostEqual(loss.item(), 0.0, places=7)
        self.assertGreater(GuideSupervisionLoss()(torch.zeros(1, 1, 2, 2), _label_2d()).item(), 0.0)

    @parameterized.expand(GUIDE_VALUE_CASES)
    def test_value_onehot_2d(self, mode, expected):
        # one-hot target: foreground = channel 1 + channel 2, same as the label map
        loss = GuideSupervisionLoss(mode=mode)(GUIDE_2X2.view(1, 1, 2, 2), _onehot_2d())
        self.assertAlmostEqual(loss.item(), expected, places=5)

    @parameterized.expand(GUIDE_VALUE_CASES)
    def test_value_3d(self, mode, expected):
        # label (1, 1, 4, 4, 2) to guide (1, 1, 2, 2, 1): both slices hold the same pattern, so the area average
        # over the last axis keeps the fractions; and to guide (1, 1, 2, 2, 2) (last axis kept as is).
        # mse and bce are means, unchanged; dice doubles numerator and denominator sums, which changes the smoothing
        # only: 1 - (2 * 2.75 + 1e-5) / (7 + 1e-5) = 0.2142851, equal to 5 places.
        label = _label_3d()
        for depth in (1, 2):
            guide = GUIDE_2X2.view(1, 1, 2, 2, 1).repeat(1, 1, 1, 1, depth)
            loss = GuideSupervisionLoss(mode=mode)(guide, label)
            self.assertAlmostEqual(loss.item(), expected, places=5)

    @parameterized.expand(
        [
            # label (4, 2) with the left column foreground, guide (2, 4): H is area-averaged 4 -> 2, giving rows
            # [1, 0]; W is linearly upsampled 2 -> 4 (align_corners=False, source x = (i + 0.5) / 2 - 0.5 clamped),
            # giving [1, 0.75, 0.25, 0]. A zero guide then has mse = (1 + 0.5625 + 0.0625 + 0) / 4 = 0.40625.
            ("mixed", (1, 1, 4, 2), (1, 1, 2, 4), 0.40625),
            # label (8, 2) to guide (4, 4): H area 8 -> 4, W linear 2 -> 4, same rows as above.
            ("mixed_tall", (1, 1, 8, 2), (1, 1, 4, 4), 0.40625),
            # label (2, 2) to guide (4, 4): W linear 2 -> 4 for both rows, H linear 2 -> 2*2 of constant rows.
            ("upsample", (1, 1, 2, 2), (1, 1, 4, 4), 0.40625),
            # 3D: label (2, 2, 4) -> guide (2, 4, 2): axis 1 upsampled, axis 2 area-averaged 4 -> 2
            ("mixed_3d", (1, 1, 2, 2, 4), (1, 1, 2, 4, 2), 0.40625),
        ]
    )
    def test_any_grid_sizes(self, _, label_shape, guide_shape, expected):
        label = torch.zeros(label_shape)
        if len(label_shape) == 4:
            label[:, :, :, : label_shape[3] // 2] = 1  # left half of W
        else:
            label[:, :, :, : label_shape[3] // 2, :] = 1  # left half of the second spatial axis
        loss = GuideSupervisionLoss(mode="mse")(torch.zeros(guide_shape), label)
        self.assertAlmostEqual(loss.item(), expected, places=6)

    def test_reduction_shapes(self):
        # sample 0: the pinned case (mse 0.03125); sample 1: guide all ones on an empty label, mse = 1
        guide = torch.stack([GUIDE_2X2, torch.ones(2, 2)])[:, None]
        label = torch.stack([LABEL_4X4, torch.zeros(4, 4, dtype=torch.long)])[:, None]
        none = GuideSupervisionLoss(reduction="none")(guide, label)
        self.assertEqual(none.shape, (2, 1, 1, 1))
        torch.testing.assert_close(none.flatten(), torch.tensor([0.03125, 1.0]))
        self.assertAlmostEqual(GuideSupervisionLoss(reduction="sum")(guide, label).item(), 1.03125, places=6)
        self.assertAlmostEqual(GuideSupervisionLoss(reduction="mean")(guide, label).item(), 0.515625, places=6)
        none_3d = GuideSupervisionLoss(reduction="none")(torch.rand(3, 1, 2, 2, 2), torch.zeros(3, 1, 4, 4, 4))
        self.assertEqual(none_3d.shape, (3, 1, 1, 1, 1))

    @parameterized.expand([("mse",), ("bce",), ("dice",)])
    def test_gradient_and_empty_foreground(self, mode):
        torch.manual_seed(0)
        guide = torch.rand(2, 1, 4, 4, 3).mul(0.8).add(0.1).requires_grad_(True)
        for label in (torch.randint(0, 3, (2, 1, 8, 8, 6)), torch.zeros(2, 1, 8, 8, 6)):
            guide.grad = None
            loss = GuideSupervisionLoss(mode=mode)(guide, label)
            self.assertTrue(torch.isfinite(loss))
            loss.backward()
            self.assertIsNotNone(guide.grad)
            self.assertTrue(torch.isfinite(guide.grad).all())
            self.assertGreater(guide.grad.abs().sum().item(), 0.0)

    def test_empty_foreground_perfect_guide(self):
        # a zero guide on an empty label is a perfect prediction for every mode (dice: 1 - 1e-5 / 1e-5 = 0)
        for mode in ("mse", "bce", "dice"):
            loss = GuideSupervisionLoss(mode=mode)(torch.zeros(1, 1, 2, 2), torch.zeros(1, 1, 4, 4))
            self.assertAlmostEqual(loss.item(), 0.0, places=5)

    def test_bce_autocast(self):
        # saturated bf16 guide inside autocast: clamped, computed in float32, finite
        guide = torch.tensor([[0.0, 1.0], [1.0, 0.0]], dtype=torch.bfloat16).view(1, 1, 2, 2)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = GuideSupervisionLoss(mode="bce")(guide, _label_2d())
        self.assertEqual(loss.dtype, torch.float32)
        self.assertTrue(torch.isfinite(loss))
        # every cell is wrong: TL (t=0.75, g=0) costs 0.75 * -ln(1e-6), TR/BL (t=0, g=1) and BR (t=1, g=0) cost
        # -ln(1e-6) = 13.8155 each (up to float32 rounding of 1 - 1e-6): (0.75 + 3) * 13.8155 / 4 = 12.952
        self.assertAlmostEqual(loss.item(), 12.952, delta=0.05)

    def test_ill_arg(self):
        with self.assertRaises(ValueError):
            GuideSupervisionLoss(mode="l1")
        with self.assertRaises(ValueError):
            GuideSupervisionLoss(reduction="max")

    def test_ill_shape(self):
        loss = GuideSupervisionLoss()
        with self.assertRaisesRegex(ValueError, r"\(1, 1, 2, 2\).*\(1, 1, 4, 4, 4\)"):
            loss(torch.zeros(1, 1, 2, 2), torch.zeros(1, 1, 4, 4, 4))
        with self.assertRaisesRegex(ValueError, r"\(2, 1, 2, 2\).*\(1, 1, 4, 4\)"):
            loss(torch.zeros(2, 1, 2, 2), torch.zeros(1, 1, 4, 4))
        with self.assertRaises(ValueError):
            loss(torch.zeros(1, 2, 2, 2), torch.zeros(1, 1, 4, 4))


def _box(shape, *slices) -> torch.Tensor:
    out = torch.zeros(shape, dtype=torch.bool)
    out[slices] = True
    return out


class TestBoundaryBand(unittest.TestCase):
    def test_square_2d(self):
        # 4x4 square at [2:6, 2:6] in 8x8; 3x3 dilation = [1:7, 1:7], erosion = [3:5, 3:5]: a ring of 36 - 4 = 32
        mask = _box((8, 8), slice(2, 6), slice(2, 6))
        expected = _box((8, 8), slice(1, 7), slice(1, 7)) & ~_box((8, 8), slice(3, 5), slice(3, 5))
        band = boundary_band(mask[None, None].float(), 1)
        self.assertEqual(band.dtype, torch.bool)
        self.assertEqual(band.shape, (1, 1, 8, 8))
        self.assertTrue(torch.equal(band[0, 0], expected))
        self.assertEqual(int(band.sum()), 32)

    def test_square_2d_width_2(self):
        # 4x4 square at [3:7, 3:7] in 10x10; 5x5 dilation = [1:9, 1:9]; 5x5 erosion of a 4-wide square is empty
        mask = _box((10, 10), slice(3, 7), slice(3, 7))
        expected = _box((10, 10), slice(1, 9), slice(1, 9))
        band = boundary_band(mask[None, None], 2)
        self.assertTrue(torch.equal(band[0, 0], expected))
        self.assertEqual(int(band.sum()), 64)

    def test_cube_3d(self):
        # 3x3x3 cube at [2:5]^3 in 7^3; dilation = [1:6]^3 (125 voxels), erosion = the centre (3, 3, 3): 124
        mask = _box((7, 7, 7), slice(2, 5), slice(2, 5), slice(2, 5))
        expected = _box((7, 7, 7), slice(1, 6), slice(1, 6), slice(1, 6))
        expected[3, 3, 3] = False
        band = boundary_band(mask[None, None].float(), 1)
        self.assertEqual(band.shape, (1, 1, 7, 7, 7))
        self.assertTrue(torch.equal(band[0, 0], expected))
        self.assertEqual(int(band.sum()), 124)

    def test_border_is_not_a_boundary(self):
        # top half of a 6x6 image: only rows 2 (inside) and 3 (outside) are in the band, not the image edges
        mask = _box((6, 6), slice(0, 3), slice(None))
        expected = _box((6, 6), slice(2, 4), slice(None))
        band = boundary_band(mask[None, None], 1)
        self.assertTrue(torch.equal(band[0, 0], expected))
        self.assertFalse(boundary_band(torch.ones(1, 2, 5, 5), 1).any())
        self.assertFalse(boundary_band(torch.zeros(1, 2, 5, 5), 1).any())

    def test_ill_arg(self):
        with self.assertRaises(ValueError):
            boundary_band(torch.zeros(1, 1, 4, 4), 0)
        with self.assertRaises(ValueError):
            boundary_band(torch.zeros(1, 1, 4, 4), 1.5)
        with self.assertRaises(ValueError):
            boundary_band(torch.zeros(1, 1, 2, 2, 2, 2), 1)


# 3 classes on a 1x5 row, label [0, 0, 1, 1, 2]; logits per class:
LOGITS_3C = torch.tensor([[3.0, 1.0, 0.0, 0.0, 0.0], [0.0, 0.0, 2.0, 0.5, 1.5], [0.0, 0.0, 0.0, 0.0, 2.0]])
LABEL_3C = torch.tensor([0, 0, 1, 1, 2])
# class 1: mask [0,0,1,1,0], dilation [0,1,1,1,1], erosion [0,0,0,0,0] -> band at x = 1..4
#   x=1: s=-1, m = 0 - max(1, 0) = -1    -> relu(1 - 1) = 0
#   x=2: s=+1, m = 2 - max(0, 0) = 2     -> relu(1 - 2) = 0
#   x=3: s=+1, m = 0.5 - max(0, 0) = 0.5 -> relu(1 - 0.5) = 0.5
#   x=4: s=-1, m = 1.5 - max(0, 2) = -0.5 -> relu(1 - 0.5) = 0.5      class 1 mean = 1 / 4 = 0.25
# class 2: mask [0,0,0,0,1], dilation [0,0,0,1,1], erosion [0,0,0,0,0] -> band at x = 3, 4
#   x=3: s=-1, m = 0 - max(0, 0.5) = -0.5 -> 0.5
#   x=4: s=+1, m = 2 - max(0, 1.5) = 0.5  -> 0.5                      class 2 mean = 0.5
HINGE_3C_PER_CLASS = [0.25, 0.5]


def _two_class_case():
    """6x6, foreground square [2:4, 2:4]; band = [1:5, 1:5] (16 voxels, the 2x2 erosion is empty).

    Class-1 logit 2.0 inside the square except (2, 2) at 0.25, -0.5 outside; class-0 logit 0.
    Class 1 (m = l1 - l0 = l1): 3 inside voxels relu(1 - 2) = 0, (2, 2) relu(1 - 0.25) = 0.75,
    12 outside band voxels relu(1 - 0.5) = 0.5 -> (0.75 + 6) / 16 = 0.421875.
    Class 0 (m = -l1, s flipped) gives the same numbers: 0.421875.
    """
    label = torch.zeros(1, 1, 6, 6, dtype=torch.long)
    label[..., 2:4, 2:4] = 1
    l1 = torch.full((6, 6), -0.5)
    l1[2:4, 2:4] = 2.0
    l1[2, 2] = 0.25
    logits = torch.stack([torch.zeros(6, 6), l1])[None]
    return logits, label


class TestBoundaryHingeLoss(unittest.TestCase):
    def test_value_multiclass(self):
        logits, label = LOGITS_3C.view(1, 3, 1, 5), LABEL_3C.view(1, 1, 1, 5)
        self.assertAlmostEqual(BoundaryHingeLoss()(logits, label).item(), 0.375, places=6)
        self.assertAlmostEqual(BoundaryHingeLoss(reduction="sum")(logits, label).item(), 0.75, places=6)
        none = BoundaryHingeLoss(reduction="none")(logits, label)
        self.assertEqual(none.shape, (1, 2, 1, 1))
        torch.testing.assert_close(none.flatten(), torch.tensor(HINGE_3C_PER_CLASS))
        # one-hot target gives the same result
        onehot = F.one_hot(LABEL_3C, 3).T.reshape(1, 3, 1, 5).float()
        self.assertAlmostEqual(BoundaryHingeLoss(to_onehot_y=False)(logits, onehot).item(), 0.375, places=6)

    @parameterized.expand([("no_background", False), ("with_background", True)])
    def test_value_two_class(self, _, include_background):
        logits, label = _two_class_case()
        loss = BoundaryHingeLoss(include_background=include_background, reduction="none")(logits, label)
        self.assertEqual(loss.shape, (1, 2 if include_background else 1, 1, 1))
        torch.testing.assert_close(loss.flatten(), torch.full((loss.numel(),), 0.421875))

    def test_value_binary_sigmoid(self):
        # single foreground logit channel: same margins as class 1 of the two-class case
        logits, label = _two_class_case()
        loss = BoundaryHingeLoss(include_background=True, to_onehot_y=False, sigmoid=True, softmax=False)
        self.assertAlmostEqual(loss(logits[:, 1:], label).item(), 0.421875, places=6)

    def test_value_sigmoid_multichannel(self):
        # sigmoid=True: m_c = logit_c, without subtracting the other classes. Class 1 of LOGITS_3C, band x = 1..4:
        # x=1: s=-1, m=0 -> 1; x=2: s=+1, m=2 -> 0; x=3: s=+1, m=0.5 -> 0.5; x=4: s=-1, m=1.5 -> 2.5; mean 1.0
        # class 2, band x = 3, 4: x=3: s=-1, m=0 -> 1; x=4: s=+1, m=2 -> 0; mean 0.5
        loss = BoundaryHingeLoss(sigmoid=True, softmax=False, reduction="none")
        out = loss(LOGITS_3C.view(1, 3, 1, 5), LABEL_3C.view(1, 1, 1, 5))
        torch.testing.assert_close(out.flatten(), torch.tensor([1.0, 0.5]))

    def test_value_3d(self):
        # cube [2:5]^3 in 7^3, band 124 voxels (26 inside, 98 outside); l1 = 0.5, l0 = 0 everywhere: m = 0.5
        # inside: relu(1 - 0.5) = 0.5; outside: relu(1 + 0.5) = 1.5 -> (26 * 0.5 + 98 * 1.5) / 124 = 160 / 124
        label = torch.zeros(1, 1, 7, 7, 7, dtype=torch.long)
        label[..., 2:5, 2:5, 2:5] = 1
        logits = torch.stack([torch.zeros(7, 7, 7), torch.full((7, 7, 7), 0.5)])[None]
        self.assertAlmostEqual(BoundaryHingeLoss()(logits, label).item(), 160 / 124, places=5)

    def test_value_band_width_2(self):
        # 2x2 square [2:4, 2:4] in 6x6, band width 2: band = the whole 6x6 (36 voxels); l1 = 0.5, l0 = 0
        # 4 inside voxels cost 0.5, 32 outside cost 1.5 -> (2 + 48) / 36 = 50 / 36
        label = torch.zeros(1, 1, 6, 6, dtype=torch.long)
        label[..., 2:4, 2:4] = 1
        logits = torch.stack([torch.zeros(6, 6), torch.full((6, 6), 0.5)])[None]
        self.assertAlmostEqual(BoundaryHingeLoss(band_width=2)(logits, label).item(), 50 / 36, places=5)

    def test_empty_band_and_gradient(self):
        # sample 0: the two-class case (0.421875); sample 1: all background, empty band -> exactly 0, not NaN
        logits, label = _two_class_case()
        logits = torch.cat([logits, torch.randn(1, 2, 6, 6)]).requires_grad_(True)
        label = torch.cat([label, torch.zeros_like(label)])
        none = BoundaryHingeLoss(reduction="none")(logits, label)
        torch.testing.assert_close(none.flatten(), torch.tensor([0.421875, 0.0]))
        loss = BoundaryHingeLoss()(logits, label)
        self.assertAlmostEqual(loss.item(), 0.421875 / 2, places=6)
        loss.backward()
        self.assertTrue(torch.isfinite(logits.grad).all())
        self.assertGreater(logits.grad[0].abs().sum().item(), 0.0)
        self.assertEqual(logits.grad[1].abs().sum().item(), 0.0)

    def test_single_channel_warns(self):
        logits, label = _two_class_case()
        with self.assertWarns(UserWarning):
            loss = BoundaryHingeLoss()(logits[:, 1:], label)  # defaults: softmax=True, to_onehot_y=True
        self.assertAlmostEqual(loss.item(), 0.421875, places=6)

    def test_ill_arg(self):
        with self.assertRaises(ValueError):
            BoundaryHingeLoss(sigmoid=True, softmax=True)
        with self.assertRaises(ValueError):
            BoundaryHingeLoss(band_width=0)
        with self.assertRaises(ValueError):
            BoundaryHingeLoss(margin=-1.0)
        with self.assertRaises(ValueError):
            BoundaryHingeLoss(reduction="max")

    def test_ill_shape(self):
        loss = BoundaryHingeLoss()
        with self.assertRaisesRegex(ValueError, r"\(1, 3, 4, 4\).*\(1, 1, 4, 5\)"):
            loss(torch.zeros(1, 3, 4, 4), torch.zeros(1, 1, 4, 5))
        with self.assertRaises(ValueError):
            loss(torch.zeros(1, 3, 4, 4), torch.zeros(1, 1, 4, 4, 4))
        with self.assertRaises(ValueError):
            loss(torch.zeros(1, 3, 4, 4), torch.zeros(1, 3, 4, 4))  # to_onehot_y with a one-hot target
        with self.assertRaises(ValueError):
            BoundaryHingeLoss(to_onehot_y=False)(torch.zeros(1, 3, 4, 4), torch.zeros(1, 2, 4, 4))


def _guided_case(spatial_dims: int):
    torch.manual_seed(spatial_dims)
    shape, guide_shape = ((8, 8), (4, 4)) if spatial_dims == 2 else ((8, 8, 6), (4, 4, 6))
    logits = torch.randn(2, 3, *shape, requires_grad=True)
    guide = torch.rand(2, 1, *guide_shape, requires_grad=True)
    label = torch.randint(0, 3, (2, 1, *shape))
    return logits, guide, label


DICE_CE_ARGS = {"to_onehot_y": True, "softmax": True, "include_background": False, "lambda_ce": 0.7}


class TestGuidedDiceCELoss(unittest.TestCase):
    @parameterized.expand([(2,), (3,)])
    def test_tensor_equals_dice_ce(self, spatial_dims):
        logits, _, label = _guided_case(spatial_dims)
        expected = DiceCELoss(**DICE_CE_ARGS)(logits, label)
        result = GuidedDiceCELoss(**DICE_CE_ARGS)(logits, label)
        self.assertEqual(result.shape, torch.Size([]))
        torch.testing.assert_close(result, expected)

    @parameterized.expand([(2, "mse"), (3, "mse"), (2, "bce"), (3, "dice")])
    def test_pair_adds_guide_term(self, spatial_dims, guide_mode):
        logits, guide, label = _guided_case(spatial_dims)
        dice_ce = DiceCELoss(**DICE_CE_ARGS)(logits, label)
        guide_term = GuideSupervisionLoss(mode=guide_mode)(guide, label)
        self.assertGreater(guide_term.item(), 0.0)
        loss = GuidedDiceCELoss(**DICE_CE_ARGS, lambda_guide=0.3, guide_mode=guide_mode)
        for output in ((logits, guide), [logits, guide], {"pred": logits, "guide": guide}):
            torch.testing.assert_close(loss(output, label), dice_ce + 0.3 * guide_term)
        # eval-style output with no guide, and lambda_guide=0: DiceCE only
        torch.testing.assert_close(loss({"pred": logits}, label), dice_ce)
        torch.testing.assert_close(GuidedDiceCELoss(**DICE_CE_ARGS, lambda_guide=0.0)((logits, guide), label), dice_ce)

    @parameterized.expand([(2,), (3,)])
    def test_hinge_term(self, spatial_dims):
        logits, guide, label = _guided_case(spatial_dims)
        dice_ce = DiceCELoss(**DICE_CE_ARGS)(logits, label)
        hinge = BoundaryHingeLoss(band_width=2, margin=0.5, include_background=False)(logits, label)
        guide_term = GuideSupervisionLoss()(guide, label)
        self.assertGreater(hinge.item(), 0.0)
        loss = GuidedDiceCELoss(**DICE_CE_ARGS, lambda_hinge=0.2, hinge_band_width=2, hinge_margin=0.5)
        torch.testing.assert_close(loss(logits, label), dice_ce + 0.2 * hinge)
        torch.testing.assert_close(loss((logits, guide), label), dice_ce + 0.2 * hinge + 0.5 * guide_term)
        self.assertIsNone(GuidedDiceCELoss(**DICE_CE_ARGS).hinge)

    def test_gradients_and_sum(self):
        logits, guide, label = _guided_case(3)
        loss = GuidedDiceCELoss(**DICE_CE_ARGS, lambda_hinge=0.1, reduction="sum")((logits, guide), label)
        self.assertEqual(loss.shape, torch.Size([]))
        loss.backward()
        for grad in (logits.grad, guide.grad):
            self.assertIsNotNone(grad)
            self.assertTrue(torch.isfinite(grad).all())
            self.assertGreater(grad.abs().sum().item(), 0.0)

    def test_binary_sigmoid_onehot_target(self):
        # single-channel sigmoid setup with a binary target; guide foreground = target > 0
        torch.manual_seed(0)
        logits, guide = torch.randn(2, 1, 8, 8), torch.rand(2, 1, 4, 4)
        label = (torch.rand(2, 1, 8, 8) > 0.5).float()
        args = {"sigmoid": True, "lambda_hinge": 0.5}
        expected = (
            DiceCELoss(sigmoid=True)(logits, label)
            + 0.5
            * BoundaryHingeLoss(include_background=True, to_onehot_y=False, sigmoid=True, softmax=False)(logits, label)
            + 0.5 * GuideSupervisionLoss()(guide, label)
        )
        torch.testing.assert_close(GuidedDiceCELoss(**args)((logits, guide), label), expected)

    def test_weight_list(self):
        logits, _, label = _guided_case(2)
        expected = DiceCELoss(to_onehot_y=True, softmax=True, weight=torch.tensor([1.0, 2.0, 3.0]))(logits, label)
        result = GuidedDiceCELoss(to_onehot_y=True, softmax=True, weight=[1.0, 2.0, 3.0])(logits, label)
        torch.testing.assert_close(result, expected)

    @parameterized.expand(
        [
            ("lambda_dice", {"lambda_dice": -1.0}),
            ("lambda_ce", {"lambda_ce": -0.1}),
            ("lambda_guide", {"lambda_guide": -0.5}),
            ("lambda_hinge", {"lambda_hinge": -0.5}),
            ("sigmoid_softmax", {"sigmoid": True, "softmax": True}),
            ("guide_mode", {"guide_mode": "l1"}),
            ("reduction_none", {"reduction": "none"}),
        ]
    )
    def test_ill_arg(self, _, kwargs):
        with self.assertRaises(ValueError):
            GuidedDiceCELoss(**kwargs)

    def test_ill_input(self):
        logits, guide, label = _guided_case(2)
        loss = GuidedDiceCELoss(**DICE_CE_ARGS)
        with self.assertRaises(TypeError):
            loss((logits, guide, guide), label)
        with self.assertRaises(ValueError):
            loss((logits, guide[:1]), label)  # guide batch 1 vs target batch 2


class TestBundleConfig(unittest.TestCase):
    def test_config_parser(self):
        config = {
            "loss": {
                "_target_": "guidino_monai.losses.GuidedDiceCELoss",
                "to_onehot_y": True,
                "softmax": True,
                "weight": [1.0, 2.0, 3.0],
                "lambda_guide": 0.25,
                "guide_mode": "bce",
                "lambda_hinge": 0.1,
                "hinge_band_width": 2,
            },
            "guide_loss": {"_target_": "guidino_monai.losses.GuideSupervisionLoss", "mode": "dice"},
            "hinge_loss": {"_target_": "guidino_monai.losses.BoundaryHingeLoss", "band_width": 3, "margin": 0.5},
        }
        parser = ConfigParser(config)
        loss = parser.get_parsed_content("loss")
        self.assertIsInstance(loss, GuidedDiceCELoss)
        self.assertEqual(loss.lambda_guide, 0.25)
        self.assertEqual(loss.guide_loss.mode, "bce")
        self.assertIsInstance(loss.hinge, BoundaryHingeLoss)
        self.assertEqual(loss.hinge.band_width, 2)
        logits, guide, label = _guided_case(2)
        self.assertTrue(torch.isfinite(loss((logits, guide), label)))
        guide_loss = parser.get_parsed_content("guide_loss")
        self.assertIsInstance(guide_loss, GuideSupervisionLoss)
        self.assertEqual(guide_loss.mode, "dice")
        hinge = parser.get_parsed_content("hinge_loss")
        self.assertIsInstance(hinge, BoundaryHingeLoss)
        self.assertEqual((hinge.band_width, hinge.margin), (3, 0.5))


if __name__ == "__main__":
    unittest.main()
