"""The FlashPortrait transformer: Wan2.1-I2V with a Normalized Facial Expression Block in every block.

Diffusers' Wan model is extended the way diffusers extends itself (Wan-Animate, VACE): subclasses of
the model, the block, the attention module and its processor, with the new inputs threaded through as
explicit forward arguments (``expression_tokens``, ``expression_scale``) instead of state stashed on
modules.

NFEB (SPEC.md section 2; paper section 3.2), inside the cross-attention of every block, with ``q`` the
normed cross-attention query:

1. ``x = CA_text(q) + CA_image(q)`` (image tokens are the first ``num_image_tokens`` context tokens);
2. ``e`` = per-frame attention of each latent frame's video tokens to its own 97 expression tokens,
   keys / values from ``emo_k_proj`` / ``emo_v_proj`` (no key norm);
3. ``e' = (e - mean(e)) * std(x) / (std(e) + 1e-5) + mean(x)``, statistics per sample over all tokens
   and channels, std unbiased;
4. ``out = to_out(x + scale * e')`` with a per-sample ``scale`` (1: conditional, 0: "no expression").

Sequence (context) parallelism: whole latent frames per rank (:class:`LatentFrameTokens`, ``_cp_plan``), NFEB
statistics summed over ranks (:func:`context_parallel_sum`), tokens gathered back (:func:`gather_latent_frames`).

Length: the model, its block, attention, processor and the NFEB statistics they share, with the context-parallel
pieces that change how the NFEB sees the sequence, are one unit; split, each part would import the others.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
import torch.nn as nn
from diffusers.configuration_utils import register_to_config
from diffusers.models._modeling_parallel import ContextParallelInput
from diffusers.models.attention_dispatch import dispatch_attention_fn
from diffusers.models.modeling_outputs import Transformer2DModelOutput
from diffusers.models.transformers.transformer_wan import (
    WanAttention,
    WanAttnProcessor,
    WanTransformer3DModel,
    WanTransformerBlock,
    _get_added_kv_projections,
    _get_qkv_projections,
)
from diffusers.utils import apply_lora_scale

from ..config import CLIP_IMAGE_TOKENS, EXPRESSION_TOKEN_DIM

__all__ = [
    "FlashPortraitAttnProcessor",
    "FlashPortraitAttention",
    "FlashPortraitTransformerBlock",
    "FlashPortraitTransformer3DModel",
    "renormalize_to_reference",
    "expand_expression_scale",
    "context_parallel_sum",
    "gather_latent_frames",
    "LatentFrameTokens",
]

NFEB_EPS = 1e-5


#: tokens per chunk when the NFEB statistics are taken: fp32 temporaries stay at this many tokens per sample
NFEB_CHUNK_TOKENS = 4096

#: ``reduce(t) -> t`` summing a float64 tensor of per-sample partial sums over the ranks that hold the other
#: parts of the sequence (sequence parallelism); ``None`` when the whole sequence is here
Reduce = Callable[[torch.Tensor], torch.Tensor]


def _chunked_sum(t: torch.Tensor, fn: Callable[[torch.Tensor], torch.Tensor], chunk: int) -> torch.Tensor:
    """Per-sample ``sum(fn(t_chunk.float()))`` over the token axis of ``t`` [B, L, C], chunk by chunk: the fp32
    temporaries hold ``chunk`` tokens, the chunk sums are accumulated in float64. Returns float64 [B]."""
    total = torch.zeros(t.shape[0], dtype=torch.float64, device=t.device)
    for start in range(0, t.shape[1], chunk):
        total += fn(t[:, start : start + chunk].float()).sum(dim=(1, 2), dtype=torch.float64)
    return total


def _mean_std(t: torch.Tensor, chunk: int, reduce: Reduce | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample mean and unbiased std of ``t`` [B, L, C] over tokens and channels, in two passes (sum, then
    squared deviations from the mean: no cancellation), float64 [B, 1, 1] each."""
    count = torch.full((t.shape[0],), float(t.shape[1] * t.shape[2]), dtype=torch.float64, device=t.device)
    total = _chunked_sum(t, lambda c: c, chunk)
    if reduce is not None:
        count, total = reduce(count), reduce(total)
    mean = total / count
    m32 = mean.float().view(-1, 1, 1)
    squares = _chunked_sum(t, lambda c: (c - m32).square(), chunk)
    if reduce is not None:
        squares = reduce(squares)
    variance = squares / (count - 1)
    # sqrt with a finite gradient where the variance is 0 (a constant tensor, e.g. the NFEB output for the all-zero
    # expression tokens of training's condition dropout): the same values, but gradient 0 there instead of NaN
    positive = variance > 0
    std = torch.where(positive, variance, torch.ones_like(variance)).sqrt() * positive
    return mean.view(-1, 1, 1), std.view(-1, 1, 1)


def renormalize_to_reference(
    e: torch.Tensor,
    x: torch.Tensor,
    eps: float = NFEB_EPS,
    *,
    chunk_tokens: int = NFEB_CHUNK_TOKENS,
    reduce: Reduce | None = None,
) -> torch.Tensor:
    """Shift and scale ``e`` to the mean and standard deviation of ``x`` (NFEB step 3, SPEC.md section 2).

    ``e' = (e - mean(e)) * std(x) / (std(e) + eps) + mean(x)``, with mean and (unbiased) std taken per
    sample over every token and channel.

    Memory: the statistics are taken in float32 chunk by chunk (``chunk_tokens`` tokens; partial sums in
    float64), in two passes per tensor, and the result is written chunk by chunk into one tensor of ``e``'s
    dtype: no full-size float32 copy of ``e`` or ``x`` is made (at 720x1280 x 51 latent frames one such copy
    is ~3.7 GB per sample; ``bench/bench_nfeb_memory.py`` measures the block).

    Args:
        e: expression-attention output, ``[B, L, C]``.
        x: text + image cross-attention output, ``[B, L, C]``.
        chunk_tokens: tokens per chunk.
        reduce: sums per-sample partial sums over ranks when ``e`` and ``x`` hold only this rank's part of the
            sequence (sequence parallelism); the statistics then equal those of the whole sequence.

    Returns:
        ``[B, L, C]`` in ``e``'s dtype.
    """
    e_mean, e_std = _mean_std(e, chunk_tokens, reduce)
    x_mean, x_std = _mean_std(x, chunk_tokens, reduce)
    scale = (x_std / (e_std + eps)).float()
    shift = (x_mean - e_mean * (x_std / (e_std + eps))).float()  # e' = e * scale + shift
    out = torch.empty_like(e)
    for start in range(0, e.shape[1], chunk_tokens):
        part = e[:, start : start + chunk_tokens].float()
        out[:, start : start + chunk_tokens] = (part * scale + shift).to(e.dtype)
    return out


def context_parallel_sum(parallel_config) -> Reduce | None:
    """The ``reduce`` of :func:`renormalize_to_reference` under diffusers' context parallelism.

    Args:
        parallel_config: a processor's ``_parallel_config`` (set by ``ModelMixin.enable_parallelism``), or ``None``.

    Returns:
        ``None`` without context parallelism; else a function that sums a float64 tensor of per-sample partial
        sums over every rank of the context-parallel group (ring x ulysses), each rank holding whole latent frames
        of the sequence (:class:`LatentFrameTokens`), so the NFEB statistics equal the unsharded ones.
    """
    cp_config = getattr(parallel_config, "context_parallel_config", None)
    if cp_config is None or cp_config._flattened_mesh is None or cp_config._flattened_mesh.size() == 1:
        return None
    group = cp_config._flattened_mesh.get_group()

    def reduce(partial: torch.Tensor) -> torch.Tensor:
        total = partial.clone()
        dist.all_reduce(total, op=dist.ReduceOp.SUM, group=group)
        return total

    return reduce


def gather_latent_frames(tokens: torch.Tensor, num_frames: int, cp_config) -> torch.Tensor:
    """All-gather the per-rank token shards of a sequence split into whole latent frames, in frame order.

    Rank ``i`` of the context-parallel group holds frames ``tensor_split(range(num_frames), n)[i]`` (the split of
    :class:`LatentFrameTokens`); every rank can compute every shard's size, so no sizes are exchanged. Shards are
    padded to the largest one for one equal-size ``all_gather`` (diffusers' own gather of unequal shards is an
    ``all_gather`` of unequal tensors, which NCCL accepts and gloo does not).

    Args:
        tokens: ``[B, f_i * tokens_per_frame, C]`` this rank's tokens.
        num_frames: latent frames of the whole sequence.
        cp_config: the model's ``ContextParallelConfig`` (after ``enable_parallelism``).

    Returns:
        ``[B, num_frames * tokens_per_frame, C]``, identical on every rank of the group.
    """
    mesh = cp_config._flattened_mesh
    group, n = mesh.get_group(), mesh.size()
    frames = [len(part) for part in torch.arange(num_frames).tensor_split(n)]
    rank = dist.get_rank(group)
    per_frame = tokens.shape[1] // frames[rank]
    padded = tokens.new_zeros(tokens.shape[0], max(frames) * per_frame, tokens.shape[2])
    padded[:, : tokens.shape[1]] = tokens
    shards = [torch.empty_like(padded) for _ in range(n)]
    dist.all_gather(shards, padded, group=group)
    return torch.cat([shard[:, : f * per_frame] for shard, f in zip(shards, frames)], dim=1)


def expand_expression_scale(
    scale: float | torch.Tensor | None, batch_size: int, device: torch.device, dtype: torch.dtype
) -> torch.Tensor | None:
    """Turn a float or ``[B]`` tensor of expression scales into a ``[B, 1, 1]`` tensor (``None`` stays ``None``).

    Raises:
        ValueError: a tensor whose size is neither 1 nor ``batch_size``.
    """
    if scale is None:
        return None
    scale = torch.as_tensor(scale, device=device, dtype=dtype).reshape(-1)
    if scale.numel() == 1:
        scale = scale.expand(batch_size)
    elif scale.numel() != batch_size:
        raise ValueError(f"expression_scale has {scale.numel()} values for a batch of {batch_size}; give 1 or {batch_size}.")
    return scale.view(batch_size, 1, 1)


class FlashPortraitAttnProcessor(WanAttnProcessor):
    """Cross-attention processor with the NFEB; a plain Wan processor for self-attention.

    Uses ``dispatch_attention_fn``, so diffusers' attention backends (``set_attention_backend``) apply to
    the text, image and expression attentions alike.
    """

    def __call__(
        self,
        attn: FlashPortraitAttention,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        rotary_emb: tuple[torch.Tensor, torch.Tensor] | None = None,
        expression_tokens: torch.Tensor | None = None,
        expression_scale: torch.Tensor | None = None,
        num_image_tokens: int = CLIP_IMAGE_TOKENS,
    ) -> torch.Tensor:
        """Args:
        hidden_states: normed video tokens ``[B, L, C]``, frame-major (``L = F * tokens per frame``).
        encoder_hidden_states: ``[B, num_image_tokens + Lt, C]`` (image tokens first) for cross-attention.
        expression_tokens: ``[B, F, W, C_expr]`` (``W`` = 97 released), or ``None`` for plain Wan.
        expression_scale: ``[B, 1, 1]`` per-sample scale of the expression term, ``None`` means 1.
        num_image_tokens: how many leading context tokens are CLIP image tokens (257 for Wan I2V).
        """
        if encoder_hidden_states is None or attn.add_k_proj is None:
            if expression_tokens is not None:
                raise ValueError("expression_tokens are only used by the I2V cross-attention (added_kv_proj_dim set).")
            return super().__call__(attn, hidden_states, encoder_hidden_states, attention_mask, rotary_emb)

        encoder_hidden_states_img = encoder_hidden_states[:, :num_image_tokens]
        encoder_hidden_states = encoder_hidden_states[:, num_image_tokens:]

        query, key, value = _get_qkv_projections(attn, hidden_states, encoder_hidden_states)
        query = attn.norm_q(query).unflatten(2, (attn.heads, -1))
        key = attn.norm_k(key).unflatten(2, (attn.heads, -1))
        value = value.unflatten(2, (attn.heads, -1))

        if num_image_tokens > 0:
            key_img, value_img = _get_added_kv_projections(attn, encoder_hidden_states_img)
            key_img = attn.norm_added_k(key_img).unflatten(2, (attn.heads, -1))
            value_img = value_img.unflatten(2, (attn.heads, -1))

        def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None = None):
            out = dispatch_attention_fn(
                q, k, v, attn_mask=mask, dropout_p=0.0, is_causal=False, backend=self._attention_backend
            )
            return out.flatten(2, 3).type_as(q)

        # 1. text + image cross-attention (plain Wan I2V)
        hidden_states = attend(query, key, value, attention_mask)
        if num_image_tokens > 0:
            hidden_states = hidden_states + attend(query, key_img, value_img)

        # 2.-4. Normalized Facial Expression Block
        if expression_tokens is not None:
            batch_size, num_frames = expression_tokens.shape[:2]
            seq_len = query.shape[1]
            if seq_len % num_frames != 0:
                raise ValueError(
                    f"{seq_len} video tokens cannot be split into {num_frames} latent frames of expression tokens."
                )
            frame_query = query.reshape(batch_size * num_frames, seq_len // num_frames, *query.shape[2:])
            tokens = expression_tokens.flatten(0, 1).to(query.dtype)  # compute dtype (weights may be stored in fp8)
            emo_key = attn.emo_k_proj(tokens).unflatten(2, (attn.heads, -1))
            emo_value = attn.emo_v_proj(tokens).unflatten(2, (attn.heads, -1))
            expression = attend(frame_query, emo_key, emo_value).reshape(hidden_states.shape)
            # under context parallelism this rank holds whole latent frames; the statistics are summed over ranks
            reduce = context_parallel_sum(self._parallel_config)
            expression = renormalize_to_reference(expression, hidden_states, reduce=reduce)
            if expression_scale is not None:
                expression = expression * expression_scale.to(expression.dtype)
            hidden_states = hidden_states + expression

        hidden_states = attn.to_out[0](hidden_states)
        hidden_states = attn.to_out[1](hidden_states)
        return hidden_states


class LatentFrameTokens(nn.Module):
    """Latent-frame-major inputs -> token sequences: where context parallelism splits a window into whole frames.

    ``forward(hidden_states [B, C, F, h, w], freqs_cos [1, F, h*w, 1, D], freqs_sin [1, F, h*w, 1, D],
    expression_tokens [B, F, W, C_expr] | None)`` returns ``(tokens [B, F*h*w, C], freqs_cos [1, F*h*w, 1, D],
    freqs_sin [1, F*h*w, 1, D])`` followed by ``expression_tokens`` when given (frame-major: token ``f*h*w + i`` is
    patch ``i`` of latent frame ``f``). No parameters.

    Under diffusers' context parallelism (``_cp_plan`` of :class:`FlashPortraitTransformer3DModel`) the hook in
    front of this module splits all four inputs along their latent-frame axis, the same ranges for each (contiguous,
    rank order, ``tensor_split`` sizes: the first ``F mod n`` ranks get one frame more), so each rank holds whole
    latent frames: the NFEB's per-frame expression attention stays local, and its whole-sequence statistics are
    summed over ranks (:func:`context_parallel_sum`).
    """

    def forward(
        self,
        hidden_states: torch.Tensor,
        freqs_cos: torch.Tensor,
        freqs_sin: torch.Tensor,
        expression_tokens: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, ...]:
        tokens = hidden_states.flatten(2).transpose(1, 2).contiguous()
        out = (tokens, freqs_cos.flatten(1, 2), freqs_sin.flatten(1, 2))
        # the context-parallel hook requires a tuple of tensors only: no None entry
        return out if expression_tokens is None else (*out, expression_tokens)


class FlashPortraitAttention(WanAttention):
    """Wan attention with the NFEB's expression key/value projections (cross-attention only).

    Extra parameters (cross-attention): ``emo_k_proj``, ``emo_v_proj``: ``Linear(expression_dim, inner_dim,
    bias=False)``, zero-initialised (so an untrained block adds only ``mean(x)``, SPEC.md section 2).
    """

    _default_processor_cls = FlashPortraitAttnProcessor
    _available_processors = [FlashPortraitAttnProcessor]

    def __init__(self, *args, expression_dim: int | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.emo_k_proj = self.emo_v_proj = None
        if expression_dim is not None:
            self.emo_k_proj = nn.Linear(expression_dim, self.inner_dim, bias=False)
            self.emo_v_proj = nn.Linear(expression_dim, self.inner_dim, bias=False)
            nn.init.zeros_(self.emo_k_proj.weight)
            nn.init.zeros_(self.emo_v_proj.weight)


class FlashPortraitTransformerBlock(WanTransformerBlock):
    """A Wan block whose cross-attention carries the NFEB; forward takes the expression inputs explicitly."""

    def __init__(
        self,
        dim: int,
        ffn_dim: int,
        num_heads: int,
        qk_norm: str = "rms_norm_across_heads",
        cross_attn_norm: bool = False,
        eps: float = 1e-6,
        added_kv_proj_dim: int | None = None,
        expression_dim: int = EXPRESSION_TOKEN_DIM,
    ):
        super().__init__(dim, ffn_dim, num_heads, qk_norm, cross_attn_norm, eps, added_kv_proj_dim)
        self.attn1.set_processor(FlashPortraitAttnProcessor())
        self.attn2 = FlashPortraitAttention(
            dim=dim,
            heads=num_heads,
            dim_head=dim // num_heads,
            eps=eps,
            added_kv_proj_dim=added_kv_proj_dim,
            cross_attention_dim_head=dim // num_heads,
            processor=FlashPortraitAttnProcessor(),
            expression_dim=expression_dim if added_kv_proj_dim is not None else None,
        )

    def forward(
        self,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        temb: torch.Tensor,
        rotary_emb: tuple[torch.Tensor, torch.Tensor],
        expression_tokens: torch.Tensor | None = None,
        expression_scale: torch.Tensor | None = None,
        num_image_tokens: int = CLIP_IMAGE_TOKENS,
    ) -> torch.Tensor:
        shift_msa, scale_msa, gate_msa, c_shift_msa, c_scale_msa, c_gate_msa = (
            self.scale_shift_table + temb.float()
        ).chunk(6, dim=1)

        norm_hidden_states = (self.norm1(hidden_states.float()) * (1 + scale_msa) + shift_msa).type_as(hidden_states)
        attn_output = self.attn1(norm_hidden_states, None, None, rotary_emb)
        hidden_states = (hidden_states.float() + attn_output * gate_msa).type_as(hidden_states)

        norm_hidden_states = self.norm2(hidden_states.float()).type_as(hidden_states)
        attn_output = self.attn2(
            norm_hidden_states,
            encoder_hidden_states,
            None,
            None,
            expression_tokens=expression_tokens,
            expression_scale=expression_scale,
            num_image_tokens=num_image_tokens,
        )
        hidden_states = hidden_states + attn_output

        norm_hidden_states = (self.norm3(hidden_states.float()) * (1 + c_scale_msa) + c_shift_msa).type_as(
            hidden_states
        )
        ff_output = self.ffn(norm_hidden_states)
        return (hidden_states.float() + ff_output.float() * c_gate_msa).type_as(hidden_states)


class FlashPortraitTransformer3DModel(WanTransformer3DModel):
    """Wan2.1-I2V transformer with the FlashPortrait NFEB in every block (SPEC.md section 2).

    Same configuration as ``WanTransformer3DModel`` plus ``expression_dim`` (width of the expression
    tokens, 2048 released). Works with diffusers' attention backends, gradient checkpointing, LoRA
    (PEFT), layerwise casting, offloading and ``from_single_file`` (original Wan naming with
    ``blocks.N.cross_attn.emo_{k,v}_proj``). The released 14B sizes are
    :data:`flashportrait.config.WAN_I2V_14B_CONFIG`.
    """

    _no_split_modules = ["FlashPortraitTransformerBlock"]
    _repeated_blocks = ["FlashPortraitTransformerBlock"]
    # Context parallelism (diffusers' ``enable_parallelism``): whole latent frames per rank. The frame-major inputs of
    # ``frame_tokens`` are split along the frame axis (``tensor_split``: needs the config's ``ulysses_anything`` /
    # ``ring_anything`` when the frames do not divide evenly), self-attention runs Ulysses / ring attention through
    # the attention dispatcher, cross-attention and the per-frame expression attention stay local, the NFEB
    # statistics are all-reduced, and ``proj_out``'s tokens are gathered back in frame order by
    # :func:`gather_latent_frames` in ``forward``.
    _cp_plan = {
        "frame_tokens": {
            "hidden_states": ContextParallelInput(split_dim=2, expected_dims=5),
            "freqs_cos": ContextParallelInput(split_dim=1, expected_dims=5),
            "freqs_sin": ContextParallelInput(split_dim=1, expected_dims=5),
            "expression_tokens": ContextParallelInput(split_dim=1, expected_dims=4),
        },
    }

    @register_to_config
    def __init__(
        self,
        patch_size: tuple[int, ...] = (1, 2, 2),
        num_attention_heads: int = 40,
        attention_head_dim: int = 128,
        in_channels: int = 36,
        out_channels: int = 16,
        text_dim: int = 4096,
        freq_dim: int = 256,
        ffn_dim: int = 13824,
        num_layers: int = 40,
        cross_attn_norm: bool = True,
        qk_norm: str | None = "rms_norm_across_heads",
        eps: float = 1e-6,
        image_dim: int | None = 1280,
        added_kv_proj_dim: int | None = 5120,
        rope_max_seq_len: int = 1024,
        pos_embed_seq_len: int | None = None,
        expression_dim: int = EXPRESSION_TOKEN_DIM,
    ) -> None:
        # The parent builds everything but the blocks (num_layers=0); ours replace them.
        super().__init__(
            patch_size=patch_size,
            num_attention_heads=num_attention_heads,
            attention_head_dim=attention_head_dim,
            in_channels=in_channels,
            out_channels=out_channels,
            text_dim=text_dim,
            freq_dim=freq_dim,
            ffn_dim=ffn_dim,
            num_layers=0,
            cross_attn_norm=cross_attn_norm,
            qk_norm=qk_norm,
            eps=eps,
            image_dim=image_dim,
            added_kv_proj_dim=added_kv_proj_dim,
            rope_max_seq_len=rope_max_seq_len,
            pos_embed_seq_len=pos_embed_seq_len,
        )
        self.register_to_config(num_layers=num_layers)
        inner_dim = num_attention_heads * attention_head_dim
        self.frame_tokens = LatentFrameTokens()
        self.blocks = nn.ModuleList(
            [
                FlashPortraitTransformerBlock(
                    inner_dim, ffn_dim, num_attention_heads, qk_norm, cross_attn_norm, eps, added_kv_proj_dim,
                    expression_dim,
                )
                for _ in range(num_layers)
            ]
        )

    def _check_context_parallel_split(self, num_frames: int) -> None:
        """Raise ``ValueError`` unless ``num_frames`` latent frames split into whole frames over the context-parallel
        ranks (every rank at least one frame; an equal share when Ulysses and ring are combined, whose unified
        attention needs equal token counts)."""
        cp_config = getattr(self._parallel_config, "context_parallel_config", None)
        if cp_config is None:
            return
        degree = cp_config.ulysses_degree * cp_config.ring_degree
        if num_frames < degree:
            raise ValueError(
                f"a window of {num_frames} latent frames cannot be split over {degree} sequence-parallel ranks "
                f"(ulysses {cp_config.ulysses_degree} x ring {cp_config.ring_degree}): each rank needs whole latent "
                "frames. Use a smaller --ulysses_degree / --ring_degree or longer windows (--context_size)."
            )
        uneven = cp_config.ulysses_anything or cp_config.ring_anything
        if not uneven and num_frames % degree != 0:
            raise ValueError(
                f"a window of {num_frames} latent frames does not split evenly over ulysses {cp_config.ulysses_degree}"
                f" x ring {cp_config.ring_degree} ranks; with both degrees > 1 diffusers needs equal shares: choose "
                f"--context_size as a multiple of {degree} or use only one of --ulysses_degree / --ring_degree."
            )

    @apply_lora_scale("attention_kwargs")
    def forward(
        self,
        hidden_states: torch.Tensor,
        timestep: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        encoder_hidden_states_image: torch.Tensor | None = None,
        expression_tokens: torch.Tensor | None = None,
        expression_scale: float | torch.Tensor | None = None,
        return_dict: bool = True,
        attention_kwargs: dict[str, Any] | None = None,
    ) -> Transformer2DModelOutput | tuple[torch.Tensor]:
        """Predict the flow-matching velocity ``eps - x_0`` for one window.

        Args:
            hidden_states: ``[B, in_channels, F, H, W]`` latent-grid input; for I2V the 36 channels are 16
                noisy latents, 4 mask channels and 16 reference-condition latents.
            timestep: ``[B]`` (or a scalar), on the 0..1000 scale (``1000 * sigma``).
            encoder_hidden_states: ``[B, Lt, text_dim]`` umT5 embeddings (padded; any length).
            encoder_hidden_states_image: ``[B, N_img, image_dim]`` CLIP penultimate states (257 tokens).
            expression_tokens: ``[B, F, W, expression_dim]`` per-latent-frame expression tokens (W = 97
                released, from :func:`flashportrait.models.portrait_encoder.split_tokens_per_latent_frame`),
                or ``None`` to run plain Wan2.1-I2V.
            expression_scale: per-sample scale of the NFEB term: a float or ``[B]`` tensor
                (1 conditional, 0 for the "no expression" guidance branch). ``None`` means 1.
        Returns:
            ``Transformer2DModelOutput(sample=[B, out_channels, F, H, W])`` (or a 1-tuple).

        Raises:
            ValueError: expression tokens whose batch or frame count does not match ``hidden_states``; under
                context parallelism, fewer latent frames than context-parallel ranks (or, with both Ulysses and
                ring degrees > 1, a frame count they do not divide).
        """
        batch_size, _, num_frames, height, width = hidden_states.shape
        p_t, p_h, p_w = self.config.patch_size
        post_f, post_h, post_w = num_frames // p_t, height // p_h, width // p_w
        if expression_tokens is not None and tuple(expression_tokens.shape[:2]) != (batch_size, post_f):
            raise ValueError(
                f"expression_tokens has shape {tuple(expression_tokens.shape)}; expected [{batch_size}, {post_f}, "
                "tokens, dim] (one window of tokens per latent frame of hidden_states)."
            )

        self._check_context_parallel_split(post_f)
        freqs_cos, freqs_sin = self.rope(hidden_states)
        frame_major = (freqs_cos.unflatten(1, (post_f, -1)), freqs_sin.unflatten(1, (post_f, -1)))
        hidden_states, *rotary_emb = self.frame_tokens(self.patch_embedding(hidden_states), *frame_major,
                                                       expression_tokens)
        if expression_tokens is not None:  # this rank's latent frames only under context parallelism
            *rotary_emb, expression_tokens = rotary_emb
        rotary_emb = tuple(rotary_emb)

        timestep = timestep.reshape(-1).expand(batch_size) if timestep.numel() == 1 else timestep
        temb, timestep_proj, encoder_hidden_states, encoder_hidden_states_image = self.condition_embedder(
            timestep, encoder_hidden_states, encoder_hidden_states_image
        )
        timestep_proj = timestep_proj.unflatten(1, (6, -1))

        num_image_tokens = 0
        if encoder_hidden_states_image is not None:
            num_image_tokens = encoder_hidden_states_image.shape[1]
            encoder_hidden_states = torch.cat([encoder_hidden_states_image, encoder_hidden_states], dim=1)

        scale = expand_expression_scale(expression_scale, batch_size, hidden_states.device, torch.float32)
        block_args = (encoder_hidden_states, timestep_proj, rotary_emb, expression_tokens, scale, num_image_tokens)
        for block in self.blocks:
            if torch.is_grad_enabled() and self.gradient_checkpointing:
                hidden_states = self._gradient_checkpointing_func(block, hidden_states, *block_args)
            else:
                hidden_states = block(hidden_states, *block_args)

        shift, scale_out = (self.scale_shift_table.to(temb.device) + temb.unsqueeze(1)).chunk(2, dim=1)
        shift, scale_out = shift.to(hidden_states.device), scale_out.to(hidden_states.device)
        hidden_states = (self.norm_out(hidden_states.float()) * (1 + scale_out) + shift).type_as(hidden_states)
        hidden_states = self.proj_out(hidden_states)
        cp_config = getattr(self._parallel_config, "context_parallel_config", None)
        if cp_config is not None:
            hidden_states = gather_latent_frames(hidden_states, post_f, cp_config)

        hidden_states = hidden_states.reshape(batch_size, post_f, post_h, post_w, p_t, p_h, p_w, -1)
        output = hidden_states.permute(0, 7, 1, 4, 2, 5, 3, 6).flatten(6, 7).flatten(4, 5).flatten(2, 3)
        if not return_dict:
            return (output,)
        return Transformer2DModelOutput(sample=output)
