"""Peak memory of encoding the reference condition with the Wan VAE, measured against the estimate.

    python bench/bench_reference_memory.py [--json out.json]

Each case runs in a fresh process: build ``AutoencoderKLWan`` (random weights) at a base width, encode
``[1, 3, 4(L - 1) + 1, H, W]`` float32 once, and report the peak RSS above the RSS before the input was
made. The last column is :func:`flashportrait.memory.estimate_reference_encoding_bytes`, which ``infer.py``
checks against free memory before a run (it must not be below the measurement: an estimate that is low
lets a run start that then runs out of memory).
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys

CASES = [  # (base_dim, height, width, latent frames)
    (8, 256, 256, 5),
    (8, 512, 512, 5),
    (8, 512, 512, 13),
    (96, 128, 128, 5),
    (96, 256, 256, 5),
    (96, 256, 384, 9),
]


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


def run_case(base_dim: int, height: int, width: int, frames: int) -> dict:
    import torch
    from diffusers import AutoencoderKLWan

    from flashportrait.memory import estimate_reference_encoding_bytes

    torch.set_num_threads(2)
    vae = AutoencoderKLWan(base_dim=base_dim, z_dim=16, dim_mult=[1, 2, 4, 4], num_res_blocks=2, attn_scales=[],
                           temperal_downsample=[False, True, True]).eval()
    before = _rss_bytes()
    with torch.no_grad():
        video = torch.zeros(1, 3, 4 * (frames - 1) + 1, height, width)
        vae.encode(video).latent_dist.mode()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - before
    estimate = estimate_reference_encoding_bytes(width, height, frames, base_dim=base_dim)
    return dict(base_dim=base_dim, height=height, width=width, latent_frames=frames, peak_mb=peak / 2**20,
                estimate_mb=estimate / 2**20, ratio=estimate / max(peak, 1))


def main(args):
    if args.case:
        print(json.dumps(run_case(*args.case)))
        return
    rows = []
    for case in CASES:
        out = subprocess.run([sys.executable, __file__, "--case", *map(str, case)], capture_output=True, text=True,
                             check=True)
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
    print(f"{'base':>5} {'H x W':>10} {'L':>3} {'peak MB':>9} {'estimate MB':>12} {'est/peak':>9}")
    for r in rows:
        print(f"{r['base_dim']:5d} {r['height']:4d}x{r['width']:<5d} {r['latent_frames']:3d} {r['peak_mb']:9.1f} "
              f"{r['estimate_mb']:12.1f} {r['ratio']:9.2f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--json", default=None, help="also write the rows as JSON")
    parser.add_argument("--case", nargs=4, type=int, default=None, help=argparse.SUPPRESS)
    main(parser.parse_args())
