"""The Wan2.1 VAE as ``diffusers.AutoencoderKLWan`` (SPEC.md section 3).

* original: ``Wan2.1_VAE.pth``, converted by diffusers' ``convert_wan_vae_to_diffusers`` with the sizes read
  from the shapes (:func:`wan_vae_config_from_state_dict`); :func:`convert_wan_vae_diffusers_to_original` is
  its inverse (names keys in errors, writes original-format test files);
* Diffusers: ``vae/`` (config.json + weights), loaded strictly.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from ..config import LATENT_CHANNELS
from .common import (
    CheckpointError,
    PathLike,
    cast_once,
    check_then_load,
    config_dict,
    diffusers_weights_file,
    empty_model,
    layer_indices,
    load_state_dict_strict,
    read_state_dict,
    require_key,
    to_device,
)

__all__ = [
    "WAN21_VAE",
    "WAN21_LATENTS_MEAN",
    "WAN21_LATENTS_STD",
    "convert_wan_vae_diffusers_to_original",
    "wan_vae_config_from_state_dict",
    "load_wan_vae",
]

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
    cfg = config_dict(config)
    conv_in = require_key(state_dict, "encoder.conv1.weight", source, what)
    z_dim = require_key(state_dict, "conv2.weight", source, what).shape[0]
    head = require_key(state_dict, "decoder.head.2.weight", source, what)
    base_dim = conv_in.shape[0]
    levels: list[list[int]] = [[]]
    temporal: list[bool] = []
    for idx in layer_indices(state_dict, "encoder.downsamples."):
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
        weights = diffusers_weights_file(path)
        with empty_model():
            model = AutoencoderKLWan.from_config(vae_config)
        load_state_dict_strict(
            model,
            cast_once(read_state_dict(weights), dtype),
            weights,
            what="AutoencoderKLWan (config.json)",
            hint="Re-download the vae/ folder or fix its config.json.",
        )
        return to_device(model.eval(), device)
    state_dict = read_state_dict(path)
    vae_config = wan_vae_config_from_state_dict(state_dict, config, path)
    with empty_model():
        model = AutoencoderKLWan(**vae_config)
    what = (
        f"the Wan VAE (base_dim {vae_config['base_dim']}, z_dim {vae_config['z_dim']}, dim_mult "
        f"{vae_config['dim_mult']})"
    )
    check_then_load(
        model,
        state_dict,
        convert_wan_vae_diffusers_to_original,
        convert_wan_vae_to_diffusers,
        path,
        what=what,
        dtype=dtype,
        hint="Expected Wan's Wan2.1_VAE.pth (original naming).",
    )
    return to_device(model.eval(), device)
