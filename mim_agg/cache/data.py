"""Reading a token cache: its splits as datasets, their loaders, and the token source.

The loaders are the image loaders' (same sampler, same resume), only the items differ: the
stored fields of one image's view, in the stored dtype. ``CachedTokens`` turns a batch of
them into ``Tokens`` on the device, where int8 is dequantised and the heads take float32.
"""

from __future__ import annotations

import torch
from torch.utils.data import Dataset

from mim_agg.backbones import TokenLayout, Tokens, TokenSource
from mim_agg.backbones.tokens import TENSOR_FIELDS
from mim_agg.cache.extract import POOLED
from mim_agg.cache.store import SplitPlan, TokenCache, dequantize
from mim_agg.data.datamodule import SplitLoaders


class CachedSplit(Dataset):
    """Item ``i`` (or ``(i, epoch)``): ``({field: tensor}, target)`` of view ``epoch mod views``.

    Shards are opened lazily, in the process that reads them (each loader worker maps its
    own), and are never copied whole: indexing a mapped tensor touches one image's pages.
    """

    def __init__(self, cache: TokenCache, split: str) -> None:
        self.cache, self.split = cache, split
        entry = cache.manifest_entry(split)
        self.plan = SplitPlan(**entry["plan"])
        self._shards: dict[int, dict[str, torch.Tensor]] = {}

    def __len__(self) -> int:
        return self.plan.count

    def __getitem__(self, key: int | tuple[int, int]):
        index, epoch = key if isinstance(key, tuple) else (key, 0)
        shard, offset = divmod(int(index), self.plan.shard_size)
        if shard not in self._shards:
            self._shards[shard] = self.cache.open_shard(self.split, shard)
        tensors = self._shards[shard]
        view = epoch % self.plan.views
        fields = {name: t[offset, view] for name, t in tensors.items() if name != "targets"}
        return fields, int(tensors["targets"][offset])

    def __getstate__(self) -> dict:  # loader workers map the shards themselves
        return {**self.__dict__, "_shards": {}}


class CachedDataModule(SplitLoaders):
    """Train / held-out / test splits of a complete, checked token cache."""

    def __init__(self, cache: TokenCache, batch_size: int, num_workers: int, seed: int) -> None:
        super().__init__()
        self.cache = cache
        self.batch_size, self.num_workers, self.seed = batch_size, num_workers, seed
        self.num_classes = cache.manifest["num_classes"]
        self.splits = {split: CachedSplit(cache, split) for split in ("train", "heldout", "test")}

    def setup(self, stage: str | None = None) -> None:
        """Nothing to do: the splits were read from the manifest."""


class CachedTokens(TokenSource):
    """``Tokens`` from a batch of stored fields: dequantised on the device they arrive on. A
    stored aggregator output (``pooled/<key>``) is what that aggregator returns on them."""

    def __init__(self, layout: TokenLayout) -> None:
        super().__init__()
        self.layout = layout

    @classmethod
    def of(cls, cache: TokenCache) -> CachedTokens:
        layout = cache.manifest["layout"]
        return cls(TokenLayout(**{**layout, "grid": tuple(layout["grid"])}))

    def forward(self, fields: dict[str, torch.Tensor]) -> Tokens:
        values = dequantize(fields)
        pooled = {n[len(POOLED) :]: v for n, v in values.items() if n.startswith(POOLED)}
        fields = {name: values[name] for name in TENSOR_FIELDS if name in values}
        return Tokens(self.layout, **fields, pooled=pooled)
