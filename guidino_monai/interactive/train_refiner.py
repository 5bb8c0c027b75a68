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

"""Train a bundle's click refiner (:class:`~guidino_monai.interactive.ClickRefinementNet`) with simulated clicks.

Usage (after the bundle's own training; the refiner corrects that network's output)::

    python -m guidino_monai.interactive.train_refiner --bundle_dir bundles/guidino_hippocampus_mri_segmentation \
        --dataset_dir ../shared/data/msd_hippocampus --minutes 15

writes ``<bundle>/models/click_refiner.pt``, which the MONAI Label app's click task then uses (it says so in
``/info/``). Only the bundle's training split is used (``train.json``'s ``data`` with the same ``val_fraction``,
``seed`` and ``max_cases``), so the bundle's validation cases stay unseen for the click benchmark.

Each case's segmentation to correct is the bundle network's own prediction (computed once, with the bundle's inferer);
with probability ``--perturb`` it is replaced by the label, eroded or dilated per class (more, and differently shaped,
errors). Each step draws 0 to ``--max_clicks`` clicks per case from :func:`~guidino_monai.interactive.simulate_clicks`
(the centre, or the deeper half, of the largest remaining error region) and trains the correction against the label
(Dice + cross-entropy). Training runs for ``--minutes`` of wall-clock time (learning rate cosine over time).
"""

from __future__ import annotations

import argparse
import logging
import math
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from ..bundle.utils import read_bundle_config
from .clicks import next_click
from .refinement import DEFAULT_REACH, DEFAULT_SIGMA, ClickRefinementNet, blend_near_clicks, click_guidance, \
    save_refiner, simulate_clicks

__all__ = ["prepare_cases", "train_refiner", "main"]

logger = logging.getLogger(__name__)


def prepare_cases(
    bundle_dir: str | Path,
    dataset_dir: str | None,
    weights: str | Path | None = None,
    max_cases: int | None = None,
    network_overrides: dict[str, Any] | None = None,
) -> tuple[list[dict[str, np.ndarray]], dict[str, Any]]:
    """The bundle's training cases, preprocessed as for validation, with the bundle network's probabilities.

    Returns:
        ``(cases, info)``: each case ``{"image": (1, *S) float32, "label": (*S) int64, "probs": (C, *S) float32,
        "name": str}``; ``info`` says which weights and data were used.

    Raises:
        FileNotFoundError: ``weights`` names no file.
    """
    bundle_dir = Path(bundle_dir)
    train = read_bundle_config(bundle_dir, "train.json", {"dataset_dir": dataset_dir, "max_cases": max_cases})
    infer = read_bundle_config(bundle_dir, "inference.json", {"device": "$torch.device('cpu')", "save_guide": False,
                                                              "tta_axes": [], **(network_overrides or {})})  # fmt: skip
    data = train.get_parsed_content("data")
    net = infer.get_parsed_content("network_def", instantiate=True)
    weights = Path(weights) if weights else bundle_dir / "models" / "model.pt"
    if not weights.is_file():
        raise FileNotFoundError(f"{weights}: no trained bundle weights; train the bundle first (the refiner learns to "
                                f"correct that network's segmentations).")  # fmt: skip
    state = torch.load(str(weights), map_location="cpu", weights_only=True)
    net.load_state_dict(state["model"] if isinstance(state, dict) and "model" in state else state)
    net.eval()
    inferer = infer.get_parsed_content("inferer", instantiate=True)
    pre = train.get_parsed_content("validate#preprocessing", instantiate=True)
    cases = []
    with torch.no_grad():
        for item in data["train"]:
            d = pre(dict(item))
            image = d["image"].as_tensor() if hasattr(d["image"], "as_tensor") else torch.as_tensor(d["image"])
            logits = inferer(image[None].float(), net)
            logits = logits[0] if isinstance(logits, (tuple, list)) else logits
            probs = torch.softmax(logits[0].float(), 0).numpy()
            label = np.asarray(d["label"])[0].astype(np.int64)
            cases.append({"image": image.float().numpy(), "label": label, "probs": probs, "name": Path(item["image"]).name})
    guide_vit = "pretrained" if getattr(getattr(net, "guide", None), "pretrained", False) else "random-init"
    info = {"weights": str(weights), "dataset_dir": str(data["dataset_dir"]), "demo": bool(data["demo"]),
            "num_train_cases": len(cases), "guide_vit": guide_vit}  # fmt: skip
    return cases, info


def _perturbed(label: np.ndarray, num_classes: int, rng: np.random.Generator) -> np.ndarray:
    """The label with each foreground class eroded or dilated by 1-2 voxels (one-hot probabilities, slightly soft)."""
    from scipy import ndimage

    out = np.zeros_like(label)
    for c in range(1, num_classes):
        mask = label == c
        steps = int(rng.integers(1, 3))
        mask = ndimage.binary_dilation(mask, iterations=steps) if rng.random() < 0.5 else (
            ndimage.binary_erosion(mask, iterations=steps))  # fmt: skip
        out[mask & (out == 0)] = c
    probs = np.eye(num_classes, dtype=np.float32)[out].transpose(label.ndim, *range(label.ndim))
    return 0.9 * probs + 0.1 / num_classes


def _batch(cases, indices, max_clicks, perturb, rng, shape, num_clicks=None):
    """Padded images, segmentations to correct, labels, and each case's simulated clicks (``num_clicks[j]``, else
    0 to ``max_clicks``) with its unpadded shape."""
    images, probs, labels, clicks, shapes = [], [], [], [], []
    for j, i in enumerate(indices):
        case = cases[i]
        p = _perturbed(case["label"], case["probs"].shape[0], rng) if rng.random() < perturb else case["probs"]
        n = int(rng.integers(0, max_clicks + 1)) if num_clicks is None else int(num_clicks[j])
        clicks.append(simulate_clicks(p.argmax(0), case["label"], n, rng))
        shapes.append(case["label"].shape)
        pad = [(0, s - c) for s, c in zip(shape, case["label"].shape)]
        images.append(np.pad(case["image"], [(0, 0)] + pad, mode="edge"))
        probs.append(np.pad(p, [(0, 0)] + pad, mode="edge"))
        labels.append(np.pad(case["label"], pad))
    return (torch.from_numpy(np.stack(images)), torch.from_numpy(np.stack(probs)), torch.from_numpy(np.stack(labels)),
            clicks, shapes)  # fmt: skip


def _guidance(clicks, shapes, shape, num_classes, sigma) -> torch.Tensor:
    maps = []
    for c, s in zip(clicks, shapes):
        pad = [(0, 0)] + [(0, t - u) for t, u in zip(shape, s)]
        maps.append(np.pad(click_guidance(s, c, num_classes, sigma), pad))
    return torch.from_numpy(np.stack(maps))


@torch.no_grad()
def _click_on_own_output(net, image, probs, label, clicks, shapes, num_classes, sigma, reach) -> None:
    """One more click per case at the largest error of the refiner's current answer (as the app serves it: blended
    with ``reach`` around the clicks), the way a user clicks on what the refiner returned (DeepEdit's click loop)."""
    guide = _guidance(clicks, shapes, image.shape[2:], num_classes, sigma)
    soft = torch.softmax(net(image, probs, guide).float(), 1)
    for b, (c, s) in enumerate(zip(clicks, shapes)):
        crop = (slice(None),) + tuple(slice(0, t) for t in s)
        answer = blend_near_clicks(soft[b][crop], probs[b][crop], c, reach)
        truth = label[b][crop[1:]].numpy()
        click = next_click(answer.argmax(0).numpy(), truth)
        if click is not None:
            c.append((click[0], int(truth[tuple(click[0])])))


def _soft_dice_loss(soft: torch.Tensor, onehot: torch.Tensor) -> torch.Tensor:
    """1 - mean foreground soft Dice of ``(B, C, *spatial)`` probabilities against the one-hot label."""
    axes = tuple(range(2, soft.ndim))
    dice = (2 * (soft * onehot).sum(axes) + 1e-5) / (soft.sum(axes) + onehot.sum(axes) + 1e-5)
    return 1 - dice[:, 1:].mean()


def train_refiner(
    cases: list[dict[str, np.ndarray]],
    minutes: float,
    max_clicks: int = 5,
    batch_size: int = 4,
    lr: float = 1e-3,
    perturb: float = 0.3,
    sigma: float = DEFAULT_SIGMA,
    seed: int = 0,
    max_steps: int | None = None,
    log_every: int = 50,
    network_kwargs: dict[str, Any] | None = None,
    iterative: float = 0.0,
    reach: float | None = DEFAULT_REACH,
    focus: float = 0.0,
) -> tuple[ClickRefinementNet, dict[str, Any]]:
    """Train a :class:`ClickRefinementNet` on ``cases`` (:func:`prepare_cases`) for ``minutes`` (or ``max_steps``).

    Whole images are used, padded to the largest case (rounded up to the UNet's stride product). ``network_kwargs``:
    ``channels``, ``strides``, ``num_res_units`` of :class:`ClickRefinementNet`. ``iterative``: the fraction of steps
    whose last 1 to ``max_clicks`` clicks are placed on the refiner's own answer (blended with ``reach``, as
    :func:`~guidino_monai.interactive.refine_with_clicks` serves it), one forward pass per click, instead of all on
    the segmentation to correct: what a user does, each click answering the previous correction. ``focus``: the
    weight of the loss on the answer as it is served (the correction blended in within ``reach`` of the clicks, the
    segmentation to correct elsewhere), ``1 - focus`` on the refiner's whole-image output; with ``focus`` the network
    spends itself where its correction is used. Returns the network
    (eval mode) and a summary (steps, seconds, first and last logged losses).
    """
    if not cases:
        raise ValueError("no training cases for the click refiner.")
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    num_classes = cases[0]["probs"].shape[0]
    dims = cases[0]["label"].ndim
    net = ClickRefinementNet(dims, num_classes, in_image_channels=cases[0]["image"].shape[0], **(network_kwargs or {}))
    factor = int(np.prod(net.config["strides"]))
    shape = [int(math.ceil(max(c["label"].shape[i] for c in cases) / factor) * factor) for i in range(dims)]
    opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=1e-5)
    budget, start, step, losses = minutes * 60.0, time.perf_counter(), 0, []
    net.train()
    while True:
        elapsed = time.perf_counter() - start
        if (max_steps is not None and step >= max_steps) or (max_steps is None and elapsed >= budget):
            break
        frac = step / max_steps if max_steps else elapsed / budget
        for g in opt.param_groups:
            g["lr"] = lr * 0.5 * (1 + math.cos(math.pi * min(frac, 1.0)))
        idx = rng.choice(len(cases), size=min(batch_size, len(cases)), replace=False)
        if iterative > 0 and max_clicks > 0 and rng.random() < iterative:
            rounds = int(rng.integers(1, max_clicks + 1))
            first = rng.integers(0, max_clicks - rounds + 1, size=len(idx))
            image, probs, label, clicks, shapes = _batch(cases, idx, max_clicks, perturb, rng, shape, first)
            for _ in range(rounds):
                _click_on_own_output(net, image, probs, label, clicks, shapes, num_classes, sigma, reach)
        else:
            image, probs, label, clicks, shapes = _batch(cases, idx, max_clicks, perturb, rng, shape)
        guide = _guidance(clicks, shapes, shape, num_classes, sigma)
        logits = net(image, probs, guide)
        onehot = F.one_hot(label, num_classes).movedim(-1, 1).float()
        soft = torch.softmax(logits, 1)
        loss = F.cross_entropy(logits, label) + _soft_dice_loss(soft, onehot)
        if focus > 0 and reach is not None:  # the answer as served: the correction blended in near the clicks only
            near = _guidance([[(p, 0) for p, _ in c] for c in clicks], shapes, shape, 1, reach)
            served = near * soft + (1 - near) * probs
            served_loss = F.nll_loss(torch.log(served.clamp_min(1e-6)), label) + _soft_dice_loss(served, onehot)
            loss = (1 - focus) * loss + focus * served_loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
        step += 1
        if step % log_every == 0:
            logger.info(f"click refiner step {step}: loss {np.mean(losses[-log_every:]):.4f} "
                        f"({time.perf_counter() - start:.0f} s)")  # fmt: skip
    net.eval()
    window = max(1, min(log_every, len(losses) // 4 or 1))
    summary = {"steps": step, "seconds": round(time.perf_counter() - start, 1), "batch_size": batch_size,
               "max_clicks": max_clicks, "perturb": perturb, "sigma": sigma, "seed": seed, "iterative": iterative,
               "reach": reach, "focus": focus,
               "first_loss": float(np.mean(losses[:window])) if losses else None,
               "last_loss": float(np.mean(losses[-window:])) if losses else None}  # fmt: skip
    return net, summary


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bundle_dir", required=True)
    ap.add_argument("--dataset_dir", default=None, help="the bundle's dataset_dir (default: its demo data)")
    ap.add_argument("--weights", default=None, help="the bundle network's weights (default: <bundle>/models/model.pt)")
    ap.add_argument("--out", default=None, help="default: <bundle>/models/click_refiner.pt")
    ap.add_argument("--minutes", type=float, default=15.0)
    ap.add_argument("--max_steps", type=int, default=None, help="stop after this many steps instead of --minutes")
    ap.add_argument("--max_cases", type=int, default=None, help="as the bundle's training run's max_cases")
    ap.add_argument("--max_clicks", type=int, default=5)
    ap.add_argument("--batch_size", type=int, default=4)
    ap.add_argument("--perturb", type=float, default=0.3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--iterative", type=float, default=0.0, help="fraction of steps whose last clicks go to the "
                    "refiner's own answer (DeepEdit's click loop)")  # fmt: skip
    ap.add_argument("--reach", type=float, default=DEFAULT_REACH, help="how far a click's correction reaches as "
                    "it is served (Gaussian width, voxels; saved in the file, the app serves it so)")  # fmt: skip
    ap.add_argument("--focus", type=float, default=0.0, help="weight of the loss on the answer as served (blended "
                    "within --reach of the clicks); the rest on the whole-image output")  # fmt: skip
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--tiny", action="store_true", help="the bundle network was trained with a depth-2 guide ViT at "
                    "guide_size 56 (quick CPU runs and tests)")  # fmt: skip
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s - %(message)s")
    if args.threads:
        torch.set_num_threads(args.threads)
    bundle_dir = Path(args.bundle_dir).resolve()
    overrides = {"guide_backbone_kwargs": {"depth": 2}, "guide_kwargs#guide_size": 56} if args.tiny else {}
    t = time.perf_counter()
    cases, info = prepare_cases(bundle_dir, args.dataset_dir, args.weights, args.max_cases, overrides)
    logger.info(f"{len(cases)} training cases prepared in {time.perf_counter() - t:.0f} s "
                f"({'demo' if info['demo'] else 'real'} data: {info['dataset_dir']}; bundle network's guide ViT "
                f"{info['guide_vit']})")  # fmt: skip
    net, summary = train_refiner(cases, args.minutes, args.max_clicks, args.batch_size, perturb=args.perturb,
                                 seed=args.seed, max_steps=args.max_steps, iterative=args.iterative,
                                 reach=args.reach, focus=args.focus)  # fmt: skip
    out = Path(args.out) if args.out else bundle_dir / "models" / "click_refiner.pt"
    out.parent.mkdir(parents=True, exist_ok=True)
    save_refiner(net, out, **info, **summary)
    logger.info(f"click refiner: {summary['steps']} steps in {summary['seconds']} s, loss {summary['first_loss']:.4f} "
                f"-> {summary['last_loss']:.4f}; saved {out}")  # fmt: skip


if __name__ == "__main__":
    main()
