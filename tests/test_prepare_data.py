"""python -m flashportrait.tools.prepare_data: buckets by aspect ratio, clip names, FaceMesh masks, resuming an
interrupted run. (The full run with expression features is in test_training_e2e.py.) About 10 s."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from flashportrait.config import TRAIN_BUCKETS
from flashportrait.tools import prepare_data


def test_bucket_by_nearest_aspect_ratio_and_cover_size(tmp_path):
    assert prepare_data.choose_bucket(1920, 1080, TRAIN_BUCKETS) == "rec"
    assert prepare_data.choose_bucket(1080, 1920, TRAIN_BUCKETS) == "vec"
    assert prepare_data.choose_bucket(640, 640, TRAIN_BUCKETS) == "square"
    assert prepare_data.choose_bucket(1200, 1000, TRAIN_BUCKETS) == "square"  # 1.2 is nearer 1 than 1.73
    assert prepare_data.choose_bucket(1400, 1000, TRAIN_BUCKETS) == "rec"
    assert prepare_data.cover_size(1920, 1080, (480, 832)) == (853, 480)  # covers 832 x 480, aspect kept
    assert prepare_data.cover_size(320, 240, (480, 832)) == (320, 240)  # never enlarged
    raw = tmp_path / "raw"
    assert prepare_data.clip_id(raw / "singing" / "a b.mp4", raw) == "singing__a_b"
    assert prepare_data._category(raw / "dancing" / "x.mp4", raw, "speech") == "dancing"
    assert prepare_data._category(raw / "misc" / "x.mp4", raw, "singing") == "singing"


def test_facemesh_masks_on_a_face():
    pytest.importorskip("mediapipe")
    from flashportrait.demo import demo_driving_frames
    from flashportrait.training.face_masks import FaceMeshMasker, hull_mask

    square = hull_mask(np.array([[2, 2], [7, 2], [7, 7], [2, 7], [4, 4]], dtype=np.float32), 10, 10)
    assert square.sum() == 36 * 255 and square[2, 2] == 255 and square[8, 8] == 0
    with FaceMeshMasker(video=False) as masker:
        face, lip, found = masker(demo_driving_frames(1, 128)[0])
        assert found and masker.landmarks(demo_driving_frames(1, 128)[0]).shape == (478, 2)
        blank = masker(np.full((64, 64, 3), 128, np.uint8))
    assert 0 < (lip > 0).sum() < (face > 0).sum() < face.size and not ((lip > 0) & (face == 0)).any()
    assert not blank[2] and not blank[0].any() and not blank[1].any()


def _video(path, frames):
    from flashportrait.video_io import StreamingVideoWriter

    path.parent.mkdir(parents=True, exist_ok=True)
    with StreamingVideoWriter(path, 25) as writer:
        writer.write(frames)


def _check_online_features(out):
    """A clip without expression.pt: the dataset returns aligned face crops and the step's motion encoder turns
    them into the features (--skip_expression, then training computes them online)."""
    from types import SimpleNamespace

    import torch

    from flashportrait.face import to_model_input
    from flashportrait.tiny import build_tiny_motion_encoder
    from flashportrait.training.data import PortraitClipDataset, collate_clips, scan_clips
    from flashportrait.training.step import FrozenEncoders

    records, _ = scan_clips({"square": out / "video_square_path.txt"}, 5, 1, require_expression=False)
    item = PortraitClipDataset(records, {"square": (48, 48)}, 5, online_expression=True)[(0, 0)]
    assert item["needs_features"] and item["face_crops"].shape == (5, 224, 224, 3) and item["face_crops"].float().std() > 5
    batch = collate_clips([item])
    encoder = build_tiny_motion_encoder(0)
    encoders = FrozenEncoders(SimpleNamespace(vae=None, image_encoder=None), torch.zeros(1), encoder)
    features = encoders._online_features(batch, batch["features"])
    with torch.no_grad():
        expected = encoder(to_model_input(item["face_crops"].numpy()))
    assert torch.allclose(features[0], expected)


def test_resume_skips_finished_videos_and_redoes_changed_ones(tmp_path, capsys):
    pytest.importorskip("mediapipe")
    from flashportrait.demo import demo_driving_frames

    raw, out = tmp_path / "raw", tmp_path / "data"
    _video(raw / "talk.mp4", demo_driving_frames(5, 64))
    _video(raw / "blank.mp4", np.full((5, 64, 64, 3), 90, np.uint8))
    argv = [str(raw), str(out), "--skip_expression", "--category", "singing"]
    assert prepare_data.main(prepare_data.parse_args(argv)) == {"square": 1, "rec": 0, "vec": 0}
    clip = out / "square" / "singing" / "talk"
    info = json.loads((clip / "clip.json").read_text())
    assert info["num_frames"] == 5 and not info["has_expression"] and not (clip / "expression.pt").exists()
    assert "blank.mp4" in (out / "skipped.txt").read_text() and "FaceMesh" in (out / "skipped.txt").read_text()
    assert (out / "video_square_path.txt").read_text() == "square/singing/talk\n"
    _check_online_features(out)
    capsys.readouterr()

    stamp = os.stat(clip / "images" / "frame_0.png").st_mtime_ns
    prepare_data.main(prepare_data.parse_args(argv))  # nothing to do: both kept from before
    assert "2 kept from an earlier run" in capsys.readouterr().out
    assert os.stat(clip / "images" / "frame_0.png").st_mtime_ns == stamp

    _video(raw / "talk.mp4", demo_driving_frames(9, 64))  # the video changed: redone
    prepare_data.main(prepare_data.parse_args(argv))
    assert json.loads((clip / "clip.json").read_text())["num_frames"] == 9
    assert not list(out.rglob("*.partial"))


def test_bad_arguments_are_refused(tmp_path):
    with pytest.raises(ValueError, match="not a folder"):
        prepare_data.main(prepare_data.parse_args([str(tmp_path / "none"), str(tmp_path / "out"), "--tiny"]))
    with pytest.raises(ValueError, match="--pd_fpg_model_path"):
        prepare_data.main(prepare_data.parse_args([str(tmp_path), str(tmp_path / "out")]))
    with pytest.raises(ValueError, match="--category"):
        prepare_data.main(prepare_data.parse_args([str(tmp_path), str(tmp_path / "out"), "--tiny", "--category", "x"]))
    with pytest.raises(ValueError, match="no videos"):
        prepare_data.main(prepare_data.parse_args([str(tmp_path), str(tmp_path / "out"), "--tiny"]))
