"""What every command-line entry point shares: user errors as one clear line, not a traceback."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from typing import Any


def user_errors() -> tuple[type[BaseException], ...]:
    """Exception types that describe a problem with the user's input, files or flags.

    ``ValueError`` covers argument checks and :class:`~flashportrait.checkpoints.CheckpointError`;
    video and face errors name the file and the frames.
    """
    from .face.tracking import FaceTrackingError
    from .video_io import VideoReadError

    return (ValueError, FileNotFoundError, NotADirectoryError, VideoReadError, FaceTrackingError)


def run_main(main: Callable[[Any], Any], args: Any) -> int:
    """Run ``main(args)``; print a user error as ``error: <message>`` and return 2 (no traceback).

    Set ``FLASHPORTRAIT_DEBUG=1`` to see the traceback anyway. Other exceptions propagate (they are bugs).
    """
    try:
        main(args)
    except user_errors() as exc:
        if os.environ.get("FLASHPORTRAIT_DEBUG"):
            raise
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0
