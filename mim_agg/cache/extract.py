"""Fill a token cache from a live source: split by split, shard by shard, resumable.

Each shard is computed from the same images in the same batches whatever happened before
(shards start on batch boundaries; training views are augmented under the random state of
``(seed, view, index)``, the state online epoch ``view`` uses), so an extraction killed at any
moment and rerun yields byte-identical shards.
"""

from __future__ import annotations

import logging
import shutil
from contextlib import nullcontext

import torch
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from mim_agg.aggregators import Aggregator
from mim_agg.backbones import LiveTokens, TokenLayout, TokenRequest, Tokens
from mim_agg.backbones.tokens import TENSOR_FIELDS
from mim_agg.cache.store import DTYPES, CacheError, SplitPlan, TokenCache, quantize

log = logging.getLogger(__name__)

POOLED = "pooled/"


def field_shapes(layout: TokenLayout, request: TokenRequest, out_dims: dict) -> dict:
    """Per image and view, the shape of every field a cache for ``request`` stores: the
    requested ``Tokens`` fields (shaped as ``Tokens.example`` makes them) and one pooled vector
    per parameter-free aggregator key."""
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
    """Every view of image ``i`` of a split, stacked: ``[views, 3, H, W]``. A split with one
    view and its eval transform is read plainly; training views key the augmentation by
    ``(index, view)``, as online epochs do."""

    def __init__(self, split: Dataset, views: int, augmented: bool) -> None:
        self.split, self.views, self.augmented = split, views, augmented

    def __len__(self) -> int:
        return len(self.split)

    def __getitem__(self, index: int):
        if not self.augmented:
            image, target = self.split[index]
            return image.unsqueeze(0), target
        pairs = [self.split[(index, view)] for view in range(self.views)]
        return torch.stack([image for image, _ in pairs]), pairs[0][1]


def stored_fields(
    tokens: Tokens, shapes: dict, poolers: dict[str, Aggregator], dtype: str
) -> dict[str, torch.Tensor]:
    """What the cache keeps of a batch: the fields of ``shapes`` in ``dtype``, on the CPU;
    ``pooled/<key>`` is the output of the parameter-free aggregator with that key."""
    stored = {}
    for name in shapes:
        if name.startswith(POOLED):
            value = poolers[name[len(POOLED) :]](tokens)
        else:
            value = getattr(tokens, name)
        for suffix, tensor in quantize(value.float(), dtype).items():
            stored[name + suffix] = tensor.cpu()
    return stored


def check_disk(cache: TokenCache, plans: dict[str, SplitPlan], per_view: int) -> None:
    """Print what will be written; refuse when the free space cannot hold what is left."""
    remaining = 0
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
        done = cache.shards_done(split) * plan.shard_size
        remaining += max(0, plan.count - done) * plan.views * per_view
    free = shutil.disk_usage(cache.root).free
    log.info("Still to write: %s; free on that disk: %s.", human(remaining), human(free))
    if remaining > free:
        raise CacheError(
            f"The token cache needs {human(remaining)} more, but only {human(free)} are free "
            f"under {cache.root}. Free space, move it (paths.cache_dir=...), store fewer bytes "
            "(cache.dtype=int8, fewer cache.views) or cache only parameter-free heads."
        )


def extract_batch(source, images, shapes, poolers, dtype: str, batch_size: int, bf16: bool):
    """The stored fields of ``images`` (every view of a batch of images), at most
    ``batch_size`` images per backbone pass (many views would not fit in one); under bf16
    autocast on a GPU when the trainer's precision says so."""
    device = next(source.parameters()).device
    autocast = (
        torch.autocast("cuda", dtype=torch.bfloat16)
        if device.type == "cuda" and bf16
        else nullcontext()
    )
    parts: dict[str, list[torch.Tensor]] = {}
    for chunk in images.split(batch_size):
        with torch.inference_mode(), autocast:
            fields = stored_fields(source(chunk.to(device)), shapes, poolers, dtype)
        for name, tensor in fields.items():
            parts.setdefault(name, []).append(tensor)
    return {name: torch.cat(chunks) for name, chunks in parts.items()}


def extract(
    cache: TokenCache,
    source: LiveTokens,
    splits: dict[str, Dataset],
    plans: dict[str, SplitPlan],
    poolers: dict[str, Aggregator],
    shapes: dict,
    dtype: str,
    batch_size: int,
    num_workers: int,
    augmented: set[str],
    precision: str = "32-true",
    watch=None,
) -> None:
    """Write every missing shard of every split, with a progress bar per split; on a GPU
    under bf16 autocast when ``precision`` (the trainer's) says so."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    source.to(device)
    bf16 = precision.startswith("bf16")
    for aggregator in poolers.values():
        aggregator.to(device)
    for name, plan in plans.items():
        done = cache.shards_done(name)
        views = Views(splits[name], plan.views, name in augmented)
        bar = tqdm(
            total=plan.count, initial=min(plan.count, done * plan.shard_size), unit="img",
            desc=f"extract {name}",
        )  # fmt: skip
        for shard in range(done, plan.num_shards):
            items = plan.shard_range(shard)
            subset = torch.utils.data.Subset(views, list(items))
            loader = DataLoader(subset, batch_size=batch_size, num_workers=num_workers)
            parts: dict[str, list[torch.Tensor]] = {}
            targets = []
            for images, labels in loader:
                if watch is not None:
                    watch.check()
                views_of_batch = images.flatten(0, 1)  # [images x views, 3, H, W]
                fields = extract_batch(
                    source, views_of_batch, shapes, poolers, dtype, batch_size, bf16
                )
                for field, tensor in fields.items():
                    parts.setdefault(field, []).append(
                        tensor.unflatten(0, (len(labels), plan.views))
                    )
                targets.append(labels)
                bar.update(len(labels))
            tensors = {field: torch.cat(chunks) for field, chunks in parts.items()}
            tensors["targets"] = torch.cat(targets).to(torch.int64)
            cache.write_shard(name, shard, tensors)
        bar.close()
