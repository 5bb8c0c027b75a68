"""Guide overhead: plain vs guided networks side by side in one process (train step and sliding-window inference).

Usage::

    python benchmarks/guide_overhead.py --device cpu --json benchmarks/results/guide_overhead_cpu.json
    python benchmarks/guide_overhead.py --device cuda --json benchmarks/results/guide_overhead_cuda.json

On CUDA the sizes are the issue's (train step: batch 2 x 96^3; sliding window: 256x512x512, ROI 96^3, overlap 0.25;
bf16 autocast; CUDA events). On CPU they are reduced (``--size small``) so that the run takes a few minutes on 2 cores.
Each case runs warm-up iterations, then the median of ``--repeats`` timed ones. Peak memory: CUDA max allocated on
GPU; on CPU the peak rise of the process RSS over the case (sampled every 2 ms), an approximation.

Guide ViTs are random-init (speed does not depend on the weights).
"""

from __future__ import annotations

import argparse
import json
import statistics
import threading
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import torch

from guidino_monai.inferers import GuidedSlidingWindowInferer
from guidino_monai.networks import GuidedSegResNet, GuidedUNet

SIZES = {
    # train batch/patch 3D and 2D; sliding-window volume/ROI 3D and image/ROI 2D
    "full": dict(b3=2, p3=96, b2=8, p2=256, vol3=(256, 512, 512), roi3=96, img2=(1024, 1024), roi2=256),
    "small": dict(b3=1, p3=64, b2=4, p2=128, vol3=(64, 128, 128), roi3=64, img2=(384, 384), roi2=128),
}


class PeakRSS:
    """Peak rise of this process's resident memory while the block runs (CPU; sampled)."""

    def __enter__(self):
        import psutil

        self.proc = psutil.Process()
        self.base = self.peak = self.proc.memory_info().rss
        self.stop = False
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()
        return self

    def _run(self):
        while not self.stop:
            self.peak = max(self.peak, self.proc.memory_info().rss)
            time.sleep(0.002)

    def __exit__(self, *exc):
        self.stop = True
        self.thread.join()
        self.mb = (self.peak - self.base) / 2**20


def timed(fn: Callable[[], None], device: torch.device, warmup: int, repeats: int) -> tuple[float, float]:
    """Median milliseconds of ``fn`` and peak memory (MB) over the timed repeats."""
    for _ in range(warmup):
        fn()
    times = []
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        for _ in range(repeats):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
        peak = (torch.cuda.max_memory_allocated() - base) / 2**20
    else:
        with PeakRSS() as mem:
            for _ in range(repeats):
                t0 = time.perf_counter()
                fn()
                times.append((time.perf_counter() - t0) * 1000)
        peak = mem.mb
    return statistics.median(times), peak


def make_net(kind: str, dims: int, guided: bool, backbone: str, **guide_overrides):
    common = dict(use_guide=guided, guide_backbone=backbone, gate_at=guide_overrides.pop("gate_at", "bottleneck"),
                  guide_kwargs={"guide_size": 112 if dims == 3 else 224, **guide_overrides})  # fmt: skip
    if kind == "segresnet":
        return GuidedSegResNet(dims, init_filters=16, in_channels=1, out_channels=3, **common)
    return GuidedUNet(dims, 1, 3, channels=(16, 32, 64, 128, 256), strides=(2, 2, 2, 2), num_res_units=2, **common)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--size", choices=list(SIZES), default=None, help="default: full on cuda, small on cpu")
    p.add_argument("--backbones", nargs="+", default=["vit_small_patch14_dinov2"])
    p.add_argument("--nets", nargs="+", default=["segresnet3d", "unet3d", "unet2d", "segresnet2d"])
    p.add_argument("--cases", nargs="+", default=["train", "sliding_window"])
    p.add_argument("--naive", action="store_true", help="also time the naive guide (ViT per step / window and input"
                   " gating at full resolution)")  # fmt: skip
    p.add_argument("--warmup", type=int, default=None)
    p.add_argument("--repeats", type=int, default=None)
    p.add_argument("--json", default=None, help="write the rows here as a JSON list")
    args = p.parse_args()
    warnings.filterwarnings("ignore")
    device = torch.device(args.device)
    size = SIZES[args.size or ("full" if device.type == "cuda" else "small")]
    warmup = args.warmup if args.warmup is not None else (3 if device.type == "cuda" else 1)
    repeats = args.repeats if args.repeats is not None else (10 if device.type == "cuda" else 3)
    amp = dict(device_type="cuda", dtype=torch.bfloat16) if device.type == "cuda" else None
    rows = []
    for backbone in args.backbones:
        for net_name in args.nets:
            kind, dims = net_name[:-2], int(net_name[-2])
            for case in args.cases:
                # guided: the default path (train: ViT tokens cached once per volume; inference: guide once per
                # volume). guided_per_step / guided_per_window: the ViT runs inside every step / window.
                # guided_naive: per step / window and the guide gates the input at full resolution.
                slow = "guided_per_step" if case == "train" else "guided_per_window"
                variants = {"plain": dict(guided=False), "guided": dict(guided=True), slow: dict(guided=True)}
                if args.naive:
                    variants["guided_naive"] = dict(guided=True, gate_at="input")
                results = {}
                for vname, vkw in variants.items():
                    torch.manual_seed(0)
                    vkw = dict(vkw)
                    net = make_net(kind, dims, vkw.pop("guided"), backbone, **vkw).to(device)
                    fn = build_case(case, net, dims, size, device, amp, fast=vname in ("plain", "guided"))
                    results[vname] = timed(fn, device, warmup, repeats)
                    del net, fn
                    if device.type == "cuda":
                        torch.cuda.empty_cache()
                plain_ms, plain_mb = results["plain"]
                for vname in [v for v in results if v != "plain"]:
                    ms, mb = results[vname]
                    row = {"case": f"{net_name}_{case}", "backbone": backbone, "variant": vname,
                           "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
                           "threads": torch.get_num_threads(), "plain_ms": round(plain_ms, 2),
                           "guided_ms": round(ms, 2), "ratio": round(ms / plain_ms, 3),
                           "plain_peak_mb": round(plain_mb, 1), "guided_peak_mb": round(mb, 1),
                           "mem_ratio": round(mb / plain_mb, 3) if plain_mb > 0 else None}  # fmt: skip
                    rows.append(row)
                    print(
                        f"| {row['case']} | {backbone} | {vname} | {plain_ms:.1f} | {ms:.1f} | {row['ratio']:.2f} |"
                        f" {plain_mb:.0f} | {mb:.0f} | {row['mem_ratio']} |",
                        flush=True,
                    )
    print_table(rows)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        json.dump(rows, open(args.json, "w"), indent=2)
    return 0


def build_case(case: str, net, dims: int, size: dict, device: torch.device, amp, fast: bool) -> Callable[[], None]:
    if case == "train":
        b, s = (size["b3"], size["p3"]) if dims == 3 else (size["b2"], size["p2"])
        x = torch.rand(b, 1, *([s] * dims), device=device)
        y = torch.randint(0, 3, (b, 1, *([s] * dims)), device=device)
        from guidino_monai.losses import GuidedDiceCELoss
        from guidino_monai.networks import coords_to_grid

        loss_fn = GuidedDiceCELoss(to_onehot_y=True, softmax=True, lambda_guide=0.5)
        opt = torch.optim.AdamW([q for q in net.parameters() if q.requires_grad], lr=1e-4)
        net.train()
        kwargs = {}
        if fast and net.use_guide:  # tokens of each sample's whole volume (here: the patch itself), cached once
            with torch.no_grad():
                tokens = [net.guide.encode(x[i : i + 1]).to(torch.float16) for i in range(b)]
            axes = [torch.arange(s, dtype=torch.float32, device=device)] * dims
            coords = torch.stack(torch.meshgrid(*axes, indexing="ij"))[None].expand(b, -1, *([-1] * dims))
            kwargs = {"tokens": tokens, "grid": coords_to_grid(coords, [s] * dims)}

        def step():
            opt.zero_grad(set_to_none=True)
            with torch.autocast(**amp) if amp else torch.autocast("cpu", enabled=False):
                loss = loss_fn(net(x, **kwargs), y)
            loss.backward()
            opt.step()

        return step
    vol = size["vol3"] if dims == 3 else size["img2"]
    roi = [size["roi3"]] * 3 if dims == 3 else [size["roi2"]] * 2
    image = torch.rand(1, 1, *vol, device=device)
    inferer = GuidedSlidingWindowInferer(roi, sw_batch_size=2, overlap=0.25, mode="gaussian", guide_once=fast)
    net.eval()

    def infer():
        with torch.inference_mode(), torch.autocast(**amp) if amp else torch.autocast("cpu", enabled=False):
            inferer(image, net)

    return infer


def print_table(rows: list[dict]) -> None:
    print("\n| case | backbone | variant | plain ms | guided ms | ratio | plain peak MB | guided peak MB | mem ratio |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        print(
            f"| {r['case']} | {r['backbone']} | {r['variant']} | {r['plain_ms']:.1f} | {r['guided_ms']:.1f} |"
            f" {r['ratio']:.2f} | {r['plain_peak_mb']:.0f} | {r['guided_peak_mb']:.0f} | {r['mem_ratio']} |"
        )


if __name__ == "__main__":
    raise SystemExit(main())
