"""Batches of a map-style dataset as a pure function of (seed, step, rank): resumable without sampler state."""

from __future__ import annotations

from collections.abc import Iterator
from enum import IntEnum

import numpy as np
import torch

_MASK64 = (1 << 64) - 1


def mixed_seed(*parts: int) -> int:
    """A well-mixed 63-bit seed from integers, the same in every process and Python version.

    Each part goes through splitmix64's finalizer in turn (Steele et al. 2014, the seeder of Java's
    SplittableRandom): a bit flipped in any part flips about half the output bits. Two calls per sample
    (crop, mask), so it is plain integer arithmetic, 30 times cheaper than numpy's SeedSequence.
    """
    state = 0x9E3779B97F4A7C15
    for part in parts:
        state = (state ^ (int(part) & _MASK64)) * 0xBF58476D1CE4E5B9 & _MASK64
        state = (state ^ (state >> 27)) * 0x94D049BB133111EB & _MASK64
        state = (state ^ (state >> 31)) + 0x9E3779B97F4A7C15 & _MASK64
    return state >> 1


class Stream(IntEnum):
    """The pretraining data's independent random streams: the second part of every ``mixed_seed`` they draw from.

    The numbers are part of what a seed means: renumbering one changes every run's data, and a run resumed
    across the change would not see the batches it would have seen.
    """

    IMAGE = 0  # the image kind: its order, each image's crop and jitter, its shards' order
    TEXT = 1  # the text kind: its order, its masks, its text pieces' order
    PAIR = 2  # the pair kind: its order, crops, masks, shards' order
    MATCHING = 3  # image-text matching: hard negatives and token swaps
    IMAGE_MASK = 7  # the image kind's block masks
    LENGTH_GROUPS = 8  # group_by_length: ties among equal lengths and the order of a window's batches

    @classmethod
    def of_kind(cls, kind: str) -> Stream:
        """The stream of a data kind ("image", "text", "pair")."""
        return cls[kind.upper()]


class StepBatchSampler(torch.utils.data.Sampler[list[int]]):
    """Yields this rank's index batches for steps ``start_step, start_step + 1, ...`` (``num_steps`` of them).

    Each epoch is a seeded permutation of the dataset; the global batch of a step is the next
    ``batch_size * world_size`` positions, of which this rank takes its slice. With ``shuffle=False``
    (evaluation) the order is the dataset's own and a single pass is given, the last batch short.
    """

    def __init__(
        self,
        dataset_size: int,
        batch_size: int,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        start_step: int = 0,
        num_steps: int | None = None,
        shuffle: bool = True,
    ):
        if dataset_size == 0:
            raise ValueError("The dataset is empty: check its files and split.")
        self.size, self.batch_size, self.seed = dataset_size, batch_size, seed
        self.rank, self.world_size, self.start_step, self.shuffle = rank, world_size, start_step, shuffle
        self.num_steps = num_steps if num_steps is not None else -(-dataset_size // (batch_size * world_size))

    def __len__(self) -> int:
        return self.num_steps

    def _permutation(self, epoch: int) -> np.ndarray:
        return np.random.default_rng([self.seed, epoch]).permutation(self.size)

    def __iter__(self) -> Iterator[list[int]]:
        if not self.shuffle:  # one ordered pass, split across ranks
            for start in range(self.rank * self.batch_size, self.size, self.batch_size * self.world_size):
                yield list(range(start, min(start + self.batch_size, self.size)))
            return
        cached_epoch, permutation = None, None
        for step in range(self.start_step, self.start_step + self.num_steps):
            first = (step * self.world_size + self.rank) * self.batch_size
            batch = []
            for position in range(first, first + self.batch_size):
                epoch, offset = divmod(position, self.size)
                if epoch != cached_epoch:
                    cached_epoch, permutation = epoch, self._permutation(epoch)
                batch.append(int(permutation[offset]))
            yield batch
