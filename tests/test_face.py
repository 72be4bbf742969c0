"""Face detection interface, RetinaFace backend, tracking / interpolation / smoothing, Umeyama alignment."""

from __future__ import annotations

import cv2
import numpy as np
import pytest
import torch

from flashportrait.config import FACE_CROP_SIZE
from flashportrait.face import (
    FaceDetection,
    FaceDetector,
    FaceTrackingError,
    NoFaceError,
    RetinaFaceDetector,
    align_face,
    available_detectors,
    create_detector,
    estimate_alignment,
    register_detector,
    template_points,
    to_model_input,
    track_face,
    transform_points,
    umeyama,
)
from flashportrait.face.detector import _anchors
from flashportrait.face.tracking import frame_ranges


def _similarity(angle_deg: float, scale: float, tx: float, ty: float) -> np.ndarray:
    a = np.deg2rad(angle_deg)
    return np.array([[scale * np.cos(a), -scale * np.sin(a), tx], [scale * np.sin(a), scale * np.cos(a), ty]])


def _face(center, size, score=0.99) -> FaceDetection:
    """A detection whose 5 points are the template scaled to `size` pixels around `center`."""
    cx, cy = center
    pts = (template_points(1) - 0.45) * size + np.array([cx, cy])
    box = np.array([cx - size / 2, cy - size / 2, cx + size / 2, cy + size / 2], np.float32)
    return FaceDetection(box=box, score=score, landmarks=pts.astype(np.float32))


# --- alignment ------------------------------------------------------------------------------------------


def test_umeyama_recovers_a_similarity():
    rng = np.random.default_rng(0)
    src = rng.uniform(0, 300, (5, 2))
    m = _similarity(23.0, 0.61, 12.5, -40.0)
    dst = transform_points(m, src)
    np.testing.assert_allclose(umeyama(src, dst)[:2], m, atol=1e-9)
    # mirrored targets: still a proper rotation (no reflection), det > 0
    t = umeyama(src, dst * [-1, 1])
    assert np.linalg.det(t[:2, :2]) > 0
    # rigid mode keeps scale 1
    assert abs(np.linalg.det(umeyama(src, dst, with_scale=False)[:2, :2]) - 1) < 1e-9
    with pytest.raises(ValueError):
        umeyama(src[:1], dst[:1])


def test_alignment_maps_points_onto_the_template():
    m = _similarity(-12.0, 1.7, 80.0, 30.0)
    landmarks = transform_points(m, template_points(1) * 100)
    matrix = estimate_alignment(landmarks)
    np.testing.assert_allclose(transform_points(matrix, landmarks), template_points(), atol=1e-6)
    np.testing.assert_allclose(estimate_alignment(template_points())[:, :2], np.eye(2), atol=1e-9)
    # warping an image with dots at the landmarks puts the dots on the template
    image = np.zeros((400, 400, 3), np.uint8)
    for x, y in landmarks:
        cv2.circle(image, (int(round(x)), int(round(y))), 6, (255, 255, 255), -1)
    crop, _ = align_face(image, landmarks)
    assert crop.shape == (FACE_CROP_SIZE, FACE_CROP_SIZE, 3) and crop.dtype == np.uint8
    for tx, ty in template_points().round().astype(int):
        assert crop[ty, tx, 0] > 200
    with pytest.raises(ValueError, match="five"):
        estimate_alignment(np.full((5, 2), np.nan))


def test_to_model_input_range_and_layout():
    crops = np.zeros((2, 224, 224, 3), np.uint8)
    crops[1] = 255
    crops[0, 0, 0] = (255, 0, 0)
    x = to_model_input(crops)
    assert x.shape == (2, 3, 224, 224) and x.dtype == torch.float32
    assert x[0, 0, 0, 0] == 1 and x[0, 1, 0, 0] == -1 and x[0, 0, 1, 1] == -1
    assert torch.all(x[1] == 1)


# --- tracking -------------------------------------------------------------------------------------------


def test_follows_the_largest_face_then_the_nearest():
    n = 10
    dets = []
    for i in range(n):
        main = _face((100 + 2 * i, 100), 80)
        other = _face((300, 100), 40 + 10 * i)  # grows larger than the followed face later
        dets.append([other, main])
    track = track_face(dets, smooth_sigma=0)
    np.testing.assert_allclose(track.boxes[:, 0], [100 + 2 * i - 40 for i in range(n)], atol=1e-4)
    assert track.num_interpolated == 0


def test_interpolates_missing_frames_and_far_jumps():
    n = 20
    truth = [_face((50 + 5 * i, 80 + 2 * i), 60) for i in range(n)]
    dets = [[f] for f in truth]
    for i in (7, 8, 9):
        dets[i] = []
    dets[12] = [_face((400, 400), 60)]  # another face far away: not the followed one
    dets[0] = []  # leading gap: held from the nearest detection
    track = track_face(dets, smooth_sigma=0, max_gap=5)
    assert len(track) == n
    np.testing.assert_array_equal(np.flatnonzero(~track.detected), [0, 7, 8, 9, 12])
    for i in range(1, n):  # linear motion: linear interpolation is exact
        np.testing.assert_allclose(track.landmarks[i], truth[i].landmarks, atol=1e-3)
    np.testing.assert_allclose(track.landmarks[0], truth[1].landmarks, atol=1e-3)
    assert np.isnan(track.raw_landmarks[7]).all() and track.scores[7] == 0


def test_smoothing_reduces_jitter_without_lag():
    rng = np.random.default_rng(1)
    n = 60
    truth = [_face((100 + i, 100), 80) for i in range(n)]
    noisy = []
    for f in truth:
        g = FaceDetection(f.box.copy(), f.score, f.landmarks + rng.normal(0, 1.5, (5, 2)).astype(np.float32))
        noisy.append([g])
    raw = track_face(noisy, smooth_sigma=0).landmarks
    smooth = track_face(noisy, smooth_sigma=1.5).landmarks
    target = np.stack([f.landmarks for f in truth])
    inner = slice(5, n - 5)
    assert np.abs(smooth[inner] - target[inner]).mean() < 0.6 * np.abs(raw[inner] - target[inner]).mean()
    assert abs((smooth[inner] - target[inner]).mean()) < 0.3  # no systematic lag on a moving face


def test_errors_name_the_source_and_frames():
    with pytest.raises(NoFaceError, match=r"clip\.mp4.*12 frames.*0-11"):
        track_face([[] for _ in range(12)], source="clip.mp4")
    few = [[_face((100, 100), 80)] if i in (3, 4) else [] for i in range(10)]
    with pytest.raises(FaceTrackingError, match=r"clip\.mp4.*only 2 of 10.*0-2, 5-9"):
        track_face(few, source="clip.mp4")
    gap = [[_face((100, 100), 80)] if not 5 <= i < 15 else [] for i in range(40)]
    with pytest.raises(FaceTrackingError, match=r"more than 8 consecutive frames.*5-14"):
        track_face(gap, source="clip.mp4", max_gap=8)
    assert len(track_face(gap, source="clip.mp4", max_gap=10)) == 40


def test_frame_ranges_text():
    assert frame_ranges([1, 2, 3, 7, 9, 10]) == "1-3, 7, 9-10"
    assert frame_ranges([]) == "none"
    assert "more ranges" in frame_ranges(list(range(0, 40, 2)), limit=3)


# --- detector interface ---------------------------------------------------------------------------------


def test_registry():
    assert "retinaface" in available_detectors()
    assert isinstance(create_detector("retinaface", score_threshold=0.7), RetinaFaceDetector)
    with pytest.raises(ValueError, match="unknown face detector 'nope'.*retinaface"):
        create_detector("nope")

    @register_detector("test-fixed")
    class Fixed(FaceDetector):
        def detect_batch(self, frames):
            return [[_face((10, 10), 8)] for _ in frames]

    det = create_detector("test-fixed")
    assert det.identity() == {"name": "test-fixed"}
    assert len(det.detect(np.zeros((20, 20, 3), np.uint8))) == 1
    with pytest.raises(ValueError, match="already registered"):
        register_detector("test-fixed")(Fixed)


@pytest.mark.parametrize("height, width", [(144, 176), (121, 161), (64, 64)])
def test_retinaface_anchor_layout_matches_the_network(height, width):
    det = RetinaFaceDetector()
    loc = det.session.run(None, {"input": np.zeros((1, 3, height, width), np.float32)})[0]
    assert loc.shape[1] == len(_anchors(height, width))


def test_retinaface_finds_nothing_in_a_blank_frame():
    det = RetinaFaceDetector()
    rng = np.random.default_rng(0)
    assert det.detect(np.full((240, 320, 3), 127, np.uint8)) == []
    assert det.detect(rng.integers(0, 255, (240, 320, 3), dtype=np.uint8)) == []


@pytest.mark.real
def test_retinaface_on_real_portraits(examples_dir):
    det = RetinaFaceDetector()
    for case in sorted(examples_dir.glob("case-*/reference.png")):
        image = cv2.cvtColor(cv2.imread(str(case), cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)
        faces = det.detect(image)
        assert faces, f"no face in {case}"
        lm = max(faces, key=lambda f: f.area).landmarks
        # template order: image-left eye, image-right eye, nose, image-left / image-right mouth corner
        assert lm[0, 0] < lm[1, 0] and lm[3, 0] < lm[4, 0], case
        assert max(lm[0, 1], lm[1, 1]) < lm[2, 1] < min(lm[3, 1], lm[4, 1]), case
