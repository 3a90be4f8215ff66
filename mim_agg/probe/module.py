"""Linear probing of many heads over one frozen-backbone pass per batch.

Heads are independent: own parameters, own optimizer parameter groups (so own learning rate,
weight decay and schedule), losses summed so gradients never mix. Each head's best epoch is
chosen on the held-out split; the test split is evaluated once, at the end, with both the
selected and the last-epoch weights of every head (and, with ``probe.test_each_epoch``, after
every epoch too, for efficient-probing's best-epoch figure, which chooses nothing here).
"""

from __future__ import annotations

import copy
import itertools
import logging
import math
import random
import time

import lightning as L
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.optim.lr_scheduler import LambdaLR
from torchmetrics import MeanMetric, MetricCollection
from torchmetrics.classification import MulticlassAccuracy

from mim_agg.backbones import Tokens, TokenSource
from mim_agg.backbones.tokens import require_finite
from mim_agg.errors import UserError
from mim_agg.probe.head import ProbeHead
from mim_agg.probe.lars import LARS
from mim_agg.probe.schedule import scaled_lr, warmup_cosine
from mim_agg.utils.predictions import HeadPredictions

log = logging.getLogger(__name__)

FROZEN = ("source.",)  # frozen models: rebuilt from config, never checkpointed
# The writing run's config hash (run.json's config_hash): a last.ckpt copied into another run's
# folder is recognised, on resume and wherever a finished run's heads are read.
RUN_HASH = "run_config_hash"
OPTIMIZERS = {
    "lars": lambda groups, momentum: LARS(groups, momentum=momentum),
    "sgd": lambda groups, momentum: torch.optim.SGD(groups, momentum=momentum),
    "adamw": lambda groups, momentum: torch.optim.AdamW(groups),
}


def accuracy_metrics(num_classes: int) -> MetricCollection:
    return MetricCollection(
        {
            "acc1": MulticlassAccuracy(num_classes, top_k=1, average="micro"),
            "acc5": MulticlassAccuracy(num_classes, top_k=min(5, num_classes), average="micro"),
            "loss": MeanMetric(),
        }
    )


class LinearProbe(L.LightningModule):
    def __init__(
        self,
        source: TokenSource,
        heads: dict[str, ProbeHead],
        blrs: dict[str, float],
        weight_decays: dict[str, float],
        num_classes: int,
        batch_size: int,
        optimizer: str = "lars",
        momentum: float = 0.9,
        warmup_epochs: float = 10,
        run_hash: str | None = None,
    ) -> None:
        super().__init__()
        self.run_hash = run_hash  # the run's identity, in its checkpoints (RUN_HASH)
        if optimizer not in OPTIMIZERS:
            raise ValueError(f"probe.optimizer={optimizer!r} is not one of {sorted(OPTIMIZERS)}.")
        self.source = source
        self.heads = nn.ModuleDict(heads)
        self.blrs = blrs
        self.weight_decays = weight_decays
        self.batch_size = batch_size
        self.optimizer_name = optimizer
        self.momentum = momentum
        self.warmup_epochs = warmup_epochs
        self.num_classes = num_classes
        self.metrics = nn.ModuleDict(
            {
                f"{split}__{name}": accuracy_metrics(num_classes)
                for name in heads
                for split in ("heldout", "test_epoch", "test_best", "test_last")
            }
        )
        self.selection = {name: {"acc1": -1.0, "epoch": -1, "state": None} for name in heads}
        self.test_by_epoch: dict[str, list[float]] = {name: [] for name in heads}
        self.diverged: dict[str, int] = {}  # head -> the step its loss became non-finite
        self.results: dict[str, dict] = {}
        self.predictions: HeadPredictions | None = None  # of the selected heads, after test
        self.timing = {"backbone_s": 0.0, "backbone_images": 0, "train_s": 0.0, "train_images": 0}

    # ----------------------------------------------------------------------------- forward
    def tokens(self, inputs) -> Tokens:
        """The batch's tokens from the source, timed, in the heads' precision, usable by
        autograd. Non-finite tokens stop the run: no head can learn from them, and accuracy
        would look like chance."""
        start = time.perf_counter()
        tokens = self.source(inputs)
        require_finite("The tokens the probe reads", tokens.tensors())
        first = tokens.tensors()[0]
        if first.is_cuda:
            torch.cuda.synchronize(first.device)
        self.timing["backbone_s"] += time.perf_counter() - start
        self.timing["backbone_images"] += len(tokens)
        return tokens.map(trainable_copy)

    @property
    def live_heads(self) -> dict[str, ProbeHead]:
        return {name: head for name, head in self.heads.items() if name not in self.diverged}

    def training_step(self, batch, batch_idx):
        inputs, targets = batch
        tokens = self.tokens(inputs)
        heads = self.live_heads
        losses = torch.stack([F.cross_entropy(head(tokens), targets) for head in heads.values()])
        finite = torch.isfinite(losses).tolist()  # one sync per step for all heads
        for (name, loss), ok in zip(zip(heads, losses, strict=True), finite, strict=True):
            if ok:
                self.log(
                    f"train/{name}/loss", loss, on_step=True, on_epoch=True, batch_size=len(targets)
                )
            else:
                self._diverge(name)
        self.timing["train_images"] += len(targets)
        total = sum(loss for loss, ok in zip(losses, finite, strict=True) if ok)
        self.log("loss", total / max(1, sum(finite)), prog_bar=True, batch_size=len(targets))
        return total

    def _diverge(self, name: str) -> None:
        """Stop a head whose loss became non-finite: it trains no further and never wins."""
        self.diverged[name] = self.global_step
        self.heads[name].requires_grad_(False)
        log.warning(
            "Head %s diverged at step %d (non-finite loss); the others train on.",
            name,
            self.global_step,
        )
        if len(self.diverged) == len(self.heads):
            rates = sorted({self.blrs[n] for n in self.heads})
            raise UserError(
                f"Every head diverged (non-finite loss) by step {self.global_step}, with base "
                f"learning rates {rates}; try smaller ones, e.g. probe.blr={min(rates) / 10:g}."
            )

    def validation_step(self, batch, batch_idx, dataloader_idx=0):
        metrics = {"heldout": "heldout", "test": "test_epoch"}[
            self._validation_splits[dataloader_idx]
        ]
        inputs, targets = batch
        tokens = self.tokens(inputs)
        for name, head in self.live_heads.items():
            self._update(f"{metrics}__{name}", head(tokens), targets)

    def test_step(self, batch, batch_idx):
        inputs, targets = batch
        tokens = self.tokens(inputs)
        self._test_targets.append(targets)
        for name, head in self.live_heads.items():
            self._update(f"test_last__{name}", head(tokens), targets)
            logits = self._selected_heads[name](tokens)
            self._update(f"test_best__{name}", logits, targets)
            self._test_predicted.setdefault(name, []).append(logits.argmax(dim=1))

    def _update(self, key: str, logits: torch.Tensor, targets: torch.Tensor) -> None:
        metrics = self.metrics[key]
        metrics["acc1"].update(logits, targets)
        metrics["acc5"].update(logits, targets)
        metrics["loss"].update(F.cross_entropy(logits, targets), weight=len(targets))

    def _compute(self, key: str) -> dict[str, float]:
        values = {k: float(v) for k, v in self.metrics[key].compute().items()}
        self.metrics[key].reset()
        return values

    # --------------------------------------------------------------------------- selection
    @property
    def _validation_splits(self) -> tuple[str, ...]:
        return self.trainer.datamodule.validation_splits

    def on_validation_epoch_end(self) -> None:
        if "test" in self._validation_splits:
            self._score_test_epoch()
        if "heldout" in self._validation_splits:
            self._select_on_heldout()

    def _score_test_epoch(self) -> None:
        """``probe.test_each_epoch``: each head's test accuracy after this epoch, kept for the
        best-epoch figure alone; nothing is chosen by it."""
        for name in self.live_heads:
            values = self._compute(f"test_epoch__{name}")
            if not self.trainer.sanity_checking:
                self.test_by_epoch[name].append(values["acc1"])
                self.log(f"test_epoch/{name}/acc1", values["acc1"])

    def _select_on_heldout(self) -> None:
        for name, head in self.live_heads.items():
            values = self._compute(f"heldout__{name}")
            if self.trainer.sanity_checking:
                continue
            for metric, value in values.items():
                self.log(f"val/{name}/{metric}", value)
            chosen = self.selection[name]
            if values["acc1"] > chosen["acc1"]:
                state = {k: v.detach().cpu().clone() for k, v in head.state_dict().items()}
                chosen.update(acc1=values["acc1"], epoch=self.current_epoch, state=state)
        if not self.trainer.sanity_checking:
            best = max(chosen["acc1"] for chosen in self.selection.values())
            self.log("heldout_acc1", best, prog_bar=True)  # the best head so far
            if self.trainer.is_global_zero:  # DDP: one line, not one per process
                self._log_epoch()

    def _log_epoch(self) -> None:
        """One text-log line per epoch: the head leading on held-out so far."""
        name = max(self.selection, key=lambda n: self.selection[n]["acc1"])
        chosen = self.selection[name]
        log.info(
            "epoch %d of %d: best held-out acc1 %.4f (%s at epoch %d)",
            self.current_epoch,
            self.trainer.max_epochs,
            chosen["acc1"],
            name,
            chosen["epoch"],
        )

    def on_test_start(self) -> None:
        """Materialise each head's selected weights (its last ones when nothing was held out)."""
        self._selected_heads = {}
        for name, head in self.heads.items():
            selected = copy.deepcopy(head)
            if self.selection[name]["state"] is not None:
                selected.load_state_dict(self.selection[name]["state"])
            self._selected_heads[name] = selected.eval()
        self._test_targets, self._test_predicted = [], {}  # a test resumed begins anew

    def on_test_epoch_end(self) -> None:
        for name in self.heads:
            if name in self.diverged:
                self.results[name] = self._diverged_result(name)
                continue
            best, last = self._compute(f"test_best__{name}"), self._compute(f"test_last__{name}")
            self.results[name] = {
                "test/acc1": best["acc1"],
                "test/acc5": best["acc5"],
                "test/loss": best["loss"],
                "test/acc1_last": last["acc1"],
                "test/acc5_last": last["acc5"],
                "val/acc1_best": self.selection[name]["acc1"] if self._has_heldout else None,
                "best_epoch": self.selection[name]["epoch"] if self._has_heldout else None,
                "trainable_params": self.heads[name].num_trainable_parameters(),
                "diverged_at_step": None,
                **self._best_test_epoch(name),
            }
            for metric, value in self.results[name].items():
                if metric.startswith("test/") and value is not None:
                    self.log(f"test/{name}/{metric[5:]}", value)
        self.predictions = self._gather_predictions()

    def _gather_predictions(self) -> HeadPredictions:
        """The selected heads' predicted classes for every test image, from every rank, in
        image order: a rank's images are its loader's sampler's first ones (sequential, or
        every world_size-th under DDP), which the test pass visited in that order."""
        targets = _numpy(self._test_targets)
        sampler = self.trainer.test_dataloaders.sampler
        positions = np.fromiter(itertools.islice(iter(sampler), len(targets)), np.int64)
        predicted = {n: _numpy(self._test_predicted.get(n, [])) for n in self.live_heads}
        local = (positions, targets, predicted)
        parts = [local]
        if self.trainer.world_size > 1:
            parts = [None] * self.trainer.world_size
            torch.distributed.all_gather_object(parts, local)
        return HeadPredictions.in_image_order(
            np.concatenate([part[0] for part in parts]),
            np.concatenate([part[1] for part in parts]),
            {name: np.concatenate([part[2][name] for part in parts]) for name in local[2]},
            self.num_classes,
        )

    def _best_test_epoch(self, name: str) -> dict:
        """With ``probe.test_each_epoch``, the best test accuracy over epochs and its epoch:
        efficient-probing's published figure, which selects on the test split (so it is
        reported beside ours, never as it)."""
        if "test" not in self._validation_splits:
            return {}
        scores = self.test_by_epoch[name]
        best = max(range(len(scores)), key=scores.__getitem__) if scores else None
        return {
            "test/acc1_best_epoch": None if best is None else scores[best],
            "best_test_epoch": best,
        }

    def _diverged_result(self, name: str) -> dict:
        """No accuracy at all: numbers of a diverged head would only mislead."""
        metrics = ("test/acc1", "test/acc5", "test/loss", "test/acc1_last", "test/acc5_last")
        return {
            **dict.fromkeys(metrics),
            "val/acc1_best": None,
            "best_epoch": None,
            "trainable_params": sum(p.numel() for p in self.heads[name].parameters()),
            "diverged_at_step": self.diverged[name],
            **dict.fromkeys(self._best_test_epoch(name)),
        }

    @property
    def _has_heldout(self) -> bool:
        return any(chosen["epoch"] >= 0 for chosen in self.selection.values())

    # ---------------------------------------------------------------------- optimization
    def configure_optimizers(self):
        trainer = self.trainer
        images_per_step = self._images_per_step()
        groups = []
        for name, head in self.heads.items():
            lr, wd = scaled_lr(self.blrs[name], images_per_step), self.weight_decays[name]
            params = [p for p in head.parameters() if p.requires_grad]
            matrices = [p for p in params if p.ndim > 1]
            vectors = [p for p in params if p.ndim <= 1]
            # named per head: LearningRateMonitor logs lr-<optimizer>/<head>
            groups.append(dict(params=matrices, lr=lr, weight_decay=wd, lars=True, name=name))
            groups.append(
                dict(params=vectors, lr=lr, weight_decay=0.0, lars=False, name=f"{name}/no_decay")
            )
        groups = [group for group in groups if group["params"]]
        optimizer = OPTIMIZERS[self.optimizer_name](groups, self.momentum)
        total = max(1, self._optimizer_steps())
        warmup = round(total * self.warmup_epochs / max(1, trainer.max_epochs))
        schedule = LambdaLR(optimizer, lambda step: warmup_cosine(step, warmup, total))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}

    def _images_per_step(self) -> int:
        """The images one optimizer step averages over: batch x devices x accumulated steps,
        or one epoch's training images when there are fewer (said in the log)."""
        trainer = self.trainer
        nominal = self.batch_size * trainer.world_size * trainer.accumulate_grad_batches
        _, epoch_images = trainer.datamodule.train_epoch(trainer.world_size)
        if epoch_images < nominal and trainer.is_global_zero:
            log.info(
                "An epoch trains on %d images, fewer than probe.batch_size x devices x "
                "accumulated steps = %d: one step sees them all, and the learning rate is "
                "blr x %d / 256.",
                epoch_images,
                nominal,
                epoch_images,
            )
        return min(nominal, epoch_images)

    def _optimizer_steps(self) -> int:
        """The schedule's length as Lightning's ``estimated_stepping_batches`` counts it
        (optimizer steps per epoch x epochs, at most ``max_steps``), from the data module's
        count: Lightning's estimate builds the train loader here, before a checkpoint is
        restored, and that loader would then never receive its saved position."""
        trainer = self.trainer
        batches, _ = trainer.datamodule.train_epoch(trainer.world_size)
        limit = trainer.limit_train_batches
        batches = min(batches, limit) if isinstance(limit, int) else int(batches * limit)
        steps = math.ceil(batches / trainer.accumulate_grad_batches) * max(trainer.max_epochs, 1)
        return min(steps, trainer.max_steps) if trainer.max_steps != -1 else steps

    # ------------------------------------------------------------------ timing, checkpoints
    def on_train_start(self) -> None:
        self._train_start = time.perf_counter()  # also when resuming in mid-epoch

    def on_train_end(self) -> None:
        self.timing["train_s"] += time.perf_counter() - self._train_start

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        """Keep checkpoints small: frozen models are rebuilt from their config, not saved.
        The random states go along, so heads draw the same numbers after a resume."""
        checkpoint["state_dict"] = {
            k: v for k, v in checkpoint["state_dict"].items() if not k.startswith(FROZEN)
        }
        checkpoint[RUN_HASH] = self.run_hash
        checkpoint["head_selection"] = self.selection
        checkpoint["test_by_epoch"] = self.test_by_epoch
        checkpoint["diverged_heads"] = self.diverged
        checkpoint["random_state"] = {
            "torch": torch.get_rng_state(),
            "python": random.getstate(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        }

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        written_by = checkpoint.get(RUN_HASH)
        if written_by and self.run_hash and written_by != self.run_hash:
            raise UserError(
                f"The run's checkpoints/last.ckpt was written by another run (config hash "
                f"{written_by}, this run's: {self.run_hash}): it was copied here. Remove it, or "
                "start this run over with resume=false."
            )
        frozen_state = {k: v for k, v in self.state_dict().items() if k.startswith(FROZEN)}
        checkpoint["state_dict"].update(frozen_state)
        self.selection = checkpoint["head_selection"]
        self.test_by_epoch = checkpoint.get("test_by_epoch", self.test_by_epoch)  # older: none
        self.diverged = checkpoint["diverged_heads"]
        for name in self.diverged:
            self.heads[name].requires_grad_(False)
        states = checkpoint["random_state"]
        torch.set_rng_state(states["torch"])
        random.setstate(states["python"])
        if states["cuda"] and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(states["cuda"])


def _numpy(batches: list[torch.Tensor]) -> np.ndarray:
    """Batches of class indices as one array; none (a rank without test images) is empty."""
    return torch.cat(batches).cpu().numpy() if batches else np.empty(0, np.int64)


def trainable_copy(tensor: torch.Tensor) -> torch.Tensor:
    """A copy autograd may save (inference-mode tensors cannot be), float32 when it is a
    lower-precision float: caches keep bf16 up to here, the device."""
    if tensor.is_floating_point():
        return tensor.to(torch.float32, copy=True)
    return tensor.clone()
