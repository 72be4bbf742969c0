"""Wan2.1's image encoder: the open-clip XLM-RoBERTa ViT-H/14 vision tower (SPEC.md section 3).

* original: ``models_clip_open-clip-xlm-roberta-large-vit-huge-14.pth`` (keys ``visual.*``; ``textual.*``,
  ``log_scale`` and ``visual.head`` are ignored), renamed onto ``transformers.CLIPVisionModel`` by the key map
  of SPEC.md section 3 (with its inverse);
* Diffusers: ``image_encoder/`` through ``from_pretrained`` (a ``visual_projection`` there is ignored).

The head count is not stored in the original file: ``config["num_heads"]`` or width / 80 (ViT-H/14).
Running the tower the way Wan does (whole image, bicubic 224, penultimate states) is the pipeline's job:
:mod:`flashportrait.reference_image`.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from .common import (
    CheckpointError,
    PathLike,
    check_then_load,
    config_dict,
    empty_model,
    layer_indices,
    load_transformers_folder,
    read_state_dict,
    require_key,
    to_device,
)

__all__ = [
    "CLIP_VIT_H_14",
    "convert_clip_original_to_transformers",
    "convert_clip_transformers_to_original",
    "clip_config_from_state_dict",
    "load_clip_vision",
]

#: open-clip XLM-RoBERTa ViT-H/14 vision tower as in Wan's ``clip_xlm_roberta_vit_h_14`` (wan/modules/clip.py)

CLIP_VIT_H_14: dict[str, Any] = dict(
    image_size=224,
    patch_size=14,
    dim=1280,
    num_heads=16,
    num_layers=32,
    mlp_ratio=4,
    activation="gelu",
)
#: head width of ViT-H/14 (1280 / 16); used to infer the head count when ``config`` does not give it
CLIP_HEAD_DIM = 80

#: keys of the original CLIP file that the vision tower does not use (text tower, logit scale, projection)
_CLIP_IGNORED = re.compile(r"^(log_scale$|textual\.|visual\.head($|\.))")
#: keys a Diffusers ``image_encoder/`` may hold beyond ``CLIPVisionModel`` (it is often saved as
#: ``CLIPVisionModelWithProjection``); the projection is not used for the penultimate hidden states
_CLIP_HF_IGNORED = re.compile(r"^(vision_model\.)?visual_projection\.")


_CLIP_LAYER_MAP = (
    ("norm1.weight", "layer_norm1.weight"),
    ("norm1.bias", "layer_norm1.bias"),
    ("norm2.weight", "layer_norm2.weight"),
    ("norm2.bias", "layer_norm2.bias"),
    ("attn.proj.weight", "self_attn.out_proj.weight"),
    ("attn.proj.bias", "self_attn.out_proj.bias"),
    ("mlp.0.weight", "mlp.fc1.weight"),
    ("mlp.0.bias", "mlp.fc1.bias"),
    ("mlp.2.weight", "mlp.fc2.weight"),
    ("mlp.2.bias", "mlp.fc2.bias"),
)
_CLIP_TO_HF = dict(_CLIP_LAYER_MAP)
_CLIP_TO_ORIG = {v: k for k, v in _CLIP_LAYER_MAP}
_CLIP_TOP_MAP = (
    ("visual.patch_embedding.weight", "embeddings.patch_embedding.weight"),
    ("visual.pre_norm.weight", "pre_layrnorm.weight"),
    ("visual.pre_norm.bias", "pre_layrnorm.bias"),
    ("visual.post_norm.weight", "post_layernorm.weight"),
    ("visual.post_norm.bias", "post_layernorm.bias"),
)
_CLIP_TOP_TO_HF = dict(_CLIP_TOP_MAP)
_CLIP_TOP_TO_ORIG = {v: k for k, v in _CLIP_TOP_MAP}
_CLIP_ORIG_LAYER = re.compile(r"^visual\.transformer\.(\d+)\.(.+)$")
_CLIP_HF_LAYER = re.compile(r"^encoder\.layers\.(\d+)\.(.+)$")
_CLIP_HF_QKV = re.compile(r"^encoder\.layers\.(\d+)\.self_attn\.([qkv])_proj\.(weight|bias)$")


def convert_clip_original_to_transformers(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename Wan's CLIP vision tower (``visual.*`` of ``models_clip_open-clip-xlm-roberta-large-vit-huge-14.pth``)
    onto ``transformers.CLIPVisionModel`` (transformers 5 keys, no ``vision_model.`` prefix).

    Key map (SPEC.md section 3): ``patch_embedding`` -> ``embeddings.patch_embedding`` (no bias);
    ``cls_embedding`` [1, 1, C] -> ``embeddings.class_embedding`` [C]; ``pos_embedding`` [1, P, C] ->
    ``embeddings.position_embedding.weight`` [P, C]; ``pre_norm`` -> ``pre_layrnorm``;
    ``transformer.N.norm1/norm2`` -> ``encoder.layers.N.layer_norm1/2``; ``attn.to_qkv`` [3C, C] split in
    three along dim 0 (q, k, v: Wan views the output as [B, L, 3, heads, head_dim]) ->
    ``self_attn.{q,k,v}_proj``; ``attn.proj`` -> ``self_attn.out_proj``; ``mlp.0`` / ``mlp.2`` ->
    ``mlp.fc1`` / ``mlp.fc2``; ``post_norm`` -> ``post_layernorm``. ``log_scale``, ``textual.*`` and
    ``visual.head`` (the contrastive projection) are dropped. Outputs are views (no copy); unknown keys keep
    their name so that a strict load reports them.
    """
    out: dict[str, torch.Tensor] = {}
    for key, value in state_dict.items():
        if _CLIP_IGNORED.match(key):
            continue
        if key == "visual.cls_embedding":
            out["embeddings.class_embedding"] = value.reshape(value.shape[-1])
        elif key == "visual.pos_embedding":
            out["embeddings.position_embedding.weight"] = value.reshape(value.shape[-2], value.shape[-1])
        elif key in _CLIP_TOP_TO_HF:
            out[_CLIP_TOP_TO_HF[key]] = value
        elif (m := _CLIP_ORIG_LAYER.match(key)) and m.group(2) in ("attn.to_qkv.weight", "attn.to_qkv.bias"):
            kind = m.group(2).rsplit(".", 1)[1]
            if value.shape[0] % 3:
                out[key] = value  # reported as unexpected by the strict load
                continue
            for name, part in zip("qkv", value.chunk(3, dim=0), strict=True):
                out[f"encoder.layers.{m.group(1)}.self_attn.{name}_proj.{kind}"] = part
        elif (m := _CLIP_ORIG_LAYER.match(key)) and m.group(2) in _CLIP_TO_HF:
            out[f"encoder.layers.{m.group(1)}.{_CLIP_TO_HF[m.group(2)]}"] = value
        else:
            out[key] = value
    return out


def convert_clip_transformers_to_original(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Inverse of :func:`convert_clip_original_to_transformers` (``visual.*`` only; q, k, v are
    concatenated back into ``to_qkv``; ``visual.head`` / ``textual.*`` / ``log_scale`` are not produced)."""
    out: dict[str, torch.Tensor] = {}
    qkv: dict[tuple[str, str], dict[str, torch.Tensor]] = {}
    for key, value in state_dict.items():
        key = key.removeprefix("vision_model.")
        if key == "embeddings.class_embedding":
            out["visual.cls_embedding"] = value.reshape(1, 1, -1)
        elif key == "embeddings.position_embedding.weight":
            out["visual.pos_embedding"] = value.reshape(1, *value.shape)
        elif key in _CLIP_TOP_TO_ORIG:
            out[_CLIP_TOP_TO_ORIG[key]] = value
        elif m := _CLIP_HF_QKV.match(key):
            qkv.setdefault((m.group(1), m.group(3)), {})[m.group(2)] = value
        elif (m := _CLIP_HF_LAYER.match(key)) and m.group(2) in _CLIP_TO_ORIG:
            out[f"visual.transformer.{m.group(1)}.{_CLIP_TO_ORIG[m.group(2)]}"] = value
        elif key == "embeddings.position_ids":
            continue
        else:
            out[key] = value
    for (layer, kind), parts in qkv.items():
        name = f"visual.transformer.{layer}.attn.to_qkv.{kind}"
        if set(parts) != {"q", "k", "v"}:
            raise CheckpointError(f"layer {layer}: {kind} of q/k/v projections incomplete ({sorted(parts)}).")
        out[name] = torch.cat([parts["q"], parts["k"], parts["v"]], dim=0)
    return out


def clip_config_from_state_dict(
    state_dict: Mapping[str, torch.Tensor], config: Mapping[str, Any] | None = None, source: PathLike = "<state dict>"
):
    """A ``transformers.CLIPVisionConfig`` for Wan's original CLIP file.

    Read from the shapes: hidden size and patch size (``visual.patch_embedding`` [C, 3, p, p]), image size
    (``visual.pos_embedding`` [1, (S/p)^2 + 1, C]), layers (number of ``visual.transformer.N``), MLP width
    (``mlp.0`` [4C, C]). Not stored: the head count, ``config["num_heads"]`` or else C / 80 (ViT-H/14: 16
    heads of 80); the activation, ``config["activation"]`` ("gelu" = exact erf GELU as in Wan, or
    "quick_gelu"), default "gelu". LayerNorm eps 1e-5.

    Raises:
        CheckpointError: not a CLIP vision tower in the original naming, or the head count cannot be inferred.
    """
    from transformers import CLIPVisionConfig

    what = "Wan's CLIP vision tower"
    cfg = config_dict(config)
    patch = require_key(state_dict, "visual.patch_embedding.weight", source, what)
    dim, channels, patch_size = patch.shape[0], patch.shape[1], patch.shape[-1]
    positions = require_key(state_dict, "visual.pos_embedding", source, what).shape[-2]
    grid = round((positions - 1) ** 0.5)
    if grid * grid != positions - 1:
        raise CheckpointError(f"{source}: visual.pos_embedding has {positions} positions, not 1 + a square number.")
    layers = layer_indices(state_dict, "visual.transformer.")
    if not layers:
        raise CheckpointError(f"{source}: no 'visual.transformer.N.*' keys; not Wan's CLIP vision tower.")
    mlp = require_key(state_dict, "visual.transformer.0.mlp.0.weight", source, what).shape[0]
    heads = cfg.get("num_heads")
    if heads is None:
        if dim % CLIP_HEAD_DIM:
            raise CheckpointError(
                f"{source}: the head count of a {dim}-wide CLIP tower is not stored in the file and {dim} is not a "
                f"multiple of ViT-H/14's head width {CLIP_HEAD_DIM}; pass config={{'num_heads': ...}}."
            )
        heads = dim // CLIP_HEAD_DIM
    act = cfg.get("activation", CLIP_VIT_H_14["activation"])
    if act not in ("gelu", "quick_gelu"):
        raise CheckpointError(f"CLIP activation '{act}' is not supported (expected 'gelu' or 'quick_gelu').")
    derived = dict(dim=dim, patch_size=patch_size, image_size=grid * patch_size, num_layers=layers[-1] + 1)
    c = {**derived, **{k: v for k, v in cfg.items() if k in derived}}
    if c["dim"] % int(heads):
        raise CheckpointError(f"{source}: CLIP width {c['dim']} is not divisible by num_heads {heads}.")
    return CLIPVisionConfig(
        hidden_size=int(c["dim"]),
        intermediate_size=int(mlp),
        num_hidden_layers=int(c["num_layers"]),
        num_attention_heads=int(heads),
        num_channels=int(channels),
        image_size=int(c["image_size"]),
        patch_size=int(c["patch_size"]),
        hidden_act=act,
        layer_norm_eps=1e-5,
    )


def load_clip_vision(
    path: PathLike,
    *,
    config: Mapping[str, Any] | None = None,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
):
    """Load Wan2.1's image encoder (open-clip ViT-H/14 vision tower) as ``transformers.CLIPVisionModel``.

    Args:
        path: the original ``models_clip_open-clip-xlm-roberta-large-vit-huge-14.pth`` (keys ``visual.*``;
            ``textual.*``, ``log_scale`` and ``visual.head`` are ignored) or a Diffusers ``image_encoder/``
            folder (a ``visual_projection`` there is ignored too).
        config: original-file only: Wan-naming sizes (``num_heads``, ``activation``, ...), see
            :func:`clip_config_from_state_dict`.
        dtype, device: parameter dtype and device.

    Returns:
        The vision tower (eval mode). Use :func:`flashportrait.reference_image.encode_clip_image` for Wan's image features.

    Raises:
        CheckpointError: missing / unexpected / mis-shaped ``visual.*`` keys, naming the file and keys.
    """
    from transformers import CLIPVisionModel

    path = Path(os.fspath(path)).expanduser()
    if path.is_dir() and (path / "config.json").is_file():
        model = load_transformers_folder(
            CLIPVisionModel, path, dtype=dtype, what="a CLIPVisionModel", ignore_unexpected=_CLIP_HF_IGNORED
        )
        return to_device(model, device)
    file_state_dict = read_state_dict(path)
    cfg = clip_config_from_state_dict(file_state_dict, config, path)
    state_dict = {k: v for k, v in file_state_dict.items() if not _CLIP_IGNORED.match(k)}
    with empty_model():
        model = CLIPVisionModel(cfg)
    what = (
        f"the CLIP vision tower (dim {cfg.hidden_size}, {cfg.num_hidden_layers} layers, image {cfg.image_size}, "
        f"patch {cfg.patch_size})"
    )
    check_then_load(
        model,
        state_dict,
        convert_clip_transformers_to_original,
        convert_clip_original_to_transformers,
        path,
        what=what,
        dtype=dtype,
        hint="Expected Wan's models_clip_open-clip-xlm-roberta-large-vit-huge-14.pth (keys visual.*).",
    )
    return to_device(model.eval(), device)
