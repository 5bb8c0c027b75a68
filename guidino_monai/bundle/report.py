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

"""Evaluation report for the bundles: per-case CSV, summary JSON and PNG overlays."""

from __future__ import annotations

import csv
import json
import logging
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai.data.utils import affine_to_spacing
from monai.metrics import (
    compute_average_surface_distance,
    compute_dice,
    compute_hausdorff_distance,
    compute_iou,
)
from monai.networks.utils import one_hot

from ..metrics import head_circumference_mm

__all__ = ["HeadCircumferenceReport", "SegmentationReport", "case_metrics", "save_overlay"]

logger = logging.getLogger(__name__)


def _spacing(t: Any, spatial_dims: int) -> tuple[float, ...]:
    affine = getattr(t, "affine", None)
    if affine is None:
        return (1.0,) * spatial_dims
    return tuple(float(s) for s in affine_to_spacing(torch.as_tensor(affine), r=spatial_dims))


def _case_name(t: Any, index: int) -> str:
    meta = getattr(t, "meta", {}) or {}
    name = meta.get("filename_or_obj")
    if isinstance(name, (list, tuple)):
        name = name[0]
    if not name:
        return f"case_{index:04d}"
    base = os.path.basename(str(name))
    for ext in (".nii.gz", ".nii", ".nrrd", ".png"):
        if base.endswith(ext):
            return base[: -len(ext)]
    return base


def case_metrics(
    pred: torch.Tensor, label: torch.Tensor, labels: Mapping[int, str], spacing: Sequence[float]
) -> dict[str, float]:
    """Dice, IoU, HD95 (mm) and ASD (mm) per foreground label for one case.

    Args:
        pred, label: label maps ``(1, *spatial)`` (or ``(*spatial)``) with integer classes.
        labels: ``{value: name}`` including background 0.
        spacing: voxel size in mm.

    An empty prediction for a present label gives Dice 0 and HD95/ASD ``nan``; a label absent from both gives
    ``nan`` everywhere (MONAI's conventions).
    """
    n = max(labels) + 1
    p = torch.as_tensor(pred).reshape(1, 1, *pred.shape[-len(spacing) :]).long()
    y = torch.as_tensor(label).reshape(1, 1, *label.shape[-len(spacing) :]).long()
    p1, y1 = one_hot(p, n), one_hot(y, n)
    dice = compute_dice(p1, y1, include_background=False, ignore_empty=True)[0]
    iou = compute_iou(p1, y1, include_background=False, ignore_empty=True)[0]
    hd = compute_hausdorff_distance(p1, y1, include_background=False, percentile=95, spacing=list(spacing))[0]
    asd = compute_average_surface_distance(p1, y1, include_background=False, symmetric=True, spacing=list(spacing))[0]
    out: dict[str, float] = {}
    for i, value in enumerate(sorted(v for v in labels if v != 0)):
        name = labels[value].replace(" ", "_")
        out[f"dice_{name}"] = float(dice[i])
        out[f"iou_{name}"] = float(iou[i])
        out[f"hd95_mm_{name}"] = float(hd[i])
        out[f"asd_mm_{name}"] = float(asd[i])
    return out


def _to_uint8(img: np.ndarray) -> np.ndarray:
    lo, hi = np.percentile(img, (0.5, 99.5))
    return (np.clip((img - lo) / max(hi - lo, 1e-6), 0, 1) * 255).astype(np.uint8)


_COLOURS = np.array([[0, 0, 0], [230, 60, 60], [60, 200, 90], [70, 120, 240], [240, 200, 40]], dtype=np.float32)


def save_overlay(
    path: str | os.PathLike,
    image: np.ndarray,
    label: np.ndarray | None,
    pred: np.ndarray,
    guide: np.ndarray | None = None,
    scale: int = 3,
) -> str:
    """Write a PNG of four panels: image, image + label, image + prediction, guide mask (2D arrays)."""
    from PIL import Image

    gray = _to_uint8(image).astype(np.float32)
    rgb = np.repeat(gray[..., None], 3, axis=-1)

    def blend(mask: np.ndarray | None) -> np.ndarray:
        if mask is None:
            return rgb
        m = mask.astype(int).clip(0, len(_COLOURS) - 1)
        colour = _COLOURS[m]
        alpha = (m > 0)[..., None] * 0.45
        return rgb * (1 - alpha) + colour * alpha

    if guide is not None:
        g = np.clip(guide, 0, 1)
        guide_rgb = np.stack([g * 255, g * 180, (1 - g) * 120], axis=-1)  # dark blue (0) -> yellow (1)
    else:
        guide_rgb = np.zeros_like(rgb)
    panels = [rgb, blend(label), blend(pred), guide_rgb]
    sep = np.full((rgb.shape[0], 2, 3), 255.0)
    row = np.concatenate([p if i == 0 else np.concatenate([sep, p], axis=1) for i, p in enumerate(panels)], axis=1)
    im = Image.fromarray(row.clip(0, 255).astype(np.uint8))
    im = im.resize((im.width * scale, im.height * scale), Image.NEAREST)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    im.save(str(path))
    return str(path)


class _CaseRowsHandler:
    """An ignite handler that collects one row per case and writes them when the run completes."""

    rows: list[dict[str, Any]]

    def attach(self, engine: Any) -> None:
        from ignite.engine import Events

        engine.add_event_handler(Events.STARTED, lambda e: self.rows.clear())
        engine.add_event_handler(Events.ITERATION_COMPLETED, self.iteration_completed)
        engine.add_event_handler(Events.COMPLETED, self.completed)

    def iteration_completed(self, engine: Any) -> None:
        raise NotImplementedError

    def completed(self, engine: Any = None) -> None:
        raise NotImplementedError


class SegmentationReport(_CaseRowsHandler):
    """Evaluator handler: per-case metrics CSV, a summary JSON and PNG overlays of a few cases.

    Expects the decollated engine output to hold post-processed label maps under ``pred_key`` and ``label_key``
    (``(1, *spatial)``), the image under ``image_key`` and, optionally, the guide mask under ``guide_key``.

    Args:
        output_dir: where ``metrics_per_case.csv``, ``metrics_summary.json`` and ``overlays/*.png`` go.
        labels: ``{value: name}`` including background.
        num_overlays: how many cases get a PNG overlay. Defaults to ``4``.
        head_circumference: also report head circumference (mm) from an ellipse fit of label 1 (fetal head), and its
            error against the case's ``head_circumference_mm`` entry (or, if absent, against the label's HC).
        hc_boundary_offset_px: boundary offset used for the HC fit (see :func:`head_circumference_mm`).
        hc_failure_mm: an HC error above this many mm marks the case a failure (``hc_failure`` column, 1/0; the
            summary's ``hc_failure`` mean is the failure rate and ``hc_failures`` lists the cases). Defaults to
            ``10.0``.
    """

    def __init__(
        self,
        output_dir: str | os.PathLike,
        labels: Mapping[int | str, str],
        num_overlays: int = 4,
        head_circumference: bool = False,
        hc_boundary_offset_px: float = 0.0,
        hc_failure_mm: float = 10.0,
        image_key: str = "image",
        label_key: str = "label",
        pred_key: str = "pred",
        guide_key: str = "guide",
    ) -> None:
        self.output_dir = Path(output_dir)
        self.labels = {int(k): v for k, v in labels.items()}
        self.num_overlays = num_overlays
        self.head_circumference = head_circumference
        self.hc_offset = hc_boundary_offset_px
        self.hc_failure_mm = float(hc_failure_mm)
        self.keys = (image_key, label_key, pred_key, guide_key)
        self.rows: list[dict[str, Any]] = []

    def iteration_completed(self, engine: Any) -> None:
        outputs = engine.state.output
        batch = engine.state.batch
        if isinstance(outputs, Mapping):
            outputs = [outputs]
        if isinstance(batch, Mapping):
            batch = [batch]
        for i, item in enumerate(outputs):
            extra = batch[i] if isinstance(batch, Sequence) and i < len(batch) else {}
            self.add_case(item, extra)

    def add_case(self, item: Mapping[str, Any], extra: Mapping[str, Any] | None = None) -> dict[str, Any]:
        image_key, label_key, pred_key, guide_key = self.keys
        image, label, pred = item[image_key], item[label_key], item[pred_key]
        spatial_dims = image.ndim - 1
        spacing = _spacing(pred, spatial_dims)
        if pred.shape[0] != 1 or label.shape[0] != 1:
            raise ValueError(
                f"expected label maps (1, *spatial), got pred {tuple(pred.shape)} label {tuple(label.shape)}"
            )
        row: dict[str, Any] = {"case": _case_name(image, len(self.rows))}
        row.update(case_metrics(pred, label, self.labels, spacing))
        if self.head_circumference:
            sp2 = spacing[:2]
            hc_pred = head_circumference_mm((pred[0] == 1).cpu().numpy(), sp2, boundary_offset_px=self.hc_offset)
            ref = (extra or {}).get("head_circumference_mm")
            if ref is None or (isinstance(ref, float) and math.isnan(ref)):
                ref = head_circumference_mm((label[0] == 1).cpu().numpy(), sp2, boundary_offset_px=self.hc_offset)
            ref = float(torch.as_tensor(ref).reshape(-1)[0])
            err = abs(hc_pred - ref)
            failed = not math.isfinite(err) or err > self.hc_failure_mm  # no head found counts as a failure
            row.update({"hc_pred_mm": hc_pred, "hc_ref_mm": ref, "hc_abs_error_mm": err, "hc_failure": int(failed)})
        if len(self.rows) < self.num_overlays:
            guide = item.get(guide_key)
            row["overlay"] = self._overlay(row["case"], image, label, pred, guide)
        self.rows.append(row)
        return row

    def _overlay(self, name: str, image: Any, label: Any, pred: Any, guide: Any) -> str:
        img = image[0].detach().cpu().float().numpy()
        lab = label[0].detach().cpu().numpy()
        prd = pred[0].detach().cpu().numpy()
        gde = None if guide is None else guide[0].detach().cpu().float().numpy()
        if img.ndim == 3:  # the axial slice (last axis) with the most labelled voxels
            k = int(np.argmax((lab > 0).sum(axis=(0, 1)))) if lab.any() else img.shape[2] // 2
            img, lab, prd = img[..., k], lab[..., k], prd[..., k]
            gde = None if gde is None else gde[..., k]

        # array axes (x, y) -> picture rows/cols with y upwards, as viewers show RAS images
        def pic(a):
            return None if a is None else np.flipud(a.T)

        return save_overlay(self.output_dir / "overlays" / f"{name}.png", pic(img), pic(lab), pic(prd), pic(gde))

    def summary(self) -> dict[str, Any]:
        metrics = [k for k in (self.rows[0] if self.rows else {}) if k not in ("case", "overlay")]
        out: dict[str, Any] = {"num_cases": len(self.rows), "metrics": {}}
        for k in metrics:
            vals = np.array([r[k] for r in self.rows], dtype=float)
            ok = vals[np.isfinite(vals)]
            out["metrics"][k] = {
                "mean": float(ok.mean()) if ok.size else float("nan"),
                "std": float(ok.std()) if ok.size else float("nan"),
                "median": float(np.median(ok)) if ok.size else float("nan"),
                "n": int(ok.size),
            }
        if self.head_circumference:
            out["hc_failures"] = [r["case"] for r in self.rows if r.get("hc_failure")]
        dices = [v["mean"] for k, v in out["metrics"].items() if k.startswith("dice_")]
        out["mean_dice"] = float(np.nanmean(dices)) if dices else float("nan")
        return out

    def _gather_rows(self) -> bool:
        """Under torch.distributed, collect every rank's rows on all ranks; return whether this rank writes."""
        if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
            return True
        parts: list[Any] = [None] * torch.distributed.get_world_size()
        torch.distributed.all_gather_object(parts, self.rows)
        self.rows = sorted((r for p in parts for r in p), key=lambda r: str(r["case"]))
        return torch.distributed.get_rank() == 0

    def completed(self, engine: Any = None) -> None:
        if not self._gather_rows():
            return
        if not self.rows:
            logger.warning("evaluation saw no cases; nothing written")
            return
        self.output_dir.mkdir(parents=True, exist_ok=True)
        fields = list(self.rows[0].keys())
        for r in self.rows:
            fields += [k for k in r if k not in fields]
        with open(self.output_dir / "metrics_per_case.csv", "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=fields)
            w.writeheader()
            for r in self.rows:
                w.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in r.items()})
        summary = self.summary()
        with open(self.output_dir / "metrics_summary.json", "w") as f:
            json.dump(summary, f, indent=2)
        logger.info("evaluation: %d cases, mean Dice %.4f -> %s", summary["num_cases"], summary["mean_dice"],
                    self.output_dir)  # fmt: skip


class HeadCircumferenceReport(_CaseRowsHandler):
    """Inference handler: head circumference (mm) from an ellipse fitted to the predicted fetal head (label 1).

    Reads the post-processed label map under ``pred_key`` (in the input image's geometry, so the spacing is the
    image's own), logs each value and writes ``head_circumference.csv`` to ``output_dir`` when the run completes.
    """

    def __init__(
        self, output_dir: str | os.PathLike, boundary_offset_px: float = 0.0, pred_key: str = "pred", label: int = 1
    ) -> None:
        self.output_dir = Path(output_dir)
        self.boundary_offset_px = boundary_offset_px
        self.pred_key = pred_key
        self.label = label
        self.rows: list[dict[str, Any]] = []

    def iteration_completed(self, engine: Any) -> None:
        outputs = engine.state.output
        for item in [outputs] if isinstance(outputs, Mapping) else outputs:
            pred = item[self.pred_key]
            spacing = _spacing(pred, 2)
            hc = head_circumference_mm((pred[0] == self.label).cpu().numpy(), spacing, self.boundary_offset_px)
            name = _case_name(pred, len(self.rows))
            logger.info("%s: head circumference %.1f mm", name, hc)
            self.rows.append({"case": name, "hc_mm": hc, "spacing_mm": "x".join(f"{s:.4g}" for s in spacing)})

    def completed(self, engine: Any = None) -> None:
        self.output_dir.mkdir(parents=True, exist_ok=True)
        with open(self.output_dir / "head_circumference.csv", "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=["case", "hc_mm", "spacing_mm"])
            w.writeheader()
            for r in self.rows:
                w.writerow({**r, "hc_mm": f"{r['hc_mm']:.2f}"})
