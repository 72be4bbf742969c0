"""Check every input and the output location before any expensive work.

A run loads a 14B model, extracts the driving expressions and samples for minutes to hours; a typo in the
output folder or an unreadable reference must not be found after that. :func:`check_run_inputs` runs in
seconds, before any model is loaded, and is shared by ``infer.py``, ``fast_infer.py`` and ``app.py``:

* the reference image decodes completely (EXIF, 16-bit, alpha handled; truncated files fail), and a
  warning is logged when no face is found in it;
* the driving video opens, has a video stream, and is not truncated (:func:`~flashportrait.video_io.
  probe_video`);
* the output folder exists or can be created, and is writable;
* the VAE encoding of the reference at the requested size fits in memory
  (:func:`~flashportrait.memory.estimate_reference_encoding_bytes`).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np
import torch

from .memory import available_memory_bytes, estimate_reference_encoding_bytes
from .reference_image import load_reference_image, reference_size
from .video_io import VideoInfo, probe_video
from .windows import latent_frames_for_video_frames

__all__ = ["check_run_inputs", "check_output_path", "reference_has_face"]

logger = logging.getLogger(__name__)


def check_output_path(path: str | os.PathLike) -> Path:
    """Check that an ``.mp4`` can be written at ``path`` (its folder exists or can be made, and is writable).

    Creates the folder if needed; writes nothing else.

    Raises:
        ValueError: not an ``.mp4`` name, a folder that cannot be created, or one without write permission.
    """
    path = Path(os.fspath(path)).expanduser()
    if path.suffix.lower() != ".mp4":
        raise ValueError(f"output must end in .mp4, got {path}")
    if path.is_dir():
        raise ValueError(f"output {path} is a folder; give a file name ending in .mp4")
    folder = path.parent
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ValueError(f"cannot create the output folder {folder} ({exc.strerror or exc})") from exc
    if not os.access(folder, os.W_OK | os.X_OK) or not (folder.stat().st_mode & 0o222):
        raise ValueError(f"the output folder {folder} is not writable; choose another --output / --save_path")
    return path


def reference_has_face(image) -> bool:
    """True if the bundled face detector finds a face in the (RGB PIL) reference image."""
    from .face.detector import create_detector

    faces = create_detector("retinaface").detect_batch([np.asarray(image.convert("RGB"))])[0]
    return bool(faces)


def check_run_inputs(
    reference: str | os.PathLike,
    driving_video: str | os.PathLike,
    output: str | os.PathLike,
    *,
    max_size: int,
    context_size: int,
    vae_base_dim: int,
    device: torch.device | str = "cpu",
    vae_dtype: torch.dtype = torch.float32,
) -> VideoInfo:
    """Check the inputs of one run (see the module docstring); log warnings for suspicious but usable inputs.

    Args:
        reference, driving_video, output: the files of the run.
        max_size: longer output side in pixels; context_size: window length in latent frames (the reference
            is encoded at one window's length).
        vae_base_dim: the VAE's base width (96 released), for the memory estimate.
        device, vae_dtype: where and in which dtype the VAE runs.

    Returns:
        The driving video's :class:`~flashportrait.video_io.VideoInfo`.

    Raises:
        ValueError (ImageReadError): the reference; VideoReadError: the driving video; ValueError: the
        output location, or a reference encoding that does not fit in memory.
    """
    image = load_reference_image(reference)
    if not reference_has_face(image):
        logger.warning(
            "%s: no face found in the reference image; FlashPortrait animates a portrait, the result will "
            "probably not follow the driving video.", reference,
        )
    info = probe_video(driving_video)
    check_output_path(output)
    width, height = reference_size(*image.size, max_size)
    frames = min(context_size, latent_frames_for_video_frames(info.num_frames))
    need = estimate_reference_encoding_bytes(width, height, frames, base_dim=vae_base_dim, dtype=vae_dtype)
    have = available_memory_bytes(torch.device(device))
    if have is not None and need > have:
        raise ValueError(
            f"encoding the reference at {width}x{height} needs about {need / 2**30:.1f} GiB, but only "
            f"{have / 2**30:.1f} GiB of {'GPU' if torch.device(device).type == 'cuda' else 'system'} memory is "
            "free; lower --max_size."
        )
    logger.info("inputs checked: reference %s, driving video %s (%d frames at %.3f fps), output %s",
                Path(reference).name, Path(driving_video).name, info.num_frames, info.fps, output)
    return info
