"""Training checkpoints -> the files ``infer.py`` loads (``bin_convert_pt.py``; SPEC.md section 7).

Inputs: an accelerate / DeepSpeed checkpoint folder (``checkpoint-<step>/`` with ``latest`` and the ZeRO shards;
read with DeepSpeed's own ``get_fp32_state_dict_from_zero_checkpoint`` in lazy mode, so tensors are gathered one
at a time), or a folder / file of fp32 ``.bin`` / ``.safetensors`` shards (what DeepSpeed's ``zero_to_fp32.py``
writes). Its keys are :class:`~flashportrait.training.trainable.FlashPortraitTrainModel`'s: ``transformer.*``
(diffusers naming) and ``portrait_encoder.*``.

Outputs: ``transformer.pt`` in the **original Wan naming** of the released file (``blocks.N.cross_attn.emo_k_proj
.weight`` ...) and ``portrait_encoder.pt`` (``proj_model.*``, ``mouth_proj_model.*``, ``emo_proj_model.*``);
optionally safetensors, a Diffusers-format transformer folder, or only the trained tensors (a small file that
:func:`~flashportrait.checkpoints.load_flashportrait_transformer` completes from the Wan2.1-I2V base).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch

from ..atomic import atomic_path
from .checkpointing import read_train_info
from .trainable import trainable_parameter_names

__all__ = [
    "TRANSFORMER_PREFIX",
    "PORTRAIT_ENCODER_PREFIX",
    "is_deepspeed_checkpoint",
    "read_training_state_dict",
    "split_training_state_dict",
    "expected_training_shapes",
    "check_split",
    "materialize",
    "save_tensors",
    "export_checkpoint",
]

TRANSFORMER_PREFIX = "transformer."
PORTRAIT_ENCODER_PREFIX = "portrait_encoder."


def is_deepspeed_checkpoint(folder: Path) -> bool:
    """A folder DeepSpeed's zero-to-fp32 reads: ``latest`` naming a tag folder of ``*model_states.pt`` files."""
    latest = folder / "latest"
    if not (folder.is_dir() and latest.is_file()):
        return False
    tag = latest.read_text().strip()
    return any((folder / tag).glob("*model_states.pt"))


def read_training_state_dict(path: str | os.PathLike) -> tuple[Mapping[str, Any], dict | None]:
    """The trained model's tensors (values are tensors or DeepSpeed's lazy tensors: call :func:`materialize`)
    and the run's ``flashportrait_train.json`` (or ``None``).

    Accepts: an accelerate/DeepSpeed checkpoint folder; a DeepSpeed tag folder inside one (``pytorch_model/``);
    an accelerate checkpoint folder made without DeepSpeed (``model.safetensors`` + ``optimizer.bin``); a folder or
    file of consolidated shards (:func:`flashportrait.checkpoints.read_state_dict`).

    Raises:
        CheckpointError: nothing readable at ``path``.
    """
    from ..checkpoints import CheckpointError, read_state_dict

    path = Path(path).expanduser()
    if not path.exists():
        raise CheckpointError(f"{path}: no such checkpoint folder or file")
    if path.is_dir() and not is_deepspeed_checkpoint(path) and is_deepspeed_checkpoint(path.parent) \
            and any(path.glob("*model_states.pt")):
        path = path.parent  # the tag folder itself was given
    info = read_train_info(path if path.is_dir() else path.parent)
    if path.is_dir() and is_deepspeed_checkpoint(path):
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        return get_fp32_state_dict_from_zero_checkpoint(str(path), lazy_mode=True), info
    if path.is_dir():  # accelerate's save_state without DeepSpeed: model weights beside optimizer.bin, scheduler.bin
        for name in ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin"):
            if (path / name).is_file() and (path / "optimizer.bin").is_file():
                path = path / name
                break
    return read_state_dict(path), info


def _strip_module(keys: Iterable[str]) -> str:
    keys = list(keys)
    return "module." if keys and all(k.startswith("module.") for k in keys) else ""


def split_training_state_dict(state_dict: Mapping[str, Any], trainable: Iterable[str] | None = None,
                              trained_only: bool = False) -> tuple[dict[str, Any], dict[str, Any]]:
    """Split ``transformer.*`` / ``portrait_encoder.*`` keys into the two models' own names.

    Args:
        state_dict: from :func:`read_training_state_dict` (a ``module.`` prefix on every key is dropped).
        trainable: the trained names (``flashportrait_train.json``'s ``"trainable"``); default: the rule of
            :func:`~flashportrait.training.trainable.select_trainable` applied to the names.
        trained_only: keep only the trained tensors.

    Returns:
        ``(transformer {diffusers name: value}, portrait encoder {name: value})``; values are not copied.

    Raises:
        CheckpointError: keys of neither model (listed), or no transformer key at all.
    """
    from ..checkpoints import CheckpointError, format_key_report

    prefix = _strip_module(state_dict)
    names = {k[len(prefix):]: k for k in state_dict}
    keep = set(trainable if trainable is not None else trainable_parameter_names(names)) if trained_only else None
    transformer, encoder, unknown = {}, {}, []
    for name, key in names.items():
        if keep is not None and name not in keep:
            continue
        if name.startswith(TRANSFORMER_PREFIX):
            transformer[name[len(TRANSFORMER_PREFIX):]] = state_dict[key]
        elif name.startswith(PORTRAIT_ENCODER_PREFIX):
            encoder[name[len(PORTRAIT_ENCODER_PREFIX):]] = state_dict[key]
        else:
            unknown.append(name)
    if unknown or not transformer:
        raise CheckpointError(
            "not a FlashPortrait training checkpoint (expected keys transformer.* and portrait_encoder.*): "
            + (format_key_report(unexpected=unknown) if unknown else "no transformer.* key")
        )
    return transformer, encoder


def expected_training_shapes(info: Mapping[str, Any]) -> tuple[dict[str, tuple], dict[str, tuple]]:
    """Shapes of every transformer (diffusers names) and portrait encoder tensor, from the run's configs (models
    built on the meta device)."""
    from ..checkpoints import build_transformer, empty_model
    from ..models.portrait_encoder import PortraitEncoder, PortraitEncoderConfig

    config = dict(info["transformer_config"])
    if "patch_size" in config:
        config["patch_size"] = tuple(config["patch_size"])
    transformer = build_transformer(config, meta=True)
    with empty_model():
        encoder = PortraitEncoder(PortraitEncoderConfig(**info["portrait_encoder_config"]))
    shapes = lambda m: {k: tuple(v.shape) for k, v in m.state_dict().items()}  # noqa: E731
    return shapes(transformer), shapes(encoder)


def check_split(transformer: Mapping[str, Any], encoder: Mapping[str, Any], info: Mapping[str, Any], source,
                trained_only: bool) -> None:
    """Refuse a checkpoint whose tensors do not fit the run's models exactly (all, or exactly the trained set).

    Raises:
        CheckpointError: naming every missing, unexpected or mis-shaped key.
    """
    from ..checkpoints import check_state_dict

    want_t, want_e = expected_training_shapes(info)
    if trained_only:
        trained = set(info.get("trainable") or trainable_parameter_names(
            [TRANSFORMER_PREFIX + k for k in want_t] + [PORTRAIT_ENCODER_PREFIX + k for k in want_e]))
        want_t = {k: v for k, v in want_t.items() if TRANSFORMER_PREFIX + k in trained}
        want_e = {k: v for k, v in want_e.items() if PORTRAIT_ENCODER_PREFIX + k in trained}
    shape = lambda v: tuple(v.shape)  # noqa: E731 - lazy tensors have .shape too
    check_state_dict(want_t, {k: shape(v) for k, v in transformer.items()}, source, what="the trained transformer")
    check_state_dict(want_e, {k: shape(v) for k, v in encoder.items()}, source, what="the trained portrait encoder")


def materialize(value: Any, dtype: torch.dtype | None) -> torch.Tensor:
    """A real, contiguous CPU tensor from a tensor or DeepSpeed lazy tensor; floating ones cast to ``dtype``."""
    tensor = value.contiguous() if not isinstance(value, torch.Tensor) else value.detach().cpu().contiguous()
    if dtype is not None and tensor.is_floating_point() and tensor.dtype != dtype:
        return tensor.to(dtype)
    if tensor.untyped_storage().nbytes() != tensor.numel() * tensor.element_size():
        tensor = tensor.clone()  # a view into DeepSpeed's flat buffer: saving it would write the whole buffer
    return tensor


def save_tensors(tensors: dict[str, torch.Tensor], path: Path, safetensors: bool) -> Path:
    """Write atomically (temp file in the same folder, then rename): ``torch.save`` or safetensors."""
    with atomic_path(path) as tmp:
        if safetensors:
            from safetensors.torch import save_file

            save_file(tensors, tmp, metadata={"format": "pt"})
        else:
            torch.save(tensors, tmp)
    return path


def export_checkpoint(
    source: str | os.PathLike,
    output_dir: str | os.PathLike,
    *,
    dtype: torch.dtype | None = torch.float32,
    safetensors: bool = False,
    diffusers: bool = False,
    trained_only: bool = False,
    info: Mapping[str, Any] | None = None,
) -> dict[str, Path]:
    """Write the converted files (module docstring).

    Args:
        source: see :func:`read_training_state_dict`.
        output_dir: where the files go (created).
        dtype: floating dtype of the written tensors (``None``: as stored, fp32 from zero-to-fp32).
        safetensors: ``.safetensors`` instead of ``.pt``.
        diffusers: a Diffusers-format ``transformer/`` folder (``config.json`` + ``diffusion_pytorch_model.
            safetensors``, diffusers naming) instead of ``transformer.pt``; needs the run's configs.
        trained_only: only the trained tensors.
        info: the run's ``flashportrait_train.json`` content when the source has none beside it.

    Returns:
        ``{"transformer": path, "portrait_encoder": path}``.

    Raises:
        CheckpointError: an unreadable source or tensors that do not fit the run's models.
        ValueError: ``diffusers`` without the run's configs.
    """
    from ..checkpoints import convert_transformer_state_dict_to_original

    state_dict, found = read_training_state_dict(source)
    info = info or found
    transformer, encoder = split_training_state_dict(state_dict, (info or {}).get("trainable"), trained_only)
    if info is not None:
        check_split(transformer, encoder, info, source, trained_only)
    elif diffusers:
        raise ValueError(f"{source}: no flashportrait_train.json beside it, so the transformer config is unknown; "
                         "pass --train_info checkpoint-<step>/flashportrait_train.json")
    output_dir = Path(output_dir).expanduser()
    suffix = ".safetensors" if safetensors else ".pt"
    written = {}
    # one output model at a time, tensor by tensor: only the written model is held beyond DeepSpeed's buffers
    tensors = {k: materialize(transformer.pop(k), dtype) for k in list(transformer)}
    if diffusers:
        from ..checkpoints import build_transformer

        config = dict(info["transformer_config"])
        config["patch_size"] = tuple(config.get("patch_size", (1, 2, 2)))
        folder = output_dir / "transformer"
        folder.mkdir(parents=True, exist_ok=True)
        build_transformer(config, meta=True).save_config(folder)
        written["transformer"] = save_tensors(tensors, folder / "diffusion_pytorch_model.safetensors", True)
    else:
        tensors = convert_transformer_state_dict_to_original(tensors)
        written["transformer"] = save_tensors(tensors, output_dir / f"transformer{suffix}", safetensors)
    del tensors
    tensors = {k: materialize(encoder.pop(k), dtype) for k in list(encoder)}
    as_safetensors = safetensors or diffusers
    written["portrait_encoder"] = save_tensors(
        tensors, output_dir / ("portrait_encoder.safetensors" if as_safetensors else "portrait_encoder.pt"), as_safetensors)
    if info is not None and diffusers:
        (output_dir / "portrait_encoder_config.json").write_text(json.dumps(info["portrait_encoder_config"], indent=1))
    return written
