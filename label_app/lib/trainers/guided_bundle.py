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
"""Fine-tune a GuiDINO bundle on the submitted labels and swap the weights in only if validation Dice held."""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from pathlib import Path
from typing import Any

import torch
from monai.bundle import ConfigWorkflow
from monai.data import decollate_batch
from monai.metrics import DiceMetric
from monai.transforms import AsDiscrete
from monailabel.interfaces.datastore import Datastore
from monailabel.tasks.train.bundle import BundleTrainTask

from guidino_monai.utils import atomic_write

from ..bundles import atomic_torch_save, load_weights, read_provenance, write_provenance

__all__ = ["GuidedBundleTrainTask", "split_labels"]

logger = logging.getLogger(__name__)


def split_labels(items: list[dict[str, Any]], val_split: float) -> tuple[list[dict], list[dict]]:
    """Deterministic split by image path: every ``round(1 / val_split)``-th case validates (at least one).

    With a single labelled case it both trains and validates (then the swap check only guards against the model
    getting worse on that case).
    """
    items = sorted(items, key=lambda d: d["image"])
    if len(items) < 2 or val_split <= 0:
        return items, list(items)
    n_val = min(len(items) - 1, max(1, int(round(len(items) * val_split))))
    step = len(items) / n_val
    val_idx = {int(i * step) for i in range(n_val)}
    return [d for i, d in enumerate(items) if i not in val_idx], [d for i, d in enumerate(items) if i in val_idx]


class GuidedBundleTrainTask(BundleTrainTask):
    """Training on ``labels/final`` for a GuiDINO bundle (runs in MONAI Label's training subprocess).

    1. the ``final`` labels are split into train and validation (:func:`split_labels`, ``val_split``);
    2. the bundle's ``train.json`` runs in a fresh run folder ``<bundle>/train_runs/<time>/`` (its checkpoints go
       there, never to ``models/``), starting from the served ``models/model.pt``;
    3. validation Dice of the served weights and of the run's best weights are measured on the same validation cases
       with the bundle's validation pipeline; the new weights replace ``models/model.pt`` (atomic rename) only if
       their Dice is not lower. Inference keeps using the old file until the rename, and reloads on its new mtime.

    A run killed at any point leaves ``models/model.pt`` as it was. The outcome of each run is appended to
    ``models/train_history.json``; while a run goes, ``models/train_progress.json`` is rewritten after every epoch.
    ``train_stats`` in ``/info/`` carries the fields 3D Slicer's progress and accuracy bars read: ``epoch``,
    ``total_epochs``, ``best_metric`` (validation Dice of the served weights once the run ended, the run's best so
    far while it goes) and ``total_time`` (set only once the run ended: Slicer shows a running run while it is absent).
    """

    def __init__(self, path: str, conf: dict[str, str], **kwargs: Any) -> None:
        super().__init__(path, conf, **kwargs)
        self.overrides = json.loads(conf.get("train_overrides", "{}")) if conf else {}

    def config(self) -> dict[str, Any]:
        return {"max_epochs": 5, "val_split": 0.2, "learning_rate": 1e-4, "device": "cpu" if not
                torch.cuda.is_available() else "cuda", "pretrained": True}  # fmt: skip

    @property
    def served(self) -> Path:
        return Path(self.bundle_path) / "models" / "model.pt"

    @property
    def history_file(self) -> Path:
        return Path(self.bundle_path) / "models" / "train_history.json"

    @property
    def progress_file(self) -> Path:
        return Path(self.bundle_path) / "models" / "train_progress.json"

    def stats(self) -> dict[str, Any]:
        try:
            history = json.loads(self.history_file.read_text())
        except (OSError, ValueError):
            history = []
        try:
            progress = json.loads(self.progress_file.read_text())
        except (OSError, ValueError):
            progress = {}
        last = dict(history[-1]) if history else {}
        if progress and progress.get("start_ts", 0) > last.get("end_ts", 0):
            return progress  # a run is going (or was killed): no total_time
        if not last:
            return {}
        last.setdefault("epoch", last.get("epochs", 0))
        last.setdefault("total_epochs", last.get("epochs", 0))
        served = last.get("val_dice_after") if last.get("swapped") else last.get("val_dice_before")
        last.setdefault("best_metric", float(served or 0.0))
        last.setdefault("total_time", float(last.get("seconds", 0.0)) or 0.1)
        return last

    def _write_progress(self, info: dict[str, Any]) -> None:
        atomic_write(self.progress_file, lambda tmp: Path(tmp).write_text(json.dumps(info)))

    def _attach_progress(self, wf: ConfigWorkflow, start_ts: float, total_epochs: int, model: Any) -> None:
        """Rewrite ``train_progress.json`` after each epoch (epoch, total_epochs, best validation Dice so far)."""
        from ignite.engine import Events

        trainer = wf.parser.get_parsed_content("train#trainer")
        try:
            evaluator = wf.parser.get_parsed_content("validate#evaluator")
        except Exception:  # a bundle without validation
            evaluator = None

        def update(engine: Any) -> None:
            best = getattr(getattr(evaluator, "state", None), "best_metric", -1) if evaluator is not None else -1
            self._write_progress({"model": model, "epoch": int(engine.state.epoch),
                                  "total_epochs": total_epochs, "best_metric": float(max(best, 0.0)),
                                  "start_ts": start_ts})  # fmt: skip

        trainer.add_event_handler(Events.EPOCH_COMPLETED, update)

    def _workflow(self, run_dir: Path, train: list, val: list, request: dict[str, Any]) -> ConfigWorkflow:
        device = request.get("device") or ("cuda" if torch.cuda.is_available() else "cpu")
        device = device[0] if isinstance(device, list) else device
        device = "cpu" if str(device).startswith("cuda") and not torch.cuda.is_available() else device
        overrides = {
            "bundle_root": self.bundle_path,
            "ckpt_dir": str(run_dir),
            "output_dir": str(run_dir),
            "data": {"train": train, "val": val, "all": train + val, "dataset_dir": "", "demo": False},
            "epochs": int(request.get("max_epochs", 5)),
            "learning_rate": float(request.get("learning_rate", 1e-4)),
            "num_workers": 0,
            "resume": False,
            "progress": False,
            "device": f"$torch.device('{device}')",
            "amp": False,
        }
        overrides.update(self.overrides)
        wf = ConfigWorkflow(
            config_file=self.bundle_config_path,
            meta_file=self.bundle_metadata_path,
            logging_file=None,
            workflow_type="train",
            **overrides,
        )
        wf.initialize()
        return wf

    def _val_dice(self, wf: ConfigWorkflow, weights: str | os.PathLike) -> float:
        """Mean Dice (no background) of ``weights`` on the workflow's validation cases."""
        net = wf.parser.get_parsed_content("network")
        load_weights(net, weights)
        net.eval()
        loader = wf.parser.get_parsed_content("validate#dataloader")
        inferer = wf.parser.get_parsed_content("validate#inferer")
        n = int(wf.parser.get_parsed_content("num_classes"))
        device = wf.parser.get_parsed_content("device")
        metric = DiceMetric(include_background=False, reduction="mean", ignore_empty=False)
        to_pred, to_label = AsDiscrete(argmax=True, to_onehot=n), AsDiscrete(to_onehot=n)
        with torch.no_grad():
            for batch in loader:
                logits = inferer(batch["image"].to(device), net)
                preds = [to_pred(p) for p in decollate_batch(logits)]
                labels = [to_label(y) for y in decollate_batch(batch["label"].to(device))]
                metric(preds, labels)
        value = float(metric.aggregate().item())
        metric.reset()
        return value

    def __call__(self, request: dict[str, Any], datastore: Datastore) -> dict[str, Any]:
        start = time.time()
        items = [{"image": d["image"], "label": d["label"]} for d in datastore.datalist() if d]
        if not items:
            raise ValueError("no final labels in the datastore yet: submit at least one (PUT /datastore/label).")
        train, val = split_labels(items, float(request.get("val_split", 0.2)))
        run_dir = Path(self.bundle_path) / "train_runs" / time.strftime("%Y%m%d_%H%M%S")
        run_dir.mkdir(parents=True, exist_ok=True)
        logger.info("training %s on %d cases, validating on %d, in %s", self.bundle_path, len(train), len(val), run_dir)
        wf = self._workflow(run_dir, train, val, request)
        total_epochs = int(request.get("max_epochs", 5))
        self._write_progress({"model": request.get("model"), "epoch": 0,
                              "total_epochs": total_epochs, "best_metric": 0.0, "start_ts": start})  # fmt: skip
        self._attach_progress(wf, start, total_epochs, request.get("model"))
        net = wf.parser.get_parsed_content("network")  # the trainer's network (the parser caches it)
        init_state = {k: v.detach().clone() for k, v in net.state_dict().items()}
        before = self._val_dice(wf, self.served)
        if request.get("pretrained", True):
            load_weights(net, self.served)  # fine-tune from the served weights
        else:
            net.load_state_dict(init_state)
        net.train()
        wf.run()
        candidate = run_dir / "model.pt"  # best validation epoch of this run (the bundle's CheckpointSaver)
        if not candidate.is_file():
            atomic_torch_save(net.state_dict(), candidate)
        after = self._val_dice(wf, candidate)
        swapped = after >= before
        if swapped:
            # the inference task reloads on the new mtime
            base = read_provenance(self.bundle_path)
            atomic_write(self.served, lambda tmp: shutil.copyfile(candidate, tmp))
            provenance = {
                "source": "app training",
                "run_dir": str(run_dir),
                "base_source": base.get("source", "random"),
                "base_sha256": base.get("base_sha256", base.get("sha256")),
            }
            write_provenance(self.bundle_path, provenance)
        result = {
            "model": request.get("model"),
            "train_cases": len(train),
            "val_cases": len(val),
            "val_dice_before": before,
            "val_dice_after": after,
            "swapped": swapped,
            "epochs": total_epochs,
            "epoch": total_epochs,
            "total_epochs": total_epochs,
            "best_metric": float(after if swapped else before),
            "run_dir": str(run_dir),
            "seconds": round(time.time() - start, 1),
            "total_time": round(time.time() - start, 1),
            "start_ts": start,
            "end_ts": time.time(),
        }
        logger.info("training result: %s", result)
        history = []
        if self.history_file.is_file():
            try:
                history = json.loads(self.history_file.read_text())
            except ValueError:
                history = []
        history.append(result)
        atomic_write(self.history_file, lambda tmp: Path(tmp).write_text(json.dumps(history, indent=2)))
        return result
