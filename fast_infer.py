"""Animate a portrait faster: Adaptive Latent Prediction, or the authors' 4-step distillation LoRA.

    python fast_infer.py <every infer.py flag>              # ALP: 6 of 30 model evaluations per window
    python fast_infer.py ... --alp_budget 8                 # more evaluations, closer to the full run
    python fast_infer.py ... --alp_mode paper --alp_interval 5 --alp_order 3    # the paper's printed formula
    python fast_infer.py ... --step_distill_lora checkpoints/FlashPortrait/fast_lora_rank64.safetensors
    python fast_infer.py --tiny                             # random tiny models and demo inputs, on the CPU

ALP (``flashportrait.alp``) evaluates the transformer at some sampling steps only and forecasts its output at the
others; the released fast path merges the distillation LoRA for the run and samples its 4 steps. Both print
``model evaluations: A of B (X.Xx fewer)``: A transformer evaluations made (a window with all its guidance
branches = one), B what the full 30-step run (4 with the LoRA: the same) would make. Measured quality:
``bench/bench_alp.py`` and the README.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import sys
from pathlib import Path

import infer
from flashportrait.args import add_alp_args, make_parser, resolve_alp, resolve_settings


def resolve_distill(args, settings):
    """Settings for ``--step_distill_lora``: 4 steps, Euler, shift 5 (the distilled schedule), or a clear error."""
    from flashportrait.lora import DISTILL_SHIFT, DISTILL_SIGMAS

    path = Path(args.step_distill_lora).expanduser()
    if not path.is_file():
        raise ValueError(f"--step_distill_lora {path}: no such file (the authors' fast_lora_rank64.safetensors)")
    if args.num_inference_steps not in (None, len(DISTILL_SIGMAS)):
        raise ValueError(f"--step_distill_lora samples its {len(DISTILL_SIGMAS)} distilled steps; "
                         f"--num_inference_steps {args.num_inference_steps} does not apply (leave it out)")
    if args.sampler != "euler":
        raise ValueError(f"--step_distill_lora is distilled for the deterministic flow (euler) step, not {args.sampler}")
    if args.shift != DISTILL_SHIFT:
        raise ValueError(f"--step_distill_lora's schedule is defined at shift {DISTILL_SHIFT:g}, not {args.shift:g}")
    return dataclasses.replace(settings, num_inference_steps=len(DISTILL_SIGMAS)), path, list(DISTILL_SIGMAS)


class EvaluationCounter:
    """Counts the transformer's samples per call (a forward pre-hook): ``A`` = evaluations made, ``B`` = the
    first step's count (every window and branch evaluated) times the steps, in window evaluations."""

    def __init__(self, transformer, num_branches: int):
        self.num_branches = num_branches
        self.rows = 0
        self.first_rows = 0
        self.first_timestep = None
        self.handle = transformer.register_forward_pre_hook(self._count, with_kwargs=True)

    def _count(self, module, args, kwargs):
        hidden = kwargs.get("hidden_states", args[0] if args else None)
        timestep = kwargs.get("timestep", args[1] if len(args) > 1 else None)
        t = float(timestep.reshape(-1)[0])
        if self.first_timestep is None:
            self.first_timestep = t
        self.rows += hidden.shape[0]
        if t == self.first_timestep:
            self.first_rows += hidden.shape[0]

    def line(self, num_steps: int, grid=None) -> str:
        self.handle.remove()
        rows, first = self.rows, self.first_rows
        if grid is not None:  # every rank evaluated its own windows: sum over ranks
            import torch
            import torch.distributed as dist

            counts = torch.tensor([rows, first], dtype=torch.float64, device=grid.device)
            dist.all_reduce(counts)
            rows, first = (float(c) for c in counts)
        per_evaluation = self.num_branches  # samples per window evaluation (batch 1)
        made, full = rows / per_evaluation, first * num_steps / per_evaluation
        fmt = (lambda v: f"{v:.0f}") if float(made).is_integer() else (lambda v: f"{v:.1f}")
        return f"model evaluations: {fmt(made)} of {full:.0f} ({full / made:.1f}x fewer)"


def main(args):
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    settings = resolve_settings(args)
    alp = resolve_alp(args)
    sigmas, lora_path = None, None
    if args.step_distill_lora is not None:
        settings, lora_path, sigmas = resolve_distill(args, settings)
    grid, settings, reference, driving, path = infer.start(args, settings)  # inputs checked before any model

    # models (+ the LoRA, checked against the transformer before anything runs, merged for the run only)
    from flashportrait.guidance import plan_guidance
    from flashportrait.lora import load_lora, merged_lora
    from flashportrait.parallel import destroy_parallel

    pipe = infer.load_pipeline(args, settings)
    lora = load_lora(lora_path, pipe.transformer) if lora_path is not None else None
    infer.place_pipeline(pipe, args, settings, grid)

    # sample, decode, write (rank 0 alone writes)
    counter = EvaluationCounter(pipe.transformer, plan_guidance(args.text_cfg_scale, args.emo_cfg_scale).num_branches)
    merge = merged_lora(pipe.transformer, lora, 1.0 if args.lora_scale is None else args.lora_scale) \
        if lora is not None else contextlib.nullcontext()
    with merge:
        out = pipe(reference, driving_video=driving, output_path=path, output_type=None, parallel=grid, alp=alp,
                   sigmas=sigmas, **settings.call_kwargs(args))
    line = counter.line(settings.num_inference_steps, grid)
    if out.path is not None:
        print(f"wrote {out.path}: {out.num_frames} frames at {out.fps:g} fps")
    if grid is None or grid.is_main:
        print(line)
    destroy_parallel(grid)
    return out


def parse_args(argv=None):
    parser = make_parser(__doc__.split("\n")[0])
    add_alp_args(parser)
    return parser.parse_args(argv)


if __name__ == "__main__":
    from flashportrait.cli import run_main

    sys.exit(run_main(main, parse_args()))
