"""Driving video -> 554 expression numbers per frame (SPEC.md section 2).

Pipeline of `extract_expression_features`:

1. decode the video (PyAV, rotation applied) and find five face points in every frame used, with one of
   two backends:
   * bundled (default): detect faces (`flashportrait.face.detector`, RetinaFace), follow one, smooth the
     points over time (`flashportrait.face.tracking`);
   * released: the authors' tracker, `face_det.onnx` + `face_landmark.onnx` with their tracking and
     one-euro smoothing (`flashportrait.face.released_tracker`, FACE_TRACKER.md), when the user has them;
   either way the frames where no face was found are filled by interpolation (never dropped), and a video
   without a usable face stops with an error naming the file and the frames;
2. decode again, align each frame onto the 224x224 template (Umeyama similarity, bicubic), scale to [-1, 1]
   (`flashportrait.face.align`, or the authors' exact crop for the released backend) and run the PD-FGC
   motion encoder in batches.

The result has exactly one row per video frame used, in order (`frame_indices` says which source frames).

Cache
    With `cache=True` the result is stored as `<video name>.expression-<key>.pt` in the cache folder
    (`cache_dir`, default `<user cache>/flashportrait/expression`, see `flashportrait.config.default_cache_dir`;
    never beside the user's video), where the key hashes the video's bytes, every setting that changes the
    numbers (detector and its settings, frame selection, smoothing) and the motion encoder's weights. A second
    run with the same inputs loads it instead of extracting. If the folder cannot be written, the run continues
    without a cache (one log line). Cache files are written atomically (temp file + rename).

Warnings
    A face whose box is under `SMALL_FACE_PX` pixels (median over the frames) is logged: PD-FGC then sees a
    crop enlarged from a few pixels and its numbers carry little expression.

Length: the two backends, the cache and the error messages all act on the same two passes over the video;
splitting them would pass the decoded frames and their indices between modules.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from flashportrait.atomic import atomic_path
from flashportrait.config import EXPRESSION_DIM, EXPRESSION_PARTS, FACE_CROP_SIZE
from flashportrait.config import default_cache_dir as config_cache_dir
from flashportrait.face.align import align_face, to_model_input
from flashportrait.face.detector import FaceDetector, create_detector
from flashportrait.face.tracking import fill_missing, frame_ranges, track_face
from flashportrait.video_io import (
    VideoReadError,
    check_decoded_count,
    frame_timestamps,
    iter_frames,
    probe_video,
    resample_indices,
)

__all__ = [
    "ExpressionFeatures",
    "extract_expression_features",
    "iter_aligned_crops",
    "crops_to_model_input",
    "encoder_identity",
    "default_cache_dir",
]

logger = logging.getLogger(__name__)

#: bump when the extraction changes in a way that invalidates old cache files
CACHE_VERSION = 2
#: a driving face smaller than this (pixels, the shorter side of its box, median over frames) is warned about
SMALL_FACE_PX = 40


@dataclass
class ExpressionFeatures:
    """Expression features of a driving video.

    Attributes:
        features: float32 [N, 554] per frame: head pose 6, eye 6, emotion 30, mouth 512 (`EXPRESSION_PARTS`).
        fps: frames per second of these N frames (the video's rate, or the requested `target_fps`).
        frame_indices: int64 [N] index of the source video frame each row comes from (0-based, display order).
        landmarks: float32 [N, 5, 2] (x, y) source-frame pixels used for the alignment (filled and smoothed).
        detected: bool [N], False where the points were interpolated because no face was detected.
        video_path: the video the features come from.
        num_source_frames: frames in the video (from its header), before any `max_frames` / resampling choice.
        settings: the settings that produced the features (also the cache key's input; ``settings["backend"]``
            is "bundled" or "released").
        dense_landmarks: float32 [N, 222, 2] the authors' tracker's points (frame pixels, filled like
            `landmarks`) when it ran, else None.
    """

    features: torch.Tensor
    fps: float
    frame_indices: torch.Tensor
    landmarks: torch.Tensor
    detected: torch.Tensor
    video_path: str = ""
    num_source_frames: int = 0
    settings: dict = field(default_factory=dict)
    dense_landmarks: torch.Tensor | None = None

    def __len__(self) -> int:
        return int(self.features.shape[0])

    @property
    def num_interpolated(self) -> int:
        """Rows whose face points were interpolated instead of detected."""
        return int((~self.detected).sum())

    def parts(self) -> dict[str, torch.Tensor]:
        """The features split into named parts: {"headpose": [N, 6], "eye": [N, 6], "emotion": [N, 30], "mouth": [N, 512]}."""
        out, start = {}, 0
        for name, size in EXPRESSION_PARTS:
            out[name] = self.features[:, start : start + size]
            start += size
        return out

    def to_dict(self) -> dict:
        return {
            "features": self.features,
            "fps": float(self.fps),
            "frame_indices": self.frame_indices,
            "landmarks": self.landmarks,
            "detected": self.detected,
            "video_path": self.video_path,
            "num_source_frames": int(self.num_source_frames),
            "settings": self.settings,
            **({"dense_landmarks": self.dense_landmarks} if self.dense_landmarks is not None else {}),
        }

    def save(self, path: str | os.PathLike) -> None:
        """Write to a torch file (atomically: temp file in the same folder, then rename)."""
        _atomic_torch_save(self.to_dict(), Path(path))

    @classmethod
    def load(cls, path: str | os.PathLike) -> ExpressionFeatures:
        """Read a file written by `save`."""
        data = torch.load(Path(path), map_location="cpu", weights_only=True)
        missing = {"features", "fps", "frame_indices", "landmarks", "detected"} - set(data)
        if missing:
            raise ValueError(f"{path}: not an expression-features file (missing {sorted(missing)})")
        feats = data["features"]
        if feats.ndim != 2 or feats.shape[1] != EXPRESSION_DIM or len(data["frame_indices"]) != len(feats):
            raise ValueError(f"{path}: features of shape {tuple(feats.shape)}, expected [N, {EXPRESSION_DIM}]")
        return cls(**{k: data[k] for k in data if k in cls.__dataclass_fields__})


# ---------------------------------------------------------------------------------------------------------
# cache helpers
# ---------------------------------------------------------------------------------------------------------


def default_cache_dir() -> Path:
    """The expression cache folder: `<flashportrait.config.default_cache_dir()>/expression`."""
    return config_cache_dir() / "expression"


def _file_sha256(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def encoder_identity(module: nn.Module) -> str:
    """A string that changes when the encoder's weights change.

    Uses `module.weights_identity` if the loader set one (e.g. path + size + mtime of the weights file),
    else a SHA-256 over the class name and every parameter and buffer.
    """
    ident = getattr(module, "weights_identity", None)
    if ident:
        return f"{type(module).__name__}:{ident}"
    h = hashlib.sha256(type(module).__name__.encode())
    for name, tensor in module.state_dict().items():
        h.update(name.encode())
        t = tensor.detach().to("cpu").contiguous().reshape(-1)
        h.update(str(t.dtype).encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return f"{type(module).__name__}:sha256:{h.hexdigest()}"


def _atomic_torch_save(obj, path: Path) -> None:
    with atomic_path(path) as tmp:
        torch.save(obj, tmp)


def _looks_writable(folder: Path) -> bool:
    """False for a folder without write permission bits (read-only shares stay untouched even for root)."""
    try:
        mode = folder.stat().st_mode
    except OSError:
        return True  # does not exist yet: creating it will tell
    return bool(mode & 0o222) and os.access(folder, os.W_OK)


def _cache_path(video: Path, key: str, cache_dir: str | os.PathLike | None) -> Path:
    """The cache file of ``video`` (two videos of one name never collide: the key covers the content)."""
    folder = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    return folder / f"{video.name}.expression-{key[:16]}.pt"


def _progress_bar(progress, total: int, desc: str):
    """A tqdm bar: ``progress`` is a bool (show or not) or a factory ``progress(total=...)`` such as a
    diffusers pipeline's ``progress_bar`` (which applies the pipeline's progress settings)."""
    if callable(progress):
        bar = progress(total=total)
        bar.set_description(desc)
        return bar
    return tqdm(total=total, desc=desc, unit="frame", disable=not progress)


# ---------------------------------------------------------------------------------------------------------
# extraction
# ---------------------------------------------------------------------------------------------------------


def iter_aligned_crops(
    video_path: str | os.PathLike,
    landmarks: np.ndarray | torch.Tensor,
    frame_indices: np.ndarray | torch.Tensor,
    *,
    size: int = FACE_CROP_SIZE,
    released: bool = False,
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Decode the chosen frames and warp each onto the template.

    Args:
        video_path: the video.
        landmarks: float [N, 5, 2] source-frame points, one set per row of `frame_indices`.
        frame_indices: int [N] source frame indices, sorted ascending (repeats allowed).
        size: crop side in pixels (224; the released crop is always 224).
        released: use the authors' crop (`flashportrait.face.released_tracker.five_point_crop`: their Umeyama
            dtypes, float32 points) instead of `flashportrait.face.align.align_face` (float64); the two differ
            by up to one grey level in a few pixels.

    Yields:
        (crop uint8 [size, size, 3] RGB, matrix float64 [2, 3] source pixels -> crop pixels), N times.
    """
    if released:
        from flashportrait.face.released_ops import five_point_crop

        landmarks = np.asarray(landmarks, dtype=np.float32)
    else:
        landmarks = np.asarray(landmarks, dtype=np.float64)
    frame_indices = np.asarray(frame_indices, dtype=np.int64)
    count = 0
    for row, frame in enumerate(iter_frames(video_path, indices=frame_indices)):
        yield five_point_crop(frame, landmarks[row]) if released else align_face(frame, landmarks[row], size)
        count += 1
    if count != len(frame_indices):
        raise VideoReadError(
            f"{video_path}: decoded {count} of the {len(frame_indices)} frames asked for (the file changed or is "
            "truncated?). Delete its expression cache file and run again."
        )


def crops_to_model_input(crops: np.ndarray, *, released: bool = False, device="cpu", dtype=torch.float32):
    """uint8 RGB crops [B, 224, 224, 3] -> [B, 3, 224, 224] in [-1, 1] for PD-FGC: ``x / 127.5 - 1`` in float32,
    or with ``released`` the authors' ``float32(x / 255 * 2 - 1)`` computed in float64 (equal to 1 ulp)."""
    if not released:
        return to_model_input(crops, device=device, dtype=dtype)
    from flashportrait.face.released_ops import pdfgc_input

    return torch.from_numpy(np.stack([pdfgc_input(c) for c in crops])).to(device, dtype)


def _run_encoder(motion_encoder: nn.Module, x: torch.Tensor) -> torch.Tensor:
    out = motion_encoder(x)
    if out.ndim != 2 or out.shape != (len(x), EXPRESSION_DIM):
        raise ValueError(
            f"the motion encoder returned shape {tuple(out.shape)} for {len(x)} faces; expected "
            f"[{len(x)}, {EXPRESSION_DIM}] (head pose 6, eye 6, emotion 30, mouth 512)"
        )
    return out.detach().to("cpu", torch.float32)


@dataclass
class _FacePoints:
    """Pass 1's result: five points per decoded frame (filled), which were detected, the face size, and the
    authors' 222 points when their tracker ran."""

    landmarks: np.ndarray  # float32 [N, 5, 2]
    detected: np.ndarray  # bool [N]
    face_px: float  # median shorter side of the face box, pixels
    dense: np.ndarray | None = None  # float32 [N, 222, 2]


def _bundled_pass(video: Path, frames: Iterator[np.ndarray], total: int, detector: FaceDetector, progress,
                  fps: float, smooth_sigma: float, max_gap_s: float, min_detected_fraction: float) -> _FacePoints:
    """The bundled path: detect faces (batches of 8), follow one, fill gaps, smooth (`flashportrait.face`)."""
    detections = []
    batch: list[np.ndarray] = []
    bar = _progress_bar(progress, total, f"detect faces ({video.name})")
    for frame in frames:
        batch.append(frame)
        if len(batch) == 8:
            detections.extend(detector.detect_batch(batch))
            bar.update(len(batch))
            batch = []
    if batch:
        detections.extend(detector.detect_batch(batch))
        bar.update(len(batch))
    bar.close()
    check_decoded_count(video, len(detections), total)
    track = track_face(detections, source=str(video), smooth_sigma=smooth_sigma,
                       max_gap=max(1, int(round(max_gap_s * fps))), min_detected_fraction=min_detected_fraction)
    sides = np.minimum(track.boxes[:, 2] - track.boxes[:, 0], track.boxes[:, 3] - track.boxes[:, 1])
    return _FacePoints(track.landmarks, track.detected, float(np.median(sides)))


def _released_pass(video: Path, frames_factory, total: int, tracker, progress, fps: float, max_gap_s: float,
                   min_detected_fraction: float) -> _FacePoints:
    """The authors' tracker (two passes over the frames, one-euro smoothing inside; FACE_TRACKER.md), then the
    frames where it found no face are filled by interpolation like the bundled path (never dropped)."""
    from flashportrait.face.released_ops import FIVE_POINT_INDEX

    bar = _progress_bar(progress, 2 * total, f"track faces, 2 passes ({video.name})")

    def frames_bgr():
        for rgb in frames_factory():
            bar.update(1)
            yield np.ascontiguousarray(rgb[..., ::-1])

    result = tracker.track(frames_bgr, source=str(video))
    bar.close()
    check_decoded_count(video, result.num_frames, total)
    fill = dict(source=str(video), max_gap=max(1, int(round(max_gap_s * fps))),
                min_detected_fraction=min_detected_fraction)
    dense = fill_missing(result.landmarks, result.found, **fill).astype(np.float32)
    extent = dense.max(axis=1) - dense.min(axis=1)  # [N, 2] bounding box of the 222 points
    return _FacePoints(dense[:, FIVE_POINT_INDEX], result.found, float(np.median(extent.min(axis=1))), dense)


def extract_expression_features(
    video_path: str | os.PathLike,
    motion_encoder: nn.Module,
    *,
    device: str | torch.device = "cpu",
    batch_size: int = 16,
    detector: FaceDetector | None = None,
    tracker=None,
    max_frames: int | None = None,
    target_fps: float | None = None,
    smooth_sigma: float = 1.0,
    max_gap_s: float = 2.0,
    min_detected_fraction: float = 0.5,
    cache: bool = True,
    cache_dir: str | os.PathLike | None = None,
    progress=True,
) -> ExpressionFeatures:
    """Expression features [N, 554] for the frames of a driving video.

    Args:
        video_path: the driving video (any format FFmpeg reads; rotation metadata honoured).
        motion_encoder: the PD-FGC motion encoder (`flashportrait.models.motion_encoder`), or any module
            mapping [B, 3, 224, 224] RGB in [-1, 1] to [B, 554]. It is moved to `device` and set to eval mode.
        device: where the encoder runs.
        batch_size: faces per encoder call.
        detector: face detector of the bundled path (default: `create_detector("retinaface")`).
        tracker: a `flashportrait.face.released_tracker.ReleasedFaceTracker` (the authors' face_det.onnx +
            face_landmark.onnx): when given it replaces detection, following and smoothing, and the crops
            are made as the authors make them, so the features equal the released pipeline's on every frame
            where it finds a face; frames where it finds none are interpolated (the authors drop them).
        max_frames: use only the first `max_frames` frames (after resampling, if `target_fps` is set).
        target_fps: resample to this constant rate by timestamps (frames repeated or skipped; see
            `frame_indices`). None: every decoded frame, at the video's average rate. Use it for variable-
            frame-rate videos (a warning says so).
        smooth_sigma: temporal smoothing of the face points of the bundled path, in frames (0: none).
        max_gap_s: longest stretch without a detected face that is filled by interpolation, in seconds.
        min_detected_fraction: stop if the face is detected in fewer frames than this fraction.
        cache: load / store the result in a cache file (see the module docstring).
        cache_dir: the cache folder (default `default_cache_dir()`; never beside the video).
        progress: show progress bars (a bool), or a factory ``progress(total=...) -> tqdm`` (e.g. a
            diffusers pipeline's ``progress_bar``).

    Returns:
        `ExpressionFeatures` with one row per frame used.

    Raises:
        flashportrait.video_io.VideoReadError: unreadable or truncated video.
        flashportrait.face.NoFaceError / FaceTrackingError: no face, or too few frames with one.
    """
    video = Path(video_path)
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if max_frames is not None and max_frames < 1:
        raise ValueError(f"max_frames must be >= 1 or None, got {max_frames}")
    if target_fps is not None and target_fps <= 0:
        raise ValueError(f"target_fps must be > 0 frames per second or None, got {target_fps}")
    info = probe_video(video)
    released = tracker is not None
    if not released:
        detector = detector if detector is not None else create_detector("retinaface")
    device = torch.device(device)

    settings = {
        "version": CACHE_VERSION,
        "backend": "released" if released else "bundled",
        "detector": tracker.identity() if released else detector.identity(),
        "max_frames": max_frames,
        "target_fps": target_fps,
        "smooth_sigma": None if released else smooth_sigma,
        "max_gap_s": max_gap_s,
        "min_detected_fraction": min_detected_fraction,
        "crop_size": FACE_CROP_SIZE,
    }
    cache_path = None
    if cache:
        key_src = {"video_sha256": _file_sha256(video), "settings": settings, "encoder": encoder_identity(motion_encoder)}
        key = hashlib.sha256(json.dumps(key_src, sort_keys=True, default=str).encode()).hexdigest()
        cache_path = _cache_path(video, key, cache_dir)
        if cache_path.is_file():
            try:
                result = ExpressionFeatures.load(cache_path)
                logger.info("%s: expression features loaded from cache %s", video, cache_path)
                return result
            except Exception as err:  # noqa: BLE001 - a broken cache file is recomputed, not fatal
                logger.warning("%s: ignoring unreadable cache file %s (%s)", video, cache_path, err)

    # --- which source frames ----------------------------------------------------------------------------
    if target_fps is not None:
        selected = resample_indices(frame_timestamps(video), target_fps)
        if max_frames is not None:
            selected = selected[:max_frames]
        fps = float(target_fps)
        decode_indices = np.unique(selected)
        total = len(decode_indices)
    else:
        if info.is_vfr:
            logger.warning(
                "%s has a variable frame rate; using every frame at the average %.3f fps. For constant-rate "
                "resampling by timestamps pass --fps (infer.py) or target_fps.", video, info.fps,
            )
        selected = None
        fps = info.fps
        decode_indices = None
        total = min(info.num_frames, max_frames or info.num_frames)

    def frames_factory() -> Iterator[np.ndarray]:
        return iter_frames(video, max_frames=max_frames if decode_indices is None else None, indices=decode_indices)

    # --- pass 1: five face points per frame -------------------------------------------------------------
    logger.info("%s: expression features with %s", video,
                "the authors' face tracker (face_det.onnx + face_landmark.onnx)" if released
                else f"the bundled face detector ({type(detector).__name__})")
    if released:
        points = _released_pass(video, frames_factory, total, tracker, progress, fps, max_gap_s, min_detected_fraction)
    else:
        points = _bundled_pass(video, frames_factory(), total, detector, progress, fps, smooth_sigma, max_gap_s,
                               min_detected_fraction)
    if decode_indices is None:
        decode_indices = np.arange(len(points.detected), dtype=np.int64)
        selected = decode_indices
    elif len(points.detected) != len(decode_indices):
        raise VideoReadError(f"{video}: decoded {len(points.detected)} of {len(decode_indices)} frames; is the file truncated?")
    missing = np.flatnonzero(~points.detected)
    if len(missing):
        logger.info("%s: no face detected in %d of %d frames (%s); their points were interpolated.",
                    video, len(missing), len(points.detected), frame_ranges(decode_indices[missing]))
    if points.face_px < SMALL_FACE_PX:
        logger.warning(
            "%s: the face is only about %.0f pixels wide; the expression encoder sees a 224-pixel crop enlarged from "
            "it, so expressions will be weak. Use a video where the face is at least %d pixels.",
            video, points.face_px, SMALL_FACE_PX,
        )

    # --- pass 2: align + encode -------------------------------------------------------------------------
    motion_encoder = motion_encoder.to(device).eval()
    param = next(motion_encoder.parameters(), None)
    dtype = param.dtype if param is not None and param.is_floating_point() else torch.float32
    outputs: list[torch.Tensor] = []
    crops: list[np.ndarray] = []
    bar = _progress_bar(progress, len(decode_indices), "encode expressions")

    def encode() -> None:
        outputs.append(_run_encoder(motion_encoder, crops_to_model_input(np.stack(crops), released=released,
                                                                         device=device, dtype=dtype)))
        bar.update(len(crops))
        crops.clear()

    with torch.inference_mode():
        for crop, _ in iter_aligned_crops(video, points.landmarks, decode_indices, released=released):
            crops.append(crop)
            if len(crops) == batch_size:
                encode()
        if crops:
            encode()
    bar.close()
    unique_feats = torch.cat(outputs)

    # unique decoded frames -> selected rows (identity unless resampling repeated frames)
    rows = np.searchsorted(decode_indices, selected)
    result = ExpressionFeatures(
        features=unique_feats[torch.from_numpy(rows)].contiguous(),
        fps=fps,
        frame_indices=torch.from_numpy(np.asarray(selected, dtype=np.int64)),
        landmarks=torch.from_numpy(points.landmarks[rows]),
        detected=torch.from_numpy(points.detected[rows]),
        video_path=str(video),
        num_source_frames=int(info.num_frames),
        settings=settings,
        dense_landmarks=None if points.dense is None else torch.from_numpy(points.dense[rows]),
    )

    if cache_path is not None:
        if not _looks_writable(cache_path.parent):
            logger.info("%s: the cache folder %s is read-only; running without a cache.", video, cache_path.parent)
        else:
            try:
                result.save(cache_path)
                logger.info("%s: expression features cached in %s", video, cache_path)
            except OSError as err:
                logger.info("%s: cannot write cache file %s (%s); running without a cache.", video, cache_path, err)
    return result
