"""Loading the FlashPortrait transformer from what users have on disk (SPEC.md section 3).

* ``transformer.pt`` of FrancisRing/FlashPortrait: the full transformer in original Wan naming
  (``blocks.N.cross_attn.emo_k_proj.weight`` ...), optionally wrapped in ``state_dict``; also as
  ``.safetensors`` or sharded safetensors with an index. A DeepSpeed export may hold only the trained
  keys: the rest is then taken from the Wan2.1-I2V base transformer, and anything still missing (or
  anything unexpected) is refused with the full list.
* The Wan2.1-I2V-14B-720P base in either layout: the original folder (``config.json`` with original keys,
  ``diffusion_pytorch_model-0000N-of-00007.safetensors`` + index) or the Diffusers folder
  (``transformer/config.json`` + shards).

The model is built on the meta device and the checkpoint's tensors are assigned into it, so a 14B model
is never materialised twice.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from ..config import EXPRESSION_TOKEN_DIM, WAN_I2V_14B_CONFIG
from .common import (
    CheckpointError,
    check_state_dict,
    empty_model,
    expected_shapes,
    format_key_report,
    list_checkpoint_keys,
    load_state_dict_strict,
    read_state_dict,
)
from .layout import ORIGINAL_TRANSFORMER_INDEX, detect_wan_layout

logger = logging.getLogger(__name__)

__all__ = [
    "convert_transformer_state_dict",
    "convert_transformer_state_dict_to_original",
    "diffusers_config_from_original",
    "resolve_transformer_config",
    "build_transformer",
    "load_flashportrait_transformer",
]

#: prefixes that wrap every key of some exports (DeepSpeed ``module.``, ComfyUI-style ``diffusion_model.``)
_KEY_PREFIXES = ("module.", "model.diffusion_model.", "diffusion_model.")
#: keys that only the original Wan naming has
_ORIGINAL_MARKERS = (".self_attn.", ".cross_attn.", "head.head.", "time_embedding.", "text_embedding.")


def _strip_common_prefix(state_dict: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(state_dict)
    for prefix in _KEY_PREFIXES:
        if out and all(k.startswith(prefix) for k in out):
            out = {k[len(prefix):]: v for k, v in out.items()}
    return out


def is_original_naming(keys) -> bool:
    """True if the keys use the original Wan naming (``blocks.N.self_attn.q.weight``), not diffusers'."""
    return any(marker in k for k in keys for marker in _ORIGINAL_MARKERS)


def convert_transformer_state_dict(state_dict: Mapping[str, Any]) -> dict[str, Any]:
    """Rename a transformer state dict to the diffusers names of :class:`FlashPortraitTransformer3DModel`.

    Original Wan naming is converted with diffusers' ``convert_wan_transformer_to_diffusers`` (which maps
    ``blocks.N.cross_attn.emo_k_proj`` to ``blocks.N.attn2.emo_k_proj``); diffusers naming is kept.
    Common wrappers (``module.``, ``model.diffusion_model.``, ``diffusion_model.``) are stripped. Values
    are passed through untouched (tensors, or anything else such as shapes), never copied.
    """
    from diffusers.loaders.single_file_utils import convert_wan_transformer_to_diffusers

    state_dict = _strip_common_prefix(state_dict)
    if is_original_naming(state_dict):
        return convert_wan_transformer_to_diffusers(dict(state_dict))
    return state_dict


def diffusers_config_from_original(config: Mapping[str, Any]) -> dict[str, Any]:
    """Map an original Wan ``config.json`` (``dim``, ``num_heads``, ``in_dim`` ...) to diffusers kwargs.

    ``text_dim`` defaults to 4096 and ``patch_size`` to (1, 2, 2) (implied by the release); an ``i2v``
    model gets ``image_dim`` 1280 and ``added_kv_proj_dim = dim``; ``expression_dim`` (not in Wan's file)
    defaults to the released 2048.

    Raises:
        CheckpointError: a required key is missing or the attention window is not global.
    """
    try:
        dim, num_heads = int(config["dim"]), int(config["num_heads"])
        out = dict(
            patch_size=tuple(config.get("patch_size", (1, 2, 2))),
            num_attention_heads=num_heads,
            attention_head_dim=dim // num_heads,
            in_channels=int(config["in_dim"]),
            out_channels=int(config["out_dim"]),
            text_dim=int(config.get("text_dim", 4096)),
            freq_dim=int(config.get("freq_dim", 256)),
            ffn_dim=int(config["ffn_dim"]),
            num_layers=int(config["num_layers"]),
            cross_attn_norm=bool(config.get("cross_attn_norm", True)),
            qk_norm="rms_norm_across_heads" if config.get("qk_norm", True) else None,
            eps=float(config.get("eps", 1e-6)),
            expression_dim=int(config.get("expression_dim", EXPRESSION_TOKEN_DIM)),
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise CheckpointError(f"original Wan config {dict(config)} lacks or has a bad value for {exc}.") from exc
    if tuple(config.get("window_size", (-1, -1))) != (-1, -1):
        raise CheckpointError(f"window_size {config['window_size']} is not supported (Wan2.1 uses global attention).")
    if config.get("model_type", "i2v") == "i2v":
        out.update(image_dim=int(config.get("image_dim", 1280)), added_kv_proj_dim=dim)
    else:
        out.update(image_dim=None, added_kv_proj_dim=None)
    return out


def _normalise_config(config: Mapping[str, Any]) -> dict[str, Any]:
    if "dim" in config and "num_heads" in config:
        return diffusers_config_from_original(config)
    from ..models.transformer import FlashPortraitTransformer3DModel

    allowed = set(FlashPortraitTransformer3DModel._get_signature_keys(FlashPortraitTransformer3DModel)[0]) | set(
        FlashPortraitTransformer3DModel._get_signature_keys(FlashPortraitTransformer3DModel)[1]
    )
    return {k: (tuple(v) if k == "patch_size" else v) for k, v in config.items() if k in allowed}


def _base_transformer_source(wan_model_dir: Path) -> tuple[Path, Path]:
    """(config.json, weights) of the base transformer in either Wan layout."""
    if detect_wan_layout(wan_model_dir) == "diffusers":
        folder = wan_model_dir / "transformer"
        return folder / "config.json", folder
    index = wan_model_dir / ORIGINAL_TRANSFORMER_INDEX
    weights = index if index.is_file() else wan_model_dir
    return wan_model_dir / "config.json", weights


def resolve_transformer_config(
    config: Mapping[str, Any] | str | os.PathLike | None = None,
    wan_model_dir: str | os.PathLike | None = None,
) -> dict[str, Any]:
    """Diffusers kwargs of the transformer, from (first found): ``config`` (a dict in original or
    diffusers keys, or a path to a ``config.json``), the base folder's config, the released 14B sizes.

    Raises:
        CheckpointError: an unreadable config file.
    """
    if config is None and wan_model_dir is not None:
        config, _ = _base_transformer_source(Path(wan_model_dir).expanduser())
    if isinstance(config, (str, os.PathLike)):
        path = Path(config).expanduser()
        try:
            config = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise CheckpointError(f"{path}: cannot read the transformer config ({exc}).") from exc
    if config is None:
        return dict(WAN_I2V_14B_CONFIG)
    return _normalise_config(config)


def build_transformer(config: Mapping[str, Any], *, meta: bool = False):
    """Instantiate :class:`FlashPortraitTransformer3DModel` from diffusers kwargs (on meta if ``meta``)."""
    from ..models.transformer import FlashPortraitTransformer3DModel

    if meta:
        with empty_model():
            return FlashPortraitTransformer3DModel(**config)
    return FlashPortraitTransformer3DModel(**config)


def load_flashportrait_transformer(
    transformer_path: str | os.PathLike | None = None,
    wan_model_dir: str | os.PathLike | None = None,
    *,
    config: Mapping[str, Any] | str | os.PathLike | None = None,
    dtype: torch.dtype | None = torch.bfloat16,
    device: str | torch.device = "cpu",
):
    """Load the FlashPortrait transformer strictly.

    Args:
        transformer_path: FlashPortrait ``transformer.pt`` (or ``.safetensors``, a sharded index, or a
            folder holding one of them); original Wan or diffusers naming; may hold every key or only the
            trained ones. ``None`` loads the base transformer alone (its NFEB projections must then be in
            it, otherwise the missing ``emo_*`` keys are reported).
        wan_model_dir: the Wan2.1-I2V-14B-720P folder, original or Diffusers layout (detected). Gives the
            config and the weights of any key ``transformer_path`` does not hold.
        config: overrides the config (dict in original or diffusers keys, or a config.json path).
        dtype: cast floating tensors to this dtype (``None`` keeps the file's dtype).
        device: where the loaded model goes.

    Returns:
        ``FlashPortraitTransformer3DModel`` in eval mode.

    Raises:
        CheckpointError: naming the file(s) and every missing, unexpected or mis-shaped key.
    """
    if transformer_path is None and wan_model_dir is None:
        raise CheckpointError("give transformer_path (FlashPortrait transformer.pt) and/or wan_model_dir.")
    base_dir = Path(wan_model_dir).expanduser() if wan_model_dir is not None else None
    resolved = resolve_transformer_config(config, base_dir)
    state_dict: dict[str, torch.Tensor] = {}
    sources = []
    if transformer_path is not None:
        path = Path(transformer_path).expanduser()
        state_dict = convert_transformer_state_dict(read_state_dict(path))
        sources.append(str(path))
        emo = state_dict.get("blocks.0.attn2.emo_k_proj.weight")
        if emo is not None and emo.ndim == 2:  # Wan's config files do not record the expression width
            resolved["expression_dim"] = emo.shape[1]
    model = build_transformer(resolved, meta=True)
    expected = expected_shapes(model)
    if transformer_path is not None:
        # unexpected or mis-shaped keys are refused before any base weights are read
        check_state_dict(expected, state_dict, path, what="the FlashPortrait transformer",
                         ignore_missing=expected.keys(),
                         hint="Is this a FlashPortrait / Wan2.1-I2V transformer checkpoint?")
    missing = [k for k in expected if k not in state_dict]
    if missing and base_dir is not None:
        _, base_weights = _base_transformer_source(base_dir)
        original_keys = list_checkpoint_keys(base_weights)
        renamed = convert_transformer_state_dict({k: k for k in original_keys})
        base_unexpected = [k for k in renamed if k not in expected]
        if base_unexpected:
            raise CheckpointError(
                f"{base_weights}: does not fit the FlashPortrait transformer: "
                f"{format_key_report(unexpected=base_unexpected)}. Is it a Wan2.1-I2V-14B-720P folder?"
            )
        wanted = {k: renamed[k] for k in missing if k in renamed}  # our name -> name in the base files
        base = read_state_dict(base_weights, keys=wanted.values())
        state_dict.update({ours: base[theirs] for ours, theirs in wanted.items()})
        sources.append(str(base_weights))
        logger.info("transformer: %d tensors from %s, %d from the base %s", len(expected) - len(wanted),
                    sources[0], len(wanted), base_weights)
    source = " + ".join(sources)
    hint = ""
    if any(".emo_" in k for k in expected if k not in state_dict):
        hint = "The NFEB projections (emo_k_proj/emo_v_proj) are missing: pass the FlashPortrait transformer.pt."
    elif base_dir is None and len(state_dict) < len(expected):
        hint = "This looks like a partial (trained-keys-only) export: also pass the Wan2.1-I2V base folder."
    load_state_dict_strict(model, state_dict, source, what="the FlashPortrait transformer", dtype=dtype, hint=hint)
    return model.to(device).eval()


#: diffusers -> original Wan names, applied in order to each key (inverse of diffusers' converter)
_TO_ORIGINAL = (
    (r"^condition_embedder\.time_embedder\.linear_1\.", "time_embedding.0."),
    (r"^condition_embedder\.time_embedder\.linear_2\.", "time_embedding.2."),
    (r"^condition_embedder\.text_embedder\.linear_1\.", "text_embedding.0."),
    (r"^condition_embedder\.text_embedder\.linear_2\.", "text_embedding.2."),
    (r"^condition_embedder\.time_proj\.", "time_projection.1."),
    (r"^condition_embedder\.image_embedder\.norm1\.", "img_emb.proj.0."),
    (r"^condition_embedder\.image_embedder\.ff\.net\.0\.proj\.", "img_emb.proj.1."),
    (r"^condition_embedder\.image_embedder\.ff\.net\.2\.", "img_emb.proj.3."),
    (r"^condition_embedder\.image_embedder\.norm2\.", "img_emb.proj.4."),
    (r"^scale_shift_table$", "head.modulation"),
    (r"^proj_out\.", "head.head."),
    (r"^(blocks\.\d+)\.scale_shift_table$", r"\1.modulation"),
    (r"^(blocks\.\d+)\.attn1\.", r"\1.self_attn."),
    (r"^(blocks\.\d+)\.attn2\.", r"\1.cross_attn."),
    (r"\.to_out\.0\.", ".o."),
    (r"\.to_([qkv])\.", r".\1."),
    (r"\.add_([kv])_proj\.", r".\1_img."),
    (r"\.norm_added_k\.", ".norm_k_img."),
    (r"\.ffn\.net\.0\.proj\.", ".ffn.0."),
    (r"\.ffn\.net\.2\.", ".ffn.2."),
    (r"^(blocks\.\d+)\.norm2\.", r"\1.norm3."),  # diffusers' norm2 is the cross-attention norm (original norm3)
)


def convert_transformer_state_dict_to_original(state_dict: Mapping[str, Any]) -> dict[str, Any]:
    """Rename a diffusers-named FlashPortrait transformer state dict to the original Wan naming of the
    released ``transformer.pt`` (exact inverse of :func:`convert_transformer_state_dict`).

    Raises:
        CheckpointError: a key that has no original name (so the round trip would not be exact).
    """
    import re

    out = {}
    for key, value in state_dict.items():
        new = key
        for pattern, repl in _TO_ORIGINAL:
            new = re.sub(pattern, repl, new)
        out[new] = value
    back = convert_transformer_state_dict({k: k for k in out})
    wrong = [k for k, orig in zip(state_dict, out) if k not in back or back[k] != orig]
    if wrong:
        raise CheckpointError(f"cannot express these transformer keys in original Wan naming: {wrong[:10]}")
    return out
