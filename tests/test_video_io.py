"""Video reading / writing (PyAV): sizes, exact rates, rotation, VFR, audio muxing, atomic writes."""

from __future__ import annotations

from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import pytest

from flashportrait.video_io import (
    StreamingVideoWriter,
    VideoReadError,
    check_decoded_count,
    check_media_file,
    frame_timestamps,
    iter_frames,
    probe_video,
    resample_indices,
)


def read_frames(path, **kwargs) -> np.ndarray:
    return np.stack(list(iter_frames(path, **kwargs)))


def _gradient_frames(n: int, height: int, width: int) -> np.ndarray:
    """uint8 [n, H, W, 3] smooth frames that change over time (codec friendly)."""
    yy, xx = np.mgrid[:height, :width]
    out = np.empty((n, height, width, 3), np.uint8)
    for i in range(n):
        out[i, ..., 0] = (xx * 255 // max(width - 1, 1) + 8 * i) % 256
        out[i, ..., 1] = yy * 255 // max(height - 1, 1)
        out[i, ..., 2] = 128
    return out


def _write_audio_file(path: Path, seconds: float, rate: int = 48000) -> None:
    """An .m4a with a 440 Hz tone whose amplitude grows linearly from 0.1 to 0.5 over the file."""
    t = np.arange(int(seconds * rate)) / rate
    signal = ((0.1 + 0.4 * t / seconds) * np.sin(2 * np.pi * 440 * t)).astype(np.float32)
    with av.open(str(path), "w", format="mp4") as out:
        stream = out.add_stream("aac", rate=rate)
        stream.layout = "mono"
        for start in range(0, len(signal), 1024):
            chunk = signal[None, start : start + 1024]
            frame = av.AudioFrame.from_ndarray(np.ascontiguousarray(chunk), format="fltp", layout="mono")
            frame.sample_rate = rate
            frame.pts = start
            for p in stream.encode(frame):
                out.mux(p)
        for p in stream.encode(None):
            out.mux(p)


def _decode_audio(path: Path) -> tuple[np.ndarray, int]:
    with av.open(str(path)) as f:
        rate = f.streams.audio[0].rate
        chunks = [fr.to_ndarray().reshape(fr.to_ndarray().shape[0], -1)[0] for fr in f.decode(audio=0)]
    return np.concatenate(chunks), rate


def test_roundtrip_odd_size_exact_rate(tmp_path):
    frames = _gradient_frames(12, 121, 161)
    out = tmp_path / "odd.mp4"
    with StreamingVideoWriter(out, Fraction(30000, 1001), crf=0) as writer:
        writer.write(frames[:5])
        writer.write(frames[5])  # a single [H, W, 3] frame is accepted too
        writer.write(frames[6:])
    assert writer.size == (162, 122)
    info = probe_video(out)
    assert (info.width, info.height) == (162, 122)
    assert info.fps_fraction == Fraction(30000, 1001)
    assert info.num_frames == 12 and not info.has_audio and not info.is_vfr and info.rotation == 0
    back = read_frames(out)
    assert back.shape == (12, 122, 162, 3) and back.dtype == np.uint8
    # the content survives (crf 0; chroma is subsampled, so compare loosely) and the padding repeats the edge
    assert np.abs(back[:, :121, :161].astype(int) - frames).mean() < 4
    assert np.abs(back[:, 121].astype(int) - back[:, 120]).mean() < 4
    # streaming reader and index selection
    assert sum(1 for _ in iter_frames(out, max_frames=4)) == 4
    picked = read_frames(out, indices=[1, 1, 7])
    np.testing.assert_array_equal(picked[0], picked[1])
    np.testing.assert_array_equal(picked[2], back[7])


def test_writer_is_atomic_on_error(tmp_path):
    out = tmp_path / "broken.mp4"
    with pytest.raises(KeyError):
        with StreamingVideoWriter(out, 25) as writer:
            writer.write(_gradient_frames(3, 32, 32))
            raise KeyError("boom")
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(RuntimeError, match="no frames"):
        with StreamingVideoWriter(out, 25):
            pass
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(ValueError, match="uint8"):
        with StreamingVideoWriter(out, 25) as writer:
            writer.write(np.zeros((1, 8, 8, 3), np.float32))
    assert list(tmp_path.iterdir()) == []


def test_audio_is_trimmed_and_muxed(tmp_path):
    source = tmp_path / "tone.m4a"
    _write_audio_file(source, seconds=3.0)
    out = tmp_path / "with_audio.mp4"
    with StreamingVideoWriter(out, 25, audio_source=source, audio_start_s=1.5) as writer:
        writer.write(_gradient_frames(25, 64, 64))  # 1.0 s of video
    info = probe_video(out)
    assert info.has_audio and info.audio_sample_rate == 48000 and info.num_frames == 25
    samples, rate = _decode_audio(out)
    assert abs(len(samples) / rate - 1.0) < 0.05  # trimmed to the video's length (+ AAC frame padding)
    # the amplitude tells where in the source we are: 0.1 + 0.4 * t / 3 at source time t = 1.5 + output time
    for t_out in (0.2, 0.7):
        seg = samples[int(t_out * rate) : int((t_out + 0.05) * rate)]
        amp = np.sqrt(2) * np.sqrt(np.mean(seg**2))
        expected = 0.1 + 0.4 * (1.5 + t_out + 0.025) / 3.0
        assert abs(amp - expected) < 0.03, (t_out, amp, expected)
    # a source without audio gives a silent video, not an error
    silent = tmp_path / "silent.mp4"
    with StreamingVideoWriter(silent, 25, audio_source=_silent_source(tmp_path)) as w:
        w.write(_gradient_frames(5, 32, 32))
    assert not probe_video(silent).has_audio


def _silent_source(tmp_path: Path) -> Path:
    path = tmp_path / "no_audio.mp4"
    with StreamingVideoWriter(path, 25) as writer:
        writer.write(_gradient_frames(3, 32, 32))
    return path


@pytest.mark.parametrize("display_angle, clockwise", [(-90, 90), (90, 270), (180, 180)])
def test_rotation_metadata_is_applied(tmp_path, display_angle, clockwise):
    image = np.zeros((48, 64, 3), np.uint8)
    image[:16, :16] = 255  # a white block in the top-left corner
    path = tmp_path / "rotated.mp4"
    with av.open(str(path), "w") as out:
        stream = out.add_stream("libx264", rate=25)
        stream.width, stream.height, stream.pix_fmt = 64, 48, "yuv420p"
        stream.set_display_rotation(display_angle)  # FFmpeg convention: counter-clockwise degrees
        for i in range(3):
            frame = av.VideoFrame.from_ndarray(image, format="rgb24")
            frame.pts = i
            for p in stream.encode(frame):
                out.mux(p)
        for p in stream.encode(None):
            out.mux(p)
    info = probe_video(path)
    assert info.rotation == clockwise
    expected = np.rot90(image, k=-clockwise // 90)
    frames = read_frames(path)
    assert (info.height, info.width) == expected.shape[:2] == frames.shape[1:3]
    white = frames[0, ..., 0] > 128
    assert np.abs(white.astype(int) - (expected[..., 0] > 128)).mean() < 0.02


def test_variable_frame_rate(tmp_path):
    path = tmp_path / "vfr.mp4"
    times_ms = [0, 40, 60, 140, 160, 200, 300, 320, 360, 400]
    frames = _gradient_frames(len(times_ms), 64, 64)
    with av.open(str(path), "w") as out:
        stream = out.add_stream("libx264", rate=25)
        stream.width, stream.height, stream.pix_fmt = 64, 64, "yuv420p"
        stream.codec_context.time_base = Fraction(1, 1000)
        stream.time_base = Fraction(1, 1000)
        for t, img in zip(times_ms, frames):
            frame = av.VideoFrame.from_ndarray(img, format="rgb24")
            frame.pts = t
            frame.time_base = Fraction(1, 1000)
            for p in stream.encode(frame):
                out.mux(p)
        for p in stream.encode(None):
            out.mux(p)
    info = probe_video(path)
    assert info.is_vfr and info.num_frames == len(times_ms)
    assert 15 < info.fps < 35  # an average rate
    np.testing.assert_allclose(frame_timestamps(path), np.array(times_ms) / 1000, atol=1e-3)
    assert len(read_frames(path)) == len(times_ms)  # every frame, none dropped or duplicated
    idx = resample_indices(frame_timestamps(path), 10.0)
    # output times 0, .1, .2, .3, .4 -> last frame at or before: 0ms, 60ms, 200ms, 300ms, 400ms
    np.testing.assert_array_equal(idx, [0, 2, 5, 6, 9])


def test_resample_indices_constant_rate():
    ts = np.arange(30) / 30.0
    np.testing.assert_array_equal(resample_indices(ts, 30.0), np.arange(30))
    np.testing.assert_array_equal(resample_indices(ts, 15.0), np.arange(0, 30, 2))
    assert len(resample_indices(ts, 60.0)) == 60


def test_unreadable_inputs_name_the_file(tmp_path):
    with pytest.raises(VideoReadError, match="missing.mp4"):
        probe_video(tmp_path / "missing.mp4")
    text = tmp_path / "notes.mp4"
    text.write_text("not a video")
    with pytest.raises(VideoReadError, match="notes.mp4"):
        probe_video(text)


@pytest.mark.real
def test_real_clips_probe(examples_dir):
    expected = {  # from ../shared/examples/README.md
        "driving/d0.mp4": (512, 512, 25, 78, False),
        "driving/d3.mp4": (512, 512, 30, 354, True),
        "driving/d9.mp4": (512, 480, 30, 587, True),
        "driving-substitutes/WolfgangLanger_Pexels.mp4": (640, 360, 24000 / 1001, 472, True),
        "driving-substitutes/carphone_pristine.mp4": (176, 144, 30000 / 1001, 120, False),
    }
    for name, (w, h, fps, n, audio) in expected.items():
        info = probe_video(examples_dir / name)
        assert (info.width, info.height, info.num_frames, info.has_audio) == (w, h, n, audio), name
        assert abs(info.fps - fps) < 1e-6, name
    frames = read_frames(examples_dir / "driving-substitutes/carphone_pristine.mp4")
    assert frames.shape == (120, 144, 176, 3)


def _write_onset_tone(path: Path, seconds: float, onset_s: float, rate: int = 48000) -> None:
    """An .m4a that is silent until ``onset_s``, then a 440 Hz tone: its onset marks a time to the sample."""
    t = np.arange(int(seconds * rate)) / rate
    signal = np.where(t >= onset_s, 0.5 * np.sin(2 * np.pi * 440 * t), 0.0).astype(np.float32)
    with av.open(str(path), "w", format="mp4") as out:
        stream = out.add_stream("aac", rate=rate)
        stream.layout = "mono"
        for start in range(0, len(signal), 1024):
            frame = av.AudioFrame.from_ndarray(np.ascontiguousarray(signal[None, start : start + 1024]),
                                               format="fltp", layout="mono")
            frame.sample_rate = rate
            frame.pts = start
            for p in stream.encode(frame):
                out.mux(p)
        for p in stream.encode(None):
            out.mux(p)


def test_audio_cut_is_sample_accurate(tmp_path):
    """FFmpeg cuts the audio where asked: a tone starting at 2.0 s in the source, muxed from 1.5 s, starts at
    0.5 s in the output (within 2 ms; the old amplitude test only resolved ~0.2 s)."""
    source = tmp_path / "onset.m4a"
    _write_onset_tone(source, seconds=3.0, onset_s=2.0)
    out = tmp_path / "cut.mp4"
    with StreamingVideoWriter(out, 25, audio_source=source, audio_start_s=1.5) as writer:
        writer.write(_gradient_frames(25, 32, 32))
    samples, rate = _decode_audio(out)
    onset = np.argmax(np.abs(samples) > 0.05) / rate
    assert onset == pytest.approx(0.5, abs=0.002)
    assert len(samples) / rate == pytest.approx(1.0, abs=0.05)
    # asking for audio past the end of the source gives a silent video and a warning, not an error
    late = tmp_path / "late.mp4"
    with StreamingVideoWriter(late, 25, audio_source=source, audio_start_s=10.0) as writer:
        writer.write(_gradient_frames(5, 32, 32))
    assert not probe_video(late).has_audio
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cut.mp4", "late.mp4", "onset.m4a"]  # no temp files


def test_truncated_download_is_refused(tmp_path):
    """An mp4 with its index at the front and the second half missing: the header promises every frame,
    the data holds half. It must be refused as truncated, not read as a shorter (or VFR) video."""
    full = tmp_path / "full.mp4"
    with StreamingVideoWriter(full, 25) as writer:  # +faststart: the index is at the front
        writer.write(np.random.default_rng(0).integers(0, 255, (50, 48, 48, 3), dtype=np.uint8))
    data = full.read_bytes()
    half = tmp_path / "half.mp4"
    half.write_bytes(data[: len(data) // 2])
    assert probe_video(full).num_frames == 50
    with pytest.raises(VideoReadError, match="truncated"):
        probe_video(half)
    with pytest.raises(VideoReadError, match="truncated"):
        check_decoded_count(half, 22, 50)
    check_decoded_count(full, 49, 50)  # one frame short (a header off by one) is not an error


def test_check_media_file(tmp_path):
    with pytest.raises(VideoReadError, match="no such media file"):
        check_media_file(tmp_path / "missing.wav")
    junk = tmp_path / "junk.m4a"
    junk.write_bytes(b"not audio at all" * 10)
    with pytest.raises(VideoReadError, match="cannot open"):
        check_media_file(junk)
