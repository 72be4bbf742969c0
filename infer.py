"""Animate a reference portrait with a driving video (FlashPortrait, arXiv 2512.16900).

    python infer.py --wan_model_name checkpoints/Wan2.1-I2V-14B-720P \
        --transformer_path checkpoints/FlashPortrait/transformer.pt \
        --portrait_encoder_path checkpoints/FlashPortrait/portrait_encoder.pt \
        --pd_fpg_model_path checkpoints/FlashPortrait/pd_fpg.pth \
        --validation_image_start examples/case-1/reference.png \
        --validation_driven_video_path examples/case-1/driven_video.mp4 --output out.mp4

    python infer.py --tiny            # random tiny models, demo inputs, whole job on the CPU in ~1 min

Flags keep the names of the authors' ``infer.py`` (``flashportrait.args``); the work is the pipeline's.
"""

from __future__ import annotations

import logging
import sys

from flashportrait.args import make_parser, output_file, resolve_settings


def main(args):
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    settings = resolve_settings(args)

    # inputs, checked before any model is loaded
    reference, driving = args.reference_image, args.driving_video
    if args.tiny and (reference is None or driving is None):
        from flashportrait.demo import write_demo_inputs

        demo_reference, demo_driving = write_demo_inputs(settings.cache_dir / "demo")
        reference, driving = reference or demo_reference, driving or demo_driving
    if reference is None or driving is None:
        raise ValueError(
            "give --validation_image_start (--reference_image) and --validation_driven_video_path "
            "(--driving_video), or --tiny for the demo inputs"
        )
    path = output_file(args)
    from flashportrait.preflight import check_run_inputs
    from flashportrait.tiny import TINY_VAE_CONFIG

    check_run_inputs(reference, driving, path, max_size=settings.max_size, context_size=settings.context_size,
                     vae_base_dim=TINY_VAE_CONFIG["base_dim"] if args.tiny else 96, device=settings.device)

    # models
    from flashportrait.factory import pipeline_from_checkpoints, tiny_pipeline
    from flashportrait.memory import configure_memory

    if args.tiny:
        pipe = tiny_pipeline(args.seed, sampler=args.sampler, shift=args.shift, dtype=settings.dtype)
    else:
        pipe = pipeline_from_checkpoints(args.wan_model_name, args.transformer_path, args.portrait_encoder_path,
                                         args.pd_fpg_model_path, sampler=args.sampler, shift=args.shift,
                                         dtype=settings.dtype)
    configure_memory(pipe, args.GPU_memory_mode, settings.device, compute_dtype=settings.dtype)

    # sample, decode, write
    out = pipe(reference, driving_video=driving, output_path=path, output_type=None, **settings.call_kwargs(args))
    print(f"wrote {out.path}: {out.num_frames} frames at {out.fps:g} fps")
    return out


def parse_args(argv=None):
    return make_parser(__doc__.split("\n")[0]).parse_args(argv)


if __name__ == "__main__":
    from flashportrait.cli import run_main

    sys.exit(run_main(main, parse_args()))
