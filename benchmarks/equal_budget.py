"""Each bundle trained at an equal CPU wall-clock budget: guided vs plain vs a guided and a plain DynUNet (nnU-Net
architecture) vs the bundle's previous network (``plain_segresnet`` / ``guided_segresnet``: the hippocampus bundle's
SegResNet up to release 0.3.1), evaluated on the bundle's own validation split.

Time, not epochs: every variant trains until ``--budget_min`` of wall-clock time is spent (first epoch, guide token
cache, per-epoch validation and checkpointing included), and its learning rate follows a cosine over *elapsed time*
(from the bundle's learning rate at 0 to 0 at the budget), so no calibration run is needed and a costlier network
simply gets fewer epochs. The bundle's best-validation checkpoint is then evaluated on the same validation split with
the bundle's ``evaluate.json`` (identical post-processing for every variant). Prints Dice, HD95, HC error
mean/median/max and failures (HC error > 10 mm) per variant and seed, the epochs done and the seconds per epoch.
The JSON also records the machine (:func:`machine_reference`: CPU, threads, torch and the seconds of one fixed
training step of MONAI's DynUNet), measured before the runs: a budget buys fewer epochs on a slower machine, so rows
from two JSON files compare only where their reference steps are close.

Usage (CPU, real data in ../shared/data; about budget x variants x seeds x tasks minutes; run nothing else meanwhile,
a second job on 2 cores slows both)::

    python benchmarks/equal_budget.py --budget_min 20 --seeds 0 1 --json benchmarks/results/equal_budget.json
    python benchmarks/equal_budget.py --tasks hippocampus --variants guided --set gate_mode=residual --tag _residual \
        --json residual.json        # a changed recipe: --set overrides bundle config ids, --tag names its runs
    python benchmarks/equal_budget.py --tasks fetalhead --eval_only --set fit_ellipse=false --tag _raw \
        --json raw.json             # the same checkpoints, evaluated again with another post-processing

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

#: DynUNet (nnU-Net) settings per task, deep supervision: 5 levels in 2D (the 256x176 input allows 4 halvings), 4 in
#: 3D (the ROI 32x48x32 allows 3)
DYNUNET = {
    "fetalhead": {"spatial_dims": 2, "kernel_size": [3] * 5, "strides": [1, 2, 2, 2, 2],
                  "upsample_kernel_size": [2] * 4, "filters": [16, 32, 64, 128, 256]},
    "hippocampus": {"spatial_dims": 3, "kernel_size": [3] * 4, "strides": [1, 2, 2, 2],
                    "upsample_kernel_size": [2] * 3, "filters": [16, 32, 64, 128]},
}  # fmt: skip


def dynunet_def(task: str) -> dict:
    return {"_target_": "guidino_monai.networks.GuidedDynUNet", "in_channels": 1, "out_channels": "@num_classes",
            "deep_supervision": True, "deep_supr_num": 2, "res_block": True, "use_guide": "@guide",
            "guide_backbone": "@guide_backbone", "guide_backbone_kwargs": "@guide_backbone_kwargs",
            "pretrained_weights": "@pretrained_weights", "lora_rank": "@lora_rank", "gate_at": "@gate_at",
            "gate_mode": "@gate_mode", "guide_kwargs": "@guide_kwargs", **DYNUNET[task]}  # fmt: skip


#: the network a bundle shipped before its current one (hippocampus: SegResNet up to release 0.3.1)
PREVIOUS = {
    "hippocampus": {"_target_": "guidino_monai.networks.GuidedSegResNet", "spatial_dims": 3, "in_channels": 1,
                    "out_channels": "@num_classes", "init_filters": 8, "blocks_down": [1, 2, 2, 4],
                    "blocks_up": [1, 1, 1], "use_guide": "@guide", "guide_backbone": "@guide_backbone",
                    "guide_backbone_kwargs": "@guide_backbone_kwargs", "pretrained_weights": "@pretrained_weights",
                    "lora_rank": "@lora_rank", "gate_at": "@gate_at", "gate_mode": "@gate_mode",
                    "guide_kwargs": "@guide_kwargs"},
}  # fmt: skip

VARIANTS = {  # name -> (guide, network: None = the bundle's own, "dynunet", "segresnet" = PREVIOUS[task])
    "plain": (False, None),
    "guided": (True, None),
    "plain_dynunet": (False, "dynunet"),
    "guided_dynunet": (True, "dynunet"),
    "plain_segresnet": (False, "segresnet"),
    "guided_segresnet": (True, "segresnet"),
}
DEFAULT_VARIANTS = ["plain", "guided", "plain_dynunet", "guided_dynunet"]


def machine_reference(steps: int = 5, warmup: int = 2, shape: tuple[int, ...] = (4, 1, 32, 48, 32),
                      clock=time.perf_counter) -> dict:  # fmt: skip
    """The machine the rows were measured on, with a fixed-work timing that tells machines apart.

    ``reference_step_s``: seconds per AdamW training step of MONAI's own ``DynUNet`` with the hippocampus bundle's
    geometry (:data:`DYNUNET`, 3 classes, one batch of the bundle's 4 crops of 32x48x32), median of ``steps`` after
    ``warmup`` (``clock``: seconds). Epoch counts and times from two runs compare only where their reference steps
    are close.
    """
    import platform

    from monai.networks.nets import DynUNet

    torch.manual_seed(0)
    net = DynUNet(in_channels=shape[1], out_channels=3, res_block=True, **DYNUNET["hippocampus"])
    opt = torch.optim.AdamW(net.parameters(), lr=1e-3)
    x, y = torch.randn(shape), torch.randint(0, 3, (shape[0],) + tuple(shape[2:]))
    times = []
    for i in range(warmup + steps):
        t = clock()
        opt.zero_grad()
        torch.nn.functional.cross_entropy(net(x), y).backward()
        opt.step()
        dt = clock() - t
        if i >= warmup:
            times.append(dt)
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            names = [ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")]
        cpu = names[0] if names else cpu
    except OSError:
        pass
    return {"cpu": cpu, "threads": torch.get_num_threads(), "torch": torch.__version__,
            "reference_step_s": round(statistics.median(times), 3)}  # fmt: skip


def train_and_eval(task: str, variant: str, seed: int, budget_s: float, args) -> dict:
    name, data = BUNDLES[task]
    src = REPO / "bundles" / name
    guided, network = VARIANTS[variant]
    common = dict(dataset_dir=str(data), max_cases=args.max_cases, seed=seed, guide=guided, num_workers=0,
                  progress=False, pretrained_weights=args.pretrained_weights)  # fmt: skip
    if network == "segresnet":
        if task not in PREVIOUS:
            raise SystemExit(f"{variant}: the {task} bundle has no previous SegResNet network")
        common["network_def"] = PREVIOUS[task]
    if network == "dynunet":
        common["network_def"] = dynunet_def(task)
        if task == "fetalhead":
            common["gate_at"] = "bottleneck"
    common.update(args.overrides)
    if args.eval_only:  # the checkpoint of an earlier run (no --tag in its folder name), evaluated into eval<tag>/
        work = Path(args.work) / f"{task}_{variant}_s{seed}"
        if not (work / "models" / "model.pt").is_file():
            raise SystemExit(f"--eval_only: no checkpoint at {work / 'models' / 'model.pt'}; train it first")
        eval_dir = work / f"eval{args.tag}"
        run(src, work, ["train.json", "evaluate.json"], "eval", eval_dir=str(eval_dir), **common)
        row = {"task": task, "variant": variant + args.tag, "seed": seed, "eval_only": str(work)}
    else:
        work = Path(args.work) / f"{task}_{variant}{args.tag}_s{seed}"
        shutil.rmtree(work, ignore_errors=True)
        work.mkdir(parents=True)
        budget = TimeBudget(budget_s)
        constant_lr = {"_target_": "torch.optim.lr_scheduler.LambdaLR", "optimizer": "@optimizer",
                       "lr_lambda": "$lambda e: 1.0"}  # the learning rate is set by TimeBudget
        run(src, work, ["train.json"], "train", epochs=100_000, resume=False, lr_scheduler=constant_lr,
            _after_init=budget.attach, **common)  # fmt: skip
        train_s, epochs = budget.elapsed, len(budget.epoch_ends)
        first_s = budget.epoch_ends[0] if epochs else float("nan")
        epoch_s = (budget.epoch_ends[-1] - first_s) / (epochs - 1) if epochs > 1 else float("nan")
        eval_dir = work / "eval"
        run(src, work, ["train.json", "evaluate.json"], "eval", **common)
        row = {"task": task, "variant": variant + args.tag, "seed": seed, "epochs": epochs,
               "first_epoch_s": round(first_s, 1), "epoch_s": round(epoch_s, 1), "train_s": round(train_s, 1),
               "budget_s": budget_s, "iterations": budget.iterations,
               "pretrained_guide": bool(args.pretrained_weights)}  # fmt: skip
    summary = json.load(open(eval_dir / "metrics_summary.json"))
    row["mean_dice"] = summary["mean_dice"]
    if args.overrides:
        row["overrides"] = args.overrides
    for k, v in summary["metrics"].items():
        row[k] = v["mean"]
    hc = [float(r["hc_abs_error_mm"]) for r in csv.DictReader(open(eval_dir / "metrics_per_case.csv"))
          if r.get("hc_abs_error_mm") not in (None, "", "nan")]  # fmt: skip
    if hc:
        row.update(hc_abs_error_median_mm=statistics.median(hc), hc_abs_error_max_mm=max(hc),
                   hc_failures=sum(e > 10.0 for e in hc))  # fmt: skip
    return row


class TimeBudget:
    """Cosine learning rate over elapsed wall-clock time; stops the trainer when the budget is spent.

    Before every iteration each parameter group's learning rate is set to ``initial_lr * (1 + cos(pi * t / budget))
    / 2``; after every iteration the trainer terminates once ``t >= budget`` (the epoch's validation then still runs
    at epoch ends only, so on termination the validator runs once more: the bundle's checkpoint saver then keeps the
    final model if it is the best; that last validation is outside the budget, the same for every variant).
    """

    def __init__(self, budget_s: float) -> None:
        self.budget_s = budget_s
        self.epoch_ends: list[float] = []
        self.iterations = 0
        self.elapsed = 0.0

    def attach(self, workflow) -> None:
        from ignite.engine import Events

        trainer, optimizer = workflow.trainer, workflow.parser.get_parsed_content("optimizer")
        base = [g["lr"] for g in optimizer.param_groups]
        start = time.perf_counter()

        def set_lr(engine) -> None:
            frac = min(1.0, (time.perf_counter() - start) / self.budget_s)
            for g, lr in zip(optimizer.param_groups, base):
                g["lr"] = lr * 0.5 * (1.0 + math.cos(math.pi * frac))

        def check(engine) -> None:
            self.iterations += 1
            self.elapsed = time.perf_counter() - start
            if self.elapsed >= self.budget_s:
                engine.terminate()

        def epoch_end(engine) -> None:
            self.elapsed = time.perf_counter() - start
            self.epoch_ends.append(self.elapsed)

        trainer.add_event_handler(Events.ITERATION_STARTED, set_lr)
        trainer.add_event_handler(Events.ITERATION_COMPLETED, check)
        def final_validation(engine) -> None:
            workflow.parser.get_parsed_content("validate#evaluator").run(engine.state.epoch)

        trainer.add_event_handler(Events.EPOCH_COMPLETED, epoch_end)
        trainer.add_event_handler(Events.TERMINATE, final_validation)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tasks", nargs="+", default=["fetalhead", "hippocampus"], choices=list(BUNDLES))
    p.add_argument("--variants", nargs="+", default=DEFAULT_VARIANTS, choices=list(VARIANTS))
    p.add_argument("--budget_min", type=float, default=20.0)
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1])
    p.add_argument("--max_cases", type=int, default=None, help="cases per task (default: all)")
    p.add_argument("--pretrained_weights", default=None)
    p.add_argument("--work", default=str(REPO / "benchmarks" / "runs" / "equal_budget"))
    p.add_argument("--json", default=str(REPO / "benchmarks" / "results" / "equal_budget.json"))
    p.add_argument("--set", nargs="+", default=[], metavar="KEY=JSON",
                   help="bundle config overrides for every variant, e.g. gate_mode=residual "
                        "guide_kwargs#guide_size=112 (values are JSON, else strings)")
    p.add_argument("--tag", default="", help="suffix of the run folders (keeps runs with --set apart)")
    p.add_argument("--eval_only", action="store_true",
                   help="no training: evaluate the checkpoints an earlier run left in --work (same tasks, variants, "
                        "seeds) with the current evaluate.json and --set, into eval<tag>/ beside them")
    args = p.parse_args()
    args.overrides = parse_overrides(args.set)
    warnings.filterwarnings("ignore")
    torch.set_num_threads(max(1, torch.get_num_threads()))
    machine = machine_reference()
    print(f"machine: {json.dumps(machine)}", flush=True)
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
    out = {"rows": rows, "command": " ".join(sys.argv), "machine": machine}
    Path(args.json).write_text(json.dumps(out, indent=2) + "\n")
    return 0


def parse_overrides(items: list[str]) -> dict:
    """``KEY=JSON`` pairs -> dict; a value that is not JSON is taken as a string."""
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise SystemExit(f"--set expects KEY=JSON, got {item!r}")
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = value
    return out


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
