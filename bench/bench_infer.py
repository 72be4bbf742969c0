"""Time and host memory of the whole ``infer.py --tiny`` job, and how memory grows per driving frame.

    python bench/bench_infer.py [--lengths 101 801] [--driving_size 256] [--max_size 128] [--json out.json]

For each length a synthetic driving clip (the demo face moving, ``driving_size`` pixels square, 25 fps, with a
tone as its audio track) is written, then ``infer.py --tiny`` runs on it in a fresh process (face detection,
PD-FGC, sliding-window sampling, chunked VAE decoding, streamed MP4 writing, audio muxing). Reported per
length: wall time, time per output frame, peak resident memory of the process, and per phase (expression
extraction, sampling, decoding + writing) the peak resident memory above the resident memory when the phase
began (``VmHWM`` reset through ``/proc/self/clear_refs`` at each phase start).

The slope between the shortest and the longest run is the host memory a driving frame costs, in KB per
frame, overall and per phase; the "latents" column is what the full-length float32 latents alone cost at the
sampling peak (:data:`flashportrait.memory.SAMPLING_STATE_TENSORS` copies of ``16 x h x w x 4`` bytes per latent
frame, a latent frame per 4 driving frames), and "beyond latents" the rest: what the job must keep to a few KB
per frame. ``--tensor_breakdown`` also counts the torch tensors each phase allocates
(:class:`flashportrait.memory.TensorMemoryTracker`; slower).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from proc_memory import reset_peak_rss, status_kb  # bench/, beside this script

REPO = Path(__file__).resolve().parents[1]

#: pipeline methods timed and measured as phases in the child: name -> method
PHASES = {"expressions": "prepare_expression_features", "sampling": "_denoise", "decode_write": "_decode"}


def child(argv: list[str], tensor_breakdown: bool) -> None:
    """Run ``infer.main`` with the pipeline phases instrumented; print one JSON line."""
    sys.path.insert(0, str(REPO))
    import infer
    from flashportrait.memory import TensorMemoryTracker
    from flashportrait.pipeline import FlashPortraitPipeline

    phases: dict[str, dict] = {}
    overall_peak_kb = [0]

    def instrument(name: str, method: str):
        original = getattr(FlashPortraitPipeline, method)

        def wrapped(self, *args, **kwargs):
            overall_peak_kb[0] = max(overall_peak_kb[0], status_kb("VmHWM"))
            rss0 = status_kb("VmRSS")
            resettable = reset_peak_rss()
            start = time.perf_counter()
            tracker = TensorMemoryTracker() if tensor_breakdown else None
            if tracker is not None:
                tracker.__enter__()
            try:
                return original(self, *args, **kwargs)
            finally:
                if tracker is not None:
                    tracker.__exit__(None, None, None)
                peak = status_kb("VmHWM")
                overall_peak_kb[0] = max(overall_peak_kb[0], peak)
                phases[name] = dict(
                    seconds=time.perf_counter() - start,
                    peak_above_start_mb=(peak - rss0) / 1024 if resettable else None,
                    rss_after_mb=status_kb("VmRSS") / 1024,
                    tensor_peak_mb=None if tracker is None else tracker.peak_bytes / 2**20,
                )

        setattr(FlashPortraitPipeline, method, wrapped)

    for name, method in PHASES.items():
        instrument(name, method)
    start = time.perf_counter()
    out = infer.main(infer.parse_args(argv))
    seconds = time.perf_counter() - start
    overall_peak_kb[0] = max(overall_peak_kb[0], status_kb("VmHWM"))
    print(json.dumps({"seconds": seconds, "peak_rss_mb": overall_peak_kb[0] / 1024, "output_frames": out.num_frames,
                      "phases": phases}))


def make_clip(path: Path, num_frames: int, size: int) -> None:
    """The demo face moving for ``num_frames`` frames at 25 fps with a 440 Hz tone (AAC, 48 kHz stereo) as its
    audio, so the audio muxing is measured too (built in this parent process, not measured)."""
    import av
    import numpy as np

    from flashportrait.demo import demo_driving_frames

    frames = demo_driving_frames(num_frames, size)
    with av.open(str(path), mode="w") as container:
        video = container.add_stream("libx264", rate=25)
        video.width = video.height = size
        video.pix_fmt = "yuv420p"
        audio = container.add_stream("aac", rate=48000)
        audio.layout = "stereo"
        for frame in frames:
            for packet in video.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(frame), format="rgb24")):
                container.mux(packet)
        for packet in video.encode():
            container.mux(packet)
        samples = int(48000 * num_frames / 25)
        tone = (0.2 * np.sin(2 * np.pi * 440 * np.arange(samples) / 48000)).astype(np.float32)
        pts = 0
        for start in range(0, samples, 1024):
            chunk = np.ascontiguousarray(np.stack([tone[start : start + 1024]] * 2))
            frame = av.AudioFrame.from_ndarray(chunk, format="fltp", layout="stereo")
            frame.sample_rate, frame.pts = 48000, pts
            pts += chunk.shape[1]
            for packet in audio.encode(frame):
                container.mux(packet)
        for packet in audio.encode():
            container.mux(packet)


def latent_kb_per_frame(max_size: int) -> float:
    """KB per driving frame of one full-length float32 latent at the demo's square output of ``max_size``."""
    from flashportrait.config import LATENT_CHANNELS, VAE_SPATIAL_FACTOR, VAE_TEMPORAL_FACTOR

    side = -(-max_size // 16) * 16 // VAE_SPATIAL_FACTOR
    return LATENT_CHANNELS * side * side * 4 / VAE_TEMPORAL_FACTOR / 1024


def main(args):
    from PIL import Image

    from flashportrait.demo import demo_reference_image
    from flashportrait.memory import SAMPLING_STATE_TENSORS

    results = {"settings": vars(args), "runs": []}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        reference = tmp / "reference.png"
        Image.fromarray(demo_reference_image()).save(reference)
        for length in args.lengths:
            clip, out = tmp / f"drive_{length}.mp4", tmp / f"out_{length}.mp4"
            make_clip(clip, length, args.driving_size)
            argv = ["--tiny", "--reference_image", str(reference), "--driving_video", str(clip), "--output", str(out),
                    "--max_size", str(args.max_size), "--cache_dir", str(tmp / "cache")]
            flags = ["--tensor_breakdown"] if args.tensor_breakdown else []
            proc = subprocess.run([sys.executable, __file__, "--child", *flags, *argv], capture_output=True, text=True)
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
            phases = ", ".join(f"{k} {v['seconds']:.1f} s / +{v['peak_above_start_mb'] or 0:.0f} MB"
                               + (f" (tensors {v['tensor_peak_mb']:.1f} MB)" if v["tensor_peak_mb"] is not None else "")
                               for k, v in run["phases"].items())
            print(f"{length:5d} driving frames -> {run['output_frames']:5d} output frames: {run['seconds']:7.1f} s "
                  f"({run['ms_per_output_frame']:.0f} ms/frame), peak RSS {run['peak_rss_mb']:.0f} MB "
                  f"(decoded driving video {run['decoded_driving_mb']:.0f} MB, output {run['decoded_output_mb']:.0f} MB); "
                  f"{phases}", flush=True)
    first, last = results["runs"][0], results["runs"][-1]
    frames = last["driving_frames"] - first["driving_frames"]
    latents_kb = SAMPLING_STATE_TENSORS["euler"] * latent_kb_per_frame(args.max_size)

    def slope(a, b):
        return None if a is None or b is None else 1024 * (b - a) / frames

    results.update(
        time_ratio=last["seconds"] / first["seconds"],
        length_ratio=last["output_frames"] / first["output_frames"],
        peak_rss_growth_mb=last["peak_rss_mb"] - first["peak_rss_mb"],
        kb_per_frame=slope(first["peak_rss_mb"], last["peak_rss_mb"]),
        latents_kb_per_frame=latents_kb,
        phase_kb_per_frame={k: slope(first["phases"][k]["peak_above_start_mb"], v["peak_above_start_mb"])
                            for k, v in last["phases"].items()},
    )
    results["beyond_latents_kb_per_frame"] = results["kb_per_frame"] - latents_kb
    print(f"time x{results['time_ratio']:.2f} for x{results['length_ratio']:.2f} frames; peak memory "
          f"+{results['peak_rss_growth_mb']:.1f} MB = {results['kb_per_frame']:.1f} KB per driving frame "
          f"(full-length latents {latents_kb:.1f} KB, beyond them {results['beyond_latents_kb_per_frame']:.1f} KB); "
          "per phase (peak above its start): "
          + ", ".join(f"{k} {'-' if v is None else f'{v:.1f}'} KB" for k, v in results["phase_kb_per_frame"].items()))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    return results


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        rest = sys.argv[2:]
        breakdown = "--tensor_breakdown" in rest
        child([a for a in rest if a != "--tensor_breakdown"], breakdown)
        sys.exit(0)
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lengths", type=int, nargs="+", default=[101, 801], help="driving frames per run")
    parser.add_argument("--driving_size", type=int, default=256, help="side of the square driving clip, pixels")
    parser.add_argument("--max_size", type=int, default=128, help="output side, pixels (infer.py --max_size)")
    parser.add_argument("--tensor_breakdown", action="store_true", help="count tensor bytes per phase (slower)")
    parser.add_argument("--json", default=None, help="also write the numbers here")
    main(parser.parse_args())
