"""Who extracts which shard: the parts of a cache (``cache.part=i/N``, the tasks of a SLURM
array) and the ranks of a DDP job (``trainer=ddp``), and what a job's ranks agree on.

Shard ``s`` of a split holds images ``s * shard_size ...`` whoever writes it; it belongs to
part ``s mod N`` and, within that part, to rank ``(s // N) mod ranks``. Work is dealt in whole
shards fixed by image index, so the shards, their bytes and the manifest are the same for any
number of parts and ranks, and a rerun of a killed part or rank continues after its last
complete shard. A DDP job starts its ranks here as Lightning's Trainer would (Fabric, the
same launcher and process group, which the Trainer then finds and joins).
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass

import lightning as L
import torch
from omegaconf import DictConfig

from mim_agg.cache.store import TokenCache
from mim_agg.runs.preemption import SignalWatch
from mim_agg.validation import cache_part

log = logging.getLogger(__name__)

LOCK_POLL_S = 10  # a DDP job waiting for another job's lock asks again this often


@dataclass(frozen=True)
class Share:
    """The shards one process writes: rank ``rank`` of ``ranks`` of part ``part`` of ``parts``."""

    part: int = 0
    parts: int = 1
    rank: int = 0
    ranks: int = 1

    def rounds(self, num_shards: int) -> list[int | None]:
        """This rank's shard in each round of its job (None: the part has none left for it).
        Every rank of a job has as many rounds: where they agree whether to stop."""
        in_part = range(self.part, num_shards, self.parts)
        count = -(-len(in_part) // self.ranks)
        positions = (k * self.ranks + self.rank for k in range(count))
        return [in_part[p] if p < len(in_part) else None for p in positions]

    @property
    def lock(self) -> str:
        """The lock a job holds while it extracts: the whole cache's, or its part's (a SLURM
        array's tasks run at once; a requeued task waits for its former self)."""
        return ".lock" if self.parts == 1 else f".lock-part-{self.part}-of-{self.parts}"


class Ranks:
    """The processes of one extraction job: a DDP job's ranks (``fabric``) or this one alone."""

    def __init__(self, fabric: L.Fabric | None = None) -> None:
        self.fabric = fabric
        self.rank = fabric.global_rank if fabric else 0
        self.size = fabric.world_size if fabric else 1

    @property
    def device(self) -> torch.device:
        if self.fabric:
            return self.fabric.device
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")

    def share(self, cfg: DictConfig) -> Share:
        part, parts = cache_part(cfg.cache.part)
        return Share(part, parts, self.rank, self.size)

    def broadcast(self, value):
        """Rank zero's ``value`` on every rank: decisions on files that another job may change
        meanwhile are made once, or ranks would part ways between collectives."""
        return self.fabric.broadcast(value) if self.fabric else value

    def barrier(self) -> None:
        if self.fabric:
            self.fabric.barrier()

    def stop_requested(self, watch: SignalWatch | None) -> bool:
        """Whether any rank noted a signal (every rank asks, at the same point)."""
        if watch is None:
            return False

        def reduce_max(value: int) -> int:
            if not self.fabric:
                return value
            tensor = torch.tensor(value, device=self.fabric.device)
            return int(self.fabric.all_reduce(tensor, reduce_op="max"))

        return watch.agree(reduce_max, self.broadcast)

    @contextlib.contextmanager
    def holding(self, caches: list[TokenCache], lock: str) -> Iterator[None]:
        """The job's lock on every cache of ``caches``, held by rank zero for all ranks. One
        process waits on the locks (in path order, so jobs wait for each other instead of
        deadlocking); a job's ranks wait in collectives, asking again every ``LOCK_POLL_S``
        (a barrier would time out while another job extracts ImageNet)."""
        ordered = sorted(caches, key=lambda cache: str(cache.root))
        with contextlib.ExitStack() as held:
            if self.size == 1:
                for cache in ordered:
                    held.enter_context(cache.locked(lock))
            else:
                said = False
                while not self.broadcast(self.rank == 0 and take_all(held, ordered, lock)):
                    if not said:
                        log.info("Another job is writing %s; waiting for it.", ordered[0].root)
                        said = True
                    time.sleep(LOCK_POLL_S)
            yield
            self.barrier()  # every rank is done with the caches before the locks go


def take_all(held: contextlib.ExitStack, caches: list[TokenCache], lock: str) -> bool:
    """Take every lock at once or none (a job holding some while it waits could deadlock)."""
    with contextlib.ExitStack() as taking:
        for cache in caches:
            if not taking.enter_context(cache.locked(lock, wait=False)):
                return False
        held.enter_context(taking.pop_all())
    return True


def start_ranks(cfg: DictConfig) -> Ranks:
    """The processes ``cfg.trainer`` asks for: a multi-process trainer's are started (or
    joined, in the processes it started) here, before extraction; one process is this one."""
    trainer = cfg.trainer
    fabric = L.Fabric(
        accelerator=trainer.accelerator,
        devices=trainer.devices,
        num_nodes=trainer.get("num_nodes", 1),
        strategy=trainer.get("strategy", "auto"),
    )
    if fabric.world_size == 1:
        return Ranks()
    fabric.launch()
    return Ranks(fabric)
