"""Numerical pieces of the authors' face tracker, ported exactly (FACE_TRACKER.md sections 1-5).

The detector input and decoding of `face_det.onnx` (section 1), the 128x128 crop matrices of the landmark
model (section 3), the one-euro smoother (section 4), numpy's SVML float32 atan2 (section 6.8) and the
5-point PD-FGC crop (section 5). `flashportrait.face.released_tracker` assembles them into the tracker;
see its docstring for where the golden data decided what the document left open.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from typing import Any

import cv2
import numpy as np

from flashportrait.face.align import template_points

# --- constants (FACE_TRACKER.md sections 1-5) --------------------------------------------------------
DET_INPUT_H, DET_INPUT_W = 272, 160
DET_MEAN = np.array([103.53, 116.28, 123.675], dtype=np.float32)  # B, G, R
DET_STD = np.array([57.375, 57.12, 58.395], dtype=np.float32)
DET_STRIDES = (8, 16, 32)
DET_REG_MAX = 7
DET_TOP_K_PER_LEVEL = 1000
DET_SCORE_THRESHOLD = 0.4
DET_NMS_IOU = 0.3
DET_NMS_CANDIDATES = 200

LMK_CROP = 128
LMK_EXPAND = 0.15
LMK_ITERATIONS = 3
NUM_POINTS = 222
EYE_LEFT, EYE_RIGHT = 74, 96  # eye corners used for every angle

FACE_SCORE_THRESHOLD = 1e-4
MIN_FACE_SIZE = 96
OVERLAP_IOU = 0.12

#: landmarks used for the PD-FGC crop: left pupil, right pupil, nose tip, image-left / image-right mouth corner
FIVE_POINT_INDEX = (182, 202, 36, 149, 133)
PDFGC_CROP = 224

#: smoother groups: (filtered points, measured points, lo, v_lo, v_hi); the upper threshold is 0.02 for all
SMOOTH_HI = 0.02
SMOOTH_GROUPS = (
    (slice(0, 33), slice(9, 24), 0.005, 0.05, 0.3),  # contour, measured on its lower part 9-23
    (slice(33, 48), None, 0.003, 0.03, 0.7),  # nose
    (slice(48, 74), None, 0.003, 0.02, 0.5),  # eyebrows
    (slice(74, 96), None, 0.003, 0.03, 0.7),  # left eye
    (slice(96, 118), None, 0.003, 0.03, 0.7),  # right eye
    (slice(118, 182), None, 0.003, 0.05, 0.7),  # mouth
    (slice(182, 202), None, 0.003, 0.03, 0.7),  # left pupil
    (slice(202, 222), None, 0.003, 0.03, 0.7),  # right pupil
)

_F32 = np.float32


# --- float32 atan2 as numpy computes it with Intel SVML (section 2 "roll", section 6.8) ---------------
def _f32_bits(u: int) -> np.float32:
    return np.array([u], dtype=np.uint32).view(np.float32)[0]


# coefficients of the odd polynomial atan(s) ~ s * (B(s^4) + s^2 A(s^4)), |s| <= 1, and pi/2, pi (float32)
_ATAN_A = tuple(float(_f32_bits(u)) for u in (3162449457, 3180885545, 3188810232, 3198855753))
_ATAN_B = tuple(float(_f32_bits(u)) for u in (993144000, 1026278276, 1037657204, 1045215135, 1065353216))
_PI_2 = float(_f32_bits(1070141403))
_PI = float(_f32_bits(1078530011))


def _round_f32(s: float, err: float) -> float:
    """Round the exact value `s + err` (float64 `s`, tiny float64 `err`) to float32, ties to even."""
    r = _F32(s)
    rf = float(r)
    if err != 0.0 and rf != s:
        other = float(np.nextafter(r, _F32(np.inf) if s > rf else _F32(-np.inf)))
        if (rf + other) / 2.0 == s:  # s sits exactly between two float32 values: err decides
            r = _F32(max(rf, other) if err > 0 else min(rf, other))
    return float(r)


def _fma32(a: float, b: float, c: float) -> float:
    """Single-precision fused multiply-add round32(a * b + c) for float32-valued inputs."""
    p = a * b  # exact: two 24-bit significands fit in 53 bits
    s = p + c
    bp = s - p
    err = (p - (s - bp)) + (c - bp)  # exact rounding error of the float64 sum (TwoSum)
    return _round_f32(s, err)


def _mul32(a: float, b: float) -> float:
    return float(_F32(a * b))  # a * b is exact in float64; one rounding to float32


def atan2f_svml(y: Any, x: Any) -> np.float32:
    """float32 `atan2(y, x)` with the results of numpy's AVX-512 (Intel SVML) float32 `arctan2`.

    Args:
        y, x: float32 scalars (anything `np.float32` accepts).

    Returns:
        np.float32 angle in radians, in [-pi, pi].

    Reduction to |s| <= 1 (s = |y|/|x|, or -|x|/|y| with pi/2 added), division by a reciprocal refined
    with one Newton step plus one correction step, odd polynomial of degree 11 evaluated with FMAs,
    then the quadrant fix-up (negate for x < 0, add pi for x <= 0, copy the sign of y).
    Zero, infinite and NaN arguments use `np.arctan2` (the original's special-case path agrees with it);
    so do values of extreme magnitude (|v| < ~1e-35 or > ~1e37), which the original also hands to a scalar
    path.
    """
    y32, x32 = _F32(y), _F32(x)
    if not all(np.isfinite(v) and 1e-35 < abs(float(v)) < 1e37 for v in (y32, x32)):
        return _F32(np.arctan2(y32, x32))
    ay, ax = abs(float(y32)), abs(float(x32))
    if ay < ax:
        a, b, base = ay, ax, 0.0
    else:
        a, b, base = -ax, ay, _PI_2
    r = float(_F32(1.0) / _F32(b))  # stands in for the hardware reciprocal estimate
    e = _fma32(-r, b, 1.0)
    r = _fma32(e, r, r)
    q = _mul32(a, r)
    rem = _fma32(-q, b, a)
    s = _fma32(rem, r, q)
    s2 = _mul32(s, s)
    s4 = _mul32(s2, s2)
    pb = _fma32(_ATAN_B[0], s4, _ATAN_B[1])
    pb = _fma32(s4, pb, _ATAN_B[2])
    pa = _fma32(_ATAN_A[0], s4, _ATAN_A[1])
    pa = _fma32(s4, pa, _ATAN_A[2])
    pb = _fma32(s4, pb, _ATAN_B[3])
    pa = _fma32(s4, pa, _ATAN_A[3])
    pb = _fma32(s4, pb, _ATAN_B[4])
    pa = _fma32(s2, pa, pb)
    res = _fma32(s, pa, base)
    if x32 < 0:
        res = float(_F32(-res + _PI))
    if y32 < 0:
        res = -abs(res)
    return _F32(res)


def atan2f_numpy(y: Any, x: Any) -> np.float32:
    return _F32(np.arctan2(_F32(y), _F32(x)))


# --- detector (section 1) ----------------------------------------------------------------------------
def softmax(x: np.ndarray, axis: int = -1) -> np.ndarray:
    """`scipy.special.softmax` (same operations, same dtype): exp(x - max) / sum(exp(x - max))."""
    e = np.exp(x - np.amax(x, axis=axis, keepdims=True))
    return e / np.sum(e, axis=axis, keepdims=True)


def letterbox_matrix(height: int, width: int) -> np.ndarray:
    """float64 [3, 3] matrix taking frame pixels to the 160x272 detector input (section 1, "Letterbox").

    Translate the frame centre (W/2, H/2) to the origin, scale by r = min(160/W, 272/H), translate to
    (80, 136).
    """
    r = min(DET_INPUT_W / width, DET_INPUT_H / height)
    to_origin = np.array([[1.0, 0.0, -width / 2], [0.0, 1.0, -height / 2], [0.0, 0.0, 1.0]])
    scale = np.array([[r, 0.0, 0.0], [0.0, r, 0.0], [0.0, 0.0, 1.0]])
    to_centre = np.array([[1.0, 0.0, DET_INPUT_W / 2], [0.0, 1.0, DET_INPUT_H / 2], [0.0, 0.0, 1.0]])
    return to_centre @ scale @ to_origin


def detector_input(frame_bgr: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Frame -> (float32 [1, 3, 272, 160] normalised BGR input, float64 [3, 3] letterbox matrix)."""
    h, w = frame_bgr.shape[:2]
    matrix = letterbox_matrix(h, w)
    img = cv2.warpPerspective(
        frame_bgr,
        matrix,
        (DET_INPUT_W, DET_INPUT_H),
        flags=cv2.INTER_LINEAR,
        borderMode=cv2.BORDER_CONSTANT,
        borderValue=(0, 0, 0),
    )
    x = img.astype(np.float32)
    x = (x / 255 - DET_MEAN / 255) / (DET_STD / 255)
    return np.ascontiguousarray(x.transpose(2, 0, 1)[None]), matrix


def hard_nms(
    boxes: np.ndarray, scores: np.ndarray, iou_threshold: float = DET_NMS_IOU, candidate_size: int = DET_NMS_CANDIDATES
) -> np.ndarray:
    """Greedy hard NMS (section 1, step 5).

    Args:
        boxes: float [K, 4] corner-form boxes (x1, y1, x2, y2).
        scores: float [K].
        iou_threshold: a box is dropped when its IoU with a picked box is > this.
        candidate_size: only the `candidate_size` highest scores take part.

    Returns:
        int64 indices of the kept boxes in picking order (descending score).
        IoU = inter / (area_a + area_b - inter + 1e-5), negative sides clamped to 0.
    """
    order = np.argsort(scores)[-candidate_size:]
    picked = []
    while len(order) > 0:
        current = order[-1]
        picked.append(int(current))
        order = order[:-1]
        if len(order) == 0:
            break
        rest = boxes[order]
        cur = boxes[current]
        lt = np.maximum(rest[:, :2], cur[None, :2])
        rb = np.minimum(rest[:, 2:], cur[None, 2:])
        inter = np.clip(rb - lt, 0.0, None).prod(axis=1)
        area_rest = np.clip(rest[:, 2:] - rest[:, :2], 0.0, None).prod(axis=1)
        area_cur = np.clip(cur[2:] - cur[:2], 0.0, None).prod()
        iou = inter / (area_rest + area_cur - inter + 1e-5)
        order = order[iou <= iou_threshold]
    return np.asarray(picked, dtype=np.int64)


def decode_detections(
    outputs: Sequence[np.ndarray], matrix: np.ndarray, frame_hw: tuple[int, int]
) -> tuple[np.ndarray, np.ndarray]:
    """Decode the detector's six outputs (graph order) into frame-pixel boxes (section 1, "Decoding").

    Args:
        outputs: three score maps (strides 8, 16, 32) then three box distributions, any shapes that
            squeeze to [cells] / [cells, classes] and reshape to [cells * 4, 8].
        matrix: float64 [3, 3] letterbox matrix of the frame.
        frame_hw: (H, W) of the frame.

    Returns:
        (boxes int32 [K, 4] (x1, y1, x2, y2) frame pixels, truncated; scores float32 [K]), in NMS picking
        order; K = 0 when no candidate has score > 0.4. Only class 0 is used (single-class detector).
    """
    n_levels = len(DET_STRIDES)
    score_maps = [np.squeeze(o) for o in outputs[:n_levels]]
    if score_maps[0].ndim == 1:
        score_maps = [s[:, None] for s in score_maps]
    all_boxes, all_scores = [], []
    for level, stride in enumerate(DET_STRIDES):
        scores = score_maps[level]
        logits = np.squeeze(outputs[n_levels + level]).reshape(-1, DET_REG_MAX + 1)
        prob = softmax(logits, axis=1)
        dist = (prob * np.arange(DET_REG_MAX + 1)).sum(axis=1).reshape(-1, 4) * stride
        rows, cols = np.arange(DET_INPUT_H / stride), np.arange(DET_INPUT_W / stride)
        yy, xx = np.meshgrid(rows, cols, indexing="ij")
        ax, ay = xx.ravel() * stride, yy.ravel() * stride  # cell top-left corners
        boxes = np.stack([ax - dist[:, 0], ay - dist[:, 1], ax + dist[:, 2], ay + dist[:, 3]], axis=1)
        order = np.argsort(scores.max(axis=1))[::-1][:DET_TOP_K_PER_LEVEL]
        all_boxes.append(boxes[order])
        all_scores.append(scores[order])
    boxes = np.concatenate(all_boxes)
    scores = np.concatenate(all_scores)[:, 0]
    keep = scores > DET_SCORE_THRESHOLD
    boxes, scores = boxes[keep], scores[keep]
    if len(scores) == 0:
        return np.zeros((0, 4), np.int32), np.zeros((0,), np.float32)
    picked = hard_nms(boxes, scores)
    boxes, scores = boxes[picked], scores[picked]
    inv = np.linalg.inv(matrix)
    h, w = frame_hw
    out = np.empty((len(boxes), 4), dtype=np.float64)
    for i, (x1, y1, x2, y2) in enumerate(boxes):
        corners = np.array([[x1, y1, 1.0], [x2, y1, 1.0], [x1, y2, 1.0], [x2, y2, 1.0]])
        mapped = corners @ inv.T
        mapped = mapped[:, :2] / mapped[:, 2:]
        lo, hi = mapped.min(axis=0), mapped.max(axis=0)
        out[i] = [np.clip(lo[0], 0, w), np.clip(lo[1], 0, h), np.clip(hi[0], 0, w), np.clip(hi[1], 0, h)]
    return out.astype(np.int32), scores.astype(np.float32)


# --- 128x128 crops (section 3) -------------------------------------------------------------------------
def crop_matrix_from_box(box: np.ndarray) -> np.ndarray:
    """float64 [2, 3] crop matrix putting the box centre at (64, 64), larger side -> 0.85 * 128 px.

    Args:
        box: [4] (x1, y1, x2, y2) frame pixels; int32 (detector) -> computed in float64, float32 (a
            pass-1 rect) -> centre and scale in float32 (numpy 2 promotion, section 6.8).
    """
    x1, y1, x2, y2 = np.asarray(box)
    cx, cy = (x1 + x2) / 2, (y1 + y2) / 2
    scale = LMK_CROP / max(x2 - x1, y2 - y1) * (1 - LMK_EXPAND)
    m = cv2.getRotationMatrix2D((float(cx), float(cy)), 0, float(scale))
    m[0, 2] += LMK_CROP / 2 - cx
    m[1, 2] += LMK_CROP / 2 - cy
    return m


def crop_matrix_from_points(points: np.ndarray, angle_deg: Any) -> np.ndarray:
    """float64 [2, 3] crop matrix from float32 [222, 2] frame points rotated by `angle_deg` (degrees,
    OpenCV convention: positive = counter-clockwise as seen); the rotated, scaled set is centred at (64, 64).
    """
    pts = np.ascontiguousarray(points, dtype=np.float32)
    centre = (pts.min(axis=0) + pts.max(axis=0)) / 2
    c = (float(centre[0]), float(centre[1]))
    rot = cv2.getRotationMatrix2D(c, float(angle_deg), 1.0)
    rotated = cv2.transform(pts[None], rot)[0]
    extent = rotated.max(axis=0) - rotated.min(axis=0)
    scale = LMK_CROP / max(extent[0], extent[1]) * (1 - LMK_EXPAND)  # float32
    m = cv2.getRotationMatrix2D(c, float(angle_deg), float(scale))
    mapped = cv2.transform(pts[None], m)[0]
    centre2 = (mapped.min(axis=0) + mapped.max(axis=0)) / 2
    m[0, 2] += LMK_CROP / 2 - centre2[0]
    m[1, 2] += LMK_CROP / 2 - centre2[1]
    return m


# --- one-euro smoother (section 4) ---------------------------------------------------------------------
def _smoothing_factor(t_e: Any, cutoff: Any) -> Any:
    r = 2 * math.pi * cutoff * t_e
    return r / (r + 1)


def one_euro_step(
    x: np.ndarray, x_prev: np.ndarray, dx_prev: Any, t_e: Any, beta: Any, min_cutoff: float = 1.0, d_cutoff: float = 1.0
) -> tuple[np.ndarray, Any]:
    """One step of the one-euro filter (elementwise), as the smoother calls it (t_e = beta = v).

    alpha(t, f) = 2 pi f t / (2 pi f t + 1); dx = (x - x_prev) / t;
    dx_hat = alpha(t, d_cutoff) dx + (1 - alpha(t, d_cutoff)) dx_prev; f = min_cutoff + beta |dx_hat|;
    x_hat = alpha(t, f) x + (1 - alpha(t, f)) x_prev.

    Returns:
        (x_hat, dx_hat), in the dtype numpy promotion gives (float32 for float32 inputs).
    """
    a_d = _smoothing_factor(t_e, d_cutoff)
    dx = (x - x_prev) / t_e
    dx_hat = a_d * dx + (1 - a_d) * dx_prev
    cutoff = min_cutoff + beta * np.abs(dx_hat)
    a = _smoothing_factor(t_e, cutoff)
    return a * x + (1 - a) * x_prev, dx_hat


def smoother_time_step(d: Any, lo: float, v_lo: float, v_hi: float, hi: float = SMOOTH_HI) -> Any:
    """Piecewise-linear time step v(d): (0, 0) -> (lo, v_lo) -> (hi, v_hi), constant v_hi beyond hi."""
    if d < lo:
        return d / lo * v_lo
    if d < hi:
        return v_lo + (d - lo) / (hi - lo) * (v_hi - v_lo)
    return v_hi


class Smoother222:
    """Per-track smoother of the 222 points: 8 one-euro filters, one per group (section 4).

    `__call__(points float32 [222, 2], face_dis) -> float32 [222, 2]`: the first call returns the
    points unchanged; later calls filter each group against the previous output with time step
    v = smoother_time_step(mean_k |p_k - prev_k| / face_dis) (displacements in pixels, `face_dis` in
    pixels). The derivative state of each filter starts at 0 and is kept across frames.
    """

    def __init__(self) -> None:
        self.prev: np.ndarray | None = None
        self.dx_prev: list[Any] = [0.0] * len(SMOOTH_GROUPS)

    def __call__(self, points: np.ndarray, face_dis: Any) -> np.ndarray:
        if self.prev is None:
            self.prev = points
            return points
        out = points.copy()
        for g, (sel, measured, lo, v_lo, v_hi) in enumerate(SMOOTH_GROUPS):
            m = sel if measured is None else measured
            disp = points[m] - self.prev[m]
            dist = np.sqrt((disp * disp).sum(axis=1))
            d = np.mean(dist / face_dis)
            v = smoother_time_step(d, lo, v_lo, v_hi)
            if v == 0:
                warnings.warn(
                    "released face tracker: a landmark group did not move at all between two frames; the "
                    "authors' smoother divides 0 by 0 there and the track becomes NaN (FACE_TRACKER.md 6.7)",
                    RuntimeWarning,
                    stacklevel=2,
                )
            with np.errstate(divide="ignore", invalid="ignore"):
                out[sel], self.dx_prev[g] = one_euro_step(points[sel], self.prev[sel], self.dx_prev[g], v, v)
        self.prev = out
        return out



def released_umeyama(src: np.ndarray, dst: np.ndarray) -> np.ndarray:
    """Similarity (rotation, uniform scale, translation, reflection guard) taking `src` onto `dst`,
    with the authors' dtypes (section 5).

    `flashportrait.face.align.umeyama` is the same estimator but casts the points to float64 first. The
    authors pass the float32 landmarks as they are, so under numpy 2 the source mean, the centred source
    points and their variance are float32 (and `1 / variance` is rounded to float32) while the covariance,
    SVD and the matrix are float64; that moves the matrix by up to ~3e-5 and changes some crop pixels by
    one level, hence this port (bit-exact on every golden `warp_matrix`).

    Args:
        src: float [K, 2] points (float32 landmarks for the authors' behaviour).
        dst: float [K, 2] target points (float64).

    Returns:
        float64 [3, 3] homogeneous matrix T with dst ~ T @ [src; 1].
    """
    src = np.asarray(src)
    dst = np.asarray(dst, dtype=np.float64)
    k, dim = src.shape
    src_mean, dst_mean = src.mean(axis=0), dst.mean(axis=0)
    src_c, dst_c = src - src_mean, dst - dst_mean
    cov = dst_c.T @ src_c / k
    sign = np.ones(dim, dtype=np.float64)
    if np.linalg.det(cov) < 0:
        sign[-1] = -1
    u, sing, vt = np.linalg.svd(cov)
    out = np.eye(dim + 1, dtype=np.float64)
    out[:dim, :dim] = u @ np.diag(sign) @ vt
    scale = 1.0 / src_c.var(axis=0).sum() * (sing @ sign)
    out[:dim, dim] = dst_mean - scale * (out[:dim, :dim] @ src_mean)
    out[:dim, :dim] *= scale
    return out


def five_point_crop(frame: np.ndarray, five_points: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """5-point similarity crop for PD-FGC (section 5).

    Args:
        frame: uint8 [H, W, 3], RGB or BGR (the warp is per channel: the crop keeps the frame's order).
        five_points: float [5, 2] frame pixels, landmarks[FIVE_POINT_INDEX] (pupils, nose tip, mouth
            corners); float32 as the tracker returns them for the authors' exact matrix.

    Returns:
        (crop uint8 [224, 224, 3], matrix float64 [2, 3] frame -> crop): `released_umeyama` onto the
        project's template (`flashportrait.face.align.template_points`, the authors' targets) times 224,
        `cv2.warpAffine` bicubic with a black border. The PD-FGC input is the RGB crop as
        float32(u8 / 255 * 2 - 1) (computed in float64), channels first.
    """
    pts = np.asarray(five_points)
    if pts.shape != (5, 2) or not np.all(np.isfinite(pts)):
        raise ValueError(f"five_points must be five finite (x, y) points [5, 2], got {pts.shape}")
    matrix = released_umeyama(pts, template_points(PDFGC_CROP))[:2]
    crop = cv2.warpAffine(
        frame, matrix, (PDFGC_CROP, PDFGC_CROP), flags=cv2.INTER_CUBIC, borderMode=cv2.BORDER_CONSTANT, borderValue=0
    )
    return crop, matrix


def pdfgc_input(crop_rgb: np.ndarray) -> np.ndarray:
    """uint8 [224, 224, 3] RGB crop -> float32 [3, 224, 224] in [-1, 1] (x / 255 * 2 - 1 in float64)."""
    x = np.asarray(crop_rgb, dtype=np.uint8) / 255.0 * 2 - 1
    return np.ascontiguousarray(x.transpose(2, 0, 1)).astype(np.float32)
