"""Sliding context windows over the latent time axis, and blending their outputs (SPEC.md section 4).

Units: a *video frame* is a frame of the driving / output video; a *latent frame* is a frame of the
Wan VAE latent. The VAE compresses time causally by ``VAE_TEMPORAL_FACTOR`` (4): ``N = 4(F - 1) + 1``
video frames make ``F`` latent frames (latent frame 0 holds video frame 0 alone, latent frame ``i >= 1``
holds video frames ``4i - 3 .. 4i``).

Windows are Python ``range`` objects of latent-frame indices (``w.start``, ``w.stop``, ``len(w)``);
slice a latent with ``x[:, :, w.start : w.stop]``.

Blending (SPEC.md section 4; paper ablation "weighted" 29.68 AED vs plain 36.44): windows are
merged in order; in the ``n`` latent frames where window ``k`` overlaps what has been accumulated so
far, ``v = lam_j * v_k + (1 - lam_j) * v_current`` with ``lam_j = j / (n - 1)``, ``j = 0 .. n - 1``
(``lam = 0.5`` when ``n = 1``); elsewhere window ``k``'s values are written. Because the weights of every
frame sum to one, blending velocities and then taking one Euler step equals the released code's
"step every window, then blend the stepped latents" exactly.

First step (SPEC.md section 4, released rule): the released loop blends only from the second sampling step
on; at the first step each later window's values simply overwrite the overlap (``WindowBlender(...,
blend=False)``). The sampler follows that by default and blends at every step on request.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .config import VAE_TEMPORAL_FACTOR

__all__ = [
    "context_windows",
    "blend_weights",
    "WindowBlender",
    "latent_frames_for_video_frames",
    "video_frames_for_latent_frames",
    "usable_video_frames",
    "window_video_frames",
    "check_windows",
]


# --- frame counts --------------------------------------------------------------------------------------


def latent_frames_for_video_frames(num_video_frames: int) -> int:
    """Latent frames ``F = (N - 1) // 4 + 1`` for ``N`` video frames (Wan VAE, causal 4x in time).

    ``N`` need not be ``4k + 1``: the extra frames beyond the last ``4k + 1`` are not represented
    (see :func:`usable_video_frames`).

    Raises:
        ValueError: ``num_video_frames < 1``.
    """
    if num_video_frames < 1:
        raise ValueError(f"num_video_frames must be >= 1, got {num_video_frames}")
    return (num_video_frames - 1) // VAE_TEMPORAL_FACTOR + 1


def video_frames_for_latent_frames(num_latent_frames: int) -> int:
    """Video frames ``N = 4(F - 1) + 1`` decoded from ``F`` latent frames.

    Raises:
        ValueError: ``num_latent_frames < 1``.
    """
    if num_latent_frames < 1:
        raise ValueError(f"num_latent_frames must be >= 1, got {num_latent_frames}")
    return VAE_TEMPORAL_FACTOR * (num_latent_frames - 1) + 1


def usable_video_frames(num_video_frames: int) -> int:
    """The largest ``4k + 1 <= num_video_frames``: how many driving frames are used.

    Our choice (SPEC.md section 4 leaves it open): the 0-3 extra driving frames at the end are
    **dropped**, not padded by repeating the last frame, so the output never ends on a frozen pose.
    The output video then has ``usable_video_frames(N) - 1`` frames (the first decoded frame is the
    reference slot and is dropped).

    Raises:
        ValueError: ``num_video_frames < 1``.
    """
    return video_frames_for_latent_frames(latent_frames_for_video_frames(num_video_frames))


def window_video_frames(window: range) -> range:
    """The video frames a latent window covers when it is treated as a clip of its own.

    A window of latent frames ``a .. b-1`` is conditioned like a clip starting at the reference image,
    so its expression tokens come from video frames ``4a .. 4(b-1)`` (``4(b - a - 1) + 1`` frames; latent
    frame ``a`` is that clip's "first frame" and takes video frame ``4a``'s tokens), SPEC.md section 4.
    """
    return range(VAE_TEMPORAL_FACTOR * window.start, VAE_TEMPORAL_FACTOR * (window.stop - 1) + 1)


# --- windows ------------------------------------------------------------------------------------------


def context_windows(num_latent_frames: int, context_size: int, context_overlap: int) -> list[range]:
    """Context windows over ``num_latent_frames`` latent frames (SPEC.md section 4).

    Starts ``0, s, 2s, ...`` with stride ``s = context_size - context_overlap``, while
    ``start < num_latent_frames - context_overlap``; a window that would run past the end is moved back
    to end exactly at ``num_latent_frames`` (only the last one can). If ``num_latent_frames <=
    context_size`` there is one window of ``num_latent_frames`` frames (the released code fails for 13
    to 50 latent frames; we do not).

    Args:
        num_latent_frames: ``F >= 1``, latent frames of the whole video.
        context_size: latent frames per window, ``>= 1`` (released default 51 = 201 video frames).
        context_overlap: latent frames shared by consecutive windows, ``0 <= overlap < context_size``
            (released default 30; the authors' README suggests 10-40, the paper uses 5).

    Returns:
        Windows as ``range(start, stop)`` of latent-frame indices, in order; every window has
        ``min(context_size, F)`` frames, consecutive windows overlap by at least ``context_overlap``,
        the first starts at 0 and the last stops at ``F``.

    Raises:
        ValueError: an argument is out of range (the message names it and the allowed range).
    """
    for name, value in (
        ("num_latent_frames", num_latent_frames),
        ("context_size", context_size),
        ("context_overlap", context_overlap),
    ):
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"{name} must be an int, got {value!r}")
    if num_latent_frames < 1:
        raise ValueError(f"num_latent_frames must be >= 1, got {num_latent_frames}")
    if context_size < 1:
        raise ValueError(f"context_size must be >= 1 latent frame, got {context_size}")
    if not 0 <= context_overlap < context_size:
        raise ValueError(
            f"context_overlap must be in [0, context_size - 1] = [0, {context_size - 1}] latent frames, "
            f"got {context_overlap}"
        )
    if num_latent_frames <= context_size:
        return [range(0, num_latent_frames)]
    stride = context_size - context_overlap
    windows = []
    start = 0
    while start < num_latent_frames - context_overlap:
        stop = start + context_size
        if stop > num_latent_frames:
            windows.append(range(num_latent_frames - context_size, num_latent_frames))
            break
        windows.append(range(start, stop))
        start += stride
    return windows


def _check_follows(prev: range, window: range, name: str) -> None:
    """Raise unless ``window`` may follow ``prev``: it starts in ``(prev.start, prev.stop]``, stops after it."""
    if not (prev.start < window.start <= prev.stop and window.stop > prev.stop):
        raise ValueError(
            f"{name} must start in ({prev.start}, {prev.stop}] and stop after {prev.stop} "
            f"(previous window {prev}): windows must be in order, without gaps"
        )


def check_windows(windows: Sequence[range], num_latent_frames: int) -> None:
    """Check that ``windows`` can be blended in order into ``num_latent_frames`` frames.

    Requirements: at least one window; the first starts at 0; each window is non-empty, starts after
    the previous start and no later than the previous stop (no gap), stops after the previous stop; the
    last stops at ``num_latent_frames``.

    Raises:
        ValueError: naming the first offending window.
    """
    if len(windows) == 0:
        raise ValueError("windows is empty; need at least one window")
    if windows[0].start != 0:
        raise ValueError(f"the first window must start at latent frame 0, got {windows[0]}")
    prev = None
    for k, w in enumerate(windows):
        if len(w) < 1 or w.step != 1:
            raise ValueError(f"window {k} ({w}) must be a non-empty range with step 1")
        if prev is not None:
            _check_follows(prev, w, f"window {k} ({w})")
        prev = w
    if windows[-1].stop != num_latent_frames:
        raise ValueError(f"the last window ({windows[-1]}) must stop at num_latent_frames={num_latent_frames}")


# --- blending -----------------------------------------------------------------------------------------


def blend_weights(num_overlap: int, device=None, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Weights ``lam_j`` of the *new* window over ``n`` overlapping latent frames (SPEC.md section 4).

    ``lam_j = j / (n - 1)`` for ``j = 0 .. n - 1`` (0 at the first shared frame, 1 at the last);
    ``lam = 0.5`` when ``n = 1``.

    Returns:
        ``[n]`` tensor.

    Raises:
        ValueError: ``num_overlap < 1``.
    """
    if num_overlap < 1:
        raise ValueError(f"num_overlap must be >= 1, got {num_overlap}")
    if num_overlap == 1:
        return torch.full((1,), 0.5, device=device, dtype=dtype)
    return torch.arange(num_overlap, device=device, dtype=torch.float64).div(num_overlap - 1).to(dtype)


class WindowBlender:
    """Accumulates per-window tensors into one full-length tensor, window by window.

    Use: ``b = WindowBlender(F); for w, v in ...: b.add(w, v); full = b.result()``. The output is
    allocated once (``F`` frames along ``dim``, 2 for ``[B, C, F, h, w]``) and written in place, so
    memory is one full-length tensor whatever the number of windows. Windows must come in the order
    checked by :func:`check_windows`. Values are cast to ``dtype`` (float32 unless ``None``: keep). With
    ``blend=False`` a window's values overwrite the overlap instead of being blended (the released first step).
    """

    def __init__(
        self, num_latent_frames: int, dim: int = 2, dtype: torch.dtype | None = torch.float32, blend: bool = True
    ):
        if num_latent_frames < 1:
            raise ValueError(f"num_latent_frames must be >= 1, got {num_latent_frames}")
        self.num_latent_frames = num_latent_frames
        self.dim = dim
        self.dtype = dtype
        self.blend = blend
        self._out: torch.Tensor | None = None
        self._prev: range | None = None

    def add(self, window: range, value: torch.Tensor) -> None:
        """Merge ``value`` (``len(window)`` frames along ``dim``) holding latent frames ``window``."""
        if value.shape[self.dim] != len(window):
            raise ValueError(
                f"value has {value.shape[self.dim]} frames along dim {self.dim}, window {window} has {len(window)}"
            )
        if window.stop > self.num_latent_frames:
            raise ValueError(f"window {window} runs past num_latent_frames={self.num_latent_frames}")
        if self.dtype is not None:
            value = value.to(self.dtype)
        prev = self._prev
        if prev is None:
            if window.start != 0:
                raise ValueError(f"the first window must start at latent frame 0, got {window}")
            shape = list(value.shape)
            shape[self.dim] = self.num_latent_frames
            self._out = value.new_zeros(shape)
            self._out.narrow(self.dim, 0, len(window)).copy_(value)
        else:
            _check_follows(prev, window, f"window {window}")
            n = prev.stop - window.start
            if n > 0 and not self.blend:
                self._out.narrow(self.dim, window.start, n).copy_(value.narrow(self.dim, 0, n))
            elif n > 0:
                shape = [1] * value.ndim
                shape[self.dim] = n
                lam = blend_weights(n, device=value.device, dtype=value.dtype).view(shape)
                old = self._out.narrow(self.dim, window.start, n)
                old.copy_(lam * value.narrow(self.dim, 0, n) + (1 - lam) * old)
            self._out.narrow(self.dim, prev.stop, window.stop - prev.stop).copy_(
                value.narrow(self.dim, n, len(window) - n)
            )
        self._prev = window

    def result(self) -> torch.Tensor:
        """The blended ``F``-frame tensor. Raises ValueError unless the windows reached frame ``F``."""
        if self._prev is None or self._prev.stop != self.num_latent_frames:
            covered = 0 if self._prev is None else self._prev.stop
            raise ValueError(f"the windows cover latent frames [0, {covered}), expected [0, {self.num_latent_frames})")
        return self._out
