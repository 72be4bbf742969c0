"""What is trained, and the one module DeepSpeed wraps (SPEC.md section 7).

Trainable: every attention parameter inside the DiT blocks (self-attention ``attn1`` and cross-attention
``attn2`` with its image keys / values and the NFEB's ``emo_k_proj`` / ``emo_v_proj``, including the
attention modules' q / k RMS norms) plus the whole portrait encoder. Everything else is frozen: patch
embedding, condition embedders, the blocks' LayerNorms, modulation tables and feed-forward layers, the
output head. In the original Wan naming the trainable block parameters are ``blocks.N.self_attn.*`` and
``blocks.N.cross_attn.*``.

DeepSpeed trains one module, so :class:`FlashPortraitTrainModel` holds the transformer and the portrait
encoder (state-dict prefixes ``transformer.`` and ``portrait_encoder.``). The frozen Wan encoders (VAE,
umT5, CLIP) and the PD-FGC motion encoder stay outside it: they are never in the optimizer, never
partitioned by ZeRO, and the text encoder is dropped after the few training prompts are encoded.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

import torch
from torch import nn

from ..models.portrait_encoder import split_tokens_per_latent_frame

__all__ = [
    "TRAINABLE_TRANSFORMER_PATTERN",
    "is_trainable_transformer_key",
    "select_trainable",
    "trainable_parameter_names",
    "FlashPortraitTrainModel",
]

#: diffusers names of the trainable transformer tensors (attention modules inside the blocks)
TRAINABLE_TRANSFORMER_PATTERN = re.compile(r"^blocks\.\d+\.attn[12]\.")


def is_trainable_transformer_key(name: str) -> bool:
    """True for a transformer parameter (diffusers naming) that training updates."""
    return TRAINABLE_TRANSFORMER_PATTERN.match(name) is not None


class FlashPortraitTrainModel(nn.Module):
    """The trainable pair as one module: ``transformer`` (``FlashPortraitTransformer3DModel``) and
    ``portrait_encoder`` (``PortraitEncoder``).

    ``forward`` predicts the flow velocity of a training batch: features -> expression tokens -> per latent
    frame windows -> the transformer (SPEC.md sections 2 and 7).
    """

    def __init__(self, transformer: nn.Module, portrait_encoder: nn.Module):
        super().__init__()
        self.transformer = transformer
        self.portrait_encoder = portrait_encoder

    def forward(
        self,
        noisy_latents: torch.Tensor,
        condition: torch.Tensor,
        timestep: torch.Tensor,
        prompt_embeds: torch.Tensor,
        image_embeds: torch.Tensor,
        expression_features: torch.Tensor,
        expression_keep: torch.Tensor,
    ) -> torch.Tensor:
        """Args:
            noisy_latents: ``[B, 16, F, h, w]`` ``x_t = (1 - sigma) x_0 + sigma eps`` (normalised latents).
            condition: ``[B, 20, F, h, w]``: 4 mask channels (1 on latent frame 0) + 16 latents of
                ``[reference, zeros ...]``.
            timestep: ``[B]`` on the 0..1000 scale (``1000 sigma``).
            prompt_embeds: ``[B, Lt, text_dim]`` umT5 states; image_embeds: ``[B, 257, image_dim]`` CLIP states.
            expression_features: ``[B, N, 554]`` with ``N = 4(F - 1) + 1`` video frames.
            expression_keep: ``[B]`` 1 to keep a sample's expression tokens, 0 to zero them (condition dropout,
                as the released trainer does).

        Returns:
            ``[B, 16, F, h, w]`` predicted velocity ``eps - x_0`` in the model's dtype.
        """
        dtype = next(self.transformer.parameters()).dtype
        enc_dtype = next(self.portrait_encoder.parameters()).dtype
        tokens = self.portrait_encoder(expression_features.to(enc_dtype))
        tokens = split_tokens_per_latent_frame(tokens, noisy_latents.shape[2], self.portrait_encoder.tokens_per_frame)
        tokens = tokens * expression_keep.to(tokens.dtype).view(-1, 1, 1, 1)
        hidden = torch.cat([noisy_latents, condition], dim=1).to(dtype)
        return self.transformer(
            hidden_states=hidden,
            timestep=timestep,
            encoder_hidden_states=prompt_embeds.to(dtype),
            encoder_hidden_states_image=image_embeds.to(dtype),
            expression_tokens=tokens.to(dtype),
            return_dict=False,
        )[0]


def select_trainable(transformer: nn.Module, portrait_encoder: nn.Module) -> list[str]:
    """Set ``requires_grad`` on the trainable set only (module docstring); return its names.

    Returns:
        Names in :class:`FlashPortraitTrainModel` naming (``transformer.blocks.0.attn1.to_q.weight``, ...,
        ``portrait_encoder.*``), in module order.

    Raises:
        ValueError: a transformer without attention parameters in blocks (not a FlashPortrait / Wan model).
    """
    names = []
    for name, param in transformer.named_parameters():
        train = is_trainable_transformer_key(name)
        param.requires_grad_(train)
        if train:
            names.append("transformer." + name)
    if not names:
        raise ValueError("the transformer has no blocks.N.attn1 / attn2 parameters; is it a FlashPortrait transformer?")
    for name, param in portrait_encoder.named_parameters():
        param.requires_grad_(True)
        names.append("portrait_encoder." + name)
    return names


def trainable_parameter_names(names: Iterable[str]) -> list[str]:
    """The trainable subset of :class:`FlashPortraitTrainModel` state-dict ``names`` (same rule as
    :func:`select_trainable`, from names alone: e.g. for a checkpoint on disk)."""
    out = []
    for name in names:
        if name.startswith("portrait_encoder."):
            out.append(name)
        elif name.startswith("transformer.") and is_trainable_transformer_key(name[len("transformer."):]):
            out.append(name)
    return out
