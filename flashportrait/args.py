"""Command-line flags shared by ``infer.py``, ``fast_infer.py`` and ``app.py``, and the policy that turns
them into pipeline arguments (one definition of each flag, one place for defaults that depend on others).

Flag names are the authors' (``--validation_image_start``, ``--sub_num_frames``, ``--GPU_memory_mode`` ...)
with clearer aliases; flags of our own follow their snake_case style. Out-of-range values are refused when
parsing (``--num_inference_steps 0`` is an error, never "use the default"); flags that contradict each
other are refused by :func:`resolve_settings`.
"""

from __future__ import annotations

import argparse
import math
from dataclasses import dataclass
from pathlib import Path

import torch

from .config import (
    DEFAULT_CONTEXT_OVERLAP,
    DEFAULT_CONTEXT_SIZE,
    DEFAULT_EMO_CFG_SCALE,
    DEFAULT_MAX_SIZE,
    DEFAULT_NEGATIVE_PROMPT,
    DEFAULT_NUM_INFERENCE_STEPS,
    DEFAULT_PROMPT,
    DEFAULT_SHIFT,
    DEFAULT_TEXT_CFG_SCALE,
    MAX_RELEASED_SIZE,
    VAE_TEMPORAL_FACTOR,
    default_cache_dir,
)
from .memory import GPU_MEMORY_MODES
from .sampling import SAMPLERS
from .windows import latent_frames_for_video_frames

__all__ = [
    "TINY_DEFAULTS",
    "DTYPES",
    "add_input_args",
    "add_checkpoint_args",
    "add_sampling_args",
    "add_hardware_args",
    "add_parallel_args",
    "add_alp_args",
    "resolve_alp",
    "make_parser",
    "resolve_context_size",
    "Settings",
    "resolve_settings",
    "find_face_tracker_models",
    "output_file",
]

#: ``--tiny`` defaults for flags left unset
TINY_DEFAULTS = dict(num_inference_steps=4, max_size=64, context_size=5, context_overlap=2)
#: ``--dtype`` names
DTYPES = {
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float32": torch.float32,
    "fp32": torch.float32,
    "float16": torch.float16,
    "fp16": torch.float16,
}


# --- argparse value types: refuse out-of-range values when parsing -------------------------------------


def int_at_least(minimum: int):
    """argparse type: an int ``>= minimum``."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be >= {minimum}, got {value}")
        return value

    return parse


def float_at_least(minimum: float, *, strict: bool = False):
    """argparse type: a finite float ``>= minimum`` (``> minimum`` if ``strict``)."""

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
        if not math.isfinite(value) or value < minimum or (strict and value == minimum):
            raise argparse.ArgumentTypeError(f"must be a finite number {'>' if strict else '>='} {minimum:g}, got {text}")
        return value

    return parse


# --- flag groups ---------------------------------------------------------------------------------------


def add_input_args(parser: argparse.ArgumentParser) -> None:
    """Inputs and outputs: reference image, driving video, prompt, output file, fps, frame limit, cache."""
    g = parser.add_argument_group("inputs and outputs")
    g.add_argument("--validation_image_start", "--reference_image", dest="reference_image", default=None,
                   help="reference portrait (png / jpg / webp; EXIF rotation applied, transparency on white)")
    g.add_argument("--validation_driven_video_path", "--driving_video", dest="driving_video", default=None,
                   help="driving video; its fps is the output's, its audio is muxed")
    g.add_argument("--prompt", default=DEFAULT_PROMPT)
    g.add_argument("--negative_prompt", default=DEFAULT_NEGATIVE_PROMPT, help="used when --text_cfg_scale != 1")
    g.add_argument("--save_path", default="samples/flashportrait", help="folder for NNNNNNNN.mp4 when no --output")
    g.add_argument("--output", default=None, help="output .mp4 file (overrides --save_path)")
    g.add_argument("--fps", type=float_at_least(0, strict=True), default=None,
                   help="output fps (default: the driving video's); the driving video is resampled to it")
    g.add_argument("--max_frames", type=int_at_least(5), default=None, help="use only the first N driving frames")
    g.add_argument("--cache_dir", default=None,
                   help=f"cache folder for expression features (default {default_cache_dir()}; delete it to clear)")


def add_checkpoint_args(parser: argparse.ArgumentParser) -> None:
    """The downloaded weights (the authors' flag names) and ``--tiny``."""
    g = parser.add_argument_group("checkpoints")
    g.add_argument("--wan_model_name", default=None, help="Wan2.1-I2V-14B-720P folder (original or Diffusers)")
    g.add_argument("--transformer_path", default=None, help="FlashPortrait transformer.pt")
    g.add_argument("--portrait_encoder_path", default=None, help="FlashPortrait portrait_encoder.pt")
    g.add_argument("--pd_fpg_model_path", default=None, help="PD-FGC motion encoder pd_fpg.pth")
    g.add_argument("--det_model_path", default=None,
                   help="the authors' face_det.onnx (default: next to pd_fpg.pth if there); with "
                   "--alignment_model_path the driving video goes through the authors' face tracker")
    g.add_argument("--alignment_model_path", default=None,
                   help="the authors' face_landmark.onnx (default: next to pd_fpg.pth if there)")
    g.add_argument("--tiny", action="store_true",
                   help="random tiny models (no checkpoints) + demo inputs: checks an installation in about a minute")


def add_sampling_args(parser: argparse.ArgumentParser) -> None:
    """Steps, sampler, windows, guidance, size, seed."""
    g = parser.add_argument_group("sampling")
    g.add_argument("--num_inference_steps", type=int_at_least(1), default=None,
                   help=f"default {DEFAULT_NUM_INFERENCE_STEPS} ({TINY_DEFAULTS['num_inference_steps']} with --tiny)")
    g.add_argument("--sampler", choices=SAMPLERS, default="euler")
    g.add_argument("--shift", type=float_at_least(0, strict=True), default=DEFAULT_SHIFT,
                   help="flow schedule shift (released 5)")
    g.add_argument("--context_size", type=int_at_least(1), default=None,
                   help=f"latent frames per window (default {DEFAULT_CONTEXT_SIZE} = 201 video frames; "
                   f"{TINY_DEFAULTS['context_size']} with --tiny)")
    g.add_argument("--sub_num_frames", type=int_at_least(1), default=None,
                   help="video frames per window, 4k+1 (released 201); must agree with --context_size")
    g.add_argument("--latents_num_frames", type=int_at_least(1), default=None,
                   help="latent frames per window (released 51); must agree with --context_size")
    g.add_argument("--context_overlap", type=int_at_least(0), default=None,
                   help=f"latent frames shared by consecutive windows (default {DEFAULT_CONTEXT_OVERLAP}, or the same "
                   "ratio for shorter windows; 10-40 is sensible)")
    g.add_argument("--text_cfg_scale", type=float_at_least(0), default=DEFAULT_TEXT_CFG_SCALE,
                   help="text guidance (1 = off, one model pass fewer)")
    g.add_argument("--emo_cfg_scale", type=float_at_least(0), default=DEFAULT_EMO_CFG_SCALE,
                   help="expression guidance (released options 2, 3, 4)")
    g.add_argument("--max_size", type=int_at_least(16), default=None,
                   help=f"longer output side in pixels, rounded up to /16 (default {DEFAULT_MAX_SIZE}; "
                   f"{TINY_DEFAULTS['max_size']} with --tiny; at most {MAX_RELEASED_SIZE} unless --allow_large_size)")
    g.add_argument("--allow_large_size", action="store_true",
                   help=f"allow --max_size above {MAX_RELEASED_SIZE} (beyond the released resolutions; memory grows "
                   "with the pixel count and is checked before the run)")
    g.add_argument("--seed", type=int, default=42)
    g.add_argument("--released_noise", action="store_true",
                   help="draw the initial noise as the released script does (on the GPU, in the compute dtype): "
                   "the released script's video for a seed; default: a CPU float32 draw, the same on every device")
    g.add_argument("--blend_first_step", action="store_true",
                   help="blend the window overlaps at the first sampling step too (the released loop overwrites "
                   "them at the first step and blends from the second on)")
    guidance = g.add_mutually_exclusive_group()
    guidance.add_argument("--sequential_guidance", action="store_true",
                          help="run the guidance passes one after another (one pass's activation memory, slower); "
                          "default: the memory plan logged before sampling chooses from the free GPU memory")
    guidance.add_argument("--batch_guidance", action="store_true",
                          help="run the guidance passes of a window as one batch (fastest) even where the memory "
                          "plan expects it not to fit")
    g.add_argument("--decode_chunk_size", type=int_at_least(1), default=4, help="latent frames per VAE decode chunk")


def add_hardware_args(parser: argparse.ArgumentParser) -> None:
    """Device, dtype and the released memory modes."""
    g = parser.add_argument_group("hardware")
    g.add_argument("--GPU_memory_mode", choices=GPU_MEMORY_MODES, default="model_full_load",
                   help="where the weights live: model_group_offload streams the transformer's blocks through the "
                   "GPU (about one block resident); the text and image encoders leave the GPU after encoding in "
                   "every mode")
    g.add_argument("--latents_on_cpu", action="store_true",
                   help="keep the whole video's latents, velocity and sampler state in CPU memory with only the "
                   "current window on the GPU (default: automatic for very long videos, see the memory plan)")
    g.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    g.add_argument("--dtype", choices=sorted(DTYPES), default=None, help="default: bfloat16 on GPU, float32 on CPU")


def add_parallel_args(parser: argparse.ArgumentParser) -> None:
    """More than one process (``torchrun``): sequence-parallel degrees (the authors' flag names) and the backend.
    Window (and guidance) parallelism needs no flag: it uses every rank not taken by the sequence degrees."""
    from .parallel import BACKENDS

    g = parser.add_argument_group("parallel (torchrun --nproc_per_node N ...)")
    g.add_argument("--ulysses_degree", type=int_at_least(1), default=1,
                   help="ranks sharing one window by Ulysses (all-to-all) sequence parallelism; must divide the heads")
    g.add_argument("--ring_degree", type=int_at_least(1), default=1,
                   help="ranks sharing one window by ring-attention sequence parallelism (GPUs only)")
    g.add_argument("--dist_backend", choices=BACKENDS, default=None,
                   help="torch.distributed backend (default: nccl with GPUs, gloo on CPUs)")


def add_alp_args(parser: argparse.ArgumentParser) -> None:
    """Acceleration (``fast_infer.py``, ``app.py``): Adaptive Latent Prediction (:class:`~flashportrait.alp.ALPConfig`,
    on unless ``--no_alp``; unset flags keep its measured defaults) and the authors' 4-step distillation LoRA.
    :func:`resolve_alp` turns them into the pipeline's ``alp`` argument."""
    from .alp import FORECAST_MODES, GRANULARITIES

    g = parser.add_argument_group("acceleration (Adaptive Latent Prediction; the released 4-step LoRA)")
    g.add_argument("--no_alp", action="store_true", help="evaluate the model at every step (no forecasting)")
    g.add_argument("--alp_mode", choices=FORECAST_MODES, default=None,
                   help="newton (default): exact polynomial extrapolation of the velocity or the data prediction "
                   "(chosen per interval); paper: the paper's printed Taylor formula (its ablation)")
    g.add_argument("--alp_order", type=int_at_least(0), default=None, help="forecast order (default 1; the paper: 3)")
    g.add_argument("--alp_interval", type=int_at_least(1), default=None,
                   help="fixed grid: evaluate every N-th step after the warm-up, and the last step")
    g.add_argument("--alp_warmup", type=int_at_least(1), default=None, help="first steps always evaluated (default 1)")
    g.add_argument("--alp_tolerance", type=float_at_least(0, strict=True), default=None,
                   help="adaptive intervals against this predicted, step-weighted relative forecast error")
    g.add_argument("--alp_budget", type=int_at_least(1), default=None,
                   help="model evaluations per window over the run (default: a fifth of the steps, 6 of 30)")
    g.add_argument("--alp_alpha", type=float_at_least(0), default=None,
                   help="--alp_mode paper: exponent of the timestep factor s (default 1.5; 0 = TaylorSeer)")
    g.add_argument("--alp_granularity", choices=GRANULARITIES, default=None,
                   help="what one forecast covers: the whole blended velocity (latent, default), each window, or "
                   "each window's guidance branches")
    g.add_argument("--step_distill_lora", default=None,
                   help="the authors' fast_lora_rank64.safetensors: merged for the run (the loaded weights stay "
                   "untouched) and sampled with its 4 steps (timesteps 1000, 750, 500, 250 at shift 5); no ALP")
    g.add_argument("--lora_scale", type=float_at_least(0), default=None, help="strength of --step_distill_lora (1)")


#: ``--alp_*`` flag -> :class:`~flashportrait.alp.ALPConfig` field
ALP_FLAGS = {"alp_mode": "mode", "alp_order": "order", "alp_interval": "interval", "alp_warmup": "warmup",
             "alp_tolerance": "tolerance", "alp_budget": "budget", "alp_alpha": "alpha", "alp_granularity": "granularity"}


def resolve_alp(args: argparse.Namespace):
    """The pipeline's ``alp`` argument for :func:`add_alp_args` flags: an ``ALPConfig`` (defaults for unset flags),
    or ``None`` with ``--no_alp`` or ``--step_distill_lora``.

    Raises:
        ValueError: ``--alp_*`` flags with ``--no_alp`` or ``--step_distill_lora`` (the distilled schedule has 4
        steps, each needed), ``--lora_scale`` without the LoRA, ``--alp_alpha`` outside paper mode, or
        contradicting ALP flags (e.g. ``--alp_interval`` with ``--alp_budget``).
    """
    from .alp import ALPConfig

    given = {flag: getattr(args, flag) for flag in ALP_FLAGS if getattr(args, flag, None) is not None}
    named = ", ".join("--" + f for f in given)
    if args.lora_scale is not None and args.step_distill_lora is None:
        raise ValueError("--lora_scale needs --step_distill_lora (the LoRA it scales)")
    if args.step_distill_lora is not None:
        if given:
            raise ValueError(f"--step_distill_lora does not combine with {named}: the distilled schedule has 4 "
                             "steps and needs every one (ALP forecasts between evaluations of a 30-step run); "
                             "give one of them")
        return None
    if args.no_alp:
        if given:
            raise ValueError(f"--no_alp contradicts {named}")
        return None
    if "alp_alpha" in given and given.get("alp_mode") != "paper":
        raise ValueError("--alp_alpha is the paper formula's timestep factor; add --alp_mode paper")
    try:
        return ALPConfig(**{ALP_FLAGS[f]: v for f, v in given.items()})
    except ValueError as exc:
        raise ValueError(f"{named}: {exc}") from None


def make_parser(description: str) -> argparse.ArgumentParser:
    """A parser with every group above (what ``infer.py`` takes)."""
    parser = argparse.ArgumentParser(description=description)
    add_input_args(parser)
    add_checkpoint_args(parser)
    add_sampling_args(parser)
    add_hardware_args(parser)
    add_parallel_args(parser)
    return parser


# --- policy --------------------------------------------------------------------------------------------


def resolve_context_size(
    context_size: int | None = None,
    sub_num_frames: int | None = None,
    latents_num_frames: int | None = None,
    default: int | None = None,
) -> int:
    """One window length in latent frames from the three ways the authors' flags give it.

    The released ``infer.py`` has ``sub_num_frames`` (video frames per window, ``4k + 1``, 201),
    ``latents_num_frames`` (latent frames per window, 51) and ``context_size`` (latent frames per window,
    51); they describe the same length and must agree: ``latents = (sub_num_frames - 1) / 4 + 1``.

    Args:
        context_size, sub_num_frames, latents_num_frames: any subset (``None`` = not given).
        default: returned when none is given (``None``: the released 51).

    Raises:
        ValueError: a value out of range (``sub_num_frames`` not ``4k + 1``, a length < 1) or two given
        values that disagree (the message names both flags and their latent lengths).
    """
    given: dict[str, int] = {}
    if sub_num_frames is not None:
        if sub_num_frames < 1 or (sub_num_frames - 1) % VAE_TEMPORAL_FACTOR != 0:
            raise ValueError(
                f"sub_num_frames (video frames per window) must be 4k + 1 >= 1 (e.g. 81, 201), got {sub_num_frames}"
            )
        given["sub_num_frames"] = latent_frames_for_video_frames(sub_num_frames)
    for name, value in (("latents_num_frames", latents_num_frames), ("context_size", context_size)):
        if value is not None:
            if value < 1:
                raise ValueError(f"{name} (latent frames per window) must be >= 1, got {value}")
            given[name] = value
    if not given:
        return DEFAULT_CONTEXT_SIZE if default is None else default
    if len(set(given.values())) > 1:
        described = ", ".join(
            f"--{k} {sub_num_frames} (= {v} latent frames)" if k == "sub_num_frames" else f"--{k} {v}"
            for k, v in given.items()
        )
        raise ValueError(
            f"contradicting window lengths: {described}. They all set the window length (sub_num_frames = "
            "4 (latents_num_frames - 1) + 1 video frames, context_size = latents_num_frames); give one, or "
            "consistent values."
        )
    return next(iter(given.values()))


@dataclass(frozen=True)
class Settings:
    """The flags after policy: every value the pipeline call needs, resolved and checked."""

    device: torch.device
    dtype: torch.dtype
    num_inference_steps: int
    context_size: int
    context_overlap: int
    max_size: int
    cache_dir: Path
    face_tracker_models: tuple[Path, Path] | None = None

    def call_kwargs(self, args: argparse.Namespace) -> dict:
        """Keyword arguments of :class:`~flashportrait.pipeline.FlashPortraitPipeline` for ``args``."""
        expression_kwargs = {"cache_dir": self.cache_dir / "expression"}
        if self.face_tracker_models is not None:
            from .face.released_tracker import ReleasedFaceTracker

            expression_kwargs["tracker"] = ReleasedFaceTracker(*self.face_tracker_models)
        if args.max_frames is not None:
            expression_kwargs["max_frames"] = args.max_frames
        return dict(
            prompt=args.prompt,
            negative_prompt=args.negative_prompt,
            num_inference_steps=self.num_inference_steps,
            context_size=self.context_size,
            context_overlap=self.context_overlap,
            text_cfg_scale=args.text_cfg_scale,
            emo_cfg_scale=args.emo_cfg_scale,
            max_size=self.max_size,
            generator=torch.Generator(self.device if args.released_noise else "cpu").manual_seed(args.seed),
            fps=args.fps,
            decode_chunk_size=args.decode_chunk_size,
            expression_kwargs=expression_kwargs,
            batch_guidance=True if getattr(args, "batch_guidance", False) else (False if args.sequential_guidance
                                                                                else None),
            latents_on_cpu=True if getattr(args, "latents_on_cpu", False) else None,
            blend_first_step=args.blend_first_step,
            released_noise=args.released_noise,
        )


def resolve_settings(args: argparse.Namespace) -> Settings:
    """Apply the flag policy: device and dtype defaults, ``--tiny`` defaults for unset flags, the window
    length from its three flags, the default overlap (the released 30 of 51, or that ratio for shorter
    windows), the size bound, and the checkpoint flags that must be given together.

    Raises:
        ValueError: contradicting or missing flags (the message names them).
    """
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = DTYPES[args.dtype or ("bfloat16" if device.type != "cpu" else "float32")]
    if dtype == torch.float16 and device.type == "cpu":
        raise ValueError("--dtype float16 is not usable on the CPU (about 1 GFLOP/s); use float32 or bfloat16")
    window_given = any(getattr(args, k) is not None for k in ("context_size", "sub_num_frames", "latents_num_frames"))
    tiny = {k: v for k, v in TINY_DEFAULTS.items() if args.tiny and not (k == "context_size" and window_given)}
    context_size = resolve_context_size(args.context_size, args.sub_num_frames, args.latents_num_frames,
                                        default=tiny.get("context_size"))
    overlap = args.context_overlap
    if overlap is None and args.tiny:
        overlap = min(TINY_DEFAULTS["context_overlap"], context_size - 1)
    if overlap is None:
        overlap = min(DEFAULT_CONTEXT_OVERLAP, round(context_size * DEFAULT_CONTEXT_OVERLAP / DEFAULT_CONTEXT_SIZE))
    if overlap >= context_size:
        raise ValueError(
            f"--context_overlap {overlap} must be smaller than the window length ({context_size} latent frames)"
        )
    max_size = args.max_size if args.max_size is not None else tiny.get("max_size", DEFAULT_MAX_SIZE)
    if max_size > MAX_RELEASED_SIZE and not args.allow_large_size:
        raise ValueError(
            f"--max_size {max_size} is above {MAX_RELEASED_SIZE}, the largest released resolution (1280x720); "
            "memory grows with the pixel count. Add --allow_large_size if you mean it."
        )
    if not args.tiny:
        missing = [f for f in ("wan_model_name", "portrait_encoder_path", "pd_fpg_model_path") if getattr(args, f) is None]
        if missing:
            raise ValueError("missing " + ", ".join("--" + m for m in missing) + " (or use --tiny for the "
                             "random-weight tiny models)")
    steps = args.num_inference_steps
    if steps is None:
        steps = tiny.get("num_inference_steps", DEFAULT_NUM_INFERENCE_STEPS)
    cache_dir = Path(args.cache_dir).expanduser() if args.cache_dir else default_cache_dir()
    trackers = find_face_tracker_models(args.pd_fpg_model_path, args.det_model_path, args.alignment_model_path)
    return Settings(device, dtype, steps, context_size, overlap, max_size, cache_dir, trackers)


def find_face_tracker_models(
    pd_fpg_model_path: str | None, det_model_path: str | None, alignment_model_path: str | None
) -> tuple[Path, Path] | None:
    """The authors' face tracker files: the two flags, else ``face_det.onnx`` + ``face_landmark.onnx`` next to
    ``pd_fpg.pth`` (as FrancisRing/FlashPortrait ships them), else None (the bundled detector is used).

    Raises:
        ValueError: only one of the two flags, or a flag naming a file that does not exist.
    """
    if (det_model_path is None) != (alignment_model_path is None):
        raise ValueError("give both --det_model_path (face_det.onnx) and --alignment_model_path (face_landmark.onnx), "
                         "or neither")
    if det_model_path is not None:
        paths = (Path(det_model_path).expanduser(), Path(alignment_model_path).expanduser())
        for path in paths:
            if not path.is_file():
                raise ValueError(f"{path}: no such file (the authors' face tracker model)")
        return paths
    if pd_fpg_model_path is not None:
        folder = Path(pd_fpg_model_path).expanduser().parent
        paths = (folder / "face_det.onnx", folder / "face_landmark.onnx")
        if all(p.is_file() for p in paths):
            return paths
    return None


def output_file(args: argparse.Namespace) -> Path:
    """``--output``, else the next free ``<save_path>/NNNNNNNN.mp4`` (as the released script names them)."""
    if args.output is not None:
        return Path(args.output).expanduser()
    folder = Path(args.save_path).expanduser()
    index = len(list(folder.iterdir())) + 1 if folder.is_dir() else 1
    while (folder / f"{index:08d}.mp4").exists():
        index += 1
    return folder / f"{index:08d}.mp4"
