"""Preemption: a signal asks the run to stop; it stops at the next safe point with a checkpoint.

SLURM sends SIGTERM on preemption (and, with ``--signal``, SIGUSR1 or submitit's SIGUSR2 before
the time limit). A handler only notes the signal; ``StopOnSignal`` saves ``last.ckpt`` at the
next point Lightning can resume from exactly (the end of a training batch or epoch) and raises
``Preempted``. The run folder then records ``preempted`` and the process exits non-zero, or,
under submitit, hands over to submitit's own handler, which requeues the job once.
"""

from __future__ import annotations

import logging
import os
import signal
from pathlib import Path

import lightning as L

log = logging.getLogger(__name__)


class Preempted(Exception):
    """The run stopped because a signal asked it to; its last checkpoint is up to date."""

    def __init__(self, signum: int) -> None:
        self.signum = signum
        super().__init__(
            f"stopped by {signal.Signals(signum).name}; rerun the same command to resume"
        )


def submitit_signal() -> int | None:
    """The signal submitit checkpoints and requeues on, when this process is a submitit job."""
    if "SUBMITIT_EXECUTOR" not in os.environ:
        return None
    import submitit

    return getattr(signal, "SIG" + submitit.JobEnvironment.USR_SIG)


class SignalWatch:
    """Notes SIGTERM, SIGUSR1 and submitit's signal instead of dying; restores on ``close``."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self._requeue_signal = submitit_signal()
        watched = {signal.SIGTERM, signal.SIGUSR1, self._requeue_signal} - {None}
        self._previous = {signum: signal.signal(signum, self._note) for signum in watched}

    def install(self) -> None:
        """Take the signals back from whoever replaced the handlers since (``wandb.init``
        does); the handlers found first stay the ones ``hand_over`` and ``close`` use."""
        for signum in self._previous:
            signal.signal(signum, self._note)

    def _note(self, signum: int, _frame) -> None:
        if self.signum is None:
            log.warning(
                "Received %s: stopping at the next safe point.", signal.Signals(signum).name
            )
            self.signum = signum

    @property
    def requested(self) -> bool:
        return self.signum is not None

    def check(self) -> None:
        if self.requested:
            raise Preempted(self.signum)

    def close(self) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)

    def hand_over(self) -> None:
        """After the run folder is updated: let submitit requeue, or exit with 128 + signal."""
        signum = self.signum or signal.SIGTERM
        handler = self._previous.get(signum)
        if signum == self._requeue_signal and callable(handler):
            handler(signum, None)  # submitit: requeue this job, then exit
        raise SystemExit(128 + signum)


class StopOnSignal(L.Callback):
    """Checks the watch where Lightning can resume exactly, saving ``last.ckpt`` first."""

    def __init__(self, watch: SignalWatch, checkpoint: Path) -> None:
        self.watch = watch
        self.checkpoint = checkpoint

    def setup(self, trainer, module, stage: str) -> None:
        self.watch.install()  # loggers may have replaced the handlers; Lightning adds its own next

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        """Only where an optimizer step just ended: accumulated gradients are not saved."""
        if (batch_idx + 1) % trainer.accumulate_grad_batches == 0:
            self._stop(trainer, save=True)

    def on_train_epoch_end(self, trainer, module) -> None:
        self._stop(trainer, save=True)

    def on_test_batch_end(self, trainer, *args) -> None:
        self._stop(trainer, save=False)  # the test is rerun whole from the finished training

    def _stop(self, trainer: L.Trainer, save: bool) -> None:
        if not self.watch.requested:
            return
        if save:
            trainer.save_checkpoint(self.checkpoint)
            log.info("Saved %s at step %d.", self.checkpoint, trainer.global_step)
        self.watch.check()
