"""Animate a reference portrait with a driving video (FlashPortrait, arXiv 2512.16900).

    python infer.py --wan_model_name checkpoints/Wan2.1-I2V-14B-720P \
        --transformer_path checkpoints/FlashPortrait/transformer.pt \
        --portrait_encoder_path checkpoints/FlashPortrait/portrait_encoder.pt \
        --pd_fpg_model_path checkpoints/FlashPortrait/pd_fpg.pth \
        --validation_image_start examples/case-1/reference.png \
        --validation_driven_video_path examples/case-1/driven_video.mp4 --output out.mp4

    python infer.py --tiny            # random tiny models, demo inputs, whole job on the CPU in ~1 min

Flags keep the names of the authors' ``infer.py``; the sampling itself is ``flashportrait.pipeline``.
"""

from __future__ import annotations

import argparse
import logging
import sys
import tempfile
from pathlib import Path

import torch

from flashportrait.config import (
    DEFAULT_CONTEXT_OVERLAP,
    DEFAULT_CONTEXT_SIZE,
    DEFAULT_EMO_CFG_SCALE,
    DEFAULT_MAX_SIZE,
    DEFAULT_NEGATIVE_PROMPT,
    DEFAULT_NUM_INFERENCE_STEPS,
    DEFAULT_PROMPT,
    DEFAULT_SHIFT,
    DEFAULT_TEXT_CFG_SCALE,
)
from flashportrait.pipeline import GPU_MEMORY_MODES, FlashPortraitPipeline, configure_memory
from flashportrait.sampling import SAMPLERS
from flashportrait.windows import resolve_context_size

#: --tiny defaults for flags left unset: (steps, max_size, context_size, context_overlap)
TINY_DEFAULTS = dict(num_inference_steps=4, max_size=64, context_size=5, context_overlap=2)
DTYPES = {
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float32": torch.float32,
    "fp32": torch.float32,
    "float16": torch.float16,
    "fp16": torch.float16,
}


def output_file(args) -> Path:
    """``--output``, else the next free ``<save_path>/NNNNNNNN.mp4`` (as the released script names them)."""
    if args.output is not None:
        return Path(args.output)
    folder = Path(args.save_path)
    folder.mkdir(parents=True, exist_ok=True)
    index = len(list(folder.iterdir())) + 1
    while (folder / f"{index:08d}.mp4").exists():
        index += 1
    return folder / f"{index:08d}.mp4"


def main(args):
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = DTYPES[args.dtype or ("bfloat16" if device.type != "cpu" else "float32")]
    if dtype == torch.float16 and device.type == "cpu":
        raise SystemExit("--dtype float16 is not usable on the CPU (about 1 GFLOP/s); use float32 or bfloat16")
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if args.tiny:
        window_given = args.sub_num_frames is not None or args.latents_num_frames is not None
        for key, value in TINY_DEFAULTS.items():
            if getattr(args, key) is None and not (key == "context_size" and window_given):
                setattr(args, key, value)
    context_size = resolve_context_size(args.context_size, args.sub_num_frames, args.latents_num_frames)
    steps = args.num_inference_steps or DEFAULT_NUM_INFERENCE_STEPS
    max_size = args.max_size or DEFAULT_MAX_SIZE
    overlap = args.context_overlap
    if overlap is None:  # the released 30 of 51, or the same ratio for shorter windows
        overlap = min(DEFAULT_CONTEXT_OVERLAP, round(context_size * DEFAULT_CONTEXT_OVERLAP / DEFAULT_CONTEXT_SIZE))

    # inputs
    reference, driving = args.reference_image, args.driving_video
    if args.tiny and (reference is None or driving is None):
        from flashportrait.demo import write_demo_inputs

        demo_ref, demo_drv = write_demo_inputs(Path(tempfile.gettempdir()) / "flashportrait_demo")
        reference, driving = reference or demo_ref, driving or demo_drv
    if reference is None or driving is None:
        raise SystemExit(
            "give --validation_image_start (--reference_image) and --validation_driven_video_path "
            "(--driving_video), or --tiny for the demo inputs"
        )

    # models
    if args.tiny:
        pipe = FlashPortraitPipeline.from_tiny(args.seed, sampler=args.sampler, shift=args.shift, dtype=dtype)
    else:
        missing = [
            f for f in ("wan_model_name", "portrait_encoder_path", "pd_fpg_model_path") if getattr(args, f) is None
        ]
        if missing:
            raise SystemExit("missing " + ", ".join("--" + m for m in missing) + " (or use --tiny)")
        pipe = FlashPortraitPipeline.from_checkpoints(
            args.wan_model_name,
            args.transformer_path,
            args.portrait_encoder_path,
            args.pd_fpg_model_path,
            sampler=args.sampler,
            shift=args.shift,
            dtype=dtype,
        )
    configure_memory(pipe, args.GPU_memory_mode, device, compute_dtype=dtype)

    # sample, decode, write
    path = output_file(args)
    out = pipe(
        reference,
        driving_video=driving,
        prompt=args.prompt,
        negative_prompt=args.negative_prompt,
        num_inference_steps=steps,
        context_size=context_size,
        context_overlap=overlap,
        text_cfg_scale=args.text_cfg_scale,
        emo_cfg_scale=args.emo_cfg_scale,
        max_size=max_size,
        generator=torch.Generator("cpu").manual_seed(args.seed),
        fps=args.fps,
        output_path=path,
        output_type=None,
        decode_chunk_size=args.decode_chunk_size,
        expression_kwargs={"max_frames": args.max_frames} if args.max_frames else None,
        batch_guidance=not args.sequential_guidance,
    )
    print(f"wrote {out.path}: {out.num_frames} frames at {out.fps:g} fps")
    return out


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    # inputs / outputs
    p.add_argument(
        "--validation_image_start",
        "--reference_image",
        dest="reference_image",
        default=None,
        help="reference portrait (png / jpg)",
    )
    p.add_argument(
        "--validation_driven_video_path",
        "--driving_video",
        dest="driving_video",
        default=None,
        help="driving video; its fps is the output's, its audio is muxed",
    )
    p.add_argument("--prompt", default=DEFAULT_PROMPT)
    p.add_argument("--negative_prompt", default=DEFAULT_NEGATIVE_PROMPT, help="used when --text_cfg_scale != 1")
    p.add_argument("--save_path", default="samples/flashportrait", help="folder for NNNNNNNN.mp4 when no --output")
    p.add_argument("--output", default=None, help="output .mp4 file (overrides --save_path)")
    p.add_argument("--fps", type=float, default=None, help="output fps (default: the driving video's)")
    p.add_argument("--max_frames", type=int, default=None, help="use only the first N driving frames")
    # checkpoints
    p.add_argument("--wan_model_name", default=None, help="Wan2.1-I2V-14B-720P folder (original or Diffusers)")
    p.add_argument("--transformer_path", default=None, help="FlashPortrait transformer.pt")
    p.add_argument("--portrait_encoder_path", default=None, help="FlashPortrait portrait_encoder.pt")
    p.add_argument("--pd_fpg_model_path", default=None, help="PD-FGC motion encoder pd_fpg.pth")
    # sampling
    p.add_argument(
        "--num_inference_steps",
        type=int,
        default=None,
        help=f"default {DEFAULT_NUM_INFERENCE_STEPS} ({TINY_DEFAULTS['num_inference_steps']} with --tiny)",
    )
    p.add_argument("--sampler", choices=SAMPLERS, default="euler")
    p.add_argument("--shift", type=float, default=DEFAULT_SHIFT, help="flow schedule shift (released 5)")
    p.add_argument(
        "--context_size",
        type=int,
        default=None,
        help="latent frames per window (default 51 = 201 video frames; 5 with --tiny)",
    )
    p.add_argument(
        "--sub_num_frames",
        type=int,
        default=None,
        help="video frames per window, 4k+1 (released 201); must agree with --context_size",
    )
    p.add_argument(
        "--latents_num_frames",
        type=int,
        default=None,
        help="latent frames per window (released 51); must agree with --context_size",
    )
    p.add_argument(
        "--context_overlap",
        type=int,
        default=None,
        help=f"latent frames shared by consecutive windows (default {DEFAULT_CONTEXT_OVERLAP}; 2 with --tiny)",
    )
    p.add_argument("--text_cfg_scale", type=float, default=DEFAULT_TEXT_CFG_SCALE)
    p.add_argument("--emo_cfg_scale", type=float, default=DEFAULT_EMO_CFG_SCALE, help="released options 2, 3, 4")
    p.add_argument(
        "--max_size",
        type=int,
        default=None,
        help=f"longer output side in pixels, rounded up to /16 (default {DEFAULT_MAX_SIZE}; 64 with --tiny)",
    )
    p.add_argument("--seed", type=int, default=42)
    p.add_argument(
        "--sequential_guidance",
        action="store_true",
        help="run the guidance passes one after another instead of as one batch (less GPU memory, slower)",
    )
    p.add_argument("--decode_chunk_size", type=int, default=4, help="latent frames per VAE decode chunk")
    # hardware
    p.add_argument("--GPU_memory_mode", choices=GPU_MEMORY_MODES, default="model_full_load")
    p.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    p.add_argument("--dtype", choices=sorted(DTYPES), default=None, help="default: bfloat16 on GPU, float32 on CPU")
    p.add_argument("--tiny", action="store_true", help="random tiny models + demo inputs (CPU, about a minute)")
    return p.parse_args(argv)


if __name__ == "__main__":
    from flashportrait.cli import run_main

    sys.exit(run_main(main, parse_args()))
