"""CPU speed of the bundles' networks with channels-last weights (``guidino_monai.networks.channels_last``) vs the
default layout, measured side by side in one process; prints the ratio.

Usage::

    python benchmarks/channels_last_speed.py --json benchmarks/results/channels_last_speed_cpu.json

For each bundle the network (plain and guided, random-init: speed does not depend on the weights), ROI, training batch
(``batch_size x num_samples``) and sliding-window batch come from its ``train.json`` / ``inference.json``. Times a
training step (forward, loss = mean output, backward, AdamW step) on a random batch of ROIs and a no-grad forward of
``sw_batch_size`` ROIs; the two layouts alternate ``--repeats`` times and the median is kept.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
import warnings
from pathlib import Path

import torch
from monai.bundle import ConfigParser

from guidino_monai.bundle import read_bundle_config
from guidino_monai.networks import channels_last

REPO = Path(__file__).resolve().parents[1]
BUNDLES = ["guidino_hippocampus_mri_segmentation", "guidino_fetalhead_us_segmentation"]


def parsed(bundle: str, config: str, guide: bool) -> ConfigParser:
    overrides = {"device": "$torch.device('cpu')", "guide": guide, "dataset_dir": None}
    return read_bundle_config(REPO / "bundles" / bundle, config, overrides)


def step_times(net: torch.nn.Module, train_x: torch.Tensor, infer_x: torch.Tensor, steps: int) -> tuple[float, float]:
    opt = torch.optim.AdamW([q for q in net.parameters() if q.requires_grad], 1e-4)
    net.train()
    times = []
    for i in range(steps + 1):
        t = time.perf_counter()
        opt.zero_grad()
        out = net(train_x)
        (out[0] if isinstance(out, tuple) else out).float().mean().backward()
        opt.step()
        if i:  # the first step warms oneDNN up
            times.append(time.perf_counter() - t)
    net.eval()
    inf = []
    with torch.no_grad():
        for i in range(steps + 1):
            t = time.perf_counter()
            net(infer_x)
            if i:
                inf.append(time.perf_counter() - t)
    return statistics.median(times), statistics.median(inf)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    warnings.filterwarnings("ignore")
    rows = []
    for bundle in BUNDLES:
        for guide in (False, True):
            train = parsed(bundle, "train.json", guide)
            infer = parsed(bundle, "inference.json", guide)
            roi = [int(s) for s in train["roi_size"]]
            batch = int(train["batch_size"]) * int(train["num_samples"])
            sw = int(infer.get_parsed_content("sw_batch_size")) if "sw_batch_size" in infer else 1
            torch.manual_seed(0)
            train_x, infer_x = torch.rand(batch, 1, *roi), torch.rand(sw, 1, *roi)
            res = {"default": [], "channels_last": []}
            for _ in range(args.repeats):
                for layout in res:
                    torch.manual_seed(0)
                    net = train.get_parsed_content("network_def", instantiate=True, lazy=False)
                    channels_last(net, enabled=layout == "channels_last")
                    res[layout].append(step_times(net, train_x, infer_x, args.steps))
            row = {"bundle": bundle, "guide": guide, "roi": roi, "train_batch": batch, "sw_batch": sw}
            for layout, vals in res.items():
                row[f"train_step_s_{layout}"] = round(statistics.median(v[0] for v in vals), 4)
                row[f"infer_s_{layout}"] = round(statistics.median(v[1] for v in vals), 4)
            row["train_speedup"] = round(row["train_step_s_default"] / row["train_step_s_channels_last"], 2)
            row["infer_speedup"] = round(row["infer_s_default"] / row["infer_s_channels_last"], 2)
            rows.append(row)
            print(json.dumps(row), flush=True)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    print("| bundle | guide | train step default / channels-last (s) | speed-up | inference (s) | speed-up |")
    print("| --- | --- | --- | --- | --- | --- |")
    for r in rows:
        train = f"{r['train_step_s_default']} / {r['train_step_s_channels_last']} | {r['train_speedup']}x"
        infer = f"{r['infer_s_default']} / {r['infer_s_channels_last']} | {r['infer_speedup']}x"
        print(f"| {r['bundle']} | {r['guide']} | {train} | {infer} |")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps({"rows": rows, "torch": torch.__version__,
                                               "threads": torch.get_num_threads()}, indent=2) + "\n")  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
