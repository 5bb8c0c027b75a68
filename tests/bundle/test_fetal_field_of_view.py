"""Fetal-head bundle: the network sees the whole image (resized, never cropped) and results come back at the image's
own size and spacing, for every image size that HC18 has."""

from __future__ import annotations

import tempfile
import unittest
from pathlib import Path

import nibabel as nib
import numpy as np
import torch
from bundle_utils import BUNDLES, FETAL
from monai.bundle import ConfigParser
from monai.transforms import Invertd


def parser(*configs: str, **override) -> ConfigParser:
    p = ConfigParser()
    p.read_config([str(BUNDLES / FETAL / "configs" / c) for c in configs])
    p.update({"bundle_root": str(BUNDLES / FETAL), **override})
    return p


def write_image(path: Path, shape: tuple[int, int], spacing: float) -> np.ndarray:
    img = np.random.default_rng(0).random(shape).astype(np.float32)
    nib.save(nib.Nifti1Image(img, np.diag([spacing, spacing, 1.0, 1.0])), str(path))
    return img


class TestFetalFieldOfView(unittest.TestCase):
    def test_whole_image_in_and_native_size_out(self):
        for configs, key in ((["inference.json"], "preprocessing"), (["train.json"], "validate#preprocessing")):
            p = parser(*configs)
            roi = tuple(p["roi_size"])
            pre = p.get_parsed_content(key)
            with tempfile.TemporaryDirectory() as d:
                for shape in ((400, 270), (369, 270), (391, 272)):  # sizes found in HC18
                    f = Path(d) / f"img_{shape[0]}.nii.gz"
                    write_image(f, shape, 0.15)
                    item = pre({"image": str(f), "label": str(f)} if "train" in configs[0] else {"image": str(f)})
                    self.assertEqual(tuple(item["image"].shape[1:]), roi, (configs, shape))
                    # a marker in each corner of the network input lands in the same corner of the native grid
                    pred = torch.zeros(1, *roi)
                    pred[0, :8, :8] = 1.0
                    pred[0, -8:, -8:] = 1.0
                    item["pred"] = item["image"].clone().copy_(pred)
                    out = Invertd("pred", pre, orig_keys="image", nearest_interp=False)(item)["pred"]
                    self.assertEqual(tuple(out.shape[1:]), shape)
                    self.assertGreater(float(out[0, 0, 0]), 0.5)
                    self.assertGreater(float(out[0, -1, -1]), 0.5)
                    self.assertLess(float(out[0, shape[0] // 2, shape[1] // 2]), 0.5)
                    np.testing.assert_allclose(np.abs(np.diag(np.asarray(out.affine))[:2]), [0.15, 0.15], rtol=1e-6)

    def test_no_crop_in_training(self):
        p = parser("train.json")
        names = [t["_target_"] for t in p["train#random_transforms"]]
        self.assertFalse([n for n in names if "Crop" in n or "Rotate90" in n], names)


if __name__ == "__main__":
    unittest.main()
