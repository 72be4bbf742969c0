"""FlashPortraitPipeline: reference image + driving expressions -> portrait video of any length.

Data flow (SPEC.md sections 1, 2, 4):

1. the reference image is resized so its longer side is ``max_size`` and both sides are rounded **up**
   to multiples of 16 (as the released ``infer.py``), Lanczos;
2. umT5 encodes the prompt and the negative prompt (512 tokens; positions past the real length are
   zeroed, as Wan does), CLIP encodes the whole resized reference (bicubic 224, no crop, penultimate
   hidden states, 257 tokens);
3. the VAE encodes ``[reference, zeros ...]`` of one window's length; with the 4 mask channels (1 on
   latent frame 0) these are the 20 condition channels every window gets;
4. each window's expression tokens are encoded on demand by the portrait encoder from its own video
   frames' features (:class:`~flashportrait.sampling.ExpressionTokenWindows`; memory flat in length);
5. one seeded noise tensor for the whole video; per step every window is denoised with the guidance
   branches as one batch, the velocities are blended and the scheduler steps the full latent once
   (:func:`~flashportrait.sampling.sample_windows`);
6. the VAE decodes in temporal chunks through its causal cache (exact, constant memory,
   :func:`iter_decode_latents`) and the frames stream to the MP4 writer with the driving video's audio;
   the first decoded frame (the reference slot) is dropped: ``N_used - 1`` output frames.

Driving frames: ``N_used = 4k + 1 <= N`` frames are used, the 0-3 extra ones at the end are dropped
(:func:`flashportrait.windows.usable_video_frames`); output frame ``k`` shows driving frame ``k + 1``.
"""

from __future__ import annotations

import contextlib
import html
import os
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from diffusers import DiffusionPipeline
from diffusers.utils import BaseOutput
from PIL import Image

from .config import (
    DEFAULT_CONTEXT_OVERLAP,
    DEFAULT_CONTEXT_SIZE,
    DEFAULT_EMO_CFG_SCALE,
    DEFAULT_MAX_SIZE,
    DEFAULT_NEGATIVE_PROMPT,
    DEFAULT_NUM_INFERENCE_STEPS,
    DEFAULT_PROMPT,
    DEFAULT_TEXT_CFG_SCALE,
    EXPRESSION_DIM,
    TEXT_MAX_LENGTH,
    VAE_SPATIAL_FACTOR,
    VAE_TEMPORAL_FACTOR,
)
from .guidance import plan_guidance
from .sampling import ExpressionTokenWindows, WindowDenoiser, first_frame_mask, sample_windows
from .windows import (
    context_windows,
    latent_frames_for_video_frames,
    usable_video_frames,
    video_frames_for_latent_frames,
)

__all__ = [
    "DEFAULT_FPS",
    "FlashPortraitPipeline",
    "FlashPortraitPipelineOutput",
    "reference_size",
    "clean_prompt",
    "normalize_latents",
    "denormalize_latents",
    "iter_decode_latents",
    "frames_to_uint8",
    "GPU_MEMORY_MODES",
    "configure_memory",
]

#: output frame rate when neither ``fps`` nor a driving video's rate is known (SPEC.md section 1)
DEFAULT_FPS = 25.0
#: size multiple of both output sides (VAE 8x times the transformer's 2x2 patches)
SIZE_MULTIPLE = 16


# --- small pure helpers ---------------------------------------------------------------------------------


def reference_size(width: int, height: int, max_size: int) -> tuple[int, int]:
    """Output ``(width, height)`` for a reference of ``width x height`` pixels (SPEC.md section 1).

    Released rule (``infer.py``): scale so the longer side is ``max_size`` (``int`` truncation), then round
    each side **up** to a multiple of 16.

    Raises:
        ValueError: non-positive sizes or ``max_size < 16``.
    """
    if width < 1 or height < 1:
        raise ValueError(f"reference image size must be positive, got {width}x{height}")
    if max_size < SIZE_MULTIPLE:
        raise ValueError(f"max_size must be >= {SIZE_MULTIPLE} pixels, got {max_size}")
    scale = max_size / max(width, height)
    w, h = max(1, int(width * scale)), max(1, int(height * scale))
    return (-(-w // SIZE_MULTIPLE) * SIZE_MULTIPLE, -(-h // SIZE_MULTIPLE) * SIZE_MULTIPLE)


def clean_prompt(text: str) -> str:
    """Wan's prompt cleaning: ftfy (when installed), HTML unescaping twice, whitespace collapsed."""
    try:
        import ftfy

        text = ftfy.fix_text(text)
    except ImportError:
        pass
    text = html.unescape(html.unescape(text)).strip()
    return re.sub(r"\s+", " ", text).strip()


def _latent_stats(vae, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    shape = (1, vae.config.z_dim, 1, 1, 1)
    mean = torch.tensor(vae.config.latents_mean, device=like.device, dtype=torch.float32).view(shape)
    std = torch.tensor(vae.config.latents_std, device=like.device, dtype=torch.float32).view(shape)
    return mean, std


def normalize_latents(vae, latents: torch.Tensor) -> torch.Tensor:
    """Raw VAE latents -> the transformer's space: ``(z - latents_mean) / latents_std`` (float32)."""
    mean, std = _latent_stats(vae, latents)
    return (latents.float() - mean) / std


def denormalize_latents(vae, latents: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`normalize_latents` (float32)."""
    mean, std = _latent_stats(vae, latents)
    return latents.float() * std + mean


def _vae_onload(vae) -> None:
    """Trigger an accelerate offload hook on ``vae`` (as diffusers' ``apply_forward_hook`` does)."""
    hook = getattr(vae, "_hf_hook", None)
    if hook is not None and hasattr(hook, "pre_forward"):
        hook.pre_forward(vae)


@torch.no_grad()
def iter_decode_latents(vae, latents: torch.Tensor, chunk_size: int = 4) -> Iterator[torch.Tensor]:
    """Decode normalised latents chunk by chunk through the Wan VAE's causal cache.

    ``AutoencoderKLWan._decode`` runs its decoder one latent frame at a time with a feature cache
    (``_feat_map`` / ``_conv_idx``); doing the same here across chunks, with the cache kept between them,
    is exactly the whole-video decode (ENVIRONMENT.md) while only one chunk of frames is ever held.
    Decoding windows independently would not be.

    Args:
        vae: ``AutoencoderKLWan`` (Wan2.1: ``patch_size`` None; tiling is not used here).
        latents: ``[B, 16, F, h, w]`` normalised latents (the sampler's output).
        chunk_size: latent frames per yielded chunk, ``>= 1``.

    Yields:
        ``[B, 3, T, 8h, 8w]`` float in ``[-1, 1]`` (vae dtype): ``T = 1 + 4 (c - 1)`` for the first chunk
        of ``c`` latent frames (latent frame 0 decodes to one frame), ``4c`` afterwards; in all
        ``4(F - 1) + 1`` frames.
    """
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1 latent frame, got {chunk_size}")
    if getattr(vae.config, "patch_size", None) is not None:
        raise ValueError("iter_decode_latents supports the Wan2.1 VAE (patch_size None) only")
    _vae_onload(vae)
    z = denormalize_latents(vae, latents)
    device = next(vae.post_quant_conv.parameters()).device
    if device.type == "meta":  # sequential offload: the submodule hooks place inputs themselves
        device = latents.device
    vae.clear_cache()
    try:
        for start in range(0, z.shape[2], chunk_size):
            x = vae.post_quant_conv(z[:, :, start : start + chunk_size].to(device=device, dtype=vae.dtype))
            outs = []
            for i in range(x.shape[2]):
                vae._conv_idx = [0]
                outs.append(
                    vae.decoder(
                        x[:, :, i : i + 1],
                        feat_cache=vae._feat_map,
                        feat_idx=vae._conv_idx,
                        first_chunk=(start + i == 0),
                    )
                )
            yield torch.clamp(torch.cat(outs, dim=2), -1.0, 1.0)
    finally:
        vae.clear_cache()


def frames_to_uint8(video: torch.Tensor) -> np.ndarray:
    """``[1, 3, T, H, W]`` in ``[-1, 1]`` -> uint8 ``[T, H, W, 3]`` RGB (rounded)."""
    if video.ndim != 5 or video.shape[0] != 1 or video.shape[1] != 3:
        raise ValueError(f"video must be [1, 3, T, H, W], got {tuple(video.shape)}")
    x = ((video[0].float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return x.permute(1, 2, 3, 0).cpu().numpy()


@dataclass
class FlashPortraitPipelineOutput(BaseOutput):
    """Result of :class:`FlashPortraitPipeline`.

    Attributes:
        frames: uint8 ``[N_used - 1, H, W, 3]`` when ``output_type="np"``, else ``None``.
        latents: ``[1, 16, F, h, w]`` float32 normalised latents when ``output_type="latent"``, else ``None``.
        path: the written MP4 when ``output_path`` was given, else ``None``.
        fps: frame rate of the output.
        num_frames: output frames (``N_used - 1``).
    """

    frames: np.ndarray | None
    latents: torch.Tensor | None
    path: str | None
    fps: float
    num_frames: int


# --- the pipeline -----------------------------------------------------------------------------------------


class FlashPortraitPipeline(DiffusionPipeline):
    """Video-driven portrait animation on Wan2.1-I2V with the FlashPortrait transformer (arXiv 2512.16900).

    Components: ``tokenizer`` + ``text_encoder`` (umT5), ``image_encoder`` (CLIP ViT-H/14 vision tower),
    ``vae`` (``AutoencoderKLWan``), ``transformer`` (``FlashPortraitTransformer3DModel``),
    ``portrait_encoder`` (``PortraitEncoder``), ``scheduler`` (a flow scheduler, see
    :func:`flashportrait.sampling.make_scheduler`) and optionally ``motion_encoder``
    (``PDFGCMotionEncoder``, needed only to take a driving *video*; precomputed ``[N, 554]`` features
    need none).
    """

    model_cpu_offload_seq = "text_encoder->image_encoder->transformer->vae"
    _optional_components = ["motion_encoder"]
    # small next to the transformer and called per window (portrait encoder) or moved by the expression
    # extractor itself (motion encoder): kept whole on the execution device
    _exclude_from_cpu_offload = ["portrait_encoder", "motion_encoder"]

    def __init__(
        self,
        tokenizer,
        text_encoder,
        image_encoder,
        vae,
        transformer,
        portrait_encoder,
        scheduler,
        motion_encoder=None,
    ):
        super().__init__()
        self.register_modules(
            tokenizer=tokenizer,
            text_encoder=text_encoder,
            image_encoder=image_encoder,
            vae=vae,
            transformer=transformer,
            portrait_encoder=portrait_encoder,
            scheduler=scheduler,
            motion_encoder=motion_encoder,
        )

    # -- construction --------------------------------------------------------------------------------------

    @classmethod
    def from_checkpoints(
        cls,
        wan_model_dir: str | os.PathLike,
        transformer_path: str | os.PathLike | None,
        portrait_encoder_path: str | os.PathLike,
        pd_fpg_model_path: str | os.PathLike | None = None,
        *,
        sampler: str = "euler",
        shift: float | None = None,
        dtype: torch.dtype = torch.bfloat16,
        portrait_encoder_config=None,
    ) -> FlashPortraitPipeline:
        """Build the pipeline from the files users download (SPEC.md section 3), on the CPU.

        Args:
            wan_model_dir: ``Wan2.1-I2V-14B-720P`` (original or Diffusers layout).
            transformer_path: FlashPortrait ``transformer.pt`` (``None``: the base weights must already hold
                the NFEB projections).
            portrait_encoder_path: ``portrait_encoder.pt``.
            pd_fpg_model_path: ``pd_fpg.pth`` (PD-FGC); needed only for driving videos.
            sampler, shift: see :func:`flashportrait.sampling.make_scheduler`.
            dtype: transformer, text / image encoder and portrait encoder dtype (the VAE stays float32,
                the motion encoder float32).
            portrait_encoder_config: :class:`~flashportrait.models.portrait_encoder.PortraitEncoderConfig`
                of ``portrait_encoder.pt`` (``None``: the released sizes; its head count cannot be read from
                the file).

        Raises:
            CheckpointError: any file that is missing, unreadable or does not fit (naming file and keys).
        """
        from .checkpoints.transformer import load_flashportrait_transformer
        from .checkpoints.wan_components import load_wan_i2v_components
        from .config import DEFAULT_SHIFT
        from .models.motion_encoder import load_pdfgc_motion_encoder
        from .models.portrait_encoder import load_portrait_encoder
        from .sampling import make_scheduler

        wan = load_wan_i2v_components(wan_model_dir, dtype=dtype, device="cpu")
        transformer = load_flashportrait_transformer(transformer_path, wan_model_dir, dtype=dtype)
        portrait_encoder = load_portrait_encoder(portrait_encoder_path, portrait_encoder_config, dtype=dtype)
        motion_encoder = load_pdfgc_motion_encoder(pd_fpg_model_path) if pd_fpg_model_path is not None else None
        return cls(
            tokenizer=wan["tokenizer"],
            text_encoder=wan["text_encoder"],
            image_encoder=wan["image_encoder"],
            vae=wan["vae"],
            transformer=transformer,
            portrait_encoder=portrait_encoder,
            scheduler=make_scheduler(sampler, DEFAULT_SHIFT if shift is None else shift),
            motion_encoder=motion_encoder,
        )

    @classmethod
    def from_tiny(
        cls, seed: int = 0, *, sampler: str = "euler", shift: float | None = None, dtype: torch.dtype = torch.float32
    ) -> FlashPortraitPipeline:
        """The ``--tiny`` pipeline: random tiny components (:func:`flashportrait.tiny.build_tiny_components`)."""
        from .config import DEFAULT_SHIFT
        from .sampling import make_scheduler
        from .tiny import build_tiny_components

        components = build_tiny_components(seed=seed, dtype=dtype)
        return cls(**components, scheduler=make_scheduler(sampler, DEFAULT_SHIFT if shift is None else shift))

    # -- helpers -------------------------------------------------------------------------------------------

    @staticmethod
    def _module_device(module, fallback: torch.device) -> torch.device:
        try:
            from diffusers.utils.torch_utils import get_module_execution_device

            return get_module_execution_device(module)
        except (ImportError, StopIteration, ValueError):
            return fallback

    @torch.no_grad()
    def encode_prompt(self, prompt: str | list[str], max_sequence_length: int = TEXT_MAX_LENGTH) -> torch.Tensor:
        """umT5 embeddings ``[B, max_sequence_length, D]`` float32, zero past each prompt's real length.

        Wan tokenises with padding to ``max_sequence_length``, runs the encoder with the attention mask,
        keeps the first ``len`` (real tokens incl. EOS) outputs and pads with zeros (SPEC.md section 2).
        """
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        prompts = [clean_prompt(p) for p in prompts]
        inputs = self.tokenizer(
            prompts,
            padding="max_length",
            max_length=max_sequence_length,
            truncation=True,
            add_special_tokens=True,
            return_attention_mask=True,
            return_tensors="pt",
        )
        device = self._module_device(self.text_encoder, self._execution_device)
        mask = inputs.attention_mask.to(device)
        embeds = self.text_encoder(inputs.input_ids.to(device), attention_mask=mask).last_hidden_state
        keep = (torch.arange(embeds.shape[1], device=device)[None] < mask.sum(dim=1, keepdim=True)).unsqueeze(-1)
        return torch.where(keep, embeds.float(), embeds.new_zeros(()).float())

    @torch.no_grad()
    def encode_image(self, image: Image.Image) -> torch.Tensor:
        """CLIP penultimate hidden states ``[1, 257, C]`` float32 of the whole image (bicubic 224, no crop)."""
        from .checkpoints.wan_components import clip_preprocess, encode_clip_image

        device = self._module_device(self.image_encoder, self._execution_device)
        pixels = clip_preprocess(np.array(image.convert("RGB"))).to(device=device, dtype=self.image_encoder.dtype)
        return encode_clip_image(self.image_encoder, pixels).float()

    @torch.no_grad()
    def encode_condition(self, pixels: torch.Tensor, num_latent_frames: int) -> torch.Tensor:
        """The 20 condition channels ``[1, 4 + 16, L, h, w]`` float32 of a clip starting at the reference.

        The VAE encodes ``[reference, zeros x 4(L - 1)]`` (``pixels`` in ``[-1, 1]``, zeros = mid-grey), mode
        of the posterior, normalised; the mask is 1 on latent frame 0 (SPEC.md section 4).
        """
        num_frames = video_frames_for_latent_frames(num_latent_frames)
        device = self._module_device(self.vae, self._execution_device)
        ref = pixels.to(device=device, dtype=self.vae.dtype).unsqueeze(2)
        video = torch.cat([ref, ref.new_zeros(ref.shape[0], 3, num_frames - 1, *ref.shape[-2:])], dim=2)
        latents = normalize_latents(self.vae, self.vae.encode(video).latent_dist.mode())
        mask = first_frame_mask(num_latent_frames, *latents.shape[-2:], device=latents.device)
        return torch.cat([mask.expand(latents.shape[0], -1, -1, -1, -1), latents], dim=1)

    # -- checks --------------------------------------------------------------------------------------------

    def check_inputs(
        self,
        image,
        driving_video,
        expression_features,
        prompt,
        negative_prompt,
        num_inference_steps,
        context_size,
        context_overlap,
        text_cfg_scale,
        emo_cfg_scale,
        max_size,
        fps,
        output_path,
        output_type,
        decode_chunk_size,
    ) -> None:
        """Raise a ``ValueError`` naming the argument and its allowed values before any compute."""
        if not isinstance(image, (Image.Image, str, os.PathLike, np.ndarray)):
            raise ValueError(f"image must be a PIL image, an image path or a uint8 HxWx3 array, got {type(image)}")
        if isinstance(image, (str, os.PathLike)) and not Path(image).is_file():
            raise ValueError(f"image: no such file {image}")
        if isinstance(image, np.ndarray) and (image.ndim != 3 or image.shape[2] not in (3, 4)):
            raise ValueError(f"image array must be HxWx3 (or 4), got shape {image.shape}")
        if (driving_video is None) == (expression_features is None):
            raise ValueError("give exactly one of driving_video (a video path) and expression_features ([N, 554])")
        if driving_video is not None:
            if not Path(driving_video).is_file():
                raise ValueError(f"driving_video: no such file {driving_video}")
            if self.motion_encoder is None:
                raise ValueError(
                    "driving_video needs the pipeline's motion_encoder (PD-FGC, pd_fpg.pth); "
                    "pass motion_encoder=... or precomputed expression_features"
                )
        if expression_features is not None:
            if not isinstance(expression_features, (torch.Tensor, np.ndarray)):
                raise ValueError(
                    f"expression_features must be a tensor or array [N, {EXPRESSION_DIM}], got {type(expression_features)}"
                )
            shape = tuple(expression_features.shape)
            if len(shape) != 2 or shape[1] != EXPRESSION_DIM:
                raise ValueError(f"expression_features must be [N, {EXPRESSION_DIM}], got shape {shape}")
            if shape[0] < VAE_TEMPORAL_FACTOR + 1:
                raise ValueError(
                    f"expression_features need >= {VAE_TEMPORAL_FACTOR + 1} frames (one output frame needs "
                    f"two latent frames), got {shape[0]}"
                )
        if not isinstance(prompt, str):
            raise ValueError(f"prompt must be a str, got {type(prompt)}")
        if negative_prompt is not None and not isinstance(negative_prompt, str):
            raise ValueError(f"negative_prompt must be a str or None, got {type(negative_prompt)}")
        if not isinstance(num_inference_steps, int) or num_inference_steps < 1:
            raise ValueError(f"num_inference_steps must be an int >= 1, got {num_inference_steps!r}")
        if not isinstance(context_size, int) or context_size < 1:
            raise ValueError(f"context_size must be an int >= 1 (latent frames), got {context_size!r}")
        if not isinstance(context_overlap, int) or not 0 <= context_overlap < context_size:
            raise ValueError(
                f"context_overlap must be an int in [0, context_size - 1] = [0, {context_size - 1}] latent "
                f"frames, got {context_overlap!r}"
            )
        plan_guidance(text_cfg_scale, emo_cfg_scale)  # raises for non-finite scales
        if not isinstance(max_size, int) or max_size < SIZE_MULTIPLE:
            raise ValueError(f"max_size must be an int >= {SIZE_MULTIPLE} pixels, got {max_size!r}")
        if fps is not None and not (isinstance(fps, (int, float)) and fps > 0 and np.isfinite(fps)):
            raise ValueError(f"fps must be a positive number or None, got {fps!r}")
        if output_path is not None and Path(output_path).suffix.lower() != ".mp4":
            raise ValueError(f"output_path must end in .mp4, got {output_path}")
        if output_type not in ("np", "latent", None):
            raise ValueError(f"output_type must be 'np', 'latent' or None, got {output_type!r}")
        if output_type == "latent" and output_path is not None:
            raise ValueError("output_type='latent' does not decode; it cannot write output_path")
        if output_type is None and output_path is None:
            raise ValueError("output_type=None keeps no frames; give output_path or output_type='np'")
        if not isinstance(decode_chunk_size, int) or decode_chunk_size < 1:
            raise ValueError(f"decode_chunk_size must be an int >= 1 (latent frames), got {decode_chunk_size!r}")

    # -- call ----------------------------------------------------------------------------------------------

    @torch.no_grad()
    def __call__(
        self,
        image: Image.Image | str | os.PathLike | np.ndarray,
        driving_video: str | os.PathLike | None = None,
        expression_features: torch.Tensor | np.ndarray | None = None,
        prompt: str = DEFAULT_PROMPT,
        negative_prompt: str | None = DEFAULT_NEGATIVE_PROMPT,
        num_inference_steps: int = DEFAULT_NUM_INFERENCE_STEPS,
        context_size: int = DEFAULT_CONTEXT_SIZE,
        context_overlap: int = DEFAULT_CONTEXT_OVERLAP,
        text_cfg_scale: float = DEFAULT_TEXT_CFG_SCALE,
        emo_cfg_scale: float = DEFAULT_EMO_CFG_SCALE,
        max_size: int = DEFAULT_MAX_SIZE,
        generator: torch.Generator | None = None,
        fps: float | None = None,
        output_path: str | os.PathLike | None = None,
        output_type: str | None = "np",
        audio_source: str | os.PathLike | None = None,
        decode_chunk_size: int = 4,
        callback: Callable[[dict[str, Any]], None] | None = None,
        attention_kwargs: dict | None = None,
        expression_kwargs: dict | None = None,
        batch_guidance: bool = True,
    ) -> FlashPortraitPipelineOutput:
        """Animate ``image`` with the driving expressions.

        Args:
            image: the reference portrait (PIL, path or uint8 ``HxWx3``); RGBA is composited on black
                (``convert("RGB")``).
            driving_video: a driving video path (needs ``motion_encoder``); its fps is the output's and
                its audio is muxed (aligned to the output frames) unless ``audio_source`` overrides it.
            expression_features: precomputed PD-FGC features ``[N, 554]`` (float), instead of a video.
            prompt, negative_prompt: text; the negative prompt is encoded only if ``text_cfg_scale != 1``.
            num_inference_steps: sampling steps (released default 30).
            context_size, context_overlap: latent frames per window / shared by consecutive windows.
            text_cfg_scale, emo_cfg_scale: guidance scales (SPEC.md section 4).
            max_size: longer output side in pixels before rounding up to a multiple of 16.
            generator: seeds the one noise tensor of the whole video (a CPU generator gives the same
                noise on every device).
            fps: output frame rate; default the driving video's, else 25. With ``driving_video`` the video
                is resampled to it by timestamps (``target_fps`` of the extraction).
            output_path: stream the frames into this ``.mp4`` (memory does not grow with length).
            output_type: ``"np"`` (also return the uint8 frames; short videos), ``"latent"`` (return the
                latents, no decoding) or ``None`` (only write ``output_path``).
            audio_source: a media file whose audio is muxed (default: the driving video's). Its timeline is
                the driving video's: output frame 0 shows driving frame 1, so the audio starts at ``1 / fps``
                and lasts ``(N_used - 1) / fps`` seconds.
            decode_chunk_size: latent frames per VAE decode chunk.
            callback: called after every sampling step with ``{"step", "timestep", "sigma", "latents",
                "velocity"}`` (:func:`flashportrait.sampling.sample_windows`).
            attention_kwargs: passed to the transformer.
            expression_kwargs: extra keyword arguments of
                :func:`flashportrait.expression.extract_expression_features` for ``driving_video``.
            batch_guidance: run the guidance branches of a window as one batch (fast) or one after another
                (same result, less activation memory).

        Returns:
            :class:`FlashPortraitPipelineOutput` with ``N_used - 1`` frames.
        """
        self.check_inputs(
            image,
            driving_video,
            expression_features,
            prompt,
            negative_prompt,
            num_inference_steps,
            context_size,
            context_overlap,
            text_cfg_scale,
            emo_cfg_scale,
            max_size,
            fps,
            output_path,
            output_type,
            decode_chunk_size,
        )
        device = self._execution_device
        disable = getattr(self, "_progress_bar_config", {}).get("disable", None)
        plan = plan_guidance(text_cfg_scale, emo_cfg_scale)

        # 1. driving expressions -> features [N_used, 554]
        audio_start_s = None
        if driving_video is not None:
            from .expression import extract_expression_features

            kwargs = dict(expression_kwargs or {})
            if fps is not None:  # resample the driving video to the requested rate, keeping audio in sync
                kwargs.setdefault("target_fps", float(fps))
            kwargs.setdefault("progress", not disable)
            extracted = extract_expression_features(driving_video, self.motion_encoder, device=device, **kwargs)
            features = torch.as_tensor(extracted.features, dtype=torch.float32)
            fps = float(extracted.fps)
            if audio_source is None:
                audio_source = driving_video
            audio_start_s = 1.0 / float(extracted.fps)  # output frame 0 = driving frame 1
        else:
            if isinstance(expression_features, torch.Tensor):
                features = expression_features.detach().to(device="cpu", dtype=torch.float32)
            else:
                features = torch.as_tensor(np.asarray(expression_features), dtype=torch.float32)
            fps = float(fps or DEFAULT_FPS)
            audio_start_s = 1.0 / fps
        if features.shape[0] < VAE_TEMPORAL_FACTOR + 1:
            raise ValueError(f"the driving video gave {features.shape[0]} frames; need >= {VAE_TEMPORAL_FACTOR + 1}")
        num_video_frames = usable_video_frames(features.shape[0])
        features = features[:num_video_frames]
        num_latent_frames = latent_frames_for_video_frames(num_video_frames)
        windows = context_windows(num_latent_frames, context_size, context_overlap)
        window_length = len(windows[0])

        # 2. reference image at the output size
        if isinstance(image, (str, os.PathLike)):
            image = Image.open(image)
        elif isinstance(image, np.ndarray):
            image = Image.fromarray(image)
        image = image.convert("RGB")
        width, height = reference_size(*image.size, max_size)
        image = image.resize((width, height), Image.LANCZOS)
        pixels = torch.from_numpy(np.asarray(image, dtype=np.float32) / 127.5 - 1.0).permute(2, 0, 1)[None]

        # 3. conditioning
        compute_dtype = self.transformer.dtype  # the compute dtype also under fp8 layerwise casting
        prompt_embeds = self.encode_prompt(prompt)
        negative_embeds = None
        if "U" in plan.branches:
            negative_embeds = self.encode_prompt(negative_prompt if negative_prompt is not None else "")
        image_embeds = self.encode_image(image)
        condition = self.encode_condition(pixels, window_length)
        encoder_device = self._module_device(self.portrait_encoder, device)

        def encode_tokens(part: torch.Tensor) -> torch.Tensor:  # [1, n, 554] -> [1, n * 24, 2048]
            tokens = self.portrait_encoder(part.to(device=encoder_device, dtype=self.portrait_encoder.dtype))
            return tokens.to(device=device, dtype=compute_dtype)

        token_windows = ExpressionTokenWindows(
            features, encode_tokens, tokens_per_frame=self.portrait_encoder.tokens_per_frame
        )
        denoiser = WindowDenoiser(
            self.transformer,
            condition.to(device),
            plan,
            prompt_embeds.to(device),
            None if negative_embeds is None else negative_embeds.to(device),
            image_embeds.to(device),
            expression_tokens=token_windows,
            dtype=compute_dtype,
            attention_kwargs=attention_kwargs,
            batch_branches=batch_guidance,
        )

        # 4. sampling: one noise tensor for the whole video
        from diffusers.utils.torch_utils import randn_tensor

        shape = (1, self.vae.config.z_dim, num_latent_frames, height // VAE_SPATIAL_FACTOR, width // VAE_SPATIAL_FACTOR)
        noise = randn_tensor(shape, generator=generator, device=device, dtype=torch.float32)
        latents = sample_windows(
            denoiser,
            noise,
            self.scheduler,
            num_inference_steps,
            windows,
            callback=callback,
            disable=disable,
            generator=generator,
        )

        num_out = num_video_frames - 1
        if output_type == "latent":
            self.maybe_free_model_hooks()
            return FlashPortraitPipelineOutput(frames=None, latents=latents, path=None, fps=fps, num_frames=num_out)

        # 5. streamed decoding (drop the reference slot: the first decoded frame)
        kept: list[np.ndarray] | None = [] if output_type == "np" else None
        with contextlib.ExitStack() as stack:
            writer = None
            if output_path is not None:
                from .video_io import StreamingVideoWriter

                writer = stack.enter_context(
                    StreamingVideoWriter(
                        output_path,
                        fps,
                        audio_source=audio_source,
                        audio_start_s=audio_start_s if audio_source else 0.0,
                        audio_duration_s=num_out / fps if audio_source else None,
                    )
                )
            chunks = stack.enter_context(contextlib.closing(iter_decode_latents(self.vae, latents, decode_chunk_size)))
            for index, chunk in enumerate(chunks):
                frames = frames_to_uint8(chunk)[1 if index == 0 else 0 :]
                if len(frames) == 0:
                    continue
                if writer is not None:
                    writer.write(frames)
                if kept is not None:
                    kept.append(frames)
        self.maybe_free_model_hooks()
        out_frames = np.concatenate(kept) if kept else None
        return FlashPortraitPipelineOutput(
            frames=out_frames,
            latents=None,
            path=str(output_path) if output_path is not None else None,
            fps=fps,
            num_frames=num_out,
        )


# --- memory modes (the released --GPU_memory_mode values) ---------------------------------------------------

GPU_MEMORY_MODES = (
    "model_full_load",
    "model_cpu_offload",
    "sequential_cpu_offload",
    "model_cpu_offload_and_qfloat8",
    "model_full_load_and_qfloat8",
)


def configure_memory(
    pipe: FlashPortraitPipeline, mode: str, device: str | torch.device, compute_dtype: torch.dtype = torch.bfloat16
) -> FlashPortraitPipeline:
    """Place the pipeline for one of the released ``GPU_memory_mode`` values, with diffusers' own tools.

    * ``model_full_load``: everything on ``device``;
    * ``model_cpu_offload``: ``enable_model_cpu_offload`` (one component on the accelerator at a time);
    * ``sequential_cpu_offload``: ``enable_sequential_cpu_offload`` (layer by layer; slowest, least memory);
    * ``*_and_qfloat8``: additionally store the transformer's weights in float8 (e4m3) and compute in
      ``compute_dtype`` (``enable_layerwise_casting``; diffusers keeps norms, embeddings and the patch
      embedding in full precision).

    Raises:
        ValueError: unknown ``mode``, or an offloading mode on a CPU device (offloading moves weights
        between the CPU and an accelerator).
    """
    if mode not in GPU_MEMORY_MODES:
        raise ValueError(f"GPU_memory_mode must be one of {GPU_MEMORY_MODES}, got {mode!r}")
    device = torch.device(device)
    if "offload" in mode and device.type == "cpu":
        raise ValueError(
            f"GPU_memory_mode {mode} offloads to the CPU from an accelerator; with device cpu use "
            "model_full_load (or model_full_load_and_qfloat8)"
        )
    if mode.endswith("_and_qfloat8"):
        pipe.transformer.enable_layerwise_casting(storage_dtype=torch.float8_e4m3fn, compute_dtype=compute_dtype)
    if mode.startswith("model_full_load"):
        pipe.to(device)
    elif mode.startswith("model_cpu_offload"):
        pipe.enable_model_cpu_offload(device=device)
    else:
        pipe.enable_sequential_cpu_offload(device=device)
    return pipe
