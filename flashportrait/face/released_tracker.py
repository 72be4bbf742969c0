"""Port of the authors' driving-video face tracker (FlashPortrait c72d9de, `get_emo_feature` path).

Written from `shared/reference/FACE_TRACKER.md` (section numbers below refer to it) and checked against
the golden data in `shared/reference/face_tracker/` (two stand-in ONNX models run through the authors' own
code). Pieces:

* `FaceDetector`-like decoding of `face_det.onnx` (section 1): letterbox to 160x272, NanoDet-style
  softmax-expectation boxes, score > 0.4, hard NMS (IoU > 0.3), boxes back to frame pixels as int32.
* One alignment call of `face_landmark.onnx` (sections 2-3): three 128x128 crops, 222 points.
* The tracker (`FaceModel.forward`, section 4) with its per-track one-euro smoother (`Smoother222`),
  the probability / size / overlap deletions, and the two passes of `det_landmarks`.
* The 5-point Umeyama crop for PD-FGC (section 5) with the authors' dtypes (`released_umeyama`, see below).

The numerical pieces (detector decoding, crops, smoother, SVML atan2, the 5-point crop) are in
`flashportrait.face.released_ops`; this module holds the tracker, its two passes and the result. Length
(~740 lines): `ReleasedFaceTracker` is one state machine (section 4) that also records, per frame and pass,
every decision the golden files hold; split further it would no longer read against the document.

Differences from the authors' code, all deliberate:

* `ReleasedTrackResult` keeps one row per input frame (NaN landmarks where the authors drop the frame);
  the authors' shifted `zip(frames, landmarks)` pairing (section 6.1) is available as `released_pairing`.
* No face at all raises `flashportrait.face.tracking.NoFaceError` naming the source and the frame count,
  where the authors fail with a bare `AssertionError` (section 6.2). The exception carries the per-frame
  records in its `result` attribute.
* Frames are streamed: `track` accepts a zero-argument callable returning a fresh iterator, so the two
  passes do not need all frames in memory.

Findings where the document left room and the golden data decided (bit-exact on every golden record):

* Letterbox centre is (W / 2, H / 2); the 3x3 matrix is built in float64; the uint8 frame is warped, then
  normalised in float32 with float32 mean/std. Box corners go back with the float64 inverse matrix.
* Landmarks: crop pixels = output * 128 in float32; back to the frame with `cv2.invertAffineTransform`
  and `cv2.transform` (float32 in, float32 out).
* Crop from points: the rotated / scaled point sets are computed with `cv2.transform` on the float32
  points (float32 results), so the centre, the extent and `scale = 128 / max(extent) * 0.85` are float32
  (NEP 50, section 6.8). Angles in degrees are `np.degrees` of a float32 radian value.
* The eye-corner angle `atan2(dy, dx + 1e-8)` is a float32 `np.arctan2`. The goldens were produced on a
  machine where numpy dispatches float32 `arctan2` to Intel SVML (`__svml_atan2f16`, AVX-512), whose
  results differ from glibc's `atan2f` by 1-2 ulp on ~40 % of the calls; through the feedback loop that
  moved landmarks by ~1e-4 px. `atan2f_svml` re-implements that algorithm (reciprocal + Newton step,
  division correction, degree-11 odd polynomial, quadrant fix-up, with exact single-precision FMAs) so the
  port is bit-exact on any CPU; `ReleasedFaceTracker(..., atan2="numpy")` uses the local `np.arctan2`
  instead (what the authors' code computes on the machine at hand). The hardware `vrcp14ps` seed is
  replaced by the correctly rounded reciprocal; the Newton step and the division correction make the
  result independent of the seed except in rare ties (none in the 165 golden rolls).
* Smoother (section 4): per-point Euclidean displacement divided by `face_dis`, then the mean (float32);
  the piecewise-linear time step is evaluated as `d / lo * v_lo` and
  `v_lo + (d - lo) / (0.02 - lo) * (v_hi - v_lo)`; all filter arithmetic is float32 (`face_dis` of a
  carried track is float32; a new track's float64 `face_dis` never reaches a filter step because a new
  track's first smoother call returns the points unchanged).
* `face_dis` for the next frame: `sqrt(dx^2 + dy^2)` of p0 - p32 in float32 times
  `1 + (|deg(pitch)| + 0.6 |deg(yaw)|) / 18`, float32. A new track's `face_dis` is the rect diagonal:
  float64 for int32 detector boxes, float32 for a float32 pass-1 rect.
* Pass-1 rects (the pass-2 `pre_rect`) are float32 [4] (bounding box of float32 landmarks); the crop from
  such a rect is therefore computed in float32, from an int32 detector box in float64.
* 5-point crop (section 5): the document says "Umeyama in float64", but the authors feed the float32
  landmarks, so the source mean / centred points / variance are float32 (`released_umeyama`). The
  project's `flashportrait.face.align.align_face` (all float64) is within tolerance but not identical
  (matrix up to 3e-5, crop pixels off by one level), so `five_point_crop` reuses only its template
  (`template_points`); with `released_umeyama` every golden `warp_matrix` (<= 3e-14) and crop byte matches.
* Diagnostics `area_margin` (min relative area gap over overlapping pairs of the tracks updated this
  frame, float32 arithmetic), `min_face_margin` (min |side - 96| px over updated tracks) and
  `select_margin` (relative gap between the two largest surviving faces) reproduce the golden columns.
"""

from __future__ import annotations

import hashlib
import math
import os
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from flashportrait.face.released_ops import (
    DET_INPUT_H,
    DET_INPUT_W,
    DET_REG_MAX,
    DET_STRIDES,
    EYE_LEFT,
    EYE_RIGHT,
    FACE_SCORE_THRESHOLD,
    FIVE_POINT_INDEX,
    LMK_CROP,
    LMK_ITERATIONS,
    MIN_FACE_SIZE,
    NUM_POINTS,
    OVERLAP_IOU,
    Smoother222,
    atan2f_numpy,
    atan2f_svml,
    crop_matrix_from_box,
    crop_matrix_from_points,
    decode_detections,
    detector_input,
    five_point_crop,
    hard_nms,
    letterbox_matrix,
    one_euro_step,
    pdfgc_input,
    released_umeyama,
    softmax,
)
from flashportrait.face.tracking import NoFaceError, frame_ranges

__all__ = [
    "ReleasedFaceTracker",
    "ReleasedTrackResult",
    "released_pairing",
    "five_point_crop",
    "released_umeyama",
    "pdfgc_input",
    "usable_frame_count",
    "atan2f_svml",
    "softmax",
    "letterbox_matrix",
    "decode_detections",
    "hard_nms",
    "crop_matrix_from_box",
    "crop_matrix_from_points",
    "one_euro_step",
    "Smoother222",
    "FIVE_POINT_INDEX",
    "RECORD_KEYS",
]

#: per-pass record keys (prefix "p1_" / "p2_"), as in the golden files
RECORD_KEYS = (
    "visited",
    "found",
    "used_pre_rect",
    "fresh",
    "tracks_before",
    "num_faces",
    "det_count",
    "det_boxes",
    "det_scores",
    "rect",
    "landmarks",
    "raw_landmarks",
    "crop_matrix",
    "euler",
    "prob",
    "face_dis_in",
    "face_dis_next",
    "area_margin",
    "min_face_margin",
    "select_margin",
    "del_prob",
    "del_small",
    "del_overlap",
)
MAX_RECORDED_DETECTIONS = 4

# --- tracks ----------------------------------------------------------------------------------------------
@dataclass
class _Track:
    rect: np.ndarray  # [4] x1, y1, x2, y2 (int32 detector box, float32 rect)
    face_dis: Any
    landmarks: np.ndarray | None = None
    smoother: Smoother222 = field(default_factory=Smoother222)
    fresh: bool = True
    raw_landmarks: np.ndarray | None = None
    crop_matrix: np.ndarray | None = None
    euler: tuple = ()
    prob: Any = None
    face_dis_in: Any = None


def _diagonal(rect: np.ndarray) -> Any:
    w, h = rect[2] - rect[0], rect[3] - rect[1]
    return np.sqrt(w * w + h * h)


def _area(rect: np.ndarray) -> Any:
    return (rect[2] - rect[0]) * (rect[3] - rect[1])


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    """Plain IoU of two corner-form rects (no +1), 0 when they do not intersect."""
    w = min(a[2], b[2]) - max(a[0], b[0])
    h = min(a[3], b[3]) - max(a[1], b[1])
    if w <= 0 or h <= 0:
        return 0.0
    inter = w * h
    return inter / (_area(a) + _area(b) - inter)


# --- result ------------------------------------------------------------------------------------------------
@dataclass
class ReleasedTrackResult:
    """Per-frame output of `ReleasedFaceTracker.track` (one row per input frame, never dropped).

    Attributes:
        landmarks: float32 [N, 222, 2] pass-2 smoothed landmarks, frame pixels (x, y); NaN rows where
            pass 2 found no face or pass 1 dropped the frame.
        found: bool [N], pass 2 returned a face for the frame.
        five_points: float32 [N, 5, 2] = landmarks[:, FIVE_POINT_INDEX] (NaN where not found).
        records: per-frame debug records keyed like the golden files: "p1_<key>" / "p2_<key>" for
            every key of RECORD_KEYS (uint8 flags, int32 counts/boxes, float32/float64 values as in the
            goldens; NaN / -1 / 0 where the pass did not visit the frame or found no face).
        pass1_rects: float32 [K, 4] pass-1 rects of the frames pass 1 kept (the authors' 3rd result).
        pass1_frame_index: int64 [K] frames pass 1 kept.
        landmark_frame_index: int64 [M] frames pass 2 kept (the authors' landmark list order).
        source: name used in messages.
    """

    landmarks: np.ndarray
    found: np.ndarray
    five_points: np.ndarray
    records: dict[str, np.ndarray]
    pass1_rects: np.ndarray
    pass1_frame_index: np.ndarray
    landmark_frame_index: np.ndarray
    source: str = "video"

    @property
    def num_frames(self) -> int:
        return int(len(self.found))

    @property
    def released_landmarks(self) -> np.ndarray:
        """float32 [M, 222, 2]: what the authors' `det_landmarks` returns (found frames only)."""
        return self.landmarks[self.landmark_frame_index]


def released_pairing(result: ReleasedTrackResult) -> tuple[np.ndarray, np.ndarray]:
    """The authors' `zip(frames, landmarks)` pairing (section 0 step 4, section 6.1).

    Returns:
        (warp_frame_index int64 [P], warp_landmark_frame_index int64 [P]), P = min(N, M): pair i warps
        frame i with the landmarks of frame `warp_landmark_frame_index[i]`; the two differ after the
        first frame pass 2 dropped, and frames P..N-1 get no feature at all.
    """
    kept = np.asarray(result.landmark_frame_index, dtype=np.int64)
    p = min(result.num_frames, len(kept))
    return np.arange(p, dtype=np.int64), kept[:p].copy()


def usable_frame_count(num_frames: int) -> int:
    """The authors' frame budget: the largest n <= num_frames with n % 4 == 1 (0 if none)."""
    if num_frames < 1:
        return 0
    return num_frames - ((num_frames - 1) % 4)



# --- the tracker ---------------------------------------------------------------------------------------------
def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _static_dims_match(shape: Sequence[Any], expected: Sequence[int]) -> bool:
    if len(shape) != len(expected):
        return False
    return all(not isinstance(d, int) or d == e for d, e in zip(shape, expected))


FramesArg = Iterable[np.ndarray] | Callable[[], Iterable[np.ndarray]]


class ReleasedFaceTracker:
    """The authors' face tracker on their two ONNX models (CPU execution provider).

    Args:
        det_model_path: `face_det.onnx` (input [1, 3, 272, 160], six outputs, section 1).
        landmark_model_path: `face_landmark.onnx` (input [1, 3, 128, 128], outputs landmark [1, 444],
            euler [1, >= 2], prob [1, 1], section 2).
        atan2: "svml" (default; bit-exact with the reference run on an AVX-512 machine, see the module
            docstring) or "numpy" (the local float32 `np.arctan2`).
        intra_op_num_threads: onnxruntime threads (None: onnxruntime's default; results do not depend on it).

    Raises:
        FileNotFoundError: a model file is missing.
        ValueError: a model does not load, fails `onnx.checker` (only checked when the `onnx` package is
            importable), or does not have the documented inputs / outputs.
    """

    def __init__(
        self,
        det_model_path: str | os.PathLike,
        landmark_model_path: str | os.PathLike,
        *,
        atan2: str = "svml",
        intra_op_num_threads: int | None = None,
    ) -> None:
        self.det_model_path = Path(det_model_path)
        self.landmark_model_path = Path(landmark_model_path)
        if atan2 not in ("svml", "numpy"):
            raise ValueError(f"atan2 must be 'svml' or 'numpy', got {atan2!r}")
        self.atan2_mode = atan2
        self._atan2 = atan2f_svml if atan2 == "svml" else atan2f_numpy
        self._det = self._load(self.det_model_path, "face detector", intra_op_num_threads)
        self._lmk = self._load(self.landmark_model_path, "landmark model", intra_op_num_threads)
        self._check_detector()
        self._check_landmark_model()
        self._det_input = self._det.get_inputs()[0].name
        self.tracks: list[_Track] = []
        self._hash_cache: dict[tuple, str] = {}

    # -- model loading -------------------------------------------------------------------------------
    @staticmethod
    def _load(path: Path, what: str, threads: int | None) -> Any:
        if not path.is_file():
            raise FileNotFoundError(f"{what} ONNX file not found: {path}")
        try:
            import onnx  # optional: the authors run onnx.checker before creating the session
        except ImportError:
            onnx = None
        if onnx is not None:
            try:
                onnx.checker.check_model(str(path))
            except Exception as exc:  # noqa: BLE001 - any checker failure rejects the model
                raise ValueError(f"{what} {path} fails onnx.checker: {exc}") from exc
        import onnxruntime as ort

        options = ort.SessionOptions()
        if threads is not None:
            options.intra_op_num_threads = int(threads)
        try:
            return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        except Exception as exc:  # noqa: BLE001
            raise ValueError(f"{what} {path} cannot be loaded by onnxruntime: {exc}") from exc

    def _check_detector(self) -> None:
        path = self.det_model_path
        inputs, outputs = self._det.get_inputs(), self._det.get_outputs()
        if len(inputs) != 1 or not _static_dims_match(inputs[0].shape, (1, 3, DET_INPUT_H, DET_INPUT_W)):
            raise ValueError(
                f"face detector {path}: expected one input [1, 3, {DET_INPUT_H}, {DET_INPUT_W}], got "
                f"{[(i.name, i.shape) for i in inputs]}"
            )
        if inputs[0].type != "tensor(float)":
            raise ValueError(f"face detector {path}: input must be float32, got {inputs[0].type}")
        if len(outputs) != 2 * len(DET_STRIDES):
            raise ValueError(
                f"face detector {path}: expected 6 outputs (3 score maps, 3 box distributions), got "
                f"{[(o.name, o.shape) for o in outputs]}"
            )
        for level, stride in enumerate(DET_STRIDES):
            cells = math.ceil(DET_INPUT_H / stride) * (DET_INPUT_W // stride)
            for o, per_cell in ((outputs[level], None), (outputs[len(DET_STRIDES) + level], 4 * (DET_REG_MAX + 1))):
                dims = [d for d in o.shape]
                if all(isinstance(d, int) for d in dims):
                    size = int(np.prod(dims)) if dims else 1
                    ok = size % cells == 0 if per_cell is None else size == cells * per_cell
                    if not ok:
                        raise ValueError(
                            f"face detector {path}: output {o.name} {o.shape} does not fit stride {stride} "
                            f"({cells} cells{'' if per_cell is None else f' x {per_cell}'})"
                        )

    def _check_landmark_model(self) -> None:
        path = self.landmark_model_path
        inputs, outputs = self._lmk.get_inputs(), self._lmk.get_outputs()
        if len(inputs) != 1 or not _static_dims_match(inputs[0].shape, (1, 3, LMK_CROP, LMK_CROP)):
            raise ValueError(
                f"landmark model {path}: expected one input [1, 3, {LMK_CROP}, {LMK_CROP}], got "
                f"{[(i.name, i.shape) for i in inputs]}"
            )
        if len(outputs) != 3:
            raise ValueError(
                f"landmark model {path}: expected exactly 3 outputs (landmark, euler, prob), got "
                f"{[(o.name, o.shape) for o in outputs]}"
            )
        for o, n, what in ((outputs[0], 2 * NUM_POINTS, "landmark"), (outputs[2], 1, "prob")):
            dims = o.shape
            if all(isinstance(d, int) for d in dims) and dims and int(np.prod(dims[1:])) != n:
                raise ValueError(f"landmark model {path}: output {what} {o.name} {dims} must hold {n} value(s) per row")
        dims = outputs[1].shape
        if all(isinstance(d, int) for d in dims) and (len(dims) < 2 or dims[-1] < 2):
            raise ValueError(f"landmark model {path}: output euler {outputs[1].name} {dims} needs pitch and yaw")
        self._lmk_input = inputs[0].name
        self._lmk_outputs = [o.name for o in outputs]

    def identity(self) -> str:
        """Cache key of the two models: "released-face-tracker|<path>:<size>:<sha256>|<path>:...|atan2=<mode>".

        Re-hashed whenever a file's size or modification time changes, so it follows edits of the files.
        """
        parts = []
        for p in (self.det_model_path, self.landmark_model_path):
            st = p.stat()
            key = (str(p.resolve()), st.st_size, st.st_mtime_ns)
            digest = self._hash_cache.get(key)
            if digest is None:
                digest = self._hash_cache[key] = _sha256(p)
            parts.append(f"{key[0]}:{st.st_size}:{digest}")
        return "released-face-tracker|" + "|".join(parts) + f"|atan2={self.atan2_mode}"

    # -- detector (section 1) ------------------------------------------------------------------------
    def detect(self, frame_bgr: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Faces of one uint8 BGR frame: (boxes int32 [K, 4] frame pixels, scores float32 [K])."""
        x, matrix = detector_input(frame_bgr)
        outputs = self._det.run(None, {self._det_input: x})
        return decode_detections(outputs, matrix, frame_bgr.shape[:2])

    # -- landmarks (sections 2-3) ----------------------------------------------------------------------
    def _eye_angle(self, pts: np.ndarray) -> np.float32:
        """Eye-corner angle atan2(p96.y - p74.y, p96.x - p74.x + 1e-8), radians, float32."""
        return self._atan2(pts[EYE_RIGHT, 1] - pts[EYE_LEFT, 1], pts[EYE_RIGHT, 0] - pts[EYE_LEFT, 0] + 1e-8)

    def _landmarks_in_crop(self, frame_bgr: np.ndarray, matrix: np.ndarray):
        crop = cv2.warpAffine(
            frame_bgr,
            matrix,
            (LMK_CROP, LMK_CROP),
            flags=cv2.INTER_LINEAR,
            borderMode=cv2.BORDER_CONSTANT,
            borderValue=(0, 0, 0),
        )
        x = np.ascontiguousarray((crop.astype(np.float32) / 255).transpose(2, 0, 1)[None])
        landmark, euler, prob = self._lmk.run(self._lmk_outputs, {self._lmk_input: x})
        pts_crop = np.asarray(landmark)[0].reshape(2, NUM_POINTS).T * LMK_CROP
        roll = self._eye_angle(pts_crop)
        inv = cv2.invertAffineTransform(matrix)
        pts = cv2.transform(np.ascontiguousarray(pts_crop, dtype=np.float32)[None], inv)[0]
        euler = np.asarray(euler)
        return pts, (euler[0, 0], euler[0, 1], roll), np.asarray(prob)[0], crop

    def align(self, frame_bgr: np.ndarray, box: np.ndarray | None = None, points: np.ndarray | None = None):
        """One alignment call, 3 iterations (section 3), from a box or from previous points.

        Returns:
            (points float32 [222, 2] frame pixels, (pitch, yaw, roll) float32 radians, prob [1],
             crop matrix float64 [2, 3] of the last iteration, last 128x128 crop uint8 BGR).
        """
        if points is not None:
            matrix = crop_matrix_from_points(points, np.degrees(self._eye_angle(points)))
        elif box is not None:
            matrix = crop_matrix_from_box(box)
        else:
            raise ValueError("align needs a box or previous points")
        pts, euler, prob, crop = self._landmarks_in_crop(frame_bgr, matrix)
        for _ in range(LMK_ITERATIONS - 1):
            # the angle is the previous call's roll, measured in the previous crop (section 6.4)
            matrix = crop_matrix_from_points(pts, np.degrees(euler[2]))
            pts, euler, prob, crop = self._landmarks_in_crop(frame_bgr, matrix)
        return pts, euler, prob, matrix, crop

    # -- tracker (section 4) ------------------------------------------------------------------------------
    def reset(self) -> None:
        """Clear the track list."""
        self.tracks = []

    def forward(self, frame_bgr: np.ndarray, pre_rect: np.ndarray | None = None) -> tuple[list[_Track], dict[str, Any]]:
        """One tracker step (`FaceModel.forward`).

        Returns:
            (surviving tracks in list order, per-frame record dict: used_pre_rect, det_boxes, det_scores,
             tracks_before, del_prob, del_small, del_overlap, area_margin, min_face_margin).
        """
        rec: dict[str, Any] = {
            "used_pre_rect": False,
            "det_boxes": np.zeros((0, 4), np.int32),
            "det_scores": np.zeros((0,), np.float32),
        }
        for t in self.tracks:
            t.fresh = False
        if not self.tracks and pre_rect is not None:
            rect = np.asarray(pre_rect)
            self.tracks.append(_Track(rect=rect, face_dis=_diagonal(rect)))
            rec["used_pre_rect"] = True
        else:
            boxes, scores = self.detect(frame_bgr)
            rec["det_boxes"], rec["det_scores"] = boxes, scores
            for box in boxes:
                self.tracks.append(_Track(rect=box, face_dis=_diagonal(box)))
        tracks = self.tracks
        rec["tracks_before"] = len(tracks)
        marked = [False] * len(tracks)
        prob_deleted: set[int] = set()
        del_prob = del_small = del_overlap = 0
        min_face_margin = math.inf
        for i, t in enumerate(tracks):
            if t.landmarks is not None:
                pts, euler, prob, matrix, _ = self.align(frame_bgr, points=t.landmarks)
            else:
                pts, euler, prob, matrix, _ = self.align(frame_bgr, box=t.rect)
            if prob < FACE_SCORE_THRESHOLD:
                marked[i] = True
                prob_deleted.add(i)
                del_prob += 1
                continue
            t.face_dis_in = t.face_dis
            smoothed = t.smoother(pts, t.face_dis)
            t.landmarks = smoothed
            t.raw_landmarks, t.crop_matrix, t.euler, t.prob = pts, matrix, euler, prob
            t.rect = np.concatenate([smoothed.min(axis=0), smoothed.max(axis=0)])
            p0, p32 = smoothed[0], smoothed[32]
            diff = p0 - p32
            t.face_dis = np.sqrt((diff * diff).sum()) * (
                1 + (np.abs(np.degrees(euler[0])) + 0.6 * np.abs(np.degrees(euler[1]))) / 18
            )
            w, h = t.rect[2] - t.rect[0], t.rect[3] - t.rect[1]
            min_face_margin = min(min_face_margin, abs(float(w) - MIN_FACE_SIZE), abs(float(h) - MIN_FACE_SIZE))
            if w < MIN_FACE_SIZE or h < MIN_FACE_SIZE:
                marked[i] = True
                del_small += 1
        area_margin = math.inf  # diagnostic: relative area gap of overlapping, updated tracks
        updated = [i for i in range(len(tracks)) if i not in prob_deleted]
        for a, i in enumerate(updated):
            for j in updated[a + 1 :]:
                ri, rj = tracks[i].rect, tracks[j].rect
                if _iou(ri, rj) > OVERLAP_IOU:
                    ai, aj = _area(ri), _area(rj)
                    area_margin = min(area_margin, float(abs(ai - aj) / max(ai, aj)))
        if len(tracks) > 1:
            for i in range(len(tracks)):
                if marked[i]:
                    continue
                for j in range(len(tracks)):
                    if i == j or marked[j]:
                        continue
                    ri, rj = tracks[i].rect, tracks[j].rect
                    if _iou(ri, rj) > OVERLAP_IOU:
                        ai, aj = _area(ri), _area(rj)
                        if ai < aj:
                            marked[i] = True
                        else:
                            marked[j] = True
                        del_overlap += 1
        self.tracks = [t for t, m in zip(tracks, marked) if not m]
        rec.update(
            del_prob=del_prob,
            del_small=del_small,
            del_overlap=del_overlap,
            area_margin=area_margin,
            min_face_margin=min_face_margin,
        )
        return self.tracks, rec

    # -- the two passes (section 4, det_landmarks) ----------------------------------------------------------
    def track(
        self, frames_bgr: FramesArg, *, source: str = "video", raise_on_no_face: bool = True
    ) -> ReleasedTrackResult:
        """Run the authors' two passes over a video.

        Args:
            frames_bgr: uint8 [H, W, 3] BGR frames, either a re-iterable sequence (list, array) or a
                zero-argument callable returning a fresh iterator over the same frames (preferred for long
                videos: pass 1 and pass 2 each stream the frames once, nothing is kept in memory). A one-shot
                iterator is materialised into a list.
            source: name used in error messages.
            raise_on_no_face: raise `NoFaceError` when pass 1 or pass 2 keeps no frame (the authors'
                `AssertionError`, section 6.2); False returns the (all-NaN) result instead.

        Returns:
            `ReleasedTrackResult` with one row per input frame.

        Raises:
            NoFaceError: no face in any frame (message names `source` and the frame count); the exception's
                `result` attribute holds the per-frame records.
            ValueError: a frame is not uint8 HxWx3, or the frame factory yields a different count in pass 2.
        """
        factory = self._frame_factory(frames_bgr)
        rows: dict[str, list] = {"p1": [], "p2": []}
        p1_rects: list[np.ndarray] = []
        p1_index: list[int] = []

        # pass 1: detector + tracker on every frame; frames without a face are dropped
        self.reset()
        n = 0
        for i, frame in enumerate(factory()):
            self._check_frame(frame, i, source)
            faces, rec = self.forward(frame)
            chosen = self._largest(faces)
            rows["p1"].append(self._snapshot(rec, chosen, faces))
            if chosen is not None:
                p1_rects.append(chosen.rect.copy())
                p1_index.append(i)
            n = i + 1
        # pass 2: the kept frames again, seeding an empty track list with the pass-1 rect
        self.reset()
        p2_index: list[int] = []
        rows["p2"] = [None] * n
        if p1_index:
            k = 0
            seen = 0
            for i, frame in enumerate(factory()):
                seen = i + 1
                if k >= len(p1_index) or i != p1_index[k]:
                    continue
                faces, rec = self.forward(frame, pre_rect=p1_rects[k])
                chosen = self._largest(faces)
                rows["p2"][i] = self._snapshot(rec, chosen, faces)
                if chosen is not None:
                    p2_index.append(i)
                k += 1
            if seen != n:
                raise ValueError(f"{source}: the frame source gave {n} frames in pass 1 but {seen} in pass 2")
        self.reset()

        result = self._assemble(n, rows, p1_rects, p1_index, p2_index, source)
        if raise_on_no_face and not p2_index:
            if not p1_index:
                msg = f"{source}: no face found in any of its {n} frames (released face tracker, pass 1)."
            else:
                msg = (
                    f"{source}: pass 1 kept {len(p1_index)} of {n} frames ({frame_ranges(p1_index)}) but pass 2 "
                    "found no face in any of them (released face tracker)."
                )
            err = NoFaceError(msg)
            err.result = result  # type: ignore[attr-defined]
            raise err
        return result

    @staticmethod
    def _snapshot(rec: dict[str, Any], chosen: _Track | None, faces: list[_Track]) -> dict[str, Any]:
        """Copy what the records need now: track objects keep changing on later frames."""
        rec = dict(rec, num_faces=len(faces), chosen=None, select_margin=math.nan)
        if chosen is not None:
            rec["chosen"] = {
                "fresh": chosen.fresh,
                "rect": chosen.rect.copy(),
                "landmarks": chosen.landmarks.copy(),
                "raw_landmarks": chosen.raw_landmarks.copy(),
                "crop_matrix": chosen.crop_matrix.copy(),
                "euler": tuple(chosen.euler),
                "prob": np.asarray(chosen.prob).reshape(-1)[0],
                "face_dis_in": chosen.face_dis_in,
                "face_dis_next": chosen.face_dis,
            }
        if len(faces) > 1:
            areas = sorted((_area(t.rect) for t in faces), reverse=True)
            rec["select_margin"] = float((areas[0] - areas[1]) / areas[0])
        return rec

    @staticmethod
    def _largest(faces: list[_Track]) -> _Track | None:
        """Largest rect area; on equal areas the later track (stable ascending sort, take the last)."""
        if not faces:
            return None
        return sorted(faces, key=lambda t: _area(t.rect))[-1]

    @staticmethod
    def _frame_factory(frames: FramesArg) -> Callable[[], Iterator[np.ndarray]]:
        if callable(frames) and not isinstance(frames, np.ndarray):
            return lambda: iter(frames())
        if isinstance(frames, (np.ndarray, Sequence)):
            return lambda: iter(frames)
        cached = list(frames)  # one-shot iterator: keep the frames for pass 2
        return lambda: iter(cached)

    @staticmethod
    def _check_frame(frame: np.ndarray, index: int, source: str) -> None:
        if not isinstance(frame, np.ndarray) or frame.dtype != np.uint8 or frame.ndim != 3 or frame.shape[2] != 3:
            desc = f"{frame.shape} {frame.dtype}" if isinstance(frame, np.ndarray) else type(frame).__name__
            raise ValueError(f"{source}: frame {index} must be uint8 [H, W, 3] BGR, got {desc}")

    def _assemble(self, n, rows, p1_rects, p1_index, p2_index, source) -> ReleasedTrackResult:
        records: dict[str, np.ndarray] = {"frame_index": np.arange(n, dtype=np.int64)}
        for p in ("p1", "p2"):
            r = _empty_records(n)
            for i, row in enumerate(rows[p]):
                if row is None:
                    continue
                rec = row
                r["visited"][i] = 1
                r["used_pre_rect"][i] = rec["used_pre_rect"]
                k = len(rec["det_boxes"])
                r["det_count"][i] = k
                m = min(k, MAX_RECORDED_DETECTIONS)
                r["det_boxes"][i, :m] = rec["det_boxes"][:m]
                r["det_scores"][i, :m] = rec["det_scores"][:m]
                for key in ("tracks_before", "num_faces", "del_prob", "del_small", "del_overlap"):
                    r[key][i] = rec[key]
                for key in ("area_margin", "min_face_margin", "select_margin"):
                    if math.isfinite(rec[key]):
                        r[key][i] = rec[key]
                c = rec["chosen"]
                if c is None:
                    continue
                r["found"][i] = 1
                for key in (
                    "fresh",
                    "rect",
                    "landmarks",
                    "raw_landmarks",
                    "crop_matrix",
                    "euler",
                    "prob",
                    "face_dis_in",
                    "face_dis_next",
                ):
                    r[key][i] = c[key]
            for key, value in r.items():
                records[f"{p}_{key}"] = value
        landmarks = np.full((n, NUM_POINTS, 2), np.nan, dtype=np.float32)
        found = np.zeros(n, dtype=bool)
        if p2_index:
            landmarks[p2_index] = records["p2_landmarks"][p2_index]
            found[p2_index] = True
        five = landmarks[:, list(FIVE_POINT_INDEX)].copy()
        rects = np.asarray(p1_rects, dtype=np.float32).reshape(-1, 4)
        return ReleasedTrackResult(
            landmarks=landmarks,
            found=found,
            five_points=five,
            records=records,
            pass1_rects=rects,
            pass1_frame_index=np.asarray(p1_index, dtype=np.int64),
            landmark_frame_index=np.asarray(p2_index, dtype=np.int64),
            source=source,
        )


def _empty_records(n: int) -> dict[str, np.ndarray]:
    nan32, nan64 = np.float32(np.nan), np.nan
    return {
        "visited": np.zeros(n, np.uint8),
        "found": np.zeros(n, np.uint8),
        "used_pre_rect": np.zeros(n, np.uint8),
        "fresh": np.zeros(n, np.uint8),
        "tracks_before": np.zeros(n, np.int32),
        "num_faces": np.zeros(n, np.int32),
        "det_count": np.zeros(n, np.int32),
        "det_boxes": np.full((n, MAX_RECORDED_DETECTIONS, 4), -1, np.int32),
        "det_scores": np.full((n, MAX_RECORDED_DETECTIONS), -1, np.float32),
        "rect": np.full((n, 4), nan64),
        "landmarks": np.full((n, NUM_POINTS, 2), nan32, np.float32),
        "raw_landmarks": np.full((n, NUM_POINTS, 2), nan32, np.float32),
        "crop_matrix": np.full((n, 2, 3), nan64),
        "euler": np.full((n, 3), nan32, np.float32),
        "prob": np.full(n, nan32, np.float32),
        "face_dis_in": np.full(n, nan64),
        "face_dis_next": np.full(n, nan64),
        "area_margin": np.full(n, nan64),
        "min_face_margin": np.full(n, nan64),
        "select_margin": np.full(n, nan64),
        "del_prob": np.zeros(n, np.int32),
        "del_small": np.zeros(n, np.int32),
        "del_overlap": np.zeros(n, np.int32),
    }
