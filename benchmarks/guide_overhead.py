"""Guide overhead: plain vs guided networks side by side in one process (train step and sliding-window inference).

Usage::

    python benchmarks/guide_overhead.py --device cpu --json benchmarks/results/guide_overhead_cpu.json
    python benchmarks/guide_overhead.py --device cuda --json benchmarks/results/guide_overhead_cuda.json

Sizes (``--size``):

- ``full`` (default on CUDA), the issue's: train step batch 2 x 96^3 (3D) / 8 x 256^2 (2D); sliding window over
  256x512x512 with ROI 96^3 (3D) / 1024x1024 with ROI 256^2 (2D), overlap 0.25.
- ``small`` (default on CPU): the same geometry with less of it, so that the guide's share is the same as at ``full``.
  Per sample, a train step costs the same as at ``full`` (batch 1 / 2 instead of 2 / 8), and the 3D volume keeps the
  256x512 slices and the 96^3 ROI but has 96 slices instead of 512 (the ViT's cost and the backbone's both scale
  with the number of slices; what sets their ratio is the slice's area against the fixed 112^2 DINO input).
- ``tiny``: seconds, for the test suite (with ``--vit_depth 1``); its ratios mean nothing.

Variants: ``plain`` (the MONAI network, ``use_guide=False``), ``guided`` (the default path: ViT tokens cached once per
volume in training, guide once per volume at inference), ``guided_vit_bf16`` (the same with ``vit_dtype="bfloat16"``:
the frozen ViT in bf16 while the backbone stays fp32; CPU only, as on CUDA everything already runs under bf16
autocast), ``guided_per_step`` / ``guided_per_window`` (the ViT inside every step / window: the path without the
caching levers) and, with ``--naive``, ``guided_naive`` (per step / window, gating the input at full resolution).

Each case builds all its variants, runs their warm-up iterations, then times them interleaved (plain, guided, ...,
plain, guided, ...) and reports the median of ``--repeats`` per variant (CUDA events on GPU). Peak memory is
the peak of tensor memory allocated during one run above what was allocated before it: ``torch.cuda``'s counter on
GPU, the profiler's allocation events on CPU (``profile_memory=True``; one extra, untimed run).

Guide ViTs are random-init (speed does not depend on the weights).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
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
    "small": dict(b3=1, p3=96, b2=2, p2=256, vol3=(256, 512, 96), roi3=96, img2=(1024, 1024), roi2=256),
    "tiny": dict(b3=1, p3=32, b2=1, p2=64, vol3=(48, 48, 16), roi3=32, img2=(96, 96), roi2=64),
}


def cpu_peak_mb(fn: Callable[[], None]) -> float:
    """Peak of CPU tensor memory allocated while ``fn`` runs, above what was allocated before (profiler events)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = sorted(
        (e.start_ns(), e.nbytes())
        for e in prof.profiler.kineto_results.events()
        if e.name() == "[memory]" and e.device_type().name == "CPU"
    )
    current = peak = 0
    for _, nbytes in events:
        current += nbytes
        peak = max(peak, current)
    return peak / 2**20


def time_once(fn: Callable[[], None], device: torch.device) -> float:
    """Milliseconds of one call (CUDA events on GPU)."""
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        return start.elapsed_time(end)
    t0 = time.perf_counter()
    fn()
    return (time.perf_counter() - t0) * 1000


def peak_mb(fn: Callable[[], None], device: torch.device) -> float:
    """Peak tensor memory (MB) allocated during one call, above what was allocated before it."""
    if device.type != "cuda":
        return cpu_peak_mb(fn)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**20


def timed(
    fns: dict[str, Callable[[], None]], device: torch.device, warmup: int, repeats: int, memory: bool = True
) -> dict[str, tuple[float, float | None]]:
    """Per variant: median milliseconds over ``repeats`` timed calls after ``warmup`` ones, and the peak memory (MB;
    ``None`` when ``memory`` is off). The variants are timed interleaved (plain, guided, ..., plain, guided, ...) so
    that a slow drift of the machine's speed affects them alike."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            times[name].append(time_once(fn, device))
    return {name: (statistics.median(times[name]), peak_mb(fn, device) if memory else None) for name, fn in fns.items()}


def make_net(kind: str, dims: int, guided: bool, backbone: str, vit_depth: int | None = None, **guide_overrides):
    common = dict(use_guide=guided, guide_backbone=backbone, gate_at=guide_overrides.pop("gate_at", "bottleneck"),
                  guide_backbone_kwargs={"depth": vit_depth} if vit_depth else None,
                  guide_kwargs={"guide_size": 112 if dims == 3 else 224, **guide_overrides})  # fmt: skip
    if kind == "segresnet":
        return GuidedSegResNet(dims, init_filters=16, in_channels=1, out_channels=3, **common)
    return GuidedUNet(dims, 1, 3, channels=(16, 32, 64, 128, 256), strides=(2, 2, 2, 2), num_res_units=2, **common)


def variants_for(case: str, device: torch.device, args: argparse.Namespace) -> dict[str, dict]:
    """Variant name -> network options (``fast``: the default caching path; ``False``: ViT per step / window)."""
    out = {"plain": dict(guided=False, fast=True), "guided": dict(guided=True, fast=True)}
    if device.type == "cpu" and not args.amp and case == "sliding_window":  # in training the ViT is out of the step
        out["guided_vit_bf16"] = dict(guided=True, fast=True, vit_dtype="bfloat16")
    reference = args.reference
    if reference is None:  # the ViT in every window of a 3D volume takes minutes on a CPU: only when asked there
        reference = device.type == "cuda" or case == "train" or args.size == "tiny"
    if reference:
        out["guided_per_step" if case == "train" else "guided_per_window"] = dict(guided=True, fast=False)
    if args.naive:
        out["guided_naive"] = dict(guided=True, fast=False, gate_at="input")
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--size", choices=list(SIZES), default=None, help="default: full on cuda, small on cpu")
    p.add_argument("--backbones", nargs="+", default=["vit_small_patch14_dinov2"])
    p.add_argument("--nets", nargs="+", default=["segresnet3d", "unet3d", "unet2d", "segresnet2d"])
    p.add_argument("--cases", nargs="+", default=["train", "sliding_window"])
    p.add_argument("--naive", action="store_true", help="also time the naive guide (ViT per step / window and input"
                   " gating at full resolution)")  # fmt: skip
    p.add_argument(
        "--reference",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="time guided_per_step / guided_per_window (default: yes, except sliding window on cpu)",
    )
    p.add_argument("--memory", action=argparse.BooleanOptionalAction, default=True,
                   help="measure peak memory (on cpu one extra profiled run per variant)")  # fmt: skip
    p.add_argument("--amp", action=argparse.BooleanOptionalAction, default=None,
                   help="bf16 autocast for plain and guided alike (default: on for cuda, off for cpu)")  # fmt: skip
    p.add_argument("--vit_depth", type=int, default=None, help="fewer ViT blocks (smoke tests only)")
    p.add_argument("--warmup", type=int, default=None, help="default: 3 on cuda; on cpu 1 (train), 0 (sliding)")
    p.add_argument("--repeats", type=int, default=None, help="default: 10 on cuda; on cpu 3 (train), 1 (sliding)")
    p.add_argument("--json", default=None, help="write the rows here as a JSON list")
    args = p.parse_args()
    warnings.filterwarnings("ignore")
    device = torch.device(args.device)
    if args.amp is None:
        args.amp = device.type == "cuda"
    size_name = args.size or ("full" if device.type == "cuda" else "small")
    size = SIZES[size_name]
    amp = dict(device_type=device.type, dtype=torch.bfloat16) if args.amp else None
    device_name = (
        torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({torch.get_num_threads()} threads)"
    )
    print(f"# {device_name}, size {size_name}, {'bf16 autocast' if amp else 'fp32'}", flush=True)
    rows = []
    for backbone in args.backbones:
        for net_name in args.nets:
            kind, dims = net_name[:-2], int(net_name[-2])
            for case in args.cases:
                # a CPU sliding-window run is itself tens of windows (the first warms the kernels): one run, no warm-up
                train = case == "train"
                warmup = args.warmup if args.warmup is not None else (3 if device.type == "cuda" else int(train))
                repeats = args.repeats or (10 if device.type == "cuda" else 3 if train else 1)
                fns = {}
                for vname, vkw in variants_for(case, device, args).items():
                    torch.manual_seed(0)
                    vkw = dict(vkw)
                    guided, fast = vkw.pop("guided"), vkw.pop("fast")
                    net = make_net(kind, dims, guided, backbone, args.vit_depth, **vkw).to(device)
                    fns[vname] = build_case(case, net, dims, size, device, amp, fast=fast)
                results = timed(fns, device, warmup, repeats, args.memory)
                del fns
                if device.type == "cuda":
                    torch.cuda.empty_cache()
                plain_ms, plain_mb = results["plain"]
                for vname in [v for v in results if v != "plain"]:
                    ms, mb = results[vname]
                    row = {"case": f"{net_name}_{case}", "backbone": backbone, "variant": vname,
                           "device": device_name, "size": size_name, "amp": bool(amp),
                           "plain_ms": round(plain_ms, 2), "guided_ms": round(ms, 2), "ratio": round(ms / plain_ms, 3),
                           "plain_peak_mb": _round(plain_mb, 1), "guided_peak_mb": _round(mb, 1),
                           "mem_ratio": round(mb / plain_mb, 3) if mb is not None and plain_mb else None}  # fmt: skip
                    rows.append(row)
                    print(
                        f"| {row['case']} | {backbone} | {vname} | {plain_ms:.1f} | {ms:.1f} | {row['ratio']:.2f} |"
                        f" {row['plain_peak_mb']} | {row['guided_peak_mb']} | {row['mem_ratio']} |",
                        flush=True,
                    )
    print_table(rows)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(rows, indent=2) + "\n")
    return 0


def build_case(case: str, net, dims: int, size: dict, device: torch.device, amp, fast: bool) -> Callable[[], None]:
    autocast = (lambda: torch.autocast(**amp)) if amp else contextlib.nullcontext
    vol = size["vol3"] if dims == 3 else size["img2"]
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
        if fast and net.use_guide:
            # as in training with CachedGuidePrepareBatch: each sample's whole volume (here of the sliding-window
            # size) encoded once, fp16 tokens kept; a step samples its crop's guide from the whole-volume guide
            whole = [max(n, s) for n in vol]
            with torch.no_grad():
                tokens = [net.guide.encode(torch.rand(1, 1, *whole, device=device)).half() for _ in range(b)]
            axes = [torch.arange(s, dtype=torch.float32, device=device) + (n - s) // 2 for n in whole]
            coords = torch.stack(torch.meshgrid(*axes, indexing="ij"))[None].expand(b, -1, *([-1] * dims))
            kwargs = {"tokens": tokens, "grid": coords_to_grid(coords, whole)}

        def step():
            opt.zero_grad(set_to_none=True)
            with autocast():
                loss = loss_fn(net(x, **kwargs), y)
            loss.backward()
            opt.step()

        return step
    roi = [size["roi3"]] * 3 if dims == 3 else [size["roi2"]] * 2
    image = torch.rand(1, 1, *vol, device=device)
    inferer = GuidedSlidingWindowInferer(roi, sw_batch_size=2, overlap=0.25, mode="gaussian", guide_once=fast)
    net.eval()

    def infer():
        with torch.inference_mode(), autocast():
            inferer(image, net)

    return infer


def _round(value: float | None, digits: int) -> float | None:
    return None if value is None else round(value, digits)


def print_table(rows: list[dict]) -> None:
    print("\n| case | backbone | variant | plain ms | guided ms | ratio | plain peak MB | guided peak MB | mem ratio |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:

        def fmt(v, spec):
            return "-" if v is None else format(v, spec)

        print(
            f"| {r['case']} | {r['backbone']} | {r['variant']} | {r['plain_ms']:.0f} | {r['guided_ms']:.0f} |"
            f" {r['ratio']:.2f} | {fmt(r['plain_peak_mb'], '.0f')} | {fmt(r['guided_peak_mb'], '.0f')} |"
            f" {fmt(r['mem_ratio'], '.2f')} |"
        )


if __name__ == "__main__":
    raise SystemExit(main())
