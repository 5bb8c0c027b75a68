"""Click refinement: Dice after 0, 1, 3, 5 simulated clicks, and seconds per click, on the validation cases.

Usage::

    python benchmarks/click_refinement.py --dataset_dir ../shared/data/msd_hippocampus --num_cases 5
    python benchmarks/click_refinement.py --dataset_dir demo --tiny      # synthetic data, random tiny network

The simulated user clicks at the centre of the largest error region (:func:`guidino_monai.interactive.next_click`):
a foreground click where the true label is foreground, a background click otherwise. Each click's DINO token becomes an
extra positive/negative TokenBook prototype (no retraining); the ViT runs once per case, each click costs one TokenBook
+ backbone pass (timed). Dice is the mean over labels 1 and 2 on the bundle's preprocessed grid (1 mm RAS). Cases are
the bundle's validation split (``prepare_datalists``, seed 0).
Weights: the bundle's ``models/model.pt`` (``--weights``);
without DINOv2 weights in the bundle the guide ViT is random-init, which the output says.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
import warnings
from pathlib import Path

import numpy as np
import torch
from monai.bundle import ConfigParser

from guidino_monai.bundle import prepare_datalists
from guidino_monai.interactive import ClickRefiner, next_click

BUNDLE = Path(__file__).resolve().parents[1] / "bundles" / "guidino_hippocampus_mri_segmentation"


def dice(pred: np.ndarray, label: np.ndarray, labels=(1, 2)) -> float:
    scores = []
    for lab in labels:
        a, b = pred == lab, label == lab
        total = a.sum() + b.sum()
        scores.append(2.0 * np.logical_and(a, b).sum() / total if total else 1.0)
    return float(np.mean(scores))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dataset_dir", default=str(Path(__file__).resolve().parents[2] / "shared/data/msd_hippocampus"))
    ap.add_argument("--weights", default=str(BUNDLE / "models" / "model.pt"))
    ap.add_argument("--num_cases", type=int, default=5)
    ap.add_argument("--clicks", type=int, default=5)
    ap.add_argument("--tiny", action="store_true", help="random-init depth-2 ViT (smoke runs, no weights)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")

    train = ConfigParser()
    train.read_config(str(BUNDLE / "configs" / "train.json"))
    train["bundle_root"] = str(BUNDLE)
    data = prepare_datalists(args.dataset_dir, "hippocampus", str(BUNDLE / "demo_data"), val_fraction=0.2, seed=0)
    cases = data["val"][: args.num_cases]
    infer = ConfigParser()
    infer.read_config(str(BUNDLE / "configs" / "inference.json"))
    infer["bundle_root"] = str(BUNDLE)
    infer["device"] = "$torch.device('cpu')"
    if args.tiny:
        infer["guide_backbone_kwargs"] = {"depth": 2}
    net = infer.get_parsed_content("network_def", instantiate=True)
    weights = "random init"
    if not args.tiny and Path(args.weights).is_file():
        state = torch.load(args.weights, map_location="cpu", weights_only=True)
        net.load_state_dict(state.get("model", state) if isinstance(state, dict) else state)
        weights = args.weights
    net.eval()
    pre = train.get_parsed_content("validate#preprocessing", instantiate=True)
    roi = infer.get_parsed_content("roi_size")
    refiner = ClickRefiner(net, roi_size=roi, sw_batch_size=4, overlap=0.5, mode="gaussian")
    steps = sorted({0, 1, 3, args.clicks} & set(range(args.clicks + 1)))
    per_case, click_seconds, vit_seconds = [], [], []
    for item in cases:
        d = pre(dict(item))
        image, label = d["image"][None].float(), d["label"][0].numpy().astype(np.int64)
        t = time.perf_counter()
        refiner.set_image(image)
        vit_seconds.append(time.perf_counter() - t)
        fg, bg, scores = [], [], {}
        for k in range(args.clicks + 1):
            t = time.perf_counter()
            logits, _ = refiner.predict(fg, bg)
            if k > 0:
                click_seconds.append(time.perf_counter() - t)
            pred = logits[0].argmax(0).numpy()
            if k in steps:
                scores[k] = dice(pred, label)
            click = next_click(pred, label)
            if click is None:
                for j in range(k + 1, args.clicks + 1):
                    scores.setdefault(j, scores[k]) if j in steps else None
                break
            (fg if click[1] else bg).append(click[0])
        per_case.append({"image": Path(item["image"]).name, "dice": scores, "fg": len(fg), "bg": len(bg)})
        print(f"{per_case[-1]['image']}: " + ", ".join(f"{k} clicks {v:.4f}" for k, v in sorted(scores.items())))
    table = {k: statistics.mean(c["dice"][k] for c in per_case) for k in steps}
    print(f"\nweights: {weights}; data: {data['dataset_dir']} ({'demo' if data['demo'] else 'real'}); "
          f"{len(per_case)} validation cases; CPU threads {args.threads}")  # fmt: skip
    print("| clicks | mean Dice (labels 1, 2) |\n|---|---|")
    for k in steps:
        print(f"| {k} | {table[k]:.4f} |")
    print(f"seconds per click (TokenBook + backbone, CPU): median {statistics.median(click_seconds):.3f}; "
          f"ViT once per case: median {statistics.median(vit_seconds):.3f}")  # fmt: skip
    if args.json:
        Path(args.json).write_text(
            json.dumps(
                {
                    "table": table,
                    "cases": per_case,
                    "seconds_per_click": statistics.median(click_seconds),
                    "weights": weights,
                },
                indent=2,
            )
        )


if __name__ == "__main__":
    main()
