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

"""Helpers that the bundles' JSON configs call: bundle root, checked data lists, resumable checkpoints, progress."""

from __future__ import annotations

import glob
import logging
import os
import sys
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from ..data import case_id, hc18_fetus_id, load_checked_datalist, make_demo_dataset, split_by_group
from ..utils import as_bool, atomic_write

__all__ = [
    "TASKS",
    "LabelDice",
    "ProgressBar",
    "TrainingCheckpoint",
    "find_bundle_root",
    "inference_datalist",
    "is_main_process",
    "loss_of",
    "prepare_datalists",
    "require_file",
]

logger = logging.getLogger(__name__)

#: what each bundle's data looks like
TASKS: dict[str, dict[str, Any]] = {
    "hippocampus": {"spatial_dims": 3, "labels": {0: "background", 1: "anterior", 2: "posterior"}, "group": case_id},
    "fetalhead": {"spatial_dims": 2, "labels": {0: "background", 1: "fetal head"}, "group": hc18_fetus_id},
}


def is_main_process() -> bool:
    return not (torch.distributed.is_available() and torch.distributed.is_initialized()) or (
        torch.distributed.get_rank() == 0
    )


def read_bundle_config(bundle_dir: str | os.PathLike, config: str, overrides: Mapping[str, Any] | None = None):
    """A :class:`monai.bundle.ConfigParser` of ``<bundle_dir>/configs/<config>`` with ``bundle_root`` set to
    ``bundle_dir`` and ``overrides`` (config ids, ``"a#b"`` allowed) applied, as ``monai.bundle run`` would."""
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config(str(Path(bundle_dir) / "configs" / config))
    parser["bundle_root"] = str(bundle_dir)
    for key, value in (overrides or {}).items():
        parser[key] = value
    return parser


def find_bundle_root(default: str = ".") -> str:
    """The bundle folder of the config being run.

    ``python -m monai.bundle run --config_file <bundle>/configs/train.json`` names the config on the command line,
    so outputs (``models/``, ``runs/``, ``eval/``) land inside ``<bundle>`` wherever the command is run from. Without
    it (e.g. a ``ConfigWorkflow`` built in Python) the model-zoo convention applies: the current directory. Pass
    ``--bundle_root`` to choose another place.
    """
    argv = sys.argv
    for i, arg in enumerate(argv):
        value = None
        if arg == "--config_file" and i + 1 < len(argv):
            value = argv[i + 1]
        elif arg.startswith("--config_file="):
            value = arg.split("=", 1)[1]
        if value:
            first = value.strip("[]() ").split(",")[0].strip(" '\"")
            cfg = Path(first).resolve()
            folder = cfg.parent
            if folder.name == "configs":
                folder = folder.parent
            if cfg.is_file():
                return str(folder)
    return os.path.abspath(default)


def prepare_datalists(
    dataset_dir: str | os.PathLike | None,
    task: str,
    demo_dir: str | os.PathLike,
    val_fraction: float = 0.2,
    seed: int = 0,
    max_cases: int | None = None,
    num_demo_cases: int = 12,
) -> dict[str, Any]:
    """Check a Decathlon-style dataset up front and split it by case (by fetus for HC18).

    Args:
        dataset_dir: folder with ``dataset.json``; ``None``/``""``/``"demo"`` builds the synthetic demo set in
            ``demo_dir`` instead (and says so in the log).
        task: ``"hippocampus"`` or ``"fetalhead"``.
        demo_dir: where the demo set is written.
        val_fraction: fraction of groups for validation.
        seed: split seed.
        max_cases: use only the first ``max_cases`` cases (sorted by file name), e.g. for quick runs.
        num_demo_cases: size of the demo set.

    Returns:
        ``{"train": [...], "val": [...], "all": [...], "dataset_dir": str, "demo": bool}``.

    Raises:
        guidino_monai.data.DatasetError: a missing/empty folder or any bad case (named), before training starts.
    """
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; choose one of {sorted(TASKS)}.")
    spec = TASKS[task]
    demo = dataset_dir in (None, "", "demo")
    if demo:
        distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
        if is_main_process():  # one process writes the demo set, the others wait for it
            make_demo_dataset(demo_dir, task, num_cases=num_demo_cases, seed=seed)
        if distributed:
            torch.distributed.barrier()
        dataset_dir = make_demo_dataset(
            demo_dir, task, num_cases=num_demo_cases, seed=seed
        )  # complete: returns at once
        logger.warning(
            "no dataset_dir given: using the built-in SYNTHETIC demo set at %s. Set dataset_dir to a"
            " Decathlon-style folder to train on real data.",
            dataset_dir,
        )
    items = load_checked_datalist(str(dataset_dir), spec["spatial_dims"], list(spec["labels"]))
    items = sorted(items, key=lambda d: d["image"])
    for item in items:  # a stable name per case (guide token cache, reports)
        item.setdefault("case_id", case_id(item))
    if max_cases:
        items = items[: int(max_cases)]
    train, val = split_by_group(items, val_fraction=val_fraction, seed=seed, group_key=spec["group"])
    logger.info("%s: %d training and %d validation cases from %s", task, len(train), len(val), dataset_dir)
    return {"train": train, "val": val, "all": items, "dataset_dir": str(dataset_dir), "demo": demo}


class TrainingCheckpoint:
    """Save the full training state after every epoch and resume from it when training starts again.

    ``checkpoint_last.pt`` in ``ckpt_dir`` holds network, optimizer, (scheduler) and engine state. It is written to a
    temporary file and atomically renamed, so a run killed mid-save leaves the previous checkpoint intact. Loading
    uses ``torch.load(weights_only=True)``.

    Args:
        ckpt_dir: folder of the checkpoint.
        network, optimizer, lr_scheduler: what to save and restore.
        resume: resume from an existing checkpoint at start. Defaults to ``True``.
        filename: checkpoint file name. Defaults to ``"checkpoint_last.pt"``.
    """

    def __init__(
        self,
        ckpt_dir: str | os.PathLike,
        network: torch.nn.Module,
        optimizer: torch.optim.Optimizer,
        lr_scheduler: Any = None,
        resume: bool = True,
        filename: str = "checkpoint_last.pt",
    ) -> None:
        self.path = Path(ckpt_dir) / filename
        self.network = network
        self.optimizer = optimizer
        self.lr_scheduler = lr_scheduler
        self.resume = as_bool(resume, "resume")

    def attach(self, engine: Any) -> None:
        from ignite.engine import Events

        engine.add_event_handler(Events.STARTED, self.load)
        engine.add_event_handler(Events.EPOCH_COMPLETED, self.save)

    def _objects(self) -> dict[str, Any]:
        objs = {"network": self.network, "optimizer": self.optimizer}
        if self.lr_scheduler is not None:
            objs["lr_scheduler"] = self.lr_scheduler
        return objs

    def save(self, engine: Any) -> None:
        if not is_main_process():
            return
        from ..inferers import unwrap_network

        objs = self._objects()
        objs["network"] = unwrap_network(self.network)  # no "module." prefix from DDP
        state = {k: v.state_dict() for k, v in objs.items()}
        state["engine"] = {"epoch": int(engine.state.epoch), "iteration": int(engine.state.iteration)}
        atomic_write(self.path, lambda tmp: torch.save(state, tmp))

    def load(self, engine: Any) -> None:
        if not self.resume or not self.path.is_file():
            return
        try:
            state = torch.load(self.path, map_location="cpu", weights_only=True)
        except Exception as e:
            raise RuntimeError(f"cannot resume from {self.path}: {e}. Delete it to start afresh.") from e
        from ..inferers import unwrap_network

        objs = self._objects()
        objs["network"] = unwrap_network(self.network)
        for key, obj in objs.items():
            if key not in state:
                raise RuntimeError(f"cannot resume from {self.path}: it holds no {key!r} state.")
            obj.load_state_dict(state[key])
        epoch, iteration = state["engine"]["epoch"], state["engine"]["iteration"]
        engine.state.epoch, engine.state.iteration = epoch, iteration
        logger.info("resumed from %s at epoch %d (iteration %d)", self.path, epoch, iteration)
        if epoch >= engine.state.max_epochs:
            logger.warning("%s already holds %d epochs (max_epochs=%d): nothing left to train.", self.path, epoch,
                           engine.state.max_epochs)  # fmt: skip


class LabelDice:
    """Validation Dice of every foreground label, logged each validation; warns when the network has lost a label.

    A mean Dice hides a label that the network never learned (e.g. 0.44 = one label at 0.88 and one at 0). This
    handler, attached to the validator before ``StatsHandler`` / ``TensorBoardStatsHandler``, puts one scalar per
    label into ``engine.state.metrics`` (``val_dice_<name>``), so both log it, and logs a warning once a label's Dice
    has stayed below ``lost_below`` for ``patience`` validations in a row.

    Dice is computed per case with MONAI's ``compute_dice`` (cases without the label are left out of its mean, as in
    ``MeanDice``) on the outputs' ``pred`` and ``label`` (one-hot, after post-processing). Nothing is gathered across
    processes: in multi-process training the validator's handlers run on rank 0 only, so there it covers rank 0's
    share of the validation cases.

    Args:
        labels: ``{index: name}`` of the labels; background (index 0) is skipped.
        patience: validations in a row below ``lost_below`` before the warning. Defaults to 3.
        lost_below: a label's Dice below this counts as lost. Defaults to 0.01.
        prefix: metric name prefix. Defaults to ``"val_dice_"``.
        keys: output keys of prediction and label. Defaults to ``("pred", "label")``.
    """

    def __init__(
        self,
        labels: Mapping[Any, str],
        patience: int = 3,
        lost_below: float = 0.01,
        prefix: str = "val_dice_",
        keys: Sequence[str] = ("pred", "label"),
    ) -> None:
        self.labels = {int(k): str(v) for k, v in labels.items() if int(k) != 0}
        if not self.labels:
            raise ValueError(f"LabelDice: no foreground label in labels={dict(labels)!r}.")
        if int(patience) < 1:
            raise ValueError(f"LabelDice: patience must be >= 1, got {patience!r}.")
        self.patience = int(patience)
        self.lost_below = float(lost_below)
        self.prefix = prefix
        self.keys = tuple(keys)
        self.low_streak = dict.fromkeys(self.labels, 0)
        self.warned: set[int] = set()
        self._rows: list[torch.Tensor] = []

    def attach(self, engine: Any) -> None:
        from ignite.engine import Events

        engine.add_event_handler(Events.EPOCH_STARTED, self.reset)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self.update)
        engine.add_event_handler(Events.EPOCH_COMPLETED, self.complete)

    def reset(self, engine: Any = None) -> None:
        self._rows = []

    def update(self, engine: Any) -> None:
        from monai.handlers import from_engine
        from monai.metrics import compute_dice

        preds, labels = from_engine(list(self.keys))(engine.state.output)
        for pred, label in zip(preds, labels):
            pred, label = torch.as_tensor(pred), torch.as_tensor(label)
            if pred.shape[0] <= max(self.labels) or pred.shape != label.shape:
                raise ValueError(f"LabelDice: expected one-hot {self.keys} with > {max(self.labels)} channels and "
                                 f"equal shapes, got {tuple(pred.shape)} and {tuple(label.shape)}.")  # fmt: skip
            dice = compute_dice(pred[None].float(), label[None].float(), include_background=True)[0]
            self._rows.append(dice[list(self.labels)].cpu())

    def per_label(self) -> dict[str, float]:
        """Mean Dice per label name over the cases seen since the last reset (nan where no case has the label)."""
        if not self._rows:
            return {}
        table = torch.stack(self._rows)
        return {name: float(torch.nanmean(table[:, i])) for i, name in enumerate(self.labels.values())}

    def complete(self, engine: Any) -> None:
        epoch = int(engine.state.epoch)
        for (index, name), value in zip(self.labels.items(), self.per_label().values()):
            engine.state.metrics[f"{self.prefix}{name.replace(' ', '_')}"] = value
            self.low_streak[index] = self.low_streak[index] + 1 if value < self.lost_below else 0
            if self.low_streak[index] >= self.patience and index not in self.warned:
                self.warned.add(index)
                logger.warning(
                    "validation Dice of label %d (%s) has stayed below %g for %d validations (up to epoch %d): the "
                    "network is not learning this label. It may still recover; if it does not, train again with "
                    "another seed (see the bundle README, Limitations).", index, name, self.lost_below,
                    self.low_streak[index], epoch)  # fmt: skip


class ProgressBar:
    """ignite's tqdm progress bar as a bundle handler (shows the loss for trainers)."""

    def __init__(self, output_transform: Callable | None = None, persist: bool = False, enabled: bool = True):
        self.output_transform = output_transform
        self.persist = persist
        self.enabled = enabled

    def attach(self, engine: Any) -> None:
        if not self.enabled or not is_main_process():
            return
        from ignite.handlers import ProgressBar as _Bar

        kwargs = {"output_transform": self.output_transform} if self.output_transform is not None else {}
        _Bar(persist=self.persist).attach(engine, **kwargs)


def latest_file(pattern: str) -> str | None:
    files = sorted(glob.glob(pattern), key=os.path.getmtime)
    return files[-1] if files else None


def loss_of(output: Any) -> float:
    """The loss from a (decollated) engine output, for progress bars and stats."""
    if isinstance(output, Sequence) and not isinstance(output, Mapping):
        output = output[0]
    return float(output["loss"])


def require_file(path: str | os.PathLike, what: str = "file") -> str:
    """Raise ``FileNotFoundError`` naming ``path`` and what it should hold, if it does not exist."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{what}: {os.path.abspath(path)} does not exist.")
    return str(path)


def inference_datalist(
    input_files: str | os.PathLike | Sequence[str | os.PathLike] | None, task: str, demo_dir: str | os.PathLike
) -> list[dict[str, str]]:
    """Images to segment, each checked up front (readable, right number of dims, finite).

    Args:
        input_files: one image, a list of images, a folder (all ``*.nii``/``*.nii.gz`` in it) or a glob pattern;
            ``None`` segments the built-in synthetic demo images in ``demo_dir`` (made if needed).
        task: ``"hippocampus"`` or ``"fetalhead"``.
        demo_dir: where the demo set is.

    Raises:
        guidino_monai.data.DatasetError: a bad image, named; FileNotFoundError: nothing matched.
    """
    from ..data import check_image

    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; choose one of {sorted(TASKS)}.")
    if input_files in (None, "", "demo"):
        root = make_demo_dataset(demo_dir, task)
        files = sorted(glob.glob(os.path.join(root, "imagesTr", "*.nii*")))
        logger.warning("no input_files given: segmenting the built-in SYNTHETIC demo images in %s", root)
    elif isinstance(input_files, (str, os.PathLike)):
        p = str(input_files)
        if os.path.isdir(p):
            files = sorted(glob.glob(os.path.join(p, "*.nii")) + glob.glob(os.path.join(p, "*.nii.gz")))
        elif any(c in p for c in "*?["):
            files = sorted(glob.glob(p))
        else:
            files = [p]
    else:
        files = [str(f) for f in input_files]
    if not files:
        raise FileNotFoundError(f"no images found for input_files={input_files!r}.")
    for f in files:
        if not os.path.isfile(f):
            raise FileNotFoundError(f"input image {os.path.abspath(f)} does not exist.")
        check_image(f, TASKS[task]["spatial_dims"])
    return [{"image": os.path.abspath(f)} for f in files]
