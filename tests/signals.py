"""A Lightning callback that sends its own process a real signal once, at a chosen point.

Used through the config (``+callbacks.kill={_target_: tests.signals.SignalOnce, ...}``), so a
subprocess run is interrupted exactly where a test wants; a marker file makes it fire in the
first attempt only, and the rerun of the same command resumes undisturbed.
"""

from __future__ import annotations

import os
import signal
from pathlib import Path

import lightning as L


class SignalOnce(L.Callback):
    """Send ``signal`` (a name such as SIGKILL) at ``hook`` once ``step`` is reached: the
    optimizer step for ``train_batch``, the epoch for ``train_epoch`` and
    ``validation_batch``, the batch index for ``test_batch``; under DDP, to rank ``rank``
    alone."""

    def __init__(self, signal: str, hook: str, step: int, marker: str, rank: int = 0) -> None:
        self.signum = getattr(__import__("signal"), signal)
        self.hook, self.step, self.marker, self.rank = hook, step, Path(marker), rank

    def on_train_batch_end(self, trainer, *args) -> None:
        self._maybe_fire(trainer, "train_batch", trainer.global_step)

    def on_train_epoch_end(self, trainer, module) -> None:
        self._maybe_fire(trainer, "train_epoch", trainer.current_epoch)

    def on_validation_batch_end(self, trainer, *args) -> None:
        if not trainer.sanity_checking:
            self._maybe_fire(trainer, "validation_batch", trainer.current_epoch)

    def on_test_batch_end(self, trainer, module, outputs, batch, batch_idx, *args) -> None:
        self._maybe_fire(trainer, "test_batch", batch_idx)

    def _maybe_fire(self, trainer, hook: str, step: int) -> None:
        wanted = (self.hook, self.step, self.rank)
        if (hook, step, trainer.global_rank) != wanted or self.marker.exists():
            return
        self.marker.write_text(f"{hook} {step}\n")
        os.kill(os.getpid(), self.signum)


def signal_once(signum: str, hook: str, step: int, marker: Path, rank: int = 0) -> str:
    """The command-line override that adds a ``SignalOnce`` callback."""
    return (
        f"+callbacks.interrupt={{_target_:tests.signals.SignalOnce,signal:{signum},"
        f"hook:{hook},step:{step},marker:'{marker}',rank:{rank}}}"
    )


__all__ = ["SignalOnce", "signal", "signal_once"]
