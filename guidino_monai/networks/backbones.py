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

"""Guide backbones: DINOv2 / DINOv3 ViTs from timm, local weight loading, freezing and LoRA adapters.

Nothing here downloads anything: weights come only from a local file or folder that the caller names.
"""

from __future__ import annotations

import importlib
import json
import logging
import os
import pickle
import re
import warnings
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

__all__ = [
    "DEFAULT_GUIDE_BACKBONE",
    "SUPPORTED_GUIDE_BACKBONES",
    "LORA_TARGET_MODULES",
    "GuideWeightsError",
    "create_guide_backbone",
    "load_guide_weights",
    "read_state_dict",
    "is_hf_dinov3_state",
    "convert_hf_dinov3_state",
    "apply_lora",
    "lora_state_dict",
    "save_lora_adapters",
    "load_lora_adapters",
]

logger = logging.getLogger(__name__)

#: timm model names accepted as guide backbones.
SUPPORTED_GUIDE_BACKBONES = (
    "vit_small_patch14_dinov2",
    "vit_base_patch14_dinov2",
    "vit_large_patch14_dinov2",
    "vit_small_patch14_reg4_dinov2",
    "vit_base_patch14_reg4_dinov2",
    "vit_large_patch14_reg4_dinov2",
    "vit_small_patch16_dinov3",
    "vit_base_patch16_dinov3",
    "vit_large_patch16_dinov3",
)

#: LoRA targets: attention and MLP linears of the transformer blocks only. Anchored on ``blocks.N.`` so that the
#: Conv2d ``patch_embed.proj`` is never matched (a plain ``["qkv", "proj", ...]`` list would hit it, see peft's
#: suffix matching). Covers timm's ViT (DINOv2) and Eva (DINOv3, incl. SwiGLU ``fc1_g``/``fc1_x``) layouts.
LORA_TARGET_MODULES = r".*blocks\.\d+\.(attn\.(qkv|q_proj|k_proj|v_proj|proj)|mlp\.(fc1|fc2|fc1_g|fc1_x))"

_WEIGHT_FILES_IN_FOLDER = ("model.safetensors", "pytorch_model.bin", "open_clip_pytorch_model.bin", "model.pth")


class GuideWeightsError(ValueError):
    """A guide weight file is missing, unreadable, unsafe, or does not match the backbone."""


def _check_name(name: str) -> None:
    if name not in SUPPORTED_GUIDE_BACKBONES:
        raise ValueError(f"unsupported guide backbone {name!r}; choose one of {', '.join(SUPPORTED_GUIDE_BACKBONES)}.")


def read_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Read a state dict from a local file or model folder, without executing code.

    ``.safetensors`` files are read with safetensors; anything else with ``torch.load(weights_only=True)``, so a
    pickle that needs code to unpickle is refused. A folder (a timm / Hugging Face hub snapshot) is searched for
    ``model.safetensors`` then ``pytorch_model.bin``.

    Raises:
        FileNotFoundError: when ``path`` does not exist.
        GuideWeightsError: when the file is truncated/corrupt, is an unsafe pickle, or holds no tensors.
    """
    path = Path(path).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"guide weight file {str(path)!r} does not exist.")
    if path.is_dir():
        for fname in _WEIGHT_FILES_IN_FOLDER:
            if (path / fname).is_file():
                path = path / fname
                break
        else:
            raise GuideWeightsError(
                f"model folder {str(path)!r} holds none of {', '.join(_WEIGHT_FILES_IN_FOLDER)}; name the weight file."
            )
    if path.suffix == ".safetensors":
        try:
            from safetensors.torch import load_file

            state = load_file(str(path), device="cpu")
        except Exception as e:  # safetensors raises SafetensorError / OSError on a damaged file
            raise GuideWeightsError(f"cannot read safetensors file {str(path)!r}: {e}") from e
    else:
        try:
            state = torch.load(str(path), map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as e:
            raise GuideWeightsError(
                f"refused to load {str(path)!r}: it is a pickle that needs code to load (weights_only=True rejects"
                f" it). Only plain tensor checkpoints are accepted; convert it with a trusted tool first. ({e})"
            ) from e
        except (RuntimeError, EOFError, zipfile.BadZipFile, OSError) as e:
            raise GuideWeightsError(f"cannot read checkpoint {str(path)!r} (truncated or corrupt?): {e}") from e
    state = _unwrap_state(state, str(path))
    return state


def _unwrap_state(state: Any, where: str) -> dict[str, torch.Tensor]:
    """Unwrap common checkpoint containers and strip wrapper prefixes."""
    if not isinstance(state, Mapping):
        raise GuideWeightsError(f"{where!r} holds a {type(state).__name__}, not a state dict.")
    for key in ("teacher", "model", "state_dict", "model_state_dict"):  # DINOv2 train ckpt, timm, lightning, ...
        inner = state.get(key)
        if isinstance(inner, Mapping) and any(isinstance(v, torch.Tensor) for v in inner.values()):
            state = inner
            break
    state = {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}
    if not state:
        raise GuideWeightsError(f"{where!r} holds no tensors.")
    for prefix in ("module.", "backbone.", "_orig_mod."):
        if all(k.startswith(prefix) for k in state):
            state = {k[len(prefix) :]: v for k, v in state.items()}
    return state


def load_guide_weights(model: nn.Module, path: str | os.PathLike) -> nn.Module:
    """Load local DINOv2/DINOv3 weights into a timm guide backbone, strictly.

    Accepts Meta's original checkpoints (``dinov2_vits14_pretrain.pth``, ``dinov3_vits16_pretrain_lvd1689m-*.pth``),
    timm ``.safetensors`` / ``.pth`` files, a timm hub model folder, and the Hugging Face ``transformers`` layout of
    DINOv3 (``facebook/dinov3-vits16-pretrain-lvd1689m``: ``model.safetensors`` with ``embeddings.*`` /
    ``layer.N.*`` keys, mapped by :func:`convert_hf_dinov3_state`). Meta's key layout is mapped to timm's by timm's own
    ``checkpoint_filter_fn`` of the model's module (which also resamples position embeddings to the model's grid).

    Raises:
        FileNotFoundError: when ``path`` does not exist.
        GuideWeightsError: unreadable file, unsafe pickle, or missing / unexpected / mis-shaped keys (named).
    """
    state = read_state_dict(path)
    if is_hf_dinov3_state(state):
        state = convert_hf_dinov3_state(state, model, where=str(path))
    module = importlib.import_module(type(model).__module__)
    filter_fn = getattr(module, "checkpoint_filter_fn", None)
    if filter_fn is not None:
        try:
            state = filter_fn(state, model)
        except Exception as e:
            raise GuideWeightsError(f"cannot map {str(path)!r} onto {type(model).__name__}: {e}") from e
    if isinstance(getattr(model, "head", None), nn.Identity):
        state = {k: v for k, v in state.items() if not k.startswith("head.")}  # classifier heads are not used
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    mismatched = [
        f"{k}: file {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
        for k in sorted(set(own) & set(state))
        if state[k].shape != own[k].shape
    ]
    if missing or unexpected or mismatched:
        parts = []
        if missing:
            parts.append(f"missing keys: {_names(missing)}")
        if unexpected:
            parts.append(f"unexpected keys: {_names(unexpected)}")
        if mismatched:
            parts.append(f"shape mismatches: {_names(mismatched)}")
        raise GuideWeightsError(
            f"weights in {str(path)!r} do not match {type(model).__name__} "
            f"({getattr(model, 'default_cfg', {}).get('architecture', '?')}); " + "; ".join(parts)
        )
    model.load_state_dict(state, strict=True)
    logger.info("guide backbone weights loaded from %s", path)
    return model


_HF_DINOV3_BLOCK = re.compile(r"^(?:model\.)?layer\.(\d+)\.(.+)$")
_HF_DINOV3_RENAMES = (
    ("attention.o_proj.", "attn.proj."),
    ("layer_scale1.lambda1", "gamma_1"),
    ("layer_scale2.lambda1", "gamma_2"),
    ("mlp.down_proj.", "mlp.fc2."),
)


def is_hf_dinov3_state(state: Mapping[str, torch.Tensor]) -> bool:
    """Whether a state dict has the Hugging Face ``transformers`` DINOv3 layout (``DINOv3ViTModel``)."""
    return "embeddings.patch_embeddings.weight" in state and any(
        _HF_DINOV3_BLOCK.match(k) and "layer_scale1" in k for k in state
    )


def convert_hf_dinov3_state(
    state: Mapping[str, torch.Tensor], model: nn.Module, where: str = "state dict"
) -> dict[str, torch.Tensor]:
    """Map a Hugging Face ``DINOv3ViTModel`` state dict onto timm's DINOv3 ``Eva`` keys.

    ``embeddings.{cls_token,register_tokens,patch_embeddings}`` -> ``cls_token``, ``reg_token``, ``patch_embed.proj``;
    per block ``attention.{q,k,v}_proj`` -> ``attn.qkv`` (concatenated), ``attention.o_proj`` -> ``attn.proj``,
    ``layer_scale{1,2}.lambda1`` -> ``gamma_{1,2}``, ``mlp.{up,down}_proj`` -> ``mlp.fc{1,2}`` (gated MLPs:
    ``gate_proj``/``up_proj`` -> ``fc1_g``/``fc1_x``); ``norm`` stays. The pre-training ``mask_token`` is dropped.
    Query/value biases go to the model's ``q_bias``/``v_bias`` where it has them; where it has none (timm's
    ``vit_*_patch16_dinov3``, whose released biases are zero) they must be zero.

    Raises:
        GuideWeightsError: non-zero attention biases the model cannot hold, or an incomplete q/k/v triple (named).
    """
    own = set(model.state_dict())
    out: dict[str, torch.Tensor] = {}
    qkv: dict[str, dict[str, torch.Tensor]] = {}
    gated = any(k.endswith("mlp.gate_proj.weight") for k in state)
    for k, v in state.items():
        if k.startswith("embeddings."):
            name = k[len("embeddings.") :]
            if name == "mask_token":
                continue
            name = {"register_tokens": "reg_token"}.get(name, name)
            out[name.replace("patch_embeddings.", "patch_embed.proj.")] = v
            continue
        m = _HF_DINOV3_BLOCK.match(k)
        if m is None:
            out[k] = v  # norm.*
            continue
        i, rest = m.group(1), m.group(2)
        prefix = f"blocks.{i}."
        if rest.startswith("attention.") and rest.split(".")[1] in ("q_proj", "k_proj", "v_proj"):
            qkv.setdefault(i, {})[rest[len("attention.") :]] = v
            continue
        if gated:
            rest = rest.replace("mlp.gate_proj.", "mlp.fc1_g.").replace("mlp.up_proj.", "mlp.fc1_x.")
        else:
            rest = rest.replace("mlp.up_proj.", "mlp.fc1.")
        for a, b in _HF_DINOV3_RENAMES:
            rest = rest.replace(a, b)
        out[prefix + rest] = v
    for i, parts in qkv.items():
        prefix = f"blocks.{i}.attn."
        try:
            weights = [parts[f"{n}_proj.weight"] for n in "qkv"]
        except KeyError as e:
            raise GuideWeightsError(f"{where!r}: block {i} lacks attention weight {e.args[0]}.") from None
        if f"{prefix}qkv.weight" in own:
            out[f"{prefix}qkv.weight"] = torch.cat(weights)
        else:  # models built without a fused qkv
            for n, w in zip("qkv", weights):
                out[f"{prefix}{n}_proj.weight"] = w
        for n in "qv":
            b = parts.get(f"{n}_proj.bias")
            if b is None:
                continue
            target = f"{prefix}{n}_bias" if f"{prefix}{n}_bias" in own else f"{prefix}{n}_proj.bias"
            if target in own:
                out[target] = b
            elif bool(b.abs().max() > 0):
                raise GuideWeightsError(
                    f"{where!r}: block {i} has a non-zero {n}_proj bias, but the backbone has no attention bias;"
                    " use the '_qkvb' variant of the timm model."
                )
        if parts.get("k_proj.bias") is not None and bool(parts["k_proj.bias"].abs().max() > 0):
            raise GuideWeightsError(f"{where!r}: block {i} has a non-zero k_proj bias, which DINOv3 fixes at 0.")
    return out


def _names(keys: list[str], limit: int = 12) -> str:
    more = f" (+{len(keys) - limit} more)" if len(keys) > limit else ""
    return ", ".join(keys[:limit]) + more


#: the paper's guide backbone (GuiDINO uses DINOv3 ViT-S/16, 4 register tokens)
DEFAULT_GUIDE_BACKBONE = "vit_small_patch16_dinov3"


def create_guide_backbone(
    name: str = DEFAULT_GUIDE_BACKBONE,
    pretrained_weights: str | os.PathLike | None = None,
    lora_rank: int = 0,
    lora_alpha: float | None = None,
    lora_dropout: float = 0.0,
    freeze: bool = True,
    **timm_kwargs: Any,
) -> nn.Module:
    """Create a DINOv2/DINOv3 ViT guide backbone with timm, from local weights only.

    Args:
        name: a timm model name from :data:`SUPPORTED_GUIDE_BACKBONES`. Defaults to the paper's DINOv3 ViT-S/16
            (``"vit_small_patch16_dinov3"``); the DINOv2 ViTs (``"vit_small_patch14_dinov2"``, ...) remain options.
        pretrained_weights: local weight file or model folder; ``None`` builds a random-init ViT and warns that the
            guide then carries no foundation-model prior.
        lora_rank: ``> 0`` injects LoRA adapters (peft) into the ViT blocks' attention and MLP linears only.
        lora_alpha: LoRA scaling numerator, defaults to ``2 * lora_rank``.
        lora_dropout: dropout on the LoRA branch.
        freeze: freeze all backbone weights (LoRA adapters, if any, stay trainable).
        timm_kwargs: forwarded to ``timm.create_model`` and merged with the registry defaults, e.g. ``depth=2`` or
            ``img_size=224``. ``num_classes=0`` and ``dynamic_img_size=True`` are set unless given.

    Returns:
        the timm model (``VisionTransformer`` for DINOv2, ``Eva`` for DINOv3).

    Raises:
        ValueError: unsupported name or negative ``lora_rank``.
        FileNotFoundError / GuideWeightsError: see :func:`load_guide_weights`.
    """
    import timm

    _check_name(name)
    if lora_rank < 0:
        raise ValueError(f"lora_rank must be >= 0, got {lora_rank}.")
    timm_kwargs.setdefault("num_classes", 0)
    timm_kwargs.setdefault("dynamic_img_size", True)
    timm_kwargs.pop("pretrained", None)
    model = timm.create_model(name, pretrained=False, **timm_kwargs)
    if pretrained_weights:
        load_guide_weights(model, pretrained_weights)
    else:
        msg = (
            f"guide backbone {name} has random weights (pretrained_weights=None): the guide carries no foundation-model"
            " prior. Pass a local DINOv2/DINOv3 weight file for the real method."
        )
        logger.warning(msg)
        warnings.warn(msg, stacklevel=2)
    model.guide_pretrained = bool(pretrained_weights)
    if freeze:
        model.requires_grad_(False)
    if lora_rank > 0:
        apply_lora(model, rank=lora_rank, alpha=lora_alpha, dropout=lora_dropout)
    return model


def apply_lora(
    model: nn.Module,
    rank: int = 8,
    alpha: float | None = None,
    dropout: float = 0.0,
    target_modules: str = LORA_TARGET_MODULES,
) -> nn.Module:
    """Inject LoRA adapters in place with peft's low-level API; only adapter weights are left trainable.

    ``model`` must be the ViT alone: peft freezes every non-adapter parameter of the module it is given.
    """
    from peft import LoraConfig, inject_adapter_in_model

    if rank <= 0:
        raise ValueError(f"LoRA rank must be > 0, got {rank}.")
    alpha = float(2 * rank if alpha is None else alpha)
    config = LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=dropout, target_modules=target_modules)
    inject_adapter_in_model(config, model)
    model.guide_lora = {"rank": rank, "alpha": alpha, "dropout": dropout, "target_modules": target_modules}
    if isinstance(getattr(model, "patch_embed", None), nn.Module):
        if any("lora_" in n for n, _ in model.patch_embed.named_parameters()):
            raise RuntimeError("LoRA reached patch_embed; the target regex is wrong.")
    return model


def _lora_host(module: nn.Module) -> tuple[str, nn.Module]:
    """Find the (single) module that carries injected LoRA adapters: the module itself or a child."""
    hosts = [(n, m) for n, m in module.named_modules() if hasattr(m, "guide_lora")]
    if not hosts:
        raise ValueError(f"{type(module).__name__} carries no LoRA adapters (build it with lora_rank > 0).")
    return hosts[0]


def lora_state_dict(module: nn.Module) -> dict[str, torch.Tensor]:
    """The LoRA adapter weights only (keys relative to the ViT), from a ViT or a network that contains one."""
    from peft import get_peft_model_state_dict

    _, host = _lora_host(module)
    return {k: v.detach().cpu().contiguous() for k, v in get_peft_model_state_dict(host).items()}


def save_lora_adapters(module: nn.Module, path: str | os.PathLike) -> Path:
    """Save only the LoRA adapters (a few hundred KB) to a ``.safetensors`` file with their config as metadata."""
    from safetensors.torch import save_file

    _, host = _lora_host(module)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(lora_state_dict(host), str(path), metadata={"guide_lora": json.dumps(host.guide_lora)})
    return path


def load_lora_adapters(module: nn.Module, path: str | os.PathLike) -> nn.Module:
    """Load adapters saved by :func:`save_lora_adapters` into a ViT (or network) built with the same LoRA rank.

    Raises:
        FileNotFoundError: missing file.
        GuideWeightsError: unreadable file, rank mismatch, or adapter keys that do not fit (named).
    """
    from peft import set_peft_model_state_dict
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"LoRA adapter file {str(path)!r} does not exist.")
    state = read_state_dict(path)
    with safe_open(str(path), framework="pt") as f:
        meta = json.loads((f.metadata() or {}).get("guide_lora", "{}"))
    _, host = _lora_host(module)
    if meta and meta.get("rank") != host.guide_lora["rank"]:
        raise GuideWeightsError(
            f"LoRA adapters in {str(path)!r} have rank {meta.get('rank')}, the network {host.guide_lora['rank']}."
        )
    expected = set(lora_state_dict(host))
    unexpected, missing = sorted(set(state) - expected), sorted(expected - set(state))
    if unexpected or missing:
        raise GuideWeightsError(
            f"LoRA adapters in {str(path)!r} do not fit: missing {_names(missing)}; unexpected {_names(unexpected)}."
        )
    try:
        set_peft_model_state_dict(host, state)
    except RuntimeError as e:
        raise GuideWeightsError(f"LoRA adapters in {str(path)!r} do not fit: {e}") from e
    return module
