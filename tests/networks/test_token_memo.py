"""GuideBranch's eval-mode token memo: the ViT runs once per distinct input, results are those without the memo."""

from __future__ import annotations

import unittest
import warnings

import torch

from guidino_monai.networks.blocks.guide import GuideBranch


def branch(cache: int, seed: int = 0) -> GuideBranch:
    torch.manual_seed(seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return GuideBranch(2, backbone_kwargs={"depth": 2}, guide_size=64, token_cache_size=cache)


class TestTokenMemo(unittest.TestCase):
    def setUp(self) -> None:
        self.calls = 0

    def count(self, g: GuideBranch) -> None:
        def hook(*_):
            self.calls += 1

        g.backbone.patch_embed.register_forward_hook(hook)

    def test_repeated_input_runs_vit_once_with_same_guide(self):
        g, ref = branch(4).eval(), branch(0).eval()
        ref.load_state_dict(g.state_dict())
        self.count(g)
        xs = [torch.rand(1, 1, 50, 40) for _ in range(2)]
        with torch.no_grad():
            for _ in range(3):
                for x in xs:
                    torch.testing.assert_close(g(x), ref(x), rtol=0, atol=0)
        self.assertEqual(self.calls, 2)

    def test_new_weights_invalidate(self):
        g, other = branch(4, seed=0).eval(), branch(0, seed=1).eval()
        x = torch.rand(1, 1, 50, 40)
        with torch.no_grad():
            before = g(x)
            g.load_state_dict(other.state_dict())
            after = g(x)
            expected = other(x)
        self.assertFalse(torch.equal(before, after))
        torch.testing.assert_close(after, expected, rtol=0, atol=0)

    def test_training_mode_and_lru_bound(self):
        g = branch(2)
        self.count(g)
        x = torch.rand(1, 1, 50, 40)
        with torch.no_grad():
            g.train()
            g(x)
            g(x)
            self.assertEqual(self.calls, 2)
            self.assertEqual(len(g._token_memo), 0)
            g.eval()
            for _ in range(2):
                for i in range(3):
                    g(x + i)
        self.assertEqual(len(g._token_memo), 2)
        self.assertEqual(self.calls, 2 + 6)  # 3 inputs cycling through a 2-entry LRU: every call misses

    def test_rejects_negative(self):
        with self.assertRaisesRegex(ValueError, "token_cache_size"):
            branch(-1)


if __name__ == "__main__":
    unittest.main()
