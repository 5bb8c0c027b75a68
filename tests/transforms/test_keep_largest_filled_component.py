"""KeepLargestFilledComponentd: fragments dropped, holes filled, other labels and meta data kept."""

from __future__ import annotations

import unittest

import numpy as np
import torch
from monai.data import MetaTensor

from guidino_monai.transforms import KeepLargestFilledComponentd


def label_map() -> np.ndarray:
    m = np.zeros((1, 20, 24), dtype=np.int64)
    m[0, 2:12, 2:14] = 1  # the head: a 10x12 block ...
    m[0, 5:8, 6:9] = 0  # ... with a 3x3 hole
    m[0, 15:18, 18:21] = 1  # a fragment
    m[0, 15:19, 2:5] = 2  # another label, left alone
    return m


class TestKeepLargestFilledComponentd(unittest.TestCase):
    def test_numpy(self):
        out = KeepLargestFilledComponentd("pred", applied_labels=[1])({"pred": label_map()})["pred"]
        expected = np.zeros((1, 20, 24), dtype=np.int64)
        expected[0, 2:12, 2:14] = 1
        expected[0, 15:19, 2:5] = 2
        np.testing.assert_array_equal(out, expected)

    def test_metatensor_keeps_meta(self):
        affine = torch.diag(torch.tensor([0.2, 0.3, 1.0, 1.0], dtype=torch.float64))
        img = MetaTensor(torch.as_tensor(label_map(), dtype=torch.float32), affine=affine, meta={"filename_or_obj": "x"})
        out = KeepLargestFilledComponentd("pred", applied_labels=[1, 2])({"pred": img})["pred"]
        self.assertIsInstance(out, MetaTensor)
        self.assertEqual(out.dtype, torch.float32)
        torch.testing.assert_close(out.affine, affine)
        self.assertEqual(out.meta["filename_or_obj"], "x")
        self.assertEqual(int((out == 1).sum()), 10 * 12)
        self.assertEqual(int((out == 2).sum()), 12)
        self.assertEqual(int((img == 1).sum()), 10 * 12 - 9 + 9)  # input untouched (120 - hole 9 + fragment 9)

    def test_empty_and_bad_shape(self):
        empty = np.zeros((1, 5, 5), dtype=np.int64)
        np.testing.assert_array_equal(KeepLargestFilledComponentd("p", [1])({"p": empty})["p"], empty)
        with self.assertRaisesRegex(ValueError, "one channel"):
            KeepLargestFilledComponentd("p", [1])({"p": np.zeros((2, 5, 5))})


if __name__ == "__main__":
    unittest.main()
