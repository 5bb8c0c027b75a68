"""Both bundles through the MONAI model zoo's own CI, as the zoo runs it (offline).

``zoo_ci.py`` (next to this file) writes the zoo's steps again; it runs in a Python that has every package of this
environment except guidino_monai (a venv whose only link to the global site-packages is a plain path line, so the
editable install's import hook never runs), from a "zoo root" holding ``models/<bundle>``. The bundles reach it as a
maintainer's pull request would: the packed zip unpacked without its weights, and ``large_files.yml`` pointing at a
release served on loopback HTTP (URLs and sha256 written by ``guidino_monai.bundle.pack --release-url``).

The zoo's checks use the configs unmodified (``verify_net_in_out``, the exports); its unit-test pattern uses override
dicts (here the small 1-epoch settings of ``bundle_utils.FAST``). Weights for the unmodified network are random, like
the zoo's own ``_produce_fake_weights``: the checks are about shapes and exportability, not accuracy.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import sys
import tempfile
import unittest
import zipfile
from pathlib import Path

import pytest
import torch
from bundle_utils import (
    FAST,
    FETAL,
    HIPPO,
    SCHEMA,
    LoopbackRelease,
    clean_python,
    copy_bundle,
    infer_overrides,
    network_from_config,
    run_py,
)
from monai.bundle import ConfigParser
from parameterized import parameterized
from testing_utils import quiet_random_init_warning

from guidino_monai.bundle.pack import pack_bundle
from guidino_monai.bundle.weights import PLACEHOLDER_HOST, WeightsNotPublishedError, download_weights
from guidino_monai.data import make_demo_dataset

ZOO_CI = Path(__file__).resolve().parent / "zoo_ci.py"
TASK = {HIPPO: "hippocampus", FETAL: "fetalhead"}


@pytest.mark.slow
class TestModelZooCI(unittest.TestCase):
    """Per bundle: the zoo's verify_bundle.py steps, then its unit-test pattern (in-process and torchrun)."""

    @classmethod
    def setUpClass(cls):
        quiet_random_init_warning()
        cls.tmp = tempfile.TemporaryDirectory()
        root = Path(cls.tmp.name)
        cls.py = clean_python(root / "venv")
        cls.zoo = root / "zoo"
        (cls.zoo / "models").mkdir(parents=True)
        cls.release_dir = root / "release"
        cls.release_dir.mkdir()
        cls.release = LoopbackRelease(cls.release_dir)
        cls.zips, cls.src = {}, {}
        for name in (HIPPO, FETAL):
            src = copy_bundle(name, root / "src")
            (src / "models").mkdir()
            torch.manual_seed(0)
            net = network_from_config(src)  # the unmodified network, random weights (the zoo's fake weights)
            torch.save(net.state_dict(), src / "models" / "model.pt")
            cls.zips[name] = pack_bundle(src, cls.release_dir, release_url=cls.release.url,
                                         write_large_files_to_bundle=True)  # fmt: skip
            with zipfile.ZipFile(cls.zips[name]) as zf:
                zf.extractall(cls.zoo / "models")
            for f in ("model.pt", "model.ts"):  # a pull request carries large_files.yml, not the weights
                (cls.zoo / "models" / name / "models" / f).unlink()
            cls.src[name] = src

    @classmethod
    def tearDownClass(cls):
        cls.release.close()
        cls.tmp.cleanup()

    def zoo_ci(self, *args: str, timeout: int = 900, script: bool = True, zoo: Path | None = None) -> str:
        r = run_py(self.py, *([str(ZOO_CI)] if script else []), *args, cwd=zoo or self.zoo, timeout=timeout)
        out = r.stdout + r.stderr
        self.assertEqual(r.returncode, 0, out[-6000:])
        return out

    @parameterized.expand([(HIPPO,), (FETAL,)])
    def test_published_large_files(self, name):
        """pack --release-url: large_files.yml (zip and bundle folder) names the uploaded files and their sha256."""
        bundle = self.zoo / "models" / name
        parser = ConfigParser()
        parser.read_config(str(bundle / "large_files.yml"))
        entries = {e["path"]: e for e in parser["large_files"]}
        self.assertEqual(set(entries), {"models/model.pt", "models/model.ts"})
        for e in entries.values():
            self.assertTrue(e["url"].startswith(self.release.url + "/"), e["url"])
            self.assertEqual(e["hash_type"], "sha256")
            asset = self.release_dir / e["url"].rsplit("/", 1)[1]
            self.assertTrue(asset.is_file(), asset)
            import hashlib

            self.assertEqual(hashlib.sha256(asset.read_bytes()).hexdigest(), e["hash_val"])
            self.assertEqual(asset.stat().st_mode & 0o777, 0o644)
        self.assertEqual((self.src[name] / "large_files.yml").read_text(), (bundle / "large_files.yml").read_text())
        self.assertEqual(os.stat(self.zips[name]).st_mode & 0o777, 0o644)
        with zipfile.ZipFile(self.zips[name]) as zf:
            modes = {i.filename: (i.external_attr >> 16) & 0o777 for i in zf.infolist()}
        self.assertEqual(set(modes.values()), {0o644}, modes)
        self.assertIn(f"{name}/scripts/guidino_monai/__init__.py", modes)

    def test_requirements_have_no_unindexed_package(self):
        for name in (HIPPO, FETAL):
            lines = self.zoo_ci("requirements", f"models/{name}").split()
            self.assertTrue(all(re.fullmatch(r"[A-Za-z0-9_.\-]+==[0-9][0-9A-Za-z.]*", x) for x in lines), lines)
            names = {x.split("==")[0].lower() for x in lines}
            self.assertNotIn("guidino-monai", names)
            self.assertTrue({"monai", "torch", "numpy", "timm", "nibabel"} <= names, names)

    @parameterized.expand([(HIPPO,), (FETAL,)])
    @unittest.skipUnless(SCHEMA.is_file(), f"MONAI metadata schema not found at {SCHEMA}")
    def test_verify_bundle(self, name):
        out = self.zoo_ci("verify", f"models/{name}", "--schema", str(SCHEMA), "--script-export")
        for step in ("verify: guidino_monai is not importable", "directory:", "version:", "metadata:", "properties:",
                     "data_shape:", "export_trace:", "provided_ts: models/model.ts loads"):  # fmt: skip
            self.assertIn(f"ZOO {step}", out)
        self.assertIn(f"guidino_monai from {self.zoo / 'models' / name / 'scripts' / 'guidino_monai'}", out)
        script = re.search(r"ZOO export_script: (PASS|FAIL.*)", out).group(1)
        readme = (self.zoo / "models" / name / "docs" / "README.md").read_text()
        if script.startswith("FAIL"):  # the zoo's way out: say so in the README, list it in its exclusion list
            self.assertTrue("exclude_verify_torchscript_list" in readme, f"README must say: {script}")
        else:
            self.assertFalse("exclude_verify_torchscript_list" in readme, "script export works now: update the README")

    @parameterized.expand([(HIPPO,), (FETAL,)])
    def test_unit_tests_and_dist(self, name):
        zoo = self.zoo.parent / f"zoo_unit_{name}"  # its own copy: training writes models/model.pt
        bundle = zoo / "models" / name
        shutil.copytree(self.zoo / "models" / name, bundle)
        data = make_demo_dataset(zoo / "data" / name, TASK[name], num_cases=12)
        override = {**FAST[name], "dataset_dir": data}
        infer_in = zoo / "infer_in" / name
        infer_in.mkdir(parents=True)
        for img in sorted((Path(data) / "imagesTr").glob("*.nii.gz"))[:3]:
            shutil.copy(img, infer_in / img.name)
        infer = {**infer_overrides(name), "dataset_dir": str(infer_in), "output_dir": str(zoo / "infer_out" / name)}
        out = self.zoo_ci("unit", f"models/{name}", "--override", json.dumps(override), "--infer-override",
                          json.dumps(infer), zoo=zoo)  # fmt: skip
        # the zoo runs its _dist tests under torchrun (one process), which then starts torchrun x2 per config
        out += self.zoo_ci("-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1", str(ZOO_CI), "dist",
                           f"models/{name}", "--override", json.dumps(override), script=False, zoo=zoo)  # fmt: skip
        for step in ("unit_train:", "unit_eval:", "unit_infer:", "dist_train:", "dist_eval:"):
            self.assertIn(f"ZOO {step}", out)
        self.assertIn(f"guidino_monai from {bundle / 'scripts' / 'guidino_monai'}", out)
        ckpt = torch.load(bundle / "models" / "checkpoint_last.pt", weights_only=True)
        self.assertEqual(ckpt["engine"]["epoch"], 1)
        # multi_gpu_evaluate.json: the two ranks' rows gathered into one report of the whole validation split
        rows = (bundle / "eval" / "metrics_per_case.csv").read_text().strip().splitlines()[1:]
        cases = [r.split(",")[0] for r in rows]
        self.assertEqual(len(cases), len(set(cases)))
        self.assertTrue(0 < len(cases) < 12, cases)
        segs = sorted((zoo / "infer_out" / name).glob("*_seg.nii.gz"))
        self.assertEqual(len(segs), 3)


class TestUnpublishedWeights(unittest.TestCase):
    """The bundles as committed: no weights published yet, and every way of getting them says so."""

    @parameterized.expand([(HIPPO,), (FETAL,)])
    def test_zoo_download_fails_naming_it(self, name):
        sys.path.insert(0, str(ZOO_CI.parent))
        import zoo_ci

        with tempfile.TemporaryDirectory() as d:
            bundle = copy_bundle(name, Path(d))
            with self.assertLogs("monai.apps", level=logging.ERROR) as logs, self.assertRaises(OSError):
                zoo_ci.download_large_files(str(bundle))
            self.assertIn(PLACEHOLDER_HOST, "\n".join(logs.output))
            with self.assertRaises(WeightsNotPublishedError) as err:
                download_weights(bundle)
            self.assertIn("no trained weights have been published", str(err.exception))
            self.assertFalse((bundle / "models" / "model.pt").exists())

    def test_published_but_missing_weights_give_the_download_command(self):
        from guidino_monai.bundle.weights import require_weights, write_large_files

        with tempfile.TemporaryDirectory() as d:
            bundle = copy_bundle(FETAL, Path(d))
            write_large_files(bundle, [{"path": "models/model.pt", "url": "https://example.org/r/model.pt",
                                        "hash_val": "0" * 64, "hash_type": "sha256"}])  # fmt: skip
            with self.assertRaises(FileNotFoundError) as err:
                require_weights(bundle / "models" / "model.pt", bundle)
            self.assertNotIsInstance(err.exception, WeightsNotPublishedError)
            self.assertIn("https://example.org/r/model.pt", str(err.exception))
            self.assertIn("python -m guidino_monai.bundle.download", str(err.exception))

    def test_tampered_weights_fail_the_hash_check(self):
        from monai.apps.utils import HashCheckError

        with tempfile.TemporaryDirectory() as d:
            bundle = copy_bundle(FETAL, Path(d))
            (bundle / "models").mkdir()
            torch.save({"w": torch.zeros(3)}, bundle / "models" / "model.pt")
            zip_path = pack_bundle(bundle, Path(d) / "dist", export=False, release_url="https://example.org/r")
            with zipfile.ZipFile(zip_path) as zf:
                zf.extractall(Path(d) / "unzipped")
            got = Path(d) / "unzipped" / FETAL
            self.assertEqual(len(download_weights(got)), 1)  # present and matching: nothing to download
            (got / "models" / "model.pt").write_bytes(b"tampered")
            with self.assertRaises(HashCheckError):
                download_weights(got)


if __name__ == "__main__":
    unittest.main()
