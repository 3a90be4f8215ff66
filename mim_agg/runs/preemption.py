"""Preemption: a signal asks the run to stop; it stops at the next safe point with a checkpoint.

SLURM sends SIGTERM on preemption (and, with ``--signal``, SIGUSR1 or submitit's SIGUSR2 before
the time limit). A handler only notes the signal; ``StopOnSignal`` saves ``last.ckpt`` at the
next point Lightning can resume from exactly (the end of a training batch or epoch) and raises
``Preempted``. The run folder then records ``preempted`` and the process exits non-zero, or,
under submitit, hands over to submitit's own handler, which requeues the job once.

Several ranks (DDP) stop together: a signal may reach one rank only (``kill`` of one process, a
node's own preemption), and a rank that stopped alone would leave the others waiting in their
next collective until it times out, or crash them ("connection reset"). So every rank takes
part in ``SignalWatch.agree`` at the same points (each optimizer step, each extracted shard):
the signal any rank noted becomes every rank's, and all save, stop and exit 128 + signal
together.
"""

from __future__ import annotations

import logging
import os
import signal
import time
from collections.abc import Callable
from pathlib import Path

import lightning as L
import torch

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
        self.launcher_pid: int | None = None  # rank zero's process, when it started this one
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

    def agree(self, reduce_max: Callable[[int], int], broadcast: Callable) -> bool:
        """Whether any rank noted a signal; called by every rank at the same point (a
        collective). Then every rank holds the same signal (the highest number, should ranks
        have noted different ones) and knows whether rank zero started it as a child process
        (``hand_over`` lets rank zero exit first). One process: its own signal."""
        agreed = reduce_max(self.signum or 0)
        if agreed:
            self.signum = agreed
            rank_zero_pid = broadcast(os.getpid())
            self.launcher_pid = rank_zero_pid if rank_zero_pid == os.getppid() else None
        return bool(agreed)

    def close(self) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)

    def hand_over(self) -> None:
        """After the run folder is updated: let submitit requeue, or exit with 128 + signal."""
        signum = self.signum or signal.SIGTERM
        handler = self._previous.get(signum)
        if signum == self._requeue_signal and callable(handler):
            handler(signum, None)  # submitit: requeue this job, then exit
        self._outlive_launcher()
        log.warning("Exiting with status %d (%s).", 128 + signum, signal.Signals(signum).name)
        raise SystemExit(128 + signum)

    def _outlive_launcher(self, patience_s: float = 120) -> None:
        """A rank that rank zero started (Lightning's launcher on one node, ``trainer=ddp`` or
        ``ddp_sim`` run as ``python run.py``) exits after it: that launcher kills every process,
        rank zero too, as soon as one of its children exits non-zero, which would cut short
        rank zero's checkpoint and run record (and its exit status)."""
        deadline = time.monotonic() + patience_s
        while self.launcher_pid is not None and os.getppid() == self.launcher_pid:
            if time.monotonic() > deadline:
                log.warning("Rank zero (process %d) has not exited; exiting.", self.launcher_pid)
                return
            time.sleep(0.05)


class StopOnSignal(L.Callback):
    """Checks the watch where Lightning can resume exactly, saving ``last.ckpt`` first; with
    several ranks, all agree at each of those points and stop at the same step.

    The watch takes the signals back once Lightning has registered its own handler (at the
    start of training and of testing): that handler broadcasts from rank zero inside the
    handler, which a signal to another rank alone turns into a mismatched collective (the hang
    or "connection reset" of issue 22)."""

    def __init__(self, watch: SignalWatch, checkpoint: Path) -> None:
        self.watch = watch
        self.checkpoint = checkpoint

    def setup(self, trainer, module, stage: str) -> None:
        self.watch.install()  # loggers may have replaced the handlers

    def on_train_start(self, trainer, module) -> None:
        self.watch.install()

    def on_test_start(self, trainer, module) -> None:
        self.watch.install()

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        """Only where an optimizer step just ended: accumulated gradients are not saved."""
        if (batch_idx + 1) % trainer.accumulate_grad_batches == 0:
            self._stop(trainer, save=True)

    def on_train_epoch_end(self, trainer, module) -> None:
        self._stop(trainer, save=True)  # after held-out selection, which ran in this epoch

    def on_test_batch_end(self, trainer, *args) -> None:
        """One process stops at once (the test is rerun whole from the finished training);
        ranks may hold different numbers of test batches, so they agree at the epoch's end."""
        if trainer.world_size == 1:
            self._stop(trainer, save=False)

    def on_test_epoch_end(self, trainer, module) -> None:
        self._stop(trainer, save=False)  # before the ranks' metrics are gathered

    def _stop(self, trainer: L.Trainer, save: bool) -> None:
        strategy = trainer.strategy

        def reduce_max(value: int) -> int:
            tensor = torch.tensor(value, device=strategy.root_device)
            return int(strategy.reduce(tensor, reduce_op="max"))

        if not self.watch.agree(reduce_max, strategy.broadcast):
            return
        if save:
            trainer.save_checkpoint(self.checkpoint)  # every rank takes part; rank zero writes
        log.warning(
            "Rank %d stops at step %d (%s).",
            trainer.global_rank,
            trainer.global_step,
            signal.Signals(self.watch.signum).name,
        )
        self.watch.check()
