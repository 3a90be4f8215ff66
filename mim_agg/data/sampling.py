"""Training order and augmentations that are pure functions of (seed, epoch, index).

A run that is stopped and resumed anywhere in an epoch, with any number of loader workers,
sees exactly the samples and the random crops an uninterrupted run sees: the sampler shuffles
from ``seed + epoch`` (torch's ``DistributedSampler``, one replica or many), the loader
resumes after the batches its checkpointed state counts, and each training image is augmented
under a random state derived from ``(seed, epoch, index)``. Nothing depends on a worker's RNG
or on how many batches the workers had prefetched when the checkpoint was written.
"""

from __future__ import annotations

import contextlib
import hashlib
import random
from collections.abc import Iterator

import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler


class EpochSampler(DistributedSampler):
    """Yields ``(index, epoch)``: the dataset seeds each sample's augmentation from both.

    ``skip`` leaves out the first samples of the next iteration only (``EpochLoader`` sets it
    on resume); the length stays the epoch's, so Lightning's own batch count continues where
    it stopped.
    """

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.skip = 0

    def __iter__(self) -> Iterator[tuple[int, int]]:
        epoch, skip = self.epoch, self.skip
        self.skip = 0
        return iter([(index, epoch) for index in list(super().__iter__())[skip:]])


class EpochLoader(DataLoader):
    """The training loader, resumable mid-epoch through Lightning's stateful-loader protocol.

    Its state is its position: the epoch and how many of its batches were handed to training.
    Lightning saves ``state_dict()`` in every checkpoint and, resuming mid-epoch, passes it
    to ``load_state_dict`` before the first batch. Lightning fetches ahead only from loaders
    without a length, so when a checkpoint is written (at the end of a batch or an epoch) the
    batches handed out are the batches trained; workers' prefetching happens behind the
    iterator and is not counted.
    """

    def __init__(self, dataset: Dataset, sampler: EpochSampler, **options) -> None:
        super().__init__(dataset, sampler=sampler, **options)
        self.position = {"epoch": sampler.epoch, "batches": 0}
        self._start: dict[int, int] = {}  # {epoch: batches to skip} for the next iteration

    def state_dict(self) -> dict[str, int]:
        return dict(self.position)

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.start_after(state["epoch"], state["batches"])

    def start_after(self, epoch: int, batches: int) -> None:
        """Make the next iteration ``epoch`` after its first ``batches`` (the next epoch if
        they are all of it). The skip holds only if the sampler is still at that epoch when
        the iteration begins: Lightning sets the epoch again, after this, from its own count
        (which is the next one after a checkpoint at an epoch's last batch)."""
        if batches >= len(self):
            epoch, batches = epoch + 1, 0
        self.sampler.set_epoch(epoch)
        self._start = {epoch: batches}
        self.position = {"epoch": epoch, "batches": batches}

    def __iter__(self) -> Iterator:
        """A generator, so nothing is read before the first batch is asked for: Lightning
        creates the iterator before it sets the sampler's epoch, and loader workers would
        otherwise draw their first indices from the previous epoch's order."""
        epoch = self.sampler.epoch
        done, self._start = self._start.get(epoch, 0), {}
        self.sampler.skip = done * self.batch_size
        self.position = {"epoch": epoch, "batches": done}
        for batch in super().__iter__():
            self.position["batches"] += 1
            yield batch


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
