"""What every command-line entry point shares: user errors as one clear line, and clean interruption.

* A problem with the user's input, files or flags prints ``error: <message>`` and exits with 2 (argparse's
  code for bad usage), without a traceback (``FLASHPORTRAIT_DEBUG=1`` shows it).
* Ctrl-C (SIGINT) and SIGTERM stop the run at the next Python instruction: the exception unwinds through
  every ``with`` block, so the video writer and the cache remove their temporary files; one line is printed
  and the exit code is 130 / 143 (128 + the signal number, the shell convention).
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
from collections.abc import Callable, Iterator
from typing import Any

__all__ = ["Terminated", "user_errors", "run_main"]


class Terminated(BaseException):
    """Raised in the main thread when SIGTERM arrives (a ``BaseException``, like ``KeyboardInterrupt``, so
    ``except Exception`` blocks do not swallow it)."""

    def __init__(self, signum: int = signal.SIGTERM):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def user_errors() -> tuple[type[BaseException], ...]:
    """Exception types that describe a problem with the user's input, files or flags.

    ``ValueError`` covers argument checks, :class:`~flashportrait.checkpoints.CheckpointError` and
    :class:`~flashportrait.reference_image.ImageReadError`; video and face errors name the file and frames.
    """
    from .face.tracking import FaceTrackingError
    from .video_io import VideoReadError

    return (ValueError, FileNotFoundError, NotADirectoryError, VideoReadError, FaceTrackingError)


@contextlib.contextmanager
def _sigterm_raises() -> Iterator[None]:
    """While active, SIGTERM raises :class:`Terminated` in the main thread (restored afterwards)."""

    def handler(signum, frame):
        raise Terminated(signum)

    try:
        previous = signal.signal(signal.SIGTERM, handler)
    except ValueError:  # not the main thread: leave signals alone
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def run_main(main: Callable[[Any], Any], args: Any) -> int:
    """Run ``main(args)`` and return the process exit code.

    Returns:
        0 on success; 2 after a user error (printed as ``error: <message>``); 130 after Ctrl-C, 143 after
        SIGTERM (printed as one line). Other exceptions propagate: they are bugs.
    """
    try:
        with _sigterm_raises():
            main(args)
    except KeyboardInterrupt:
        print("\ninterrupted (Ctrl-C): stopped, temporary files removed", file=sys.stderr)
        return 128 + signal.SIGINT
    except Terminated as exc:
        print(f"terminated ({exc}): stopped, temporary files removed", file=sys.stderr)
        return 128 + exc.signum
    except user_errors() as exc:
        if os.environ.get("FLASHPORTRAIT_DEBUG"):
            raise
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0
