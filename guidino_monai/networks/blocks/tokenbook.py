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

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ["TokenBook"]


class TokenBook(nn.Module):
    """Prototype book that turns a ViT token map into a guide mask in [0, 1].

    Token map ``(B, E, *grid)`` -> 1x1 projection to ``proj_channels`` -> cosine similarity with ``num_prototypes``
    learned prototypes -> mean over prototypes -> ``(sim + 1) / 2``, giving ``(B, 1, *grid)``. Works on any number of
    grid dims. Options from GuiDINO ("Rethinking Vision Foundation Model in Medical Image Segmentation", 2026):

    - ``ema_momentum``: keep an exponential moving average of the prototypes during training and use it at eval. The
      average takes one step per optimizer update of the prototypes (however many times ``forward`` runs in between,
      e.g. once per sample on the cached-token path): the first training ``forward`` after an update, or the switch to
      ``eval()``, folds the new prototypes in;
    - ``sim_dropout``: during training drop whole prototype similarity maps with this probability (at least one kept);
    - ``token_sample_rate``: during training only this fraction of token positions carries gradient.

    Extra per-image prototypes (for click-based correction) can be given to :meth:`forward` as raw token vectors:
    ``positive`` ones join the learned prototypes in the mean; the guide is suppressed where a token is more similar to
    a ``negative`` one than to the positives.

    Args:
        in_channels: token embedding size ``E``.
        num_prototypes: number of learned prototypes ``N``. Defaults to ``8``.
        proj_channels: size of the 1x1 projection. Defaults to ``128``.
        ema_momentum: prototype EMA momentum in ``[0, 1)``, ``None`` disables EMA. Defaults to ``None``.
        sim_dropout: probability of dropping a prototype's similarity map in training. Defaults to ``0.0``.
        token_sample_rate: fraction of token positions that receive gradient in training. Defaults to ``1.0``.

    Raises:
        ValueError: on out-of-range arguments.

    Example::

        >>> book = TokenBook(in_channels=384, num_prototypes=8)
        >>> book(torch.randn(2, 384, 8, 8)).shape
        torch.Size([2, 1, 8, 8])
    """

    def __init__(
        self,
        in_channels: int,
        num_prototypes: int = 8,
        proj_channels: int = 128,
        ema_momentum: float | None = None,
        sim_dropout: float = 0.0,
        token_sample_rate: float = 1.0,
    ) -> None:
        super().__init__()
        if in_channels < 1 or num_prototypes < 1 or proj_channels < 1:
            raise ValueError("in_channels, num_prototypes and proj_channels must be >= 1.")
        if ema_momentum is not None and not 0.0 <= ema_momentum < 1.0:
            raise ValueError(f"ema_momentum must be in [0, 1) or None, got {ema_momentum}.")
        if not 0.0 <= sim_dropout < 1.0:
            raise ValueError(f"sim_dropout must be in [0, 1), got {sim_dropout}.")
        if not 0.0 < token_sample_rate <= 1.0:
            raise ValueError(f"token_sample_rate must be in (0, 1], got {token_sample_rate}.")
        self.in_channels = in_channels
        self.num_prototypes = num_prototypes
        self.sim_dropout = sim_dropout
        self.token_sample_rate = token_sample_rate
        self.use_ema = ema_momentum is not None
        self.ema_momentum = 0.0 if ema_momentum is None else float(ema_momentum)
        self.proj = nn.Linear(in_channels, proj_channels)
        self.prototypes = nn.Parameter(torch.randn(num_prototypes, proj_channels) / proj_channels**0.5)
        self.register_buffer("ema_prototypes", self.prototypes.detach().clone(), persistent=self.use_ema)
        self._ema_seen = self.prototypes._version  # parameter version last folded into the EMA
        self.register_load_state_dict_post_hook(_reset_ema_version)

    def update_ema(self) -> bool:
        """Fold the prototypes into their EMA once per optimizer update (a no-op when they have not changed since
        the last call, or without EMA). Returns whether it stepped."""
        version = self.prototypes._version
        if not self.use_ema or version == self._ema_seen:
            return False
        with torch.no_grad():
            self.ema_prototypes.mul_(self.ema_momentum).add_(self.prototypes.detach(), alpha=1 - self.ema_momentum)
        self._ema_seen = version
        return True

    def train(self, mode: bool = True) -> TokenBook:
        if self.training and not mode:
            self.update_ema()  # the last optimizer step counts before the EMA prototypes are used
        return super().train(mode)

    def project(self, tokens: torch.Tensor) -> torch.Tensor:
        """``(B, E, L)`` or ``(K, E)`` raw tokens -> L2-normalised projected tokens ``(B, L, P)`` / ``(K, P)``."""
        if tokens.ndim == 3:
            tokens = tokens.transpose(1, 2)
        return F.normalize(self.proj(tokens), dim=-1)

    def current_prototypes(self) -> torch.Tensor:
        """The prototypes in use: the EMA copy at eval when EMA is on, else the learned ones (normalised)."""
        protos = self.ema_prototypes if (self.use_ema and not self.training) else self.prototypes
        return F.normalize(protos, dim=-1)

    def forward(
        self, tokens: torch.Tensor, positive: torch.Tensor | None = None, negative: torch.Tensor | None = None
    ) -> torch.Tensor:
        """
        Args:
            tokens: token map ``(B, E, *grid)``.
            positive: optional extra prototypes as raw tokens, ``(K, E)`` shared or ``(B, K, E)`` per sample.
            negative: optional negative prototypes as raw tokens, same layout.

        Returns:
            guide mask ``(B, 1, *grid)`` in ``[0, 1]``.
        """
        if tokens.ndim < 3 or tokens.shape[1] != self.in_channels:
            raise ValueError(f"expected tokens (B, {self.in_channels}, *grid), got {tuple(tokens.shape)}.")
        b, grid = tokens.shape[0], tokens.shape[2:]
        t = self.project(tokens.flatten(2))  # (B, L, P)
        if self.training and self.token_sample_rate < 1.0:
            keep = torch.rand(b, t.shape[1], 1, device=t.device) < self.token_sample_rate
            t = torch.where(keep, t, t.detach())
        protos = self.current_prototypes().to(t.dtype)
        sim = torch.einsum("blp,np->bln", t, protos)  # (B, L, N)
        if self.training and self.sim_dropout > 0.0:
            keep = (torch.rand(b, 1, sim.shape[-1], device=sim.device) >= self.sim_dropout).to(sim.dtype)
            keep[..., 0] = torch.where(keep.sum(-1) == 0, torch.ones_like(keep[..., 0]), keep[..., 0])
            score = (sim * keep).sum(-1) / keep.sum(-1)
        else:
            score = sim.mean(-1)
        if positive is not None:
            pos = self._extra(positive, b, t.dtype)
            # the learned book counts as one vote per prototype; each click prototype as one more
            n = sim.shape[-1]
            score = (score * n + torch.einsum("blp,bkp->blk", t, pos).sum(-1)) / (n + pos.shape[1])
        guide = (score + 1.0) / 2.0
        if negative is not None:
            neg = self._extra(negative, b, t.dtype)
            neg_sim = torch.einsum("blp,bkp->blk", t, neg).amax(-1)
            ref = score if positive is None else torch.einsum("blp,bkp->blk", t, pos).amax(-1)
            guide = guide * torch.sigmoid((ref - neg_sim) * 10.0)
        if self.training:
            self.update_ema()
        return guide.reshape(b, 1, *grid)

    def _extra(self, extra: torch.Tensor, batch: int, dtype: torch.dtype) -> torch.Tensor:
        if extra.ndim == 2:
            extra = extra.unsqueeze(0).expand(batch, -1, -1)
        if extra.ndim != 3 or extra.shape[0] != batch or extra.shape[-1] != self.in_channels:
            raise ValueError(f"extra prototypes must be (K, {self.in_channels}) or (B, K, {self.in_channels}).")
        return self.project(extra.transpose(1, 2)).to(dtype)


def _reset_ema_version(module: TokenBook, incompatible_keys: object) -> None:
    """Loading a state dict is no optimizer update: the loaded EMA stays as loaded."""
    module._ema_seen = module.prototypes._version
