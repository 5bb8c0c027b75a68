"""Each bundle trained at an equal CPU wall-clock budget: guided vs plain vs the bundle's previous network vs a guided
and a plain DynUNet (nnU-Net architecture), evaluated on the bundle's own validation split.

Time, not epochs: every variant first times two epochs (a calibration run, not counted; the first epoch also fills the
guide token cache), then trains for as many epochs as fit in ``--budget_min`` (the cosine schedule spans them), with a
hard stop at the budget. A costlier network so
gets fewer epochs. Prints Dice, HD95, HC error mean/median/max and failures (HC error > 10 mm) per variant and seed,
and the seconds per epoch.

Usage (CPU, real data in ../shared/data; about budget x variants x seeds x tasks minutes; run nothing else meanwhile,
a second job on 2 cores slows both)::

    python benchmarks/equal_budget.py --budget_min 20 --seeds 0 1 --json benchmarks/results/equal_budget.json

The guide ViT is random-init unless --pretrained_weights names a local DINO file: say so when quoting numbers.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import shutil
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch
from bundle_guide_benefit import BUNDLES, REPO, run

#: DynUNet (nnU-Net) settings per task: 5 levels in 2D, 4 in 3D (the ROI 32x48x32 allows 3 halvings), deep supervision
DYNUNET = {
    "fetalhead": {"spatial_dims": 2, "kernel_size": [3] * 6, "strides": [1, 2, 2, 2, 2, 2],
                  "upsample_kernel_size": [2] * 5, "filters": [16, 32, 64, 128, 256, 256]},
    "hippocampus": {"spatial_dims": 3, "kernel_size": [3] * 4, "strides": [1, 2, 2, 2],
                    "upsample_kernel_size": [2] * 3, "filters": [16, 32, 64, 128]},
}  # fmt: skip


def dynunet_def(task: str) -> dict:
    return {"_target_": "guidino_monai.networks.GuidedDynUNet", "in_channels": 1, "out_channels": "@num_classes",
            "deep_supervision": True, "deep_supr_num": 2, "res_block": True, "use_guide": "@guide",
            "guide_backbone": "@guide_backbone", "guide_backbone_kwargs": "@guide_backbone_kwargs",
            "pretrained_weights": "@pretrained_weights", "lora_rank": "@lora_rank", "gate_at": "@gate_at",
            "gate_mode": "@gate_mode", "guide_kwargs": "@guide_kwargs", **DYNUNET[task]}  # fmt: skip


VARIANTS = {  # name -> (guide, use DynUNet)
    "plain": (False, False),
    "guided": (True, False),
    "plain_dynunet": (False, True),
    "guided_dynunet": (True, True),
}


def train_and_eval(task: str, variant: str, seed: int, budget_s: float, args) -> dict:
    name, data = BUNDLES[task]
    src = REPO / "bundles" / name
    guided, dyn = VARIANTS[variant]
    common = dict(dataset_dir=str(data), max_cases=args.max_cases, seed=seed, guide=guided, num_workers=0,
                  progress=False, pretrained_weights=args.pretrained_weights)  # fmt: skip
    if dyn:
        common["network_def"] = dynunet_def(task)
        if task == "fetalhead":
            common["gate_at"] = "bottleneck"
    work = Path(args.work) / f"{task}_{variant}_s{seed}"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    stamps = EpochTimes()
    run(src, work / "calib", ["train.json"], "train", epochs=2, resume=False, val_interval=1000,
        _after_init=stamps.attach, **common)  # fmt: skip
    first_s, epoch_s = stamps.times[0], stamps.times[1] - stamps.times[0]  # the first epoch also fills the token cache
    epochs = max(1, 1 + int((budget_s - first_s) // epoch_s))
    t0 = time.perf_counter()
    wf = ConfigBudget(budget_s)
    run(src, work, ["train.json"], "train", epochs=epochs, resume=False, _after_init=wf.attach, **common)
    train_s = time.perf_counter() - t0
    run(src, work, ["train.json", "evaluate.json"], "eval", **common)
    summary = json.load(open(work / "eval" / "metrics_summary.json"))
    row = {"task": task, "variant": variant, "seed": seed, "epochs": epochs, "first_epoch_s": round(first_s, 1),
           "epoch_s": round(epoch_s, 1),
           "train_s": round(train_s, 1), "stopped_at_budget": wf.stopped, "mean_dice": summary["mean_dice"],
           "pretrained_guide": bool(args.pretrained_weights)}  # fmt: skip
    for k, v in summary["metrics"].items():
        row[k] = v["mean"]
    hc = [float(r["hc_abs_error_mm"]) for r in csv.DictReader(open(work / "eval" / "metrics_per_case.csv"))
          if r.get("hc_abs_error_mm") not in (None, "", "nan")]  # fmt: skip
    if hc:
        row.update(hc_abs_error_median_mm=statistics.median(hc), hc_abs_error_max_mm=max(hc),
                   hc_failures=sum(e > 10.0 for e in hc))  # fmt: skip
    return row


class EpochTimes:
    """Seconds from the start of training to the end of each epoch."""

    def __init__(self) -> None:
        self.times: list[float] = []

    def attach(self, workflow) -> None:
        from ignite.engine import Events

        start = time.perf_counter()
        def stamp(engine) -> None:
            self.times.append(time.perf_counter() - start)

        workflow.trainer.add_event_handler(Events.EPOCH_COMPLETED, stamp)


class ConfigBudget:
    """Stops the trainer once the wall-clock budget is spent (checked after every iteration)."""

    def __init__(self, budget_s: float) -> None:
        self.budget_s = budget_s
        self.stopped = False

    def attach(self, workflow) -> None:
        from ignite.engine import Events

        trainer = workflow.trainer
        start = time.perf_counter()

        def check(engine) -> None:
            if time.perf_counter() - start > self.budget_s:
                self.stopped = True
                engine.terminate()

        trainer.add_event_handler(Events.ITERATION_COMPLETED, check)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tasks", nargs="+", default=["fetalhead", "hippocampus"], choices=list(BUNDLES))
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    p.add_argument("--budget_min", type=float, default=20.0)
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1])
    p.add_argument("--max_cases", type=int, default=None, help="cases per task (default: all)")
    p.add_argument("--pretrained_weights", default=None)
    p.add_argument("--work", default=str(REPO / "benchmarks" / "runs" / "equal_budget"))
    p.add_argument("--json", default=str(REPO / "benchmarks" / "results" / "equal_budget.json"))
    args = p.parse_args()
    warnings.filterwarnings("ignore")
    torch.set_num_threads(max(1, torch.get_num_threads()))
    rows = []
    for task in args.tasks:
        if not BUNDLES[task][1].is_dir():
            print(f"skip {task}: no data at {BUNDLES[task][1]}")
            continue
        for seed in args.seeds:
            for variant in args.variants:
                row = train_and_eval(task, variant, seed, args.budget_min * 60.0, args)
                rows.append(row)
                print(json.dumps(row), flush=True)
    print(format_table(rows))
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps({"rows": rows, "command": " ".join(sys.argv)}, indent=2) + "\n")
    return 0


def format_table(rows: list[dict]) -> str:
    keys = ["mean_dice", "hd95_mm_fetal_head", "hc_abs_error_mm", "hc_abs_error_median_mm", "hc_abs_error_max_mm",
            "hc_failures", "dice_anterior", "dice_posterior", "epochs", "epoch_s"]  # fmt: skip
    lines = []
    for task in dict.fromkeys(r["task"] for r in rows):
        rs = [r for r in rows if r["task"] == task]
        present = [k for k in keys if any(k in r for r in rs)]
        lines.append(f"\n{task}: mean over seeds {sorted({r['seed'] for r in rs})} (spread = max - min)")
        lines.append("| variant | " + " | ".join(present) + " |")
        lines.append("| --- |" + " --- |" * len(present))
        for variant in dict.fromkeys(r["variant"] for r in rs):
            vs = [r for r in rs if r["variant"] == variant]
            cells = []
            for k in present:
                vals = [float(r[k]) for r in vs if k in r and not math.isnan(float(r[k]))]
                cells.append(f"{statistics.mean(vals):.4g} ({max(vals) - min(vals):.2g})" if vals else "-")
            lines.append(f"| {variant} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
