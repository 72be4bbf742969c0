"""Animate a reference portrait with a driving video (FlashPortrait, arXiv 2512.16900).

    python infer.py --wan_model_name checkpoints/Wan2.1-I2V-14B-720P \
        --transformer_path checkpoints/FlashPortrait/transformer.pt \
        --portrait_encoder_path checkpoints/FlashPortrait/portrait_encoder.pt \
        --pd_fpg_model_path checkpoints/FlashPortrait/pd_fpg.pth \
        --validation_image_start examples/case-1/reference.png \
        --validation_driven_video_path examples/case-1/driven_video.mp4 --output out.mp4

    python infer.py --tiny            # random tiny models, demo inputs, whole job on the CPU in ~1 min

    torchrun --nproc_per_node 8 infer.py ...    # 8 GPUs: windows (and guidance branches) shared out; rank 0 writes
    torchrun --nproc_per_node 8 infer.py ... --ulysses_degree 2    # + sequence parallelism inside each window

Flags keep the names of the authors' ``infer.py`` (``flashportrait.args``); the work is the pipeline's.
"""

from __future__ import annotations

import dataclasses
import logging
import sys

from flashportrait.args import make_parser, output_file, resolve_settings


def start(args, settings):
    """Join the process group under ``torchrun`` and check every input before any model is loaded.

    Returns ``(grid, settings, reference, driving, path)``: the :class:`~flashportrait.parallel.ParallelGrid`
    (``None`` for one process), the settings on this rank's device, the reference image and driving video
    (the demo pair with ``--tiny`` when not given) and the output file. Raises ``ValueError`` on bad input.
    """
    from flashportrait.parallel import init_parallel, run_on_main_rank

    grid = init_parallel(args.ulysses_degree, args.ring_degree, backend=args.dist_backend, device=settings.device)
    if grid is not None:  # each rank computes on its own device
        settings = dataclasses.replace(settings, device=grid.device)
    reference, driving = args.reference_image, args.driving_video
    if args.tiny and (reference is None or driving is None):
        from flashportrait.demo import write_demo_inputs

        demo_reference, demo_driving = run_on_main_rank(lambda: write_demo_inputs(settings.cache_dir / "demo"), grid)
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
    return grid, settings, reference, driving, path


def load_pipeline(args, settings):
    """The pipeline from the checkpoint flags, or the tiny family with ``--tiny``; still on the CPU."""
    from flashportrait.factory import pipeline_from_checkpoints, tiny_pipeline

    if args.tiny:
        return tiny_pipeline(args.seed, sampler=args.sampler, shift=args.shift, dtype=settings.dtype)
    return pipeline_from_checkpoints(args.wan_model_name, args.transformer_path, args.portrait_encoder_path,
                                     args.pd_fpg_model_path, sampler=args.sampler, shift=args.shift,
                                     dtype=settings.dtype)


def place_pipeline(pipe, args, settings, grid) -> None:
    """Memory mode (``--GPU_memory_mode``), sequence parallelism (``--ulysses_degree`` / ``--ring_degree``),
    and quiet progress bars on every rank but the first."""
    from flashportrait.memory import configure_memory
    from flashportrait.parallel import enable_sequence_parallel

    configure_memory(pipe, args.GPU_memory_mode, settings.device, compute_dtype=settings.dtype)
    enable_sequence_parallel(pipe.transformer, grid)  # degrees > 1 only
    if grid is not None and not grid.is_main:
        pipe.set_progress_bar_config(disable=True)


def main(args):
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    grid, settings, reference, driving, path = start(args, resolve_settings(args))
    pipe = load_pipeline(args, settings)
    place_pipeline(pipe, args, settings, grid)
    # sample, decode, write (rank 0 alone writes)
    out = pipe(reference, driving_video=driving, output_path=path, output_type=None, parallel=grid,
               **settings.call_kwargs(args))
    if out.path is not None:
        print(f"wrote {out.path}: {out.num_frames} frames at {out.fps:g} fps")
    from flashportrait.parallel import destroy_parallel

    destroy_parallel(grid)
    return out


def parse_args(argv=None):
    return make_parser(__doc__.split("\n")[0]).parse_args(argv)


if __name__ == "__main__":
    from flashportrait.cli import run_main

    sys.exit(run_main(main, parse_args()))
