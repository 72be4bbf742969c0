"""What the web demo (``app.py``) does, without the web page: every event is a plain method from the page's
values to the page's values, so it is tested without a browser.

:class:`DemoApp` holds the one pipeline (built and placed once at start), the face detector and the job
state. Its events:

* :meth:`DemoApp.on_preview` (reference image, driving video, advanced settings) -> (strip of aligned driving
  faces, what will be made, status): finds and follows the face in the driving video and encodes its
  expressions (the first stage of a run, kept in memory so the run that follows reuses it), shows a strip
  of the aligned 224x224 face crops the expression encoder sees, and the output size, frame count, fps,
  audio and windows;
* :meth:`DemoApp.on_begin` (session) -> status: a run was asked for (before it waits for its turn);
* :meth:`DemoApp.on_generate` (reference, driving video, advanced settings, session, progress) -> (result
  video, files to download, status): one run, one at a time; the result goes to ``outputs/`` with the
  settings as JSON beside it; the uploads of the run are deleted afterwards;
* :meth:`DemoApp.on_cancel` (session) -> status: the session's run stops at the next sampling step (or the
  next frame batch of the expression extraction) and its memory is freed; a queued run does not start.

Errors: user errors (``ValueError`` and its subclasses ``VideoReadError``, ``ImageReadError``,
``CheckpointError``; ``FileNotFoundError``; :class:`~flashportrait.face.FaceTrackingError` and
``NoFaceError``) become one readable line in the status (upload paths replaced by "the driving video
(name.mp4)"); anything else is logged with its traceback on the server and the page says an internal error
happened. No event raises, so the server keeps serving.

Progress: ``progress`` is any callable ``progress(fraction in [0, 1], desc=str)`` (``gr.Progress`` is one).
The expression extraction's bars (face detection, then encoding, frame by frame) and the pipeline's sampling
bar (``pipe.progress_bar``, replaced for the run: one tick per step, the current window in its postfix) feed
one bar for the whole run; decoding is reported from ``callback_on_step_end`` after the last step, which is
also where a cancel stops the run.

Length: the page's settings, messages, progress adapter and events are one concept (what the demo does) and
nothing else uses them; split it when a second front end needs a part.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import gc
import hashlib
import json
import logging
import math
import os
import re
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import numpy as np
import torch

from . import __version__
from .atomic import atomic_write_text
from .config import MAX_RELEASED_SIZE, VAE_TEMPORAL_FACTOR
from .guidance import plan_guidance
from .sampling import SAMPLERS, make_scheduler
from .windows import context_windows, latent_frames_for_video_frames, usable_video_frames

__all__ = [
    "ADVANCED_FIELDS",
    "AppLimits",
    "JobSettings",
    "JobCancelled",
    "DemoApp",
    "user_message",
    "aligned_face_strip",
    "upload_size_error",
]

logger = logging.getLogger(__name__)

#: the shorter side of a reference image must be at least this many pixels (the face must be visible)
MIN_REFERENCE_SIDE = 128
#: aligned face crops in the preview strip, and the side of each in the strip (pixels)
PREVIEW_CROPS = 8
PREVIEW_CROP_SIZE = 96
#: the advanced settings of the page, in the order the page passes them to the events
ADVANCED_FIELDS = (
    "prompt",
    "num_inference_steps",
    "context_size",
    "context_overlap",
    "emo_cfg_scale",
    "text_cfg_scale",
    "seed",
    "max_size",
    "sampler",
)
#: fractions of the progress bar for the stages of a run: expression extraction, sampling, decoding
_EXTRACT_END, _SAMPLE_END = 0.10, 0.95


class JobCancelled(Exception):
    """Raised inside a run when its session pressed cancel (caught by :meth:`DemoApp.on_generate`)."""


@dataclass(frozen=True)
class AppLimits:
    """What the server accepts.

    Attributes:
        max_upload_bytes: largest reference image or driving video, in bytes.
        max_frames: use at most this many driving frames (``None``: all).
        max_size: largest longer output side in pixels (the page's slider maximum).
        min_reference_side: smallest shorter side of the reference image in pixels.
    """

    max_upload_bytes: int = 200 * 2**20
    max_frames: int | None = None
    max_size: int = MAX_RELEASED_SIZE
    min_reference_side: int = MIN_REFERENCE_SIDE


@dataclass(frozen=True)
class JobSettings:
    """The page's advanced settings (units as the flags of the same names in :mod:`flashportrait.args`).

    ``context_size`` and ``context_overlap`` are in latent frames (one latent frame = 4 video frames),
    ``max_size`` is the longer output side in pixels, ``sampler`` one of :data:`~flashportrait.sampling.SAMPLERS`.
    """

    prompt: str
    num_inference_steps: int
    context_size: int
    context_overlap: int
    emo_cfg_scale: float
    text_cfg_scale: float
    seed: int
    max_size: int
    sampler: str

    @classmethod
    def from_values(cls, values: Sequence) -> JobSettings:
        """From the page's values in :data:`ADVANCED_FIELDS` order (numbers may come as floats or strings).

        Raises:
            ValueError: a missing or non-numeric value (the message names the setting).
        """
        if len(values) != len(ADVANCED_FIELDS):
            raise ValueError(f"expected {len(ADVANCED_FIELDS)} settings ({', '.join(ADVANCED_FIELDS)}), got {len(values)}")
        raw = dict(zip(ADVANCED_FIELDS, values))
        out = {"prompt": "" if raw["prompt"] is None else str(raw["prompt"]), "sampler": str(raw["sampler"])}
        for name in ("num_inference_steps", "context_size", "context_overlap", "seed", "max_size"):
            out[name] = _whole_number(raw[name], _LABELS[name])
        for name in ("emo_cfg_scale", "text_cfg_scale"):
            out[name] = _number(raw[name], _LABELS[name])
        return cls(**out)

    def values(self) -> list:
        """The values in :data:`ADVANCED_FIELDS` order (the page's initial values)."""
        return [getattr(self, name) for name in ADVANCED_FIELDS]

    def check(self, limits: AppLimits) -> None:
        """Refuse settings that are out of range or contradict each other, naming them as the page does.

        Raises:
            ValueError: the first problem found.
        """
        if self.num_inference_steps < 1:
            raise ValueError(f"{_LABELS['num_inference_steps']} must be at least 1, got {self.num_inference_steps}.")
        if self.context_size < 1:
            raise ValueError(f"{_LABELS['context_size']} must be at least 1 latent frame, got {self.context_size}.")
        if not 0 <= self.context_overlap < self.context_size:
            raise ValueError(
                f"{_LABELS['context_overlap']} ({self.context_overlap}) must be smaller than the "
                f"{_LABELS['context_size']} ({self.context_size}): consecutive windows share the overlap. "
                f"Lower the overlap to at most {self.context_size - 1} or lengthen the window."
            )
        if not 16 <= self.max_size <= limits.max_size:
            raise ValueError(f"{_LABELS['max_size']} must be between 16 and {limits.max_size} pixels, got {self.max_size}.")
        for name in ("emo_cfg_scale", "text_cfg_scale"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value >= 0):
                raise ValueError(f"{_LABELS[name]} must be a number >= 0, got {value}.")
        if self.sampler not in SAMPLERS:
            raise ValueError(f"{_LABELS['sampler']} must be one of {', '.join(SAMPLERS)}, got {self.sampler!r}.")
        if not 0 <= self.seed < 2**63:
            raise ValueError(f"{_LABELS['seed']} must be between 0 and 2^63 - 1, got {self.seed}.")


_LABELS = {
    "prompt": "Prompt",
    "num_inference_steps": "Sampling steps",
    "context_size": "Window length",
    "context_overlap": "Window overlap",
    "emo_cfg_scale": "Expression guidance",
    "text_cfg_scale": "Text guidance",
    "seed": "Seed",
    "max_size": "Max size",
    "sampler": "Sampler",
}


def _whole_number(value, label: str) -> int:
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{label}: expected a whole number, got {value!r}.") from None
    if not math.isfinite(number) or number != int(number):
        raise ValueError(f"{label}: expected a whole number, got {value!r}.")
    return int(number)


def _number(value, label: str) -> float:
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{label}: expected a number, got {value!r}.") from None
    return number


# --- messages ----------------------------------------------------------------------------------------------


def user_errors() -> tuple[type[BaseException], ...]:
    """The exception types that are the user's to fix (shown as a message, not logged as a bug)."""
    from .cli import user_errors as cli_user_errors

    return cli_user_errors()


def user_message(exc: BaseException, names: dict[str, str] | None = None) -> str:
    """One readable line for a user error: the exception's message with server paths replaced.

    Args:
        exc: the error.
        names: ``{server path: what the user calls it}``, e.g. ``{"/tmp/gradio/ab12/talk.mp4": "the driving
            video (talk.mp4)"}``; longer paths are replaced first.
    """
    text = str(exc).strip() or type(exc).__name__
    for path, name in sorted((names or {}).items(), key=lambda item: -len(item[0])):
        if path:
            text = text.replace(f"{path}: ", f"{name}: ").replace(path, name)
    return text


def upload_size_error(path: str | os.PathLike, what: str, max_bytes: int) -> str | None:
    """The message for a file above ``max_bytes``, or ``None`` when it fits (or is not there: reading it says so)."""
    if not Path(path).is_file():
        return None
    size = Path(path).stat().st_size
    if size <= max_bytes:
        return None
    return f"{what} is {_size(size)}; this server accepts files up to {_size(max_bytes)}. Use a shorter or smaller file."


def _size(num_bytes: int) -> str:
    return f"{num_bytes / 2**20:.1f} MB" if num_bytes >= 2**20 else f"{num_bytes / 2**10:.0f} KB"


def _status(kind: str, text: str) -> str:
    """Markdown for the status line: ``kind`` is ``error``, ``done``, ``info`` or ``cancelled``."""
    prefix = {"error": "**Error:** ", "done": "**Done:** ", "cancelled": "**Cancelled:** ", "info": ""}[kind]
    return prefix + text


# --- preview -----------------------------------------------------------------------------------------------


def aligned_face_strip(video, landmarks, frame_indices, count: int = PREVIEW_CROPS,
                       crop_size: int = PREVIEW_CROP_SIZE, released: bool = False) -> np.ndarray:
    """Up to ``count`` aligned face crops, evenly spaced over the frames used, side by side.

    Args:
        video: the driving video; landmarks: float ``[N, 5, 2]`` source-frame points; frame_indices: int
            ``[N]`` source frame of each row (sorted); as in :class:`~flashportrait.expression.ExpressionFeatures`.
        count: crops in the strip; crop_size: side of each crop in the strip, in pixels.
        released: the crops of the authors' face tracker (features whose ``settings["backend"]`` is
            ``"released"``).

    Returns:
        uint8 ``[crop_size, k * crop_size, 3]`` RGB, ``k = min(count, N)``: the 224x224 crops the expression
        encoder sees (:func:`~flashportrait.expression.iter_aligned_crops`), resized.
    """
    import cv2

    from .expression import iter_aligned_crops

    landmarks, frame_indices = np.asarray(landmarks), np.asarray(frame_indices)
    rows = np.unique(np.linspace(0, len(frame_indices) - 1, num=min(count, len(frame_indices))).round().astype(int))
    crops = [
        cv2.resize(crop, (crop_size, crop_size), interpolation=cv2.INTER_AREA)
        for crop, _ in iter_aligned_crops(video, landmarks[rows], frame_indices[rows], released=released)
    ]
    return np.concatenate(crops, axis=1)


@dataclass
class _Features:
    """Expression features of one upload, kept between the preview and the run."""

    key: tuple
    features: object  # ExpressionFeatures


# --- progress ----------------------------------------------------------------------------------------------


class _RunProgress:
    """One progress bar for a whole run, fed by the pipeline's tqdm bars; checks for cancellation.

    Extraction bars (face detection, then expression encoding) share ``[0, extract_end)`` in the order they
    are created; the sampling bar (``total`` = steps, the current window in its postfix as ``window k/n``) fills
    ``[0.10, 0.95)`` window by window; decoding is ``[0.95, 1]``. Every report first checks ``stop``.
    """

    def __init__(self, report: Callable | None, stop: threading.Event, num_inference_steps: int,
                 extract_end: float = _EXTRACT_END):
        self.report = report
        self.extract_end = extract_end
        self.stop = stop
        self.steps = num_inference_steps
        self.extract_bars = 0
        self.stage = "extraction"  # then "preparing", "sampling", "decoding"
        self.step = 0  # sampling steps done
        self.window = (0, 1)  # (windows of the current step done, windows per step)

    def check(self) -> None:
        """Raise :class:`JobCancelled` when cancel was pressed."""
        if self.stop.is_set():
            raise JobCancelled

    def __call__(self, fraction: float, desc: str) -> None:
        self.check()
        if self.report is not None:
            self.report(min(max(fraction, 0.0), 1.0), desc=desc)

    def extraction_bar(self, iterable=None, total=None, **_):
        """A bar factory for :func:`~flashportrait.expression.extract_expression_features` (``progress=``)."""
        self.extract_bars += 1
        part = min(self.extract_bars, 2) - 1  # detection, then encoding
        return _Bar(self, total, lambda done, desc: self(self.extract_end * (part + done) / 2, desc))

    def sampling_bar(self, iterable=None, total=None, **_):
        """Stands in for ``pipe.progress_bar`` during the run (the pipeline makes its sampling bar with it)."""
        if iterable is not None:  # not used by the pipeline; kept so the signature matches diffusers'
            return iterable
        self.stage = "sampling"
        return _Bar(self, total, self._sampling_report, postfix=self._on_postfix)

    def _on_postfix(self, text: str) -> None:
        match = re.search(r"window (\d+)/(\d+)", text)
        if match:
            self.window = (int(match.group(1)) - 1, int(match.group(2)))
            self._sampling_report(None, "")

    def _sampling_report(self, done, desc) -> None:
        if done is not None:  # a step finished
            self.step = round(done * self.steps)
            self.window = (0, self.window[1])
        done_windows, windows = self.window
        fraction = min(self.step + done_windows / windows, self.steps) / self.steps
        where = f"step {min(self.step + 1, self.steps)}/{self.steps}"
        if windows > 1:
            where += f", window {done_windows + 1}/{windows}"
        if self.step >= self.steps:
            where = f"{self.steps}/{self.steps} steps"
        self(_EXTRACT_END + (_SAMPLE_END - _EXTRACT_END) * fraction, f"Sampling: {where}")

    def on_step_end(self, pipe, step: int, timestep, callback_kwargs: dict) -> dict:
        """diffusers' ``callback_on_step_end``: stop here when cancel was pressed; after the last step say
        that decoding starts."""
        self.check()
        if step + 1 >= self.steps:
            self.stage = "decoding"
            self(_SAMPLE_END, "Decoding the video and adding the audio")
        return {}


class _Bar:
    """The part of tqdm's interface the pipeline and the expression extraction use."""

    def __init__(self, run: _RunProgress, total, report: Callable, postfix: Callable | None = None):
        self.run, self.total, self.n, self.desc = run, total or 0, 0, ""
        self._report, self._postfix = report, postfix
        run.check()

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def set_description(self, desc: str = "", refresh: bool = True) -> None:
        self.desc = desc
        self._report(self.n / self.total if self.total else 0.0, _describe(desc))

    def set_postfix_str(self, s: str = "", refresh: bool = True) -> None:
        self.run.check()
        if self._postfix is not None:
            self._postfix(s)

    def update(self, n: int = 1) -> None:
        self.n += n
        self._report(self.n / self.total if self.total else 0.0, _describe(self.desc))

    def close(self) -> None:
        pass


def _describe(desc: str) -> str:
    """The extraction bars' descriptions for the page."""
    if desc.startswith(("detect faces", "track faces")):
        return "Finding and following the face in the driving video"
    if desc.startswith("encode expressions"):
        return "Encoding the driving expressions"
    return desc


# --- jobs --------------------------------------------------------------------------------------------------


@dataclass
class _Job:
    session: str
    stop: threading.Event = dataclasses.field(default_factory=threading.Event)
    done: threading.Event = dataclasses.field(default_factory=threading.Event)
    message: str = ""


class DemoApp:
    """The demo's state and events (see the module docstring).

    Args:
        pipe: a :class:`~flashportrait.pipeline.FlashPortraitPipeline` with a motion encoder, already placed
            by :func:`~flashportrait.memory.configure_memory`.
        args: the server's parsed flags (``app.py``'s parser: :mod:`flashportrait.args` groups): the base of
            every run's settings, resolved per run by :func:`~flashportrait.args.resolve_settings`.
        outputs_dir: where results and their settings JSON go.
        limits: what the server accepts.
        upload_root: the folder uploads arrive in (Gradio's temporary folder); only files inside it are
            deleted after a run. ``None``: no upload is deleted.
        model_description: what the settings JSON records as the model (``"tiny"`` or the checkpoint files).
        detector: the face detector (default: the bundled RetinaFace, made once).
        call_kwargs: extra keyword arguments for every pipeline call (e.g. the accelerated sampler's).
    """

    def __init__(self, pipe, args: argparse.Namespace, *, outputs_dir: str | os.PathLike = "outputs",
                 limits: AppLimits | None = None, upload_root: str | os.PathLike | None = None,
                 model_description: str | dict = "", detector=None, call_kwargs: dict | None = None):
        from .args import resolve_settings
        from .face.detector import create_detector

        if getattr(pipe, "motion_encoder", None) is None:
            raise ValueError("the demo needs a pipeline with a motion encoder (--pd_fpg_model_path) to read driving videos")
        self.pipe = pipe
        self.args = args
        self.outputs_dir = Path(outputs_dir)
        self.limits = limits or AppLimits()
        self.upload_root = Path(upload_root).resolve() if upload_root is not None else None
        self.model_description = model_description
        self.detector = detector if detector is not None else create_detector("retinaface")
        self.call_kwargs = dict(call_kwargs or {})
        # the expression settings of infer.py for these flags (the authors' face tracker when its files are
        # given, --max_frames, --fps), made once; no disk cache: nothing derived from uploads stays on disk
        resolved = resolve_settings(args)
        self.expression_kwargs = {k: v for k, v in resolved.call_kwargs(args)["expression_kwargs"].items()
                                  if k != "cache_dir"}
        self.expression_kwargs.pop("max_frames", None)
        if self.limits.max_frames is not None:
            self.expression_kwargs["max_frames"] = self.limits.max_frames
        if getattr(args, "fps", None) is not None:
            self.expression_kwargs["target_fps"] = float(args.fps)
        self._resolved = resolved
        self._gpu = threading.Lock()  # one job on the accelerator at a time (also behind Gradio's queue)
        self._state = threading.Lock()
        self._job: _Job | None = None
        self._pending: set[str] = set()
        self._cancelled: set[str] = set()
        self._features: _Features | None = None

    # -- settings ---------------------------------------------------------------------------------------

    def default_settings(self) -> JobSettings:
        """The page's initial advanced settings, from the server's flags (``--tiny`` defaults included)."""
        resolved = self._resolved
        return JobSettings(
            prompt=self.args.prompt,
            num_inference_steps=resolved.num_inference_steps,
            context_size=resolved.context_size,
            context_overlap=resolved.context_overlap,
            emo_cfg_scale=float(self.args.emo_cfg_scale),
            text_cfg_scale=float(self.args.text_cfg_scale),
            seed=int(self.args.seed),
            max_size=min(resolved.max_size, self.limits.max_size),
            sampler=self.args.sampler,
        )

    def _run_args(self, settings: JobSettings) -> argparse.Namespace:
        """The server's flags with the page's settings in place (one window-length flag: ``context_size``)."""
        values = vars(self.args).copy()
        values.update({name: getattr(settings, name) for name in ADVANCED_FIELDS})
        values.update(sub_num_frames=None, latents_num_frames=None, allow_large_size=True)
        return argparse.Namespace(**values)

    # -- checks -----------------------------------------------------------------------------------------

    def _names(self, image, video) -> dict[str, str]:
        names = {}
        if image:
            names[str(image)] = f"the reference image ({Path(image).name})"
        if video:
            names[str(video)] = f"the driving video ({Path(video).name})"
        return names

    def check_image(self, image) -> object:
        """The reference as an RGB PIL image, after the size checks.

        Raises:
            ValueError (ImageReadError): unreadable, too large a file, or too small a picture.
        """
        from .reference_image import load_reference_image

        message = upload_size_error(image, f"the reference image ({Path(image).name})", self.limits.max_upload_bytes)
        if message:
            raise ValueError(message)
        picture = load_reference_image(image)
        width, height = picture.size
        if min(width, height) < self.limits.min_reference_side:
            raise ValueError(
                f"the reference image ({Path(image).name}) is only {width}x{height} pixels; use one whose shorter "
                f"side is at least {self.limits.min_reference_side} pixels, with the face clearly visible."
            )
        return picture

    def check_video(self, video):
        """The driving video's :class:`~flashportrait.video_io.VideoInfo`, after the size and length checks.

        Raises:
            ValueError (VideoReadError): unreadable, too large a file, or too short.
        """
        from .video_io import probe_video

        message = upload_size_error(video, f"the driving video ({Path(video).name})", self.limits.max_upload_bytes)
        if message:
            raise ValueError(message)
        info = probe_video(video)
        need = VAE_TEMPORAL_FACTOR + 1
        if info.num_frames < need:
            raise ValueError(
                f"the driving video ({Path(video).name}) is too short: {info.num_frames} frame(s); it needs at "
                f"least {need} frames ({need / info.fps:.2f} s at its {info.fps:g} fps)."
            )
        return info

    # -- expression features ----------------------------------------------------------------------------

    def _expression_features(self, video, run: _RunProgress):
        """The driving video's :class:`~flashportrait.expression.ExpressionFeatures`, extracted once per
        upload (kept in memory, never on disk) and reused by the run that follows its preview."""
        from .expression import extract_expression_features

        stat = Path(video).stat()
        key = (str(Path(video).resolve()), stat.st_size, stat.st_mtime_ns)
        if self._features is not None and self._features.key == key:
            return self._features.features
        self._features = None
        features = extract_expression_features(
            video, self.pipe.motion_encoder, device=self.pipe._execution_device, detector=self.detector,
            cache=False, progress=run.extraction_bar, **self.expression_kwargs,
        )
        self._features = _Features(key, features)
        return features

    def _plan(self, features, settings: JobSettings) -> dict:
        """Frames, windows and model passes of a run on these features (for the preview and the JSON)."""
        used = usable_video_frames(len(features))
        latent = latent_frames_for_video_frames(used)
        windows = context_windows(latent, settings.context_size, settings.context_overlap)
        passes = plan_guidance(settings.text_cfg_scale, settings.emo_cfg_scale).num_branches
        return {"driving_frames": len(features), "output_frames": used - 1, "fps": float(features.fps),
                "latent_frames": latent, "windows": len(windows), "window_length": len(windows[0]),
                "guidance_passes": passes}

    # -- events -----------------------------------------------------------------------------------------

    def on_preview(self, image, video, *advanced, progress: Callable | None = None
                   ) -> tuple[np.ndarray | None, str, str]:
        """Preview what a run will make.

        Args:
            image, video: the uploaded files' paths (``None`` when not uploaded yet).
            advanced: the page's settings in :data:`ADVANCED_FIELDS` order.
            progress: ``progress(fraction, desc=...)`` for the expression extraction.

        Returns:
            ``(strip, info, status)``: the aligned driving faces (uint8 ``[96, k * 96, 3]``, ``None`` without
            a video or on an error), a Markdown description of the output (size, frames, fps, audio, windows,
            passes), and a Markdown status line (errors as ``**Error:** ...``).
        """
        names = self._names(image, video)
        try:
            settings = JobSettings.from_values(advanced)
            settings.check(self.limits)
            lines = []
            if image:
                lines.extend(self._describe_image(image, settings))
            strip = None
            if video:
                info = self.check_video(video)
                with self._gpu:
                    features = self._expression_features(video, _RunProgress(progress, threading.Event(), 1, 1.0))
                strip = aligned_face_strip(video, features.landmarks, features.frame_indices,
                                           released=features.settings.get("backend") == "released")
                lines.extend(self._describe_video(features, info, settings))
            if not lines:
                return None, "", _status("info", "Upload a reference portrait and a driving video (or click an example).")
            missing = " Now upload a driving video." if not video else " Now upload a reference portrait." if not image else ""
            return strip, "\n".join(lines), _status("info", "Preview ready." + missing)
        except user_errors() as exc:
            return None, "", _status("error", user_message(exc, names))
        except Exception:  # noqa: BLE001 - a bug: logged with its traceback, the page stays usable
            logger.exception("preview failed")
            return None, "", _status("error", "internal error while making the preview (details in the server log).")

    def _describe_image(self, image, settings: JobSettings) -> list[str]:
        from .preflight import reference_has_face
        from .reference_image import reference_size

        picture = self.check_image(image)
        width, height = reference_size(*picture.size, settings.max_size)
        lines = [f"- **Output size:** {width}x{height} pixels (reference {picture.size[0]}x{picture.size[1]}, "
                 f"longer side {settings.max_size} rounded up to multiples of 16)"]
        with self._gpu:
            has_face = reference_has_face(picture)
        if not has_face:
            lines.append("- **Warning:** no face found in the reference image; the result will probably not "
                         "follow the driving video.")
        return lines

    def _describe_video(self, features, info, settings: JobSettings) -> list[str]:
        plan = self._plan(features, settings)
        seconds = plan["output_frames"] / plan["fps"]
        audio = "with the driving video's audio" if info.has_audio else "silent (the driving video has no audio)"
        lines = [
            f"- **Output:** {plan['output_frames']} frames at {plan['fps']:g} fps ({seconds:.2f} s), {audio}",
            f"- **Driving face:** detected in {int(features.detected.sum())} of {len(features)} frames"
            + (f" ({features.num_interpolated} filled in between)" if features.num_interpolated else ""),
            f"- **Sampling:** {plan['latent_frames']} latent frames in {plan['windows']} window(s) of "
            f"{plan['window_length']} (overlap {settings.context_overlap}); {settings.num_inference_steps} steps x "
            f"{plan['windows']} window(s) x {plan['guidance_passes']} guidance pass(es) = "
            f"{settings.num_inference_steps * plan['windows'] * plan['guidance_passes']} model passes",
        ]
        if self.limits.max_frames is not None and info.num_frames > len(features):
            lines.append(f"- **Note:** only the first {len(features)} of {info.num_frames} frames are used "
                         "(this server's --max_frames)")
        return lines

    def on_begin(self, session: str) -> str:
        """A run was asked for: remember it so that cancel can drop it while it waits for its turn."""
        with self._state:
            self._pending.add(session)
            self._cancelled.discard(session)
            busy = self._job is not None
        return _status("info", "Waiting for the running job to finish (one job at a time)..." if busy else "Starting...")

    def on_cancel(self, session: str, wait_s: float = 30.0) -> str:
        """Stop the session's run at the next sampling step (or drop it if it has not started).

        Waits up to ``wait_s`` seconds for the run to stop and says where it stopped.
        """
        with self._state:
            job = self._job if self._job is not None and self._job.session == session else None
            if job is None:
                if session in self._pending:
                    self._cancelled.add(session)
                    return _status("cancelled", "your run will not start.")
                return _status("info", "Nothing to cancel.")
            job.stop.set()
        if job.done.wait(wait_s):
            return job.message
        return _status("info", "Stopping at the end of the current sampling step...")

    def on_generate(self, image, video, *advanced, session: str = "", progress: Callable | None = None
                    ) -> tuple[str | None, list[str], str]:
        """One run: reference + driving video -> ``outputs/<name>.mp4`` (+ ``.json`` with the settings).

        Args:
            image, video: the uploaded files' paths (``None`` when missing).
            advanced: the page's settings in :data:`ADVANCED_FIELDS` order.
            session: the page session (cancel stops only its own run).
            progress: ``progress(fraction, desc=...)``, e.g. ``gr.Progress()``.

        Returns:
            ``(video, files, status)``: the result's path (``None`` on an error or cancel), the files to offer
            for download (the video and its settings JSON), and the Markdown status line.

        Uploads: the uploaded files of a run that started (past the input checks) are deleted afterwards,
        whatever the outcome; files outside ``upload_root`` are never touched.
        """
        names = self._names(image, video)
        with self._state:
            self._pending.discard(session)
            if session in self._cancelled:
                self._cancelled.discard(session)
                return None, [], _status("cancelled", "the run was cancelled before it started.")
        try:
            if not image or not video:
                raise ValueError("upload a reference portrait and a driving video first (or click an example).")
            settings = JobSettings.from_values(advanced)
            settings.check(self.limits)
            self.check_image(image)
            self.check_video(video)
        except user_errors() as exc:
            return None, [], _status("error", user_message(exc, names))
        except Exception:  # noqa: BLE001
            logger.exception("input check failed")
            return None, [], _status("error", "internal error while checking the inputs (details in the server log).")

        job = _Job(session)
        with self._gpu:
            with self._state:
                self._job = job
            run = _RunProgress(progress, job.stop, settings.num_inference_steps)
            try:
                path, settings_path, summary = self._run(image, video, settings, run)
                job.message = _status("done", summary)
                return str(path), [str(path), str(settings_path)], job.message
            except JobCancelled:
                where = {"extraction": "during the expression extraction",
                         "preparing": "before sampling",
                         "sampling": f"after {run.step} of {settings.num_inference_steps} sampling steps",
                         "decoding": "before decoding"}[run.stage]
                job.message = _status("cancelled", f"stopped {where}; nothing was written and the memory was freed.")
                return None, [], job.message
            except user_errors() as exc:
                job.message = _status("error", user_message(exc, names))
                return None, [], job.message
            except Exception:  # noqa: BLE001
                logger.exception("run failed")
                job.message = _status("error", "internal error during the run (details in the server log).")
                return None, [], job.message
            finally:
                self._free_memory()
                self.delete_uploads([image, video])
                with self._state:
                    self._job = None
                job.done.set()

    def _run(self, image, video, settings: JobSettings, run: _RunProgress) -> tuple[Path, Path, str]:
        from .args import resolve_settings
        from .preflight import check_run_inputs

        started = time.monotonic()
        run_args = self._run_args(settings)
        resolved = resolve_settings(run_args)
        path = self._output_path()
        check_run_inputs(image, video, path, max_size=resolved.max_size, context_size=resolved.context_size,
                         vae_base_dim=int(self.pipe.vae.config.base_dim), device=resolved.device)
        run(0.0, "Reading the driving video")
        features = self._expression_features(video, run)
        run.stage = "preparing"
        run(_EXTRACT_END, "Preparing the conditioning")
        # the features are extracted above with the app's expression settings (its tracker made once)
        if getattr(resolved, "face_tracker_models", None) is not None:
            resolved = dataclasses.replace(resolved, face_tracker_models=None)
        kwargs = resolved.call_kwargs(run_args)
        kwargs.pop("expression_kwargs")
        kwargs.update(fps=float(features.fps), audio_source=video, output_path=path, output_type=None,
                      callback_on_step_end=run.on_step_end, **self.call_kwargs)
        self.pipe.scheduler = make_scheduler(settings.sampler, float(self.args.shift))
        with _replace_progress_bar(self.pipe, run.sampling_bar):
            out = self.pipe(image, expression_features=features.features, **kwargs)
        if run.report is not None:  # written: a cancel pressed now comes too late
            run.report(1.0, desc="Done")
        from .video_io import probe_video

        info = probe_video(path)
        record = {
            "created": datetime.now().isoformat(timespec="seconds"),
            "flashportrait": __version__,
            "model": self.model_description,
            "inputs": {
                "reference_image": Path(image).name,
                "reference_image_sha256": _sha256(image),
                "driving_video": Path(video).name,
                "driving_video_sha256": _sha256(video),
            },
            "settings": {**dataclasses.asdict(settings), "negative_prompt": run_args.negative_prompt,
                         "shift": float(self.args.shift), "max_frames": self.limits.max_frames,
                         "fps": self.expression_kwargs.get("target_fps"),
                         "face_tracker": "released" if "tracker" in self.expression_kwargs else "bundled",
                         "device": str(resolved.device), "dtype": str(resolved.dtype).replace("torch.", ""),
                         **{k: _jsonable(v) for k, v in self.call_kwargs.items()}},
            "plan": self._plan(features, settings),
            "output": {"file": path.name, "frames": info.num_frames, "fps": info.fps, "width": info.width,
                       "height": info.height, "audio": info.has_audio},
            "seconds": round(time.monotonic() - started, 2),
        }
        settings_path = path.with_suffix(".json")
        _write_json(settings_path, record)
        summary = (f"{out.num_frames} frames at {out.fps:g} fps, {info.width}x{info.height}"
                   f"{', with audio' if info.has_audio else ''}, in {record['seconds']:.1f} s; saved as {path.name} "
                   f"(settings in {settings_path.name}).")
        return path, settings_path, summary

    def _output_path(self) -> Path:
        """``outputs/flashportrait-YYYYmmdd-HHMMSS[-k].mp4``, a name not taken yet."""
        self.outputs_dir.mkdir(parents=True, exist_ok=True)
        stem = datetime.now().strftime("flashportrait-%Y%m%d-%H%M%S")
        path, k = self.outputs_dir / f"{stem}.mp4", 1
        while path.exists() or path.with_suffix(".json").exists():
            k += 1
            path = self.outputs_dir / f"{stem}-{k}.mp4"
        return path

    def _free_memory(self) -> None:
        """Drop what a run left: offload hooks back to the CPU, Python garbage, the CUDA cache."""
        with contextlib.suppress(Exception):
            self.pipe.maybe_free_model_hooks()
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    def delete_uploads(self, paths: Sequence) -> list[Path]:
        """Delete uploaded files (and their then-empty folders) inside ``upload_root``; return what was
        deleted. Paths outside it (examples, files given on the server) are left alone."""
        if self.upload_root is None:
            return []
        deleted = []
        for item in paths:
            if not item:
                continue
            path = Path(item).resolve()
            if self.upload_root not in path.parents or not path.is_file():
                continue
            path.unlink(missing_ok=True)
            deleted.append(path)
            folder = path.parent
            while folder != self.upload_root and self.upload_root in folder.parents:
                try:
                    folder.rmdir()  # only when empty
                except OSError:
                    break
                folder = folder.parent
        if self._features is not None and Path(self._features.key[0]) in deleted:
            self._features = None  # features of a deleted upload are not kept either
        return deleted


@contextlib.contextmanager
def _replace_progress_bar(pipe, factory):
    """Let ``pipe.progress_bar(total=...)`` return ``factory``'s bars while the block runs (an instance
    attribute in front of diffusers' method; removed afterwards)."""
    pipe.progress_bar = factory
    try:
        yield
    finally:
        del pipe.progress_bar


def _jsonable(value):
    """A settings value for the JSON record (dataclasses as dicts, other objects as their repr)."""
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {k: _jsonable(v) for k, v in dataclasses.asdict(value).items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return repr(value)


def _sha256(path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


def _write_json(path: Path, data: dict) -> None:
    """Write ``data`` as JSON atomically (temporary file in the same folder, then rename)."""
    atomic_write_text(path, json.dumps(data, indent=2, ensure_ascii=False) + "\n")
