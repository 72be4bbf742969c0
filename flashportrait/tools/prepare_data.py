"""Raw videos -> the training layout of SPEC.md section 7 (what ``train_portrait.py`` reads).

    python -m flashportrait.tools.prepare_data RAW_DIR OUT_DIR --pd_fpg_model_path checkpoints/FlashPortrait/pd_fpg.pth

For every video under ``RAW_DIR`` (mp4, mov, mkv, avi, webm, m4v; searched recursively):

1. its bucket by aspect ratio: ``rec`` (landscape, 480x832), ``vec`` (portrait, 832x480) or ``square``
   (720x720), whichever is nearest in log aspect ratio; its category from its first folder under ``RAW_DIR``
   when that is ``speech``, ``singing`` or ``dancing``, else ``--category``;
2. the expression features of every frame (:func:`flashportrait.expression.extract_expression_features`:
   RetinaFace, tracking, 5-point alignment, PD-FGC) -> ``expression.pt``;
3. every frame, scaled to cover its bucket's resolution (never enlarged), as ``images/frame_<i>.png``, and
   MediaPipe FaceMesh masks (478 points; face oval hull, lip hull) as ``face_masks/`` and ``lip_masks/``;
4. ``clip.json`` (frame count, fps, source, frames without a FaceMesh face).

Output: ``OUT_DIR/<bucket>/<category>/<clip id>/`` and the path lists ``OUT_DIR/video_square_path.txt``,
``video_rec_path.txt``, ``video_vec_path.txt`` (clip folders relative to ``OUT_DIR``). A video without a usable
face (no detection, or FaceMesh finds one in fewer than half its frames) or that cannot be read is skipped
and listed, with the reason, in ``OUT_DIR/skipped.txt``. Each clip is written to a temporary folder and
renamed when complete, and every finished video leaves a marker in ``OUT_DIR/.prepare/``: running the same
command again resumes an interrupted run (finished videos are not redone unless the file changed).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import math
import os
import re
import shutil
import sys
from pathlib import Path

import numpy as np

from flashportrait.atomic import atomic_write_text
from flashportrait.config import TRAIN_BUCKETS, TRAIN_PATH_LISTS, TRAIN_PROMPTS
from flashportrait.training.buckets import parse_resolution
from flashportrait.training.data import (
    CLIP_FRAMES_DIR,
    CLIP_INFO_FILE,
    EXPRESSION_FILE,
    FACE_MASKS_DIR,
    LIP_MASKS_DIR,
    frame_name,
)

__all__ = ["VIDEO_SUFFIXES", "find_videos", "choose_bucket", "cover_size", "clip_id", "prepare_video", "main"]

logger = logging.getLogger("prepare_data")

VIDEO_SUFFIXES = (".mp4", ".mov", ".mkv", ".avi", ".webm", ".m4v")
#: a clip is skipped when FaceMesh finds a face in fewer than this fraction of its frames
MIN_MESH_FRACTION = 0.5
MARKER_DIR = ".prepare"
SKIPPED_FILE = "skipped.txt"


def find_videos(raw_dir: Path) -> list[Path]:
    """Video files under ``raw_dir`` (recursively, sorted; hidden folders skipped)."""
    found = []
    for root, dirs, files in os.walk(raw_dir):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        found.extend(Path(root) / f for f in sorted(files) if f.lower().endswith(VIDEO_SUFFIXES))
    return found


def choose_bucket(width: int, height: int, resolutions: dict[str, tuple[int, int]]) -> str:
    """The bucket whose aspect ratio is nearest to ``width / height`` in log ratio (ties: dict order)."""
    ratio = math.log(width / height)
    return min(resolutions, key=lambda b: abs(ratio - math.log(resolutions[b][1] / resolutions[b][0])))


def cover_size(width: int, height: int, target: tuple[int, int]) -> tuple[int, int]:
    """``(width, height)`` scaled to just cover ``target`` ``(height, width)``, aspect kept, never enlarged."""
    scale = min(1.0, max(target[0] / height, target[1] / width))
    return max(1, round(width * scale)), max(1, round(height * scale))


def clip_id(video: Path, raw_dir: Path) -> str:
    """A folder name for ``video``, unique within ``raw_dir``: its relative path without suffix, with folders
    joined by ``__`` and characters other than letters, digits, ``-``, ``_``, ``.`` replaced by ``_``."""
    rel = video.relative_to(raw_dir).with_suffix("")
    return re.sub(r"[^A-Za-z0-9._-]", "_", "__".join(rel.parts))


def _category(video: Path, raw_dir: Path, default: str) -> str:
    parts = video.relative_to(raw_dir).parts
    return parts[0] if len(parts) > 1 and parts[0] in TRAIN_PROMPTS else default


def _source_stamp(video: Path) -> dict:
    stat = video.stat()
    return {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns}


def _marker(out_dir: Path, cid: str) -> Path:
    return out_dir / MARKER_DIR / (hashlib.sha1(cid.encode()).hexdigest()[:16] + ".json")


def _write_json(path: Path, data: dict) -> None:
    atomic_write_text(path, json.dumps(data, indent=1))


def prepare_video(video: Path, clip_dir: Path, bucket_size: tuple[int, int], motion_encoder, masker_factory, *,
                  max_frames: int | None = None, detector=None) -> dict:
    """Write one clip folder (module docstring, steps 2-4) into ``clip_dir`` (which must not exist yet).

    Returns:
        The ``clip.json`` content.

    Raises:
        flashportrait.face.FaceTrackingError: no usable face (RetinaFace or FaceMesh);
        flashportrait.video_io.VideoReadError: unreadable video.
    """
    from PIL import Image

    from flashportrait.expression import extract_expression_features
    from flashportrait.face import FaceTrackingError
    from flashportrait.video_io import iter_frames, probe_video

    info = probe_video(video)
    features = None
    if motion_encoder is not None:
        features = extract_expression_features(video, motion_encoder, cache=False, progress=False,
                                               max_frames=max_frames, detector=detector)
    size = cover_size(info.width, info.height, bucket_size)
    for sub in (CLIP_FRAMES_DIR, FACE_MASKS_DIR, LIP_MASKS_DIR):
        (clip_dir / sub).mkdir(parents=True)
    count, missing = 0, 0
    with masker_factory() as masker:
        for i, frame in enumerate(iter_frames(video, max_frames=max_frames)):
            image = Image.fromarray(frame)
            if image.size != size:
                image = image.resize(size, Image.LANCZOS)
            pixels = np.asarray(image)
            face, lip, found = masker(pixels)
            missing += not found
            image.save(clip_dir / CLIP_FRAMES_DIR / frame_name(i))
            Image.fromarray(face).save(clip_dir / FACE_MASKS_DIR / frame_name(i))
            Image.fromarray(lip).save(clip_dir / LIP_MASKS_DIR / frame_name(i))
            count += 1
    if count == 0:
        raise FaceTrackingError(f"{video}: no frames decoded")
    if count - missing < MIN_MESH_FRACTION * count:
        raise FaceTrackingError(f"{video}: FaceMesh found a face in only {count - missing} of {count} frames")
    if features is not None:
        if len(features) != count:
            raise FaceTrackingError(f"{video}: {len(features)} expression rows for {count} decoded frames")
        features.save(clip_dir / EXPRESSION_FILE)
    clip_info = {"num_frames": count, "fps": float(info.fps), "width": size[0], "height": size[1],
                 "source": str(video), "frames_without_mesh": missing, "has_expression": features is not None}
    _write_json(clip_dir / CLIP_INFO_FILE, clip_info)
    return clip_info


def write_path_lists(out_dir: Path) -> dict[str, int]:
    """Rewrite the three path lists and ``skipped.txt`` from the markers; returns clips per bucket."""
    done: dict[str, list[str]] = {b: [] for b in TRAIN_PATH_LISTS}
    skipped = []
    for marker in sorted((out_dir / MARKER_DIR).glob("*.json")):
        data = json.loads(marker.read_text())
        if data["status"] == "ok":
            done[data["bucket"]].append(data["clip"])
        else:
            skipped.append(f"{data['video']}\t{data['reason']}")
    for bucket, name in TRAIN_PATH_LISTS.items():
        atomic_write_text(out_dir / name, "".join(line + "\n" for line in sorted(done[bucket])))
    atomic_write_text(out_dir / SKIPPED_FILE, "".join(line + "\n" for line in sorted(skipped)))
    return {b: len(v) for b, v in done.items()}


def _prepare_all(videos, raw_dir: Path, out_dir: Path, resolutions, motion_encoder, detector, args) -> dict[str, int]:
    """Prepare every video not done before (markers); returns counts ``ok`` / ``skipped`` / ``kept from before``."""
    from tqdm.auto import tqdm

    from flashportrait.face import FaceTrackingError
    from flashportrait.training.face_masks import FaceMeshMasker
    from flashportrait.video_io import VideoReadError, probe_video

    counts = {"ok": 0, "skipped": 0, "kept from before": 0}
    bar = tqdm(videos, desc="videos", unit="video")
    for video in bar:
        cid = clip_id(video, raw_dir)
        marker = _marker(out_dir, cid)
        stamp = _source_stamp(video)
        if marker.is_file():
            previous = json.loads(marker.read_text())
            if previous.get("source") == stamp and (previous["status"] != "ok" or (out_dir / previous["clip"]).is_dir()):
                counts["kept from before"] += 1
                continue
        category = _category(video, raw_dir, args.category)
        record = {"video": str(video), "source": stamp, "category": category}
        partial = None
        try:
            info = probe_video(video)
            bucket = choose_bucket(info.width, info.height, resolutions)
            rel = Path(bucket) / category / cid
            final, partial = out_dir / rel, out_dir / bucket / category / f".{cid}.partial"
            shutil.rmtree(partial, ignore_errors=True)
            prepare_video(video, partial, resolutions[bucket], motion_encoder,
                          lambda: FaceMeshMasker(video=True), max_frames=args.max_frames, detector=detector)
            shutil.rmtree(final, ignore_errors=True)
            os.replace(partial, final)
            record.update(status="ok", bucket=bucket, clip=rel.as_posix())
            counts["ok"] += 1
        except (FaceTrackingError, VideoReadError) as exc:
            if partial is not None:
                shutil.rmtree(partial, ignore_errors=True)
            record.update(status="skipped", reason=str(exc).replace("\n", " "))
            counts["skipped"] += 1
            logger.info("skipped %s: %s", video, record["reason"])
        _write_json(marker, record)
        bar.set_postfix(counts, refresh=False)
    return counts


def main(args) -> dict[str, int]:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    from flashportrait.training.face_masks import native_stderr_to

    raw_dir, out_dir = Path(args.raw_dir).expanduser(), Path(args.out_dir).expanduser()
    if not raw_dir.is_dir():
        raise ValueError(f"RAW_DIR {raw_dir}: not a folder")
    if args.category not in TRAIN_PROMPTS:
        raise ValueError(f"--category must be one of {sorted(TRAIN_PROMPTS)}, got {args.category!r}")
    resolutions = dict(TRAIN_BUCKETS)
    for bucket in TRAIN_BUCKETS:
        if getattr(args, f"{bucket}_resolution"):
            resolutions[bucket] = parse_resolution(getattr(args, f"{bucket}_resolution"))
    if sum(x is not None and x is not False for x in (args.pd_fpg_model_path, args.tiny or None)) > 1:
        raise ValueError("give one of --pd_fpg_model_path and --tiny")
    if args.pd_fpg_model_path is not None:
        from flashportrait.checkpoints import load_pdfgc_motion_encoder

        motion_encoder = load_pdfgc_motion_encoder(args.pd_fpg_model_path)
    elif args.tiny:
        from flashportrait.tiny import build_tiny_motion_encoder

        motion_encoder = build_tiny_motion_encoder(args.seed)
    elif args.skip_expression:
        motion_encoder = None
    else:
        raise ValueError("give --pd_fpg_model_path (PD-FGC pd_fpg.pth) for the expression features, or "
                         "--skip_expression to compute them online during training (slower), or --tiny")
    videos = find_videos(raw_dir)
    if not videos:
        raise ValueError(f"RAW_DIR {raw_dir}: no videos ({', '.join(VIDEO_SUFFIXES)})")
    out_dir.mkdir(parents=True, exist_ok=True)
    detector = None
    if motion_encoder is not None:
        from flashportrait.face import create_detector

        detector = create_detector("retinaface")
    (out_dir / MARKER_DIR).mkdir(exist_ok=True)
    with native_stderr_to(out_dir / MARKER_DIR / "native.log"):  # MediaPipe's C++ notices go to a log file
        counts = _prepare_all(videos, raw_dir, out_dir, resolutions, motion_encoder, detector, args)
    per_bucket = write_path_lists(out_dir)
    print(f"{out_dir}: {counts['ok']} clips written, {counts['skipped']} skipped (listed in {out_dir / SKIPPED_FILE}), "
          f"{counts['kept from before']} kept from an earlier run; clips per list: "
          + ", ".join(f"{TRAIN_PATH_LISTS[b]} {n}" for b, n in per_bucket.items()))
    return per_bucket


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("raw_dir", help="folder of raw videos (subfolders speech/ singing/ dancing/ give the category)")
    p.add_argument("out_dir", help="the training data folder to write (created; an existing run is resumed)")
    p.add_argument("--pd_fpg_model_path", default=None, help="PD-FGC pd_fpg.pth for the expression features")
    p.add_argument("--tiny", action="store_true", help="features from the tiny random motion encoder (tests, checks)")
    p.add_argument("--skip_expression", action="store_true",
                   help="write no expression.pt (train_portrait.py then computes features online)")
    p.add_argument("--category", default="speech", help="category of videos not in a speech/singing/dancing folder")
    p.add_argument("--square_resolution", default=None, help="HxW the square bucket's frames must cover (720x720)")
    p.add_argument("--rec_resolution", default=None, help="HxW for landscape clips (480x832)")
    p.add_argument("--vec_resolution", default=None, help="HxW for portrait clips (832x480)")
    p.add_argument("--max_frames", type=int, default=None, help="use only the first N frames of each video")
    p.add_argument("--seed", type=int, default=0, help="seed of the --tiny motion encoder")
    return p.parse_args(argv)


if __name__ == "__main__":
    from flashportrait.cli import run_main

    sys.exit(run_main(main, parse_args()))
