"""Inference speed of the bundles' own networks on real images: plain vs guided, side by side in one process.

Usage::

    python benchmarks/bundle_inference_speed.py --json benchmarks/results/bundle_inference_speed_cpu.json

For each bundle (hippocampus MRI 3D, fetal-head ultrasound 2D) the network, ROI and sliding-window settings come from
its ``configs/inference.json`` (``--guide False`` for the plain network); images are real cases from
``../shared/data`` (or ``$GUIDINO_SHARED_DATA``), intensities scaled to [0, 1]. Plain and guided run interleaved on
the same images; the script prints the median seconds per image and the ratio. Random-init weights (speed does not
depend on them). No pre/post-processing: this times the network and the inferer, which is what the guide changes
(a bundle that resizes the whole image, the fetal head's, is timed on the resized image).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
import warnings
from pathlib import Path

import nibabel as nib
import numpy as np
import torch
from monai.bundle import ConfigParser

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("GUIDINO_SHARED_DATA", REPO.parent / "shared" / "data"))
BUNDLES = {
    "hippocampus": ("guidino_hippocampus_mri_segmentation", "msd_hippocampus/imagesTr/*.nii.gz"),
    "fetalhead": ("guidino_fetalhead_us_segmentation", "hc18/imagesTr/*.nii.gz"),
}


def load(path: Path, dims: int) -> torch.Tensor:
    arr = np.asarray(nib.load(str(path)).dataobj, dtype=np.float32)
    while arr.ndim > dims and arr.shape[-1] == 1:  # 2D NIfTI stored with a trailing singleton axis
        arr = arr[..., 0]
    arr = (arr - arr.min()) / max(float(arr.max() - arr.min()), 1e-6)
    return torch.from_numpy(np.ascontiguousarray(arr))[None, None]


def resized_to(bundle: str) -> list[int] | None:
    """The network input size when the bundle's inference preprocessing resizes the image (``Resized``), else None."""
    parser = ConfigParser()
    parser.read_config(str(REPO / "bundles" / bundle / "configs" / "inference.json"))
    if any(t.get("_target_") == "Resized" for t in parser["preprocessing"]["transforms"]):
        return list(parser["roi_size"])
    return None


def build(bundle: str, guided: bool, vit_dtype: str | None, guide_size: int | None = None):
    parser = ConfigParser()
    parser.read_config(str(REPO / "bundles" / bundle / "configs" / "inference.json"))
    parser["guide"] = guided
    parser["guide_kwargs"]["vit_dtype"] = vit_dtype
    if guide_size is not None:
        parser["guide_kwargs"]["guide_size"] = guide_size
    parser["bundle_root"] = str(REPO / "bundles" / bundle)
    parser["tta_axes"] = []
    parser["save_guide"] = False
    net = parser.get_parsed_content("network_def").eval()
    return net, parser.get_parsed_content("inferer")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--bundles", nargs="+", default=list(BUNDLES), choices=list(BUNDLES))
    p.add_argument("--images", type=int, default=6, help="real images per bundle")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--json", default=None)
    p.add_argument("--guide_sizes", nargs="*", type=int, default=[],
                   help="also time the guided network at these guide sizes (the DINO input's longer side)")
    args = p.parse_args()
    warnings.filterwarnings("ignore")
    rows = []
    for name in args.bundles:
        bundle, pattern = BUNDLES[name]
        files = sorted(SHARED.glob(pattern))[: args.images]
        if not files:
            print(f"no images for {name} under {SHARED} ({pattern}): skipped", file=sys.stderr)
            continue
        images = [load(f, 3 if name == "hippocampus" else 2) for f in files]
        size = resized_to(bundle)
        if size is not None:  # the bundle resizes the whole image to the network input (fetal head): time that input
            images = [torch.nn.functional.interpolate(i, size=size, mode="bilinear", antialias=True) for i in images]
        variants = {"plain": build(bundle, False, None), "guided": build(bundle, True, None),
                    "guided_vit_bf16": build(bundle, True, "bfloat16")}  # fmt: skip
        for gs in args.guide_sizes:
            variants[f"guided_guide_size_{gs}"] = build(bundle, True, None, gs)
        times: dict[str, list[float]] = {v: [] for v in variants}
        with torch.inference_mode():
            for net, inferer in variants.values():  # warm-up
                inferer(images[0], net)
            for _ in range(args.repeats):
                for v, (net, inferer) in variants.items():
                    t0 = time.perf_counter()
                    for image in images:
                        inferer(image, net)
                    times[v].append((time.perf_counter() - t0) / len(images) * 1000)
        plain = statistics.median(times["plain"])
        shape = "x".join(str(s) for s in images[0].shape[2:])
        for v in [v for v in variants if v != "plain"]:
            ms = statistics.median(times[v])
            rows.append({"bundle": bundle, "variant": v, "images": len(images), "first_image_shape": shape,
                         "plain_ms": round(plain, 1), "guided_ms": round(ms, 1),
                         "ratio": round(ms / plain, 3)})  # fmt: skip
            print(f"| {bundle} | {v} | {shape} | {plain:.0f} | {ms:.0f} | {ms / plain:.2f} |", flush=True)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(rows, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
