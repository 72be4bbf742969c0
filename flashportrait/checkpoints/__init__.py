"""Checkpoint files -> models: format detection, key maps, strict loading (SPEC.md section 3).

One module per component; every loader is importable from here:

* :mod:`.common`: reading files (safetensors, torch, sharded indexes) and strict loading;
* :mod:`.layout`: which of the two Wan2.1-I2V folder layouts a directory holds;
* :mod:`.transformer`: the FlashPortrait transformer (``transformer.pt`` + Wan base, either naming);
* :mod:`.portrait_encoder`, :mod:`.motion_encoder`: ``portrait_encoder.pt``, ``pd_fpg.pth``;
* :mod:`.umt5`, :mod:`.clip`, :mod:`.vae`: Wan's frozen components, original or Diffusers files;
* :mod:`.wan`: all frozen components of a Wan folder at once.

Models (:mod:`flashportrait.models`) know nothing about files; this package builds them.
"""

from .clip import (
    CLIP_VIT_H_14,
    clip_config_from_state_dict,
    convert_clip_original_to_transformers,
    convert_clip_transformers_to_original,
    load_clip_vision,
)
from .common import (
    CheckpointError,
    check_state_dict,
    empty_model,
    format_key_report,
    list_checkpoint_keys,
    load_state_dict_strict,
    read_state_dict,
    unwrap_state_dict,
)
from .layout import detect_wan_layout
from .motion_encoder import load_pdfgc_motion_encoder
from .portrait_encoder import load_portrait_encoder
from .transformer import (
    build_transformer,
    convert_transformer_state_dict,
    convert_transformer_state_dict_to_original,
    load_flashportrait_transformer,
    resolve_transformer_config,
)
from .umt5 import (
    UMT5_XXL,
    convert_umt5_original_to_transformers,
    convert_umt5_transformers_to_original,
    load_umt5_encoder,
    load_umt5_tokenizer,
    umt5_config_from_state_dict,
)
from .vae import (
    WAN21_LATENTS_MEAN,
    WAN21_LATENTS_STD,
    WAN21_VAE,
    convert_wan_vae_diffusers_to_original,
    load_wan_vae,
    wan_vae_config_from_state_dict,
)
from .wan import load_wan_i2v_components

__all__ = [
    "CheckpointError",
    "check_state_dict",
    "empty_model",
    "format_key_report",
    "list_checkpoint_keys",
    "load_state_dict_strict",
    "read_state_dict",
    "unwrap_state_dict",
    "detect_wan_layout",
    "build_transformer",
    "convert_transformer_state_dict",
    "convert_transformer_state_dict_to_original",
    "load_flashportrait_transformer",
    "resolve_transformer_config",
    "load_portrait_encoder",
    "load_pdfgc_motion_encoder",
    "UMT5_XXL",
    "convert_umt5_original_to_transformers",
    "convert_umt5_transformers_to_original",
    "umt5_config_from_state_dict",
    "load_umt5_encoder",
    "load_umt5_tokenizer",
    "CLIP_VIT_H_14",
    "convert_clip_original_to_transformers",
    "convert_clip_transformers_to_original",
    "clip_config_from_state_dict",
    "load_clip_vision",
    "WAN21_VAE",
    "WAN21_LATENTS_MEAN",
    "WAN21_LATENTS_STD",
    "convert_wan_vae_diffusers_to_original",
    "wan_vae_config_from_state_dict",
    "load_wan_vae",
    "load_wan_i2v_components",
]
