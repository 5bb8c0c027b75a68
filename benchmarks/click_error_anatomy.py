"""What one click can fix: the trained network's errors on held-out cases, and simple local rules at the first click.

Issue 11 asks for +0.05 mean Dice after 3 simulated clicks. This script measures why no training-free correction
here gets near it, on the same cases, network and simulated user as ``click_refinement.py``:

- **error pieces**: per case, the error voxels (network label != true label), the number of face-connected error
  pieces (the regions the simulated user clicks into, :func:`guidino_monai.interactive.next_click`), the largest
  piece, and the share of all error voxels in the 1, 3 and 5 largest pieces: with 3 clicks, a correction that fixes
  exactly the clicked pieces can fix at most the top-3 share;
- **local rules at the first click** (Dice gain after that one click, and the voxels each rule fixed and broke):
  ``piece``: the true label pasted into the clicked piece (the oracle, ``click_refinement.fix_pieces`` as
  ``oracle_component``); ``dilate_R<r>``:
  the clicked class grown by one voxel into the class predicted at the click, within ``r`` mm of the click;
  ``flip_R<r>_p<t>``: every voxel of the class predicted at the click, within ``r`` mm, whose network probability of
  the clicked class is at least ``t``, given that class (a local threshold shift).

The click is the simulated user's (centre of the largest error piece); its class is the true label there (a
background click removes the class predicted there). Dice is the mean over labels 1 and 2 on the 1 mm grid.

Usage (real data in ../shared/data; a trained bundle checkpoint)::

    PYTHONPATH=. python benchmarks/click_error_anatomy.py --weights <model.pt> --exclude_first 30 --num_cases 20 \
        --json benchmarks/results/click_error_anatomy.json
    PYTHONPATH=. python benchmarks/click_error_anatomy.py --dataset_dir demo --tiny --num_cases 2   # synthetic
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import numpy as np
import torch
from click_refinement import add_case_args, ball, dice, fix_pieces, load_cases_and_network
from scipy import ndimage

from guidino_monai.interactive import next_click

RADII = (4.0, 6.0, 8.0)
THRESHOLDS = (0.05, 0.1, 0.2)


def error_pieces(pred: np.ndarray, label: np.ndarray) -> np.ndarray:
    """Sizes of the face-connected error pieces (``pred != label``), largest first."""
    pieces, n = ndimage.label(pred != label)
    return np.sort(np.bincount(pieces.ravel(), minlength=n + 1)[1:])[::-1]


def dilate_near(pred: np.ndarray, point, target: int, radius: float) -> np.ndarray:
    """Grow class ``target`` by one voxel (face neighbours) into the class predicted at ``point``, within ``radius``."""
    source = int(pred[tuple(point)])
    grown = ndimage.binary_dilation(pred == target) & (pred == source) & ball(pred.shape, point, radius)
    grown[tuple(point)] = True
    out = pred.copy()
    out[grown] = target
    return out


def flip_near(pred: np.ndarray, probs: np.ndarray, point, target: int, radius: float, threshold: float) -> np.ndarray:
    """Give class ``target`` every voxel of the class predicted at ``point`` within ``radius`` whose probability of
    ``target`` is at least ``threshold``."""
    source = int(pred[tuple(point)])
    flip = (pred == source) & (probs[target] >= threshold) & ball(pred.shape, point, radius)
    flip[tuple(point)] = True
    out = pred.copy()
    out[flip] = target
    return out


def first_click_rules(pred: np.ndarray, probs: np.ndarray, label: np.ndarray) -> dict[str, dict[str, float]]:
    """Each rule at the simulated user's first click: ``{rule: {gain, fixed, broken}}`` (Dice gain, voxels)."""
    click = next_click(pred, label)
    if click is None:
        return {}
    point = click[0]
    target = int(label[tuple(point)])
    base = dice(pred, label)
    outs = {"piece": fix_pieces(pred, label, [point])}
    for r in RADII:
        outs[f"dilate_R{r:g}"] = dilate_near(pred, point, target, r)
        for t in THRESHOLDS:
            outs[f"flip_R{r:g}_p{t:g}"] = flip_near(pred, probs, point, target, r, t)
    rows = {}
    for name, out in outs.items():
        changed = out != pred
        rows[name] = {"gain": dice(out, label) - base, "fixed": int((changed & (out == label)).sum()),
                      "broken": int((changed & (pred == label)).sum())}  # fmt: skip
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_case_args(ap)
    args = ap.parse_args()
    setup = load_cases_and_network(args)
    per_case = []
    for item in setup["cases"]:
        d = setup["pre"](dict(item))
        image, label = d["image"][None].float(), d["label"][0].numpy().astype(np.int64)
        image = image.as_tensor() if hasattr(image, "as_tensor") else image
        setup["refiner"].set_image(image)
        logits, _ = setup["refiner"].predict()
        probs = torch.softmax(logits[0].float(), 0).numpy()
        pred = probs.argmax(0)
        sizes = error_pieces(pred, label)
        total = int(sizes.sum())
        row = {"image": Path(item["image"]).name, "dice": dice(pred, label), "error_voxels": total,
               "pieces": int(sizes.size), "largest_piece": int(sizes[0]) if sizes.size else 0,
               "top_share": {str(k): float(sizes[:k].sum() / total) if total else 0.0 for k in (1, 3, 5)},
               "rules": first_click_rules(pred, probs, label)}  # fmt: skip
        per_case.append(row)
        print(f"{row['image']}: Dice {row['dice']:.4f}, {total} error voxels in {row['pieces']} pieces, largest "
              f"{row['largest_piece']}, top-3 share {row['top_share']['3']:.2f}")  # fmt: skip
    if not per_case:
        raise SystemExit("no cases: check --dataset_dir, --exclude_first and --num_cases")
    mean = statistics.mean
    summary = {
        "dice": mean(c["dice"] for c in per_case),
        "error_voxels": mean(c["error_voxels"] for c in per_case),
        "pieces": mean(c["pieces"] for c in per_case),
        "largest_piece": mean(c["largest_piece"] for c in per_case),
        "top_share": {k: mean(c["top_share"][k] for c in per_case) for k in ("1", "3", "5")},
    }
    names = list(next(c["rules"] for c in per_case if c["rules"]))
    rules = {n: {f: mean(c["rules"][n][f] for c in per_case if c["rules"]) for f in ("gain", "fixed", "broken")}
             for n in names}  # fmt: skip
    print(f"\nweights: {setup['weights']} (guide ViT {setup['guide_vit']}); {len(per_case)} held-out cases; mean Dice "
          f"{summary['dice']:.4f}; per case {summary['error_voxels']:.0f} error voxels in {summary['pieces']:.0f} "
          f"pieces, largest {summary['largest_piece']:.0f}; share of the error in the largest 1 / 3 / 5 pieces: "
          + " / ".join(f"{summary['top_share'][k]:.3f}" for k in ("1", "3", "5")))  # fmt: skip
    print("| rule at the first click | Dice gain | voxels fixed | voxels broken |\n|---|---|---|---|")
    for n, r in rules.items():
        print(f"| {n} | {r['gain']:+.4f} | {r['fixed']:.1f} | {r['broken']:.1f} |")
    if args.json:
        Path(args.json).write_text(json.dumps({"command": "python " + " ".join(sys.argv), "weights": setup["weights"],
                                               "guide_vit": setup["guide_vit"], "summary": summary, "rules": rules,
                                               "cases": per_case}, indent=2))  # fmt: skip


if __name__ == "__main__":
    main()
