"""The authors' face tracker as the expression backend: crops, matrices and 222 points equal the authors'
code's (golden data made with the two stand-in ONNX models), frames without a face kept and interpolated."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch

from flashportrait.expression import extract_expression_features

from .conftest import SHARED_DIR
from .test_expression import TinyEncoder

TRACKER_DIR = SHARED_DIR / "reference" / "face_tracker"


@pytest.fixture(scope="module")
def tracker():
    det, lmk = TRACKER_DIR / "standin_face_det.onnx", TRACKER_DIR / "standin_face_landmark.onnx"
    if not det.is_file() or not lmk.is_file():
        pytest.skip(f"needs {TRACKER_DIR} (the ../shared folder beside the clone)")
    from flashportrait.face.released_tracker import ReleasedFaceTracker

    return ReleasedFaceTracker(det, lmk)


def test_released_backend_reproduces_the_authors_crops_on_d0(tracker, examples_dir, tmp_path, caplog):
    from safetensors.torch import load_file

    from flashportrait.tools.extract_expression import save_crops

    video = examples_dir / "driving" / "d0.mp4"
    with caplog.at_level(logging.INFO, logger="flashportrait.expression"):
        feats = extract_expression_features(video, TinyEncoder(), tracker=tracker, max_frames=60, cache=False,
                                            progress=False)
    assert "the authors' face tracker" in caplog.text and feats.settings["backend"] == "released"
    golden = load_file(str(TRACKER_DIR / "golden_d0.safetensors"))
    assert len(feats) == 60 and bool(feats.detected.all())
    assert (feats.dense_landmarks - golden["landmarks"]).abs().max() <= 0.25  # px (README tolerance)
    out = tmp_path / "crops.safetensors"
    save_crops(feats, video, out)
    saved = load_file(str(out))
    assert saved["crops"].shape == (60, 3, 224, 224) and saved["crops"].dtype == torch.float32
    assert saved["matrices"].dtype == torch.float64 and saved["landmarks"].shape == (60, 222, 2)
    ours = saved["crops"][golden["crop_pair_index"]]
    theirs = golden["crop_rgb_u8"].double().div(255).mul(2).sub(1).float()  # the authors' PD-FGC input
    diff = (ours - theirs).abs()
    assert diff.mean() <= 0.005 and diff.max() <= 0.25
    # matrices compared through the points they map (the five source points -> template)
    pts = feats.landmarks.double()
    mapped = torch.einsum("nij,nkj->nki", saved["matrices"][:, :, :2], pts) + saved["matrices"][:, None, :, 2]
    gold = torch.einsum("nij,nkj->nki", golden["warp_matrix"][:, :, :2], pts) + golden["warp_matrix"][:, None, :, 2]
    assert (mapped - gold).abs().max() <= 0.25


def test_frames_without_a_face_are_kept_and_interpolated(tracker, examples_dir, tmp_path):
    """The authors drop frames without a face and shift every later feature; ours keeps one row per frame."""
    from flashportrait.video_io import StreamingVideoWriter, iter_frames

    frames = list(iter_frames(examples_dir / "driving" / "d0.mp4", max_frames=20))
    frames[8:12] = [np.zeros_like(frames[0])] * 4  # no face (the stand-in scores a black crop below 1e-4)
    video = tmp_path / "gap.mp4"
    with StreamingVideoWriter(video, 25, crf=0) as writer:
        writer.write(np.stack(frames))
    feats = extract_expression_features(video, TinyEncoder(), tracker=tracker, cache=False, progress=False)
    assert len(feats) == 20 and feats.frame_indices.tolist() == list(range(20))
    assert feats.detected.tolist() == [True] * 8 + [False] * 4 + [True] * 8
    lm = feats.dense_landmarks
    t = torch.arange(8, 12, dtype=torch.float32).view(-1, 1, 1)
    expected = lm[7] + (lm[12] - lm[7]) * (t - 7) / 5  # linear interpolation between the neighbours
    torch.testing.assert_close(lm[8:12], expected, rtol=0, atol=1e-3)
    assert torch.isfinite(feats.features).all()
