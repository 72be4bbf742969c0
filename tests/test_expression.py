"""Driving video -> [N, 554] expression features: synthetic faces (always) and the real clips (with ../shared).

The always-running tests draw a moving "face" whose five points are bright dots and use a small detector
backend that finds those dots, so tracking, interpolation, alignment, batching and caching are tested
without any downloaded model. The real clips go through RetinaFace.
"""

from __future__ import annotations

import logging
import subprocess
import sys

import cv2
import numpy as np
import pytest
import torch
from torch import nn

from flashportrait.config import EXPRESSION_DIM
from flashportrait.expression import ExpressionFeatures, extract_expression_features, iter_aligned_crops
from flashportrait.face import FaceDetection, FaceDetector, FaceTrackingError, NoFaceError, template_points
from flashportrait.face.align import to_model_input
from flashportrait.video_io import StreamingVideoWriter, probe_video

# --- synthetic faces ------------------------------------------------------------------------------------


class DotFaceDetector(FaceDetector):
    """Finds the synthetic face: exactly five bright dots, ordered like the template (eyes, nose, mouth)."""

    name = "test-dots"

    def __init__(self) -> None:
        self.calls = 0

    def detect_batch(self, frames):
        self.calls += len(frames)
        out = []
        for frame in frames:
            mask = (frame.mean(-1) > 200).astype(np.uint8)
            count, _, stats, centroids = cv2.connectedComponentsWithStats(mask)
            pts = centroids[1:][stats[1:, cv2.CC_STAT_AREA] >= 4]
            if len(pts) != 5:
                out.append([])
                continue
            pts = pts[np.argsort(pts[:, 1])]
            eyes, nose, mouth = pts[:2], pts[2:3], pts[3:]
            lm = np.concatenate([eyes[np.argsort(eyes[:, 0])], nose, mouth[np.argsort(mouth[:, 0])]]).astype(np.float32)
            lo, hi = lm.min(0), lm.max(0)
            pad = (hi - lo).max() * 0.6
            box = np.array([lo[0] - pad, lo[1] - pad, hi[0] + pad, hi[1] + pad], np.float32)
            out.append([FaceDetection(box=box, score=1.0, landmarks=lm)])
        return out


def synthetic_landmarks(n: int) -> np.ndarray:
    """float [n, 5, 2]: the template moving linearly (translation, rotation, scale) in a 200x160 frame."""
    out = []
    for i in range(n):
        t = i / max(n - 1, 1)
        angle, scale = np.deg2rad(-10 + 20 * t), 90 + 20 * t
        rot = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
        pts = (template_points(1) - 0.45) * scale @ rot.T + np.array([80 + 40 * t, 70 + 10 * t])
        out.append(pts)
    return np.stack(out)


def write_synthetic_video(path, landmarks: np.ndarray, *, blank=(), fps=25.0) -> None:
    """A face-like ellipse with five white dots at `landmarks`; frames listed in `blank` show no face."""
    with StreamingVideoWriter(path, fps, crf=10) as writer:
        for i, lm in enumerate(landmarks):
            img = np.full((160, 200, 3), 40, np.uint8)
            if i not in blank:
                centre = lm.mean(0)
                size = np.linalg.norm(lm[1] - lm[0]) * 1.6
                cv2.ellipse(img, (int(centre[0]), int(centre[1])), (int(size), int(size * 1.3)), 0, 0, 360, (150, 120, 100), -1)
                for x, y in lm:
                    cv2.circle(img, (int(round(x * 4)), int(round(y * 4))), 8, (255, 255, 255), -1, cv2.LINE_AA, shift=2)
            writer.write(img)


class TinyEncoder(nn.Module):
    """Stand-in for PD-FGC: [B, 3, 224, 224] in [-1, 1] -> [B, 554] (pooled pixels, one linear layer)."""

    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.pool = nn.AdaptiveAvgPool2d(4)
        self.proj = nn.Linear(48, EXPRESSION_DIM)
        self.seen = 0

    def forward(self, faces: torch.Tensor) -> torch.Tensor:
        assert faces.shape[1:] == (3, 224, 224) and faces.min() >= -1 and faces.max() <= 1
        self.seen += len(faces)
        return self.proj(self.pool(faces).flatten(1))


@pytest.fixture
def moving_face_video(tmp_path):
    landmarks = synthetic_landmarks(24)
    path = tmp_path / "face.mp4"
    write_synthetic_video(path, landmarks)
    return path, landmarks


# --- synthetic tests ------------------------------------------------------------------------------------


def test_moving_face_features_line_up_and_align(moving_face_video):
    path, truth = moving_face_video
    encoder = TinyEncoder()
    feats = extract_expression_features(
        path, encoder, detector=DotFaceDetector(), batch_size=5, smooth_sigma=0, cache=False, progress=False
    )
    assert feats.features.shape == (24, EXPRESSION_DIM) and feats.features.dtype == torch.float32
    assert feats.frame_indices.tolist() == list(range(24)) and feats.fps == 25.0
    assert feats.num_interpolated == 0 and encoder.seen == 24
    np.testing.assert_allclose(feats.landmarks.numpy(), truth, atol=0.5)
    assert {k: v.shape[1] for k, v in feats.parts().items()} == {"headpose": 6, "eye": 6, "emotion": 30, "mouth": 512}
    # every aligned crop shows the five dots on the template positions
    dots = DotFaceDetector()
    for crop, matrix in iter_aligned_crops(path, feats.landmarks, feats.frame_indices):
        found = dots.detect(crop)
        assert found, "no dots in an aligned crop"
        np.testing.assert_allclose(found[0].landmarks, template_points(), atol=1.5)
        assert matrix.shape == (2, 3)
    # the features are the encoder's output on those crops, in frame order
    crops = np.stack([c for c, _ in iter_aligned_crops(path, feats.landmarks, feats.frame_indices)])
    with torch.no_grad():
        expected = TinyEncoder()(to_model_input(crops))
    torch.testing.assert_close(feats.features, expected, rtol=1e-5, atol=1e-5)


def test_video_without_a_face_stops_with_a_clear_error(tmp_path):
    path = tmp_path / "empty_room.mp4"
    write_synthetic_video(path, synthetic_landmarks(10), blank=range(10))
    with pytest.raises(NoFaceError, match=r"empty_room\.mp4.*10 frames"):
        extract_expression_features(path, TinyEncoder(), detector=DotFaceDetector(), cache=False, progress=False)


def test_missing_middle_frames_are_interpolated(tmp_path, caplog):
    truth = synthetic_landmarks(30)
    path = tmp_path / "gap.mp4"
    write_synthetic_video(path, truth, blank=range(12, 17))
    with caplog.at_level(logging.INFO, logger="flashportrait.expression"):
        feats = extract_expression_features(
            path, TinyEncoder(), detector=DotFaceDetector(), smooth_sigma=0, cache=False, progress=False
        )
    assert len(feats) == 30 and feats.frame_indices.tolist() == list(range(30))
    assert feats.num_interpolated == 5 and feats.detected[12:17].sum() == 0
    assert "5 of 30 frames (12-16)" in caplog.text
    # the motion is linear in time except for the rotation, so interpolation is close to the truth
    np.testing.assert_allclose(feats.landmarks[12:17].numpy(), truth[12:17], atol=1.0)
    # too long a gap for the allowed time -> error naming the frames
    with pytest.raises(FaceTrackingError, match=r"gap\.mp4.*12-16"):
        extract_expression_features(
            path, TinyEncoder(), detector=DotFaceDetector(), max_gap_s=0.1, cache=False, progress=False
        )


def test_cache_round_trip_and_invalidation(moving_face_video, tmp_path):
    path, _ = moving_face_video
    cache_dir = tmp_path / "cache"
    det = DotFaceDetector()
    first = extract_expression_features(path, TinyEncoder(), detector=det, cache_dir=cache_dir, progress=False)
    assert det.calls == 24 and len(list(cache_dir.glob("face.mp4.expression-*.pt"))) == 1
    again = extract_expression_features(path, TinyEncoder(), detector=det, cache_dir=cache_dir, progress=False)
    assert det.calls == 24  # loaded, not recomputed
    torch.testing.assert_close(again.features, first.features)
    assert again.frame_indices.tolist() == first.frame_indices.tolist() and again.fps == first.fps
    # other settings or other encoder weights -> a different cache entry
    extract_expression_features(path, TinyEncoder(), detector=det, cache_dir=cache_dir, smooth_sigma=2.0, progress=False)
    extract_expression_features(path, TinyEncoder(seed=1), detector=det, cache_dir=cache_dir, progress=False)
    assert det.calls == 72 and len(list(cache_dir.glob("*.pt"))) == 3


def test_default_cache_is_the_user_cache_folder_never_beside_the_video(moving_face_video, tmp_path_factory,
                                                                        monkeypatch):
    path, _ = moving_face_video
    xdg = tmp_path_factory.mktemp("xdg")
    monkeypatch.delenv("FLASHPORTRAIT_CACHE_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(xdg))
    before = sorted(p.name for p in path.parent.iterdir())
    det = DotFaceDetector()
    extract_expression_features(path, TinyEncoder(), detector=det, progress=False)
    extract_expression_features(path, TinyEncoder(), detector=det, progress=False)
    assert det.calls == 24  # the second run loaded the cache
    assert len(list((xdg / "flashportrait" / "expression").glob("face.mp4.expression-*.pt"))) == 1
    assert sorted(p.name for p in path.parent.iterdir()) == before  # nothing written beside the video


def test_unwritable_cache_does_not_fail_the_run(moving_face_video, tmp_path, caplog):
    path, _ = moving_face_video
    blocker = tmp_path / "not_a_folder"
    blocker.write_text("a file where the cache folder would be")
    with caplog.at_level(logging.INFO, logger="flashportrait.expression"):
        feats = extract_expression_features(path, TinyEncoder(), detector=DotFaceDetector(), cache_dir=blocker / "sub", progress=False)
    assert len(feats) == 24 and "running without a cache" in caplog.text
    # a read-only cache folder (permission bits; respected even by root) is left untouched
    readonly = tmp_path / "readonly"
    readonly.mkdir()
    readonly.chmod(0o555)
    try:
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="flashportrait.expression"):
            extract_expression_features(path, TinyEncoder(), detector=DotFaceDetector(), cache_dir=readonly, progress=False)
        assert "read-only" in caplog.text and not list(readonly.iterdir())
    finally:
        readonly.chmod(0o755)


def test_resampling_max_frames_and_save_load(moving_face_video, tmp_path):
    path, _ = moving_face_video
    feats = extract_expression_features(
        path, TinyEncoder(), detector=DotFaceDetector(), target_fps=12.5, cache=False, progress=False
    )
    assert feats.fps == 12.5 and feats.frame_indices.tolist() == list(range(0, 24, 2))
    short = extract_expression_features(path, TinyEncoder(), detector=DotFaceDetector(), max_frames=7, cache=False, progress=False)
    assert len(short) == 7
    out = tmp_path / "f.pt"
    short.save(out)
    back = ExpressionFeatures.load(out)
    torch.testing.assert_close(back.features, short.features)
    assert back.num_interpolated == 0 and back.fps == short.fps


def test_wrong_encoder_output_is_reported(moving_face_video):
    path, _ = moving_face_video

    class Bad(nn.Module):
        def forward(self, x):
            return torch.zeros(len(x), 10)

    with pytest.raises(ValueError, match=r"shape \(\d+, 10\).*554"):
        extract_expression_features(path, Bad(), detector=DotFaceDetector(), cache=False, progress=False)


def test_command_line_tool(moving_face_video, tmp_path, monkeypatch):
    """The inspection command runs end to end (random full-size PD-FGC, dot detector registered by a shim)."""
    path, _ = moving_face_video
    out, preview = tmp_path / "feats.npz", tmp_path / "preview.mp4"
    shim = tmp_path / "run_tool.py"
    shim.write_text(
        "import sys, runpy\n"
        f"sys.path.insert(0, {str(__file__.rsplit('/', 1)[0])!r})\n"
        "from flashportrait.face.detector import register_detector\n"
        "import test_expression as t\n"
        "register_detector('test-dots')(t.DotFaceDetector)\n"
        "sys.argv = ['extract_expression'] + sys.argv[1:]\n"
        "runpy.run_module('flashportrait.tools.extract_expression', run_name='__main__')\n"
    )
    cmd = [sys.executable, str(shim), str(path), "--out", str(out), "--preview", str(preview), "--random-encoder",
           "--detector", "test-dots", "--max-frames", "4", "--no-cache", "--quiet"]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    data = np.load(out)
    assert data["features"].shape == (4, EXPRESSION_DIM) and data["frame_indices"].tolist() == [0, 1, 2, 3]
    info = probe_video(preview)
    assert (info.width, info.height, info.num_frames) == (224, 224, 4)


# --- real clips -----------------------------------------------------------------------------------------

#: clips that tests/test_infer.py also runs (their features come from the shared session fixture)
INFER_CLIPS = ("driving/d0.mp4", "driving/d6.mp4", "driving/d11.mp4")
REAL_CLIPS = [
    "driving/d0.mp4", "driving/d3.mp4", "driving/d6.mp4", "driving/d9.mp4", "driving/d10.mp4", "driving/d11.mp4",
    "driving/d12.mp4", "driving/d18.mp4", "driving/d19.mp4",
    "driving-substitutes/carphone_pristine.mp4",  # 176x144, face of about 50 px
    "driving-substitutes/WolfgangLanger_Pexels.mp4",  # a hand covers the mouth later
]


@pytest.mark.real
@pytest.mark.parametrize("clip", REAL_CLIPS)
def test_real_clip_every_frame_gets_features(examples_dir, real_clip_features, clip):
    video = examples_dir / clip
    info = probe_video(video)
    if clip in INFER_CLIPS:  # the infer.py tests use these features too: extracted once per session
        feats = real_clip_features(clip)
    else:
        feats = extract_expression_features(video, TinyEncoder(), cache=False, progress=False, batch_size=32)
    assert len(feats) == info.num_frames, f"{clip}: {len(feats)} feature rows for {info.num_frames} frames"
    assert feats.frame_indices.tolist() == list(range(info.num_frames))
    assert torch.isfinite(feats.features).all() and torch.isfinite(feats.landmarks).all()
    assert feats.fps == pytest.approx(info.fps)
    # eyes above the mouth, image-left before image-right, on every frame
    lm = feats.landmarks
    assert (lm[:, 0, 0] < lm[:, 1, 0]).all() and (lm[:, 3, 0] < lm[:, 4, 0]).all()
    assert (lm[:, :2, 1].max(1).values < lm[:, 3:, 1].min(1).values).all()
    assert feats.num_interpolated <= 0.1 * len(feats), f"{clip}: {feats.num_interpolated} frames interpolated"


@pytest.mark.real
def test_real_clip_with_the_full_pdfgc_encoder(examples_dir, tmp_path):
    """d0 (512x512) through the full-size PD-FGC architecture (random weights), first 16 frames, cached."""
    from flashportrait.models.motion_encoder import PDFGCMotionEncoder

    torch.manual_seed(0)
    encoder = PDFGCMotionEncoder().eval()
    feats = extract_expression_features(
        examples_dir / "driving/d0.mp4", encoder, max_frames=16, batch_size=8, cache_dir=tmp_path, progress=False
    )
    assert feats.features.shape == (16, EXPRESSION_DIM) and torch.isfinite(feats.features).all()
    again = extract_expression_features(examples_dir / "driving/d0.mp4", encoder, max_frames=16, cache_dir=tmp_path, progress=False)
    torch.testing.assert_close(again.features, feats.features)
