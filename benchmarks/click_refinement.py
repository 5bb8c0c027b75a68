"""Click refinement: Dice after 0, 1, 3, 5 simulated clicks, and seconds per click, on the validation cases.

Usage::

    python benchmarks/click_refinement.py --dataset_dir ../shared/data/msd_hippocampus --num_cases 10 \
        --weights <trained model.pt> --json benchmarks/results/click_refinement.json
    python benchmarks/click_refinement.py --dataset_dir demo --tiny      # synthetic data, random tiny network

The simulated user clicks at the centre of the largest error region (:func:`guidino_monai.interactive.next_click`):
a foreground click where the true label is foreground (for that label), a background click otherwise (for the label
predicted there). The methods are compared on the same clicks' rule, each with its own click sequence:

- ``prototypes``: each click's DINO token becomes an extra positive/negative TokenBook prototype (no retraining); the
  ViT runs once per case, each click costs one TokenBook + backbone pass;
- ``prototypes+regions``: the same, then each click's intensity region
  (:func:`guidino_monai.interactive.apply_clicks`, ``--radius`` mm, ``--tolerance`` std) is forced to the click's
  label, training-free, so a click helps whatever the guide ViT's weights;
- ``regions``: the regions alone (the app's ``click_method: regions``);
- ``clickmaps``: training-free Gaussian click maps added to the network's log-probabilities
  (:func:`guidino_monai.interactive.bias_clicks`, ``--sigma`` mm, ``--strength``, ``--margin``): what the MONAI Label
  app serves when the bundle has no click refiner (``click_method: auto``);
- ``refiner``: the bundle's click-trained refiner (``--refiner``, :class:`guidino_monai.interactive.ClickRefinementNet`,
  trained with ``python -m guidino_monai.interactive.train_refiner``) corrects the network's segmentation from all
  clicks so far (what the app serves when ``models/click_refiner.pt`` is present);
- ``refiner+regions``: the refiner, then the click regions;
- ``oracle``: not a method but the ceiling of every *local* correction: the true label is pasted into a ball of
  ``--oracle_radius`` voxels around each click so far (a perfect correction of the clicked neighbourhood, nothing
  changed elsewhere). A goal above the oracle at a given radius cannot be met by a correction of that reach;
- ``oracle_component``: the ceiling of a correction that fixes a whole error piece per click: the true label is
  pasted into the connected error region (voxels where the network's label is wrong, face-connected: the regions the
  simulated user clicks into) under each click so far, whatever its size.

``--methods`` picks some of them.

Dice is the mean over labels 1 and 2 on the bundle's preprocessed grid (1 mm RAS). Cases are the bundle's validation
split (``prepare_datalists``, seed 0), never seen in training.
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
from scipy import ndimage

from guidino_monai.bundle import prepare_datalists
from guidino_monai.interactive import ClickRefinementNet, ClickRefiner, apply_clicks, bias_clicks, load_refiner, \
    next_click, refine_with_clicks
from guidino_monai.interactive.refinement import DEFAULT_REACH

BUNDLE = Path(__file__).resolve().parents[1] / "bundles" / "guidino_hippocampus_mri_segmentation"


def dice(pred: np.ndarray, label: np.ndarray, labels=(1, 2)) -> float:
    scores = []
    for lab in labels:
        a, b = pred == lab, label == lab
        total = a.sum() + b.sum()
        scores.append(2.0 * np.logical_and(a, b).sum() / total if total else 1.0)
    return float(np.mean(scores))


def ball(shape, point, radius: float) -> np.ndarray:
    """Voxels within ``radius`` (voxels) of ``point``."""
    grid = np.indices(shape)
    return sum((grid[i] - point[i]) ** 2 for i in range(len(shape))) <= radius**2


def fix_pieces(pred: np.ndarray, label: np.ndarray, points) -> np.ndarray:
    """The truth pasted into the error pieces (``pred != label``, face-connected, as :func:`next_click` finds them)
    under ``points``: the ceiling of a correction that fixes whole clicked pieces. Returns a copy."""
    pieces, _ = ndimage.label(pred != label)
    hit = {int(pieces[tuple(point)]) for point in points} - {0}
    fix = np.isin(pieces, sorted(hit))
    out = pred.copy()
    out[fix] = label[fix]
    return out


def run_case(
    refiner: ClickRefiner,
    image: torch.Tensor,
    label: np.ndarray,
    clicks: int,
    steps: list[int],
    regions: bool,
    radius: float,
    tolerance: float,
    prototypes: bool = True,
    max_radius: float | None = 12.0,
    uncertain_band: float | None = None,
    refine_net: ClickRefinementNet | None = None,
    reach: float | None = 4.0,
    oracle_radius: float | None = None,
    clickmaps: dict | None = None,
    oracle_component: bool = False,
) -> tuple[dict[int, float], list[float], int, int]:
    """Simulated clicks on one case: ``(Dice per step, seconds per click, foreground clicks, background clicks)``."""
    intensities = image[0, 0].numpy()
    fg, bg, history, scores, seconds = [], [], [], {}, []
    for k in range(clicks + 1):
        t = time.perf_counter()
        logits, _ = refiner.predict(fg, bg) if prototypes else refiner.predict()
        probs = torch.softmax(logits[0].float(), 0).numpy()
        if refine_net is not None and history:  # channel: the true class for a foreground click, 0 for a background one
            clicks = [(point, lab if is_fg else 0) for point, is_fg, lab in history]
            probs = refine_with_clicks(refine_net, image, torch.from_numpy(probs)[None], clicks,
                                       reach=reach)[0].numpy()
        if clickmaps is not None and history:  # one call per clicked class: heights from the same probabilities
            logp = np.log(np.clip(probs, 1e-6, 1.0))
            biased = logp.copy()
            for lab in sorted({lab for _, _, lab in history}):
                fg_l = [p for p, f, c in history if f and c == lab]
                bg_l = [p for p, f, c in history if not f and c == lab]
                biased += np.log(bias_clicks(probs, fg_l, bg_l, label=lab, **clickmaps)) - logp
            probs = np.exp(biased - biased.max(0, keepdims=True))
            probs /= probs.sum(0, keepdims=True)
        if regions:
            for point, is_fg, lab in history:  # in click order: a later click wins where regions overlap
                probs = apply_clicks(probs, intensities, [point] if is_fg else [], [] if is_fg else [point], label=lab,
                                     radius=radius, tolerance=tolerance, max_radius=max_radius,
                                     uncertain_band=uncertain_band)  # fmt: skip
        pred = probs.argmax(0)
        if oracle_radius is not None and history:  # the upper bound: the truth in a ball around every click
            for point, _, _ in history:
                near = ball(pred.shape, point, oracle_radius)
                pred[near] = label[near]
        if oracle_component and history:  # the upper bound: the truth in the whole error piece under every click
            pred = fix_pieces(pred, label, [point for point, _, _ in history])
        if k > 0:
            seconds.append(time.perf_counter() - t)
        if k in steps:
            scores[k] = dice(pred, label)
        click = next_click(pred, label)
        if click is None:
            for j in steps:
                scores.setdefault(j, scores[k]) if j > k else None
            break
        point, is_fg = click
        lab = int(label[tuple(point)]) if is_fg else int(pred[tuple(point)])
        (fg if is_fg else bg).append(point)
        history.append((point, is_fg, lab))
    return scores, seconds, len(fg), len(bg)


def add_case_args(ap: argparse.ArgumentParser) -> None:
    """The arguments that pick the network and the held-out cases (shared with ``click_error_anatomy.py``)."""
    ap.add_argument("--dataset_dir", default=str(Path(__file__).resolve().parents[2] / "shared/data/msd_hippocampus"))
    ap.add_argument("--weights", default=str(BUNDLE / "models" / "model.pt"))
    ap.add_argument("--num_cases", type=int, default=10)
    ap.add_argument(
        "--max_cases",
        type=int,
        default=None,
        help="as the training run's max_cases, so the validation split is the one it held out",
    )
    ap.add_argument(
        "--tiny",
        action="store_true",
        help="depth-2 guide ViT, guide_size 56 (as a quick CPU training run with those overrides)",
    )
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--exclude_first", type=int, default=0,
                    help="leave out the first N cases by name (those a quick --max_cases N training run saw, and the "
                    "validation cases the click regions were tuned on): a clean held-out set")  # fmt: skip
    ap.add_argument("--json", default=None)


def load_cases_and_network(args: argparse.Namespace) -> dict:
    """The bundle's validation cases (seed 0, less ``--exclude_first``), its network with ``--weights``, the
    preprocessing and a :class:`ClickRefiner` on it: ``dict(data, cases, net, weights, guide_vit, pre, refiner)``."""
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    train = ConfigParser()
    train.read_config(str(BUNDLE / "configs" / "train.json"))
    train["bundle_root"] = str(BUNDLE)
    data = prepare_datalists(args.dataset_dir, "hippocampus", str(BUNDLE / "demo_data"), val_fraction=0.2, seed=0,
                             max_cases=args.max_cases)  # fmt: skip
    seen = set()
    if args.exclude_first:
        seen = {Path(d["image"]).name for d in sorted(data["all"], key=lambda d: Path(d["image"]).name)}
        seen = set(sorted(seen)[: args.exclude_first])
    cases = [d for d in data["val"] if Path(d["image"]).name not in seen][: args.num_cases]
    infer = ConfigParser()
    infer.read_config(str(BUNDLE / "configs" / "inference.json"))
    infer["bundle_root"] = str(BUNDLE)
    infer["device"] = "$torch.device('cpu')"
    if args.tiny:
        infer["guide_backbone_kwargs"] = {"depth": 2}
        infer["guide_kwargs#guide_size"] = 56
    net = infer.get_parsed_content("network_def", instantiate=True)
    weights = "random init"
    if Path(args.weights).is_file():
        state = torch.load(args.weights, map_location="cpu", weights_only=True)
        net.load_state_dict(state.get("model", state) if isinstance(state, dict) and "model" in state else state)
        weights = args.weights
    guide_vit = "pretrained" if getattr(net.guide, "pretrained", False) else "random-init"
    net.eval()
    pre = train.get_parsed_content("validate#preprocessing", instantiate=True)
    roi = infer.get_parsed_content("roi_size")
    refiner = ClickRefiner(net, roi_size=roi, sw_batch_size=4, overlap=0.5, mode="gaussian")
    return {"data": data, "cases": cases, "net": net, "weights": weights, "guide_vit": guide_vit, "pre": pre,
            "refiner": refiner}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_case_args(ap)
    ap.add_argument("--clicks", type=int, default=5)
    ap.add_argument("--radius", type=float, default=2.0, help="click region radius (mm; the grid is 1 mm)")
    ap.add_argument("--tolerance", type=float, default=1.0, help="click region intensity band (std)")
    ap.add_argument("--methods", default="prototypes,prototypes+regions,regions")
    ap.add_argument("--refiner", default=str(BUNDLE / "models" / "click_refiner.pt"),
                    help="click refiner weights for the refiner methods")  # fmt: skip
    ap.add_argument("--reach", type=float, default=None,
                    help="refine_with_clicks' reach for the refiner methods (voxels; default: the refiner file's own, "
                    "as the app serves it; -1: global)")  # fmt: skip
    ap.add_argument("--oracle_radius", type=float, nargs="+", default=[4.0],
                    help="ball radii (voxels) of the oracle method; each radius is its own column (oracle_r<R>)")
    ap.add_argument("--max_radius", type=float, default=6.0, help="largest click region radius (mm)")
    ap.add_argument("--uncertain_band", type=float, default=0.1,
                    help="apply_clicks' uncertain_band for the methods with regions (the app's default; -1: off)")
    ap.add_argument("--sigma", type=float, default=4.0, help="bias_clicks' click map width (mm) for clickmaps")
    ap.add_argument("--strength", type=float, default=4.0, help="bias_clicks' smallest click map height")
    ap.add_argument("--margin", type=float, default=2.0, help="bias_clicks' margin at the clicked voxel")
    args = ap.parse_args()
    if args.uncertain_band is not None and args.uncertain_band < 0:
        args.uncertain_band = None

    setup = load_cases_and_network(args)
    data, cases, weights, guide_vit = setup["data"], setup["cases"], setup["weights"], setup["guide_vit"]
    pre, refiner = setup["pre"], setup["refiner"]
    steps = sorted({0, 1, 3, args.clicks} & set(range(args.clicks + 1)))
    known = {"prototypes": (False, True, False), "prototypes+regions": (True, True, False),
             "regions": (True, False, False), "refiner": (False, False, True), "refiner+regions": (True, False, True),
             "clickmaps": (False, False, False), "oracle_component": (False, False, False)}
    oracles = {}
    methods = {}
    for m in args.methods.split(","):
        if m == "oracle":
            for r in args.oracle_radius:
                oracles[f"oracle_r{r:g}"] = r
                methods[f"oracle_r{r:g}"] = (False, False, False)
        else:
            methods[m] = known[m]
    refine_net, refiner_info = None, None
    if any(use for _, _, use in methods.values()):
        refine_net, refiner_info = load_refiner(args.refiner)
        if args.reach is None:  # as the app serves it
            args.reach = refiner_info.get("reach", DEFAULT_REACH)
        print(f"click refiner: {args.refiner} ({refiner_info.get('steps')} steps on "
              f"{refiner_info.get('num_train_cases')} training cases, reach {args.reach})")  # fmt: skip
    if args.reach is not None and args.reach < 0:
        args.reach = None
    maps = {"sigma": args.sigma, "strength": args.strength, "margin": args.margin}  # 1 mm grid: mm = voxels
    per_case, seconds, vit_seconds = [], {m: [] for m in methods}, []
    for item in cases:
        d = pre(dict(item))
        image, label = d["image"][None].float(), d["label"][0].numpy().astype(np.int64)
        image = image.as_tensor() if hasattr(image, "as_tensor") else image
        t = time.perf_counter()
        refiner.set_image(image)
        vit_seconds.append(time.perf_counter() - t)
        row = {"image": Path(item["image"]).name}
        for m, (regions, prototypes, use_refiner) in methods.items():
            scores, secs, n_fg, n_bg = run_case(refiner, image, label, args.clicks, steps, regions, args.radius,
                                                args.tolerance, prototypes, args.max_radius, args.uncertain_band,
                                                refine_net if use_refiner else None, args.reach,
                                                oracles.get(m), maps if m == "clickmaps" else None,
                                                m == "oracle_component")  # fmt: skip
            seconds[m] += secs
            row[m] = {"dice": scores, "fg": n_fg, "bg": n_bg}
        per_case.append(row)
        parts = [f"{m} " + ", ".join(f"{k}:{v:.3f}" for k, v in sorted(row[m]["dice"].items())) for m in methods]
        print(f"{row['image']}: " + "; ".join(parts))
    table = {m: {k: statistics.mean(c[m]["dice"][k] for c in per_case) for k in steps} for m in methods}
    print(f"\nweights: {weights} (guide ViT {guide_vit}); data: {data['dataset_dir']} "
          f"({'demo' if data['demo'] else 'real'}); {len(per_case)} held-out validation cases; CPU threads "
          f"{args.threads}; region radius {args.radius} mm, tolerance {args.tolerance}")  # fmt: skip
    print("| clicks | " + " | ".join(f"{m} mean Dice" for m in methods) + " |\n|---|" + "---|" * len(methods))
    for k in steps:
        print(f"| {k} | " + " | ".join(f"{table[m][k]:.4f} ({table[m][k] - table[m][0]:+.4f})" for m in methods) + " |")
    for m in methods:
        if seconds[m]:
            print(f"{m}: seconds per click median {statistics.median(seconds[m]):.3f}, max {max(seconds[m]):.3f}")
    print(f"ViT once per case: median {statistics.median(vit_seconds):.3f} s")
    if args.json:
        Path(args.json).write_text(
            json.dumps(
                {
                    "command": "python " + " ".join(__import__("sys").argv),
                    "table": table,
                    "gain": {m: {k: table[m][k] - table[m][0] for k in steps} for m in methods},
                    "cases": per_case,
                    "seconds_per_click": {m: statistics.median(v) for m, v in seconds.items() if v},
                    "max_seconds_per_click": {m: max(v) for m, v in seconds.items() if v},
                    "weights": weights,
                    "guide_vit": guide_vit,
                    "radius_mm": args.radius,
                    "tolerance": args.tolerance,
                    "max_radius_mm": args.max_radius,
                    "uncertain_band": args.uncertain_band,
                    "refiner": args.refiner if refine_net is not None else None,
                    "refiner_info": refiner_info,
                    "reach": args.reach,
                    "oracle_radius_voxels": oracles,
                    "clickmaps": maps if "clickmaps" in methods else None,
                },
                indent=2,
            )
        )


if __name__ == "__main__":
    main()
