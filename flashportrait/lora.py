"""The released 4-step fast path: the step-distillation LoRA, merged into the transformer for one run
(SPEC.md section 6).

The authors' ``fast_lora_rank64.safetensors`` (LightX2V-style) is merged as ``W += scale * up @ down`` (no
``alpha / rank`` factor, as the released merge) and sampled with four deterministic flow steps at timesteps
1000, 750, 500, 250 under shift 5 (:data:`DISTILL_SIGMAS`). Key formats read (SPEC.md section 6):

* ``X.lora_down.weight`` + ``X.lora_up.weight`` or ``X.lora_A.weight`` + ``X.lora_B.weight``: a low-rank delta
  ``up @ down`` for the weight of layer ``X`` (linear, or convolution with the factors flattened);
* ``X.diff`` / ``X.diff_b``: a full delta for ``X.weight`` (or the bare parameter ``X``, e.g. a modulation
  table) / for ``X.bias``;
* ``X.alpha``: read and ignored (the released merge does not scale by it);
* every key optionally prefixed by ``diffusion_model.`` (also ``model.diffusion_model.``, ``transformer.``);
  ``X`` in the original Wan naming (``blocks.0.self_attn.q``) or in diffusers' (``blocks.0.attn1.to_q``): the
  original names go through :func:`flashportrait.checkpoints.convert_transformer_state_dict`.

Loading is strict: a key in no known format, a target the transformer does not have, an unpaired factor or a
delta whose shape differs from its parameter is a :class:`~flashportrait.checkpoints.CheckpointError` naming
the file and the keys.

How the merge leaves the loaded weights untouched (:func:`merged_lora`): every targeted parameter gets a
``torch.nn.utils.parametrize`` parametrization that returns ``W + scale * up @ down`` (computed in float32,
cast to ``W``'s dtype) each time the layer reads its weight; on exit the parametrizations are removed and the
original ``Parameter`` objects, never written to, are back in place (bit-identical, same storage). Memory:
the factors (rank 64 on the 14B model: about 0.3 B numbers, 0.6 GB in bf16) plus **one** merged weight at a
time (at most 13824 x 5120 numbers, 0.14 GB in bf16) instead of a second copy of every merged weight
(about 27 GB for the 14B model, what merging in place and keeping the originals for restoring would cost).
Compute: one rank-64 product per layer and forward, about 0.1 % of a forward on a 480x832 window.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass

import torch
from torch.nn.utils import parametrize

from .checkpoints import CheckpointError, convert_transformer_state_dict, read_state_dict

__all__ = [
    "DISTILL_SIGMAS",
    "DISTILL_SHIFT",
    "DISTILL_TIMESTEPS",
    "LoRADelta",
    "parse_lora_state_dict",
    "load_lora",
    "merged_lora",
]

logger = logging.getLogger(__name__)

#: sigmas of the distilled 4-step schedule **before** the flow shift, as ``FlowMatchEulerDiscreteScheduler.
#: set_timesteps(sigmas=...)`` takes them; with shift 5 they become 1.0, 0.9375, 0.8333, 0.625 (then 0), i.e.
#: timesteps 1000, 750, 500, 250 of the unshifted training scale (LightX2V's ``denoising_step_list``)
DISTILL_SIGMAS = (1.0, 0.75, 0.5, 0.25)
#: the flow shift the distilled schedule is defined with
DISTILL_SHIFT = 5.0
#: the same schedule as the released script lists it (0..1000 scale, before the shift)
DISTILL_TIMESTEPS = (1000, 750, 500, 250)

_PREFIXES = ("model.diffusion_model.", "diffusion_model.", "transformer.")
#: key suffix -> (slot, which tensor of X it changes)
_SUFFIXES = (
    (".lora_down.weight", "down"),
    (".lora_up.weight", "up"),
    (".lora_A.weight", "down"),
    (".lora_B.weight", "up"),
    (".diff_b", "diff_b"),
    (".diff", "diff"),
    (".alpha", "alpha"),
)


@dataclass
class LoRADelta:
    """The change one file makes to one parameter of the transformer.

    Attributes:
        target: parameter name in the transformer (diffusers naming), e.g. ``blocks.0.attn1.to_q.weight``.
        up: ``[out, r, ...]`` factor (``lora_up`` / ``lora_B``), or ``None``.
        down: ``[r, in, ...]`` factor (``lora_down`` / ``lora_A``), or ``None``.
        diff: full delta of the parameter's shape (``.diff`` / ``.diff_b``), or ``None``.
        source: the file key(s) it came from (for error messages).
    """

    target: str
    up: torch.Tensor | None = None
    down: torch.Tensor | None = None
    diff: torch.Tensor | None = None
    source: str = ""

    def delta(self, shape: torch.Size | tuple[int, ...], device=None) -> torch.Tensor:
        """``up @ down`` (factors flattened to matrices, result reshaped to ``shape``) plus ``diff``, float32."""
        out = None
        if self.up is not None:
            up = self.up.to(device=device, dtype=torch.float32)
            down = self.down.to(device=device, dtype=torch.float32)
            out = (up.reshape(up.shape[0], -1) @ down.reshape(down.shape[0], -1)).reshape(shape)
        if self.diff is not None:
            diff = self.diff.to(device=device, dtype=torch.float32).reshape(shape)
            out = diff if out is None else out + diff
        return out


def _split_key(key: str) -> tuple[str, str] | None:
    """``(X, slot)`` for a LoRA file key, prefixes stripped; ``None`` if the key is in no known format."""
    for prefix in _PREFIXES:
        if key.startswith(prefix):
            key = key[len(prefix):]
            break
    for suffix, slot in _SUFFIXES:
        if key.endswith(suffix):
            return key[: -len(suffix)], slot
    return None


def _resolve_names(candidates: list[str], params: Mapping[str, torch.Tensor]) -> dict[str, str]:
    """Map candidate parameter names (either naming) to the transformer's names; unresolved ones are absent."""
    resolved = {c: c for c in candidates if c in params}
    rest = [c for c in candidates if c not in resolved]
    if rest:
        # one file uses one naming: convert the names it gave all together (the renames are not idempotent)
        converted = convert_transformer_state_dict({c: c for c in candidates})
        back = {orig: new for new, orig in converted.items()}
        resolved.update({c: back[c] for c in rest if back.get(c) in params})
    rest = [c for c in candidates if c not in resolved]
    if rest:  # original names without the markers that identify the naming (e.g. only ffn.0 / ffn.2 layers)
        from diffusers.loaders.single_file_utils import convert_wan_transformer_to_diffusers

        converted = convert_wan_transformer_to_diffusers({c: c for c in rest})
        resolved.update({orig: new for new, orig in converted.items() if new in params})
    return resolved


def parse_lora_state_dict(
    state_dict: Mapping[str, torch.Tensor], model: torch.nn.Module, source: str | os.PathLike = "<LoRA>"
) -> dict[str, LoRADelta]:
    """Pair the keys of a LoRA file and resolve them to ``model``'s parameters.

    Args:
        state_dict: the file's tensors (any of the key formats in the module docstring).
        model: the transformer the LoRA is for (its parameter names and shapes are checked).
        source: named in errors.

    Returns:
        parameter name -> :class:`LoRADelta` (a factor pair and full deltas of one parameter are summed).

    Raises:
        CheckpointError: unknown keys, unpaired factors, targets the model lacks, or shape mismatches.
    """
    params = dict(model.named_parameters())
    slots: dict[str, dict[str, tuple[str, torch.Tensor]]] = {}
    unknown = []
    for key, tensor in state_dict.items():
        split = _split_key(key)
        if split is None:
            unknown.append(key)
            continue
        base, slot = split
        slots.setdefault(base, {})[slot] = (key, tensor)
    if unknown:
        raise CheckpointError(
            f"{source}: {len(unknown)} key(s) in no LoRA format this loader reads: {sorted(unknown)[:10]}. Expected "
            "X.lora_down.weight/X.lora_up.weight, X.lora_A.weight/X.lora_B.weight, X.diff, X.diff_b (optionally "
            "prefixed by diffusion_model.)."
        )
    unpaired = [b for b, s in slots.items() if ("up" in s) != ("down" in s)]
    if unpaired:
        raise CheckpointError(f"{source}: low-rank factors without their partner (up without down or the reverse) "
                              f"for {sorted(unpaired)[:10]}.")
    if any("alpha" in s for s in slots.values()):
        logger.info("%s: the .alpha entries are ignored (the released merge is W += up @ down, no alpha/rank)", source)

    # what each base name changes: (candidate parameter names in preference order, slot names)
    wanted: list[tuple[str, list[str], tuple[str, ...]]] = []
    for base, s in slots.items():
        if "up" in s or "diff" in s:
            wanted.append((base, [f"{base}.weight", base], tuple(k for k in ("up", "diff") if k in s)))
        if "diff_b" in s:
            wanted.append((base, [f"{base}.bias"], ("diff_b",)))
    candidates = sorted({c for _, cands, _ in wanted for c in cands})
    names = _resolve_names(candidates, params)

    deltas: dict[str, LoRADelta] = {}
    missing, mismatched = [], []
    for base, cands, kinds in wanted:
        target = next((names[c] for c in cands if c in names), None)
        if target is None:
            missing.append(cands[0])
            continue
        s = slots[base]
        delta = deltas.setdefault(target, LoRADelta(target))
        shape = tuple(params[target].shape)
        for kind in kinds:
            if kind == "up":
                (up_key, up), (down_key, down) = s["up"], s["down"]
                rank_ok = up.ndim >= 2 and down.ndim >= 2 and up.shape[1] == down.shape[0]
                if not rank_ok or up.shape[0] * math.prod(down.shape[1:]) != math.prod(shape) or up.shape[0] != shape[0]:
                    mismatched.append((up_key, f"up {tuple(up.shape)} @ down {tuple(down.shape)}", shape))
                    continue
                delta.up, delta.down = up, down
                delta.source += f" {up_key} {down_key}"
            else:
                key, diff = s[kind]
                if math.prod(diff.shape) != math.prod(shape) or (diff.ndim > 1 and tuple(diff.shape) != shape):
                    mismatched.append((key, tuple(diff.shape), shape))
                    continue
                delta.diff = diff if delta.diff is None else delta.diff + diff
                delta.source += f" {key}"
    if missing or mismatched:
        parts = []
        if missing:
            parts.append(f"{len(missing)} target(s) the transformer does not have: {sorted(missing)[:10]}")
        if mismatched:
            parts.append(f"{len(mismatched)} shape mismatch(es): "
                         + ", ".join(f"{k}: {got} vs parameter {want}" for k, got, want in mismatched[:10]))
        raise CheckpointError(f"{source}: does not fit this transformer: {'; '.join(parts)}. Is it a LoRA for the "
                              "Wan2.1-I2V-14B / FlashPortrait transformer?")
    if not deltas:
        raise CheckpointError(f"{source}: holds no LoRA deltas.")
    return deltas


def load_lora(path: str | os.PathLike, model: torch.nn.Module) -> dict[str, LoRADelta]:
    """Read a LoRA file (``.safetensors`` or a torch file) and resolve it against ``model``
    (:func:`parse_lora_state_dict`).

    Raises:
        CheckpointError: an unreadable file, or one that does not fit ``model``.
    """
    return parse_lora_state_dict(read_state_dict(path), model, source=path)


class _MergedWeight(torch.nn.Module):
    """Parametrization ``W -> W + scale * delta`` (float32 sum, cast back to ``W``'s dtype).

    The factors are plain attributes, not buffers, so memory hooks (offloading, fp8 storage) neither move
    nor cast them; they are copied to the weight's device once and kept there.
    """

    def __init__(self, delta: LoRADelta, scale: float):
        super().__init__()
        self.lora = delta
        self.scale = float(scale)
        self._on_device: dict[torch.device, LoRADelta] = {}

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        factors = self._on_device.get(weight.device)
        if factors is None:
            d = self.lora

            def move(t):
                return None if t is None else t.to(weight.device)

            factors = self._on_device[weight.device] = LoRADelta(d.target, move(d.up), move(d.down), move(d.diff))
        return (weight.float() + self.scale * factors.delta(weight.shape, weight.device)).to(weight.dtype)


def _owner(model: torch.nn.Module, name: str) -> tuple[torch.nn.Module, str]:
    module_name, _, attr = name.rpartition(".")
    return (model.get_submodule(module_name) if module_name else model), attr


@contextlib.contextmanager
def merged_lora(
    model: torch.nn.Module,
    lora: str | os.PathLike | Mapping[str, LoRADelta] | Mapping[str, torch.Tensor],
    scale: float = 1.0,
) -> Iterator[torch.nn.Module]:
    """Run ``model`` with ``W + scale * up @ down`` for every parameter the LoRA changes; restore on exit.

    Every layer computes its merged weight when it reads it (see the module docstring for the memory cost);
    on exit, also after an exception, the original parameters are back, bit-identical (never written to).

    Args:
        model: the transformer.
        lora: a LoRA file path, a LoRA state dict (file keys -> tensors), or :func:`load_lora`'s result for
            this model.
        scale: the LoRA strength (``--lora_scale``; the released merge uses 1).

    Yields:
        ``model``.

    Raises:
        CheckpointError: the file does not fit (before anything is changed).
        ValueError: a non-finite ``scale``, or a model that already has parametrizations on a target.
    """
    if not isinstance(scale, (int, float)) or scale != scale or scale in (float("inf"), float("-inf")):
        raise ValueError(f"lora scale must be a finite number, got {scale!r}")
    if not isinstance(lora, Mapping):
        deltas = load_lora(lora, model)
    elif all(isinstance(v, LoRADelta) for v in lora.values()):
        deltas = lora
    else:
        deltas = parse_lora_state_dict(lora, model)
    owners = [(_owner(model, name), delta) for name, delta in deltas.items()]
    for (module, attr), delta in owners:
        if parametrize.is_parametrized(module, attr):
            raise ValueError(f"{delta.target} is already parametrized (a LoRA merged twice?)")
    done: list[tuple[torch.nn.Module, str]] = []
    try:
        for (module, attr), delta in owners:
            parametrize.register_parametrization(module, attr, _MergedWeight(delta, scale), unsafe=True)
            done.append((module, attr))
        yield model
    finally:
        for module, attr in reversed(done):
            parametrize.remove_parametrizations(module, attr, leave_parametrized=False)
