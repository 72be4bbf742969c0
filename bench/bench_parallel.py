"""Sampling time of the tiny model on 1, 2, 3 ... processes (window / guidance parallelism over torch.distributed).

    python bench/bench_parallel.py [--processes 1 2 3] [--frames 121] [--steps 4] [--max_size 64] [--json out.json]

For each process count ``torchrun --nproc_per_node N`` runs this file as a worker (``OMP_NUM_THREADS=1``, gloo on
the CPU; ``N = 1`` is the plain single-process pipeline). Every rank builds the tiny pipeline, runs one warm-up
call, waits at a barrier, then times one pipeline call on precomputed expression features (``output_type=
"latent"``: text / image / reference encoding and the sampling loop, no decoding). Reported: windows per step,
the slowest rank's call time, the mean time of a sampling step (between the first and the last step's callback)
and the speed-up of a step over one process.

The tiny model is tiny: a window costs milliseconds, so on a CPU this measures the overhead (broadcasts, Python)
as much as the parallel speed-up, and more processes than cores cannot help. What to expect on GPUs is reasoned
in the README ("More than one GPU").
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def worker(args) -> None:
    import torch

    sys.path.insert(0, str(REPO))
    from flashportrait.demo import demo_reference_image
    from flashportrait.factory import tiny_pipeline
    from flashportrait.parallel import init_parallel

    torch.set_num_threads(1)
    grid = init_parallel()
    pipe = tiny_pipeline(0)
    pipe.set_progress_bar_config(disable=True)
    features = torch.randn(args.frames, 554, generator=torch.Generator().manual_seed(0))
    stamps: list[float] = []

    def on_step(pipeline, step, timestep, kwargs):
        stamps.append(time.perf_counter())
        return {}

    def call():
        return pipe(demo_reference_image(), expression_features=features, num_inference_steps=args.steps,
                    context_size=args.context_size, context_overlap=args.context_overlap, max_size=args.max_size,
                    output_type="latent", generator=torch.Generator().manual_seed(0), parallel=grid,
                    callback_on_step_end=on_step)

    call()  # warm-up
    if grid is not None:
        import torch.distributed as dist

        dist.barrier()
    stamps.clear()
    start = time.perf_counter()
    out = call()
    seconds = time.perf_counter() - start
    step = (stamps[-1] - stamps[0]) / (len(stamps) - 1)
    rank = 0 if grid is None else grid.rank
    Path(args.worker, f"rank{rank}.json").write_text(json.dumps(
        {"rank": rank, "call_s": seconds, "step_s": step, "latent_frames": out.latents.shape[2]}))
    if grid is not None:
        dist.destroy_process_group()


def run(processes: int, args, folder: Path) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    flags = ["--frames", str(args.frames), "--steps", str(args.steps), "--max_size", str(args.max_size),
             "--context_size", str(args.context_size), "--context_overlap", str(args.context_overlap),
             "--worker", str(folder)]
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(processes), "--master_port",
               str(args.port + processes), __file__, *flags]
    result = subprocess.run(command, env=env, capture_output=True, text=True)
    if result.returncode != 0:
        raise SystemExit(result.stdout[-2000:] + result.stderr[-4000:])
    ranks = [json.loads((folder / f"rank{r}.json").read_text()) for r in range(processes)]
    lines = [line for line in result.stdout.splitlines() if line.startswith("rank ")]
    return {"processes": processes, "call_s": max(r["call_s"] for r in ranks),
            "step_s": max(r["step_s"] for r in ranks), "latent_frames": ranks[0]["latent_frames"],
            "rank_lines": sorted(set(lines))}


def main(args) -> None:
    from flashportrait.windows import context_windows, latent_frames_for_video_frames

    num_windows = len(context_windows(latent_frames_for_video_frames(args.frames), args.context_size,
                                      args.context_overlap))
    results = {"settings": {k: v for k, v in vars(args).items() if k != "worker"}, "windows": num_windows, "runs": []}
    with tempfile.TemporaryDirectory() as tmp:
        for processes in args.processes:
            folder = Path(tmp, str(processes))
            folder.mkdir()
            results["runs"].append(run(processes, args, folder))
    base = results["runs"][0]["step_s"] if results["runs"][0]["processes"] == 1 else None
    print(f"tiny model, {args.frames} driving frames -> {results['runs'][0]['latent_frames']} latent frames, "
          f"{num_windows} windows of {args.context_size}, {args.steps} steps, {args.max_size} px, "
          f"{os.cpu_count()} CPU cores")
    print(f"{'processes':>9} {'call s':>8} {'step s':>8} {'speed-up':>9}")
    for r in results["runs"]:
        speedup = f"{base / r['step_s']:.2f}x" if base else "-"
        r["step_speedup"] = base / r["step_s"] if base else None
        print(f"{r['processes']:>9} {r['call_s']:>8.2f} {r['step_s']:>8.3f} {speedup:>9}")
        for line in r["rank_lines"]:
            print(f"{'':>9} {line}")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--processes", type=int, nargs="+", default=[1, 2, 3])
    parser.add_argument("--frames", type=int, default=121, help="driving frames (121 -> 31 latent frames)")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--max_size", type=int, default=64, help="longer output side in pixels")
    parser.add_argument("--context_size", type=int, default=5, help="latent frames per window")
    parser.add_argument("--context_overlap", type=int, default=2)
    parser.add_argument("--port", type=int, default=29650, help="master port base (+ process count)")
    parser.add_argument("--json", default=None, help="also write the results here")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


if __name__ == "__main__":
    arguments = parse_args()
    if arguments.worker:
        worker(arguments)
    else:
        main(arguments)
