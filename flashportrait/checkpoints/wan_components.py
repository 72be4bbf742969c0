"""Wan2.1-I2V's frozen components: umT5 text encoder, CLIP vision tower, VAE, tokenizer (SPEC.md sections 2-3).

Each component loads from either release layout:

* original (``Wan-AI/Wan2.1-I2V-14B-720P``): ``models_t5_umt5-xxl-enc-bf16.pth``,
  ``models_clip_open-clip-xlm-roberta-large-vit-huge-14.pth``, ``Wan2.1_VAE.pth``, ``google/umt5-xxl/``.
  The tensors are renamed onto the transformers / diffusers classes by the exact key maps of SPEC.md
  section 3 (``convert_*_original_to_*`` below; each has an inverse, used to name keys in errors and by
  the tests to write original-format files);
* Diffusers (``Wan-AI/Wan2.1-I2V-14B-720P-Diffusers``): ``text_encoder/``, ``image_encoder/``, ``vae/``,
  ``tokenizer/``, read with the libraries' own ``from_pretrained`` (local files only) or, for the VAE, our
  strict loader.

Loading never materialises a model twice: modules are built on the meta device
(:func:`~flashportrait.checkpoints.common.empty_model`), the file is memory-mapped, and tensors are
assigned (a copy happens only when ``dtype`` differs from the file's). Every mismatch raises
:class:`~flashportrait.checkpoints.common.CheckpointError` naming the file and the keys, in the file's own
naming.

Sizes that the original files do not store (CLIP head count, umT5 relative-attention max distance) default
to the released models (umT5-XXL, open-clip ViT-H/14) and can be overridden with ``config``, a dict in the
original Wan naming such as a golden manifest's ``t5`` / ``clip`` / ``vae`` entry.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from ..config import CLIP_IMAGE_SIZE, CLIP_MEAN, CLIP_STD, LATENT_CHANNELS
from .common import (
    CheckpointError,
    check_state_dict,
    empty_model,
    expected_shapes,
    format_key_report,
    load_state_dict_strict,
    read_state_dict,
)
from .layout import ORIGINAL_CLIP, ORIGINAL_T5, ORIGINAL_T5_TOKENIZER, ORIGINAL_VAE, detect_wan_layout

__all__ = [
    "UMT5_XXL",
    "CLIP_VIT_H_14",
    "WAN21_VAE",
    "WAN21_LATENTS_MEAN",
    "WAN21_LATENTS_STD",
    "convert_umt5_original_to_transformers",
    "convert_umt5_transformers_to_original",
    "umt5_config_from_state_dict",
    "load_umt5_encoder",
    "load_umt5_tokenizer",
    "convert_clip_original_to_transformers",
    "convert_clip_transformers_to_original",
    "clip_config_from_state_dict",
    "load_clip_vision",
    "encode_clip_image",
    "clip_preprocess",
    "convert_wan_vae_diffusers_to_original",
    "wan_vae_config_from_state_dict",
    "load_wan_vae",
    "load_wan_i2v_components",
]

PathLike = str | os.PathLike

#: umT5-XXL encoder as in Wan's ``umt5_xxl`` (wan/modules/t5.py), original naming
UMT5_XXL: dict[str, Any] = dict(
    vocab=256384,
    dim=4096,
    dim_attn=4096,
    dim_ffn=10240,
    num_heads=64,
    num_layers=24,
    num_buckets=32,
    shared_pos=False,
    max_dist=128,
)
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
#: Wan2.1 VAE as in Wan's ``_video_vae`` (wan/modules/vae.py)
WAN21_VAE: dict[str, Any] = dict(
    dim=96,
    z_dim=16,
    dim_mult=[1, 2, 4, 4],
    num_res_blocks=2,
    temperal_downsample=[False, True, True],
)
#: per-channel latent statistics of the Wan2.1 VAE (``WanVAE.mean`` / ``WanVAE.std`` in wan/modules/vae.py;
#: identical to diffusers' ``AutoencoderKLWan`` defaults). Normalised latents are (mu - mean) / std.
WAN21_LATENTS_MEAN = (
    -0.7571,
    -0.7089,
    -0.9113,
    0.1075,
    -0.1745,
    0.9653,
    -0.1517,
    1.5508,
    0.4134,
    -0.0715,
    0.5517,
    -0.3632,
    -0.1922,
    -0.9497,
    0.2503,
    -0.2921,
)
WAN21_LATENTS_STD = (
    2.8184,
    1.4541,
    2.3275,
    2.6558,
    1.2196,
    1.7708,
    2.6052,
    2.0743,
    3.2687,
    2.1526,
    2.8652,
    1.5579,
    1.6382,
    1.1253,
    2.8251,
    1.9160,
)

#: keys of the original CLIP file that the vision tower does not use (text tower, logit scale, projection)
_CLIP_IGNORED = re.compile(r"^(log_scale$|textual\.|visual\.head($|\.))")
#: keys a Diffusers ``image_encoder/`` may hold beyond ``CLIPVisionModel`` (it is often saved as
#: ``CLIPVisionModelWithProjection``); the projection is not used for the penultimate hidden states
_CLIP_HF_IGNORED = re.compile(r"^(vision_model\.)?visual_projection\.")


# ------------------------------------------------------------------------------------------------ helpers
def _config_dict(config: Mapping[str, Any] | None) -> dict[str, Any]:
    return {k: v for k, v in dict(config or {}).items() if k != "note"}


def _layer_indices(state_dict: Mapping[str, Any], prefix: str) -> list[int]:
    pattern = re.compile(rf"^{re.escape(prefix)}(\d+)\.")
    return sorted({int(m.group(1)) for k in state_dict if (m := pattern.match(k))})


def _require(state_dict: Mapping[str, torch.Tensor], key: str, source: PathLike, what: str) -> torch.Tensor:
    if key not in state_dict:
        raise CheckpointError(
            f"{source}: no '{key}', so this is not {what} in the original Wan naming (found keys such as "
            f"{sorted(state_dict)[:5]}). Pass the original file or the Diffusers folder of this component."
        )
    return state_dict[key]


def _meta_like(shapes: Mapping[str, tuple[int, ...]]) -> dict[str, torch.Tensor]:
    return {k: torch.empty(s, device="meta") for k, s in shapes.items()}


def _cast_once(state_dict: Mapping[str, torch.Tensor], dtype: torch.dtype | None) -> dict[str, torch.Tensor]:
    """Cast floating tensors to ``dtype``; a tensor listed under two names (tied weights) is cast once."""
    if dtype is None:
        return dict(state_dict)
    done: dict[int, torch.Tensor] = {}
    out = {}
    for k, v in state_dict.items():
        if id(v) not in done:
            done[id(v)] = v.to(dtype) if v.is_floating_point() else v
        out[k] = done[id(v)]
    return out


def _check_then_load(
    model: torch.nn.Module,
    file_state_dict: Mapping[str, torch.Tensor],
    to_original,
    to_model,
    source: PathLike,
    *,
    what: str,
    dtype: torch.dtype,
    hint: str,
) -> torch.nn.Module:
    """Check ``file_state_dict`` against the model's shapes in the file's naming, then convert and assign."""
    expected = {k: tuple(v.shape) for k, v in to_original(_meta_like(expected_shapes(model))).items()}
    check_state_dict(expected, file_state_dict, source, what=what, hint=hint)
    converted = _cast_once(to_model(file_state_dict), dtype)
    load_state_dict_strict(model, converted, source, what=what, hint=hint)
    return model


def _load_transformers_folder(cls, folder: Path, *, dtype: torch.dtype, what: str, ignore_unexpected=None):
    """``cls.from_pretrained`` on a local folder; refuse missing / unexpected / mis-shaped keys."""
    if not (folder / "config.json").is_file():
        raise CheckpointError(f"{folder}: no config.json, so not a saved {what} (transformers format).")
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # its load report would duplicate (or contradict) our error below
    try:
        model, info = cls.from_pretrained(
            str(folder), local_files_only=True, dtype=dtype, output_loading_info=True, ignore_mismatched_sizes=True
        )
    except (OSError, ValueError, RuntimeError) as exc:
        raise CheckpointError(f"{folder}: cannot be loaded as {what} ({type(exc).__name__}: {exc}).") from exc
    finally:
        hf_logging.set_verbosity(verbosity)
    unexpected = [k for k in info.get("unexpected_keys", ()) if not (ignore_unexpected and ignore_unexpected.match(k))]
    missing = list(info.get("missing_keys", ()))
    mismatched = [(k, tuple(a), tuple(b)) for k, a, b in info.get("mismatched_keys", ())]
    if missing or unexpected or mismatched or info.get("error_msgs"):
        raise CheckpointError(
            f"{folder}: does not fit {what} described by its config.json: "
            f"{format_key_report(missing, unexpected, mismatched)}"
            + (f"; errors: {info['error_msgs']}" if info.get("error_msgs") else "")
            + ". Re-download the folder or fix its config.json."
        )
    return model.eval()


def _diffusers_weights(folder: Path) -> Path:
    """The weights file (or shard index) of a diffusers model folder."""
    for name in (
        "diffusion_pytorch_model.safetensors.index.json",
        "diffusion_pytorch_model.safetensors",
        "diffusion_pytorch_model.bin.index.json",
        "diffusion_pytorch_model.bin",
    ):
        if (folder / name).is_file():
            return folder / name
    raise CheckpointError(f"{folder}: no diffusion_pytorch_model.safetensors (or .bin / sharded index) found.")


def _to_device(model: torch.nn.Module, device: str | torch.device) -> torch.nn.Module:
    return model if torch.device(device) == torch.device("cpu") else model.to(device)


# ------------------------------------------------------------------------------------------------ umT5
_T5_BLOCK_MAP = (
    ("norm1.weight", "layer.0.layer_norm.weight"),
    ("attn.q.weight", "layer.0.SelfAttention.q.weight"),
    ("attn.k.weight", "layer.0.SelfAttention.k.weight"),
    ("attn.v.weight", "layer.0.SelfAttention.v.weight"),
    ("attn.o.weight", "layer.0.SelfAttention.o.weight"),
    ("pos_embedding.embedding.weight", "layer.0.SelfAttention.relative_attention_bias.weight"),
    ("norm2.weight", "layer.1.layer_norm.weight"),
    ("ffn.gate.0.weight", "layer.1.DenseReluDense.wi_0.weight"),
    ("ffn.fc1.weight", "layer.1.DenseReluDense.wi_1.weight"),
    ("ffn.fc2.weight", "layer.1.DenseReluDense.wo.weight"),
)
_T5_TO_HF = dict(_T5_BLOCK_MAP)
_T5_TO_ORIG = {v: k for k, v in _T5_BLOCK_MAP}
_T5_ORIG_BLOCK = re.compile(r"^blocks\.(\d+)\.(.+)$")
_T5_HF_BLOCK = re.compile(r"^encoder\.block\.(\d+)\.(.+)$")


def convert_umt5_original_to_transformers(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename Wan's umT5 encoder (``models_t5_umt5-xxl-enc-bf16.pth``) onto ``transformers.UMT5EncoderModel``.

    Key map (SPEC.md section 3): ``token_embedding`` -> ``shared`` and ``encoder.embed_tokens`` (the same
    tensor: the two are tied); ``blocks.N.norm1`` -> ``encoder.block.N.layer.0.layer_norm``;
    ``blocks.N.attn.{q,k,v,o}`` -> ``...layer.0.SelfAttention.{q,k,v,o}``; ``blocks.N.pos_embedding.embedding``
    -> ``...layer.0.SelfAttention.relative_attention_bias``; ``blocks.N.norm2`` -> ``...layer.1.layer_norm``;
    ``blocks.N.ffn.gate.0`` / ``fc1`` / ``fc2`` -> ``...DenseReluDense.wi_0`` / ``wi_1`` / ``wo``; ``norm`` ->
    ``encoder.final_layer_norm``. Tensors are passed through unchanged (no copy); keys outside the map keep
    their name, so a strict load reports them as unexpected.
    """
    out: dict[str, torch.Tensor] = {}
    for key, value in state_dict.items():
        if key == "token_embedding.weight":
            out["shared.weight"] = value
            out["encoder.embed_tokens.weight"] = value
        elif key == "norm.weight":
            out["encoder.final_layer_norm.weight"] = value
        elif (m := _T5_ORIG_BLOCK.match(key)) and m.group(2) in _T5_TO_HF:
            out[f"encoder.block.{m.group(1)}.{_T5_TO_HF[m.group(2)]}"] = value
        else:
            out[key] = value
    return out


def convert_umt5_transformers_to_original(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Inverse of :func:`convert_umt5_original_to_transformers` (``shared`` / ``encoder.embed_tokens`` ->
    ``token_embedding``; if both are present they must hold the same values)."""
    out: dict[str, torch.Tensor] = {}
    for key, value in state_dict.items():
        if key in ("shared.weight", "encoder.embed_tokens.weight"):
            if "token_embedding.weight" in out and not out["token_embedding.weight"].is_meta:
                if not torch.equal(out["token_embedding.weight"], value):
                    raise CheckpointError("shared.weight and encoder.embed_tokens.weight differ; they must be tied.")
            out["token_embedding.weight"] = value
        elif key == "encoder.final_layer_norm.weight":
            out["norm.weight"] = value
        elif (m := _T5_HF_BLOCK.match(key)) and m.group(2) in _T5_TO_ORIG:
            out[f"blocks.{m.group(1)}.{_T5_TO_ORIG[m.group(2)]}"] = value
        else:
            out[key] = value
    return out


def umt5_config_from_state_dict(
    state_dict: Mapping[str, torch.Tensor], config: Mapping[str, Any] | None = None, source: PathLike = "<state dict>"
):
    """A ``transformers.UMT5Config`` for an original-naming umT5 encoder state dict.

    Read from the shapes: vocab and dim (``token_embedding`` [vocab, dim]), dim_attn (``attn.q`` [dim_attn,
    dim]), dim_ffn (``ffn.fc1`` [dim_ffn, dim]), num_buckets and num_heads (``pos_embedding.embedding``
    [buckets, heads]), num_layers (number of ``blocks.N``). Not stored, taken from umT5-XXL (:data:`UMT5_XXL`)
    unless ``config`` (Wan naming, e.g. a golden manifest's ``t5``) says otherwise: ``max_dist`` 128
    (relative_attention_max_distance). Gated-GELU (tanh approximation, ``gelu_new``), RMS-norm eps 1e-6,
    d_kv = dim_attn / num_heads. Values in ``config`` take precedence over the shapes (a contradiction then
    fails the strict load, naming the key).

    Raises:
        CheckpointError: not an original umT5 encoder, or one with a shared relative bias (T5, not umT5).
    """
    from transformers import UMT5Config

    what = "an umT5 encoder"
    cfg = _config_dict(config)
    if cfg.get("shared_pos") or "pos_embedding.embedding.weight" in state_dict:
        raise CheckpointError(
            f"{source}: holds one relative-position bias shared by all blocks (shared_pos=True): that is T5, "
            "not the umT5 encoder Wan2.1 uses (one bias per block). Use models_t5_umt5-xxl-enc-bf16.pth."
        )
    vocab, dim = _require(state_dict, "token_embedding.weight", source, what).shape
    layers = _layer_indices(state_dict, "blocks.")
    if not layers:
        raise CheckpointError(f"{source}: no 'blocks.N.*' keys, so not an umT5 encoder in the original naming.")
    dim_attn = _require(state_dict, "blocks.0.attn.q.weight", source, what).shape[0]
    dim_ffn = _require(state_dict, "blocks.0.ffn.fc1.weight", source, what).shape[0]
    buckets, heads = _require(state_dict, "blocks.0.pos_embedding.embedding.weight", source, what).shape
    derived = dict(
        vocab=vocab,
        dim=dim,
        dim_attn=dim_attn,
        dim_ffn=dim_ffn,
        num_heads=heads,
        num_layers=layers[-1] + 1,
        num_buckets=buckets,
        max_dist=UMT5_XXL["max_dist"],
    )
    c = {**derived, **{k: v for k, v in cfg.items() if k in derived}}
    if c["dim_attn"] % c["num_heads"]:
        raise CheckpointError(f"{source}: dim_attn {c['dim_attn']} is not divisible by num_heads {c['num_heads']}.")
    return UMT5Config(
        vocab_size=int(c["vocab"]),
        d_model=int(c["dim"]),
        d_kv=int(c["dim_attn"]) // int(c["num_heads"]),
        d_ff=int(c["dim_ffn"]),
        num_layers=int(c["num_layers"]),
        num_decoder_layers=int(c["num_layers"]),
        num_heads=int(c["num_heads"]),
        relative_attention_num_buckets=int(c["num_buckets"]),
        relative_attention_max_distance=int(c["max_dist"]),
        feed_forward_proj="gated-gelu",
        layer_norm_epsilon=1e-6,
        tie_word_embeddings=False,
        pad_token_id=0,
        eos_token_id=1,
        decoder_start_token_id=0,
    )


def load_umt5_encoder(
    path: PathLike,
    *,
    config: Mapping[str, Any] | None = None,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
):
    """Load Wan2.1's umT5 text encoder as ``transformers.UMT5EncoderModel`` (eval mode).

    Args:
        path: the original ``models_t5_umt5-xxl-enc-bf16.pth`` (any file :func:`read_state_dict` reads, in the
            original Wan naming), or a Diffusers ``text_encoder/`` folder (transformers format).
        config: original-file only: Wan-naming sizes overriding those read from the shapes (see
            :func:`umt5_config_from_state_dict`).
        dtype: parameter dtype (the released file is bf16).
        device: where the model ends up.

    Returns:
        The encoder; ``model(input_ids [B, L] int64, attention_mask [B, L]).last_hidden_state`` is
        [B, L, d_model] (4096 for umT5-XXL). Positions where the mask is 0 are not meaningful.

    Raises:
        CheckpointError: missing / unexpected / mis-shaped keys, naming the file and the keys.
    """
    from transformers import UMT5EncoderModel

    path = Path(os.fspath(path)).expanduser()
    if path.is_dir() and (path / "config.json").is_file():
        model = _load_transformers_folder(UMT5EncoderModel, path, dtype=dtype, what="a UMT5EncoderModel")
        return _to_device(model, device)
    state_dict = read_state_dict(path)
    cfg = umt5_config_from_state_dict(state_dict, config, path)
    with empty_model():
        model = UMT5EncoderModel(cfg)
    what = (
        f"the umT5 encoder (vocab {cfg.vocab_size}, dim {cfg.d_model}, {cfg.num_layers} layers, {cfg.num_heads} heads)"
    )
    _check_then_load(
        model,
        state_dict,
        convert_umt5_transformers_to_original,
        convert_umt5_original_to_transformers,
        path,
        what=what,
        dtype=dtype,
        hint="Expected Wan's models_t5_umt5-xxl-enc-bf16.pth (original naming).",
    )
    model.set_input_embeddings(model.shared)  # re-tie: assign=True gave the two names separate Parameters
    return _to_device(model.eval(), device)


def load_umt5_tokenizer(path: PathLike):
    """The umT5 tokenizer from the original ``google/umt5-xxl/`` folder or a Diffusers ``tokenizer/`` folder.

    Local files only (``transformers.AutoTokenizer``). Use as Wan does:
    ``tokenizer(prompts, padding="max_length", max_length=512, truncation=True, add_special_tokens=True,
    return_attention_mask=True, return_tensors="pt")``.

    Raises:
        CheckpointError: the folder is missing or holds no readable tokenizer.
    """
    from transformers import AutoTokenizer

    path = Path(os.fspath(path)).expanduser()
    if not path.is_dir():
        raise CheckpointError(
            f"{path}: no such tokenizer folder. Expected the original release's {ORIGINAL_T5_TOKENIZER}/ or a "
            "Diffusers tokenizer/ folder."
        )
    try:
        return AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    except (OSError, ValueError, TypeError) as exc:
        raise CheckpointError(f"{path}: cannot be loaded as a tokenizer ({type(exc).__name__}: {exc}).") from exc


# ------------------------------------------------------------------------------------------------ CLIP
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
    cfg = _config_dict(config)
    patch = _require(state_dict, "visual.patch_embedding.weight", source, what)
    dim, channels, patch_size = patch.shape[0], patch.shape[1], patch.shape[-1]
    positions = _require(state_dict, "visual.pos_embedding", source, what).shape[-2]
    grid = round((positions - 1) ** 0.5)
    if grid * grid != positions - 1:
        raise CheckpointError(f"{source}: visual.pos_embedding has {positions} positions, not 1 + a square number.")
    layers = _layer_indices(state_dict, "visual.transformer.")
    if not layers:
        raise CheckpointError(f"{source}: no 'visual.transformer.N.*' keys; not Wan's CLIP vision tower.")
    mlp = _require(state_dict, "visual.transformer.0.mlp.0.weight", source, what).shape[0]
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
        The vision tower (eval mode). Use :func:`encode_clip_image` for Wan's image features.

    Raises:
        CheckpointError: missing / unexpected / mis-shaped ``visual.*`` keys, naming the file and keys.
    """
    from transformers import CLIPVisionModel

    path = Path(os.fspath(path)).expanduser()
    if path.is_dir() and (path / "config.json").is_file():
        model = _load_transformers_folder(
            CLIPVisionModel, path, dtype=dtype, what="a CLIPVisionModel", ignore_unexpected=_CLIP_HF_IGNORED
        )
        return _to_device(model, device)
    file_state_dict = read_state_dict(path)
    cfg = clip_config_from_state_dict(file_state_dict, config, path)
    state_dict = {k: v for k, v in file_state_dict.items() if not _CLIP_IGNORED.match(k)}
    with empty_model():
        model = CLIPVisionModel(cfg)
    what = (
        f"the CLIP vision tower (dim {cfg.hidden_size}, {cfg.num_hidden_layers} layers, image {cfg.image_size}, "
        f"patch {cfg.patch_size})"
    )
    _check_then_load(
        model,
        state_dict,
        convert_clip_transformers_to_original,
        convert_clip_original_to_transformers,
        path,
        what=what,
        dtype=dtype,
        hint="Expected Wan's models_clip_open-clip-xlm-roberta-large-vit-huge-14.pth (keys visual.*).",
    )
    return _to_device(model.eval(), device)


@torch.no_grad()
def encode_clip_image(model, pixel_values: torch.Tensor) -> torch.Tensor:
    """Wan's image features: the hidden states after all blocks but the last (``hidden_states[-2]``).

    Args:
        model: a ``CLIPVisionModel`` (see :func:`load_clip_vision`).
        pixel_values: [B, 3, S, S] float, already resized and normalised (:func:`clip_preprocess`);
            S = the model's image size (224 -> 257 tokens).

    Returns:
        [B, (S/p)^2 + 1, C] in the model's dtype (Wan2.1: [B, 257, 1280]); no final LayerNorm applied
        (wan/modules/clip.py ``VisionTransformer.forward(use_31_block=True)``).
    """
    dtype = next(model.parameters()).dtype
    out = model(pixel_values=pixel_values.to(dtype), output_hidden_states=True)
    return out.hidden_states[-2]


def _images_to_float(images: Any) -> torch.Tensor:
    """PIL image(s) / uint8 HWC array(s) / CHW tensor(s) -> [B, 3, H, W] float32 in [0, 1]."""
    from PIL import Image

    if isinstance(images, Image.Image):
        images = np.array(images.convert("RGB"))
    if isinstance(images, Sequence) and not isinstance(images, (torch.Tensor, np.ndarray)):
        if not images:
            raise ValueError("clip_preprocess: got an empty list of images.")
        parts = [_images_to_float(im) for im in images]
        if len({tuple(p.shape[-2:]) for p in parts}) > 1:
            raise ValueError(
                f"clip_preprocess: the images have different sizes {[tuple(p.shape[-2:]) for p in parts]}; "
                "preprocess them one at a time."
            )
        return torch.cat(parts)
    if isinstance(images, np.ndarray):
        if images.dtype != np.uint8:
            raise ValueError(f"clip_preprocess: numpy images must be uint8 HWC / BHWC RGB, got {images.dtype}.")
        if images.ndim == 3:
            images = images[None]
        if images.ndim != 4 or images.shape[-1] != 3:
            raise ValueError(f"clip_preprocess: numpy images must be [H, W, 3] or [B, H, W, 3], got {images.shape}.")
        return torch.from_numpy(np.array(images)).permute(0, 3, 1, 2).float() / 255.0
    if isinstance(images, torch.Tensor):
        x = images[None] if images.ndim == 3 else images
        if x.ndim != 4 or x.shape[1] != 3:
            raise ValueError(f"clip_preprocess: tensors must be [3, H, W] or [B, 3, H, W], got {tuple(images.shape)}.")
        if x.dtype == torch.uint8:
            return x.float() / 255.0
        if not x.is_floating_point():
            raise ValueError(f"clip_preprocess: tensor dtype must be uint8 or float in [0, 1], got {x.dtype}.")
        return x.float()
    raise TypeError(f"clip_preprocess: unsupported image type {type(images).__name__}.")


def clip_preprocess(images: Any, size: int = CLIP_IMAGE_SIZE) -> torch.Tensor:
    """Wan's CLIP preprocessing: the whole image resized to ``size`` x ``size`` (bicubic, no crop), normalised.

    Reproduces ``CLIPModel.visual`` of wan/modules/clip.py: ``F.interpolate(mode="bicubic",
    align_corners=False)`` (torch bicubic, no antialiasing, aspect ratio not kept, no clamping), then
    ``(x - CLIP_MEAN) / CLIP_STD`` per channel. (Wan interpolates x in [-1, 1] and maps to [0, 1] afterwards;
    interpolation is linear, so resizing the [0, 1] image is the same up to float rounding.)

    Args:
        images: one of: a PIL image or a list of PIL images (converted to RGB); a uint8 RGB numpy array
            [H, W, 3] or [B, H, W, 3] (channels last); a torch tensor [3, H, W] or [B, 3, H, W] (channels
            first), uint8 in 0..255 or float in [0, 1]. A list must hold images of one size.
        size: output side in pixels (224 for ViT-H/14).

    Returns:
        [B, 3, size, size] float32, normalised (roughly zero-mean, unit-variance per channel).
    """
    x = _images_to_float(images)
    x = F.interpolate(x, size=(size, size), mode="bicubic", align_corners=False)
    mean = torch.tensor(CLIP_MEAN, dtype=x.dtype).view(1, 3, 1, 1)
    std = torch.tensor(CLIP_STD, dtype=x.dtype).view(1, 3, 1, 1)
    return (x - mean) / std


# ------------------------------------------------------------------------------------------------ VAE
_VAE_RESNET_TO_ORIG = (
    ("norm1.gamma", "residual.0.gamma"),
    ("conv1.weight", "residual.2.weight"),
    ("conv1.bias", "residual.2.bias"),
    ("norm2.gamma", "residual.3.gamma"),
    ("conv2.weight", "residual.6.weight"),
    ("conv2.bias", "residual.6.bias"),
    ("conv_shortcut.weight", "shortcut.weight"),
    ("conv_shortcut.bias", "shortcut.bias"),
)
_VAE_TOP_TO_ORIG = {
    "quant_conv.weight": "conv1.weight",
    "quant_conv.bias": "conv1.bias",
    "post_quant_conv.weight": "conv2.weight",
    "post_quant_conv.bias": "conv2.bias",
}


def _vae_resnet_to_orig(rest: str) -> str:
    for new, old in _VAE_RESNET_TO_ORIG:
        if rest == new:
            return old
    return rest


def convert_wan_vae_diffusers_to_original(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Inverse of diffusers' ``convert_wan_vae_to_diffusers`` for the Wan2.1 layout (4 levels, 2 residual
    blocks per level): ``AutoencoderKLWan`` keys -> ``Wan2.1_VAE.pth`` keys. Used to name keys in errors and
    to write original-format test files; tensors are passed through unchanged."""
    out: dict[str, torch.Tensor] = {}
    for key, value in state_dict.items():
        new = key
        if key in _VAE_TOP_TO_ORIG:
            new = _VAE_TOP_TO_ORIG[key]
        elif m := re.match(r"^(encoder|decoder)\.conv_in\.(.+)$", key):
            new = f"{m.group(1)}.conv1.{m.group(2)}"
        elif m := re.match(r"^(encoder|decoder)\.norm_out\.gamma$", key):
            new = f"{m.group(1)}.head.0.gamma"
        elif m := re.match(r"^(encoder|decoder)\.conv_out\.(.+)$", key):
            new = f"{m.group(1)}.head.2.{m.group(2)}"
        elif m := re.match(r"^(encoder|decoder)\.mid_block\.resnets\.(\d+)\.(.+)$", key):
            new = f"{m.group(1)}.middle.{2 * int(m.group(2))}.{_vae_resnet_to_orig(m.group(3))}"
        elif m := re.match(r"^(encoder|decoder)\.mid_block\.attentions\.0\.(.+)$", key):
            new = f"{m.group(1)}.middle.1.{m.group(2)}"
        elif m := re.match(r"^encoder\.down_blocks\.(\d+)\.(.+)$", key):
            new = f"encoder.downsamples.{m.group(1)}.{_vae_resnet_to_orig(m.group(2))}"
        elif m := re.match(r"^decoder\.up_blocks\.(\d+)\.resnets\.(\d+)\.(.+)$", key):
            new = f"decoder.upsamples.{4 * int(m.group(1)) + int(m.group(2))}.{_vae_resnet_to_orig(m.group(3))}"
        elif m := re.match(r"^decoder\.up_blocks\.(\d+)\.upsamplers\.0\.(.+)$", key):
            new = f"decoder.upsamples.{4 * int(m.group(1)) + 3}.{m.group(2)}"
        out[new] = value
    return out


def wan_vae_config_from_state_dict(
    state_dict: Mapping[str, torch.Tensor], config: Mapping[str, Any] | None = None, source: PathLike = "<state dict>"
) -> dict[str, Any]:
    """``AutoencoderKLWan`` config for an original ``Wan2.1_VAE.pth`` state dict.

    Read from the shapes: base_dim (``encoder.conv1`` [base_dim, 3, 3, 3, 3]), z_dim (``conv2`` [z, z, 1, 1, 1]),
    the decoder's base width (``decoder.head.2`` [3, dim, ...]), dim_mult (output width of each level's
    residual blocks / base_dim), num_res_blocks (residual blocks per level) and temperal_downsample (a level's
    down-sampler has ``time_conv`` iff it also halves time). latents_mean / latents_std: ``config`` if given,
    else the Wan2.1 values (:data:`WAN21_LATENTS_MEAN`, ``_STD``), which need z_dim 16.

    Raises:
        CheckpointError: not an original Wan VAE, or a layout diffusers' converter does not handle (it
        supports 4 levels with 2 residual blocks each, no attention in the levels: the Wan2.1 VAE).
    """
    what = "the Wan2.1 VAE"
    cfg = _config_dict(config)
    conv_in = _require(state_dict, "encoder.conv1.weight", source, what)
    z_dim = _require(state_dict, "conv2.weight", source, what).shape[0]
    head = _require(state_dict, "decoder.head.2.weight", source, what)
    base_dim = conv_in.shape[0]
    levels: list[list[int]] = [[]]
    temporal: list[bool] = []
    for idx in _layer_indices(state_dict, "encoder.downsamples."):
        prefix = f"encoder.downsamples.{idx}."
        if prefix + "residual.2.weight" in state_dict:
            levels[-1].append(state_dict[prefix + "residual.2.weight"].shape[0])
        elif prefix + "resample.1.weight" in state_dict:
            temporal.append(prefix + "time_conv.weight" in state_dict)
            levels.append([])
        else:
            raise CheckpointError(
                f"{source}: encoder.downsamples.{idx} is neither a residual block nor a down-sampler "
                f"(keys {sorted(k for k in state_dict if k.startswith(prefix))[:4]}); not a Wan2.1 VAE."
            )
    counts = {len(level) for level in levels}
    if len(counts) != 1 or not all(levels):
        raise CheckpointError(f"{source}: uneven residual blocks per encoder level {[len(x) for x in levels]}.")
    num_res_blocks = counts.pop()
    if any(w % base_dim for level in levels for w in level) or any(len(set(level)) != 1 for level in levels):
        raise CheckpointError(f"{source}: encoder level widths {levels} are not multiples of base_dim {base_dim}.")
    dim_mult = [level[0] // base_dim for level in levels]
    if len(dim_mult) != 4 or num_res_blocks != 2:
        raise CheckpointError(
            f"{source}: a VAE with {len(dim_mult)} levels of {num_res_blocks} residual blocks; diffusers' "
            "convert_wan_vae_to_diffusers only handles the Wan2.1 layout (4 levels of 2 blocks)."
        )
    if any(".attn" in k or re.match(r"^encoder\.downsamples\.\d+\.(norm|to_qkv|proj)", k) for k in state_dict):
        raise CheckpointError(f"{source}: attention inside the VAE levels (attn_scales) is not supported.")
    out: dict[str, Any] = dict(
        base_dim=int(base_dim),
        decoder_base_dim=int(head.shape[1]) if head.shape[1] != base_dim else None,
        z_dim=int(z_dim),
        dim_mult=dim_mult,
        num_res_blocks=int(num_res_blocks),
        attn_scales=[],
        temperal_downsample=temporal,
        in_channels=int(conv_in.shape[1]),
        out_channels=int(head.shape[0]),
    )
    for ours, theirs in (
        ("dim", "base_dim"),
        ("base_dim", "base_dim"),
        ("z_dim", "z_dim"),
        ("dim_mult", "dim_mult"),
        ("num_res_blocks", "num_res_blocks"),
        ("temperal_downsample", "temperal_downsample"),
    ):
        if ours in cfg:
            out[theirs] = list(cfg[ours]) if isinstance(cfg[ours], (list, tuple)) else cfg[ours]
    if "latents_mean" in cfg or "latents_std" in cfg:
        out["latents_mean"] = [float(v) for v in cfg["latents_mean"]]
        out["latents_std"] = [float(v) for v in cfg["latents_std"]]
    elif out["z_dim"] == LATENT_CHANNELS:
        out["latents_mean"], out["latents_std"] = list(WAN21_LATENTS_MEAN), list(WAN21_LATENTS_STD)
    else:
        raise CheckpointError(
            f"{source}: z_dim {out['z_dim']} has no known latent statistics; pass config with latents_mean/std."
        )
    if len(out["latents_mean"]) != out["z_dim"] or len(out["latents_std"]) != out["z_dim"]:
        raise CheckpointError(f"{source}: latents_mean/std must have z_dim = {out['z_dim']} entries.")
    return out


def load_wan_vae(
    path: PathLike,
    *,
    config: Mapping[str, Any] | None = None,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
):
    """Load the Wan2.1 VAE as ``diffusers.AutoencoderKLWan`` (eval mode).

    Args:
        path: the original ``Wan2.1_VAE.pth`` (renamed by diffusers' ``convert_wan_vae_to_diffusers``, sizes
            from :func:`wan_vae_config_from_state_dict`) or a Diffusers ``vae/`` folder (config.json +
            diffusion_pytorch_model.safetensors).
        config: original-file only: Wan-naming sizes (``dim``, ``z_dim``, ...) and/or ``latents_mean`` /
            ``latents_std`` (default: the Wan2.1 statistics).
        dtype, device: parameter dtype (Wan runs its VAE in float32) and device.

    Returns:
        The VAE; ``vae.config.latents_mean`` / ``latents_std`` (16 floats each) define the normalised
        latents ``(mu - mean) / std`` the transformer works on.

    Raises:
        CheckpointError: missing / unexpected / mis-shaped keys (in the file's naming; missing keys of an
        original file are named by their original names), naming the file.
    """
    from diffusers import AutoencoderKLWan
    from diffusers.loaders.single_file_utils import convert_wan_vae_to_diffusers

    path = Path(os.fspath(path)).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise CheckpointError(f"{path}: no config.json, so not a Diffusers vae/ folder.")
        try:
            vae_config = AutoencoderKLWan.load_config(str(path))
        except (OSError, ValueError) as exc:
            raise CheckpointError(f"{path}/config.json: unreadable ({exc}).") from exc
        weights = _diffusers_weights(path)
        with empty_model():
            model = AutoencoderKLWan.from_config(vae_config)
        load_state_dict_strict(
            model,
            _cast_once(read_state_dict(weights), dtype),
            weights,
            what="AutoencoderKLWan (config.json)",
            hint="Re-download the vae/ folder or fix its config.json.",
        )
        return _to_device(model.eval(), device)
    state_dict = read_state_dict(path)
    vae_config = wan_vae_config_from_state_dict(state_dict, config, path)
    with empty_model():
        model = AutoencoderKLWan(**vae_config)
    what = (
        f"the Wan VAE (base_dim {vae_config['base_dim']}, z_dim {vae_config['z_dim']}, dim_mult "
        f"{vae_config['dim_mult']})"
    )
    _check_then_load(
        model,
        state_dict,
        convert_wan_vae_diffusers_to_original,
        convert_wan_vae_to_diffusers,
        path,
        what=what,
        dtype=dtype,
        hint="Expected Wan's Wan2.1_VAE.pth (original naming).",
    )
    return _to_device(model.eval(), device)


# ------------------------------------------------------------------------------------------------ folders
def load_wan_i2v_components(
    folder: PathLike,
    *,
    dtype: torch.dtype = torch.bfloat16,
    vae_dtype: torch.dtype | None = torch.float32,
    device: str | torch.device = "cpu",
) -> dict[str, Any]:
    """Load the frozen Wan2.1-I2V components from a downloaded folder of either layout.

    Args:
        folder: ``Wan2.1-I2V-14B-720P`` (original: ``Wan2.1_VAE.pth``, ``models_t5_umt5-xxl-enc-bf16.pth``,
            ``google/umt5-xxl/``, ``models_clip_open-clip-xlm-roberta-large-vit-huge-14.pth``) or
            ``Wan2.1-I2V-14B-720P-Diffusers`` (``vae/``, ``text_encoder/``, ``tokenizer/``, ``image_encoder/``),
            told apart by :func:`~flashportrait.checkpoints.layout.detect_wan_layout`.
        dtype: text and image encoders' dtype.
        vae_dtype: the VAE's dtype (``None``: ``dtype``); float32 by default, as Wan runs it.
        device: where the models end up.

    Returns:
        ``{"vae": AutoencoderKLWan, "text_encoder": UMT5EncoderModel, "tokenizer": tokenizer,
        "image_encoder": CLIPVisionModel}``, all in eval mode. The transformer is loaded separately.

    Raises:
        CheckpointError: a component's file or folder is missing (the message names it) or does not fit.
    """
    folder = Path(os.fspath(folder)).expanduser()
    layout = detect_wan_layout(folder)
    if layout == "original":
        paths = dict(
            vae=folder / ORIGINAL_VAE,
            text_encoder=folder / ORIGINAL_T5,
            tokenizer=folder / ORIGINAL_T5_TOKENIZER,
            image_encoder=folder / ORIGINAL_CLIP,
        )
    else:
        paths = {name: folder / name for name in ("vae", "text_encoder", "tokenizer", "image_encoder")}
    absent = [str(p.relative_to(folder)) for p in paths.values() if not p.exists()]
    if absent:
        raise CheckpointError(
            f"{folder}: {layout}-layout Wan folder without {absent}. Download the complete "
            f"Wan-AI/Wan2.1-I2V-14B-720P{'-Diffusers' if layout == 'diffusers' else ''} release into it."
        )
    if layout == "diffusers":
        _check_model_index(folder / "model_index.json")
    return dict(
        vae=load_wan_vae(paths["vae"], dtype=vae_dtype or dtype, device=device),
        text_encoder=load_umt5_encoder(paths["text_encoder"], dtype=dtype, device=device),
        tokenizer=load_umt5_tokenizer(paths["tokenizer"]),
        image_encoder=load_clip_vision(paths["image_encoder"], dtype=dtype, device=device),
    )


def _check_model_index(path: Path) -> None:
    try:
        index = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{path}: unreadable model_index.json ({exc}).") from exc
    expected = {"vae": "AutoencoderKLWan", "text_encoder": "UMT5EncoderModel", "image_encoder": "CLIPVision"}
    for name, cls in expected.items():
        entry = index.get(name)
        if entry is not None and (not isinstance(entry, list) or len(entry) != 2 or not str(entry[1]).startswith(cls)):
            raise CheckpointError(f"{path}: '{name}' is {entry}, expected a {cls} (Wan2.1 I2V Diffusers layout).")
