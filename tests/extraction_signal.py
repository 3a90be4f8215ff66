"""A dataset source that sends its own process a real signal once, as one rank loads its first
image: a distributed extraction interrupted on that rank alone, exactly where a test wants.

A plugin (``MIM_AGG_PLUGINS=tests.extraction_signal``) used as ``dataset=synthetic
dataset.name=synthetic_signal``, armed by ``MIM_AGG_TEST_SIGNAL=<signal>:<rank>:<marker file>``;
the marker makes it fire in the first attempt only. Its images are ``synthetic``'s.
"""

from __future__ import annotations

import os
import signal
from pathlib import Path

from mim_agg.data.sources import ArrayImages, source, synthetic


class SignallingImages(ArrayImages):
    def __getitem__(self, index: int):
        fire_once()
        return super().__getitem__(index)


def fire_once() -> None:
    armed = os.environ.get("MIM_AGG_TEST_SIGNAL")
    if not armed:
        return
    name, rank, marker = armed.split(":", 2)
    if os.environ.get("LOCAL_RANK", "0") != rank or Path(marker).exists():
        return
    Path(marker).write_text(f"{name} to rank {rank}\n")
    os.kill(os.getpid(), getattr(signal, name))


@source("synthetic_signal")
def synthetic_signal(
    num_classes, seed, *, per_class: tuple[int, int] = (50, 20), image_size: int = 32
):
    train, test = synthetic(num_classes, seed, per_class=per_class, image_size=image_size)
    return SignallingImages(train.images, train.targets), test
