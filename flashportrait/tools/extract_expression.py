"""Inspect the expression stage: driving video -> [N, 554] features (+ a preview of the aligned face crops).

    python -m flashportrait.tools.extract_expression driving.mp4 --out driving.expr.pt \
        --pd_fpg_model_path checkpoints/pd_fpg.pth --preview driving.crops.mp4

Without weights, `--random_encoder` runs the full-size PD-FGC encoder with random weights (seed 0): the
numbers are meaningless, but detection, tracking, alignment and the preview are real. With the authors'
`face_det.onnx` and `face_landmark.onnx` (`--det_model_path`, `--alignment_model_path`, or found next to
`pd_fpg.pth`) the video goes through the authors' face tracker instead of the bundled detector.

`--save_crops FILE.safetensors` writes what PD-FGC was fed: `crops` float32 [N, 3, 224, 224] in [-1, 1] (RGB),
`matrices` float64 [N, 2, 3] (source pixels -> crop pixels) and, with the authors' tracker, `landmarks`
float32 [N, 222, 2] (source-frame pixels).

The features file is a torch file (`ExpressionFeatures.save`: features, fps, frame_indices, landmarks,
detected, settings) or, with a .npz name, a NumPy archive with the same arrays. The preview shows each
224x224 crop the encoder sees, with the five aligned points (green: detected, red: interpolated) and the
template positions (white rings), at the features' frame rate, with the driving video's audio.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

import cv2
import numpy as np
import torch

from flashportrait.expression import ExpressionFeatures, extract_expression_features, iter_aligned_crops
from flashportrait.face.align import template_points, transform_points
from flashportrait.face.detector import available_detectors, create_detector
from flashportrait.video_io import StreamingVideoWriter


def write_preview(features: ExpressionFeatures, video_path: str | Path, out_path: str | Path) -> None:
    """Write the aligned crops of `features` with their five points drawn, as an H.264 video."""
    template = template_points().round().astype(int)
    fi = features.frame_indices.numpy()
    first_s = float(fi[0]) / features.fps if len(fi) else 0.0
    with StreamingVideoWriter(out_path, features.fps, audio_source=video_path, audio_start_s=first_s) as writer:
        crops = iter_aligned_crops(video_path, features.landmarks.numpy(), fi)
        for row, (crop, matrix) in enumerate(crops):
            canvas = np.ascontiguousarray(crop)
            for x, y in template:
                cv2.circle(canvas, (int(x), int(y)), 5, (255, 255, 255), 1, cv2.LINE_AA)
            color = (0, 255, 0) if bool(features.detected[row]) else (255, 0, 0)
            for x, y in transform_points(matrix, features.landmarks[row].numpy()):
                cv2.circle(canvas, (int(round(x)), int(round(y))), 2, color, -1, cv2.LINE_AA)
            cv2.putText(canvas, f"{int(fi[row])}", (4, 16), cv2.FONT_HERSHEY_SIMPLEX, 0.45, (255, 255, 0), 1, cv2.LINE_AA)
            writer.write(canvas)


def save_crops(features: ExpressionFeatures, video_path: str | Path, out_path: str | Path) -> None:
    """Write the PD-FGC inputs of `features` (see the module docstring) to a safetensors file, atomically."""
    from safetensors.torch import save_file

    from flashportrait.expression import crops_to_model_input

    released = features.settings.get("backend") == "released"
    crops, matrices = [], []
    for crop, matrix in iter_aligned_crops(video_path, features.landmarks.numpy(), features.frame_indices.numpy(),
                                           released=released):
        crops.append(crops_to_model_input(crop[None], released=released)[0])
        matrices.append(torch.from_numpy(matrix))
    tensors = {"crops": torch.stack(crops).contiguous(), "matrices": torch.stack(matrices).contiguous()}
    if features.dense_landmarks is not None:
        tensors["landmarks"] = features.dense_landmarks.float().contiguous()
    out = Path(out_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.partial")
    try:
        save_file(tensors, str(tmp))
        tmp.replace(out)
    finally:
        tmp.unlink(missing_ok=True)


def main(args: argparse.Namespace) -> None:
    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO, format="%(levelname)s %(message)s")
    torch.manual_seed(0)
    from flashportrait.args import find_face_tracker_models
    from flashportrait.checkpoints import load_pdfgc_motion_encoder
    from flashportrait.models.motion_encoder import PDFGCMotionEncoder

    if args.pd_fpg_model_path:
        encoder = load_pdfgc_motion_encoder(args.pd_fpg_model_path, device=args.device)
    elif args.random_encoder:
        encoder = PDFGCMotionEncoder().eval()
    else:
        raise ValueError("give --pd_fpg_model_path PATH/pd_fpg.pth, or --random_encoder to test without weights")
    if args.save_crops is not None and not str(args.save_crops).endswith(".safetensors"):
        raise ValueError(f"--save_crops must name a .safetensors file, got {args.save_crops}")
    models = find_face_tracker_models(args.pd_fpg_model_path, args.det_model_path, args.alignment_model_path)
    tracker = None
    if models is not None:
        from flashportrait.face.released_tracker import ReleasedFaceTracker

        tracker = ReleasedFaceTracker(*models)
    feats = extract_expression_features(
        args.video,
        encoder,
        device=args.device,
        batch_size=args.batch_size,
        detector=None if tracker is not None else create_detector(args.detector),
        tracker=tracker,
        max_frames=args.max_frames,
        target_fps=args.target_fps,
        smooth_sigma=args.smooth_sigma,
        cache=not args.no_cache,
        cache_dir=args.cache_dir,
        progress=not args.quiet,
    )
    out = Path(args.out) if args.out else Path(args.video).with_suffix(".expression.pt")
    if out.suffix == ".npz":
        out.parent.mkdir(parents=True, exist_ok=True)
        np.savez(out, **{k: (v.numpy() if torch.is_tensor(v) else np.asarray(v)) for k, v in feats.to_dict().items() if k != "settings"})
    else:
        feats.save(out)
    print(
        f"{args.video}: {len(feats)} frames at {feats.fps:.3f} fps -> features {tuple(feats.features.shape)} "
        f"in {out} ({feats.num_interpolated} frames interpolated)"
    )
    if args.preview:
        write_preview(feats, args.video, args.preview)
        print(f"preview of the aligned crops: {args.preview}")
    if args.save_crops:
        save_crops(feats, args.video, args.save_crops)
        print(f"PD-FGC inputs (crops, matrices{', landmarks' if feats.dense_landmarks is not None else ''}): "
              f"{args.save_crops}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("video", help="driving video")
    parser.add_argument("--out", default=None, help="features file (.pt, or .npz); default: VIDEO with .expression.pt")
    parser.add_argument("--preview", default=None, help="write an .mp4 of the aligned 224x224 crops with the 5 points")
    parser.add_argument("--pd_fpg_model_path", default=None, help="PD-FGC motion encoder weights (pd_fpg.pth)")
    parser.add_argument("--det_model_path", default=None, help="the authors' face_det.onnx (default: next to pd_fpg.pth)")
    parser.add_argument("--alignment_model_path", default=None,
                        help="the authors' face_landmark.onnx (default: next to pd_fpg.pth)")
    parser.add_argument("--save_crops", default=None, help="write the PD-FGC inputs to this .safetensors file")
    parser.add_argument("--random_encoder", "--random-encoder", dest="random_encoder", action="store_true",
                        help="random-weight encoder (no weights needed; numbers meaningless)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch_size", "--batch-size", dest="batch_size", type=int, default=16,
                        help="faces per encoder call")
    parser.add_argument("--detector", default="retinaface", choices=available_detectors(),
                        help="bundled detector (when the authors' tracker files are not given)")
    parser.add_argument("--max_frames", "--max-frames", dest="max_frames", type=int, default=None,
                        help="use only the first N frames")
    parser.add_argument("--target_fps", "--target-fps", dest="target_fps", type=float, default=None,
                        help="resample to this constant frame rate")
    parser.add_argument("--smooth_sigma", "--smooth-sigma", dest="smooth_sigma", type=float, default=1.0,
                        help="temporal smoothing of the face points (bundled detector), in frames")
    parser.add_argument("--no_cache", "--no-cache", dest="no_cache", action="store_true",
                        help="neither read nor write the expression cache")
    parser.add_argument("--cache_dir", "--cache-dir", dest="cache_dir", default=None,
                        help="cache folder (default: <user cache>/flashportrait/expression)")
    parser.add_argument("--quiet", action="store_true", help="no progress bars or info logs")
    from flashportrait.cli import run_main

    sys.exit(run_main(main, parser.parse_args()))
