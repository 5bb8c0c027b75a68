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

import json
import os
import re
import shutil
import tempfile
import unittest

import nibabel as nib
import numpy as np
from parameterized import parameterized
from scipy import ndimage

from guidino_monai.data import hc18_fetus_id, load_checked_datalist, make_demo_dataset, split_by_group
from guidino_monai.metrics import head_circumference_mm

# task, spatial_dims, label values
TASKS = [("hippocampus", 3, [0, 1, 2]), ("fetalhead", 2, [0, 1])]


def _load(path):
    img = nib.load(path)
    return np.asanyarray(img.dataobj), img


class TestDemoDataset(unittest.TestCase):
    def setUp(self):
        self.tmp = tempfile.mkdtemp()

    def tearDown(self):
        shutil.rmtree(self.tmp, ignore_errors=True)

    @parameterized.expand(TASKS)
    def test_passes_checks(self, task, spatial_dims, label_values):
        root = make_demo_dataset(os.path.join(self.tmp, task), task, num_cases=12, seed=0)
        self.assertEqual(root, os.path.join(self.tmp, task))
        datalist = load_checked_datalist(root, spatial_dims, label_values)
        self.assertEqual(len(datalist), 12)
        with open(os.path.join(root, "dataset.json")) as f:
            meta = json.load(f)
        self.assertEqual(meta["numTraining"], 12)
        self.assertEqual(meta["tensorImageSize"], f"{spatial_dims}D")
        self.assertEqual(sorted(int(k) for k in meta["labels"]), label_values)
        for item in datalist:  # every label value appears, images are uint8
            label, _ = _load(item["label"])
            image, _ = _load(item["image"])
            self.assertEqual(sorted(np.unique(label).tolist()), label_values)
            self.assertEqual(image.dtype, np.uint8)

    @parameterized.expand(TASKS)
    def test_idempotent_and_deterministic(self, task, *_):
        root = make_demo_dataset(os.path.join(self.tmp, "a"), task, num_cases=4, seed=3)
        json_path = os.path.join(root, "dataset.json")
        first_image = os.path.join(root, "imagesTr", os.listdir(os.path.join(root, "imagesTr"))[0])
        stamps = (os.stat(json_path).st_mtime_ns, os.stat(first_image).st_mtime_ns)
        self.assertEqual(make_demo_dataset(root, task, num_cases=4, seed=3), root)  # nothing rewritten (mtimes):
        self.assertEqual((os.stat(json_path).st_mtime_ns, os.stat(first_image).st_mtime_ns), stamps)
        # the same seed gives the same data elsewhere; another seed other data
        other = make_demo_dataset(os.path.join(self.tmp, "b"), task, num_cases=4, seed=3)
        rel = os.path.relpath(first_image, root)
        np.testing.assert_array_equal(_load(first_image)[0], _load(os.path.join(other, rel))[0])
        third = make_demo_dataset(os.path.join(self.tmp, "c"), task, num_cases=4, seed=4)
        self.assertFalse(np.array_equal(_load(first_image)[0], _load(os.path.join(third, rel))[0]))

    @parameterized.expand(TASKS)
    def test_incomplete_folder_is_regenerated(self, task, spatial_dims, label_values):
        root = make_demo_dataset(os.path.join(self.tmp, task), task, num_cases=4)
        # an interrupted run leaves files but no dataset.json
        os.remove(os.path.join(root, "dataset.json"))
        make_demo_dataset(root, task, num_cases=4)
        self.assertEqual(len(load_checked_datalist(root, spatial_dims, label_values)), 4)
        # a file listed in dataset.json is missing
        victim = load_checked_datalist(root, spatial_dims, label_values)[2]["label"]
        os.remove(victim)
        make_demo_dataset(root, task, num_cases=4)
        self.assertTrue(os.path.isfile(victim))
        # another number of cases
        make_demo_dataset(root, task, num_cases=6)
        self.assertEqual(len(load_checked_datalist(root, spatial_dims, label_values)), 6)
        # no temporary files are left behind
        leftovers = [n for d in ("imagesTr", "labelsTr", ".") for n in os.listdir(os.path.join(root, d)) if "tmp" in n]
        self.assertEqual(leftovers, [])

    def test_refuses_foreign_dataset(self):
        root = os.path.join(self.tmp, "real")
        os.makedirs(root)
        with open(os.path.join(root, "dataset.json"), "w") as f:
            json.dump({"name": "real data", "training": [{"image": "./imagesTr/a.nii.gz"}]}, f)
        with self.assertRaises(FileExistsError):
            make_demo_dataset(root, "hippocampus", num_cases=2)
        with open(os.path.join(root, "dataset.json")) as f:
            self.assertEqual(json.load(f)["name"], "real data")
        with open(os.path.join(root, "dataset.json"), "w") as f:
            f.write("{not json")
        with self.assertRaises(FileExistsError):
            make_demo_dataset(root, "hippocampus", num_cases=2)
        self.assertTrue(os.path.isfile(os.path.join(root, "dataset.json")))

    def test_invalid_arguments(self):
        with self.assertRaises(ValueError):
            make_demo_dataset(self.tmp, "brain", num_cases=2)
        with self.assertRaises(ValueError):
            make_demo_dataset(self.tmp, "fetalhead", num_cases=0)

    def test_hippocampus_content(self):
        root = make_demo_dataset(self.tmp, "hippocampus", num_cases=6)
        shapes = set()
        for item in load_checked_datalist(root, 3, [0, 1, 2]):
            image, img = _load(item["image"])
            label, _ = _load(item["label"])
            shapes.add(image.shape)
            for size, nominal in zip(image.shape, (32, 40, 32)):
                self.assertLessEqual(abs(size - nominal), 3)
            np.testing.assert_allclose(img.affine, np.eye(4))
            # label 1 is the front (smaller axis-1 coordinate) and label 2 the back of one elongated structure
            front, back = np.nonzero(label == 1)[1].mean(), np.nonzero(label == 2)[1].mean()
            self.assertLess(front, back)
            self.assertGreater(np.ptp(np.nonzero(label)[1]), 15)
            # learnable: the structure is brighter than its surroundings
            self.assertGreater(image[label > 0].mean(), image[label == 0].mean() + 20)
        self.assertGreater(len(shapes), 1)

    def test_fetalhead_content(self):
        root = make_demo_dataset(self.tmp, "fetalhead", num_cases=12)
        datalist = load_checked_datalist(root, 2, [0, 1])
        names = [os.path.basename(d["image"])[: -len(".nii.gz")] for d in datalist]
        self.assertEqual(names[:3], ["000_HC", "001_HC", "001_2HC"])
        self.assertTrue(all(re.fullmatch(r"\d{3}_\d?HC", n) for n in names))
        fetuses = [hc18_fetus_id(d) for d in datalist]
        self.assertLess(len(set(fetuses)), len(fetuses))  # repeat scans exist
        train, val = split_by_group(datalist, 0.25, 0, group_key=hc18_fetus_id)
        self.assertFalse({hc18_fetus_id(d) for d in train} & {hc18_fetus_id(d) for d in val})
        for item in datalist:
            image, img = _load(item["image"])
            label, limg = _load(item["label"])
            self.assertEqual(image.shape, (160, 112))
            np.testing.assert_allclose(img.header.get_zooms(), (0.5, 0.5))
            # the reference circumference is that of the drawn ellipse
            hc = head_circumference_mm(label, limg.header.get_zooms())
            self.assertAlmostEqual(hc / item["head_circumference_mm"], 1.0, delta=0.01)
            self.assertTrue(30 < item["head_circumference_mm"] < 160)
            # the skull ring is brighter than the inside of the head and the tissue outside
            inner = np.asarray(label, bool)
            interior = ndimage.binary_erosion(inner, iterations=6)
            rim = inner & ~ndimage.binary_erosion(inner, iterations=4)
            self.assertGreater(image[rim].mean(), image[~inner].mean() + 20)
            self.assertGreater(image[rim].mean(), image[interior].mean() + 20)


if __name__ == "__main__":
    unittest.main()
