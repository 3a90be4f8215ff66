"""Training order and augmentations that are pure functions of (seed, epoch, index).

A run that is stopped and resumed anywhere in an epoch, with any number of loader workers,
sees exactly the samples and the random crops an uninterrupted run sees: the sampler shuffles
from ``seed + epoch`` (torch's ``DistributedSampler``, one replica or many), resumes at the
batch Lightning's restored progress names, and each training image is augmented under a
random state derived from ``(seed, epoch, index)``. Nothing depends on a worker's RNG or on
how many batches a loader had prefetched when the checkpoint was written (torchdata's
StatefulDataLoader records that position, but Lightning builds the loader before restoring
and replays the wrong epoch's order).
"""

from __future__ import annotations

import contextlib
import hashlib
import random
from collections.abc import Iterator

import torch
from torch.utils.data import DistributedSampler


class EpochSampler(DistributedSampler):
    """Yields ``(index, epoch)``: the dataset seeds each sample's augmentation from both.

    After Lightning restored a checkpoint, ``resume_at`` makes the first iteration start in
    the checkpoint's epoch and skip the batches it already trained; the length stays the
    epoch's, so Lightning's own batch count continues where it stopped.
    """

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._skip = 0

    def resume_at(self, epoch: int, batches_done: int, batch_size: int, drop_last: bool) -> None:
        """Continue ``epoch`` after ``batches_done`` batches (the next epoch if it is over).

        Lightning iterates the loader once before it calls ``set_epoch``, so the epoch is set
        here too."""
        full, rest = divmod(self.num_samples, batch_size)
        if batches_done >= full + (rest > 0 and not drop_last):
            epoch, batches_done = epoch + 1, 0
        self.epoch, self._skip = epoch, batches_done * batch_size

    def __iter__(self) -> Iterator[tuple[int, int]]:
        epoch, skip = self.epoch, self._skip
        self._skip = 0
        return iter([(index, epoch) for index in list(super().__iter__())[skip:]])


@contextlib.contextmanager
def seeded_random(*key: int):
    """Run the body under torch and Python random states derived from ``key``; restore the
    caller's states afterwards, so nothing outside the body sees a difference."""
    digest = hashlib.blake2b(repr(key).encode(), digest_size=8).digest()
    seed = int.from_bytes(digest, "little") >> 1  # stable across processes and versions
    python_state = random.getstate()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        random.seed(seed)
        try:
            yield
        finally:
            random.setstate(python_state)
