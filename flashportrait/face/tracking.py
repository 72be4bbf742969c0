"""Follow one face through a video: choose it, fill the frames where it was missed, smooth its points.

Rules
    * The face followed is the largest one in the first frame that has any face; in each later frame, the
      detection nearest (box centre, in units of the last box's size) to the last accepted box, if it is
      within `max_jump` box sizes (the allowance grows by 10 % per frame the face has been missing).
      Faces farther away (another person, a false positive) are ignored for that frame.
    * Frames without the followed face are filled by linear interpolation between the nearest frames that
      have it (before the first / after the last detection: the nearest detection is held). Their count is
      reported (`FaceTrack.num_interpolated`) and logged by the caller.
    * Points are then smoothed over time with a Gaussian of `smooth_sigma` frames (0 turns it off), which
      removes detector jitter without lag (the whole sequence is known).
    * A video with no face at all raises `NoFaceError`; one with too few detected frames, or a gap longer
      than `max_gap` frames, raises `FaceTrackingError`. Both messages name the source and the frames.

The result always has exactly one entry per input frame.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from flashportrait.face.detector import FaceDetection

__all__ = [
    "FaceTrack",
    "FaceTrackingError",
    "NoFaceError",
    "FaceFollower",
    "fill_missing",
    "track_face",
    "frame_ranges",
]


class FaceTrackingError(RuntimeError):
    """The face cannot be followed through the video (too few frames with a face, or too long a gap)."""


class NoFaceError(FaceTrackingError):
    """No face was detected in any frame."""


def frame_ranges(indices: Sequence[int] | np.ndarray, *, limit: int = 8) -> str:
    """Compact text for sorted frame indices, e.g. "3-7, 12, 40-55" (at most `limit` ranges, then "...")."""
    idx = np.asarray(indices, dtype=np.int64)
    if len(idx) == 0:
        return "none"
    breaks = np.flatnonzero(np.diff(idx) != 1)
    starts = np.concatenate([[idx[0]], idx[breaks + 1]])
    ends = np.concatenate([idx[breaks], [idx[-1]]])
    parts = [f"{s}" if s == e else f"{s}-{e}" for s, e in zip(starts, ends)]
    more = len(parts) - limit
    return ", ".join(parts[:limit]) + (f", ... ({more} more ranges)" if more > 0 else "")


def _gaps(detected: np.ndarray) -> list[tuple[int, int]]:
    """Maximal runs of False in a bool array, as (start, end) inclusive frame indices."""
    runs = []
    start = None
    for i, ok in enumerate(detected):
        if not ok and start is None:
            start = i
        elif ok and start is not None:
            runs.append((start, i - 1))
            start = None
    if start is not None:
        runs.append((start, len(detected) - 1))
    return runs


@dataclass
class FaceTrack:
    """One face followed through N frames.

    Attributes:
        landmarks: float32 [N, 5, 2] (x, y) pixels, filled and smoothed (use these for alignment).
        boxes: float32 [N, 4] (x0, y0, x1, y1) pixels, filled and smoothed.
        detected: bool [N], True where the followed face was detected (False: interpolated).
        scores: float32 [N] detector scores (0 where interpolated).
        raw_landmarks: float32 [N, 5, 2] detector output before filling/smoothing (NaN where missing).
    """

    landmarks: np.ndarray
    boxes: np.ndarray
    detected: np.ndarray
    scores: np.ndarray
    raw_landmarks: np.ndarray

    def __len__(self) -> int:
        return len(self.detected)

    @property
    def num_interpolated(self) -> int:
        """Frames whose points were interpolated (or held) instead of detected."""
        return int((~self.detected).sum())

    @property
    def interpolated_frames(self) -> np.ndarray:
        """int64 indices of the interpolated frames."""
        return np.flatnonzero(~self.detected)


class FaceFollower:
    """Frame-by-frame choice of the followed face (see the module docstring for the rule).

    Args:
        max_jump: largest accepted move of the box centre between frames, in units of the last box's size
            (the mean of its width and height).
    """

    def __init__(self, max_jump: float = 1.0) -> None:
        self.max_jump = float(max_jump)
        self.last: FaceDetection | None = None
        self.missing_for = 0

    def update(self, faces: Sequence[FaceDetection]) -> FaceDetection | None:
        """Pick the followed face among this frame's detections (None: not in this frame)."""
        chosen = None
        if faces:
            if self.last is None:
                chosen = max(faces, key=lambda f: f.area)
            else:
                ref = self.last
                size = max(float((ref.box[2] - ref.box[0] + ref.box[3] - ref.box[1]) / 2), 1.0)
                dist = [float(np.linalg.norm(f.center - ref.center)) / size for f in faces]
                best = int(np.argmin(dist))
                if dist[best] <= self.max_jump * (1.0 + 0.1 * self.missing_for):
                    chosen = faces[best]
        if chosen is None:
            self.missing_for += 1
        else:
            self.last, self.missing_for = chosen, 0
        return chosen


def _fill(values: np.ndarray, known: np.ndarray) -> np.ndarray:
    """Linear interpolation over time of float [N, ...] values where `known` [N] is False (ends: held)."""
    t = np.arange(len(values))
    flat = values.reshape(len(values), -1)
    out = np.empty_like(flat)
    for j in range(flat.shape[1]):
        out[:, j] = np.interp(t, t[known], flat[known, j])
    return out.reshape(values.shape)


def _gaussian_smooth(values: np.ndarray, sigma: float) -> np.ndarray:
    """Gaussian smoothing along axis 0 of float [N, ...] (kernel truncated at 3 sigma; edges: nearest value
    repeated), computed in float64 by ``scipy.ndimage.gaussian_filter1d``."""
    if sigma <= 0 or len(values) < 2:
        return values
    from scipy.ndimage import gaussian_filter1d

    smoothed = gaussian_filter1d(values.astype(np.float64), sigma, axis=0, mode="nearest", truncate=3.0)
    return smoothed.astype(values.dtype)


def fill_missing(
    values: np.ndarray,
    detected: np.ndarray,
    *,
    source: str = "the video",
    max_gap: int | None = None,
    min_detected_fraction: float = 0.5,
) -> np.ndarray:
    """Check that enough frames have the face, then fill the others by linear interpolation over time.

    Args:
        values: float [N, ...] per-frame points (rows where ``detected`` is False are ignored).
        detected: bool [N].
        source, max_gap, min_detected_fraction: as in :func:`track_face`.

    Returns:
        float [N, ...]: the detected rows unchanged, the others interpolated (held before the first / after
        the last detection).

    Raises:
        NoFaceError: no frame has the face. FaceTrackingError: too few frames, or a gap longer than ``max_gap``.
    """
    n = len(detected)
    count = int(np.sum(detected))
    if count == 0:
        raise NoFaceError(
            f"{source}: no face found in any of its {n} frames (frames 0-{n - 1}). "
            "Use a driving video in which one face is clearly visible."
        )
    missing = np.flatnonzero(~detected)
    if count < min_detected_fraction * n:
        raise FaceTrackingError(
            f"{source}: a face was found in only {count} of {n} frames (needs {min_detected_fraction:.0%}); "
            f"missing in frames {frame_ranges(missing)}. Trim the video to the part where the face is visible."
        )
    if max_gap is not None:
        long_gaps = [(s, e) for s, e in _gaps(detected) if e - s + 1 > max_gap]
        if long_gaps:
            idx = np.concatenate([np.arange(s, e + 1) for s, e in long_gaps])
            raise FaceTrackingError(
                f"{source}: the face is missing for more than {max_gap} consecutive frames, in frames "
                f"{frame_ranges(idx)}; too long to interpolate. Trim these parts from the video, or allow "
                "longer gaps (max_gap_s)."
            )
    return _fill(values, detected)


def track_face(
    detections: Sequence[Sequence[FaceDetection]],
    *,
    source: str = "the video",
    smooth_sigma: float = 1.0,
    max_gap: int | None = None,
    min_detected_fraction: float = 0.5,
    max_jump: float = 1.0,
) -> FaceTrack:
    """Follow one face through per-frame detections.

    Args:
        detections: for each of N frames, the faces detected in it.
        source: name used in error messages (the video path).
        smooth_sigma: temporal Gaussian smoothing of points and boxes, in frames (0: none).
        max_gap: longest run of frames without the face that may be filled (None: no limit).
        min_detected_fraction: the face must be detected in at least this fraction of the frames.
        max_jump: see `FaceFollower`.

    Returns:
        `FaceTrack` with N entries.

    Raises:
        NoFaceError: no face in any frame.
        FaceTrackingError: too few frames with the face, or a gap longer than `max_gap`.
    """
    n = len(detections)
    if n == 0:
        raise NoFaceError(f"{source}: no frames to look for a face in.")
    follower = FaceFollower(max_jump)
    raw_lm = np.full((n, 5, 2), np.nan, dtype=np.float32)
    raw_box = np.full((n, 4), np.nan, dtype=np.float32)
    scores = np.zeros(n, dtype=np.float32)
    for i, faces in enumerate(detections):
        face = follower.update(faces)
        if face is not None:
            raw_lm[i], raw_box[i], scores[i] = face.landmarks, face.box, face.score
    detected = ~np.isnan(raw_lm[:, 0, 0])
    landmarks = _gaussian_smooth(
        fill_missing(raw_lm, detected, source=source, max_gap=max_gap, min_detected_fraction=min_detected_fraction),
        smooth_sigma,
    )
    boxes = _gaussian_smooth(_fill(raw_box, detected), smooth_sigma)
    return FaceTrack(
        landmarks=landmarks.astype(np.float32),
        boxes=boxes.astype(np.float32),
        detected=detected,
        scores=scores,
        raw_landmarks=raw_lm,
    )
