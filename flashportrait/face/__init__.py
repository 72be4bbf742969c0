"""Face detection, tracking over a video, and alignment onto the PD-FGC 224x224 template."""

from flashportrait.face.align import (
    align_face,
    estimate_alignment,
    template_points,
    to_model_input,
    transform_points,
    umeyama,
)
from flashportrait.face.detector import (
    FaceDetection,
    FaceDetector,
    RetinaFaceDetector,
    available_detectors,
    create_detector,
    register_detector,
)
from flashportrait.face.tracking import FaceTrack, FaceTrackingError, NoFaceError, track_face

__all__ = [
    "FaceDetection",
    "FaceDetector",
    "RetinaFaceDetector",
    "available_detectors",
    "create_detector",
    "register_detector",
    "FaceTrack",
    "FaceTrackingError",
    "NoFaceError",
    "track_face",
    "align_face",
    "estimate_alignment",
    "template_points",
    "to_model_input",
    "transform_points",
    "umeyama",
]
