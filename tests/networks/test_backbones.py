"""Guide backbones: local weight loading (Meta / timm / HF folder layouts), unsafe and damaged files, LoRA."""

from __future__ import annotations

import os
import pickle
import tempfile
import unittest
from pathlib import Path

import torch
from parameterized import parameterized
from safetensors.torch import load_file, save_file
from testing_utils import SMALL_VIT, quiet_random_init_warning

from guidino_monai.losses import GuidedDiceCELoss
from guidino_monai.networks import (
    GuidedSegResNet,
    GuideWeightsError,
    create_guide_backbone,
    load_lora_adapters,
    save_lora_adapters,
)

quiet_random_init_warning()


def tokens(model, x):
    with torch.no_grad():
        return model.forward_intermediates(x, indices=1, intermediates_only=True)[0]


def to_meta_dinov2(state: dict, num_reg: int) -> dict:
    """Write a timm DINOv2 state in Meta's original key layout (inverse of timm's ``_convert_dinov2``)."""
    meta = {k: v.clone() for k, v in state.items()}
    embed = meta["cls_token"].shape[-1]
    meta["mask_token"] = torch.zeros(1, embed)
    if num_reg:
        meta["register_tokens"] = meta.pop("reg_token")
        pos = meta["pos_embed"]
        meta["pos_embed"] = torch.cat([torch.zeros(1, 1, embed), pos], dim=1)  # Meta's pos_embed covers cls too
    return meta


class _Evil:
    """A pickle that would run code when loaded without weights_only."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


class TestWeightLoading(unittest.TestCase):
    def setUp(self):
        self.tmp = tempfile.TemporaryDirectory()
        self.dir = Path(self.tmp.name)
        self.x = torch.rand(2, 3, 112, 112)  # a multiple of 14 and 16

    def tearDown(self):
        self.tmp.cleanup()

    @parameterized.expand([("vit_small_patch14_dinov2", 0), ("vit_small_patch14_reg4_dinov2", 4)])
    def test_meta_pth_and_safetensors_round_trip(self, name, num_reg):
        torch.manual_seed(1)
        src = create_guide_backbone(name, **SMALL_VIT)
        for p in src.parameters():  # make cls/reg/pos tokens non-trivial so a bad mapping shows
            p.data.normal_(0, 0.02)
        state = src.state_dict()
        meta_path = self.dir / "dinov2_meta.pth"
        torch.save(to_meta_dinov2(state, num_reg), meta_path)
        st_path = self.dir / "timm.safetensors"
        save_file({k: v.contiguous() for k, v in state.items()}, str(st_path))
        from_meta = create_guide_backbone(name, pretrained_weights=str(meta_path), **SMALL_VIT)
        from_st = create_guide_backbone(name, pretrained_weights=str(st_path), **SMALL_VIT)
        ref = tokens(src, self.x)
        torch.testing.assert_close(tokens(from_meta, self.x), ref, rtol=0, atol=0)
        torch.testing.assert_close(tokens(from_st, self.x), ref, rtol=0, atol=0)
        self.assertTrue(from_meta.guide_pretrained)
        # a model built for a smaller input grid gets the position embedding resampled by timm's filter
        small = create_guide_backbone(name, pretrained_weights=str(meta_path), img_size=112, **SMALL_VIT)
        self.assertEqual(small.pos_embed.shape[1], 8 * 8 + (0 if num_reg else 1))

    def test_dinov3_safetensors_and_hf_folder(self):
        name = "vit_small_patch16_dinov3"
        src = create_guide_backbone(name, **SMALL_VIT)
        folder = self.dir / "hub_snapshot"
        folder.mkdir()
        save_file({k: v.contiguous() for k, v in src.state_dict().items()}, str(folder / "model.safetensors"))
        (folder / "config.json").write_text('{"architecture": "vit_small_patch16_dinov3"}')
        loaded = create_guide_backbone(name, pretrained_weights=str(folder), **SMALL_VIT)
        torch.testing.assert_close(tokens(loaded, self.x), tokens(src, self.x), rtol=0, atol=0)

    def test_wrong_key_named(self):
        state = create_guide_backbone("vit_small_patch14_dinov2", **SMALL_VIT).state_dict()
        state["blocks.0.attn.qkv_renamed.weight"] = state.pop("blocks.0.attn.qkv.weight")
        path = self.dir / "bad_keys.safetensors"
        save_file({k: v.contiguous() for k, v in state.items()}, str(path))
        with self.assertRaises(GuideWeightsError) as ctx:
            create_guide_backbone("vit_small_patch14_dinov2", pretrained_weights=str(path), **SMALL_VIT)
        msg = str(ctx.exception)
        self.assertIn("missing keys: blocks.0.attn.qkv.weight", msg)
        self.assertIn("unexpected keys: blocks.0.attn.qkv_renamed.weight", msg)
        self.assertIn("bad_keys.safetensors", msg)

    def test_wrong_architecture_shape_mismatch(self):
        path = self.dir / "base.safetensors"
        base = create_guide_backbone("vit_base_patch14_dinov2", depth=1)
        save_file({k: v.contiguous() for k, v in base.state_dict().items()}, str(path))
        with self.assertRaisesRegex(GuideWeightsError, "shape mismatches"):
            create_guide_backbone("vit_small_patch14_dinov2", pretrained_weights=str(path), depth=1)

    def test_truncated_files(self):
        state = create_guide_backbone("vit_small_patch14_dinov2", **SMALL_VIT).state_dict()
        pth, st = self.dir / "full.pth", self.dir / "full.safetensors"
        torch.save(state, pth)
        save_file({k: v.contiguous() for k, v in state.items()}, str(st))
        for full in (pth, st):
            cut = self.dir / f"truncated{full.suffix}"
            cut.write_bytes(full.read_bytes()[: full.stat().st_size // 2])
            with self.assertRaises(GuideWeightsError) as ctx:
                create_guide_backbone("vit_small_patch14_dinov2", pretrained_weights=str(cut), **SMALL_VIT)
            self.assertIn(cut.name, str(ctx.exception))

    def test_malicious_pickle_refused(self):
        marker = self.dir / "pwned"
        path = self.dir / "evil.pth"
        torch.save({"pos_embed": torch.zeros(1), "payload": _Evil(str(marker))}, path)
        with self.assertRaisesRegex(GuideWeightsError, "needs code to load") as ctx:
            create_guide_backbone("vit_small_patch14_dinov2", pretrained_weights=str(path), **SMALL_VIT)
        self.assertIn("evil.pth", str(ctx.exception))
        self.assertFalse(marker.exists(), "the pickle's code ran")
        raw = self.dir / "evil_raw.pkl"
        raw.write_bytes(pickle.dumps(_Evil(str(marker))))
        with self.assertRaises(GuideWeightsError):
            create_guide_backbone("vit_small_patch14_dinov2", pretrained_weights=str(raw), **SMALL_VIT)
        self.assertFalse(marker.exists(), "the pickle's code ran")

    def test_missing_file_and_empty_folder(self):
        with self.assertRaisesRegex(FileNotFoundError, "nope.pth"):
            create_guide_backbone("vit_small_patch14_dinov2", pretrained_weights=str(self.dir / "nope.pth"))
        with self.assertRaisesRegex(GuideWeightsError, "holds none of"):
            create_guide_backbone("vit_small_patch14_dinov2", pretrained_weights=str(self.dir), **SMALL_VIT)

    def test_ill_args(self):
        with self.assertRaises(ValueError):
            create_guide_backbone("vit_small_patch14_dinov2", lora_rank=-1, **SMALL_VIT)
        with self.assertRaises(ValueError):
            create_guide_backbone("vit_huge_patch14_clip", **SMALL_VIT)


LORA_CASES = [("vit_small_patch14_dinov2",), ("vit_small_patch16_dinov3",)]


class TestLoRA(unittest.TestCase):
    @parameterized.expand(LORA_CASES)
    def test_only_adapters_train_and_frozen_weights_unchanged(self, name):
        torch.manual_seed(0)
        vit = create_guide_backbone(name, lora_rank=4, **SMALL_VIT)
        trainable = [n for n, p in vit.named_parameters() if p.requires_grad]
        self.assertTrue(trainable)
        self.assertTrue(all("lora_" in n for n in trainable), trainable)
        self.assertFalse(any("patch_embed" in n for n in trainable))
        self.assertTrue(any(".attn.qkv." in n for n in trainable) and any(".mlp.fc2." in n for n in trainable))
        frozen = {n: p.detach().clone() for n, p in vit.named_parameters() if not p.requires_grad}
        lora_b = {n: p.detach().clone() for n, p in vit.named_parameters() if "lora_B" in n}
        opt = torch.optim.AdamW([p for p in vit.parameters() if p.requires_grad], lr=1e-2)
        out = vit.forward_intermediates(torch.rand(2, 3, 112, 112), indices=1, intermediates_only=True)[0]
        out.square().mean().backward()
        opt.step()
        for n, p in vit.named_parameters():
            if not p.requires_grad:
                self.assertTrue(torch.equal(p, frozen[n]), f"frozen weight {n} changed")
        self.assertTrue(any(not torch.equal(p, lora_b[n]) for n, p in vit.named_parameters() if "lora_B" in n))

    @parameterized.expand(LORA_CASES)
    def test_adapters_save_and_load_alone(self, name):
        torch.manual_seed(0)
        vit = create_guide_backbone(name, lora_rank=4, **SMALL_VIT)
        base_state = {k: v for k, v in vit.state_dict().items() if "lora_" not in k}
        for n, p in vit.named_parameters():
            if "lora_" in n:
                p.data.normal_(0, 0.05)
        x = torch.rand(1, 3, 112, 112)
        with tempfile.TemporaryDirectory() as d:
            path = save_lora_adapters(vit, Path(d) / "adapters.safetensors")
            self.assertLess(path.stat().st_size, 200_000)  # adapters only, not the ViT
            other = create_guide_backbone(name, lora_rank=4, **SMALL_VIT)
            other.load_state_dict(base_state, strict=False)  # same frozen ViT, fresh adapters
            self.assertFalse(torch.allclose(tokens(other, x), tokens(vit, x)))
            load_lora_adapters(other, path)
            torch.testing.assert_close(tokens(other, x), tokens(vit, x), rtol=0, atol=0)
            wrong_rank = create_guide_backbone(name, lora_rank=2, **SMALL_VIT)
            with self.assertRaisesRegex(GuideWeightsError, "rank 4"):
                load_lora_adapters(wrong_rank, path)

    def test_guide_loss_reaches_adapters_in_network(self):
        torch.manual_seed(0)
        net = GuidedSegResNet(
            3, 8, 1, 3, guide_backbone_kwargs=SMALL_VIT, lora_rank=2, guide_kwargs={"guide_size": 28}
        ).train()
        self.assertFalse(net.guide.backbone.training)
        loss_fn = GuidedDiceCELoss(to_onehot_y=True, softmax=True, lambda_guide=1.0)
        label = torch.zeros(1, 1, 16, 16, 8)
        label[:, :, 4:12, 4:12, 2:6] = 1
        loss = loss_fn(net(torch.rand(1, 1, 16, 16, 8)), label)
        loss.backward()
        # lora_B starts at zero, so at the first step only lora_B receives a non-zero gradient
        grads = [p.grad for n, p in net.guide.backbone.named_parameters() if "lora_B" in n]
        self.assertTrue(grads and all(g is not None for g in grads))
        self.assertGreater(sum(float(g.abs().sum()) for g in grads), 0.0)
        self.assertGreater(float(net.guide.token_book.prototypes.grad.abs().sum()), 0.0)
        with tempfile.TemporaryDirectory() as d:  # adapters of a whole network save on their own too
            saved = load_file(str(save_lora_adapters(net, Path(d) / "a.safetensors")))
        lora_names = {n for n, _ in net.guide.backbone.named_parameters() if "lora_" in n}
        self.assertEqual(len(saved), len(lora_names))
        self.assertTrue(all("lora_" in k for k in saved))
        for k, v in saved.items():  # the file holds the network's current adapter values
            torch.testing.assert_close(v, net.guide.backbone.get_parameter(k.replace(".weight", ".default.weight")))


if __name__ == "__main__":
    unittest.main()
