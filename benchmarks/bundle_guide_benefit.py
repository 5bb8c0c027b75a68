"""What the guide buys: train plain and guided versions of each bundle with the same seed, epochs and data split,
evaluate both on the held-out validation cases, and print one table with guided/plain ratios.

Usage (CPU, real data in ../shared/data; about 30 minutes with the defaults on 2 cores)::

    python benchmarks/bundle_guide_benefit.py --out benchmarks/results/guide_benefit.json

Further guided variants (same recipe, one config change each) with ``--variants``, e.g. the paper's multiplicative gate
and other guide resolutions::

    python benchmarks/bundle_guide_benefit.py --tasks hippocampus \
        --variants plain guided guided+gate_mode=multiply "guided+guide_kwargs#guide_size=112"

The guide ViT is random-init unless --pretrained_weights names a local DINOv2/DINOv3 file: say so when quoting numbers.
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import sys
import time
import warnings
from pathlib import Path

import torch
from monai.bundle import ConfigWorkflow

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data"
BUNDLES = {
    "hippocampus": ("guidino_hippocampus_mri_segmentation", DATA / "msd_hippocampus"),
    "fetalhead": ("guidino_fetalhead_us_segmentation", DATA / "hc18"),
}


def run(bundle_src: Path, work: Path, configs: list[str], wtype: str, _after_init=None, **override) -> ConfigWorkflow:
    """Run a bundle workflow with config overrides; ``_after_init(workflow)`` may attach handlers before the run."""
    wf = ConfigWorkflow(config_file=[str(bundle_src / "configs" / c) for c in configs] if len(configs) > 1
                        else str(bundle_src / "configs" / configs[0]),
                        meta_file=str(bundle_src / "configs" / "metadata.json"), logging_file=False,
                        workflow_type=wtype, bundle_root=str(work), **override)  # fmt: skip
    wf.initialize()
    if _after_init is not None:
        _after_init(wf)
    wf.run()
    wf.finalize()
    return wf


def parse_variant(spec: str) -> tuple[bool, dict]:
    """``plain`` / ``guided`` optionally followed by ``+key=value`` config overrides (values parsed as JSON)."""
    base, *changes = spec.split("+")
    if base not in ("plain", "guided"):
        raise ValueError(f"a variant starts with 'plain' or 'guided', got {spec!r}.")
    overrides = {}
    for change in changes:
        key, _, value = change.partition("=")
        try:
            overrides[key] = json.loads(value)
        except json.JSONDecodeError:
            overrides[key] = value
    return base == "guided", overrides


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tasks", nargs="+", default=["hippocampus", "fetalhead"])
    p.add_argument("--hippocampus_epochs", type=int, default=12)
    p.add_argument("--hippocampus_cases", type=int, default=60)
    p.add_argument("--fetalhead_epochs", type=int, default=15)
    p.add_argument("--fetalhead_cases", type=int, default=150)
    p.add_argument("--pretrained_weights", default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--variants", nargs="+", default=["plain", "guided"], help="plain, guided, guided+key=value ...")
    p.add_argument("--work", default=str(REPO / "benchmarks" / "runs"))
    p.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "guide_benefit.json"))
    args = p.parse_args()
    warnings.filterwarnings("ignore")
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    rows = []
    for task in args.tasks:
        name, data = BUNDLES[task]
        if not data.is_dir():
            print(f"skip {task}: no data at {data}")
            continue
        src = REPO / "bundles" / name
        epochs = getattr(args, f"{task}_epochs")
        cases = getattr(args, f"{task}_cases")
        for variant in args.variants:
            guided, overrides = parse_variant(variant)
            work = Path(args.work) / f"{task}_{''.join(c if c.isalnum() else '_' for c in variant)}"
            shutil.rmtree(work, ignore_errors=True)
            work.mkdir(parents=True)
            common = dict(dataset_dir=str(data), max_cases=cases, seed=args.seed, guide=guided,
                          pretrained_weights=args.pretrained_weights, num_workers=0, progress=False,
                          **overrides)  # fmt: skip
            t0 = time.perf_counter()
            run(src, work, ["train.json"], "train", epochs=epochs, resume=False, **common)
            train_s = time.perf_counter() - t0
            t0 = time.perf_counter()
            run(src, work, ["train.json", "evaluate.json"], "eval", **common)
            eval_s = time.perf_counter() - t0
            summary = json.load(open(work / "eval" / "metrics_summary.json"))
            row = {"task": task, "variant": variant, "overrides": overrides, "epochs": epochs, "cases": cases,
                   "train_s": train_s,
                   "eval_s": eval_s, "num_val_cases": summary["num_cases"], "mean_dice": summary["mean_dice"],
                   "pretrained_guide": bool(args.pretrained_weights)}  # fmt: skip
            for k, v in summary["metrics"].items():
                row[k] = v["mean"]
            rows.append(row)
            print(json.dumps(row), flush=True)
    table = format_table(rows)
    print(table)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    json.dump({"rows": rows, "command": " ".join(sys.argv)}, open(args.out, "w"), indent=2)
    Path(args.out).with_suffix(".md").write_text(table + "\n")
    return 0


def format_table(rows: list[dict]) -> str:
    lines = []
    for task in dict.fromkeys(r["task"] for r in rows):
        task_rows = [r for r in rows if r["task"] == task]
        plain = next((r for r in task_rows if r["variant"] == "plain"), None)
        others = [r for r in task_rows if r is not plain]
        if not (plain and others):
            continue
        keys = [k for k in plain if k.startswith(("dice_", "hd95_mm_", "hc_abs_error_mm"))] + ["mean_dice", "train_s"]
        lines.append(
            f"\n{task}: {plain['cases']} cases ({plain['num_val_cases']} validation), {plain['epochs']} epochs,"
            f" guide {'pretrained' if others[0]['pretrained_guide'] else 'RANDOM-INIT ViT (no DINO weights)'}"
        )
        lines.append("| metric | plain | " + " | ".join(f"{r['variant']} | /plain" for r in others) + " |")
        lines.append("| --- | --- |" + " --- | --- |" * len(others))
        for k in keys:
            a = plain.get(k, float("nan"))
            cells = []
            for r in others:
                b = r.get(k, float("nan"))
                cells.append(f"{b:.4g} | {b / a if a else float('nan'):.3f}")
            lines.append(f"| {k} | {a:.4g} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
