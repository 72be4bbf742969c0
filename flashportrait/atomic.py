"""Atomic file writes: a temporary file in the target's folder, renamed over the target once it is complete.

A reader never sees a half-written file, and an interrupted write (an exception, Ctrl-C) leaves nothing behind.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

__all__ = ["atomic_path", "atomic_write_text"]


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[str]:
    """A temporary path (``.<name>.XXXX.partial`` beside ``path``; the folder is created) to write to.

    When the block ends normally the file gets the usual permissions (0644) and is renamed to ``path``
    (``os.replace``: atomic on one file system); when it raises (``BaseException``, so Ctrl-C too) the temporary
    file is removed and the exception propagates.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".partial", dir=path.parent)
    os.close(fd)
    try:
        yield tmp
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` atomically (:func:`atomic_path`)."""
    with atomic_path(path) as tmp:
        Path(tmp).write_text(text, encoding="utf-8")
