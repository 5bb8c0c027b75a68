"""The guide is the same in training and inference, faithful to the paper, and every option does what it says.

Each test here failed on the code before the fix it names (issue 10, items 1-8)."""

from __future__ import annotations

import json
import os
import tempfile
import unittest
from pathlib import Path

import nibabel as nib
import numpy as np
import torch
import torch.nn.functional as F
from monai.data import CacheDataset, DataLoader
from monai.inferers import SlidingWindowInferer
from monai.networks.nets import UNet
from monai.transforms import Compose, EnsureChannelFirstd, LoadImaged, RandSpatialCropd
from parameterized import parameterized
from testing_utils import REPO_ROOT, SMALL_VIT, quiet_random_init_warning

from guidino_monai.bundle.utils import TrainingCheckpoint
from guidino_monai.engines import CachedGuidePrepareBatch
from guidino_monai.inferers import GuidedSlidingWindowInferer
from guidino_monai.interactive.clicks import point_to_token
from guidino_monai.networks import (
    DEFAULT_GUIDE_BACKBONE,
    GuideBranch,
    GuidedSegResNet,
    GuidedUNet,
    TokenBook,
    create_guide_backbone,
    guide_slice_positions,
    resample_guide,
)
from guidino_monai.transforms import AddCoordinatesd, SpatialPadWithCoordinatesd
from guidino_monai.utils import as_bool

quiet_random_init_warning()
BUNDLES = REPO_ROOT / "bundles"


def _write_nifti(path: Path, array: np.ndarray) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(array.astype(np.float32), np.eye(4)), str(path))
    return str(path)


class TestTokens(unittest.TestCase):
    """Item 1: tokens are the ViT's normalised last hidden state (final norm applied), as timm's forward_features."""

    @parameterized.expand(
        [("vit_small_patch16_dinov3",), ("vit_small_patch14_dinov2",), ("vit_small_patch14_reg4_dinov2",)]
    )
    def test_tokens_equal_forward_features(self, name):
        torch.manual_seed(0)
        branch = GuideBranch(2, backbone=name, backbone_kwargs=SMALL_VIT, guide_size=64).eval()
        with torch.no_grad():  # make the final norm matter: a non-trivial affine
            branch.backbone.norm.weight.uniform_(0.5, 2.0)
            branch.backbone.norm.bias.uniform_(-1.0, 1.0)
        slices = torch.rand(2, 1, 40, 64)
        with torch.no_grad():
            tokens = branch.encode_slices(slices)
            dino_in = branch.to_dino_input(slices)
            ref = branch.backbone.forward_features(dino_in)[:, branch.backbone.num_prefix_tokens :]
        h, w = dino_in.shape[2] // branch.patch_size[0], dino_in.shape[3] // branch.patch_size[1]
        ref = ref.transpose(1, 2).reshape(2, -1, h, w)
        torch.testing.assert_close(tokens, ref, rtol=1e-5, atol=1e-5)
        off = GuideBranch(2, backbone=name, backbone_kwargs=SMALL_VIT, guide_size=64, token_norm=False).eval()
        off.load_state_dict(branch.state_dict())
        with torch.no_grad():
            self.assertFalse(torch.allclose(off.encode_slices(slices), ref, atol=1e-3))  # the option switches it off


class TestBackboneDefaultAndWeights(unittest.TestCase):
    """Item 2: the paper's DINOv3 ViT-S/16 (4 registers) by default; Meta's and Hugging Face's DINOv3 layouts load."""

    def test_default_is_dinov3_small_16(self):
        self.assertEqual(DEFAULT_GUIDE_BACKBONE, "vit_small_patch16_dinov3")
        net = GuidedSegResNet(3, 8, 1, 2, guide_backbone_kwargs=SMALL_VIT)
        vit = net.guide.backbone
        self.assertEqual((vit.patch_embed.patch_size, vit.num_prefix_tokens, vit.embed_dim), ((16, 16), 5, 384))
        self.assertEqual(GuideBranch(2, backbone_kwargs=SMALL_VIT).backbone.patch_embed.patch_size, (16, 16))
        for bundle in BUNDLES.iterdir():
            for cfg in ("train.json", "inference.json"):
                conf = json.loads((bundle / "configs" / cfg).read_text())
                self.assertEqual(conf["guide_backbone"], DEFAULT_GUIDE_BACKBONE, f"{bundle.name}/{cfg}")

    def test_hugging_face_layout_loads_and_matches_transformers(self):
        transformers = __import__("importlib").import_module("transformers")
        from safetensors.torch import save_file

        torch.manual_seed(0)
        cfg = transformers.DINOv3ViTConfig(
            hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=256, patch_size=16,
            num_register_tokens=4, query_bias=False, key_bias=False, value_bias=False, layerscale_value=0.5,
        )  # fmt: skip
        hf = transformers.DINOv3ViTModel(cfg).eval()
        with tempfile.TemporaryDirectory() as d:
            save_file({k: v.contiguous() for k, v in hf.state_dict().items()}, os.path.join(d, "model.safetensors"))
            vit = create_guide_backbone("vit_small_patch16_dinov3", pretrained_weights=d, depth=2, embed_dim=64,
                                        num_heads=4).eval()  # fmt: skip
        x = torch.randn(2, 3, 48, 80)  # a non-square input: the rope grids must agree too
        with torch.no_grad():
            ref = hf(pixel_values=x).last_hidden_state  # transformers' own implementation, normalised
            got = vit.forward_features(x)
        torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-5)

    def test_hugging_face_layout_with_nonzero_bias_is_refused_by_name(self):
        transformers = __import__("importlib").import_module("transformers")
        from safetensors.torch import save_file

        from guidino_monai.networks import GuideWeightsError

        cfg = transformers.DINOv3ViTConfig(hidden_size=64, num_hidden_layers=1, num_attention_heads=4,
                                           intermediate_size=256, patch_size=16, num_register_tokens=4)  # fmt: skip
        hf = transformers.DINOv3ViTModel(cfg)
        with torch.no_grad():
            hf.model.layer[0].attention.q_proj.bias.fill_(0.3)
        with tempfile.TemporaryDirectory() as d:
            path = os.path.join(d, "hf.safetensors")
            save_file({k: v.contiguous() for k, v in hf.state_dict().items()}, path)
            with self.assertRaisesRegex(GuideWeightsError, "q_proj bias"):
                create_guide_backbone("vit_small_patch16_dinov3", pretrained_weights=path, depth=1, embed_dim=64,
                                      num_heads=4)  # fmt: skip

    def test_meta_layout_loads(self):
        """Meta's DINOv3 checkpoint names (storage_tokens, ls1/ls2.gamma, rope periods, mask_token), written by hand."""
        torch.manual_seed(0)
        src = create_guide_backbone("vit_small_patch16_dinov3", **SMALL_VIT).eval()
        meta = {}
        for k, v in src.state_dict().items():
            k = k.replace("reg_token", "storage_tokens").replace("gamma_1", "ls1.gamma").replace("gamma_2", "ls2.gamma")
            meta[k] = v.clone()
        meta["mask_token"] = torch.zeros(1, 384)
        meta["rope_embed.periods"] = torch.ones(16)
        with tempfile.TemporaryDirectory() as d:
            path = os.path.join(d, "dinov3_vits16_pretrain.pth")
            torch.save(meta, path)
            vit = create_guide_backbone("vit_small_patch16_dinov3", pretrained_weights=path, **SMALL_VIT).eval()
        x = torch.randn(1, 3, 32, 64)
        with torch.no_grad():
            torch.testing.assert_close(vit.forward_features(x), src.forward_features(x))


class TestGeometry(unittest.TestCase):
    """Item 3: slices keep their aspect ratio into the ViT (non-square token grids), at the paper's resolution."""

    def test_aspect_ratio_is_kept(self):
        branch = GuideBranch(2, backbone_kwargs=SMALL_VIT, guide_size=512)
        self.assertEqual(branch.dino_input_size((400, 270)), (512, 352))  # HC18: 400x270 -> 32x22 tokens
        self.assertEqual(branch.token_grid_for((400, 270)), (32, 22))
        g = branch(torch.rand(1, 1, 400, 270))
        self.assertEqual(tuple(g.shape), (1, 1, 32, 22))
        b3 = GuideBranch(3, backbone_kwargs=SMALL_VIT, guide_size=224)  # hippocampus slices: 35x50 (1 mm)
        self.assertEqual(tuple(b3(torch.rand(1, 1, 35, 50, 6)).shape), (1, 1, 10, 14, 6))
        square = GuideBranch(2, backbone_kwargs=SMALL_VIT, guide_size=224, keep_aspect=False)
        self.assertEqual(square.dino_input_size((400, 270)), (224, 224))

    def test_content_is_not_squashed(self):
        """A disc stays a disc in the DINO input of a 2:1 image (squashing would make it an ellipse)."""
        branch = GuideBranch(2, backbone_kwargs=SMALL_VIT, guide_size=128, intensity_scaling="none")
        yy, xx = torch.meshgrid(torch.arange(64.0), torch.arange(128.0), indexing="ij")
        img = (((yy - 32) ** 2 + (xx - 64) ** 2) < 20**2).float()[None, None]
        dino = branch.to_dino_input(img)[0, 0] > float(branch.to_dino_input(torch.full_like(img, 0.5))[0, 0, 0, 0])
        rows, cols = dino.any(1).sum(), dino.any(0).sum()
        self.assertLess(abs(int(rows) - int(cols)), 3)


class TestTrainInferSameGuide(unittest.TestCase):
    """Item 4: on a volume smaller than the ROI, the cached-token training guide equals the inference guide."""

    def test_small_volume(self):
        torch.manual_seed(0)
        roi = (16, 32, 16)  # one window: the whole padded volume (axis 1 fits exactly)
        net = GuidedSegResNet(3, 8, 1, 2, guide_backbone_kwargs=SMALL_VIT, guide_kwargs={"guide_size": 32})
        vol = np.random.RandomState(0).rand(12, 32, 10).astype(np.float32)  # smaller than the ROI on axes 0 and 2
        with tempfile.TemporaryDirectory() as d:
            data = [{"image": _write_nifti(Path(d) / "a.nii.gz", vol), "label": _write_nifti(Path(d) / "l.nii.gz",
                                                                                             vol > 0.5)}]  # fmt: skip
            transform = Compose([
                LoadImaged(["image", "label"], image_only=True), EnsureChannelFirstd(["image", "label"]),
                AddCoordinatesd("image"), SpatialPadWithCoordinatesd(["image", "label"], spatial_size=roi),
                RandSpatialCropd(["image", "label", "coords"], roi_size=roi, random_size=False),
            ])  # fmt: skip
            ds = CacheDataset(data, transform, progress=False)
            prep = CachedGuidePrepareBatch(net, ds)
            batch = next(iter(DataLoader(ds, batch_size=1)))
            image, _, _, kw = prep(batch, torch.device("cpu"))
            self.assertEqual(tuple(image.shape[2:]), (16, 32, 16))
            with torch.no_grad():
                _, train_guide = net.train()(image, **kw)
        # inference: MONAI pads the volume itself; record the guide the inferer hands to the network's window
        net.eval()
        seen = []
        forward = net.forward
        net.forward = lambda x, guide=None, **k: (seen.append((x.clone(), guide)), forward(x, guide=guide, **k))[1]
        inferer = GuidedSlidingWindowInferer(roi_size=(16, 32, 16), sw_batch_size=1, skip_unread_slices=False)
        with torch.no_grad():
            inferer(torch.from_numpy(vol)[None, None], net)
        (window, infer_guide), = seen  # fmt: skip
        torch.testing.assert_close(window, image.as_tensor())  # the same padded voxels
        read = net.guide_read_sizes((16, 32, 16))[0]
        torch.testing.assert_close(resample_guide(train_guide, read), infer_guide, rtol=1e-2, atol=2e-3)


class TestTokenCache(unittest.TestCase):
    """Item 5: tokens are keyed by path and content; items need no case_id."""

    def test_same_names_other_folders_and_rewritten_files(self):
        torch.manual_seed(0)
        net = GuidedSegResNet(3, 8, 1, 2, guide_backbone_kwargs=SMALL_VIT, guide_kwargs={"guide_size": 32})
        rs = np.random.RandomState(1)
        with tempfile.TemporaryDirectory() as d:
            data = [
                {"image": _write_nifti(Path(d) / f / "case.nii.gz", rs.rand(16, 16, 8)),
                 "label": _write_nifti(Path(d) / f / "label.nii.gz", np.zeros((16, 16, 8)))}
                for f in ("siteA", "siteB")
            ]  # fmt: skip  (same file names, no case_id)
            transform = Compose([LoadImaged(["image", "label"], image_only=True),
                                 EnsureChannelFirstd(["image", "label"]), AddCoordinatesd("image")])  # fmt: skip
            ds = CacheDataset(data, transform, progress=False, cache_rate=0.0)
            prep = CachedGuidePrepareBatch(net, ds)
            with self.assertLogs("guidino_monai.engines", "INFO") as logs:
                batch = next(iter(DataLoader(ds, batch_size=2)))
                _, _, _, kw = prep(batch, torch.device("cpu"))
            self.assertIn("cached", "\n".join(logs.output))
            self.assertEqual(len(prep.tokens), 2)
            a, b = kw["tokens"]
            self.assertFalse(torch.equal(a, b))
            for i, item in enumerate(data):  # each equals its own volume's tokens, computed here independently
                vol = torch.from_numpy(np.asarray(nib.load(item["image"]).dataobj, dtype=np.float32))[None, None]
                with torch.no_grad():
                    torch.testing.assert_close(kw["tokens"][i].float(), net.guide.encode(vol), rtol=1e-2, atol=2e-3)
            # rewrite siteA's file in place (same name, same shape): its tokens are computed anew
            new = rs.rand(16, 16, 8)
            _write_nifti(Path(data[0]["image"]), new)
            os.utime(data[0]["image"], ns=(1, 1))
            _, _, _, kw2 = prep(next(iter(DataLoader(ds, batch_size=2))), torch.device("cpu"))
            self.assertEqual(len(prep.tokens), 3)
            self.assertFalse(torch.equal(kw2["tokens"][0], a))
            self.assertTrue(torch.equal(kw2["tokens"][1], b))

    def test_logs_why_the_vit_runs_every_step(self):
        net = GuidedSegResNet(3, 8, 1, 2, guide_backbone_kwargs=SMALL_VIT)
        prep = CachedGuidePrepareBatch(net, None)
        batch = {"image": torch.rand(1, 1, 8, 8, 8), "label": torch.zeros(1, 1, 8, 8, 8)}
        with self.assertLogs("guidino_monai.engines", "INFO") as logs:
            self.assertEqual(len(prep(batch)), 2)
        self.assertIn("no 'coords'", "\n".join(logs.output))


class TestSliceConvention(unittest.TestCase):
    """Item 6: guide slice j is computed where every resampling and the clicks place it."""

    def test_stride_guide_slices_sit_at_block_centres(self):
        torch.manual_seed(0)
        b1 = GuideBranch(3, backbone_kwargs=SMALL_VIT, guide_size=32, slice_axis=2).eval()
        b3 = GuideBranch(3, backbone_kwargs=SMALL_VIT, guide_size=32, slice_axis=2, slice_stride=3).eval()
        b3.load_state_dict(b1.state_dict())
        vol = torch.rand(1, 1, 20, 24, 12)
        with torch.no_grad():
            g1, g3 = b1(vol), b3(vol)
        self.assertEqual(g3.shape[-1], 4)
        want = torch.tensor([1.0, 4.0, 7.0, 10.0], dtype=torch.float64)
        torch.testing.assert_close(guide_slice_positions(12, 3), want)
        torch.testing.assert_close(g3, g1[..., [1, 4, 7, 10]])  # computed from voxels 1, 4, 7, 10 (block centres)
        full = resample_guide(g3, (20, 24, 12))  # ... and read back there by the resampling
        torch.testing.assert_close(full[..., [1, 4, 7, 10]], resample_guide(g3, (20, 24, 4)))
        for j, z in enumerate([1, 4, 7, 10]):  # a click on voxel z picks guide slice j
            self.assertEqual(point_to_token((5, 5, z), (20, 24, 12), (4, 2, 2), slice_axis=2, slice_stride=3)[0], j)
        self.assertEqual(point_to_token((5, 5, 2), (20, 24, 12), (4, 2, 2), slice_axis=2, slice_stride=3)[0], 0)
        self.assertEqual(point_to_token((5, 5, 3), (20, 24, 12), (4, 2, 2), slice_axis=2, slice_stride=3)[0], 1)

    def test_even_stride_interpolates_between_the_two_middle_slices(self):
        torch.manual_seed(0)
        b = GuideBranch(3, backbone_kwargs=SMALL_VIT, guide_size=32, slice_stride=2, intensity_scaling="none")
        vol = torch.rand(1, 1, 8, 8, 6)
        picked = b.pick_slices(vol)
        torch.testing.assert_close(picked[:, 0], (vol[..., 0] + vol[..., 1]) / 2)
        torch.testing.assert_close(picked[:, 2], (vol[..., 4] + vol[..., 5]) / 2)
        # the subset path (sliding-window inference) computes the same slices as the whole guide
        with torch.no_grad():
            torch.testing.assert_close(b(vol, slices=[1])[..., 1], b(vol)[..., 1])


class TestOptionsDoWhatTheySay(unittest.TestCase):
    """Item 7: EMA once per optimizer step, freeze=False trains the ViT, strict booleans."""

    def test_ema_steps_once_per_optimizer_step_on_the_cached_path(self):
        torch.manual_seed(0)
        net = GuidedSegResNet(3, 8, 1, 2, guide_backbone_kwargs=SMALL_VIT,
                              guide_kwargs={"guide_size": 32, "ema_momentum": 0.9}).train()  # fmt: skip
        book = net.guide.token_book
        opt = torch.optim.SGD([book.prototypes], lr=1.0)
        vol = torch.rand(1, 1, 16, 16, 8)
        with torch.no_grad():
            tokens = net.guide.encode(vol)
        coords = AddCoordinatesd("image")({"image": vol[0]})["coords"][None]
        from guidino_monai.networks import coords_to_grid

        grid = coords_to_grid(coords, (16, 16, 8)).expand(3, -1, -1, -1, -1)  # a batch of 3: 3 TokenBook calls
        ema0 = book.ema_prototypes.clone()
        _, g = net(vol.expand(3, -1, -1, -1, -1), tokens=[tokens] * 3, grid=grid)
        torch.testing.assert_close(book.ema_prototypes, ema0)  # no optimizer step yet
        g.mean().backward()
        opt.step()
        p1 = book.prototypes.detach().clone()
        net(vol.expand(3, -1, -1, -1, -1), tokens=[tokens] * 3, grid=grid)
        net(vol.expand(3, -1, -1, -1, -1), tokens=[tokens] * 3, grid=grid)  # a second forward, same step
        torch.testing.assert_close(book.ema_prototypes, 0.9 * ema0 + 0.1 * p1)
        opt.zero_grad()
        book.prototypes.grad = torch.ones_like(book.prototypes)
        opt.step()
        p2 = book.prototypes.detach().clone()
        net.eval()  # the last step is folded in before eval uses the EMA
        torch.testing.assert_close(book.ema_prototypes, 0.9 * (0.9 * ema0 + 0.1 * p1) + 0.1 * p2)

    def test_loading_a_state_dict_is_not_an_ema_step(self):
        a, b = TokenBook(16, ema_momentum=0.5), TokenBook(16, ema_momentum=0.5)
        b.load_state_dict(a.state_dict())
        ema = b.ema_prototypes.clone()
        b.train()(torch.rand(1, 16, 4, 4))
        torch.testing.assert_close(b.ema_prototypes, ema)

    def test_unfrozen_vit_trains_and_is_never_cached(self):
        torch.manual_seed(0)
        net = GuidedUNet(2, 1, 2, (8, 16), (2,), guide_backbone_kwargs={**SMALL_VIT, "freeze": False},
                         guide_kwargs={"guide_size": 32}).train()  # fmt: skip
        _, g = net(torch.rand(1, 1, 32, 32))
        g.mean().backward()
        grads = [p.grad for p in net.guide.backbone.parameters() if p.grad is not None]
        self.assertTrue(grads and any(float(x.abs().sum()) > 0 for x in grads))
        batch = {"image": torch.rand(1, 1, 32, 32), "label": torch.zeros(1, 1, 32, 32),
                 "coords": torch.zeros(1, 2, 32, 32)}  # fmt: skip
        self.assertEqual(len(CachedGuidePrepareBatch(net, None)(batch)), 2)

    def test_strict_booleans(self):
        for v, want in (("false", False), ("False", False), ("no", False), ("0", False), ("true", True), (True, True)):
            self.assertIs(as_bool(v), want)
        with self.assertRaisesRegex(ValueError, "resume must be a boolean"):
            TrainingCheckpoint("/tmp", None, None, resume="maybe")
        self.assertFalse(TrainingCheckpoint("/tmp", None, None, resume="false").resume)
        self.assertFalse(CachedGuidePrepareBatch(None, None, enabled="false").enabled)
        from monai.bundle import ConfigParser

        for bundle in BUNDLES.iterdir():
            parser = ConfigParser()
            parser.read_config(str(bundle / "configs" / "inference.json"))
            parser["save_guide"] = "false"
            self.assertFalse(parser.get_parsed_content("inferer#return_guide"), bundle.name)
            parser["save_guide"] = "true"
            parser["guide"] = "false"
            self.assertFalse(parser.get_parsed_content("inferer#return_guide"), bundle.name)


class TestMonaiCompatibility(unittest.TestCase):
    """Item 8: GuidedUNet(use_guide=False) is MONAI's UNet, key for key; the inferer is MONAI's SlidingWindowInferer."""

    @parameterized.expand([(2, 0), (2, 2), (3, 1)])
    def test_unet_checkpoint_loads_strictly(self, dims, res_units):
        torch.manual_seed(0)
        args = dict(spatial_dims=dims, in_channels=1, out_channels=3, channels=(8, 16, 32), strides=(2, 2),
                    num_res_units=res_units)  # fmt: skip
        ref = UNet(**args).eval()
        plain = GuidedUNet(**args, use_guide=False).eval()
        plain.load_state_dict(ref.state_dict(), strict=True)
        x = torch.rand(2, 1, *([16] * dims))
        with torch.no_grad():
            torch.testing.assert_close(plain(x), ref(x))
        guided = GuidedUNet(**args, guide_backbone_kwargs=SMALL_VIT, guide_kwargs={"guide_size": 32})
        missing, unexpected = guided.load_state_dict(ref.state_dict(), strict=False)
        self.assertEqual(unexpected, [])
        self.assertTrue(missing and all(k.startswith("guide.") for k in missing))

    def test_inferer_is_monais(self):
        inferer = GuidedSlidingWindowInferer(roi_size=(16, 16), buffer_steps=None, cpu_thresh=10)
        self.assertIsInstance(inferer, SlidingWindowInferer)
        net = UNet(2, 1, 2, (8, 16), (2,)).eval()
        x = torch.rand(1, 1, 40, 24)
        with torch.no_grad():
            ref = SlidingWindowInferer(roi_size=(16, 16), mode="gaussian")(x, net)
            torch.testing.assert_close(inferer(x, net), ref)

    @unittest.skipUnless(torch.cuda.is_available(), "needs a CUDA device (volume on CPU, windows and ViT on the GPU)")
    def test_volume_on_cpu_network_on_gpu(self):
        net = GuidedSegResNet(3, 8, 1, 2, guide_backbone_kwargs=SMALL_VIT, guide_kwargs={"guide_size": 32})
        net = net.cuda().eval()
        inferer = GuidedSlidingWindowInferer(roi_size=(16, 16, 16), sw_device="cuda", device="cpu")
        with torch.no_grad():
            out = inferer(torch.rand(1, 1, 24, 20, 18), net)
        self.assertEqual(out.device.type, "cpu")


if __name__ == "__main__":
    unittest.main()
