"""Bundle hygiene and delivery: verify_metadata, verify_net_in_out, ckpt_export, bad input, torchrun (gloo),
and packing a bundle into a zip that `monai.bundle download` fetches from a loopback HTTP server."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import unittest
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
import zoo_ci
from bundle_utils import (
    BUNDLES,
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
    run_workflow,
)
from parameterized import parameterized
from testing_utils import REPO_ROOT

from guidino_monai.bundle.pack import pack_bundle
from guidino_monai.bundle.weights import WeightsNotPublishedError
from guidino_monai.data import DatasetError, make_demo_dataset

ENV = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO_ROOT), os.environ.get("PYTHONPATH", "")])}


def monai_bundle(*args: str, cwd: Path | None = None, timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "monai.bundle", *args], cwd=cwd, env=ENV, capture_output=True,
                          text=True, timeout=timeout)  # fmt: skip


class TestMetadataAndNetwork(unittest.TestCase):
    @parameterized.expand([(HIPPO,), (FETAL,)])
    @unittest.skipUnless(SCHEMA.is_file(), f"MONAI metadata schema not found at {SCHEMA}")
    def test_verify_metadata(self, name):
        with tempfile.TemporaryDirectory() as d:
            schema = Path(d) / "schema.json"
            shutil.copy(SCHEMA, schema)
            r = monai_bundle("verify_metadata", "--meta_file", str(BUNDLES / name / "configs" / "metadata.json"),
                             "--filepath", str(schema))  # fmt: skip
            self.assertEqual(r.returncode, 0, r.stdout + r.stderr)
            self.assertIn("metadata is verified with no error", r.stdout + r.stderr)

    @parameterized.expand([(HIPPO,), (FETAL,)])
    def test_verify_net_in_out(self, name):
        cfg = BUNDLES / name / "configs"
        r = monai_bundle("verify_net_in_out", "network_def", "--meta_file", str(cfg / "metadata.json"),
                         "--config_file", str(cfg / "inference.json"), "--guide_backbone_kwargs", "{'depth': 2}",
                         "--n", "4", "--p", "1")  # fmt: skip
        self.assertEqual(r.returncode, 0, r.stdout[-3000:] + r.stderr[-3000:])
        self.assertIn("data shape of network is verified with no error", r.stdout + r.stderr)


#: eval_metrics key -> the row of the README results table whose guided column it must equal
README_METRICS = {
    HIPPO: {"val_mean_dice": "mean Dice", "val_dice_anterior": "Dice anterior", "val_dice_posterior": "Dice posterior"},
    FETAL: {"val_mean_dice": "Dice fetal head", "val_hd95_mm": "HD95 (mm)", "val_hc_abs_error_mm": "HC absolute error (mm)"},
}
ZOO_README_SECTIONS = ("Authors", "Tags", "Model Description", "Data", "Performance", "System Configuration",
                       "Limitations", "Citation Info", "References", "License")  # fmt: skip


class TestBundleDocs(unittest.TestCase):
    """What a model-zoo reviewer reads: README sections, no references that break once the bundle leaves the repo,
    metadata figures that are the README's measured ones, licences."""

    @parameterized.expand([(HIPPO,), (FETAL,)])
    def test_readme_template_sections_and_no_outside_links(self, name):
        text = (BUNDLES / name / "docs" / "README.md").read_text()
        headings = [h.strip("#* ").strip() for h in text.splitlines() if h.startswith("#")]
        for section in ZOO_README_SECTIONS:
            self.assertIn(section, headings, f"{name}: README lacks the zoo template's section {section!r}")
        for bad in ("../", "docs/performance.md", "shared/data", "](http", "](/"):
            self.assertNotIn(bad, text, f"{name}: README refers outside the bundle ({bad!r})")
        for ref in re.findall(r"`((?:configs|docs|scripts)/[A-Za-z0-9_.]+)`", text):  # in-bundle files must exist
            if ref == "scripts/guidino_monai":  # added by pack: checked on the zip in test_model_zoo
                continue
            self.assertTrue((BUNDLES / name / ref).exists(), f"{name}: README names {ref}, which the bundle lacks")
        self.assertTrue((BUNDLES / name / "docs" / "data_license.txt").is_file())
        other = "fetal" if name == HIPPO else "hippocampus"  # no phrase copied from the other bundle's README
        self.assertNotIn(other, text.lower())

    @parameterized.expand([(HIPPO,), (FETAL,)])
    def test_eval_metrics_are_the_readme_figures(self, name):
        meta = json.loads((BUNDLES / name / "configs" / "metadata.json").read_text())
        text = (BUNDLES / name / "docs" / "README.md").read_text()
        rows, in_table = {}, False  # the first results table, its guided column (the third)
        for line in text.splitlines():
            cells = [c.strip() for c in line.strip().strip("|").split("|")]
            if cells[0] == "metric (validation mean)":
                self.assertTrue(cells[2].startswith("guided"), cells)
                in_table = True
            elif in_table and line.startswith("|"):
                if not cells[0].startswith("---"):
                    rows[cells[0]] = cells[2]
            elif in_table:
                break
        self.assertEqual(set(meta["eval_metrics"]), set(README_METRICS[name]))
        for key, row in README_METRICS[name].items():
            self.assertIsInstance(meta["eval_metrics"][key], (int, float), key)
            self.assertAlmostEqual(meta["eval_metrics"][key], float(rows[row]), places=6, msg=f"{key} vs {row!r}")

    @parameterized.expand([(HIPPO,), (FETAL,)])
    def test_metadata_for_the_zoo(self, name):
        meta = json.loads((BUNDLES / name / "configs" / "metadata.json").read_text())
        self.assertIn("monai-label", meta["supported_apps"])
        self.assertIn(meta["version"], meta["changelog"])
        self.assertNotIn("guidino-monai", {k.lower() for k in meta["required_packages_version"]})
        # numpy >= 2.3 and scipy >= 1.16 have no wheels for Python 3.10, the model zoo's CI Python
        self.assertLess(tuple(int(x) for x in meta["numpy_version"].split(".")[:2]), (2, 3))
        self.assertLess(tuple(int(x) for x in meta["required_packages_version"]["scipy"].split(".")[:2]), (1, 16))
        inference = json.loads((BUNDLES / name / "configs" / "inference.json").read_text())
        self.assertIn("dataset_dir", inference)  # InferProperties
        mgpu_eval = json.loads((BUNDLES / name / "configs" / "multi_gpu_evaluate.json").read_text())
        # evaluation has no gradients to synchronise; wrapped in DistributedDataParallel, about 1 gloo run in 25
        # aborted at interpreter exit ("terminate called without an active exception") after writing its report
        self.assertNotIn("DistributedDataParallel", json.dumps(mgpu_eval["network"]))
        self.assertIn("@network_def", mgpu_eval["network"])
        self.assertEqual(inference["imports"].index("$import scripts") + 1, inference["imports"].index(
            "$import guidino_monai"), "the bundle's scripts/ must come before guidino_monai")  # fmt: skip

    @parameterized.expand([(HIPPO,), (FETAL,)])
    def test_inference_builds_the_trained_network(self, name):
        """inference.json stands alone (the zoo runs it without train.json): its network and guide settings must be
        train.json's, or trained weights meet another guide geometry; only training's token cache may differ."""
        train, inference = (json.loads((BUNDLES / name / "configs" / f).read_text()) for f in ("train.json",
                                                                                             "inference.json"))
        for key in ("guide", "guide_backbone", "guide_backbone_kwargs", "gate_at", "gate_mode", "num_classes",
                    "roi_size", "network_def"):
            self.assertEqual(inference[key], train[key], f"{name}: {key} differs between train.json and inference.json")
        trained = {k: v for k, v in train["guide_kwargs"].items() if k != "token_cache_size"}
        self.assertEqual(inference["guide_kwargs"], trained, f"{name}: guide_kwargs differ")


def root_cause(exc: BaseException, kind: type) -> BaseException | None:
    """monai.bundle wraps errors raised inside config expressions; find ours in the chain."""
    while exc is not None:
        if isinstance(exc, kind):
            return exc
        exc = exc.__cause__ or exc.__context__
    return None


class TestBadInput(unittest.TestCase):
    def assertRaisesInChain(self, kind: type, fn, *args, **kwargs) -> BaseException:
        try:
            fn(*args, **kwargs)
        except Exception as e:  # noqa: BLE001
            found = root_cause(e, kind)
            if found is None:
                raise
            return found
        self.fail(f"{kind.__name__} not raised")

    def setUp(self):
        self.tmp = tempfile.TemporaryDirectory()
        self.dir = Path(self.tmp.name)

    def tearDown(self):
        self.tmp.cleanup()

    def _dataset(self, task: str) -> Path:
        return Path(make_demo_dataset(self.dir / "data", task, num_cases=4))

    def _train(self, name: str, dataset_dir: Path) -> None:
        bundle = copy_bundle(name, self.dir)
        run_workflow(bundle, ["train.json"], dataset_dir=str(dataset_dir), **FAST[name])

    def test_corrupt_nifti_named_before_training(self):
        data = self._dataset("hippocampus")
        bad = sorted((data / "imagesTr").glob("*.nii.gz"))[1]
        bad.write_bytes(bad.read_bytes()[:200])  # truncated
        err = self.assertRaisesInChain(DatasetError, self._train, HIPPO, data)
        self.assertIn(bad.name, str(err))
        self.assertFalse((self.dir / HIPPO / "models" / "checkpoint_last.pt").exists(), "training must not start")

    def test_shape_mismatch_and_unknown_label(self):
        data = self._dataset("hippocampus")
        labels = sorted((data / "labelsTr").glob("*.nii.gz"))
        lab = nib.load(str(labels[0]))
        nib.save(nib.Nifti1Image(np.asarray(lab.dataobj)[:-2], lab.affine), str(labels[0]))
        arr = np.asarray(nib.load(str(labels[1])).dataobj).copy()
        arr[arr == 2] = 7
        nib.save(nib.Nifti1Image(arr, nib.load(str(labels[1])).affine), str(labels[1]))
        msg = str(self.assertRaisesInChain(DatasetError, self._train, HIPPO, data))
        self.assertIn(labels[0].name, msg)
        self.assertIn("7", msg)
        self.assertIn(labels[1].name, msg)

    def test_empty_dataset_folder(self):
        empty = self.dir / "empty"
        empty.mkdir()
        self.assertIn("dataset.json", str(self.assertRaisesInChain(DatasetError, self._train, FETAL, empty)))

    def test_2d_image_to_3d_bundle(self):
        bundle = copy_bundle(HIPPO, self.dir)
        img2d = self.dir / "slice.nii.gz"
        nib.save(nib.Nifti1Image(np.random.rand(40, 40).astype(np.float32), np.eye(4)), str(img2d))
        (bundle / "models").mkdir()
        torch.save({}, bundle / "models" / "model.pt")
        err = self.assertRaisesInChain(DatasetError, run_workflow, bundle, ["inference.json"], workflow_type="infer",
                                       input_files=str(img2d), **infer_overrides(HIPPO))  # fmt: skip
        self.assertIn("slice.nii.gz", str(err))
        self.assertIn("2D", str(err))

    def test_missing_weights_named(self):
        bundle = copy_bundle(HIPPO, self.dir)
        err = self.assertRaisesInChain(WeightsNotPublishedError, run_workflow, bundle, ["inference.json"],
                                       workflow_type="infer", **infer_overrides(HIPPO))  # fmt: skip
        self.assertIn(str(bundle / "models" / "model.pt"), str(err))
        self.assertIn("no trained weights have been published", str(err))

    def test_inference_starts_without_weights_when_loader_disabled(self):
        """The model zoo's inference test disables the checkpoint loader: no models/model.pt is then needed."""
        bundle = copy_bundle(FETAL, self.dir)
        data = Path(make_demo_dataset(self.dir / "data", "fetalhead", num_cases=2))
        out = self.dir / "out"
        run_workflow(bundle, ["inference.json"], workflow_type="infer", dataset_dir=str(data / "imagesTr"),
                     output_dir=str(out), **{"handlers#0#_disabled_": True}, **infer_overrides(FETAL))  # fmt: skip
        self.assertFalse((bundle / "models" / "model.pt").exists())
        self.assertEqual(len(list(out.glob("*_seg.nii.gz"))), 2)


class TestDeliveryAndDistributed(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.tmp = tempfile.TemporaryDirectory()
        cls.bundle = copy_bundle(FETAL, Path(cls.tmp.name) / "src")
        run_workflow(cls.bundle, ["train.json"], **FAST[FETAL])

    @classmethod
    def tearDownClass(cls):
        cls.tmp.cleanup()

    def test_ckpt_export_torchscript(self):
        out = Path(self.tmp.name) / "model.ts"
        r = monai_bundle("ckpt_export", "network_def", "--filepath", str(out),
                         "--ckpt_file", str(self.bundle / "models" / "model.pt"),
                         "--meta_file", str(self.bundle / "configs" / "metadata.json"),
                         "--config_file", str(self.bundle / "configs" / "inference.json"),
                         "--bundle_root", str(self.bundle), "--use_trace", "True", "--input_shape", "[1, 1, 64, 64]",
                         *[a for k, v in infer_overrides(FETAL).items() for a in (f"--{k}", repr(v))])  # fmt: skip
        self.assertEqual(r.returncode, 0, r.stdout[-3000:] + r.stderr[-3000:])
        ts = torch.jit.load(str(out))
        with torch.no_grad():
            y = ts(torch.rand(1, 1, 64, 64))
        self.assertEqual(tuple(y.shape), (1, 2, 64, 64))

    def _fresh_venv(self) -> tuple[Path, Path]:
        """A fresh venv holding the packed bundle's metadata requirements (pip), sharing this environment's other
        packages but never its guidino_monai; and the bundle downloaded into a fresh folder with it."""
        if getattr(type(self), "venv", None) is not None:
            return type(self).venv, type(self).downloaded
        root = Path(self.tmp.name)
        py = clean_python(root / "venv")
        dist = root / "dist"
        zip_path = pack_bundle(self.bundle, dist, override=infer_overrides(FETAL))
        self.assertEqual(os.stat(zip_path).st_mode & 0o777, 0o644, "others in the pipeline must be able to read it")
        release = LoopbackRelease(dist)
        try:
            fresh = root / "downloaded"
            r = run_py(py, "-m", "monai.bundle", "download", "--name", FETAL, "--url",
                       f"{release.url}/{Path(zip_path).name}", "--bundle_dir", str(fresh), cwd=root)  # fmt: skip
            self.assertEqual(r.returncode, 0, r.stdout[-2000:] + r.stderr[-2000:])
        finally:
            release.close()
        got = fresh / FETAL
        pins = zoo_ci.requirements(str(got))
        (root / "requirements.txt").write_text("\n".join(pins) + "\n")
        r = run_py(py, "-m", "pip", "install", "-q", "--disable-pip-version-check", "-r", str(root / "requirements.txt"),
                   cwd=root, timeout=900)  # fmt: skip
        if r.returncode != 0:
            offline = ("NewConnectionError", "Network is unreachable", "Temporary failure in name resolution",
                       "Failed to establish a new connection", "ProxyError", "Max retries exceeded")  # fmt: skip
            if any(k in r.stderr for k in offline):
                self.skipTest(f"no package index reachable to install the metadata's requirements: {r.stderr[-300:]}")
            self.fail(f"the metadata's requirements do not install:\n{r.stderr[-3000:]}")
        type(self).venv, type(self).downloaded, type(self).pins = py, got, pins
        return py, got

    @pytest.mark.slow
    def test_downloaded_bundle_runs_in_fresh_venv(self):
        """Pack, serve over loopback HTTP, `monai.bundle download`, and run the inference of the downloaded bundle in a
        fresh venv holding only the metadata's requirements: the same segmentation as this repository's library."""
        py, got = self._fresh_venv()
        root = Path(self.tmp.name)
        code = "import importlib.metadata as m, json, sys; print(json.dumps({n: m.version(n) for n in sys.argv[1:]}))"
        r = run_py(py, "-c", code, *[p.split("==")[0] for p in self.pins], cwd=root)
        installed = json.loads(r.stdout)
        for pin in self.pins:  # the venv holds exactly the pinned versions (torch may carry a local label, +cpu)
            name, version = pin.split("==")
            self.assertEqual(installed[name].split("+")[0], version, pin)
        # the proof that the bundle brings what it needs: no guidino_monai without the bundle, its own copy with it
        r = run_py(py, "-c", "import guidino_monai", cwd=root)
        self.assertNotEqual(r.returncode, 0)
        self.assertIn("No module named 'guidino_monai'", r.stderr)
        r = run_py(py, "-c", "import scripts, guidino_monai; print(guidino_monai.__file__)", cwd=root,
                   env={"PYTHONPATH": str(got)})  # fmt: skip
        self.assertEqual(r.returncode, 0, r.stderr[-2000:])
        self.assertTrue(r.stdout.strip().startswith(str(got / "scripts" / "guidino_monai")), r.stdout)
        image = sorted((self.bundle / "demo_data" / "imagesTr").glob("*.nii.gz"))[0]
        out = root / "pipeline_out"
        args = ["-m", "monai.bundle", "run", "--config_file", str(got / "configs" / "inference.json"),
                "--meta_file", str(got / "configs" / "metadata.json"), "--input_files", str(image),
                "--output_dir", str(out)]  # fmt: skip
        for k, v in infer_overrides(FETAL).items():
            args += [f"--{k}", repr(v)]
        workdir = root / "elsewhere"
        workdir.mkdir(exist_ok=True)
        r = run_py(py, *args, cwd=workdir, env={"PYTHONPATH": str(got)})
        self.assertEqual(r.returncode, 0, r.stdout[-3000:] + r.stderr[-3000:])
        stem = image.name[: -len(".nii.gz")]
        seg = np.asarray(nib.load(str(out / f"{stem}_seg.nii.gz")).dataobj)
        # reference: the same weights and image through this repository's library, in this process
        ref_dir = root / "reference_out"
        run_workflow(self.bundle, ["inference.json"], workflow_type="infer", input_files=str(image),
                     output_dir=str(ref_dir), **infer_overrides(FETAL))  # fmt: skip
        ref = np.asarray(nib.load(str(ref_dir / f"{stem}_seg.nii.gz")).dataobj)
        self.assertEqual(seg.shape, ref.shape)
        self.assertGreater(len(np.unique(ref)), 1, "constant reference: the comparison would prove little")
        self.assertGreaterEqual(float((seg == ref).mean()), 0.999)  # other numpy, same model: at most stray voxels
        self.assertTrue((out / "head_circumference.csv").is_file())

    @pytest.mark.slow
    def test_torchscript_runs_without_guidino_monai(self):
        """models/model.ts of the zip loads in a process that cannot import guidino_monai and gives the eager output."""
        py, got = self._fresh_venv()
        root = Path(self.tmp.name)
        torch.manual_seed(1)
        x = torch.rand(1, 1, 64, 64)
        net = network_from_config(self.bundle, **infer_overrides(FETAL))
        net.load_state_dict(torch.load(self.bundle / "models" / "model.pt", weights_only=True))
        with torch.no_grad():
            eager = net.eval()(x)
        torch.save(x, root / "x.pt")
        code = (
            "import importlib.util, sys, torch\n"
            "assert importlib.util.find_spec('guidino_monai') is None, 'guidino_monai is importable'\n"
            "m = torch.jit.load(sys.argv[1])\n"
            "with torch.no_grad(): y = m(torch.load(sys.argv[2]))\n"
            "torch.save(y, sys.argv[3])\n"
            "assert not any(k.startswith('guidino_monai') for k in sys.modules)\n"
        )
        r = run_py(py, "-c", code, str(got / "models" / "model.ts"), str(root / "x.pt"), str(root / "y_ts.pt"),
                   cwd=root)  # fmt: skip
        self.assertEqual(r.returncode, 0, r.stderr[-3000:])
        traced = torch.load(root / "y_ts.pt")
        eager, traced = (eager[0], traced[0]) if isinstance(eager, (tuple, list)) else (eager, traced)
        self.assertEqual(tuple(traced.shape), (1, 2, 64, 64))
        self.assertGreater(float(eager.std()), 0.0)
        torch.testing.assert_close(traced, eager, atol=1e-4, rtol=1e-4)

    def test_torchrun_two_processes_gloo(self):
        """multi_gpu_train.json under torchrun: 2 CPU processes (gloo), one epoch, one checkpoint written."""
        bundle = copy_bundle(HIPPO, Path(self.tmp.name) / "ddp")
        configs = f"['{bundle}/configs/train.json','{bundle}/configs/multi_gpu_train.json']"
        args = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node=2",
            "-m",
            "monai.bundle",
            "run",
            "--config_file",
            configs,
            "--meta_file",
            str(bundle / "configs" / "metadata.json"),
            "--logging_file",
            str(bundle / "configs" / "logging.conf"),
        ]
        for k, v in {**FAST[HIPPO], "num_demo_cases": 12}.items():  # >= 1 validation case per process
            args += [f"--{k}", repr(v)]
        env = {**ENV, "OMP_NUM_THREADS": "1"}
        r = subprocess.run(args, env=env, capture_output=True, text=True, timeout=300, cwd=str(bundle))
        self.assertEqual(r.returncode, 0, r.stdout[-4000:] + r.stderr[-4000:])
        ckpt = torch.load(bundle / "models" / "checkpoint_last.pt", weights_only=True)
        self.assertEqual(ckpt["engine"]["epoch"], 1)
        self.assertFalse(any(k.startswith("module.") for k in ckpt["network"]), "DDP prefix must not be saved")
        self.assertTrue((bundle / "models" / "model.pt").is_file())


if __name__ == "__main__":
    unittest.main()
