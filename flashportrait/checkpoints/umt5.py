"""Wan2.1's umT5 text encoder and tokenizer (SPEC.md section 3).

* original (``Wan-AI/Wan2.1-I2V-14B-720P``): ``models_t5_umt5-xxl-enc-bf16.pth`` in Wan's naming, renamed onto
  ``transformers.UMT5EncoderModel`` by the exact key map of SPEC.md section 3 (with its inverse, used to name
  keys in errors and by the tests to write original-format files); tokenizer in ``google/umt5-xxl/``;
* Diffusers: ``text_encoder/`` and ``tokenizer/`` through ``from_pretrained`` (local files only).

Sizes the original file does not store (the relative-attention max distance) default to umT5-XXL and can be
overridden with ``config`` (Wan naming, e.g. a golden manifest's ``t5`` entry).
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
from .layout import ORIGINAL_T5_TOKENIZER

__all__ = [
    "UMT5_XXL",
    "convert_umt5_original_to_transformers",
    "convert_umt5_transformers_to_original",
    "umt5_config_from_state_dict",
    "load_umt5_encoder",
    "load_umt5_tokenizer",
]

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
    cfg = config_dict(config)
    if cfg.get("shared_pos") or "pos_embedding.embedding.weight" in state_dict:
        raise CheckpointError(
            f"{source}: holds one relative-position bias shared by all blocks (shared_pos=True): that is T5, "
            "not the umT5 encoder Wan2.1 uses (one bias per block). Use models_t5_umt5-xxl-enc-bf16.pth."
        )
    vocab, dim = require_key(state_dict, "token_embedding.weight", source, what).shape
    layers = layer_indices(state_dict, "blocks.")
    if not layers:
        raise CheckpointError(f"{source}: no 'blocks.N.*' keys, so not an umT5 encoder in the original naming.")
    dim_attn = require_key(state_dict, "blocks.0.attn.q.weight", source, what).shape[0]
    dim_ffn = require_key(state_dict, "blocks.0.ffn.fc1.weight", source, what).shape[0]
    buckets, heads = require_key(state_dict, "blocks.0.pos_embedding.embedding.weight", source, what).shape
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
        model = load_transformers_folder(UMT5EncoderModel, path, dtype=dtype, what="a UMT5EncoderModel")
        return to_device(model, device)
    state_dict = read_state_dict(path)
    cfg = umt5_config_from_state_dict(state_dict, config, path)
    with empty_model():
        model = UMT5EncoderModel(cfg)
    what = (
        f"the umT5 encoder (vocab {cfg.vocab_size}, dim {cfg.d_model}, {cfg.num_layers} layers, {cfg.num_heads} heads)"
    )
    check_then_load(
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
    return to_device(model.eval(), device)


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
