"""Time and peak memory of the whole ``infer.py --tiny`` job for a short and a long driving video.

    python bench/bench_infer.py [--lengths 101 1001] [--driving_size 256] [--max_size 128] [--json out.json]

For each length a synthetic driving clip (the demo face moving, ``driving_size`` pixels square, 25 fps) is
written, then ``infer.py --tiny`` runs on it in a fresh process (face detection, PD-FGC, sliding-window
sampling, chunked VAE decoding, streamed MP4 writing). Reported per length: wall time, time per output
frame, peak resident memory of the process, and the size the decoded driving video and the output video
would take as uint8 arrays. Time should grow about linearly with length; peak memory far less than the
video sizes.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def child(argv: list[str]) -> None:
    sys.path.insert(0, str(REPO))
    import infer

    start = time.perf_counter()
    out = infer.main(infer.parse_args(argv))
    seconds = time.perf_counter() - start
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"seconds": seconds, "peak_rss_mb": peak_mb, "output_frames": out.num_frames}))


def make_clip(path: Path, num_frames: int, size: int) -> None:
    """The demo face moving for ``num_frames`` frames at 25 fps (built in this parent process, not measured)."""
    from flashportrait.demo import demo_driving_frames
    from flashportrait.video_io import StreamingVideoWriter

    with StreamingVideoWriter(path, 25) as writer:
        writer.write(demo_driving_frames(num_frames, size))


def main(args):
    from PIL import Image

    from flashportrait.demo import demo_reference_image

    results = {"settings": vars(args), "runs": []}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        reference = tmp / "reference.png"
        Image.fromarray(demo_reference_image()).save(reference)
        for length in args.lengths:
            clip, out = tmp / f"drive_{length}.mp4", tmp / f"out_{length}.mp4"
            make_clip(clip, length, args.driving_size)
            argv = ["--tiny", "--reference_image", str(reference), "--driving_video", str(clip), "--output", str(out),
                    "--max_size", str(args.max_size)]
            proc = subprocess.run([sys.executable, __file__, "--child", *argv], capture_output=True, text=True)
            if proc.returncode != 0:
                raise SystemExit(proc.stderr[-3000:])
            run = json.loads(proc.stdout.strip().splitlines()[-1])
            run.update(
                driving_frames=length,
                ms_per_output_frame=1000 * run["seconds"] / run["output_frames"],
                decoded_driving_mb=length * args.driving_size**2 * 3 / 2**20,
                decoded_output_mb=run["output_frames"] * args.max_size**2 * 3 / 2**20,
            )
            results["runs"].append(run)
            print(f"{length:5d} driving frames -> {run['output_frames']:5d} output frames: {run['seconds']:7.1f} s "
                  f"({run['ms_per_output_frame']:.0f} ms/frame), peak RSS {run['peak_rss_mb']:.0f} MB "
                  f"(decoded driving video {run['decoded_driving_mb']:.0f} MB, output {run['decoded_output_mb']:.0f} MB)")
    first, last = results["runs"][0], results["runs"][-1]
    results["time_ratio"] = last["seconds"] / first["seconds"]
    results["length_ratio"] = last["output_frames"] / first["output_frames"]
    results["peak_rss_growth_mb"] = last["peak_rss_mb"] - first["peak_rss_mb"]
    print(f"time x{results['time_ratio']:.2f} for x{results['length_ratio']:.2f} frames; peak memory "
          f"+{results['peak_rss_growth_mb']:.0f} MB (the decoded driving video grew by "
          f"{last['decoded_driving_mb'] - first['decoded_driving_mb']:.0f} MB)")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    return results


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        child(sys.argv[2:])
        sys.exit(0)
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lengths", type=int, nargs="+", default=[101, 1001], help="driving frames per run")
    parser.add_argument("--driving_size", type=int, default=256, help="side of the square driving clip, pixels")
    parser.add_argument("--max_size", type=int, default=128, help="output side, pixels (infer.py --max_size)")
    parser.add_argument("--json", default=None, help="also write the numbers here")
    main(parser.parse_args())
