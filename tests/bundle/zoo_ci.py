"""The MONAI model zoo's CI steps, written again here (not vendored), run the way the zoo runs them.

What the zoo does (Project-MONAI/model-zoo ``ci/``), and where each step lives below:

- ``get_bundle_requirements.py``: ``monai==``, ``torch==``, ``numpy==`` and every ``required/optional_packages_version``
  entry as ``name==version`` -> :func:`requirements`.
- ``verify_bundle.py`` (``sys.path = [bundle] + sys.path`` first): the directory rules (download ``large_files.yml``
  with ``monai.apps.download_url``, empty hashes dropped, then the necessary ``configs/metadata.json``, ``LICENSE``
  and the preferred ``models/model.pt``, ``configs/inference.*``), version/changelog, ``verify_metadata`` against
  ``eval/schema.json`` (``prepare_schema.py`` puts the schema there), the properties check of ``supported_apps``,
  ``verify_net_in_out`` on ``network_def`` of the inference config, and ``ckpt_export`` (script mode) plus
  ``torch.jit.load`` of a provided ``models/model.ts`` -> :func:`verify`.
- ``unit_tests/test_<bundle>.py`` and ``_dist.py`` (what a contributor writes, with ``unit_tests/utils.py``):
  ``ConfigWorkflow`` train (1 epoch), train+evaluate (``workflow_type="train"``), inference with the checkpoint loader
  disabled, each with an override dict and ``check_properties``; then the same configs merged, overridden, exported
  and run under ``torchrun`` with ``PYTHONPATH=<bundle_root>`` -> :func:`unit`.

Run from a "zoo root" holding ``models/<bundle>``, by a Python that does not have guidino_monai (the zoo cannot
install it): the bundle brings its own copy under ``scripts/``. Every step prints one ``ZOO <step>: ...`` line.

    python zoo_ci.py requirements models/<bundle>
    python zoo_ci.py verify models/<bundle> --schema <schema.json> [--script-export]
    python zoo_ci.py unit models/<bundle> --override '<json>' --infer-override '<json>'
    torchrun --standalone --nproc_per_node=1 zoo_ci.py dist models/<bundle> --override '<json>'  # as the zoo runs it
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shutil
import subprocess
import sys

SPECIAL_LIB_LIST = ["xformers"]


def say(step: str, msg: str) -> None:
    print(f"ZOO {step}: {msg}", flush=True)


def _json(path: str) -> dict:
    with open(path) as f:
        return json.load(f)


def _find_bundle_file(root_dir: str, file: str) -> str | None:
    found = None
    for suffix in ("json", "yaml", "yml"):
        if f"{file}.{suffix}" in os.listdir(root_dir):
            found = f"{file}.{suffix}"
    return found


def requirements(bundle: str) -> list[str]:
    """The requirement lines the zoo installs for a bundle (``ALLOW_MONAI_RC`` off)."""
    meta = _json(os.path.join(bundle, "configs", "metadata.json"))
    libs = []
    if "monai_version" in meta:
        libs.append(f"monai=={meta['monai_version']}")
    if "pytorch_version" in meta:
        libs.append(f"torch=={meta['pytorch_version']}")
    if "numpy_version" in meta:
        libs.append(f"numpy=={meta['numpy_version']}")
    for key in ("optional_packages_version", "required_packages_version"):
        for name, version in meta.get(key, {}).items():
            if name not in SPECIAL_LIB_LIST:
                libs.append(f"{name}=={version}")
            elif "pytorch_version" in meta:
                libs = [lib for lib in libs if "torch" not in lib]
    return libs


def no_guidino_monai(step: str) -> None:
    """The zoo's Python has no guidino_monai: say so, and stop if this one has it."""
    if importlib.util.find_spec("guidino_monai") is not None:
        raise SystemExit(f"this Python can import guidino_monai ({importlib.util.find_spec('guidino_monai').origin}):"
                         " the zoo's cannot, so this run would prove nothing")  # fmt: skip
    say(step, "guidino_monai is not importable before the bundle is on sys.path")


def carried_library(step: str, bundle: str) -> None:
    import guidino_monai

    path = os.path.abspath(guidino_monai.__file__)
    scripts = os.path.abspath(os.path.join(bundle, "scripts"))
    if not path.startswith(scripts + os.sep):
        raise SystemExit(f"guidino_monai came from {path}, not from the bundle's {scripts}")
    say(step, f"guidino_monai from {path}")


def download_large_files(bundle: str) -> None:
    from monai.apps.utils import download_url
    from monai.bundle import ConfigParser

    name = _find_bundle_file(bundle, "large_files")
    if name is None:
        return
    parser = ConfigParser()
    parser.read_config(os.path.join(bundle, name))
    for lf in parser.get()["large_files"]:
        lf["fuzzy"] = True
        if lf.get("hash_val", None) == "":
            lf.pop("hash_val")
        if lf.get("hash_type", None) == "":
            lf.pop("hash_type")
        lf["filepath"] = os.path.join(bundle, lf.pop("path"))
        download_url(**lf)


def verify(bundle: str, schema: str, script_export: bool) -> None:
    import torch
    from monai.bundle import ConfigParser, ckpt_export, create_workflow, verify_metadata, verify_net_in_out
    from monai.bundle.properties import InferProperties, MetaProperties

    no_guidino_monai("verify")
    sys.path = [bundle] + sys.path
    # directory: large files first, then necessary and preferred files
    try:
        download_large_files(bundle)
    except Exception as e:
        raise ValueError(f"Download large files in {bundle} error.") from e
    for f in ("configs/metadata.json", "LICENSE"):
        if not os.path.exists(os.path.join(bundle, f)):
            raise ValueError(f"necessary file {f} is not existing.")
    if not os.path.exists(os.path.join(bundle, "models", "model.pt")):
        raise ValueError("necessary file models/model.pt is not existing.")
    if _find_bundle_file(os.path.join(bundle, "configs"), "inference") is None:
        raise ValueError("inference config file is not existing.")
    say("directory", "large files downloaded and hash-checked; necessary and preferred files present")
    # version and changelog (the zoo also refuses a version already in its model_info.json: a new bundle has none)
    meta = _json(os.path.join(bundle, "configs", "metadata.json"))
    if meta["version"] not in meta.get("changelog", {}):
        raise ValueError(f"version number: {meta['version']} is missing in 'changelog'")
    say("version", f"{meta['version']} is in the changelog")
    # metadata format (prepare_schema.py copies the schema to eval/schema.json; verify_metadata reads it there)
    os.makedirs(os.path.join(bundle, "eval"), exist_ok=True)
    shutil.copyfile(schema, os.path.join(bundle, "eval", "schema.json"))
    verify_metadata(meta_file=os.path.join(bundle, "configs", "metadata.json"),
                    filepath=os.path.join(bundle, "eval", "schema.json"))  # fmt: skip
    say("metadata", "verified against the schema")
    # properties: the zoo checks MetaProperties + InferProperties on the inference config for each supported app that
    # has a bundle_properties.py in the zoo (none has one for monai-label: the zoo would skip); the check itself:
    config = os.path.join(bundle, "configs", _find_bundle_file(os.path.join(bundle, "configs"), "inference"))
    wf = create_workflow(workflow_type="inference", bundle_root=bundle, config_file=config,
                         logging_file=os.path.join(bundle, "configs", "logging.conf"),
                         meta_file=os.path.join(bundle, "configs", "metadata.json"))  # fmt: skip
    wf.properties = {**MetaProperties, **InferProperties}
    missing = wf.check_properties()
    if missing:
        raise ValueError(f"check properties for workflow failed: {missing}")
    say("properties", f"MetaProperties + InferProperties present (supported_apps: {meta.get('supported_apps')})")
    carried_library("properties", bundle)
    # data shape
    verify_net_in_out(net_id="network_def", meta_file=os.path.join(bundle, "configs", "metadata.json"),
                      config_file=config, bundle_root=bundle)  # fmt: skip
    say("data_shape", "verify_net_in_out passed")
    # TorchScript: the zoo's export is script mode; traced is the bundle's documented export
    kwargs = dict(net_id="network_def", ckpt_file=os.path.join(bundle, "models", "model.pt"),
                  meta_file=os.path.join(bundle, "configs", "metadata.json"), config_file=config, bundle_root=bundle)
    if script_export:
        try:
            ckpt_export(filepath=os.path.join(bundle, "models", "verify_model.ts"), **kwargs)
            say("export_script", "PASS")
        except Exception as e:  # noqa: BLE001 - reported, the test decides
            cause = e
            while cause.__cause__ is not None:
                cause = cause.__cause__
            say("export_script", f"FAIL {type(cause).__name__}: {str(cause).splitlines()[0][:200]}")
    parser = ConfigParser()
    parser.read_config(config)
    shape = [1, int(parser["network_def"].get("in_channels", 1)), *parser["roi_size"]]
    ckpt_export(filepath=os.path.join(bundle, "models", "verify_model_traced.ts"), use_trace=True, input_shape=shape,
                **kwargs)  # fmt: skip
    say("export_trace", f"ckpt_export use_trace=True at {shape} passed")
    ts = os.path.join(bundle, "models", "model.ts")
    if os.path.exists(ts):
        torch.jit.load(ts)
        say("provided_ts", "models/model.ts loads")


def _check_workflow(wf) -> None:
    wf.initialize()
    missing = wf.check_properties()
    if missing:
        raise ValueError(f"check properties for workflow failed: {missing}")
    wf.run()
    wf.finalize()


def _export_overridden(config_file, override: dict, output_path: str) -> None:
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config(config_file)
    parser.update(pairs=override)
    ConfigParser.export_config_file(parser.config, output_path, indent=4)


def _torchrun(config_file: str, bundle: str, override: dict, nproc: int) -> None:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nnodes=1", f"--nproc_per_node={nproc}",
           "-m", "monai.bundle", "run", "--config_file", config_file,
           "--meta_file", os.path.join(bundle, "configs", "metadata.json"),
           "--logging_file", os.path.join(bundle, "configs", "logging.conf")]  # fmt: skip
    env = os.environ.copy()
    env["PYTHONPATH"] = override.get("bundle_root", ".")  # the zoo's: custom code importable in the subprocesses
    env.setdefault("OMP_NUM_THREADS", "1")
    subprocess.check_call(cmd, env=env)


def unit(bundle: str, override: dict, infer_override: dict) -> None:
    from monai.bundle import ConfigWorkflow

    no_guidino_monai("unit")
    sys.path = [bundle] + sys.path  # as the zoo's unit tests of bundles with scripts/ do
    cfg = os.path.join(bundle, "configs")
    common = dict(logging_file=os.path.join(cfg, "logging.conf"), meta_file=os.path.join(cfg, "metadata.json"))
    override = {"bundle_root": bundle, **override}
    train, evaluate = os.path.join(cfg, "train.json"), os.path.join(cfg, "evaluate.json")
    _check_workflow(ConfigWorkflow(workflow_type="train", config_file=train, **common, **override))
    say("unit_train", "1 epoch, properties checked")
    carried_library("unit_train", bundle)
    _check_workflow(ConfigWorkflow(workflow_type="train", config_file=[train, evaluate], **common, **override))
    say("unit_eval", "train+evaluate, properties checked")
    infer = {"bundle_root": bundle, "handlers#0#_disabled_": True, **infer_override}
    _check_workflow(ConfigWorkflow(workflow_type="infer", config_file=os.path.join(cfg, "inference.json"), **common,
                                   **infer))  # fmt: skip
    say("unit_infer", "inference with the checkpoint loader disabled, properties checked")


def dist(bundle: str, override: dict, nproc: int = 2) -> None:
    """The ``_dist`` unit test. The zoo runs it under ``torchrun`` (one process: ``torchrun runner.py --dist True``),
    which is what lets its ``check_config`` step initialise the process group of ``multi_gpu_evaluate.json``."""
    from monai.bundle import ConfigWorkflow

    if "RANK" not in os.environ:
        raise SystemExit("run the dist step under torchrun, as the zoo does")
    no_guidino_monai("dist")
    sys.path = [bundle] + sys.path
    cfg = os.path.join(bundle, "configs")
    common = dict(logging_file=os.path.join(cfg, "logging.conf"), meta_file=os.path.join(cfg, "metadata.json"))
    override = {"bundle_root": bundle, **override}
    train, evaluate = os.path.join(cfg, "train.json"), os.path.join(cfg, "evaluate.json")
    out = os.path.join(cfg, "train_override.json")
    _export_overridden([train, os.path.join(cfg, "multi_gpu_train.json")], override, out)
    _torchrun(out, bundle, override, nproc)
    say("dist_train", f"torchrun x{nproc}")
    out = os.path.join(cfg, "eval_override.json")
    _export_overridden([train, evaluate, os.path.join(cfg, "multi_gpu_evaluate.json")], override, out)
    wf = ConfigWorkflow(workflow_type="train", config_file=out, **common)  # check_config=True
    wf.initialize()
    missing = wf.check_properties()
    if missing:
        raise ValueError(f"check properties for overrided mgpu configs failed: {missing}")
    _torchrun(out, bundle, override, nproc)
    say("dist_eval", f"torchrun x{nproc}, properties checked")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("step", choices=["requirements", "verify", "unit", "dist"])
    p.add_argument("bundle", help="models/<bundle>")
    p.add_argument("--schema", default=None)
    p.add_argument("--script-export", action="store_true")
    p.add_argument("--override", default="{}")
    p.add_argument("--infer-override", default="{}")
    a = p.parse_args(argv)
    if a.step == "requirements":
        print("\n".join(requirements(a.bundle)))
    elif a.step == "verify":
        verify(a.bundle, a.schema, a.script_export)
    elif a.step == "unit":
        unit(a.bundle, json.loads(a.override), json.loads(a.infer_override))
    else:
        dist(a.bundle, json.loads(a.override))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
