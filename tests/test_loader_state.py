"""The training loader's state, as Lightning checkpoints and restores it: a fit that crashes
right after a checkpoint and resumes from it trains exactly the batches (images, labels and
augmentations) of a fit never interrupted, and Lightning finds nothing to warn about."""

from __future__ import annotations

import warnings

import lightning as L
import pytest
import torch
from torch.nn import functional as F
from torch.utils.data import DataLoader

from mim_agg.data import ProbeDataModule

EPOCHS = 3  # of 11 batches: 180 training images, batch 16


class Recorder(L.LightningModule):
    """A linear classifier that notes a fingerprint of every batch it trains on."""

    def __init__(self) -> None:
        super().__init__()
        self.layer = torch.nn.Linear(3 * 32 * 32, 4)
        self.seen: list[tuple] = []

    def training_step(self, batch, batch_idx):
        images, targets = batch
        self.seen.append((tuple(targets.tolist()), round(images.sum().item(), 3)))
        return F.cross_entropy(self.layer(images.flatten(1)), targets)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


class Crash(Exception):
    """Ends a fit the way a kill would, but in this process."""


class CheckpointThenCrash(L.Callback):
    """Writes a checkpoint at the end of optimizer step ``step`` (``hook="batch"``) or of epoch
    ``step`` (``hook="epoch"``), as the run's own callbacks do, notes the loader's state and the
    batches trained, then crashes."""

    def __init__(self, hook: str, step: int, path) -> None:
        self.hook, self.step, self.path = hook, step, path
        self.state = self.trained = None

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        if self.hook == "batch" and trainer.global_step == self.step:
            self._crash(trainer, {"epoch": trainer.current_epoch, "batches": batch_idx + 1})

    def on_train_epoch_end(self, trainer, module) -> None:
        if self.hook == "epoch" and trainer.current_epoch == self.step:
            batches = len(trainer.train_dataloader)
            self._crash(trainer, {"epoch": trainer.current_epoch, "batches": batches})

    def _crash(self, trainer, trained: dict) -> None:
        trainer.save_checkpoint(self.path)
        state_dict = getattr(trainer.train_dataloader, "state_dict", None)  # none: stateless
        self.state, self.trained = state_dict and state_dict(), trained
        raise Crash


class StatelessLoader(ProbeDataModule):
    """The training loader as it was before it had a state: its checkpoints hold none."""

    def train_dataloader(self) -> DataLoader:
        loader = super().train_dataloader()
        return DataLoader(
            loader.dataset,
            batch_size=loader.batch_size,
            sampler=loader.sampler,
            drop_last=loader.drop_last,
        )


def data(num_workers: int = 0, kind=ProbeDataModule) -> ProbeDataModule:
    return kind(
        name="synthetic",
        num_classes=4,
        img_size=32,
        mean=[0.5] * 3,
        std=[0.25] * 3,
        batch_size=16,
        num_workers=num_workers,
    )


def fit(datamodule, *callbacks, checkpoint=None, module=None, **options) -> list[tuple]:
    """The batches a fit of ``EPOCHS`` epochs trains (from ``checkpoint`` if given);
    ``options``: more of the Trainer's."""
    module = module or Recorder()
    L.Trainer(
        max_epochs=EPOCHS,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        callbacks=list(callbacks),
        **options,
    ).fit(module, datamodule=datamodule, ckpt_path=checkpoint)
    return module.seen


def crashed(datamodule, stop: CheckpointThenCrash, **options) -> list[tuple]:
    """The batches trained before ``stop`` checkpointed and crashed the fit."""
    module = Recorder()
    with pytest.raises(Crash):
        fit(datamodule, stop, module=module, **options)
    return module.seen


def resumed(datamodule, checkpoint, **options) -> tuple[list[tuple], list[str]]:
    """The batches a fit resumed from ``checkpoint`` trains, and Lightning's warnings."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        seen = fit(datamodule, checkpoint=checkpoint, **options)
    return seen, [str(warning.message) for warning in caught]


def unresumable(warned: list[str]) -> list[str]:
    return [message for message in warned if "not resumable" in message]


@pytest.fixture(scope="module")
def uninterrupted() -> list[tuple]:
    return fit(data())


CRASHES = {
    # name: (hook, step, loader workers)
    "mid_first_epoch": ("batch", 7, 0),
    "after_an_epochs_last_batch": ("batch", 11, 0),
    "mid_second_epoch_with_workers": ("batch", 15, 2),
    "at_an_epochs_end_with_workers": ("epoch", 0, 2),
}


@pytest.mark.slow  # trains, extracts or runs for seconds (make test-fast skips it)
@pytest.mark.parametrize("crash", CRASHES)
def test_a_resumed_fit_trains_the_uninterrupted_batches_unwarned(crash, uninterrupted, tmp_path):
    hook, step, workers = CRASHES[crash]
    stop = CheckpointThenCrash(hook, step, tmp_path / "last.ckpt")
    before = crashed(data(workers), stop)
    assert stop.state == stop.trained  # batches trained, not fetched, are what it holds

    after, warned = resumed(data(workers), stop.path)
    assert before + after == uninterrupted
    assert not unresumable(warned)


@pytest.mark.parametrize(("accumulate", "step", "trained"), [(1, 15, 11 + 4), (3, 6, 11 + 6)])
def test_a_checkpoint_without_a_loader_state_resumes_where_it_stopped(
    accumulate, step, trained, uninterrupted, tmp_path
):
    """Checkpoints written before the loader had a state continue after the batches their
    global step counts, as they always did (3 batches a step: 4 steps an epoch)."""
    stop = CheckpointThenCrash("batch", step, tmp_path / "last.ckpt")
    before = crashed(data(kind=StatelessLoader), stop, accumulate_grad_batches=accumulate)
    assert stop.state is None and len(before) == trained

    after, warned = resumed(data(), stop.path, accumulate_grad_batches=accumulate)
    assert before + after == uninterrupted
    assert not unresumable(warned)
