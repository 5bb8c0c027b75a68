"""LabelDice: one validation Dice per label in the engine's metrics, and a warning when a label stays lost."""

from __future__ import annotations

import math
import unittest

import numpy as np
import torch
from ignite.engine import Engine

from guidino_monai.bundle import LabelDice


def onehot(labels: np.ndarray, num_classes: int = 3) -> torch.Tensor:
    return torch.as_tensor(np.stack([labels == c for c in range(num_classes)]).astype(np.float32))


def case(pred: np.ndarray, label: np.ndarray) -> dict:
    return {"pred": onehot(pred), "label": onehot(label)}


def reference_dice(pred: np.ndarray, label: np.ndarray, c: int) -> float:
    a, b = pred == c, label == c
    return 2.0 * np.logical_and(a, b).sum() / (a.sum() + b.sum())


def run_validations(handler: LabelDice, epochs_of_cases: list[list[dict]]) -> list[dict]:
    """Run a validator once per 'training epoch', the way MONAI's Evaluator.run(global_epoch) does."""
    engine = Engine(lambda e, batch: batch)
    handler.attach(engine)
    metrics = []
    for epoch, cases in enumerate(epochs_of_cases, start=1):
        engine.state.max_epochs, engine.state.epoch, engine.state.iteration = epoch, epoch - 1, 0
        engine.run([[c] for c in cases])
        metrics.append(dict(engine.state.metrics))
    return metrics


class TestLabelDice(unittest.TestCase):
    def setUp(self):
        rng = np.random.default_rng(0)
        self.label = np.zeros((12, 10, 8), dtype=np.int64)
        self.label[2:6, 2:8, 2:6] = 1
        self.label[6:10, 2:8, 2:6] = 2
        self.pred = self.label.copy()
        flip = rng.random(self.label.shape) < 0.15
        self.pred[flip] = rng.integers(0, 3, size=int(flip.sum()))

    def test_per_label_values_against_reference(self):
        handler = LabelDice({0: "background", 1: "anterior", 2: "posterior"})
        no_posterior = self.label.copy()
        no_posterior[no_posterior == 2] = 0  # a case without label 2: left out of label 2's mean
        metrics = run_validations(handler, [[case(self.pred, self.label), case(self.label, no_posterior)]])[0]
        self.assertAlmostEqual(metrics["val_dice_anterior"], (reference_dice(self.pred, self.label, 1) + 1.0) / 2, 5)
        self.assertAlmostEqual(metrics["val_dice_posterior"], reference_dice(self.pred, self.label, 2), 5)
        self.assertNotIn("val_dice_background", metrics)
        self.assertLess(metrics["val_dice_posterior"], 1.0)

    def test_lost_label_warned_once_after_patience(self):
        lost = self.label.copy()
        lost[lost == 2] = 1  # the network calls all of the hippocampus 'anterior'
        handler = LabelDice({"1": "anterior", "2": "posterior"}, patience=3)
        with self.assertLogs("guidino_monai.bundle.utils", level="WARNING") as logs:
            metrics = run_validations(handler, [[case(lost, self.label)]] * 5)
        self.assertEqual([m["val_dice_posterior"] for m in metrics], [0.0] * 5)
        self.assertTrue(all(m["val_dice_anterior"] > 0.5 for m in metrics))
        self.assertEqual(len(logs.records), 1, logs.output)
        self.assertIn("label 2 (posterior)", logs.output[0])
        self.assertIn("up to epoch 3", logs.output[0])

    def test_recovered_label_not_warned(self):
        lost = self.label.copy()
        lost[lost == 2] = 1
        handler = LabelDice({1: "anterior", 2: "posterior"}, patience=3)
        sequence = [lost, lost, self.pred, lost, lost]  # never 3 in a row
        with self.assertNoLogs("guidino_monai.bundle.utils", level="WARNING"):
            metrics = run_validations(handler, [[case(p, self.label)] for p in sequence])
        self.assertEqual([m["val_dice_posterior"] > 0 for m in metrics], [False, False, True, False, False])

    def test_label_absent_everywhere_is_nan_not_lost(self):
        only_anterior = self.label.copy()
        only_anterior[only_anterior == 2] = 0
        handler = LabelDice({1: "anterior", 2: "posterior"}, patience=1)
        with self.assertNoLogs("guidino_monai.bundle.utils", level="WARNING"):
            metrics = run_validations(handler, [[case(only_anterior, only_anterior)]])
        self.assertTrue(math.isnan(metrics[0]["val_dice_posterior"]))
        self.assertAlmostEqual(metrics[0]["val_dice_anterior"], 1.0, 6)

    def test_bad_input(self):
        with self.assertRaisesRegex(ValueError, "no foreground label"):
            LabelDice({0: "background"})
        with self.assertRaisesRegex(ValueError, "patience"):
            LabelDice({1: "a"}, patience=0)
        handler = LabelDice({1: "anterior", 2: "posterior"})
        not_onehot = {"pred": torch.zeros(1, 4, 4), "label": torch.zeros(1, 4, 4)}
        with self.assertRaisesRegex(ValueError, "one-hot"):
            run_validations(handler, [[not_onehot]])


if __name__ == "__main__":
    unittest.main()
