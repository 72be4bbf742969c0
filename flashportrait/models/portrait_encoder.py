"""Portrait encoder (``portrait_encoder.pt``) and the per-latent-frame token windows.

SPEC.md section 2, "Portrait encoder": each video frame's 554 expression numbers (head pose 6, eye 6,
emotion 30, mouth 512) become 24 tokens of width 2048, in the order [4 linear, 16 mouth, 4 emotion]:

* ``proj_model``: four bias-free linears (head pose, eye, emotion, mouth -> 2048) sharing one LayerNorm;
* ``mouth_proj_model``: a Perceiver resampler (16 learned queries) fed the mouth vector as one token;
* ``emo_proj_model``: a second resampler (4 queries) fed the emotion vector as one token.

SPEC.md section 2, "Per-latent-frame token windows": :func:`split_tokens_per_latent_frame` gives every
latent frame the 97 tokens it attends to in the transformer's expression cross-attention.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import nn

from ..config import EXPRESSION_DIM, EXPRESSION_PARTS, EXPRESSION_TOKEN_DIM, TOKENS_PER_FRAME
from ..windows import video_frames_for_latent_frames
from ._common import DeviceDtypeMixin

__all__ = [
    "PortraitEncoderConfig",
    "PerceiverAttention",
    "Resampler",
    "ExpressionProjection",
    "PortraitEncoder",
    "latent_frame_token_ranges",
    "window_token_lens",
    "split_tokens_per_latent_frame",
]

_PART_DIMS = dict(EXPRESSION_PARTS)


@dataclass(frozen=True)
class PortraitEncoderConfig:
    """Sizes of the portrait encoder; the defaults are the released ``portrait_encoder.pt``.

    Attributes:
        resampler_dim: inner width of both resamplers (queries, attention input).
        resampler_depth: attention + feed-forward layers per resampler.
        resampler_dim_head, resampler_heads: attention heads (inner attention width = heads x dim_head).
        resampler_ff_mult: feed-forward hidden width = ff_mult x resampler_dim.
        token_dim: width of every output token (the transformer's expression-token width).
        mouth_queries, emo_queries: tokens per frame from the mouth / emotion resampler.
    """

    resampler_dim: int = 1280
    resampler_depth: int = 4
    resampler_dim_head: int = 64
    resampler_heads: int = 20
    resampler_ff_mult: int = 4
    token_dim: int = EXPRESSION_TOKEN_DIM
    mouth_queries: int = 16
    emo_queries: int = 4

    @property
    def tokens_per_frame(self) -> int:
        """4 linear tokens + mouth queries + emotion queries (24 for the released model)."""
        return 4 + self.mouth_queries + self.emo_queries

    @classmethod
    def from_manifest(cls, config: Mapping) -> PortraitEncoderConfig:
        """Build from a golden manifest's ``portrait_encoder_config``:
        ``{"resampler_inner": {"dim", "depth", "dim_head", "heads", "ff_mult"}, "token_dim", "mouth_queries",
        "emo_queries"}`` (missing entries keep the released default). A flat dict of field names also works.

        Raises:
            ValueError: unknown keys.
        """
        config = dict(config)
        inner = dict(config.pop("resampler_inner", {}))
        for key, value in inner.items():
            config[f"resampler_{key}"] = value
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(config) - fields)
        if unknown:
            raise ValueError(f"portrait encoder config: unknown key(s) {unknown}; known: {sorted(fields)}.")
        return cls(**{k: int(v) for k, v in config.items()})


class PerceiverAttention(nn.Module):
    """Queries attend to [inputs; queries] (SPEC.md section 2, "Resampler").

    ``forward(x [B, L, dim], latents [B, Q, dim]) -> [B, Q, dim]``. LayerNorm ``norm1`` on the inputs,
    ``norm2`` on the queries; q from the queries, k and v from both; q and k each scaled by
    ``dim_head ** -0.25``; softmax in float32; bias-free ``to_q`` / ``to_kv`` / ``to_out``.
    """

    def __init__(self, dim: int, dim_head: int, heads: int):
        super().__init__()
        self.heads, self.dim_head = heads, dim_head
        inner = heads * dim_head
        self.norm1 = nn.LayerNorm(dim)
        self.norm2 = nn.LayerNorm(dim)
        self.to_q = nn.Linear(dim, inner, bias=False)
        self.to_kv = nn.Linear(dim, 2 * inner, bias=False)
        self.to_out = nn.Linear(inner, dim, bias=False)

    def _heads(self, t: torch.Tensor) -> torch.Tensor:
        b, n, _ = t.shape
        return t.view(b, n, self.heads, self.dim_head).transpose(1, 2)  # [B, H, n, Dh]

    def forward(self, x: torch.Tensor, latents: torch.Tensor) -> torch.Tensor:
        x, latents = self.norm1(x), self.norm2(latents)
        b, q_len, _ = latents.shape
        q = self._heads(self.to_q(latents))
        k, v = self.to_kv(torch.cat([x, latents], dim=1)).chunk(2, dim=-1)
        k, v = self._heads(k), self._heads(v)
        scale = 1.0 / math.sqrt(math.sqrt(self.dim_head))
        weights = (q * scale) @ (k * scale).transpose(-2, -1)
        weights = torch.softmax(weights.float(), dim=-1).to(weights.dtype)
        out = (weights @ v).transpose(1, 2).reshape(b, q_len, self.heads * self.dim_head)
        return self.to_out(out)


def _feed_forward(dim: int, mult: int) -> nn.Sequential:
    """LayerNorm - Linear(dim, mult*dim, no bias) - GELU - Linear(mult*dim, dim, no bias)."""
    return nn.Sequential(
        nn.LayerNorm(dim), nn.Linear(dim, mult * dim, bias=False), nn.GELU(), nn.Linear(mult * dim, dim, bias=False)
    )


class Resampler(nn.Module):
    """Perceiver resampler: ``x [B, L, in_dim] -> [B, num_queries, out_dim]`` (SPEC.md section 2).

    Learned queries ``latents`` [1, Q, dim] (init randn / sqrt(dim)); ``proj_in`` Linear(in_dim -> dim);
    ``depth`` x (attention + residual, feed-forward + residual); ``proj_out`` Linear(dim -> out_dim) and
    LayerNorm ``norm_out``. ``layers.N.0`` is the attention, ``layers.N.1`` the feed-forward.
    """

    def __init__(self, in_dim: int, out_dim: int, num_queries: int, dim: int, depth: int, dim_head: int,
                 heads: int, ff_mult: int):
        super().__init__()
        self.latents = nn.Parameter(torch.randn(1, num_queries, dim) / dim**0.5)
        self.proj_in = nn.Linear(in_dim, dim)
        self.proj_out = nn.Linear(dim, out_dim)
        self.norm_out = nn.LayerNorm(out_dim)
        self.layers = nn.ModuleList(
            nn.ModuleList([PerceiverAttention(dim, dim_head, heads), _feed_forward(dim, ff_mult)])
            for _ in range(depth)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        latents = self.latents.expand(x.shape[0], -1, -1)
        x = self.proj_in(x)
        for attn, ff in self.layers:
            latents = attn(x, latents) + latents
            latents = ff(latents) + latents
        return self.norm_out(self.proj_out(latents))


class ExpressionProjection(nn.Module):
    """The 4 linear tokens per frame (``proj_model``): head pose, eye, emotion, mouth -> [M, 4, token_dim].

    Each part goes through its own bias-free Linear(part_dim -> token_dim); all four share LayerNorm
    ``norm`` (SPEC.md section 2). Token order: head pose, eye, emotion, mouth.
    """

    def __init__(self, token_dim: int):
        super().__init__()
        self.headpose_proj = nn.Linear(_PART_DIMS["headpose"], token_dim, bias=False)
        self.eye_proj = nn.Linear(_PART_DIMS["eye"], token_dim, bias=False)
        self.emo_proj = nn.Linear(_PART_DIMS["emotion"], token_dim, bias=False)
        self.mouth_proj = nn.Linear(_PART_DIMS["mouth"], token_dim, bias=False)
        self.norm = nn.LayerNorm(token_dim)

    def forward(self, headpose: torch.Tensor, eye: torch.Tensor, emotion: torch.Tensor,
                mouth: torch.Tensor) -> torch.Tensor:
        """Inputs [M, 6], [M, 6], [M, 30], [M, 512] -> [M, 4, token_dim]."""
        tokens = [self.headpose_proj(headpose), self.eye_proj(eye), self.emo_proj(emotion), self.mouth_proj(mouth)]
        return self.norm(torch.stack(tokens, dim=1))


class PortraitEncoder(DeviceDtypeMixin, nn.Module):
    """Expression features -> expression tokens (SPEC.md section 2, "Portrait encoder").

    ``forward(features)``: ``features`` [B, N, 554] float (per video frame: head pose 6, eye 6, emotion 30,
    mouth 512, as :class:`~flashportrait.models.motion_encoder.PDFGCMotionEncoder` returns them).
    Returns [B, N * 24, token_dim], frame-major (frame 0's 24 tokens, then frame 1's, ...), each frame
    ordered [4 linear, 16 mouth-resampler, 4 emotion-resampler] tokens. Feed it to
    :func:`split_tokens_per_latent_frame` to get the transformer's [B, F, 97, token_dim] windows.
    """

    def __init__(self, config: PortraitEncoderConfig | None = None):
        super().__init__()
        self.config = c = config or PortraitEncoderConfig()
        sizes = dict(dim=c.resampler_dim, depth=c.resampler_depth, dim_head=c.resampler_dim_head,
                     heads=c.resampler_heads, ff_mult=c.resampler_ff_mult)
        self.proj_model = ExpressionProjection(c.token_dim)
        self.mouth_proj_model = Resampler(_PART_DIMS["mouth"], c.token_dim, c.mouth_queries, **sizes)
        self.emo_proj_model = Resampler(_PART_DIMS["emotion"], c.token_dim, c.emo_queries, **sizes)

    @property
    def tokens_per_frame(self) -> int:
        """Tokens per video frame (24 for the released model)."""
        return self.config.tokens_per_frame

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        if features.ndim != 3 or features.shape[-1] != EXPRESSION_DIM:
            raise ValueError(f"features must be [B, N, {EXPRESSION_DIM}], got shape {tuple(features.shape)}.")
        b, n, _ = features.shape
        flat = features.reshape(b * n, EXPRESSION_DIM)
        headpose, eye, emotion, mouth = flat.split([d for _, d in EXPRESSION_PARTS], dim=-1)
        tokens = torch.cat(
            [
                self.proj_model(headpose, eye, emotion, mouth),
                self.mouth_proj_model(mouth[:, None]),
                self.emo_proj_model(emotion[:, None]),
            ],
            dim=1,
        )  # [B*N, tokens_per_frame, token_dim]
        return tokens.reshape(b, n * self.tokens_per_frame, -1)


# --- per-latent-frame token windows (SPEC.md section 2) ----------------------------------------------


def latent_frame_token_ranges(num_latent_frames: int, tokens_per_frame: int = TOKENS_PER_FRAME) -> list[tuple[int, int]]:
    """Inclusive token range [start, end] each latent frame attends to (may reach outside the tokens).

    SPEC.md section 2, "Per-latent-frame token windows", with T = ``tokens_per_frame`` (window 4T + 1 = 97):
    latent frame i >= 1 takes [c - 2T, c + 2T] with c = T(4i - 1) - 1 (video frames 4i-3..4i plus the
    token before); frame 0 takes [-(4T - s1), s1] with s1 = the start of frame 1's range (= T - 1).
    For T = 24, F = 3: [(-73, 23), (23, 119), (119, 215)].
    """
    video_frames_for_latent_frames(num_latent_frames)
    t = tokens_per_frame
    half = 2 * t
    s1 = t * 3 - 1 - half
    ranges = [(-(2 * half - s1), s1)]
    for i in range(1, num_latent_frames):
        c = t * (4 * i - 1) - 1
        ranges.append((c - half, c + half))
    return ranges


def window_token_lens(num_latent_frames: int, tokens_per_frame: int = TOKENS_PER_FRAME) -> torch.Tensor:
    """Real (non-padding) tokens in each latent frame's window: int64 [F] (T, then 4T + 1 for the rest).

    The released transformer attends to the zero padding as well; these lengths are informational.
    """
    total = video_frames_for_latent_frames(num_latent_frames) * tokens_per_frame
    lens = [min(end, total - 1) - max(start, 0) + 1 for start, end in
            latent_frame_token_ranges(num_latent_frames, tokens_per_frame)]
    return torch.tensor(lens, dtype=torch.int64)


def split_tokens_per_latent_frame(
    tokens: torch.Tensor, num_latent_frames: int, tokens_per_frame: int = TOKENS_PER_FRAME
) -> torch.Tensor:
    """Cut frame-major tokens into one window per latent frame (SPEC.md section 2).

    Args:
        tokens: [B, N * T, C] for N = 4(F - 1) + 1 video frames of T = ``tokens_per_frame`` tokens.
        num_latent_frames: F.

    Returns:
        [B, F, 4T + 1, C] (97 tokens for T = 24), same dtype and device: window i holds the tokens of
        :func:`latent_frame_token_ranges` ``[i]`` that exist, in order, followed by zeros for the positions
        that fall outside the sequence (zeros are appended at the end, as the released code does).

    Raises:
        ValueError: ``tokens`` is not 3-D or its length is not (4(F - 1) + 1) * T.
    """
    num_frames = video_frames_for_latent_frames(num_latent_frames)
    expected = num_frames * tokens_per_frame
    if tokens.ndim != 3 or tokens.shape[1] != expected:
        raise ValueError(
            f"tokens must be [B, N*{tokens_per_frame}, C] with N = 4*(F-1)+1 = {num_frames} video frames for "
            f"F = {num_latent_frames} latent frames (length {expected}), got shape {tuple(tokens.shape)}."
        )
    ranges = torch.tensor(latent_frame_token_ranges(num_latent_frames, tokens_per_frame), device=tokens.device)
    width = 4 * tokens_per_frame + 1
    positions = ranges[:, :1] + torch.arange(width, device=tokens.device)  # [F, W]
    valid = (positions >= 0) & (positions < expected)
    index = torch.where(valid, positions, expected)  # ``expected`` points at an appended zero token
    order = torch.argsort((~valid).to(torch.int8), dim=1, stable=True)  # real tokens first, in order
    index = index.gather(1, order)
    padded = torch.cat([tokens, tokens.new_zeros(tokens.shape[0], 1, tokens.shape[2])], dim=1)
    return padded[:, index.flatten()].view(tokens.shape[0], num_latent_frames, width, tokens.shape[2])
