"""benchmarks/equal_budget.py's TimeBudget: a cosine learning rate over elapsed time and a stop at the budget, with a
last validation; time is faked, so the schedule is checked exactly. Also the machine record (reference step)."""

from __future__ import annotations

import math
import sys
import unittest
from pathlib import Path
from unittest import mock

import torch
from ignite.engine import Engine

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
import equal_budget  # noqa: E402


class FakeClock:
    def __init__(self) -> None:
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


class TestTimeBudget(unittest.TestCase):
    def test_cosine_over_time_and_stop(self):
        clock = FakeClock()
        opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.4)
        seen_lr, validated = [], []

        def step(engine, batch):
            seen_lr.append(opt.param_groups[0]["lr"])
            clock.t += 10.0  # every iteration takes 10 s

        trainer = Engine(step)
        evaluator = mock.Mock()
        evaluator.run.side_effect = lambda epoch: validated.append(epoch)
        workflow = mock.Mock(trainer=trainer)
        workflow.parser.get_parsed_content.side_effect = {"optimizer": opt, "validate#evaluator": evaluator}.__getitem__
        budget = equal_budget.TimeBudget(budget_s=45.0)
        with mock.patch.object(equal_budget.time, "perf_counter", clock):
            budget.attach(workflow)
            trainer.run(range(2), max_epochs=100)
        expected = [0.4 * 0.5 * (1 + math.cos(math.pi * t / 45.0)) for t in (0, 10, 20, 30, 40)]
        self.assertEqual(len(seen_lr), 5)  # 5 iterations: the one ending at 50 s > 45 s is the last
        for got, want in zip(seen_lr, expected):
            self.assertAlmostEqual(got, want, places=12)
        self.assertEqual(budget.iterations, 5)
        self.assertEqual(budget.epoch_ends, [20.0, 40.0])  # two full epochs of 2 iterations
        self.assertAlmostEqual(budget.elapsed, 50.0)
        self.assertEqual(validated, [3])  # the stopped epoch is validated once more


class TestOverrides(unittest.TestCase):
    def test_set_values(self):
        got = equal_budget.parse_overrides(["gate_mode=residual", "guide_kwargs#guide_size=112", 'x=["a", 1]'])
        self.assertEqual(got, {"gate_mode": "residual", "guide_kwargs#guide_size": 112, "x": ["a", 1]})
        with self.assertRaises(SystemExit):
            equal_budget.parse_overrides(["gate_mode"])


class TestNetworks(unittest.TestCase):
    def test_variants_build_their_networks_in_the_bundle(self):
        """``*_dynunet`` is the hippocampus bundle's own network since 0.4.0; ``*_segresnet`` the one before."""
        from monai.bundle import ConfigParser

        from guidino_monai.networks import GuidedDynUNet, GuidedSegResNet

        cfg = equal_budget.REPO / "bundles" / equal_budget.BUNDLES["hippocampus"][0] / "configs" / "train.json"
        built = {}
        for name, net_def in (("bundle", None), ("dynunet", equal_budget.dynunet_def("hippocampus")),
                              ("segresnet", equal_budget.PREVIOUS["hippocampus"])):  # fmt: skip
            parser = ConfigParser()
            parser.read_config(str(cfg))
            if net_def is not None:
                parser["network_def"] = net_def
            parser["guide_backbone_kwargs"] = {"depth": 1}
            built[name] = parser.get_parsed_content("network_def")
        self.assertIsInstance(built["segresnet"], GuidedSegResNet)
        self.assertIsInstance(built["dynunet"], GuidedDynUNet)
        self.assertIsInstance(built["bundle"], GuidedDynUNet)
        bundle, dyn = built["bundle"].state_dict(), built["dynunet"].state_dict()
        self.assertEqual({k: v.shape for k, v in bundle.items()}, {k: v.shape for k, v in dyn.items()})
        with self.assertRaises(SystemExit):
            equal_budget.train_and_eval("fetalhead", "plain_segresnet", 0, 1.0, mock.Mock(overrides={}))


class TestMachineReference(unittest.TestCase):
    def test_reference_step_is_timed_on_this_machine(self):
        times = iter([0.0, 0.0, 10.0, 12.5, 20.0, 21.0, 30.0, 36.0])  # warmup step, then steps of 2.5, 1 and 6 s
        machine = equal_budget.machine_reference(steps=3, warmup=1, shape=(1, 1, 16, 16, 16), clock=lambda: next(times))
        self.assertEqual(machine["reference_step_s"], 2.5)  # the median (not the mean, nor the warmup)
        self.assertEqual(machine["threads"], torch.get_num_threads())
        self.assertEqual(machine["torch"], torch.__version__)
        self.assertIsInstance(machine["cpu"], str)
        self.assertTrue(machine["cpu"])


if __name__ == "__main__":
    unittest.main()
