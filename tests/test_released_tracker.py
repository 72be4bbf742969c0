"""The port of the authors' face tracker (`flashportrait.face.released_tracker`) against their own runs.

Golden data: `shared/reference/face_tracker/` (the authors' `det_landmarks` / `warp_face_pd_fgc` /
`image_preprocess` run on two stand-in ONNX models; see its README). Tolerances from that README: every
discrete record exact; landmarks, rects and matrices (through the points they map) within 0.25 px; crops
within a mean absolute difference of 0.005 and a max of 0.25 on the [-1, 1] scale.

The synthetic tests at the end need no ../shared and always run.
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
import shutil
import time
from pathlib import Path

import cv2
import numpy as np
import pytest

from flashportrait.face.released_ops import (
    FIVE_POINT_INDEX,
    Smoother222,
    atan2f_svml,
    decode_detections,
    five_point_crop,
    hard_nms,
    letterbox_matrix,
    one_euro_step,
    pdfgc_input,
    smoother_time_step,
    softmax,
)
from flashportrait.face.released_tracker import (
    RECORD_KEYS,
    ReleasedFaceTracker,
    ReleasedTrackResult,
    released_pairing,
    usable_frame_count,
)
from flashportrait.face.tracking import NoFaceError

from .conftest import SHARED_DIR

TRACKER_DIR = SHARED_DIR / "reference" / "face_tracker"
CASES = ("d0", "d3", "edge_d0", "duo_d0", "blank")
PX_TOL = 0.25

# discrete records: exact; float records: (absolute tolerance, unit)
DISCRETE = (
    "visited", "found", "used_pre_rect", "fresh", "tracks_before", "num_faces", "det_count", "det_boxes",
    "del_prob", "del_small", "del_overlap",
)  # fmt: skip
FLOAT_TOL = {
    "det_scores": 1e-5,  # detector probability
    "rect": PX_TOL,  # px
    "landmarks": PX_TOL,  # px
    "raw_landmarks": PX_TOL,  # px
    "euler": 1e-3,  # rad
    "prob": 1e-4,
    "face_dis_in": 1.0,  # px (a 0.25 px shift of p0 / p32 moves it by < 1 px)
    "face_dis_next": 1.0,  # px
    "area_margin": 1e-3,  # relative
    "min_face_margin": 2 * PX_TOL,  # px
    "select_margin": 1e-3,  # relative
}


# --- building the inputs ------------------------------------------------------------------------------------
def _tracker_dir() -> Path:
    if not TRACKER_DIR.is_dir():
        pytest.skip(f"needs {TRACKER_DIR} (the ../shared folder beside the clone); not present here")
    return TRACKER_DIR


@functools.lru_cache(maxsize=None)
def _manifest() -> dict:
    return json.loads((TRACKER_DIR / "manifest_face_tracker.json").read_text())


def _case_manifest(case: str) -> dict:
    return next(c for c in _manifest()["cases"] if c["case"] == case)


@functools.lru_cache(maxsize=None)
def _golden(case: str) -> dict[str, np.ndarray]:
    from safetensors.numpy import load_file

    return load_file(str(TRACKER_DIR / f"golden_{case}.safetensors"))


@functools.lru_cache(maxsize=None)
def _read_clip(path: str, n: int) -> tuple[np.ndarray, ...]:
    """First `n` frames of a clip, uint8 BGR, decoded with PyAV (identical to cv2.VideoCapture here)."""
    import av

    frames = []
    with av.open(path) as container:
        for frame in container.decode(video=0):
            frames.append(frame.to_ndarray(format="bgr24"))
            if len(frames) == n:
                break
    for f in frames:
        f.setflags(write=False)
    return tuple(frames)


def _paste_centre(canvas: np.ndarray, small: np.ndarray, x0: int = 0, width: int | None = None) -> None:
    big_h = canvas.shape[0]
    width = canvas.shape[1] if width is None else width
    h, w = small.shape[:2]
    top, left = (big_h - h) // 2, x0 + (width - w) // 2
    canvas[top : top + h, left : left + w] = small


def _build_frames(case: str, examples_dir: Path) -> list[np.ndarray]:
    """The case's input frames, rebuilt from the manifest recipe (README "Recipes")."""
    driving = examples_dir / "driving"
    if case in ("d0", "d3"):
        frames = list(_read_clip(str(driving / f"{case}.mp4"), 60))
    elif case == "edge_d0":
        # 0-14 as read, 15-19 black, 20-29 as read, 30-39 shrunk 3x and centred on a canvas of pixel (0, 0)
        frames = []
        for i, f in enumerate(_read_clip(str(driving / "d0.mp4"), 60)[:40]):
            if i < 15 or 20 <= i < 30:
                frames.append(f)
            elif i < 20:
                frames.append(np.zeros_like(f))
            else:
                canvas = np.empty_like(f)
                canvas[:] = f[0, 0]
                _paste_centre(canvas, f[::3, ::3])
                frames.append(canvas)
    elif case == "duo_d0":
        # (H, 2W) canvas of pixel (0, 0): the frame on the left, half size mirrored centred on the right
        frames = []
        for f in _read_clip(str(driving / "d0.mp4"), 60)[:20]:
            h, w = f.shape[:2]
            canvas = np.empty((h, 2 * w, 3), np.uint8)
            canvas[:] = f[0, 0]
            canvas[:, :w] = f
            _paste_centre(canvas, f[::2, ::2][:, ::-1], x0=w, width=w)
            frames.append(canvas)
    elif case == "blank":
        frames = [np.zeros((512, 512, 3), np.uint8) for _ in range(8)]
    else:
        raise KeyError(case)
    return frames


def _check_md5(case: str, frames: list[np.ndarray]) -> None:
    expected = _case_manifest(case)["frame_md5"]
    got = [hashlib.md5(np.ascontiguousarray(f).tobytes()).hexdigest() for f in frames]
    assert len(got) == len(expected), f"{case}: {len(got)} frames, manifest has {len(expected)}"
    bad = [i for i, (a, b) in enumerate(zip(got, expected)) if a != b]
    assert not bad, f"{case}: decoded frames {bad} differ from the manifest md5 (decoder mismatch)"


@functools.lru_cache(maxsize=None)
def _tracker() -> ReleasedFaceTracker:
    return ReleasedFaceTracker(TRACKER_DIR / "standin_face_det.onnx", TRACKER_DIR / "standin_face_landmark.onnx")


_RUNS: dict[str, tuple[list[np.ndarray], ReleasedTrackResult | None, NoFaceError | None, float]] = {}


def _run(case: str, examples_dir: Path):
    """(frames, result or None, NoFaceError or None, seconds) of the port on one case (cached)."""
    if case not in _RUNS:
        frames = _build_frames(case, examples_dir)
        _check_md5(case, frames)
        tracker = _tracker()
        t0 = time.perf_counter()
        err = None
        # d3 goes through the streaming interface (a frame factory), the others as a list
        source = (lambda: iter(frames)) if case == "d3" else frames
        try:
            result = tracker.track(source, source=f"golden {case}")
        except NoFaceError as exc:
            err, result = exc, None
        _RUNS[case] = (frames, result, err, time.perf_counter() - t0)
    return _RUNS[case]


# --- comparisons ----------------------------------------------------------------------------------------------
def _map(matrix: np.ndarray, pts: np.ndarray) -> np.ndarray:
    pts = np.asarray(pts, np.float64)
    return pts @ matrix[:, :2].T + matrix[:, 2]


def _max_abs(a: np.ndarray, b: np.ndarray) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    both = np.isfinite(a) & np.isfinite(b)
    return float(np.abs(a[both] - b[both]).max(initial=0.0))


def _compare_records(case: str, records: dict[str, np.ndarray]) -> dict[str, float]:
    """Assert every per-frame record against the golden one; return the largest deviations."""
    golden = _golden(case)
    deviations: dict[str, float] = {}
    for p in ("p1", "p2"):
        for key in RECORD_KEYS:
            name = f"{p}_{key}"
            ours, ref = records[name], golden[name]
            assert ours.shape == ref.shape and ours.dtype == ref.dtype, (name, ours.shape, ours.dtype, ref.shape)
            if key in DISCRETE:
                diff = np.flatnonzero((ours != ref).reshape(len(ref), -1).any(axis=1))
                assert len(diff) == 0, f"{case} {name} differs on frames {diff.tolist()}"
            elif key == "crop_matrix":
                # compared through the points it maps: the golden raw landmarks, frame -> crop pixels
                worst = 0.0
                for i in np.flatnonzero(np.isfinite(ref[:, 0, 0])):
                    pts = golden[f"{p}_raw_landmarks"][i]
                    worst = max(worst, float(np.abs(_map(ours[i], pts) - _map(ref[i], pts)).max()))
                assert np.array_equal(np.isnan(ours), np.isnan(ref)), f"{case} {name}: NaN rows differ"
                assert worst <= PX_TOL, f"{case} {name}: mapped points differ by {worst:.4f} px"
                deviations[name] = worst
            else:
                assert np.array_equal(np.isnan(ours), np.isnan(ref)), f"{case} {name}: NaN rows differ"
                dev = _max_abs(ours, ref)
                assert dev <= FLOAT_TOL[key], f"{case} {name}: max deviation {dev:.3g} > {FLOAT_TOL[key]}"
                deviations[name] = dev
    return deviations


# --- golden tests -----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("case", CASES)
def test_per_frame_records_match_golden(case, examples_dir):
    _tracker_dir()
    frames, result, err, seconds = _run(case, examples_dir)
    records = (result if result is not None else err.result).records
    assert len(records["frame_index"]) == len(frames)
    deviations = _compare_records(case, records)
    worst = sorted(deviations.items(), key=lambda kv: -kv[1])[:3]
    print(f"\n{case}: {len(frames)} frames tracked in {seconds:.2f} s; largest deviations {worst}")


@pytest.mark.parametrize("case", ("d0", "d3", "edge_d0", "duo_d0"))
def test_returned_landmarks_pairing_and_crops_match_golden(case, examples_dir):
    _tracker_dir()
    frames, result, err, _ = _run(case, examples_dir)
    assert err is None
    golden = _golden(case)
    n = len(frames)
    # one row per input frame; the authors' returned list = our found rows
    assert result.landmarks.shape == (n, 222, 2) and result.landmarks.dtype == np.float32
    assert result.found.shape == (n,) and np.array_equal(result.found, golden["p2_found"].astype(bool))
    assert np.array_equal(result.landmark_frame_index, golden["landmark_frame_index"])
    assert _max_abs(result.released_landmarks, golden["landmarks"]) <= PX_TOL
    assert np.isnan(result.landmarks[~result.found]).all()
    assert np.array_equal(result.five_points, result.landmarks[:, list(FIVE_POINT_INDEX)], equal_nan=True)
    assert result.pass1_rects.shape == golden["rects"].shape
    assert _max_abs(result.pass1_rects, golden["rects"]) <= PX_TOL
    # the authors' shifted zip(frames, landmarks)
    warp_frames, warp_landmark_frames = released_pairing(result)
    assert np.array_equal(warp_frames, golden["warp_frame_index"])
    assert np.array_equal(warp_landmark_frames, golden["warp_landmark_frame_index"])
    # 5-point matrices, compared through the points they map (the pair's 222 golden landmarks)
    worst_matrix = 0.0
    for pair, (fi, li) in enumerate(zip(warp_frames, warp_landmark_frames)):
        _, matrix = five_point_crop(frames[fi], result.five_points[li])
        pts = golden["landmarks"][pair]
        worst_matrix = max(
            worst_matrix, float(np.abs(_map(matrix, pts) - _map(golden["warp_matrix"][pair], pts)).max())
        )
    assert worst_matrix <= PX_TOL
    # stored crops, on the [-1, 1] scale
    worst_mean = worst_max = 0.0
    for c, pair in enumerate(golden["crop_pair_index"]):
        rgb = cv2.cvtColor(frames[warp_frames[pair]], cv2.COLOR_BGR2RGB)
        crop, _ = five_point_crop(rgb, result.five_points[warp_landmark_frames[pair]])
        ours = pdfgc_input(crop)
        ref = golden["crop_rgb_u8"][c].astype(np.float64) / 255.0 * 2 - 1
        diff = np.abs(ours - ref)
        worst_mean, worst_max = max(worst_mean, float(diff.mean())), max(worst_max, float(diff.max()))
        if c == 0 and "crop_tensor_first" in golden:
            tensor_diff = np.abs(ours[None] - golden["crop_tensor_first"])
            assert tensor_diff.mean() <= 0.005 and tensor_diff.max() <= 0.25
    assert worst_mean <= 0.005 and worst_max <= 0.25, (worst_mean, worst_max)
    print(f"\n{case}: warp matrices {worst_matrix:.2e} px, crops mean {worst_mean:.2e} max {worst_max:.2e}")


def test_blank_video_raises_no_face_error(examples_dir):
    _tracker_dir()
    frames, result, err, _ = _run("blank", examples_dir)
    # the authors fail with a bare AssertionError (pdf.py:185); ours names the source and the frame count
    assert result is None and isinstance(err, NoFaceError)
    assert "golden blank" in str(err) and "8 frames" in str(err)
    assert not err.result.found.any() and np.isnan(err.result.landmarks).all()
    assert err.result.landmarks.shape == (8, 222, 2)
    # with raise_on_no_face=False the same (all-NaN) result comes back instead
    quiet = _tracker().track(frames, source="blank", raise_on_no_face=False)
    assert not quiet.found.any() and len(quiet.landmark_frame_index) == 0


def test_edge_case_keeps_one_row_per_frame_where_the_authors_shift(examples_dir):
    _tracker_dir()
    frames, result, err, _ = _run("edge_d0", examples_dir)
    assert err is None and len(frames) == 40
    # ours: one row per input frame; no face on 15-19 (black: prob < 1e-4, then no detection) and on
    # 30-39 (faces shrunk 3x: landmark box < 96 px)
    assert result.landmarks.shape[0] == 40 and result.five_points.shape[0] == 40
    missing = np.flatnonzero(~result.found).tolist()
    assert missing == list(range(15, 20)) + list(range(30, 40))
    # the authors: 25 landmark sets zipped with the first 25 frames. By design ours differs there:
    # frames 15-24 are warped by the authors with the landmarks of frames 20-29 (10 misaligned pairs),
    # and frames 25-39 get no feature at all; ours keeps frame i with its own landmarks (NaN: not found).
    warp_frames, warp_landmark_frames = released_pairing(result)
    assert len(warp_frames) == 25
    shifted = warp_frames[warp_frames != warp_landmark_frames].tolist()
    assert shifted == list(range(15, 25))
    assert warp_landmark_frames[15:].tolist() == list(range(20, 30))
    unpaired = sorted(set(range(40)) - set(warp_frames.tolist()))
    assert unpaired == list(range(25, 40))
    # frames where the authors' crop (golden) differs from the frame's own landmarks: 15-24
    same_as_ours = [int(f) for f, lf in zip(warp_frames, warp_landmark_frames) if f == lf and result.found[f]]
    assert same_as_ours == list(range(15))


def test_five_point_indices_and_template_match_manifest():
    _tracker_dir()
    from flashportrait.face.align import template_points

    manifest = _manifest()
    assert list(FIVE_POINT_INDEX) == manifest["pt5_idx"]
    assert np.array_equal(template_points(manifest["crop_size"]), np.asarray(manifest["pt5_dst_unit"]) * 224)


def test_model_signature_is_checked(tmp_path):
    d = _tracker_dir()
    det, lmk = d / "standin_face_det.onnx", d / "standin_face_landmark.onnx"
    with pytest.raises(ValueError, match="standin_face_landmark.onnx"):
        ReleasedFaceTracker(lmk, lmk)  # landmark model given as the detector
    with pytest.raises(ValueError, match="standin_face_det.onnx"):
        ReleasedFaceTracker(det, det)
    # identity: paths + sizes + sha256; follows a change of either file
    a, b = tmp_path / "det.onnx", tmp_path / "lmk.onnx"
    shutil.copy(det, a)
    shutil.copy(lmk, b)
    tracker = ReleasedFaceTracker(a, b)
    first = tracker.identity()
    assert str(a.resolve()) in first and hashlib.sha256(a.read_bytes()).hexdigest() in first
    assert first == tracker.identity() and first != _tracker().identity()
    b.write_bytes(b.read_bytes() + b"\0")
    assert tracker.identity() != first


# --- synthetic tests (no ../shared) -------------------------------------------------------------------------------
def test_missing_model_file_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope_det.onnx"):
        ReleasedFaceTracker(tmp_path / "nope_det.onnx", tmp_path / "nope_lmk.onnx")
    junk = tmp_path / "junk_det.onnx"
    junk.write_bytes(b"not an onnx model")
    with pytest.raises(ValueError, match="junk_det.onnx"):
        ReleasedFaceTracker(junk, tmp_path / "nope_lmk.onnx")


def test_one_euro_step_matches_hand_computation():
    # x_prev = 10, x = 12, dx_prev = 0, t = beta = 0.5, min cutoff 1, derivative cutoff 1
    t = 0.5
    a_d = 2 * math.pi * t / (2 * math.pi * t + 1)  # pi / (pi + 1) = 0.758547
    dx_hat = a_d * (12 - 10) / t  # 3.034188
    f = 1 + t * dx_hat  # 2.517094
    a = 2 * math.pi * f * t / (2 * math.pi * f * t + 1)  # 7.907683 / 8.907683 = 0.887737
    expected = a * 12 + (1 - a) * 10  # 11.775475
    assert expected == pytest.approx(11.775475, abs=1e-6)
    x_hat, dx = one_euro_step(np.array([12.0]), np.array([10.0]), 0.0, t, t)
    assert x_hat[0] == pytest.approx(expected, rel=1e-12) and dx[0] == pytest.approx(dx_hat, rel=1e-12)
    # the derivative state carries over: second step from (11.775475, dx_hat) towards 12
    x2, _ = one_euro_step(np.array([12.0]), x_hat, dx, t, t)
    dx2 = a_d * (12 - expected) / t + (1 - a_d) * dx_hat
    a2 = 2 * math.pi * (1 + t * abs(dx2)) * t
    a2 = a2 / (a2 + 1)
    assert x2[0] == pytest.approx(a2 * 12 + (1 - a2) * expected, rel=1e-12)


def test_smoother_time_step_and_first_call():
    # contour: lo 0.005, v 0.05 -> 0.3; below lo linear from 0, between lo and 0.02 linear, then constant
    assert smoother_time_step(0.0025, 0.005, 0.05, 0.3) == pytest.approx(0.025)
    assert smoother_time_step(0.0125, 0.005, 0.05, 0.3) == pytest.approx(0.05 + 0.5 * 0.25)
    assert smoother_time_step(0.5, 0.005, 0.05, 0.3) == 0.3
    rng = np.random.default_rng(0)
    pts = rng.uniform(100, 300, size=(222, 2)).astype(np.float32)
    smoother = Smoother222()
    assert smoother(pts, 200.0) is pts  # first call: unchanged
    moved = pts + np.float32(1.0)  # every point moves by sqrt(2) px: d = 0.00707 (face_dis 200)
    out = smoother(moved, np.float32(200.0))
    assert out.dtype == np.float32
    assert np.all(out > pts) and np.all(out < moved)  # pulled back towards the previous points


def test_detector_decoding_on_a_hand_made_output():
    # a 272 x 160 frame: the letterbox is the identity, so input pixels are frame pixels
    assert np.allclose(letterbox_matrix(272, 160), np.eye(3))
    cells = {8: 34 * 20, 16: 17 * 10, 32: 9 * 5}  # stride 32: 272 / 32 = 8.5 -> 9 rows
    scores = {s: np.zeros((1, n, 1), np.float32) for s, n in cells.items()}
    dists = {s: np.full((1, n, 32), -50.0, np.float32) for s, n in cells.items()}

    def put(stride, row, col, score, bins):
        """bins: per side (l, t, r, b) an int bin (one-hot logits) or None (flat logits: expectation 3.5)."""
        k = row * (160 // stride) + col
        scores[stride][0, k, 0] = score
        for side, b in enumerate(bins):
            logits = dists[stride][0, k, side * 8 : side * 8 + 8]
            if b is None:
                logits[:] = 0.0
            else:
                logits[b] = 50.0

    put(8, 5, 4, 0.9, (2, 3, 4, None))  # anchor (32, 40) (top-left corner, no half cell): box 16, 16, 64, 68
    put(8, 6, 4, 0.8, (2, 3, 4, 5))  # anchor (32, 48): box 16, 24, 64, 88 -> IoU with the first 0.61: dropped
    put(16, 10, 6, 0.7, (1, 1, 1, 1))  # anchor (96, 160): box 80, 144, 112, 176, no overlap: kept
    put(32, 8, 0, 0.6, (0, 0, 1, 1))  # last row (anchor y 256) exists: box 0, 256, 32, 288 -> clipped to 272
    put(16, 0, 0, np.float32(0.4), (1, 1, 1, 1))  # exactly 0.4: not kept (strict >)
    outputs = [scores[8], scores[16], scores[32], dists[8], dists[16], dists[32]]
    boxes, out_scores = decode_detections(outputs, letterbox_matrix(272, 160), (272, 160))
    assert boxes.dtype == np.int32 and out_scores.dtype == np.float32
    assert boxes.tolist() == [[16, 16, 64, 68], [80, 144, 112, 176], [0, 256, 32, 272]]
    assert out_scores.tolist() == pytest.approx([0.9, 0.7, 0.6])
    # softmax expectation: flat logits give 3.5 bins
    p = softmax(np.zeros((1, 8), np.float32), axis=1)
    assert float((p * np.arange(8)).sum()) == pytest.approx(3.5)
    # hard NMS alone: IoU > 0.3 drops, IoU <= 0.3 keeps; picking order = descending score
    nms_boxes = np.array([[0, 0, 10, 10], [0, 0, 10, 13], [0, 0, 10, 4], [20, 20, 30, 30]], np.float64)
    # IoU with box 0: box 1 100/130 = 0.77 (dropped), box 2 40/100 = 0.4 (dropped), box 3 0 (kept)
    assert hard_nms(nms_boxes, np.array([0.9, 0.8, 0.7, 0.95])).tolist() == [3, 0]
    # IoU exactly 0.3 is kept: a [0, 0, 10, 10] vs [0, 0, 10, 3] (30 / 100)
    assert hard_nms(np.array([[0, 0, 10, 10], [0, 0, 10, 3]], np.float64), np.array([0.9, 0.8])).tolist() == [0, 1]


def test_atan2f_svml_is_a_faithful_float32_atan2():
    rng = np.random.default_rng(1)
    ys, xs = (rng.normal(size=500) * 50).astype(np.float32), (rng.normal(size=500) * 50).astype(np.float32)
    for y, x in zip(ys, xs):
        got = atan2f_svml(y, x)
        assert got.dtype == np.float32
        exact = np.float32(math.atan2(float(y), float(x)))
        ulps = abs(int(got.view(np.int32)) - int(exact.view(np.int32)))
        assert ulps <= 2, (y, x, got, exact)
    assert atan2f_svml(0.0, -1.0) == np.float32(np.pi) and atan2f_svml(1.0, 0.0) == np.float32(np.pi / 2)


def test_pairing_helpers():
    assert [usable_frame_count(n) for n in (0, 1, 4, 5, 8, 9, 60)] == [0, 1, 1, 5, 5, 9, 57]
    n = 6
    landmarks = np.full((n, 222, 2), np.nan, np.float32)
    found = np.array([1, 0, 1, 1, 0, 1], bool)
    landmarks[found] = 1.0
    result = ReleasedTrackResult(
        landmarks=landmarks,
        found=found,
        five_points=landmarks[:, list(FIVE_POINT_INDEX)],
        records={},
        pass1_rects=np.zeros((4, 4), np.float32),
        pass1_frame_index=np.flatnonzero(found),
        landmark_frame_index=np.flatnonzero(found),
    )
    frames, landmark_frames = released_pairing(result)
    assert frames.tolist() == [0, 1, 2, 3] and landmark_frames.tolist() == [0, 2, 3, 5]
