"""Speed of the expression stage on this machine: decoding, detection + tracking + alignment, PD-FGC encoder.

    python bench/bench_expression.py [--video d0.mp4] [--frames 64] [--batch-size 8] [--json]

Uses ../shared/examples/driving/d0.mp4 (512x512) when present, else a synthetic 512x512 clip (a moving
bright disc: no real face, so the detector finds nothing and the stage-1 timing still counts the full
detector forward pass; alignment then uses fixed points). The encoder is the full-size PD-FGC architecture
with random weights (same compute as the released weights). Numbers are frames per second.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from flashportrait.face.align import align_face, template_points, to_model_input
from flashportrait.face.detector import create_detector
from flashportrait.face.tracking import track_face
from flashportrait.models.motion_encoder import PDFGCMotionEncoder
from flashportrait.video_io import StreamingVideoWriter, iter_frames, probe_video

DEFAULT_VIDEO = Path(__file__).resolve().parents[2] / "shared" / "examples" / "driving" / "d0.mp4"


def synthetic_clip(path: Path, frames: int, size: int = 512) -> None:
    """A 512x512 clip of a moving bright disc on a textured background."""
    rng = np.random.default_rng(0)
    background = rng.integers(0, 80, (size, size, 3), dtype=np.uint8)
    with StreamingVideoWriter(path, 25) as writer:
        for i in range(frames):
            img = background.copy()
            yy, xx = np.mgrid[:size, :size]
            cx, cy = size / 2 + 40 * np.sin(i / 8), size / 2 + 30 * np.cos(i / 10)
            img[(xx - cx) ** 2 + (yy - cy) ** 2 < 120**2] = 200
            writer.write(img)


def main(args: argparse.Namespace) -> None:
    torch.set_num_threads(args.threads)
    video = Path(args.video) if args.video else DEFAULT_VIDEO
    tmp = None
    if not video.is_file():
        tmp = tempfile.TemporaryDirectory()
        video = Path(tmp.name) / "synthetic_512.mp4"
        synthetic_clip(video, args.frames)
    info = probe_video(video)

    t0 = time.perf_counter()
    frames = list(iter_frames(video, max_frames=args.frames))
    t_decode = time.perf_counter() - t0
    n = len(frames)

    detector = create_detector("retinaface", num_threads=args.threads)
    detector.detect(frames[0])  # session creation and warm-up are not counted
    t0 = time.perf_counter()
    detections = [detector.detect(f) for f in frames]
    t_detect = time.perf_counter() - t0
    t0 = time.perf_counter()
    if any(detections):
        landmarks = track_face(detections, source=str(video)).landmarks
    else:  # synthetic clip: fixed points, same alignment cost
        landmarks = np.repeat(template_points(224)[None] * 2 + 20, n, 0).astype(np.float32)
    crops = [align_face(f, lm)[0] for f, lm in zip(frames, landmarks)]
    t_align = time.perf_counter() - t0

    encoder = PDFGCMotionEncoder().eval()
    x = to_model_input(np.stack(crops))
    with torch.inference_mode():
        encoder(x[: args.batch_size])  # warm-up
        t0 = time.perf_counter()
        for start in range(0, n, args.batch_size):
            encoder(x[start : start + args.batch_size])
        t_encode = time.perf_counter() - t0

    result = {
        "video": str(video),
        "size": f"{info.width}x{info.height}",
        "frames": n,
        "threads": args.threads,
        "faces_found": int(sum(bool(d) for d in detections)),
        "decode_fps": n / t_decode,
        "detect_fps": n / t_detect,
        "detect_ms_per_frame": 1000 * t_detect / n,
        "track_align_fps": n / t_align,
        "detect_track_align_fps": n / (t_detect + t_align),
        "encoder_fps": n / t_encode,
        "encoder_batch_size": args.batch_size,
        "cpu_count": os.cpu_count(),
    }
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print(f"{result['video']} ({result['size']}, {n} frames, {args.threads} threads, faces in {result['faces_found']})")
        print(f"  decode                     {result['decode_fps']:8.1f} fps")
        print(f"  detection                  {result['detect_fps']:8.1f} fps ({result['detect_ms_per_frame']:.1f} ms/frame)")
        print(f"  tracking + alignment       {result['track_align_fps']:8.1f} fps")
        print(f"  detection+tracking+align   {result['detect_track_align_fps']:8.1f} fps")
        print(f"  PD-FGC encoder (batch {args.batch_size:2d})  {result['encoder_fps']:8.1f} fps")
    if tmp is not None:
        tmp.cleanup()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--video", default=None, help=f"512x512 clip (default: {DEFAULT_VIDEO}, else synthetic)")
    parser.add_argument("--frames", type=int, default=64, help="frames to time")
    parser.add_argument("--batch-size", type=int, default=8, help="faces per encoder call")
    parser.add_argument("--threads", type=int, default=2, help="torch / onnxruntime threads")
    parser.add_argument("--json", action="store_true", help="print JSON")
    main(parser.parse_args())
