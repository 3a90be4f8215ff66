"""The top-k cosine neighbours of fixed queries in a bank that arrives in chunks.

The bank (the train split's features, 1.28 M for ImageNet) is never held whole: each chunk's
similarities to the queries are merged into a running top-k, in blocks of queries, so memory
is bounded by ``query_block x chunk`` however large the bank.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


class NearestNeighbours:
    """``sims [Q, k]`` (descending) and ``labels [Q, k]`` of each query's k most similar bank
    entries so far. Features are L2-normalised here, so similarity is cosine."""

    def __init__(self, queries: torch.Tensor, k: int, query_block: int = 8192) -> None:
        self.queries = F.normalize(queries.float(), dim=-1)
        self.k = k
        self.query_block = query_block
        self.sims = torch.full((len(queries), k), -torch.inf, device=queries.device)
        self.labels = torch.full((len(queries), k), -1, dtype=torch.int64, device=queries.device)
        self.bank_size = 0

    def add(self, bank: torch.Tensor, labels: torch.Tensor) -> None:
        bank = F.normalize(bank.float().to(self.queries.device), dim=-1)
        labels = labels.to(self.queries.device)
        for start in range(0, len(self.queries), self.query_block):
            rows = slice(start, start + self.query_block)
            sims = torch.cat([self.sims[rows], self.queries[rows] @ bank.T], dim=1)
            candidates = torch.cat([self.labels[rows], labels.expand(len(sims), -1)], dim=1)
            top = sims.topk(min(self.k, sims.shape[1]), dim=1)
            self.sims[rows] = top.values
            self.labels[rows] = candidates.gather(1, top.indices)
        self.bank_size += len(bank)
