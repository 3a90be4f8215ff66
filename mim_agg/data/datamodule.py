"""Train / held-out / test splits of a labeled source, as a Lightning DataModule.

Model selection is honest: the held-out split is a stratified, seeded fraction of the *train*
split, evaluated with the eval transform. The test split is never used to choose anything.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import lightning as L
import numpy as np
import torch
from lightning.pytorch.overrides.distributed import UnrepeatedDistributedSampler
from sklearn.model_selection import train_test_split
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from mim_agg.data.decode import DEFAULT_DECODE, encoded
from mim_agg.data.device_decode import collate, finish_images
from mim_agg.data.imagenet_variants import EvaluationImages
from mim_agg.data.sampling import EpochLoader, EpochSampler, seeded_random
from mim_agg.data.sources import (
    DataError,
    Source,
    UnreadableImage,
    classes_of,
    listed,
    load_image,
    targets_of,
    unreadable,
)
from mim_agg.data.transforms import build_transform
from mim_agg.errors import ConfigError

log = logging.getLogger(__name__)


class TransformedSubset(Dataset):
    """``base[indices]`` with a transform on the image: one source serves several splits.

    Indexed by ``(index, epoch)`` (see ``EpochSampler``), the transform runs under a random
    state derived from ``(seed, epoch, index)``: augmentations repeat exactly on resume.
    """

    def __init__(self, base: Dataset, indices: np.ndarray, transform, seed: int = 0) -> None:
        self.base = base
        self.indices = indices
        self.transform = transform
        self.seed = seed
        self.targets = targets_of(base)[indices]

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, key: int | tuple[int, int]):
        if isinstance(key, tuple):
            index, epoch = key
            image, target = self.base[int(self.indices[index])]
            with seeded_random(self.seed, epoch, index):
                return self.transform(image), target
        image, target = self.base[int(self.indices[key])]
        return self.transform(image), target


def verify_images(sources: dict[str, Dataset], workers: int) -> None:
    """Decode every image file of every split (``dataset.verify=true``), in parallel threads
    with a progress bar; all broken files of all splits are named at once, before any weights
    load, so one pass of fixes is enough."""
    broken, counts = [], []
    for split, source in sources.items():
        paths = [path for path, _ in getattr(source, "samples", [])]  # in-memory sets have none
        found = []

        def check(path: str, found=found) -> None:
            try:
                load_image(path)
            except UnreadableImage as error:
                found.append(unreadable(path, error.__cause__))

        with ThreadPoolExecutor(max(1, workers)) as pool:
            progress = tqdm(
                pool.map(check, paths), total=len(paths), desc=f"verify {split}", unit="img"
            )
            for _ in progress:
                pass
        if found:
            counts.append(f"{split}: {len(found)} of {len(paths)}")
            broken += sorted(found)
    if broken:
        shown = "\n  ".join(broken[:20])
        raise DataError(f"{len(broken)} images cannot be read ({', '.join(counts)}):\n  {shown}")


class SplitLoaders(L.LightningDataModule):
    """Loaders over ``splits`` (train, heldout, test) of images or of cached tokens.

    Training is shuffled per epoch from the seed, sharded across DDP ranks by the sampler
    itself, and resumable mid-epoch: the loader's state, which Lightning checkpoints, says
    where it stopped (``EpochLoader``).
    """

    splits: dict[str, Dataset]
    seed: int
    batch_size: int
    num_workers: int
    num_classes: int

    def train_dataloader(self) -> EpochLoader:
        """This rank's training loader. Lightning then hands it the checkpoint's loader state,
        if any, before the first batch (``EpochLoader.load_state_dict``)."""
        trainer = self.trainer
        if trainer is None:
            return self.train_loader()
        return self.train_loader(
            trainer.world_size,
            trainer.global_rank,
            trainer.current_epoch,
            self._batches_stepped(trainer),
        )

    def train_loader(
        self, world_size: int = 1, rank: int = 0, epoch: int = 0, batches_done: int = 0
    ) -> EpochLoader:
        """Rank ``rank``'s training batches of ``epoch``, after the first ``batches_done``;
        what they hold over all ranks is ``train_epoch``'s count."""
        dataset = self.splits["train"]
        sampler = EpochSampler(
            dataset, num_replicas=world_size, rank=rank, shuffle=True, seed=self.seed
        )
        drop_last = sampler.num_samples > self.batch_size  # this rank's share, not the split's
        loader = EpochLoader(dataset, sampler, drop_last=drop_last, **self._loader_options())
        loader.start_after(epoch, batches_done)
        return loader

    def train_epoch(self, world_size: int) -> tuple[int, int]:
        """``(batches, images)``: the batches each rank trains per epoch and the images they
        hold over all ranks, as ``train_dataloader`` yields them.

        Each rank trains its share of the split (the sampler pads the shares to equal size). A
        share larger than a batch drops its last partial batch, so every rank steps alike; a
        share no larger than a batch is one batch of the whole share (a low-shot subset under
        a large ``probe.batch_size``), never an empty epoch."""
        share = -(-len(self.splits["train"]) // world_size)
        if share <= self.batch_size:
            return 1, share * world_size
        batches = share // self.batch_size
        return batches, batches * self.batch_size * world_size

    def _batches_stepped(self, trainer) -> int:
        """The batches of the current epoch that the restored global step accounts for:
        where checkpoints written before the loader had a state (Lightning loads none from
        them) resume, as they always did. Read from public counters, so right only in a loader
        built after the restore (``LinearProbe.on_fit_start``); a loader state wins."""
        batches = self.train_epoch(trainer.world_size)[0]
        steps_per_epoch = -(-batches // trainer.accumulate_grad_batches)
        return trainer.global_step % steps_per_epoch * trainer.accumulate_grad_batches

    test_each_epoch = False  # ``probe.test_each_epoch``: the task sets it

    @property
    def has_heldout(self) -> bool:
        return len(self.splits["heldout"]) > 0

    @property
    def validation_splits(self) -> tuple[str, ...]:
        """The splits scored after every epoch, in loader order: held-out, which selects, and
        with ``test_each_epoch`` the test split, for the best-epoch-on-test figure that
        efficient-probing publishes (it selects nothing here)."""
        heldout = ("heldout",) if self.has_heldout else ()
        return heldout + (("test",) if self.test_each_epoch else ())

    def val_dataloader(self) -> list[DataLoader]:
        return [self._evaluation_loader(split) for split in self.validation_splits]

    def test_dataloader(self) -> DataLoader:
        return self._evaluation_loader("test")

    def _evaluation_loader(self, split: str) -> DataLoader:
        """Every image exactly once over all ranks: Lightning's default distributed sampler
        pads the split with repeated images, which would count them twice in the accuracy."""
        dataset, trainer = self.splits[split], self.trainer
        sampler = None
        if trainer is not None and trainer.world_size > 1:
            sampler = UnrepeatedDistributedSampler(
                dataset, trainer.world_size, trainer.global_rank, shuffle=False
            )
        return DataLoader(dataset, sampler=sampler, **self._loader_options())

    def _loader_options(self) -> dict:
        return dict(
            batch_size=self.batch_size,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
            pin_memory=torch.cuda.is_available(),
            collate_fn=collate,
        )


class ProbeDataModule(SplitLoaders):
    """Images of a labeled source, split into train / held-out / test.

    ``name`` and ``source_options`` pick the source and configure it (``sources.Source``);
    everything else here is what every source shares: the class count, the splits, low-shot
    subsets and transforms. ``mim_agg.config.DatasetConfig`` is derived from this signature,
    each source's schema adds its own options (flat under ``dataset.``; ``from_config`` splits
    them off again).
    """

    def __init__(
        self,
        name: str,
        num_classes: int | None,
        img_size: int,
        mean,
        std,
        batch_size: int,
        source_options: Mapping[str, Any] | None = None,
        train_size: int | None = None,
        test_size: int | None = None,
        heldout_fraction: float = 0.1,
        seed: int = 0,
        num_workers: int = 8,
        verify: bool = False,
        augment: bool = True,
        shots: int | None = None,
        fraction: float | None = None,
        subset_seed: int = 0,
        decode: str = DEFAULT_DECODE,
    ) -> None:
        super().__init__()
        if not 0.0 <= heldout_fraction < 1.0:
            raise ValueError(f"dataset.heldout_fraction={heldout_fraction} must lie in [0, 1).")
        self.source = Source(name, dict(source_options or {}))
        self.name, self.num_classes, self.seed = name, num_classes, seed
        self.train_size, self.test_size = train_size, test_size
        self.heldout_fraction = heldout_fraction
        self.batch_size, self.num_workers = batch_size, num_workers
        self.verify = verify
        if shots is not None and fraction is not None:
            raise ConfigError(
                f"dataset.shots={shots} and dataset.fraction={fraction} both choose a low-shot "
                "subset; set one of them (the other null)."
            )
        self.shots, self.fraction, self.subset_seed = shots, fraction, subset_seed
        self.augment = augment  # false: train on the eval transform (centre crop), as a cache can
        self.decode = decode  # pil | turbo | turbo_dct | gpu: mim_agg/data/decode.py
        self.train_transform = build_transform(augment, img_size, mean, std, decode=decode)
        self.eval_transform = build_transform(False, img_size, mean, std, decode=decode)
        self.splits: dict[str, TransformedSubset] = {}
        # The source's names of labels 0..N-1 (class folders, torchvision's ``classes``); None
        # where its labels are bare integers (``dataset.split_file``, arrays). Set by ``setup``.
        self.class_names: list[str] | None = None

    def on_after_batch_transfer(self, batch, dataloader_idx: int):
        """Lightning's hook where a batch has reached the device: under ``dataset.decode=gpu``
        its images are decoded and transformed there (``finish_images``); other batches are
        there already."""
        images, targets = batch
        return finish_images(images, self.trainer.strategy.root_device), targets

    @classmethod
    def from_config(cls, dataset: Mapping[str, Any], **inputs) -> ProbeDataModule:
        """From ``dataset.*`` as composed, flat: the keys of this signature, and the source's
        own options (the rest). ``inputs``: what the backbone and probe decide (``img_size``,
        ``mean``, ``std``, ``batch_size``)."""
        shared = inspect.signature(cls).parameters
        options = {key: value for key, value in dataset.items() if key not in shared}
        kept = {key: value for key, value in dataset.items() if key in shared}
        return cls(**kept, **inputs, source_options=options)

    def setup(self, stage: str | None = None) -> None:
        if self.splits:
            return
        train, test = self.source.load(self.num_classes, self.seed)
        names = getattr(train, "classes", None)
        self.class_names = None if names is None else [str(name) for name in names]
        if isinstance(test, EvaluationImages):  # ImageNet-V2, -R, ...: nothing to train on
            raise DataError(
                f"dataset={self.name} is a test set only (no train split): train the probe on "
                "ImageNet (dataset=imagenet), then score that run on it with python run.py "
                f"task=evaluate evaluate.run=<the probe run's folder> dataset={self.name}."
            )
        train, test = (encoded(split, self.decode, self.name) for split in (train, test))
        labels = np.concatenate([targets_of(train), targets_of(test)])
        self.num_classes = self._resolve_num_classes(classes_of(train), labels)
        for split, source in (("train", train), ("test", test)):
            self._check_labels(split, targets_of(source))
        if self.verify:
            verify_images({"train": train, "test": test}, self.num_workers)
        train_idx = self._subsample(targets_of(train), self.train_size, "train_size")
        train_idx = self._low_shot(targets_of(train), train_idx)
        test_idx = self._subsample(targets_of(test), self.test_size, "test_size")
        heldout_idx = np.array([], dtype=np.int64)
        if self.heldout_fraction > 0:
            train_idx, heldout_idx = self._hold_out(targets_of(train), train_idx)
        self._check_every_class_trains(labels, targets_of(train), targets_of(train)[train_idx])
        self.splits = {
            "train": TransformedSubset(
                train, np.sort(train_idx), self.train_transform, seed=self.seed
            ),
            "heldout": TransformedSubset(train, np.sort(heldout_idx), self.eval_transform),
            "test": TransformedSubset(test, test_idx, self.eval_transform),
        }
        log.info("%s", self.describe())

    def _subsample(self, targets: np.ndarray, size: int | None, key: str) -> np.ndarray:
        """A stratified, seeded subset of ``size`` indices (all of them when ``size`` is None),
        ``size`` being ``dataset.<key>``; more than the split holds is refused: it would name
        another run of the same images."""
        indices = np.arange(len(targets))
        if size is not None and size > len(targets):
            raise DataError(
                f"dataset.{key}={size} asks for more than the {len(targets)} images of the "
                f"split it subsamples (dataset {self.name}); use dataset.{key}={len(targets)} "
                "or less, or null for all of them."
            )
        if size is None or size == len(targets):
            return indices
        try:
            kept, _ = train_test_split(
                indices, train_size=size, random_state=self.seed, stratify=targets
            )
        except ValueError as error:  # fewer images than classes, or a class of one image
            raise DataError(
                f"Cannot draw dataset.{key}={size} of {len(targets)} images stratified by "
                f"class ({error}); use a larger dataset.{key}, or null for all images."
            ) from None
        return np.sort(kept)

    def _low_shot(self, targets: np.ndarray, indices: np.ndarray) -> np.ndarray:
        """``shots`` images of every class, or ``fraction`` of each class (at least one),
        drawn from ``subset_seed`` alone: the same subset for every head and protocol."""
        if self.shots is None and self.fraction is None:
            return indices
        generator = np.random.default_rng(self.subset_seed)
        chosen = []
        for label in np.unique(targets[indices]):
            members = indices[targets[indices] == label]
            if self.shots is not None and len(members) < self.shots:
                raise DataError(
                    f"dataset.shots={self.shots}, but class {label} of dataset {self.name!r} "
                    f"has only {len(members)} training images; use dataset.shots<={len(members)}."
                )
            wanted = self.shots or max(1, round(self.fraction * len(members)))
            chosen.append(generator.choice(members, size=wanted, replace=False))
        return np.sort(np.concatenate(chosen))

    def _hold_out(self, targets: np.ndarray, indices: np.ndarray):
        """A stratified, seeded ``heldout_fraction`` of the train indices; of a low-shot subset,
        ``max(1, round(fraction x n))`` images of each class (stratified splitting needs as many
        held-out images as classes, which few shots do not give)."""
        if self.low_shot:
            return self._hold_out_per_class(targets, indices)
        try:
            return train_test_split(
                indices,
                test_size=self.heldout_fraction,
                random_state=self.seed,
                stratify=targets[indices],
            )
        except ValueError as error:  # fewer images per class than a stratified split needs
            raise DataError(
                f"Cannot hold out dataset.heldout_fraction={self.heldout_fraction} of "
                f"{len(indices)} training images stratified by class ({error}). Use a larger "
                "heldout_fraction, or heldout_fraction=0 (then nothing is chosen on held-out data)."
            ) from None

    def _hold_out_per_class(self, targets: np.ndarray, indices: np.ndarray):
        generator = np.random.default_rng(self.seed)
        kept, held = [], []
        for label in np.unique(targets[indices]):
            members = generator.permutation(indices[targets[indices] == label])
            count = max(1, round(self.heldout_fraction * len(members)))
            if count >= len(members):
                raise DataError(
                    f"Holding out dataset.heldout_fraction={self.heldout_fraction} of class "
                    f"{label}'s {len(members)} low-shot images leaves none to train on; use "
                    "more shots, or dataset.heldout_fraction=0 (then nothing is chosen on "
                    "held-out data)."
                )
            held.append(members[:count])
            kept.append(members[count:])
        return np.sort(np.concatenate(kept)), np.sort(np.concatenate(held))

    def describe(self) -> str:
        """How much data the run learns and is judged on, said once by every task that reads
        images (``setup``), so a number in a table can be read against its data."""
        train, heldout, test = (len(self.splits[split]) for split in ("train", "heldout", "test"))
        text = (
            f"Dataset {self.name!r}: {train} train, {heldout} held-out, {test} test images "
            f"of {self.num_classes} classes"
        )
        if self.low_shot:
            per_class = f"{self.shots} images" if self.shots else f"a fraction {self.fraction}"
            text += (
                f"; low-shot: {per_class} of each class (train and held-out together), "
                f"subset seed {self.subset_seed}"
            )
        return text

    def subset_listing(self) -> str:
        """The train and held-out images of a low-shot subset, one per line: split, index in
        the source, label and file (where the source has files)."""
        lines = ["split\tindex\tlabel\tfile"]
        for split in ("train", "heldout"):
            subset = self.splits[split]
            samples = getattr(subset.base, "samples", None)
            for index, label in zip(subset.indices, subset.targets, strict=True):
                path = samples[index][0] if samples is not None else ""
                lines.append(f"{split}\t{index}\t{label}\t{path}")
        return "\n".join(lines) + "\n"

    @property
    def low_shot(self) -> bool:
        return self.shots is not None or self.fraction is not None

    def _resolve_num_classes(self, declared: int | None, labels: np.ndarray) -> int:
        """The configured count, the source's own (class folders, torchvision), both agreeing,
        or, where neither says, the labels' (the largest + 1; a class without training images
        is then refused by ``_check_every_class_trains``)."""
        if self.num_classes is not None and declared is not None and declared != self.num_classes:
            raise DataError(
                f"dataset.num_classes={self.num_classes}, but dataset {self.name!r} has {declared} "
                f"classes; set dataset.num_classes={declared} (or null to take the data's count)."
            )
        if self.num_classes is not None:
            return self.num_classes
        return declared if declared is not None else int(labels.max(initial=-1)) + 1

    def _check_labels(self, split: str, targets: np.ndarray) -> None:
        """Every label of every split in [0, num_classes), before any weights are loaded."""
        outside = targets[(targets < 0) | (targets >= self.num_classes)]
        if len(outside):
            raise DataError(
                f"The {split} split of dataset {self.name!r} has labels "
                f"{sorted(set(outside.tolist()))[:10]} outside [0, {self.num_classes}); "
                f"set dataset.num_classes={int(targets.max()) + 1}."
            )

    def _check_every_class_trains(
        self, labels: np.ndarray, train_labels: np.ndarray, trained_labels: np.ndarray
    ) -> None:
        """Every class of ``num_classes`` has an image in the final training split
        (``trained_labels``: after ``train_size``, low-shot and held-out). Heads trained K-way
        on fewer classes give a number for a task that was never posed (a split file with 3
        labels and ``num_classes=10``), so they are refused, naming the classes and the fix.
        ``labels``: both splits'; ``train_labels``: the whole train split's."""
        classes = np.arange(self.num_classes)
        absent = np.setdiff1d(classes, train_labels)
        if len(absent):
            raise DataError(self._absent_classes(absent, int(labels.max(initial=-1))))
        dropped = np.setdiff1d(classes, trained_labels)
        if len(dropped):
            raise DataError(
                f"dataset.train_size={self.train_size} and dataset.heldout_fraction="
                f"{self.heldout_fraction} leave class(es) {listed(dropped)} of dataset "
                f"{self.name!r} without a training image; use a larger dataset.train_size "
                "(or null) or a smaller heldout_fraction."
            )

    def _absent_classes(self, absent: np.ndarray, largest_label: int) -> str:
        """Which classes have no training image at all, and the fix: fewer classes when no
        split has their labels (the last ones), training images or other labels otherwise."""
        present = self.num_classes - len(absent)
        if largest_label < present:
            fix = f"set dataset.num_classes={present}, or null to count the labels"
        else:
            where = " in dataset.split_file" if self.source.options.get("split_file") else ""
            fix = (
                f"add training images of them{where}, or remove their labels and number the "
                f"classes 0..{present - 1}"
            )
        return (
            f"dataset {self.name!r} is read as {self.num_classes} classes, but its train split "
            f"has no image of class(es) {listed(absent)} ({len(absent)} of {self.num_classes}): "
            f"heads would be trained {self.num_classes}-way on {present} classes; {fix}."
        )

    def eval_split(self, split: str) -> TransformedSubset:
        """All of ``train`` (held-out part included) or ``test``, with the eval transform."""
        self.setup()
        if split == "test":
            return self.splits["test"]
        train, heldout = self.splits["train"], self.splits["heldout"]
        indices = np.sort(np.concatenate([train.indices, heldout.indices]))
        return TransformedSubset(train.base, indices, self.eval_transform)
