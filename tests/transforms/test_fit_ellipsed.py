"""FitEllipsed / filled_ellipse: a ragged, fragmented head becomes the ellipse it was drawn from."""

from __future__ import annotations

import math
import unittest

import numpy as np
import torch
from monai.data import MetaTensor

from guidino_monai.metrics import filled_ellipse
from guidino_monai.transforms import FitEllipsed

H, W = 90, 120
CY, CX, A, B, ANGLE = 44.3, 61.7, 40.0, 26.0, 0.5  # semi-axes in pixels, major axis 0.5 rad from axis 1


def reference_ellipse(wobble: float = 0.0) -> np.ndarray:
    """The analytic ellipse, written out here (not with the code under test): pixel centres inside. ``wobble``
    makes its edge ragged: the normalised radius ``1 + wobble * sin(9 phi)`` (no second-moment change to first order).
    """
    out = np.zeros((H, W), dtype=bool)
    for y in range(H):
        for x in range(W):
            u = ((x - CX) * math.cos(ANGLE) + (y - CY) * math.sin(ANGLE)) / A
            v = (-(x - CX) * math.sin(ANGLE) + (y - CY) * math.cos(ANGLE)) / B
            out[y, x] = math.hypot(u, v) <= 1.0 + wobble * math.sin(9.0 * math.atan2(v, u))
    return out


def dice(a: np.ndarray, b: np.ndarray) -> float:
    return 2.0 * float((a & b).sum()) / float(a.sum() + b.sum())


def ragged_head() -> np.ndarray:
    """The reference ellipse with a wavy edge (up to 10% of the radius), a hole and a fragment."""
    head = reference_ellipse(wobble=0.1)
    head[40:46, 55:62] = False  # a hole
    head[2:8, 2:8] = True  # a fragment in a corner
    return head


class TestFilledEllipse(unittest.TestCase):
    def test_reference_ellipse_is_kept(self):
        truth = reference_ellipse()
        self.assertGreater(dice(filled_ellipse(truth), truth), 0.995)

    def test_ragged_head_becomes_its_ellipse(self):
        truth, head = reference_ellipse(), ragged_head()
        before, after = dice(head, truth), dice(filled_ellipse(head), truth)
        self.assertLess(before, 0.93)
        self.assertGreater(after, 0.985)
        self.assertFalse(filled_ellipse(head)[2:8, 2:8].any())  # the fragment is gone

    def test_empty_and_bad_shape(self):
        self.assertFalse(filled_ellipse(np.zeros((5, 6))).any())
        with self.assertRaisesRegex(ValueError, "2D"):
            filled_ellipse(np.zeros((3, 4, 5)))


class TestFitEllipsed(unittest.TestCase):
    def label_map(self) -> np.ndarray:
        m = ragged_head().astype(np.int64)[None]
        m[0, 80:86, 2:10] = 2  # another label, left alone
        return m

    def test_numpy_label_map(self):
        out = FitEllipsed("pred", applied_labels=[1])({"pred": self.label_map()})["pred"]
        self.assertEqual(out.shape, (1, H, W))
        self.assertGreater(dice(out[0] == 1, reference_ellipse()), 0.985)
        self.assertEqual(int((out == 2).sum()), 6 * 8)
        self.assertEqual(set(np.unique(out).tolist()), {0, 1, 2})

    def test_metatensor_keeps_meta_and_trailing_singleton(self):
        affine = torch.diag(torch.tensor([0.2, 0.3, 1.0, 1.0], dtype=torch.float64))
        img = MetaTensor(torch.as_tensor(self.label_map()[..., None], dtype=torch.float32), affine=affine,
                         meta={"filename_or_obj": "x"})  # fmt: skip
        out = FitEllipsed("pred", applied_labels=[1])({"pred": img})["pred"]
        self.assertIsInstance(out, MetaTensor)
        self.assertEqual(tuple(out.shape), (1, H, W, 1))
        self.assertEqual(out.dtype, torch.float32)
        torch.testing.assert_close(out.affine, affine)
        self.assertEqual(out.meta["filename_or_obj"], "x")
        self.assertGreater(dice(out[0, ..., 0].numpy() == 1, reference_ellipse()), 0.985)
        self.assertTrue(bool((img[0, 2:8, 2:8] == 1).all()))  # the input is untouched

    def test_no_labels_is_a_no_op_and_3d_is_refused(self):
        m = self.label_map()
        np.testing.assert_array_equal(FitEllipsed("p", applied_labels=[])({"p": m})["p"], m)
        empty = np.zeros((1, 5, 6), dtype=np.int64)
        np.testing.assert_array_equal(FitEllipsed("p", [1])({"p": empty})["p"], empty)
        with self.assertRaisesRegex(ValueError, "2D label map"):
            FitEllipsed("p", [1])({"p": np.zeros((1, 4, 5, 6))})


if __name__ == "__main__":
    unittest.main()
