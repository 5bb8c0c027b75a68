"""world_points_to_grid: clicks on a 2D NIfTI (4x4 file affine) onto its 2D grid (3x3 affine), and 3D as before."""

from __future__ import annotations

import unittest

import numpy as np

from guidino_monai.interactive import world_points_to_grid


class TestWorldPointsToGrid(unittest.TestCase):
    def test_2d_file_affine_to_2d_grid(self):
        file_affine = np.diag([0.2, 0.3, 1.0, 1.0])  # a 2D NIfTI: 0.2 x 0.3 mm pixels, 4x4 affine
        grid_affine = np.array([[0.4, 0.0, 1.0], [0.0, 0.6, -3.0], [0.0, 0.0, 1.0]])  # resized 2x, shifted
        out = world_points_to_grid([[10, 20], [0, 0]], file_affine, grid_affine)
        # by hand: world (2.0, 6.0) -> ((2.0 - 1.0) / 0.4, (6.0 + 3.0) / 0.6); world (0, 0) -> (-2.5, 5.0)
        np.testing.assert_allclose(out, [[2.5, 15.0], [-2.5, 5.0]], atol=1e-9)

    def test_3d_unchanged(self):
        a = np.diag([1.0, 2.0, 3.0, 1.0])
        b = np.diag([2.0, 2.0, 2.0, 1.0])
        np.testing.assert_allclose(world_points_to_grid([[2, 4, 6]], a, b), [[1.0, 4.0, 9.0]], atol=1e-9)


if __name__ == "__main__":
    unittest.main()
