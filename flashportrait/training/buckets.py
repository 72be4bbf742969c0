"""Resolution buckets: batches of clips of one resolution, so ``--train_batch_size`` above 1 works with the
three aspect ratios mixed (SPEC.md section 7).

Every clip belongs to one bucket (the path list it was read from: ``square``, ``rec``, ``vec``) and is
resized to that bucket's size. :class:`BucketBatchSampler` shuffles each bucket, cuts it into batches, and
shuffles the batch order, deterministically from ``(seed, epoch)``. It yields keys ``(clip index, epoch)``:
the dataset derives each sample's random choices from them, so any batch can be rebuilt exactly (resume,
any number of data-loader workers).
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence

import numpy as np

from ..config import TRAIN_BUCKETS

__all__ = ["parse_resolution", "BucketBatchSampler"]


def parse_resolution(text: str) -> tuple[int, int]:
    """``"HxW"`` (pixels, both multiples of 16) -> ``(height, width)``.

    Raises:
        ValueError: another format, or sides that are not positive multiples of 16 (the VAE's 8x and the
            transformer's 2x2 patches).
    """
    try:
        h, w = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise ValueError(f"resolution must be HEIGHTxWIDTH in pixels, e.g. 480x832; got {text!r}") from None
    if h < 16 or w < 16 or h % 16 or w % 16:
        raise ValueError(f"resolution {text}: height and width must be positive multiples of 16")
    return h, w


class BucketBatchSampler:
    """Batches of clip indices that share a bucket, shuffled per epoch.

    Args:
        buckets: the bucket name of every clip (index = clip index).
        batch_size: clips per batch (the last batch of a bucket may be smaller: no clip is left out).
        seed: with the epoch, fixes the order.
        shuffle: ``False`` keeps clips and batches in order (bucket by bucket).

    ``set_epoch(epoch)`` selects the epoch (call it before iterating); iteration yields lists of keys
    ``(clip index, epoch)``.

    Raises:
        ValueError: ``batch_size < 1`` or an unknown bucket name.
    """

    def __init__(self, buckets: Sequence[str], batch_size: int, seed: int = 0, shuffle: bool = True):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        unknown = sorted(set(buckets) - set(TRAIN_BUCKETS))
        if unknown:
            raise ValueError(f"unknown bucket(s) {unknown}; known: {sorted(TRAIN_BUCKETS)}")
        self.buckets = list(buckets)
        self.max_batch_size = batch_size
        # accelerate's BatchSamplerShard reads ``batch_size``: None tells it that batches vary in length, so on
        # several processes it hands out whole batches (and cycles whole batches to even them out) instead of
        # topping a short batch up with clips of another bucket
        self.batch_size = None
        self.drop_last = False
        self.seed = seed
        self.shuffle = shuffle
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def batches(self, epoch: int | None = None) -> list[list[int]]:
        """The clip-index batches of ``epoch`` (default: the current one), in order."""
        epoch = self.epoch if epoch is None else epoch
        rng = np.random.default_rng([self.seed, epoch, 0xB0C7])
        out: list[list[int]] = []
        for name in TRAIN_BUCKETS:  # fixed bucket order: the result does not depend on dict/set order
            members = np.array([i for i, b in enumerate(self.buckets) if b == name], dtype=np.int64)
            if self.shuffle:
                members = members[rng.permutation(len(members))]
            out.extend(members[s : s + self.max_batch_size].tolist() for s in range(0, len(members), self.max_batch_size))
        if self.shuffle:
            out = [out[i] for i in rng.permutation(len(out))]
        return out

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        epoch = self.epoch
        for batch in self.batches(epoch):
            yield [(i, epoch) for i in batch]

    def __len__(self) -> int:
        return sum(math.ceil(self.buckets.count(name) / self.max_batch_size) for name in TRAIN_BUCKETS)
