"""The cached-token training path equals the reference path (whole-volume guide, resampled, then cropped)."""

from __future__ import annotations

import os
import tempfile
import unittest
from unittest import mock

import nibabel as nib
import numpy as np
import torch
import torch.nn.functional as F
from monai.data import CacheDataset, DataLoader
from monai.transforms import Compose, EnsureChannelFirstd, LoadImaged, RandFlipd, RandSpatialCropd
from parameterized import parameterized
from testing_utils import SMALL_VIT, quiet_random_init_warning

from guidino_monai.engines import CachedGuidePrepareBatch
from guidino_monai.networks import GuidedSegResNet, GuidedUNet, coords_to_grid, resample_guide, sample_guide
from guidino_monai.transforms import AddCoordinatesd, SpatialPadWithCoordinatesd

quiet_random_init_warning()


def make(dims: int, **kw):
    if dims == 3:
        return GuidedSegResNet(3, 8, 1, 3, guide_backbone_kwargs=SMALL_VIT, guide_kwargs={"guide_size": 28}, **kw)
    return GuidedUNet(2, 1, 3, (8, 16, 32), (2, 2), guide_backbone_kwargs=SMALL_VIT, guide_kwargs={"guide_size": 56},
                      **kw)  # fmt: skip


class TestGuideCache(unittest.TestCase):
    @parameterized.expand([(3,), (2,)])
    def test_crop_and_flip_match_reference(self, dims):
        torch.manual_seed(0)
        net = make(dims).train()
        vol = torch.rand(1, 1, *((24, 40, 20) if dims == 3 else (60, 44)))
        with torch.no_grad():
            tokens = net.guide.encode(vol)
        full = resample_guide(net.guide.tokens_to_guide(tokens, 1), vol.shape[2:])  # reference: whole volume
        d = AddCoordinatesd("image")({"image": vol[0]})
        roi = (16, 24, 8) if dims == 3 else (32, 16)
        start = (5, 9, 7) if dims == 3 else (13, 21)
        sl = tuple(slice(s, s + r) for s, r in zip(start, roi))
        coords = d["coords"][(slice(None),) + sl].flip(1)  # crop, then a flip along spatial axis 0
        ref = full[(slice(None), slice(None)) + sl].flip(2)
        grid = coords_to_grid(coords[None], d["coords_source_shape"].tolist())
        got = net.guide.guide_from_tokens([tokens], grid)
        torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-6)
        got.sum().backward()  # the TokenBook still learns
        self.assertGreater(float(net.guide.token_book.prototypes.grad.abs().sum()), 0.0)
        x = vol[(slice(None), slice(None)) + sl].flip(2)
        with torch.no_grad():
            a, _ = net(x, tokens=[tokens], grid=grid)
            b, _ = net(x, guide=ref)
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)

    @parameterized.expand(
        [
            (3, 2, (60, 64, 30), (5, 40, 11), (16, 16, 8), 2),  # interior crop, flipped along axis 2
            (3, 0, (30, 64, 60), (0, 0, 50), (12, 20, 16), 1),  # at the volume's corner (border clamping)
            (3, 1, (40, 33, 50), (20, 17, 30), (20, 16, 20), 0),  # reaching the far ends
            (2, 2, (120, 100), (70, 3), (40, 32), 1),
        ]
    )
    def test_token_box_equals_whole_volume_guide(self, dims, axis, shape, start, roi, flip_axis):
        """The TokenBook runs only on the part of the token grid a crop reads; the crop's guide is unchanged."""
        torch.manual_seed(0)
        kw = {"guide_size": 56} if dims == 2 else {"guide_size": 56, "slice_axis": axis}
        if dims == 3:
            net = GuidedSegResNet(3, 8, 1, 3, guide_backbone_kwargs=SMALL_VIT, guide_kwargs=kw).train()
        else:
            net = GuidedUNet(2, 1, 3, (8, 16), (2,), guide_backbone_kwargs=SMALL_VIT, guide_kwargs=kw).train()
        vol = torch.rand(1, 1, *shape)
        with torch.no_grad():
            tokens = net.guide.encode(vol)
        d = AddCoordinatesd("image")({"image": vol[0]})
        sl = tuple(slice(s, s + r) for s, r in zip(start, roi))
        coords = d["coords"][(slice(None), *sl)].flip(1 + flip_axis)
        grid = coords_to_grid(coords[None], shape)
        seen = []
        hook = net.guide.token_book.register_forward_hook(lambda m, i, o: seen.append(i[0].numel()))
        got = net.guide.guide_from_tokens([tokens], grid)
        hook.remove()
        ref = sample_guide(net.guide.tokens_to_guide(tokens, 1), grid)  # the TokenBook on the whole volume
        torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-6)
        self.assertLessEqual(seen[0], tokens.numel())
        if dims == 3 and axis == 2:
            self.assertLess(seen[0], tokens.numel() // 2)  # a 8-slice crop of 30 slices: a fraction of the tokens

    def test_separable_sampling_equals_grid_sample(self):
        """sample_guide's separable path (axis-aligned grids: crops, flips) equals grid_sample, values and gradients;
        a rotated grid falls back to grid_sample."""
        torch.manual_seed(0)
        low = torch.rand(1, 1, 5, 7, 30, dtype=torch.float64, requires_grad=True)
        axes = [torch.arange(-3.0, 17.0), torch.arange(40.0, 10.0, -1.0), torch.arange(5.0, 40.0, 2.0)]  # out of range,
        coords = torch.stack(torch.meshgrid(*axes, indexing="ij"))[None].double()  # flipped, strided
        grid = coords_to_grid(coords, (24, 40, 30))
        ref_low = low.detach().clone().requires_grad_(True)
        ref = F.grid_sample(ref_low, grid, mode="bilinear", padding_mode="border", align_corners=False)
        got = sample_guide(low, grid)
        torch.testing.assert_close(got, ref, rtol=0, atol=1e-12)
        weights = torch.rand_like(ref)
        (got * weights).sum().backward()
        (ref * weights).sum().backward()
        torch.testing.assert_close(low.grad, ref_low.grad, rtol=0, atol=1e-12)
        rotated = grid.transpose(1, 2).contiguous()  # x and y swapped: not separable per axis
        with mock.patch("guidino_monai.networks.blocks.guide.F.grid_sample", wraps=F.grid_sample) as spy:
            sample_guide(low, rotated)
            sample_guide(low, grid)
        self.assertEqual(spy.call_count, 1)

    def test_bf16_autocast_matches_reference(self):
        """Under bf16 autocast (as on GPU), the cached path's training outputs stay within bf16 tolerance of the
        reference path (whole-volume guide resampled, cropped, given to the network) run in fp32."""
        torch.manual_seed(0)
        net = make(3).train()
        vol = torch.rand(1, 1, 24, 40, 20)
        with torch.no_grad():
            tokens = net.guide.encode(vol)
            full = resample_guide(net.guide.tokens_to_guide(tokens, 1), vol.shape[2:])
        d = AddCoordinatesd("image")({"image": vol[0]})
        sl = (slice(5, 21), slice(9, 33), slice(7, 15))
        grid = coords_to_grid(d["coords"][(slice(None), *sl)][None], d["coords_source_shape"].tolist())
        x = vol[(slice(None), slice(None), *sl)]
        with torch.no_grad():
            ref_logits, ref_guide = net(x, guide=full[(slice(None), slice(None), *sl)])
            with torch.autocast("cpu", dtype=torch.bfloat16):
                logits, guide = net(x, tokens=[tokens.half()], grid=grid)  # fp16 cache, bf16 compute
        self.assertEqual(logits.dtype, torch.bfloat16)
        torch.testing.assert_close(guide.float(), ref_guide, rtol=0, atol=1e-2)
        rel = float((logits.float() - ref_logits).norm() / ref_logits.norm())
        self.assertLess(rel, 3e-2)

    def test_prepare_batch_runs_vit_once_per_volume(self):
        torch.manual_seed(0)
        net = make(3)
        rs = np.random.RandomState(0)
        vols = [rs.rand(20, 30, 12).astype(np.float32) for _ in range(3)]
        with tempfile.TemporaryDirectory() as d:
            data = []  # MONAI-Label-style items: file paths only, no case_id
            for i, v in enumerate(vols):
                item = {"image": os.path.join(d, f"image{i}.nii.gz"), "label": os.path.join(d, f"label{i}.nii.gz")}
                nib.save(nib.Nifti1Image(v, np.eye(4)), item["image"])
                nib.save(nib.Nifti1Image(np.zeros_like(v), np.eye(4)), item["label"])
                data.append(item)
            transform = Compose([
                LoadImaged(["image", "label"], image_only=True), EnsureChannelFirstd(["image", "label"]),
                AddCoordinatesd("image"),
                SpatialPadWithCoordinatesd(keys=["image", "label"], spatial_size=(16, 24, 8)),
                RandSpatialCropd(keys=["image", "label", "coords"], roi_size=(16, 24, 8), random_size=False),
                RandFlipd(keys=["image", "label", "coords"], prob=0.5, spatial_axis=1),
            ])  # fmt: skip
            ds = CacheDataset(data, transform, progress=False)
            loader = DataLoader(ds, batch_size=2, shuffle=False, num_workers=0)
            prep = CachedGuidePrepareBatch(net, ds)
            calls = []
            hook = net.guide.backbone.patch_embed.register_forward_hook(lambda *a: calls.append(1))  # per ViT call
            with torch.no_grad():  # the reference: each volume as written, through the whole-volume guide
                refs = {data[i]["image"]: resample_guide(net.guide(torch.from_numpy(v)[None, None]), v.shape)[0, 0]
                        for i, v in enumerate(vols)}  # fmt: skip
                arrays = {data[i]["image"]: torch.from_numpy(v) for i, v in enumerate(vols)}
            n_ref = len(calls)
            for _ in range(2):
                for batch in loader:
                    image, label, args, kwargs = prep(batch, torch.device("cpu"))
                    self.assertEqual(set(kwargs), {"tokens", "grid"})
                    logits, guide = net.train()(image, **kwargs)
                    self.assertEqual(guide.shape, (image.shape[0], 1, 16, 24, 8))
                    for i, path in enumerate(batch["image"].meta["filename_or_obj"]):
                        idx = batch["coords"][i].long()
                        # the coordinates point at the crop's voxels in the file ...
                        torch.testing.assert_close(image[i, 0], arrays[path][idx[0], idx[1], idx[2]])
                        # ... and each sample's guide is the whole-volume guide there
                        ref = refs[path][idx[0], idx[1], idx[2]]
                        torch.testing.assert_close(guide[i, 0], ref, rtol=1e-2, atol=2e-3)  # fp16 token cache
            hook.remove()
        self.assertEqual(len(prep.tokens), 3)
        self.assertEqual(len(calls) - n_ref, 3)  # 3 volumes encoded once each over 2 epochs

    def test_fallbacks(self):
        net = make(3, lora_rank=2)
        prep = CachedGuidePrepareBatch(net, dataset=None)
        batch = {"image": torch.rand(1, 1, 8, 8, 8), "label": torch.zeros(1, 1, 8, 8, 8), "coords": torch.zeros(1)}
        self.assertEqual(len(prep(batch)), 2, "LoRA trains the ViT: no cache")
        plain = make(3, use_guide=False)
        self.assertEqual(len(CachedGuidePrepareBatch(plain, None)(batch)), 2)
        self.assertEqual(len(CachedGuidePrepareBatch(make(3), None, enabled=False)(batch)), 2)


if __name__ == "__main__":
    unittest.main()
