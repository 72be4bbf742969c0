"""Demo inputs made on the spot, with nothing downloaded.

The reference portrait is scikit-image's bundled ``astronaut`` photograph (Eileen Collins, NASA, public
domain; ``skimage/data/astronaut.png`` inside the scikit-image wheel). The driving clip is made from the
same photo: a face crop that nods, turns and zooms smoothly, so the face detector and the whole
pipeline have a real face to work on. Used by ``infer.py --tiny`` when no inputs are given and by
``examples/make_demo_inputs.py``.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np

#: centre (x, y) and side of the square head crop in the 512 x 512 astronaut photo, in pixels
_HEAD_CROP = (200.0, 135.0, 260.0)


def demo_reference_image() -> np.ndarray:
    """The astronaut photo, RGB uint8 ``[512, 512, 3]``.

    Raises:
        RuntimeError: scikit-image (which ships the photo) is not installed.
    """
    try:
        from skimage import data
    except ImportError as exc:  # pragma: no cover - it is in requirements.txt
        raise RuntimeError("the demo photo ships with scikit-image: pip install scikit-image") from exc
    return np.ascontiguousarray(data.astronaut())


def demo_driving_frames(num_frames: int = 49, size: int = 256) -> np.ndarray:
    """A synthetic head-motion clip of the demo face: RGB uint8 ``[num_frames, size, size, 3]``.

    Each frame is a similarity warp of the face region (rotation up to 6 degrees, shifts up to 4 % of the
    crop, zoom up to 5 %) following slow sinusoids, so consecutive frames move smoothly.
    """
    import cv2

    image = demo_reference_image()
    cx, cy, side = _HEAD_CROP
    frames = np.empty((num_frames, size, size, 3), dtype=np.uint8)
    for i in range(num_frames):
        t = 2 * math.pi * i / max(num_frames - 1, 1)
        angle = 6.0 * math.sin(t)
        zoom = 1.0 + 0.05 * math.sin(2 * t)
        shift_x, shift_y = 0.04 * side * math.sin(t + 1.0), 0.03 * side * math.sin(2 * t)
        scale = size / side * zoom
        matrix = cv2.getRotationMatrix2D((cx + shift_x, cy + shift_y), angle, scale)
        matrix[:, 2] += np.array([size / 2, size / 2]) - np.array([cx + shift_x, cy + shift_y])
        frames[i] = cv2.warpAffine(image, matrix, (size, size), flags=cv2.INTER_CUBIC, borderMode=cv2.BORDER_REPLICATE)
    return frames


def write_demo_inputs(folder: str | os.PathLike, num_frames: int = 49, fps: float = 25.0) -> tuple[Path, Path]:
    """Write ``reference.png`` and ``driving.mp4`` (H.264, ``fps``) into ``folder``; return their paths.

    Files that already exist are kept (the content is deterministic).
    """
    from PIL import Image

    from .video_io import StreamingVideoWriter

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    reference, driving = folder / "reference.png", folder / "driving.mp4"
    if not reference.exists():
        tmp = reference.with_suffix(".tmp.png")
        Image.fromarray(demo_reference_image()).save(tmp)
        os.replace(tmp, reference)
    if not driving.exists():
        with StreamingVideoWriter(driving, fps) as writer:
            writer.write(demo_driving_frames(num_frames))
    return reference, driving
