"""FlashPortraitPipeline: reference image + driving expressions -> portrait video of any length.

It reads like diffusers' Wan I2V pipeline: check inputs, encode (expressions, prompt, image, reference
condition), prepare latents, the denoising loop, decode (SPEC.md sections 1, 2, 4):

1. driving video -> ``[N, 554]`` expression features (:mod:`flashportrait.expression`); ``N_used = 4k + 1
   <= N`` frames are used, the 0-3 extra ones at the end are dropped
   (:func:`flashportrait.windows.usable_video_frames`);
2. the reference image (:mod:`flashportrait.reference_image`) at the output size: longer side ``max_size``,
   both sides rounded **up** to multiples of 16 (as the released ``infer.py``), Lanczos;
3. umT5 encodes the prompt and, when guidance needs it, the negative prompt (512 tokens, zero past the real
   length, as Wan); CLIP encodes the whole resized reference (257 tokens); the VAE encodes ``[reference,
   zeros ...]`` of one window's length: with the 4 mask channels these are the 20 condition channels every
   window gets;
4. one seeded noise tensor for the whole video; per step every window is denoised with its own
   expression tokens and the guidance branches as one batch (:class:`~flashportrait.window_model.
   WindowDenoiser`), the velocities are blended and the scheduler steps the full latent once
   (:func:`~flashportrait.sampling.sample_windows`);
5. the VAE decodes in temporal chunks through its causal cache (:func:`~flashportrait.latents.
   iter_decode_latents`) and the frames stream into the MP4 writer with the driving video's audio; the
   first decoded frame (the reference slot) is dropped: ``N_used - 1`` output frames, output frame ``k``
   showing driving frame ``k + 1``.

Construction from checkpoint files or the tiny family is in :mod:`flashportrait.factory`, memory modes in
:mod:`flashportrait.memory`, command-line flags in :mod:`flashportrait.args`.

Length: one class whose ``__call__`` is the five steps above, plus the encode/prepare/decode methods diffusers'
pipelines keep on the class; every option of a run (memory plan, window and guidance parallelism, ALP) is a
few lines of it and lives in its own module.
"""

from __future__ import annotations

import contextlib
import html
import logging
import math
import os
import re
from dataclasses import dataclass

import numpy as np
import torch
from diffusers import DiffusionPipeline
from diffusers.callbacks import MultiPipelineCallbacks, PipelineCallback
from diffusers.utils import BaseOutput
from diffusers.utils.torch_utils import randn_tensor
from PIL import Image

from .config import (
    DEFAULT_CONTEXT_OVERLAP,
    DEFAULT_CONTEXT_SIZE,
    DEFAULT_EMO_CFG_SCALE,
    DEFAULT_FPS,
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
from .latents import frames_to_uint8, iter_decode_latents, normalize_latents
from .memory import onloaded, plan_pipeline_memory
from .parallel import WindowParallelVelocity, broadcast_from_main_rank, run_on_main_rank
from .preflight import check_output_path
from .reference_image import (
    SIZE_MULTIPLE,
    clip_preprocess,
    encode_clip_image,
    load_reference_image,
    resize_reference,
)
from .sampling import sample_windows
from .window_model import ExpressionTokenWindows, WindowDenoiser, first_frame_mask
from .windows import (
    context_windows,
    latent_frames_for_video_frames,
    usable_video_frames,
    video_frames_for_latent_frames,
)

__all__ = ["FlashPortraitPipeline", "FlashPortraitPipelineOutput", "clean_prompt"]

logger = logging.getLogger(__name__)


def clean_prompt(text: str) -> str:
    """Wan's prompt cleaning: ftfy (when installed), HTML unescaping twice, whitespace collapsed."""
    try:
        import ftfy

        text = ftfy.fix_text(text)
    except ImportError:
        pass
    text = html.unescape(html.unescape(text)).strip()
    return re.sub(r"\s+", " ", text).strip()


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


class FlashPortraitPipeline(DiffusionPipeline):
    """Video-driven portrait animation on Wan2.1-I2V with the FlashPortrait transformer (arXiv 2512.16900).

    Components: ``tokenizer`` + ``text_encoder`` (umT5), ``image_encoder`` (CLIP ViT-H/14 vision tower),
    ``vae`` (``AutoencoderKLWan``), ``transformer`` (``FlashPortraitTransformer3DModel``),
    ``portrait_encoder`` (``PortraitEncoder``), ``scheduler`` (a flow scheduler, see
    :func:`flashportrait.sampling.make_scheduler`) and optionally ``motion_encoder``
    (``PDFGCMotionEncoder``, needed only to take a driving *video*; precomputed ``[N, 554]`` features
    need none). Build one with :mod:`flashportrait.factory`.
    """

    model_cpu_offload_seq = "text_encoder->image_encoder->transformer->vae"
    _optional_components = ["motion_encoder"]
    # small next to the transformer and called per window (portrait encoder) or moved by the expression
    # extractor itself (motion encoder): kept whole on the execution device
    _exclude_from_cpu_offload = ["portrait_encoder", "motion_encoder"]
    _callback_tensor_inputs = ["latents", "velocity"]

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

    # -- encoding ------------------------------------------------------------------------------------------

    def _module_device(self, module) -> torch.device:
        """Where ``module`` runs (its offload hook's device under CPU offloading)."""
        from diffusers.utils.torch_utils import get_module_execution_device

        try:
            return get_module_execution_device(module)
        except (StopIteration, ValueError):
            return self._execution_device

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
        device = self._module_device(self.text_encoder)
        mask = inputs.attention_mask.to(device)
        embeds = self.text_encoder(inputs.input_ids.to(device), attention_mask=mask).last_hidden_state
        keep = (torch.arange(embeds.shape[1], device=device)[None] < mask.sum(dim=1, keepdim=True)).unsqueeze(-1)
        return torch.where(keep, embeds.float(), embeds.new_zeros(()).float())

    @torch.no_grad()
    def encode_image(self, image: Image.Image) -> torch.Tensor:
        """CLIP penultimate hidden states ``[1, 257, C]`` float32 of the whole image (bicubic 224, no crop)."""
        device = self._module_device(self.image_encoder)
        pixels = clip_preprocess(np.array(image.convert("RGB"))).to(device=device, dtype=self.image_encoder.dtype)
        return encode_clip_image(self.image_encoder, pixels).float()

    @torch.no_grad()
    def encode_condition(self, pixels: torch.Tensor, num_latent_frames: int) -> torch.Tensor:
        """The 20 condition channels ``[1, 4 + 16, L, h, w]`` float32 of a clip starting at the reference.

        The VAE encodes ``[reference, zeros x 4(L - 1)]`` (``pixels`` ``[1, 3, H, W]`` in ``[-1, 1]``, zeros =
        mid-grey), mode of the posterior, normalised; the mask is 1 on latent frame 0 (SPEC.md section 4).
        """
        num_frames = video_frames_for_latent_frames(num_latent_frames)
        device = self._module_device(self.vae)
        ref = pixels.to(device=device, dtype=self.vae.dtype).unsqueeze(2)
        video = torch.cat([ref, ref.new_zeros(ref.shape[0], 3, num_frames - 1, *ref.shape[-2:])], dim=2)
        latents = normalize_latents(self.vae, self.vae.encode(video).latent_dist.mode())
        mask = first_frame_mask(num_latent_frames, *latents.shape[-2:], device=latents.device)
        return torch.cat([mask.expand(latents.shape[0], -1, -1, -1, -1), latents], dim=1)

    def prepare_expression_features(
        self,
        driving_video: str | os.PathLike | None,
        expression_features: torch.Tensor | np.ndarray | None,
        fps: float | None,
        expression_kwargs: dict | None = None,
    ) -> tuple[torch.Tensor, float]:
        """The driving expressions as float32 ``[N, 554]`` (CPU) and their frame rate.

        A driving video goes through :func:`flashportrait.expression.extract_expression_features` on the
        execution device (resampled to ``fps`` by timestamps when given); precomputed features are used as
        they are, at ``fps`` (default 25).
        """
        if driving_video is None:
            if isinstance(expression_features, torch.Tensor):
                features = expression_features.detach().to(device="cpu", dtype=torch.float32)
            else:
                features = torch.as_tensor(np.asarray(expression_features), dtype=torch.float32)
            return features, float(fps or DEFAULT_FPS)
        from .expression import extract_expression_features

        kwargs = dict(expression_kwargs or {})
        if fps is not None:  # resample the driving video to the requested rate, keeping audio in sync
            kwargs.setdefault("target_fps", float(fps))
        kwargs.setdefault("progress", self.progress_bar)
        extracted = extract_expression_features(driving_video, self.motion_encoder, device=self._execution_device,
                                                **kwargs)
        return torch.as_tensor(extracted.features, dtype=torch.float32), float(extracted.fps)

    def prepare_latents(
        self,
        shape: tuple[int, ...],
        generator: torch.Generator | None,
        released_noise: bool = False,
        device: torch.device | None = None,
    ) -> torch.Tensor:
        """One noise tensor ``shape`` for the whole video, returned as float32 on ``device`` (default: the
        execution device; the CPU for the full-length latents of very long videos).

        Default: drawn in float32 on the generator's device (a CPU generator gives the same noise, so the same
        video, on every device). ``released_noise``: drawn as the released script does, on the execution
        device in the transformer's compute dtype (give a generator on that device), so a seed gives the
        released script's noise (SPEC.md section 4).
        """
        if released_noise:
            noise = randn_tensor(shape, generator=generator, device=self._execution_device, dtype=self.transformer.dtype)
            return noise.to(device=device or self._execution_device, dtype=torch.float32)
        noise = randn_tensor(shape, generator=generator, device=torch.device("cpu") if generator is None
                             else generator.device, dtype=torch.float32)
        return noise.to(device or self._execution_device)

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
        audio_source,
        decode_chunk_size,
        callback_on_step_end_tensor_inputs,
    ) -> None:
        """Raise a ``ValueError`` naming the argument and its allowed values before any compute.

        Files are checked too: the image decodes (:func:`~flashportrait.reference_image.load_reference_image`),
        the driving video opens (:func:`~flashportrait.video_io.probe_video`, which also refuses truncated
        files), ``audio_source`` opens, and ``output_path``'s folder is writable.
        """
        from .video_io import check_media_file, probe_video

        if not isinstance(image, (Image.Image, str, os.PathLike, np.ndarray)):
            raise ValueError(f"image must be a PIL image, an image path or a uint8 HxWx3 array, got {type(image)}")
        load_reference_image(image)  # raises ImageReadError (a ValueError) naming the file
        if (driving_video is None) == (expression_features is None):
            raise ValueError("give exactly one of driving_video (a video path) and expression_features ([N, 554])")
        if driving_video is not None:
            probe_video(driving_video)
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
        if isinstance(num_inference_steps, bool) or not isinstance(num_inference_steps, int) or num_inference_steps < 1:
            raise ValueError(f"num_inference_steps must be an int >= 1, got {num_inference_steps!r}")
        if isinstance(context_size, bool) or not isinstance(context_size, int) or context_size < 1:
            raise ValueError(f"context_size must be an int >= 1 (latent frames), got {context_size!r}")
        if not isinstance(context_overlap, int) or not 0 <= context_overlap < context_size:
            raise ValueError(
                f"context_overlap must be an int in [0, context_size - 1] = [0, {context_size - 1}] latent "
                f"frames, got {context_overlap!r}"
            )
        plan_guidance(text_cfg_scale, emo_cfg_scale)  # raises for non-finite or negative scales
        if isinstance(max_size, bool) or not isinstance(max_size, int) or max_size < SIZE_MULTIPLE:
            raise ValueError(f"max_size must be an int >= {SIZE_MULTIPLE} pixels, got {max_size!r}")
        if fps is not None and not (isinstance(fps, (int, float)) and fps > 0 and math.isfinite(fps)):
            raise ValueError(f"fps must be a positive number or None, got {fps!r}")
        if output_type not in ("np", "latent", None):
            raise ValueError(f"output_type must be 'np', 'latent' or None, got {output_type!r}")
        if output_type == "latent" and output_path is not None:
            raise ValueError("output_type='latent' does not decode; it cannot write output_path")
        if output_type is None and output_path is None:
            raise ValueError("output_type=None keeps no frames; give output_path or output_type='np'")
        if output_path is not None:
            check_output_path(output_path)
        if audio_source is not None:
            check_media_file(audio_source)
        if isinstance(decode_chunk_size, bool) or not isinstance(decode_chunk_size, int) or decode_chunk_size < 1:
            raise ValueError(f"decode_chunk_size must be an int >= 1 (latent frames), got {decode_chunk_size!r}")
        unknown = [k for k in callback_on_step_end_tensor_inputs or () if k not in self._callback_tensor_inputs]
        if unknown:
            raise ValueError(
                f"callback_on_step_end_tensor_inputs {unknown} are not available; choose from "
                f"{self._callback_tensor_inputs}"
            )

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
        attention_kwargs: dict | None = None,
        expression_kwargs: dict | None = None,
        batch_guidance: bool | None = None,
        latents_on_cpu: bool | None = None,
        blend_first_step: bool = False,
        released_noise: bool = False,
        parallel=None,
        callback_on_step_end=None,
        callback_on_step_end_tensor_inputs: list[str] = ("latents",),
        alp=None,
        sigmas=None,
    ) -> FlashPortraitPipelineOutput:
        """Animate ``image`` with the driving expressions.

        Args:
            image: the reference portrait (PIL, path or uint8 ``HxWx3``/``HxWx4``), read by
                :func:`~flashportrait.reference_image.load_reference_image` (EXIF orientation applied,
                transparency composited onto white, 16-bit greyscale scaled).
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
            attention_kwargs: passed to the transformer.
            expression_kwargs: extra keyword arguments of
                :func:`flashportrait.expression.extract_expression_features` for ``driving_video``.
            batch_guidance: run the guidance branches of a window as one batch (fast) or one after another
                (same result, one branch's activation memory); ``None``: the memory plan chooses, batched when it
                fits in the free memory (:func:`~flashportrait.memory.plan_pipeline_memory`, logged before sampling).
            latents_on_cpu: keep the full-length latents, velocity and scheduler state in CPU memory, only the
                current window on the device (very long videos; same result); ``None``: the memory plan chooses
                (CPU when the state exceeds :data:`~flashportrait.memory.LATENTS_ON_GPU_MAX_BYTES` or would not fit).
            blend_first_step: blend the window overlaps at the first sampling step too; default: the released
                loop's rule (the later window overwrites the overlap at the first step, blending from the
                second step on).
            released_noise: draw the noise as the released script does (see :meth:`prepare_latents`).
            parallel: a :class:`~flashportrait.parallel.ParallelGrid` from :func:`~flashportrait.parallel.init_parallel`
                (under ``torchrun``): the windows, or with fewer windows than window groups their guidance branches,
                are shared out over the ranks (:class:`~flashportrait.parallel.WindowParallelVelocity`); rank 0
                extracts the expressions and draws the noise for all, and alone decodes and writes (the other ranks
                return ``frames=None, path=None``). ``None``: one process.
            callback_on_step_end: diffusers' step-end callback ``f(pipe, step, timestep, callback_kwargs) ->
                dict`` (or a ``PipelineCallback``), called after every sampling step; a ``"latents"`` entry
                in the returned dict replaces the latents. Raise from it to stop sampling.
            callback_on_step_end_tensor_inputs: which of ``"latents"`` (after the step) and ``"velocity"``
                (the blended, guided velocity of the step) go into ``callback_kwargs``.
            alp: Adaptive Latent Prediction (:class:`~flashportrait.alp.ALPConfig`): evaluate the transformer at
                some steps only and forecast the others (``fast_infer.py``); ``None``: every step.
            sigmas: a custom schedule of ``num_inference_steps`` sigmas for the scheduler (e.g. the distilled
                4-step :data:`flashportrait.lora.DISTILL_SIGMAS`); ``None``: the scheduler's own.

        Returns:
            :class:`FlashPortraitPipelineOutput` with ``N_used - 1`` frames.

        Raises:
            ValueError: bad arguments or unreadable input files (before any model runs);
            flashportrait.video_io.VideoReadError, flashportrait.face.FaceTrackingError: the driving video.
        """
        if isinstance(callback_on_step_end, (PipelineCallback, MultiPipelineCallbacks)):
            callback_on_step_end_tensor_inputs = callback_on_step_end.tensor_inputs
        self.check_inputs(
            image, driving_video, expression_features, prompt, negative_prompt, num_inference_steps, context_size,
            context_overlap, text_cfg_scale, emo_cfg_scale, max_size, fps, output_path, output_type, audio_source,
            decode_chunk_size, callback_on_step_end_tensor_inputs,
        )
        device = self._execution_device
        plan = plan_guidance(text_cfg_scale, emo_cfg_scale)

        # 1. driving expressions -> features [N_used, 554], windows over the latent frames
        features, fps = run_on_main_rank(  # rank 0 extracts, the others receive (parallel runs)
            lambda: self.prepare_expression_features(driving_video, expression_features, fps, expression_kwargs),
            parallel,
        )
        if driving_video is not None and audio_source is None:
            audio_source = driving_video
        if features.shape[0] < VAE_TEMPORAL_FACTOR + 1:
            raise ValueError(f"the driving video gave {features.shape[0]} frames; need >= {VAE_TEMPORAL_FACTOR + 1}")
        num_video_frames = usable_video_frames(features.shape[0])
        features = features[:num_video_frames]
        num_latent_frames = latent_frames_for_video_frames(num_video_frames)
        windows = context_windows(num_latent_frames, context_size, context_overlap)

        # 2. reference image at the output size
        image, pixels = resize_reference(load_reference_image(image), max_size)
        height, width = pixels.shape[-2:]

        # 3. conditioning: text, CLIP image, reference latents + mask, per-window expression tokens
        compute_dtype = self.transformer.dtype  # the compute dtype also under fp8 layerwise casting
        with onloaded(self.text_encoder, device):  # umT5 / CLIP leave the accelerator once used (every memory mode)
            prompt_embeds = self.encode_prompt(prompt)
            negative_embeds = None
            if plan.needs_negative_prompt:
                negative_embeds = self.encode_prompt(negative_prompt if negative_prompt is not None else "")
        with onloaded(self.image_encoder, device):
            image_embeds = self.encode_image(image)
        condition = self.encode_condition(pixels, len(windows[0]))

        # memory plan: expected peak, batched or sequential guidance, where the full-length latents live
        memory_plan = plan_pipeline_memory(
            self, height=height, width=width, window_latent_frames=max(len(w) for w in windows),
            num_latent_frames=num_latent_frames, num_branches=plan.num_branches, batch_guidance=batch_guidance,
            latents_on_cpu=latents_on_cpu,
        )
        (logger.info if memory_plan.fits else logger.warning)(memory_plan.describe())
        encoder_device = self._module_device(self.portrait_encoder)

        def encode_tokens(part: torch.Tensor) -> torch.Tensor:  # [1, n, 554] -> [1, n * 24, 2048]
            tokens = self.portrait_encoder(part.to(device=encoder_device, dtype=self.portrait_encoder.dtype))
            return tokens.to(device=device, dtype=compute_dtype)

        denoiser = WindowDenoiser(
            self.transformer,
            condition.to(device),
            plan,
            prompt_embeds.to(device),
            None if negative_embeds is None else negative_embeds.to(device),
            image_embeds.to(device),
            expression_tokens=ExpressionTokenWindows(
                features, encode_tokens, tokens_per_frame=self.portrait_encoder.tokens_per_frame
            ),
            dtype=compute_dtype,
            attention_kwargs=attention_kwargs,
            batch_branches=memory_plan.batch_guidance,
        )

        # 4. one noise tensor for the whole video
        latent_shape = (1, self.vae.config.z_dim, num_latent_frames, height // VAE_SPATIAL_FACTOR,
                        width // VAE_SPATIAL_FACTOR)
        latents_device = torch.device("cpu") if memory_plan.latents_on_cpu else device
        latents = broadcast_from_main_rank(
            self.prepare_latents(latent_shape, generator, released_noise, device=latents_device), parallel
        )

        # 5. denoising loop: every window, blend, one scheduler step on the full latent
        velocity_fn = None
        if parallel is not None:  # this rank's windows (or guidance branches), the others' broadcast, same blend
            velocity_fn = WindowParallelVelocity(parallel, plan.num_branches, denoiser.branch_outputs, denoiser.combine,
                                                 plan.branches)
        latents = self._denoise(denoiser, latents, windows, num_inference_steps, generator, blend_first_step,
                                callback_on_step_end, callback_on_step_end_tensor_inputs, velocity_fn=velocity_fn,
                                alp=alp, sigmas=sigmas)

        num_out = num_video_frames - 1
        if output_type == "latent":
            self.maybe_free_model_hooks()
            return FlashPortraitPipelineOutput(frames=None, latents=latents, path=None, fps=fps, num_frames=num_out)
        if parallel is not None and not parallel.is_main:  # rank 0 alone decodes and writes
            self.maybe_free_model_hooks()
            return FlashPortraitPipelineOutput(frames=None, latents=None, path=None, fps=fps, num_frames=num_out)

        # 6. streamed decoding (the first decoded frame is the reference slot: dropped)
        frames = self._decode(latents, decode_chunk_size, output_path, fps, audio_source, num_out, keep=output_type == "np")
        self.maybe_free_model_hooks()
        return FlashPortraitPipelineOutput(
            frames=frames,
            latents=None,
            path=str(output_path) if output_path is not None else None,
            fps=fps,
            num_frames=num_out,
        )

    def _denoise(self, denoiser, latents, windows, num_inference_steps, generator, blend_first_step,
                 callback_on_step_end, tensor_inputs, velocity_fn=None, alp=None, sigmas=None) -> torch.Tensor:
        """:func:`~flashportrait.sampling.sample_windows` with the pipeline's progress bar (one tick per step,
        the current window in its postfix) and diffusers' ``callback_on_step_end``."""
        position = {w.start: k + 1 for k, w in enumerate(windows)}
        with self.progress_bar(total=num_inference_steps) as progress:

            def note(window) -> None:
                if len(windows) > 1:
                    progress.set_postfix_str(f"window {position[window.start]}/{len(windows)}", refresh=False)

            def model(x, timestep, window):
                note(window)
                return denoiser(x, timestep, window)

            if hasattr(denoiser, "branch_outputs"):  # per-branch ALP and guidance parallelism call the branches

                def branch_outputs(x, timestep, window, **kwargs):
                    note(window)
                    return denoiser.branch_outputs(x, timestep, window, **kwargs)

                model.branch_outputs, model.combine = branch_outputs, denoiser.combine

            def on_step(info: dict) -> dict | None:
                progress.update()
                if callback_on_step_end is None:
                    return None
                kwargs = {k: info[k] for k in tensor_inputs}
                outputs = callback_on_step_end(self, info["step"], info["timestep"], kwargs) or {}
                return {"latents": outputs["latents"]} if "latents" in outputs else None

            return sample_windows(model, latents, self.scheduler, num_inference_steps, windows, callback=on_step,
                                  disable=True, generator=generator, blend_first_step=blend_first_step,
                                  velocity_fn=velocity_fn, alp=alp, sigmas=sigmas)

    def _decode(self, latents, chunk_size, output_path, fps, audio_source, num_out, keep) -> np.ndarray | None:
        """Decode in chunks and stream the frames (without the reference slot) to ``output_path`` and/or keep
        them; the audio of ``audio_source`` starts at ``1 / fps`` (output frame 0 = driving frame 1)."""
        kept: list[np.ndarray] | None = [] if keep else None
        with contextlib.ExitStack() as stack:
            writer = None
            if output_path is not None:
                from .video_io import StreamingVideoWriter

                writer = stack.enter_context(
                    StreamingVideoWriter(
                        output_path,
                        fps,
                        audio_source=audio_source,
                        audio_start_s=1.0 / fps if audio_source else 0.0,
                        audio_duration_s=num_out / fps if audio_source else None,
                    )
                )
            chunks = stack.enter_context(contextlib.closing(iter_decode_latents(self.vae, latents, chunk_size)))
            for index, chunk in enumerate(chunks):
                frames = frames_to_uint8(chunk)[1 if index == 0 else 0 :]
                if len(frames) == 0:
                    continue
                if writer is not None:
                    writer.write(frames)
                if kept is not None:
                    kept.append(frames)
        return np.concatenate(kept) if kept else None
