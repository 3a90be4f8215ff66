"""Fill token caches from a live source: split by split, shard by shard, resumable; the
caches of several blocks of one backbone from one pass of it.

Each shard is computed from the same images in the same batches whatever happened before
and whichever process computes it (shards start on batch boundaries; training views are
augmented under the random state of ``(seed, view, index)``, the state online epoch ``view``
uses), so an extraction killed at any moment and rerun, or split between processes
(``mim_agg.cache.parts``), yields byte-identical shards. A signal stops every process of a job
after its current shard.
"""

from __future__ import annotations

import logging
import shutil
from contextlib import nullcontext
from dataclasses import dataclass

import torch
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from mim_agg.aggregators import Aggregator
from mim_agg.backbones import LiveTokens, TokenLayout, TokenRequest, Tokens
from mim_agg.backbones.tokens import TENSOR_FIELDS, require_finite
from mim_agg.cache.parts import Ranks, Share
from mim_agg.cache.store import DTYPES, SplitPlan, TokenCache, quantize
from mim_agg.data.device_decode import collate, finish_images, stack_views

log = logging.getLogger(__name__)

POOLED = "pooled/"


def field_shapes(layout: TokenLayout, request: TokenRequest, out_dims: dict) -> dict:
    """Per image and view, the shape of every field a cache for ``request`` stores: the
    requested ``Tokens`` fields (shaped as ``Tokens.example`` makes them) and the output of
    each parameter-free aggregator it stores, ``pooled/<its output_key>`` (``out_dims`` by
    that key)."""
    example = Tokens.example(layout, request)
    shapes = {name: tuple(getattr(example, name).shape[1:]) for name in stored_names(example)}
    for key in request.pooled:
        shapes[POOLED + key] = (out_dims[key],)
    return shapes


def stored_names(tokens: Tokens) -> list[str]:
    return [name for name in TENSOR_FIELDS if getattr(tokens, name) is not None]


def bytes_per_view(shapes: dict, dtype: str) -> int:
    """Stored bytes of one view of one image (int8: plus a float32 scale per row)."""
    itemsize = torch.empty((), dtype=DTYPES[dtype]).element_size()
    total = 0
    for shape in shapes.values():
        total += itemsize * int(torch.Size(shape).numel())
        if dtype == "int8":
            total += 4 * int(torch.Size(shape[:-1]).numel())
    return total


def human(size: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if size < 1000 or unit == "TB":
            return f"{size:.1f} {unit}" if unit != "B" else f"{int(size)} B"
        size /= 1000
    return ""


class Views(Dataset):
    """Every view of image ``i`` of a split, stacked: ``[views, 3, H, W]`` (under
    ``dataset.decode=gpu``, the list of its pending images). A split with one view and its
    eval transform is read plainly; training views key the augmentation by ``(index, view)``,
    as online epochs do."""

    def __init__(self, split: Dataset, views: int, augmented: bool) -> None:
        self.split, self.views, self.augmented = split, views, augmented

    def __len__(self) -> int:
        return len(self.split)

    def __getitem__(self, index: int):
        if not self.augmented:
            image, target = self.split[index]
            return stack_views([image]), target
        pairs = [self.split[(index, view)] for view in range(self.views)]
        return stack_views([image for image, _ in pairs]), pairs[0][1]


def stored_fields(
    tokens: Tokens, shapes: dict, aggregators: dict[str, Aggregator], dtype: str
) -> dict[str, torch.Tensor]:
    """What the cache keeps of a batch: the fields of ``shapes`` in ``dtype``, on the CPU;
    ``pooled/<key>`` is what the aggregator with that key (of ``aggregators``) returns."""
    stored = {}
    for name in shapes:
        if name.startswith(POOLED):
            value = aggregators[name[len(POOLED) :]](tokens)
        else:
            value = getattr(tokens, name)
        for suffix, tensor in quantize(value.float(), dtype).items():
            stored[name + suffix] = tensor.cpu()
    return stored


@dataclass
class Target:
    """One cache an extraction pass fills: the (non-negative) block whose tokens it stores,
    the fields it keeps and the parameter-free aggregators whose outputs it stores, by key."""

    cache: TokenCache
    block: int
    shapes: dict
    aggregators: dict[str, Aggregator]


def disk_refusal(targets: list[Target], plans: dict[str, SplitPlan], dtype: str) -> str | None:
    """Print what will be written; why to refuse, when the free space cannot hold what is left
    to write (by every part and rank: they share the disk)."""
    remaining = 0
    for target in targets:
        per_view = bytes_per_view(target.shapes, dtype)
        if len(targets) > 1:
            log.info("Block %d -> %s:", target.block, target.cache.root)
        for split, plan in plans.items():
            size = plan.count * plan.views * per_view
            log.info(
                "  %-8s %9d images x %d view(s) x %s = %s",
                split,
                plan.count,
                plan.views,
                human(per_view),
                human(size),
            )
            missing = (s for s in range(plan.num_shards) if not target.cache.shard_done(split, s))
            remaining += sum(len(plan.shard_range(s)) for s in missing) * plan.views * per_view
    root = targets[0].cache.root
    free = shutil.disk_usage(root).free
    log.info("Still to write: %s; free on that disk: %s.", human(remaining), human(free))
    if remaining > free:
        return (
            f"The token cache needs {human(remaining)} more, but only {human(free)} are free "
            f"under {root}. Free space, move it (paths.cache_dir=...), store fewer bytes "
            "(cache.dtype=int8, fewer cache.views) or cache only parameter-free heads."
        )
    return None


def extract_batch(source, images, targets: list[Target], dtype: str, batch_size: int, bf16: bool):
    """Per target, the stored fields of ``images`` (every view of a batch of images), at most
    ``batch_size`` images per backbone pass (many views would not fit in one); under bf16
    autocast on a GPU when the trainer's precision says so."""
    device = next(source.parameters()).device
    autocast = (
        torch.autocast("cuda", dtype=torch.bfloat16)
        if device.type == "cuda" and bf16
        else nullcontext()
    )
    parts: list[dict[str, list[torch.Tensor]]] = [{} for _ in targets]
    for chunk in images.split(batch_size):
        with torch.inference_mode(), autocast:
            blocks = source.forward_blocks(chunk.to(device))
            for target, target_parts in zip(targets, parts, strict=True):
                tokens = blocks[target.block]
                fields = stored_fields(tokens, target.shapes, target.aggregators, dtype)
                require_finite(f"Block {target.block}'s values to cache", fields.values())
                for name, tensor in fields.items():
                    target_parts.setdefault(name, []).append(tensor)
    return [{name: torch.cat(chunks) for name, chunks in p.items()} for p in parts]


def extract(
    targets: list[Target],
    source: LiveTokens,
    splits: dict[str, Dataset],
    plans: dict[str, SplitPlan],
    dtype: str,
    batch_size: int,
    num_workers: int,
    augmented: set[str],
    precision: str = "32-true",
    watch=None,
    share: Share | None = None,
    ranks: Ranks | None = None,
) -> None:
    """Write every missing shard of ``share`` (this process's) of every split of every target
    in one pass of ``source``, with a progress bar per split; on a GPU under bf16 autocast when
    ``precision`` (the trainer's) says so. A shard that some targets hold already is written to
    the others. After each round of shards every rank asks whether any rank was signalled, and
    all stop together (``Preempted``)."""
    share, ranks = share or Share(), ranks or Ranks()
    source.to(ranks.device)
    for target in targets:
        for aggregator in target.aggregators.values():
            aggregator.to(ranks.device)
    bf16 = precision.startswith("bf16")

    def compute(images, pending):
        if not isinstance(images, torch.Tensor):  # decode=gpu: decoded on the device at once
            images = finish_images(images, ranks.device)
        # Tensors decoded by the workers stay on the host: extract_batch moves one backbone
        # batch at a time, not every view of the loader's batch (10 views: 10x the memory).
        images = images.flatten(0, 1)  # [images x views, 3, H, W]
        return extract_batch(source, images, pending, dtype, batch_size, bf16)

    for name, plan in plans.items():
        rounds = share.rounds(plan.num_shards)
        mine = [shard for shard in rounds if shard is not None]
        done = [s for s in mine if all(t.cache.shard_done(name, s) for t in targets)]
        bar = tqdm(
            total=sum(len(plan.shard_range(s)) for s in mine),
            initial=sum(len(plan.shard_range(s)) for s in done), unit="img",
            desc=f"extract {name}" + (f" (rank {ranks.rank})" if ranks.size > 1 else ""),
            disable=not mine,
        )  # fmt: skip
        views = Views(splits[name], plan.views, name in augmented)
        for shard in rounds:
            missing = (
                [] if shard is None else [t for t in targets if not t.cache.shard_done(name, shard)]
            )
            if missing:
                subset = torch.utils.data.Subset(views, list(plan.shard_range(shard)))
                loader = DataLoader(
                    subset, batch_size=batch_size, num_workers=num_workers, collate_fn=collate
                )
                write_shard(missing, name, shard, loader, plan.views, compute)
                bar.update(len(subset))
            if ranks.stop_requested(watch):
                log.warning("Rank %d stops extracting after its shard of this round.", ranks.rank)
                watch.check()
        bar.close()


def write_shard(targets: list[Target], split: str, shard: int, loader, views: int, compute):
    """One shard of every target from the batches of ``loader``; ``compute(images, targets)``
    gives each target's stored fields of a batch of images' views (``extract_batch``)."""
    parts: list[dict[str, list[torch.Tensor]]] = [{} for _ in targets]
    label_chunks = []
    for images, labels in loader:
        fields = compute(images, targets)
        for target_fields, target_parts in zip(fields, parts, strict=True):
            for field, tensor in target_fields.items():
                target_parts.setdefault(field, []).append(tensor.unflatten(0, (len(labels), views)))
        label_chunks.append(labels)
    labels = torch.cat(label_chunks).to(torch.int64)
    for target, target_parts in zip(targets, parts, strict=True):
        tensors = {field: torch.cat(chunks) for field, chunks in target_parts.items()}
        target.cache.write_shard(split, shard, {**tensors, "targets": labels})
