"""Reading and writing videos with PyAV (FFmpeg): probe, decode to RGB, stream-encode H.264, mux AAC audio.

Reading
    `probe_video(path)` -> `VideoInfo` (size after rotation, exact frame rate where the container has one,
    frame count, rotation, variable-frame-rate flag, audio stream); it refuses a file whose packets fall
    clearly short of the frame count its header declares (a truncated download). `iter_frames(path)` yields
    RGB uint8 frames [H, W, 3] one at a time with the rotation metadata applied. Every decoded frame is
    returned once, in presentation order: nothing is dropped or duplicated, so frame index i always means
    the i-th frame a player shows. For variable-frame-rate videos `frame_timestamps(path)` gives each
    frame's time and `resample_indices` picks frames for a constant rate.

Writing
    `StreamingVideoWriter(path, fps, audio_source=...)` encodes H.264 (yuv420p) with PyAV as frames come;
    on close, FFmpeg (the binary imageio-ffmpeg ships) copies the video stream and adds the audio of another
    file, cut sample-accurately and re-encoded to AAC. It writes to a temporary file in the target's folder
    and renames it atomically; on an exception (Ctrl-C included) nothing is left behind.

Times are in seconds, sizes in pixels, frame rates in frames per second.

Length: reading and writing share the container rules (rotation, frame rates, temporary files), so they
stay in one module; half of it is the checks that turn broken files into clear errors.
"""

from __future__ import annotations

import logging
import os
import subprocess
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import av
import numpy as np

__all__ = [
    "VideoInfo",
    "VideoReadError",
    "probe_video",
    "check_media_file",
    "check_decoded_count",
    "frame_timestamps",
    "resample_indices",
    "iter_frames",
    "StreamingVideoWriter",
]

logger = logging.getLogger(__name__)


class VideoReadError(ValueError):
    """A video (or audio) file is missing, unreadable, truncated or has no video stream: a problem with the
    user's input, so a ``ValueError``."""


@dataclass(frozen=True)
class VideoInfo:
    """What `probe_video` finds in a file.

    Attributes:
        path: the file.
        width, height: displayed frame size in pixels, after the rotation metadata is applied.
        fps: frames per second (the exact average rate as a float; for variable-frame-rate videos the
            average over the file).
        fps_fraction: the same rate as an exact fraction (e.g. 30000/1001) when the container gives one.
        num_frames: number of video frames (from the container header, or by counting packets).
        duration_s: duration of the video stream in seconds.
        rotation: clockwise rotation in degrees (0, 90, 180, 270) that `iter_frames` applies to the
            decoded pictures so they display upright.
        is_vfr: True when frame intervals vary by more than 25 % of the median interval.
        has_audio: the file holds at least one audio stream.
        audio_sample_rate, audio_channels: of the first audio stream (0 when there is none).
        codec: name of the video codec.
    """

    path: str
    width: int
    height: int
    fps: float
    fps_fraction: Fraction | None
    num_frames: int
    duration_s: float
    rotation: int
    is_vfr: bool
    has_audio: bool
    audio_sample_rate: int
    audio_channels: int
    codec: str


def _open(path: str | os.PathLike) -> av.container.InputContainer:
    path = Path(path)
    if not path.is_file():
        raise VideoReadError(f"{path}: no such video file. Check the path.")
    try:
        container = av.open(str(path))
    except av.error.FFmpegError as err:
        raise VideoReadError(f"{path}: FFmpeg cannot open this file ({err}). Is it a video?") from err
    if not container.streams.video:
        container.close()
        raise VideoReadError(f"{path}: the file has no video stream.")
    return container


def _clockwise_rotation(display_rotation: float | None) -> int:
    """FFmpeg's display-matrix angle (counter-clockwise degrees) -> clockwise degrees to apply, in 0/90/180/270."""
    if not display_rotation:
        return 0
    return int(round(-float(display_rotation) / 90.0)) % 4 * 90


def _apply_rotation(rgb: np.ndarray, rotation: int) -> np.ndarray:
    """Rotate an [H, W, 3] picture clockwise by `rotation` degrees (multiple of 90)."""
    if rotation == 0:
        return rgb
    return np.ascontiguousarray(np.rot90(rgb, k=-(rotation // 90)))


def frame_timestamps(path: str | os.PathLike) -> np.ndarray:
    """Presentation time of every video frame, from the packets (no decoding).

    Returns:
        float64 [N] seconds, sorted, relative to the video stream's start time (so the first frame is at 0).
    """
    with _open(path) as container:
        stream = container.streams.video[0]
        pts = [p.pts for p in container.demux(stream) if p.pts is not None and p.size > 0]
        if not pts:
            return np.zeros(0, dtype=np.float64)
        pts = np.sort(np.asarray(pts, dtype=np.int64))
        return (pts - pts[0]).astype(np.float64) * float(stream.time_base)


def probe_video(path: str | os.PathLike) -> VideoInfo:
    """Read a video's header and packet times (no full decode; the first frame is decoded for its rotation).

    Raises:
        VideoReadError: the file is missing, not a media file, or has no video stream.
    """
    times = frame_timestamps(path)
    with _open(path) as container:
        stream = container.streams.video[0]
        rate = stream.average_rate or stream.guessed_rate or stream.base_rate
        num_frames = int(stream.frames or 0) or len(times)
        if stream.duration is not None and stream.time_base is not None:
            duration_s = float(stream.duration * stream.time_base)
        elif container.duration is not None:
            duration_s = container.duration / av.time_base
        else:
            duration_s = 0.0
        if rate:
            fps_fraction: Fraction | None = Fraction(rate)
            fps = float(rate)
        elif duration_s > 0 and num_frames > 0:
            fps_fraction, fps = None, num_frames / duration_s
        else:
            raise VideoReadError(f"{path}: cannot determine the frame rate (no rate and no duration in the file).")
        rotation = 0
        for frame in container.decode(stream):
            rotation = _clockwise_rotation(getattr(frame, "rotation", 0))
            coded_w, coded_h = frame.width, frame.height
            break
        else:
            raise VideoReadError(f"{path}: the video stream has no decodable frame.")
        width, height = (coded_h, coded_w) if rotation in (90, 270) else (coded_w, coded_h)
        audio = container.streams.audio[0] if container.streams.audio else None
        declared = int(stream.frames or 0)
        if declared and _clearly_short(len(times), declared):
            raise VideoReadError(
                f"{path}: the file declares {declared} frames but holds only {len(times)}; it looks truncated "
                "(an interrupted download or copy). Download or copy it again."
            )
        diffs = np.diff(times)
        is_vfr = bool(len(diffs) > 1 and np.any(np.abs(diffs - np.median(diffs)) > 0.25 * np.median(diffs)))
        return VideoInfo(
            path=str(path),
            width=int(width),
            height=int(height),
            fps=fps,
            fps_fraction=fps_fraction,
            num_frames=num_frames,
            duration_s=duration_s,
            rotation=rotation,
            is_vfr=is_vfr,
            has_audio=audio is not None,
            audio_sample_rate=int(audio.rate or 0) if audio is not None else 0,
            audio_channels=int(audio.channels or 0) if audio is not None else 0,
            codec=stream.codec_context.name,
        )


def _clearly_short(found: int, declared: int) -> bool:
    """More than 2 % (and more than 2 frames) missing: not a header off by one, a truncated file."""
    return declared - found > max(2, 0.02 * declared)


def check_decoded_count(path: str | os.PathLike, decoded: int, expected: int) -> None:
    """Raise `VideoReadError` when decoding gave clearly fewer frames than the file's packets promised.

    Args:
        path: the video (named in the message); decoded: frames decoded; expected: frames expected
            (``VideoInfo.num_frames``, or fewer when only a part was asked for).
    """
    if expected and _clearly_short(decoded, expected):
        raise VideoReadError(
            f"{path}: decoded only {decoded} of its {expected} frames; the file looks truncated or damaged. "
            "Download or copy it again."
        )


def check_media_file(path: str | os.PathLike) -> None:
    """Raise `VideoReadError` unless FFmpeg opens ``path`` (any media file: video or audio only)."""
    path = Path(path)
    if not path.is_file():
        raise VideoReadError(f"{path}: no such media file. Check the path.")
    try:
        av.open(str(path)).close()
    except av.error.FFmpegError as err:
        raise VideoReadError(f"{path}: FFmpeg cannot open this file ({err}). Is it a video or audio file?") from err


def resample_indices(timestamps: np.ndarray, fps: float, *, duration_s: float | None = None) -> np.ndarray:
    """Pick, for a constant output rate, the source frame shown at each output time.

    Output frame k (time k / fps) takes the last source frame whose timestamp is <= k / fps (what a player
    displays then). Frames may repeat (up-sampling) or be skipped (down-sampling); the indices say which.

    Args:
        timestamps: float [N] source frame times in seconds, sorted.
        fps: output frames per second (> 0).
        duration_s: length to cover; default: last timestamp + one median frame interval.

    Returns:
        int64 [M] indices into the source frames.
    """
    timestamps = np.asarray(timestamps, dtype=np.float64)
    if fps <= 0:
        raise ValueError(f"fps must be > 0, got {fps}")
    if len(timestamps) == 0:
        return np.zeros(0, dtype=np.int64)
    if duration_s is None:
        step = float(np.median(np.diff(timestamps))) if len(timestamps) > 1 else 1.0 / fps
        duration_s = float(timestamps[-1] - timestamps[0]) + step
    count = max(1, int(np.ceil(duration_s * fps - 1e-6)))  # output frames starting before the end
    out_times = timestamps[0] + np.arange(count) / fps
    idx = np.searchsorted(timestamps, out_times + 1e-6, side="right") - 1
    return np.clip(idx, 0, len(timestamps) - 1).astype(np.int64)


def iter_frames(
    path: str | os.PathLike,
    *,
    max_frames: int | None = None,
    indices: Sequence[int] | np.ndarray | None = None,
) -> Iterator[np.ndarray]:
    """Decode a video frame by frame, in display order, with the rotation metadata applied.

    Args:
        path: the video file.
        max_frames: stop after this many source frames (None: all).
        indices: if given, yield only these source frame indices (sorted ascending; repeats allowed and
            yielded repeatedly); the other frames are decoded but not converted.

    Yields:
        uint8 [H, W, 3] RGB frames (H, W = the displayed size, see `VideoInfo`).
    """
    wanted = None
    if indices is not None:
        wanted = np.asarray(indices, dtype=np.int64)
        if len(wanted) and np.any(np.diff(wanted) < 0):
            raise ValueError("indices must be sorted ascending")
    pos = 0  # position in `wanted`
    with _open(path) as container:
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        for i, frame in enumerate(container.decode(stream)):
            if max_frames is not None and i >= max_frames:
                break
            if wanted is not None:
                if pos >= len(wanted):
                    break
                if wanted[pos] != i:
                    continue
            rgb = _apply_rotation(frame.to_ndarray(format="rgb24"), _clockwise_rotation(getattr(frame, "rotation", 0)))
            if wanted is None:
                yield rgb
                continue
            while pos < len(wanted) and wanted[pos] == i:
                yield rgb
                pos += 1


# ---------------------------------------------------------------------------------------------------------
# writing
# ---------------------------------------------------------------------------------------------------------


def _as_fraction(fps: float | Fraction) -> Fraction:
    if isinstance(fps, Fraction):
        rate = fps
    else:
        rate = Fraction(float(fps)).limit_denominator(1001)
    if rate <= 0:
        raise ValueError(f"fps must be > 0, got {fps}")
    return rate


class StreamingVideoWriter:
    """Encode frames to an H.264 MP4 as they come; mux trimmed AAC audio from another file on close.

    Use as a context manager::

        with StreamingVideoWriter("out.mp4", fps=25, audio_source="driving.mp4") as writer:
            for chunk in chunks:            # uint8 [T, H, W, 3] RGB
                writer.write(chunk)

    The file appears at `path` only when the block ends without an exception (written to a hidden temporary
    file in the same folder, then renamed atomically); after an exception the temporary files are removed.

    Args:
        path: the output .mp4.
        fps: frames per second of the written video; a float (29.97 -> 2997/100, 30000/1001 kept exact via
            `fractions.Fraction`) or a Fraction.
        audio_source: a media file whose first audio stream is muxed in (re-encoded to AAC). None, or a file
            without audio, gives a silent video (the latter with a log line).
        audio_start_s: where in `audio_source` the first written frame starts, in seconds after the first
            video frame of `audio_source` (after the start of the file for an audio-only source).
        audio_duration_s: how much audio to take; default: the written video's length (frames / fps).
        crf: H.264 constant rate factor (0 = lossless luma, 18 = visually lossless, 23 = FFmpeg default).
        preset: x264 speed preset.
        audio_bitrate: AAC bit rate in bits per second.

    Odd sizes: frames are padded by repeating the last row / column to even width and height (yuv420p needs
    even sizes); the padded size is in `.size` after the first write.
    """

    def __init__(
        self,
        path: str | os.PathLike,
        fps: float | Fraction,
        *,
        audio_source: str | os.PathLike | None = None,
        audio_start_s: float = 0.0,
        audio_duration_s: float | None = None,
        crf: int = 18,
        preset: str = "medium",
        audio_bitrate: int = 128_000,
    ) -> None:
        self.path = Path(path)
        self.rate = _as_fraction(fps)
        self.audio_source = Path(audio_source) if audio_source is not None else None
        if self.audio_source is not None and not self.audio_source.is_file():
            raise FileNotFoundError(f"audio_source {self.audio_source}: no such file.")
        if audio_start_s < 0:
            raise ValueError(f"audio_start_s must be >= 0 seconds, got {audio_start_s}")
        self.audio_start_s = float(audio_start_s)
        self.audio_duration_s = audio_duration_s
        self.crf = int(crf)
        self.preset = preset
        self.audio_bitrate = int(audio_bitrate)
        self.num_frames = 0
        self.size: tuple[int, int] | None = None  # (width, height) as encoded
        self._container = None
        self._stream = None
        self._tmp_video: Path | None = None
        self._temps: list[Path] = []  # every temporary file made; all removed on abort
        self._closed = False

    # -- context manager ---------------------------------------------------------------------------------
    def __enter__(self) -> StreamingVideoWriter:
        self.open()
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()

    def _temp_path(self, suffix: str) -> Path:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd, name = tempfile.mkstemp(prefix=f".{self.path.stem}.", suffix=suffix, dir=self.path.parent)
        os.close(fd)
        self._temps.append(Path(name))
        return Path(name)

    def open(self) -> None:
        """Create the temporary output file (called by `__enter__`)."""
        if self._container is not None:
            return
        self._tmp_video = self._temp_path(".partial.mp4")
        self._container = av.open(str(self._tmp_video), mode="w", format="mp4", options={"movflags": "+faststart"})

    def write(self, frames: np.ndarray) -> None:
        """Encode frames.

        Args:
            frames: uint8 [T, H, W, 3] RGB (or one frame [H, W, 3]). All frames must have the same size.
        """
        if self._closed:
            raise RuntimeError(f"{self.path}: writer already closed")
        if self._container is None:
            self.open()
        frames = np.asarray(frames)
        if frames.ndim == 3:
            frames = frames[None]
        if frames.ndim != 4 or frames.shape[-1] != 3:
            raise ValueError(f"frames must be [T, H, W, 3] RGB, got shape {frames.shape}")
        if frames.dtype != np.uint8:
            raise ValueError(f"frames must be uint8 (0..255), got {frames.dtype}; convert with (x * 255).round()")
        height, width = frames.shape[1:3]
        if self._stream is None:
            self._start_stream(width, height)
        elif (width + width % 2, height + height % 2) != self.size:
            raise ValueError(f"frame size {width}x{height} differs from the first frames' size {self._in_size}")
        pad_h, pad_w = height % 2, width % 2
        for rgb in frames:
            if pad_h or pad_w:
                rgb = np.pad(rgb, ((0, pad_h), (0, pad_w), (0, 0)), mode="edge")
            frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(rgb), format="rgb24")
            frame.pts = self.num_frames
            frame.time_base = 1 / self.rate
            for packet in self._stream.encode(frame):
                self._container.mux(packet)
            self.num_frames += 1

    def _start_stream(self, width: int, height: int) -> None:
        self._in_size = (width, height)
        self.size = (width + width % 2, height + height % 2)
        stream = self._container.add_stream("libx264", rate=self.rate)
        stream.width, stream.height = self.size
        stream.pix_fmt = "yuv420p"
        stream.time_base = 1 / self.rate
        stream.options = {"crf": str(self.crf), "preset": self.preset}
        self._stream = stream

    def close(self) -> None:
        """Flush the encoder, mux the audio, and move the file into place."""
        if self._closed:
            return
        if self._container is None or self._stream is None:
            self.abort()
            raise RuntimeError(f"{self.path}: no frames were written; refusing to create an empty video.")
        try:
            for packet in self._stream.encode(None):
                self._container.mux(packet)
            self._container.close()
            self._container = None
            final_tmp = self._tmp_video
            if self.audio_source is not None:
                with_audio = self._temp_path(".partial.mp4")
                if self._mux_audio(self._tmp_video, with_audio):
                    final_tmp = with_audio
            umask = os.umask(0o022)
            os.umask(umask)
            os.chmod(final_tmp, 0o666 & ~umask)  # mkstemp makes 0600 files; give the usual permissions
            os.replace(final_tmp, self.path)
            self._temps.remove(final_tmp)
        except BaseException:
            self.abort()
            raise
        for tmp in self._temps:
            tmp.unlink(missing_ok=True)
        self._closed = True

    def abort(self) -> None:
        """Stop and remove the temporary file (called on an exception)."""
        if self._container is not None:
            try:
                self._container.close()
            except Exception:  # noqa: BLE001 - the file is being discarded anyway
                pass
            self._container = None
        for tmp in self._temps:
            tmp.unlink(missing_ok=True)
        self._closed = True

    # -- audio --------------------------------------------------------------------------------------------
    def _audio_window(self) -> tuple[float, float] | None:
        """``(start, duration)`` in seconds on ``audio_source``'s file timeline (what FFmpeg's ``-ss`` / ``-t``
        take), or None (logged) when there is no audio to mux."""
        duration = self.audio_duration_s if self.audio_duration_s is not None else float(self.num_frames / self.rate)
        with av.open(str(self.audio_source)) as src:
            if not src.streams.audio:
                logger.info("%s: no audio stream; writing %s without audio.", self.audio_source, self.path)
                return None
            audio = src.streams.audio[0]
            file_start = src.start_time / av.time_base if src.start_time is not None else 0.0
            # audio_start_s counts from the source's first video frame (its file start when audio only)
            origin = file_start
            if src.streams.video and src.streams.video[0].start_time is not None:
                origin = float(src.streams.video[0].start_time * src.streams.video[0].time_base)
            audio_end = None
            if audio.duration is not None and audio.start_time is not None:
                audio_end = float((audio.start_time + audio.duration) * audio.time_base)
        start = origin + self.audio_start_s
        if duration <= 0 or (audio_end is not None and start >= audio_end):
            logger.warning(
                "%s: no audio between %.3f s and %.3f s; writing %s without audio.",
                self.audio_source, self.audio_start_s, self.audio_start_s + duration, self.path,
            )
            return None
        return start - file_start, duration

    def _mux_audio(self, video_only: Path, out_path: Path) -> bool:
        """Copy the video stream of ``video_only`` and add ``audio_source``'s first audio stream, cut to
        :meth:`_audio_window` (FFmpeg decodes from the seek point and trims to the exact sample) and encoded
        to AAC, into ``out_path``. Returns False when there was no audio to add (nothing written)."""
        import imageio_ffmpeg

        window = self._audio_window()
        if window is None:
            return False
        start, duration = window
        command = [
            imageio_ffmpeg.get_ffmpeg_exe(), "-hide_banner", "-loglevel", "error", "-nostdin", "-y",
            "-i", str(video_only),
            "-ss", f"{start:.6f}", "-t", f"{duration:.6f}", "-i", str(self.audio_source),
            "-map", "0:v:0", "-map", "1:a:0", "-c:v", "copy", "-c:a", "aac", "-b:a", str(self.audio_bitrate),
            "-movflags", "+faststart", "-f", "mp4", str(out_path),
        ]
        result = subprocess.run(command, capture_output=True, text=True)
        if result.returncode != 0:
            raise VideoReadError(
                f"{self.audio_source}: FFmpeg could not add its audio to {self.path}: {result.stderr.strip()[-500:]}"
            )
        return True
