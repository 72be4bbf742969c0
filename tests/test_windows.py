"""Context windows, blending and frame counts (SPEC.md section 4)."""

from __future__ import annotations

import pytest
import torch

from flashportrait.config import DEFAULT_CONTEXT_OVERLAP, DEFAULT_CONTEXT_SIZE
from flashportrait.windows import (
    WindowBlender,
    blend_weights,
    check_windows,
    context_windows,
    latent_frames_for_video_frames,
    usable_video_frames,
    video_frames_for_latent_frames,
    window_video_frames,
)

from .conftest import blend_all


def test_released_defaults_example():
    # 5400 video frames -> 1350 latent frames (5397 usable); stride 21
    windows = context_windows(100, DEFAULT_CONTEXT_SIZE, DEFAULT_CONTEXT_OVERLAP)
    assert windows == [range(0, 51), range(21, 72), range(42, 93), range(49, 100)]


@pytest.mark.parametrize("frames", [1, 2, 13, 21, 50, 51])
def test_short_video_one_window(frames):
    assert context_windows(frames, 51, 30) == [range(0, frames)]


def test_windows_properties_many_sizes():
    for size in range(1, 12):
        for overlap in range(0, size):
            stride = size - overlap
            for frames in range(1, 40):
                windows = context_windows(frames, size, overlap)
                check_windows(windows, frames)
                covered = set()
                for w in windows:
                    assert len(w) == min(size, frames)
                    covered.update(w)
                assert covered == set(range(frames))
                assert windows[0].start == 0 and windows[-1].stop == frames
                for a, b in zip(windows, windows[1:]):
                    assert a.stop - b.start >= overlap  # consecutive windows share >= overlap frames
                # all but the last start on the stride grid, below F - overlap
                for k, w in enumerate(windows[:-1]):
                    assert w.start == k * stride and w.start < frames - overlap
                if frames > size:
                    last_grid = (len(windows) - 1) * stride
                    assert last_grid < frames - overlap  # the last window comes from a valid start
                    assert last_grid + stride >= frames - overlap  # and there is no further one


@pytest.mark.parametrize(
    "args, match",
    [
        ((0, 5, 1), "num_latent_frames"),
        ((10, 0, 0), "context_size"),
        ((10, 5, 5), "context_overlap"),
        ((10, 5, -1), "context_overlap"),
        ((10, 5.0, 1), "context_size"),
    ],
)
def test_context_windows_validation(args, match):
    with pytest.raises(ValueError, match=match):
        context_windows(*args)


def test_blend_weights():
    assert blend_weights(1).tolist() == [0.5]
    assert blend_weights(2).tolist() == [0.0, 1.0]
    torch.testing.assert_close(blend_weights(5), torch.tensor([0.0, 0.25, 0.5, 0.75, 1.0]))
    with pytest.raises(ValueError):
        blend_weights(0)


def _reference_blend(values, windows, frames):
    """Frame-by-frame loop written straight from SPEC.md section 4."""
    out = [None] * frames
    stop = 0
    for w, v in zip(windows, values):
        n = max(0, stop - w.start)
        for j, f in enumerate(w):
            new = v[:, :, j]
            if j < n:
                lam = 0.5 if n == 1 else j / (n - 1)
                out[f] = lam * new + (1 - lam) * out[f]
            else:
                out[f] = new
        stop = w.stop
    return torch.stack(out, dim=2)


def test_blend_matches_loop_and_constant_is_preserved():
    g = torch.Generator().manual_seed(0)
    for frames, size, overlap in [(7, 4, 1), (10, 4, 2), (23, 6, 3), (5, 8, 3), (30, 9, 8)]:
        windows = context_windows(frames, size, overlap)
        values = [torch.randn(2, 3, len(w), 2, 2, generator=g) for w in windows]
        torch.testing.assert_close(blend_all(values, windows, frames), _reference_blend(values, windows, frames))
        const = [torch.full((1, 1, len(w), 1, 1), 3.0) for w in windows]
        torch.testing.assert_close(blend_all(const, windows, frames), torch.full((1, 1, frames, 1, 1), 3.0))


def test_blend_uses_full_overlap_with_moved_last_window():
    windows = context_windows(10, 4, 1)  # [0,4) [3,7) [6,10)
    assert windows == [range(0, 4), range(3, 7), range(6, 10)]
    windows = context_windows(9, 4, 1)  # last moved: [5, 9) overlaps [3, 7) by 2
    assert windows[-1] == range(5, 9)
    values = [torch.zeros(1, 1, 4, 1, 1), torch.zeros(1, 1, 4, 1, 1), torch.ones(1, 1, 4, 1, 1)]
    out = blend_all(values, windows, 9).flatten().tolist()
    assert out == [0, 0, 0, 0, 0, 0.0, 1.0, 1, 1]


def test_blender_rejects_bad_order():
    b = WindowBlender(10)
    with pytest.raises(ValueError, match="start at latent frame 0"):
        b.add(range(1, 4), torch.zeros(1, 1, 3, 1, 1))
    b.add(range(0, 4), torch.zeros(1, 1, 4, 1, 1))
    with pytest.raises(ValueError, match="without gaps"):
        b.add(range(5, 9), torch.zeros(1, 1, 4, 1, 1))
    with pytest.raises(ValueError, match="frames along dim"):
        b.add(range(2, 6), torch.zeros(1, 1, 3, 1, 1))
    with pytest.raises(ValueError, match="cover latent frames"):
        b.result()
    with pytest.raises(ValueError):
        check_windows([range(0, 4), range(0, 5)], 5)


def test_frame_counts():
    assert latent_frames_for_video_frames(1) == 1
    assert latent_frames_for_video_frames(5) == 2
    assert latent_frames_for_video_frames(8) == 2
    assert latent_frames_for_video_frames(201) == 51
    assert video_frames_for_latent_frames(51) == 201
    for n in range(1, 50):
        u = usable_video_frames(n)
        assert u <= n < u + 4 and (u - 1) % 4 == 0
    assert window_video_frames(range(0, 51)) == range(0, 201)
    assert window_video_frames(range(21, 72)) == range(84, 285)
    with pytest.raises(ValueError):
        latent_frames_for_video_frames(0)


def test_blender_without_blending_overwrites_the_overlap():
    """The released first step: the later window's values replace the overlap instead of being blended."""
    windows = [range(0, 4), range(2, 6)]
    values = [torch.full((1, 1, 4, 1, 1), 1.0), torch.full((1, 1, 4, 1, 1), 3.0)]
    blender = WindowBlender(6, blend=False)
    for w, v in zip(windows, values):
        blender.add(w, v)
    assert blender.result().flatten().tolist() == [1, 1, 3, 3, 3, 3]
    assert blend_all(values, windows, 6).flatten().tolist() == [1, 1, 1, 3, 3, 3]  # lam = 0, 1 over 2 frames
