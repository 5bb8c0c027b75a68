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
import pickle
import random
import shutil
import tempfile
import unittest
from pathlib import Path

import nibabel as nib
import numpy as np
from parameterized import parameterized
from testing_utils import SHARED_DATA

from guidino_monai.data import (
    DatasetError,
    case_id,
    check_case,
    check_image,
    hc18_fetus_id,
    load_checked_datalist,
    split_by_group,
)

DATA_ROOT = SHARED_DATA  # ../shared/data beside the repo, or $GUIDINO_SHARED_DATA
HIPPOCAMPUS_DIR = DATA_ROOT / "msd_hippocampus"
HC18_DIR = DATA_ROOT / "hc18"
SKIP_HIPPOCAMPUS = f"real data not found at {HIPPOCAMPUS_DIR} (see shared/data/README.md)"
SKIP_HC18 = f"real data not found at {HC18_DIR} (see shared/data/README.md)"

SHAPE_3D = (12, 14, 10)


def _save(path: str, data: np.ndarray, spacing=(1.0, 1.0, 1.0), origin=(0.0, 0.0, 0.0)) -> None:
    affine = np.diag([*spacing[:3], *([1.0] * (4 - len(spacing[:3])))])
    affine[: len(origin), 3] = origin
    nib.save(nib.Nifti1Image(data, affine), path)


def _good_label(shape=SHAPE_3D) -> np.ndarray:
    label = np.zeros(shape, np.uint8)
    label[3:6, 4:8] = 1
    label[6:9, 4:8] = 2
    return label


def _good_image(shape=SHAPE_3D, seed=0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 200, shape).astype(np.uint8)


def _write_dataset(root: str, num_cases: int = 3) -> list[str]:
    """A valid 3D Decathlon-style dataset with cases case_000, case_001, ...; returns the case names."""
    os.makedirs(os.path.join(root, "imagesTr"), exist_ok=True)
    os.makedirs(os.path.join(root, "labelsTr"), exist_ok=True)
    names = [f"case_{i:03d}" for i in range(num_cases)]
    training = []
    for i, name in enumerate(names):
        _save(os.path.join(root, "imagesTr", f"{name}.nii.gz"), _good_image(seed=i))
        _save(os.path.join(root, "labelsTr", f"{name}.nii.gz"), _good_label())
        training.append({"image": f"./imagesTr/{name}.nii.gz", "label": f"./labelsTr/{name}.nii.gz", "age": 40 + i})
    meta = {"name": "test", "labels": {"0": "background", "1": "a", "2": "b"}, "numTraining": num_cases}
    meta["training"] = training
    with open(os.path.join(root, "dataset.json"), "w") as f:
        json.dump(meta, f)
    return names


# Each bad case: (name, function(image_path, label_path) that breaks the files, the file named, words in the message)
def _corrupt(img, lab):
    with open(img, "wb") as f:
        f.write(np.random.default_rng(0).bytes(4096))


def _truncated(img, lab):
    with open(img, "rb") as f:
        raw = f.read()
    with open(img, "wb") as f:
        f.write(raw[: len(raw) // 2])


def _trailer_cut(img, lab):
    with open(img, "rb") as f:
        raw = f.read()
    with open(img, "wb") as f:
        f.write(raw[:-3])  # data complete, gzip CRC/length trailer cut: nibabel.load alone would not notice


def _missing_label(img, lab):
    os.remove(lab)


def _shape_mismatch(img, lab):
    _save(lab, _good_label((12, 14, 9)))


def _value_7(img, lab):
    label = _good_label()
    label[0, 0, 0] = 7
    _save(lab, label)


def _fractional_value(img, lab):
    _save(lab, _good_label().astype(np.float32) * np.float32(1.25))


def _empty_label(img, lab):
    _save(lab, np.zeros(SHAPE_3D, np.uint8))


def _nan_image(img, lab):
    image = _good_image().astype(np.float32)
    image[1, 2, 3] = np.nan
    _save(img, image)


def _inf_image(img, lab):
    image = _good_image().astype(np.float32)
    image[1, 2, 3] = np.inf
    _save(img, image)


def _image_2d(img, lab):
    _save(img, _good_image((12, 14)))


def _spacing_mismatch(img, lab):
    _save(lab, _good_label(), spacing=(1.0, 1.0, 2.5))


def _origin_mismatch(img, lab):
    _save(lab, _good_label(), origin=(5.0, 0.0, 0.0))


def _label_4d(img, lab):
    _save(lab, np.stack([_good_label()] * 2, -1))


def _time_series(img, lab):
    _save(img, np.zeros((*SHAPE_3D, 40), np.uint8))


BAD_CASES = [
    ("corrupt_nifti", _corrupt, "image", ["cannot be read"]),
    ("truncated_nifti", _truncated, "image", ["cannot be read", "EOFError"]),
    ("gzip_trailer_cut", _trailer_cut, "image", ["cannot be read"]),
    ("missing_label", _missing_label, "label", ["file not found"]),
    ("shape_mismatch", _shape_mismatch, "label", ["(12, 14, 9)", "(12, 14, 10)", "does not match"]),
    ("unexpected_label_value", _value_7, "label", ["unexpected values [7]"]),
    ("fractional_label_value", _fractional_value, "label", ["unexpected values [1.25, 2.5]"]),
    ("empty_label", _empty_label, "label", ["empty"]),
    ("nan_image", _nan_image, "image", ["1 NaN"]),
    ("inf_image", _inf_image, "image", ["1 Inf"]),
    ("2d_image_for_3d", _image_2d, "image", ["is 2D but this bundle expects 3D images"]),
    ("spacing_mismatch", _spacing_mismatch, "label", ["spacing (1, 1, 2.5)", "image spacing (1, 1, 1)"]),
    ("origin_mismatch", _origin_mismatch, "label", ["affine differs"]),
    ("4d_label", _label_4d, "label", ["is 4D", "expects 3D labels"]),
    ("time_series_image", _time_series, "image", ["too large for the MSD channel layout"]),
]


class TestCheckedDatalist(unittest.TestCase):
    def setUp(self):
        self.root = tempfile.mkdtemp()
        self.names = _write_dataset(self.root)

    def tearDown(self):
        shutil.rmtree(self.root, ignore_errors=True)

    def _paths(self, name):
        return (
            os.path.join(self.root, "imagesTr", f"{name}.nii.gz"),
            os.path.join(self.root, "labelsTr", f"{name}.nii.gz"),
        )

    def test_valid_dataset(self):
        datalist = load_checked_datalist(self.root, spatial_dims=3, label_values=[0, 1, 2])
        self.assertEqual(len(datalist), 3)
        for name, item in zip(self.names, datalist):
            self.assertEqual(item["image"], self._paths(name)[0])
            self.assertEqual(item["label"], self._paths(name)[1])
            self.assertTrue(os.path.isabs(item["image"]) and os.path.isfile(item["label"]))
        self.assertEqual([d["age"] for d in datalist], [40, 41, 42])  # extra keys are kept
        # the labels mapping of a dataset.json works as label_values; a path to dataset.json as dataset_dir too
        labels = {"0": "background", "1": "a", "2": "b"}
        again = load_checked_datalist(os.path.join(self.root, "dataset.json"), 3, labels)
        self.assertEqual(again, datalist)

    @parameterized.expand(BAD_CASES)
    def test_bad_case(self, _, breaker, which, words):
        img, lab = self._paths(self.names[1])
        breaker(img, lab)
        bad_file = img if which == "image" else lab
        with self.assertRaises(DatasetError) as cm:
            load_checked_datalist(self.root, spatial_dims=3, label_values=[0, 1, 2])
        message = str(cm.exception)
        self.assertIn(bad_file, message)
        for word in words:
            self.assertIn(word, message)
        self.assertEqual(len(cm.exception.errors), 1)
        for other in (self.names[0], self.names[2]):  # the good cases are not blamed
            self.assertNotIn(other, message)
        # the same problem is found when the case is checked on its own
        with self.assertRaises(DatasetError) as cm:
            check_case(img, lab, 3, [0, 1, 2])
        self.assertIn(bad_file, str(cm.exception))
        self.assertIsInstance(cm.exception, ValueError)

    def test_all_problems_reported_at_once(self):
        _value_7(*self._paths(self.names[0]))
        _nan_image(*self._paths(self.names[2]))
        with self.assertRaises(DatasetError) as cm:
            load_checked_datalist(self.root, 3, [0, 1, 2])
        self.assertEqual(len(cm.exception.errors), 2)
        self.assertIn(self._paths(self.names[0])[1], str(cm.exception))
        self.assertIn(self._paths(self.names[2])[0], str(cm.exception))
        self.assertIn("2 problems in 3 'training' entries", str(cm.exception))
        restored = pickle.loads(pickle.dumps(cm.exception))  # e.g. across DataLoader workers
        self.assertEqual(str(restored), str(cm.exception))

    def test_empty_label_allowed(self):
        img, lab = self._paths(self.names[0])
        _empty_label(img, lab)
        info = check_case(img, lab, 3, [0, 1, 2], allow_empty_label=True)
        self.assertEqual(info["label_values"], [0])
        self.assertEqual(len(load_checked_datalist(self.root, 3, [0, 1, 2], allow_empty_label=True)), 3)

    def test_check_files_false_reads_only_json(self):
        _corrupt(*self._paths(self.names[0]))
        self.assertEqual(len(load_checked_datalist(self.root, 3, [0, 1, 2], check_files=False)), 3)

    def test_missing_dataset_json(self):
        os.remove(os.path.join(self.root, "dataset.json"))
        with self.assertRaises(DatasetError) as cm:
            load_checked_datalist(self.root, 3, [0, 1, 2])
        self.assertIn(os.path.join(self.root, "dataset.json"), str(cm.exception))
        self.assertIn("file not found", str(cm.exception))

    def test_missing_dir(self):
        missing = os.path.join(self.root, "nope")
        with self.assertRaises(DatasetError) as cm:
            load_checked_datalist(missing, 3, [0, 1, 2])
        self.assertIn(missing, str(cm.exception))

    @parameterized.expand(
        [
            ("invalid_json", '{"training": [', "not valid JSON"),
            ("not_an_object", "[1, 2]", "must hold a JSON object"),
            ("no_training_key", '{"validation": []}', "has no 'training' list"),
            ("empty_training", '{"training": []}', "the 'training' list is empty"),
            ("training_not_list", '{"training": {"a": 1}}', "must be a list"),
            ("entry_without_image", '{"training": [{"label": "./labelsTr/case_000.nii.gz"}]}', "has no 'image'"),
        ]
    )
    def test_bad_json(self, _, text, words):
        json_path = os.path.join(self.root, "dataset.json")
        with open(json_path, "w") as f:
            f.write(text)
        with self.assertRaises(DatasetError) as cm:
            load_checked_datalist(self.root, 3, [0, 1, 2])
        self.assertIn(json_path, str(cm.exception))
        self.assertIn(words, str(cm.exception))

    def test_unlabelled_list(self):
        with open(os.path.join(self.root, "dataset.json"), "w") as f:
            json.dump({"test": ["./imagesTr/case_000.nii.gz", {"image": "./imagesTr/case_001.nii.gz"}]}, f)
        datalist = load_checked_datalist(self.root, 3, [0, 1, 2], key="test")
        self.assertEqual([d["image"] for d in datalist], [self._paths(n)[0] for n in self.names[:2]])
        self.assertNotIn("label", datalist[0])

    def test_invalid_arguments(self):
        with self.assertRaises(ValueError):
            load_checked_datalist(self.root, 4, [0, 1])
        with self.assertRaises(ValueError):
            load_checked_datalist(self.root, 3, [])


class TestCheckImage(unittest.TestCase):
    def setUp(self):
        self.root = tempfile.mkdtemp()

    def tearDown(self):
        shutil.rmtree(self.root, ignore_errors=True)

    @parameterized.expand(
        [
            ("3d", (12, 14, 10), 3, (12, 14, 10), 1),
            ("3d_trailing_singleton", (12, 14, 10, 1), 3, (12, 14, 10), 1),
            ("3d_msd_channels", (12, 14, 10, 4), 3, (12, 14, 10), 4),
            ("2d", (20, 16), 2, (20, 16), 1),
            ("2d_trailing_singleton", (20, 16, 1), 2, (20, 16), 1),
            ("3d_single_slice", (20, 16, 1), 3, (20, 16, 1), 1),
        ]
    )
    def test_accepted_layouts(self, _, shape, spatial_dims, expected_shape, channels):
        path = os.path.join(self.root, "x.nii.gz")
        _save(path, np.ones(shape, np.float32), spacing=(0.5, 0.75, 2.0))
        info = check_image(path, spatial_dims)
        self.assertEqual(info["shape"], expected_shape)
        self.assertEqual(info["channels"], channels)
        np.testing.assert_allclose(info["spacing"], (0.5, 0.75, 2.0)[:spatial_dims])

    @parameterized.expand(
        [
            ("3d_for_2d", (12, 14, 10), 2, "is 3D but this bundle expects 2D images (shape (12, 14, 10)"),
            ("2d_for_3d", (12, 14), 3, "is 2D but this bundle expects 3D images (shape (12, 14))"),
            ("4d_for_2d", (12, 14, 10, 3), 2, "is 4D"),
        ]
    )
    def test_wrong_dims(self, _, shape, spatial_dims, words):
        path = os.path.join(self.root, "x.nii")
        _save(path, np.ones(shape, np.uint8))
        with self.assertRaises(DatasetError) as cm:
            check_image(path, spatial_dims)
        self.assertIn(path, str(cm.exception))
        self.assertIn(words, str(cm.exception))

    def test_relative_path_made_absolute(self):
        path = os.path.join(self.root, "x.nii.gz")
        _save(path, np.ones((4, 5), np.uint8))
        cwd = os.getcwd()
        try:
            os.chdir(self.root)
            self.assertEqual(check_image("x.nii.gz", 2)["image"], path)
            with self.assertRaises(DatasetError) as cm:
                check_image("missing.nii.gz", 2)
            self.assertIn(os.path.join(self.root, "missing.nii.gz"), str(cm.exception))
        finally:
            os.chdir(cwd)

    def test_not_nifti(self):
        path = os.path.join(self.root, "x.nii.gz")
        with open(path, "wb") as f:
            f.write(b"this is not a NIfTI file")
        with self.assertRaises(DatasetError) as cm:
            check_image(path, 3)
        self.assertIn(path, str(cm.exception))


def _hc18_names() -> list[str]:
    """60 fetuses; every third has a second scan (NNN_2HC), every seventh a third one (NNN_3HC)."""
    names = []
    for fetus in range(60):
        names.append(f"{fetus:03d}_HC")
        if fetus % 3 == 0:
            names.append(f"{fetus:03d}_2HC")
        if fetus % 7 == 0:
            names.append(f"{fetus:03d}_3HC")
    return names


HC18_NAMES = _hc18_names()


def _hc18_like_datalist():
    return [{"image": f"/d/imagesTr/{n}.nii.gz", "label": f"/d/labelsTr/{n}.nii.gz"} for n in HC18_NAMES]


class TestSplit(unittest.TestCase):
    @parameterized.expand(
        [
            ("/d/imagesTr/012_2HC.nii.gz", "012"),
            ("/d/imagesTr/012_HC.nii.gz", "012"),
            ("012_3HC.nii", "012"),
            ({"image": "./imagesTr/123_HC.nii.gz"}, "123"),
            ("/d/hippocampus_001.nii.gz", "hippocampus_001"),  # not an HC18 name: the case id
        ]
    )
    def test_hc18_fetus_id(self, item, expected):
        self.assertEqual(hc18_fetus_id(item), expected)

    @parameterized.expand([("/a/b/x.nii.gz", "x"), ("/a/b/x.NII", "x"), ({"image": "./y.v2.nii.gz"}, "y.v2")])
    def test_case_id(self, item, expected):
        self.assertEqual(case_id(item), expected)

    @parameterized.expand([(0.2, 0), (0.2, 1), (0.5, 3), (0.05, 7)])
    def test_grouped_deterministic_complete(self, val_fraction, seed):
        datalist = _hc18_like_datalist()
        train, val = split_by_group(datalist, val_fraction, seed, group_key=hc18_fetus_id)
        # complete and disjoint
        self.assertEqual(len(train) + len(val), len(datalist))
        self.assertEqual(sorted(d["image"] for d in train + val), sorted(d["image"] for d in datalist))
        # grouped: no fetus on both sides; repeat scans exist in this list
        train_fetuses = {hc18_fetus_id(d) for d in train}
        val_fetuses = {hc18_fetus_id(d) for d in val}
        self.assertFalse(train_fetuses & val_fetuses)
        self.assertGreater(len(datalist), len(train_fetuses | val_fetuses))
        # about val_fraction of the cases (whole groups of at most 3 cases)
        self.assertGreaterEqual(len(val), 1)
        self.assertLessEqual(abs(len(val) - val_fraction * len(datalist)), 3)
        # deterministic, and independent of the datalist order; order kept within each side
        self.assertEqual((train, val), split_by_group(datalist, val_fraction, seed, group_key=hc18_fetus_id))
        shuffled = list(datalist)
        random.Random(123).shuffle(shuffled)
        train2, val2 = split_by_group(shuffled, val_fraction, seed, group_key=hc18_fetus_id)
        self.assertEqual(sorted(d["image"] for d in val2), sorted(d["image"] for d in val))
        self.assertEqual(train, [d for d in datalist if d in train])

    def test_seed_changes_split(self):
        datalist = _hc18_like_datalist()
        vals = {tuple(d["image"] for d in split_by_group(datalist, 0.2, s, hc18_fetus_id)[1]) for s in range(4)}
        self.assertGreater(len(vals), 1)

    def test_default_groups_by_case(self):
        datalist = _hc18_like_datalist()
        train, val = split_by_group(datalist, 0.2, 0)
        self.assertEqual(len(val), round(0.2 * len(datalist)))
        self.assertEqual(len(train) + len(val), len(datalist))

    def test_small_lists(self):
        two = [{"image": "/d/000_HC.nii.gz"}, {"image": "/d/001_HC.nii.gz"}]
        for fraction in (0.01, 0.5, 0.99):
            train, val = split_by_group(two, fraction, 0, hc18_fetus_id)
            self.assertEqual((len(train), len(val)), (1, 1))
        one_fetus = [{"image": "/d/000_HC.nii.gz"}, {"image": "/d/000_2HC.nii.gz"}]
        train, val = split_by_group(one_fetus, 0.5, 0, hc18_fetus_id)
        self.assertEqual((len(train), len(val)), (2, 0))

    def test_invalid_arguments(self):
        for fraction in (0.0, 1.0, -0.1):
            with self.assertRaises(ValueError):
                split_by_group(_hc18_like_datalist(), fraction)
        with self.assertRaises(TypeError):
            split_by_group(_hc18_like_datalist(), 0.2, group_key="fetus")


def _subset_dataset(src: Path, dst: str, num: int) -> list[dict]:
    """A dataset.json in ``dst`` pointing (by absolute path) to ``num`` evenly spread cases of ``src``."""
    with open(src / "dataset.json") as f:
        meta = json.load(f)
    step = max(1, len(meta["training"]) // num)
    entries = meta["training"][::step][:num]
    for e in entries:
        e["image"] = str((src / e["image"]).resolve())
        e["label"] = str((src / e["label"]).resolve())
    with open(os.path.join(dst, "dataset.json"), "w") as f:
        json.dump(dict(meta, training=entries, numTraining=len(entries)), f)
    return entries


class TestRealData(unittest.TestCase):
    def setUp(self):
        self.tmp = tempfile.mkdtemp()

    def tearDown(self):
        shutil.rmtree(self.tmp, ignore_errors=True)

    @unittest.skipUnless(HIPPOCAMPUS_DIR.is_dir(), SKIP_HIPPOCAMPUS)
    def test_hippocampus_all_cases(self):
        datalist = load_checked_datalist(HIPPOCAMPUS_DIR, spatial_dims=3, label_values=[0, 1, 2])
        self.assertEqual(len(datalist), 208)
        self.assertTrue(all(os.path.isfile(d["image"]) and os.path.isfile(d["label"]) for d in datalist))
        train, val = split_by_group(datalist, 0.2, 0)
        self.assertEqual((len(train), len(val)), (166, 42))

    @unittest.skipUnless(HIPPOCAMPUS_DIR.is_dir(), SKIP_HIPPOCAMPUS)
    def test_hippocampus_as_2d_fails(self):
        entries = _subset_dataset(HIPPOCAMPUS_DIR, self.tmp, 3)
        with self.assertRaises(DatasetError) as cm:
            load_checked_datalist(self.tmp, spatial_dims=2, label_values=[0, 1, 2])
        self.assertIn(entries[0]["image"], str(cm.exception))
        self.assertIn("is 3D but this bundle expects 2D images", str(cm.exception))

    @unittest.skipUnless(HC18_DIR.is_dir(), SKIP_HC18)
    def test_hc18_subset(self):
        entries = _subset_dataset(HC18_DIR, self.tmp, 40)
        datalist = load_checked_datalist(self.tmp, spatial_dims=2, label_values=[0, 1])
        self.assertEqual([d["image"] for d in datalist], [e["image"] for e in entries])
        self.assertTrue(all(d["head_circumference_mm"] > 0 for d in datalist))
        with self.assertRaises(DatasetError) as cm:
            load_checked_datalist(self.tmp, spatial_dims=3, label_values=[0, 1])
        self.assertIn(entries[0]["image"], str(cm.exception))
        self.assertIn("is 2D but this bundle expects 3D images", str(cm.exception))

    @unittest.skipUnless(HC18_DIR.is_dir(), SKIP_HC18)
    def test_hc18_split_by_fetus(self):
        datalist = load_checked_datalist(HC18_DIR, spatial_dims=2, label_values=[0, 1], check_files=False)
        self.assertEqual(len(datalist), 787)
        train, val = split_by_group(datalist, 0.2, 0, group_key=hc18_fetus_id)
        self.assertEqual(len(train) + len(val), 787)
        self.assertFalse({hc18_fetus_id(d) for d in train} & {hc18_fetus_id(d) for d in val})
        # 645 distinct fetus numbers in the 787 file names (shared/data/README.md says 648 fetuses)
        self.assertEqual(len({hc18_fetus_id(d) for d in datalist}), 645)


if __name__ == "__main__":
    unittest.main()
