"""benchmarks/click_error_anatomy.py's pieces and local rules, on small arrays whose answers are known."""

from __future__ import annotations

import sys
import unittest
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
import click_error_anatomy as anatomy  # noqa: E402
import click_refinement  # noqa: E402


class TestErrorPieces(unittest.TestCase):
    def test_sizes_largest_first_and_face_connected(self):
        label = np.zeros((10, 10, 10), dtype=np.int64)
        pred = label.copy()
        pred[1:3, 1:3, 1] = 1  # 4 wrong voxels, one piece
        pred[6, 6, 6] = 2  # 1 wrong voxel
        pred[7, 7, 7] = 2  # diagonal to the one above: another piece (face connectivity, as next_click)
        np.testing.assert_array_equal(anatomy.error_pieces(pred, label), [4, 1, 1])
        np.testing.assert_array_equal(anatomy.error_pieces(label, label), [])

    def test_fix_piece_touches_only_the_clicked_piece(self):
        label = np.zeros((8, 8, 8), dtype=np.int64)
        pred = label.copy()
        pred[1, 1, 1:4] = 1
        pred[6, 6, 6] = 1
        out = click_refinement.fix_pieces(pred, label, [[1, 1, 2]])
        self.assertFalse(out[1, 1, 1:4].any())
        self.assertEqual(out[6, 6, 6], 1)


class TestLocalRules(unittest.TestCase):
    def setUp(self):
        self.shape = (24, 24, 24)
        self.label = np.zeros(self.shape, dtype=np.int64)
        self.label[5:19, 5:19, 5:19] = 1
        self.pred = np.zeros_like(self.label)
        self.pred[6:18, 6:18, 6:18] = 1  # one shell too small all round (the shell is one face-connected piece)
        self.click = [12, 12, 18]  # a missed voxel on the shell

    def test_dilate_grows_one_voxel_near_the_click_only(self):
        out = anatomy.dilate_near(self.pred, self.click, target=1, radius=3.0)
        grown = (out == 1) & (self.pred == 0)
        self.assertTrue(grown[tuple(self.click)])
        near = click_refinement.ball(self.shape, self.click, 3.0)
        self.assertFalse((grown & ~near).any())  # nothing beyond the radius
        far = [12, 12, 5]  # the opposite side of the shell stays as it was
        self.assertEqual(out[tuple(far)], self.pred[tuple(far)])
        self.assertFalse((grown & (self.label == 0)).any())  # one voxel out is the true shell here
        self.assertGreater(int(grown.sum()), 1)

    def test_flip_uses_the_threshold_and_the_predicted_class(self):
        probs = np.zeros((3,) + self.shape, dtype=np.float32)
        probs[0] = 1.0
        probs[1, 12, 12, 16:20] = 0.3  # along the click's line: two voxels inside the prediction, two outside
        probs[1, 12, 14, 18] = 0.01  # below the threshold
        pred = self.pred.copy()
        pred[12, 10, 18] = 2  # another class inside the radius: never taken
        probs[1, 12, 10, 18] = 0.9
        out = anatomy.flip_near(pred, probs, self.click, target=1, radius=3.0, threshold=0.1)
        self.assertTrue((out[12, 12, 16:20] == 1).all())
        self.assertEqual(out[12, 14, 18], 0)
        self.assertEqual(out[12, 10, 18], 2)

    def test_first_click_rules(self):
        probs = np.stack([1.0 - self.pred, self.pred.astype(float), np.zeros(self.shape)]).astype(np.float32)
        rows = anatomy.first_click_rules(self.pred, probs, self.label)
        self.assertGreater(rows["piece"]["gain"], 0.0)
        self.assertEqual(rows["piece"]["broken"], 0)
        self.assertEqual(rows["piece"]["fixed"], int((self.pred != self.label).sum()))  # the shell is one piece
        # the prediction is one shell too small everywhere, so a one-voxel growth near the click only fixes voxels
        self.assertGreater(rows["dilate_R8"]["fixed"], 1)
        self.assertEqual(rows["dilate_R8"]["broken"], 0)
        self.assertEqual(anatomy.first_click_rules(self.label, probs, self.label), {})


if __name__ == "__main__":
    unittest.main()
