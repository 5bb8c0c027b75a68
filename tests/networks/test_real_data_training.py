"""A short CPU training run on real MSD hippocampus MRI: the loss falls and the guide learns the foreground."""

from __future__ import annotations

import time
import unittest

import nibabel as nib
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from testing_utils import HIPPOCAMPUS_DIR, NO_HIPPOCAMPUS, SMALL_VIT, quiet_random_init_warning

from guidino_monai.losses import GuidedDiceCELoss
from guidino_monai.networks import GuidedSegResNet

quiet_random_init_warning()
pytestmark = pytest.mark.slow  # real-data training: runs in CI, deselect locally with -m "not slow"


def load_cases(n: int, size=(40, 56, 40)) -> tuple[torch.Tensor, torch.Tensor]:
    files = sorted((HIPPOCAMPUS_DIR / "imagesTr").glob("hippocampus_*.nii.gz"))[:n]
    images, labels = [], []
    for f in files:
        img = nib.load(str(f)).get_fdata(dtype=np.float32)
        lab = nib.load(str(HIPPOCAMPUS_DIR / "labelsTr" / f.name)).get_fdata(dtype=np.float32)
        img = (img - img.mean()) / (img.std() + 1e-6)
        pad = [(0, max(0, s - d)) for s, d in zip(size, img.shape)]
        img, lab = np.pad(img, pad)[: size[0], : size[1], : size[2]], np.pad(lab, pad)[: size[0], : size[1], : size[2]]
        images.append(img)
        labels.append(lab)
    return torch.from_numpy(np.stack(images))[:, None], torch.from_numpy(np.stack(labels))[:, None]


def guide_fg_correlation(guide: torch.Tensor, label: torch.Tensor) -> float:
    fg = F.adaptive_avg_pool3d((label > 0).float(), guide.shape[2:])
    g, f = guide.flatten().double(), fg.flatten().double()
    return float(torch.corrcoef(torch.stack([g, f]))[0, 1])


@unittest.skipUnless(HIPPOCAMPUS_DIR.is_dir(), NO_HIPPOCAMPUS)
class TestRealDataTraining(unittest.TestCase):
    def test_loss_falls_and_guide_learns_foreground(self):
        torch.manual_seed(0)
        images, labels = load_cases(6)
        net = GuidedSegResNet(
            3, init_filters=8, in_channels=1, out_channels=3, blocks_down=(1, 1, 1, 1), guide_backbone_kwargs=SMALL_VIT,
            gate_at="bottleneck", guide_kwargs={"guide_size": 56, "intensity_scaling": "minmax"},
        )  # fmt: skip
        # soft-Dice guide supervision: the foreground is ~4% of a crop, where MSE first learns the constant
        loss_fn = GuidedDiceCELoss(
            to_onehot_y=True, softmax=True, lambda_guide=1.0, guide_mode="dice", lambda_hinge=0.1
        )
        opt = torch.optim.Adam([p for p in net.parameters() if p.requires_grad], lr=1e-2)
        net.train()
        with torch.no_grad():
            _, guide0 = net(images)
        corr0 = guide_fg_correlation(guide0, labels)
        losses, start = [], time.time()
        for step in range(40):
            idx = torch.tensor([step % 6, (step + 3) % 6])
            opt.zero_grad()
            loss = loss_fn(net(images[idx]), labels[idx])
            loss.backward()
            opt.step()
            losses.append(float(loss))
        with torch.no_grad():
            _, guide1 = net(images)
        corr1 = guide_fg_correlation(guide1, labels)
        elapsed = time.time() - start
        print(f"loss {np.mean(losses[:4]):.3f} -> {np.mean(losses[-4:]):.3f}; guide/fg corr {corr0:.3f} -> {corr1:.3f}"
              f"; {elapsed:.1f} s")  # fmt: skip
        self.assertLess(np.mean(losses[-4:]), 0.8 * np.mean(losses[:4]))
        self.assertGreater(corr1, corr0 + 0.15)
        self.assertGreater(corr1, 0.2)


if __name__ == "__main__":
    unittest.main()
