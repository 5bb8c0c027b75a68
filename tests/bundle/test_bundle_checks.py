"""Bundle hygiene and delivery: verify_metadata, verify_net_in_out, ckpt_export, bad input, torchrun (gloo),
and packing a bundle into a zip that `monai.bundle download` fetches from a loopback HTTP server."""

from __future__ import annotations

import functools
import http.server
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import unittest
from pathlib import Path

import nibabel as nib
import numpy as np
import torch
from bundle_utils import BUNDLES, FAST, FETAL, HIPPO, SCHEMA, copy_bundle, infer_overrides, run_workflow
from parameterized import parameterized
from testing_utils import REPO_ROOT

from guidino_monai.bundle.pack import pack_bundle
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
        err = self.assertRaisesInChain(FileNotFoundError, run_workflow, bundle, ["inference.json"],
                                       workflow_type="infer", **infer_overrides(HIPPO))  # fmt: skip
        self.assertIn("model.pt", str(err))


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

    def test_pack_download_and_infer(self):
        """Pack (configs, docs, weights, TorchScript), serve over loopback HTTP, `monai.bundle download` it into a
        fresh folder and run its inference config there."""
        dist = Path(self.tmp.name) / "dist"
        zip_path = pack_bundle(self.bundle, dist, override=infer_overrides(FETAL))
        handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(dist))
        server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
        thread = threading.Thread(target=server.serve_forever, daemon=True)
        thread.start()
        try:
            url = f"http://127.0.0.1:{server.server_address[1]}/{Path(zip_path).name}"
            fresh = Path(self.tmp.name) / "downloaded"
            r = monai_bundle("download", "--name", FETAL, "--url", url, "--bundle_dir", str(fresh))
            self.assertEqual(r.returncode, 0, r.stdout[-2000:] + r.stderr[-2000:])
        finally:
            server.shutdown()
        got = fresh / FETAL
        for rel in ("configs/inference.json", "configs/metadata.json", "docs/README.md", "LICENSE",
                    "large_files.yml", "models/model.pt", "models/model.ts"):  # fmt: skip
            self.assertTrue((got / rel).is_file(), rel)
        image = sorted((self.bundle / "demo_data" / "imagesTr").glob("*.nii.gz"))[0]
        out = Path(self.tmp.name) / "pipeline_out"
        args = ["run", "--config_file", str(got / "configs" / "inference.json"), "--input_files", str(image),
                "--output_dir", str(out)]  # fmt: skip
        for k, v in infer_overrides(FETAL).items():
            args += [f"--{k}", repr(v)]
        r = monai_bundle(*args, cwd=Path(self.tmp.name))
        self.assertEqual(r.returncode, 0, r.stdout[-3000:] + r.stderr[-3000:])
        seg = out / (image.name[: -len(".nii.gz")] + "_seg.nii.gz")
        self.assertTrue(seg.is_file())
        self.assertEqual(nib.load(str(seg)).shape[:2], nib.load(str(image)).shape[:2])

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
