"""Training data: the authors' layout, clip sampling, and the dataset (SPEC.md section 7).

Layout (written by ``python -m flashportrait.tools.prepare_data``)::

    <root>/{rec,vec,square}/{speech,singing,dancing}/<clip id>/
        images/frame_<i>.png        RGB frames, i = 0 .. n-1
        face_masks/frame_<i>.png    greyscale, 255 inside the face oval
        lip_masks/frame_<i>.png     greyscale, 255 inside the lips
        expression.pt               PD-FGC features of every frame (ExpressionFeatures.save; optional: without
                                    it the features are computed online from the frames, slower)
        clip.json                   {"num_frames": n, ...} (optional; otherwise the frames are counted)
    <root>/video_square_path.txt, video_rec_path.txt, video_vec_path.txt   clip folders, one per line

A path in a list is absolute or relative to the list file's folder; blank lines and ``#`` comments are
skipped. The clip's category (its parent folder's name) picks the prompt (:data:`~flashportrait.config.
TRAIN_PROMPTS`); the list picks the resolution bucket.

A sample: ``n`` frames (``--video_sample_n_frames``, 4k + 1; 81 released) taken every ``stride`` frames
(``--video_sample_stride``) from a random start; the reference is the first sampled frame. Clips shorter
than ``(n - 1) stride + 1`` frames are skipped and counted. Every random choice of a sample comes from
``(seed, epoch, clip index)``, so a batch is the same whenever it is rebuilt.
"""

from __future__ import annotations

import json
import logging
import os
import re
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ..config import DEFAULT_PROMPT, EXPRESSION_DIM, FACE_CROP_SIZE, TRAIN_PROMPTS, VAE_TEMPORAL_FACTOR

__all__ = [
    "CLIP_FRAMES_DIR",
    "FACE_MASKS_DIR",
    "LIP_MASKS_DIR",
    "EXPRESSION_FILE",
    "CLIP_INFO_FILE",
    "frame_name",
    "ClipRecord",
    "ScanReport",
    "read_path_list",
    "count_frames",
    "clip_span",
    "sample_frame_indices",
    "scan_clips",
    "prompt_index",
    "training_prompts",
    "resize_cover",
    "PortraitClipDataset",
    "collate_clips",
]

logger = logging.getLogger(__name__)

CLIP_FRAMES_DIR = "images"
FACE_MASKS_DIR = "face_masks"
LIP_MASKS_DIR = "lip_masks"
EXPRESSION_FILE = "expression.pt"
CLIP_INFO_FILE = "clip.json"
_FRAME_RE = re.compile(r"^frame_(\d+)\.png$")


def frame_name(index: int) -> str:
    """File name of frame ``index`` in ``images/``, ``face_masks/``, ``lip_masks/``."""
    return f"frame_{index}.png"


@dataclass(frozen=True)
class ClipRecord:
    """One usable clip folder.

    Attributes:
        path: the clip folder. bucket: ``"square"``, ``"rec"`` or ``"vec"``. category: its parent folder's name.
        num_frames: frames in ``images/``. has_expression: ``expression.pt`` is there.
    """

    path: Path
    bucket: str
    category: str
    num_frames: int
    has_expression: bool


@dataclass
class ScanReport:
    """What :func:`scan_clips` kept and skipped: ``counts`` per reason, a few ``examples`` per reason."""

    listed: int = 0
    counts: Counter = field(default_factory=Counter)
    examples: dict = field(default_factory=dict)

    def skip(self, reason: str, path: Path) -> None:
        self.counts[reason] += 1
        self.examples.setdefault(reason, [])
        if len(self.examples[reason]) < 3:
            self.examples[reason].append(str(path))

    def summary(self, kept: int) -> str:
        """One line: kept of listed, then each skip reason with its count and an example."""
        parts = [f"{kept} of {self.listed} listed clips used"]
        for reason, count in sorted(self.counts.items()):
            parts.append(f"{count} {reason} (e.g. {self.examples[reason][0]})")
        return "; ".join(parts)


def read_path_list(list_file: str | os.PathLike) -> list[Path]:
    """Clip folders of a path list (module docstring).

    Raises:
        FileNotFoundError: the list file does not exist (message names the flag's file).
    """
    list_file = Path(list_file).expanduser()
    if not list_file.is_file():
        raise FileNotFoundError(f"{list_file}: no such path list (a text file with one clip folder per line)")
    out = []
    for line in list_file.read_text(encoding="utf-8").splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        path = Path(line).expanduser()
        out.append(path if path.is_absolute() else list_file.parent / path)
    return out


def count_frames(clip: Path) -> int:
    """Frames of a clip: ``clip.json``'s ``num_frames`` when present, else the ``images/frame_<i>.png`` files
    (which must then be numbered 0 .. n-1 without gaps; the first missing index ends the count)."""
    info = clip / CLIP_INFO_FILE
    if info.is_file():
        try:
            return int(json.loads(info.read_text())["num_frames"])
        except (OSError, ValueError, KeyError, TypeError):
            pass
    folder = clip / CLIP_FRAMES_DIR
    if not folder.is_dir():
        return 0
    indices = {int(m.group(1)) for name in os.listdir(folder) if (m := _FRAME_RE.match(name))}
    n = 0
    while n in indices:
        n += 1
    return n


def clip_span(num_frames: int, stride: int) -> int:
    """Source frames one sample covers: ``(num_frames - 1) * stride + 1``."""
    return (num_frames - 1) * stride + 1


def sample_frame_indices(available: int, num_frames: int, stride: int, rng: np.random.Generator) -> np.ndarray:
    """Frame indices of one sample: ``start + stride * [0 .. num_frames - 1]`` with ``start`` uniform over the
    positions where the sample fits.

    Raises:
        ValueError: the clip is shorter than :func:`clip_span`.
    """
    span = clip_span(num_frames, stride)
    if available < span:
        raise ValueError(f"a clip of {available} frames is shorter than {span} (= ({num_frames} - 1) x {stride} + 1)")
    start = int(rng.integers(0, available - span + 1))
    return start + stride * np.arange(num_frames, dtype=np.int64)


def training_prompts() -> list[str]:
    """The prompts of training, in a fixed order (index = the ``prompt_index`` of a sample)."""
    return list(TRAIN_PROMPTS.values())


def prompt_index(category: str) -> int:
    """Index into :func:`training_prompts` for a category; an unknown category uses the default prompt
    (``"The protagonist is talking"``; :func:`scan_clips` counts such clips)."""
    keys = list(TRAIN_PROMPTS)
    if category in TRAIN_PROMPTS:
        return keys.index(category)
    return training_prompts().index(DEFAULT_PROMPT)


def scan_clips(
    path_lists: Mapping[str, str | os.PathLike],
    num_frames: int,
    stride: int,
    *,
    require_expression: bool,
    max_clips: int | None = None,
) -> tuple[list[ClipRecord], ScanReport]:
    """Read the path lists and keep the usable clips.

    Args:
        path_lists: bucket name -> its path-list file.
        num_frames, stride: the sample (clips shorter than :func:`clip_span` are skipped).
        require_expression: skip clips without ``expression.pt`` (no motion encoder for online features).
        max_clips: keep at most this many (``--max_train_samples``), in list order.

    Returns:
        (records, report); skip reasons: ``"missing folder"``, ``"shorter than N frames"``, ``"without masks"``,
        ``"without expression.pt"``; ``"unknown category"`` counts kept clips that use the default prompt.
    """
    if num_frames < 1 or (num_frames - 1) % VAE_TEMPORAL_FACTOR:
        raise ValueError(f"video_sample_n_frames must be 4k + 1 (e.g. 81), got {num_frames}")
    if stride < 1:
        raise ValueError(f"video_sample_stride must be >= 1, got {stride}")
    span = clip_span(num_frames, stride)
    report = ScanReport()
    records: list[ClipRecord] = []
    for bucket, list_file in path_lists.items():
        for clip in read_path_list(list_file):
            report.listed += 1
            if max_clips is not None and len(records) >= max_clips:
                report.skip("beyond --max_train_samples", clip)
                continue
            if not (clip / CLIP_FRAMES_DIR).is_dir():
                report.skip("missing folder", clip)
                continue
            if not ((clip / FACE_MASKS_DIR).is_dir() and (clip / LIP_MASKS_DIR).is_dir()):
                report.skip("without masks", clip)
                continue
            n = count_frames(clip)
            if n < span:
                report.skip(f"shorter than {span} frames", clip)
                continue
            has_expression = (clip / EXPRESSION_FILE).is_file()
            if require_expression and not has_expression:
                report.skip(f"without {EXPRESSION_FILE}", clip)
                continue
            category = clip.parent.name
            if category not in TRAIN_PROMPTS:
                report.counts["with an unknown category (default prompt)"] += 1
                report.examples.setdefault("with an unknown category (default prompt)", [str(clip)])
            records.append(ClipRecord(clip, bucket, category, n, has_expression))
    return records, report


def resize_cover(image: Image.Image, height: int, width: int, resample=Image.BILINEAR) -> Image.Image:
    """Scale ``image`` to cover ``height x width`` (aspect ratio kept), then crop the centre."""
    w, h = image.size
    scale = max(height / h, width / w)
    new_w, new_h = max(width, round(w * scale)), max(height, round(h * scale))
    if (new_w, new_h) != (w, h):
        image = image.resize((new_w, new_h), resample)
    left, top = (new_w - width) // 2, (new_h - height) // 2
    return image.crop((left, top, left + width, top + height))


def _read_png(path: Path, mode: str) -> Image.Image:
    try:
        with Image.open(path) as im:
            return im.convert(mode)
    except (OSError, ValueError) as exc:
        raise ValueError(f"{path}: cannot be read ({exc}); re-run prepare_data on this clip") from exc


class PortraitClipDataset(torch.utils.data.Dataset):
    """Training samples from clip folders; indexed by ``(clip index, epoch)`` keys
    (:class:`~flashportrait.training.buckets.BucketBatchSampler`).

    Args:
        records: from :func:`scan_clips`.
        resolutions: bucket -> ``(height, width)``.
        num_frames, stride: the sample.
        seed: with the key, fixes every random choice.
        online_expression: for clips without ``expression.pt`` return aligned 224 x 224 face crops (the
            training step runs the motion encoder on them); otherwise such a clip is an error.

    Item (a dict): ``pixels`` uint8 ``[3, N, H, W]``, ``face_masks`` / ``lip_masks`` uint8 ``[N, H, W]``,
    ``features`` float32 ``[N, 554]`` (empty ``[N, 0]`` when crops are given), ``face_crops`` uint8
    ``[N, 224, 224, 3]`` (only online), ``prompt_index`` int, ``clip`` int, ``frames`` int64 ``[N]``.
    """

    def __init__(
        self,
        records: Sequence[ClipRecord],
        resolutions: Mapping[str, tuple[int, int]],
        num_frames: int,
        stride: int = 1,
        *,
        seed: int = 0,
        online_expression: bool = False,
    ):
        self.records = list(records)
        self.resolutions = dict(resolutions)
        self.num_frames = num_frames
        self.stride = stride
        self.seed = seed
        self.online_expression = online_expression
        self._detector = None

    def __len__(self) -> int:
        return len(self.records)

    @property
    def buckets(self) -> list[str]:
        return [r.bucket for r in self.records]

    def frame_indices(self, index: int, epoch: int) -> np.ndarray:
        """The source frames of sample ``(index, epoch)``."""
        rng = np.random.default_rng([self.seed, epoch, index, 0xF2A3])
        return sample_frame_indices(self.records[index].num_frames, self.num_frames, self.stride, rng)

    def __getitem__(self, key: tuple[int, int]) -> dict:
        index, epoch = key
        record = self.records[index]
        frames = self.frame_indices(index, epoch)
        height, width = self.resolutions[record.bucket]
        rgb, face, lip, originals = [], [], [], []
        for i in frames:
            image = _read_png(record.path / CLIP_FRAMES_DIR / frame_name(int(i)), "RGB")
            if self.online_expression and not record.has_expression:
                originals.append(np.asarray(image))
            rgb.append(np.asarray(resize_cover(image, height, width)))
            for folder, out in ((FACE_MASKS_DIR, face), (LIP_MASKS_DIR, lip)):
                mask = _read_png(record.path / folder / frame_name(int(i)), "L")
                out.append(np.asarray(resize_cover(mask, height, width)))
        item = {
            "pixels": torch.from_numpy(np.stack(rgb)).permute(3, 0, 1, 2).contiguous(),
            "face_masks": torch.from_numpy(np.stack(face)),
            "lip_masks": torch.from_numpy(np.stack(lip)),
            "prompt_index": prompt_index(record.category),
            "clip": index,
            "frames": torch.from_numpy(frames),
        }
        if not record.has_expression and not self.online_expression:
            raise ValueError(f"{record.path}: no {EXPRESSION_FILE}; run prepare_data, or give --pd_fpg_model_path to "
                             "compute the expression features online")
        if record.has_expression:
            item["features"] = self._cached_features(record, frames)
        else:
            item["features"] = torch.zeros(len(frames), EXPRESSION_DIM)
        if self.online_expression:  # every item of an online dataset has crops, so any batch stacks
            item["needs_features"] = not record.has_expression
            crops = (self._face_crops(record, originals) if not record.has_expression
                     else np.zeros((len(frames), FACE_CROP_SIZE, FACE_CROP_SIZE, 3), dtype=np.uint8))
            item["face_crops"] = torch.from_numpy(crops)
        return item

    @staticmethod
    def _cached_features(record: ClipRecord, frames: np.ndarray) -> torch.Tensor:
        from ..expression import ExpressionFeatures

        path = record.path / EXPRESSION_FILE
        cached = ExpressionFeatures.load(path)
        if len(cached) != record.num_frames:
            raise ValueError(f"{path}: {len(cached)} feature rows for {record.num_frames} frames; re-run prepare_data "
                             "on this clip")
        return cached.features[torch.from_numpy(frames)].float()

    def _face_crops(self, record: ClipRecord, frames: list[np.ndarray]) -> np.ndarray:
        """Aligned 224 x 224 PD-FGC crops of the sampled frames (the same steps as
        :func:`flashportrait.expression.extract_expression_features`: detect, track, align)."""
        from ..face import align_face, create_detector, track_face

        if self._detector is None:
            self._detector = create_detector("retinaface")
        detections = self._detector.detect_batch(frames)
        track = track_face(detections, source=str(record.path / CLIP_FRAMES_DIR))
        return np.stack([align_face(f, p, FACE_CROP_SIZE)[0] for f, p in zip(frames, track.landmarks)])


def collate_clips(items: Sequence[dict]) -> dict:
    """Stack dataset items of one bucket into a batch (tensors gain a leading batch axis)."""
    batch = {}
    for key in items[0]:
        values = [item[key] for item in items]
        batch[key] = torch.stack(values) if isinstance(values[0], torch.Tensor) else torch.tensor(values)
    return batch
