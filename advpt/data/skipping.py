"""Unreadable images are skipped and counted, never fatal.

A source returns ``None`` in place of an image it cannot decode (:func:`open_rgb` for ImageFolder
trees, the shard readers of :mod:`advpt.data.shards`). Training replaces such an item by the next
readable one, so batches keep their size; evaluation drops it (:func:`drop_unreadable`, :class:`EvalLoader`),
so every readable image is scored once. Each skip is counted in a :class:`SkipCounter` that loader
processes share with the main process; ``advpt.data.skipped_metric.SkippedSamples`` logs the total
as ``data/skipped`` and says at the end how many there were.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset, Sampler, get_worker_info
from torch.utils.data._utils.collate import default_collate

# Slot 0 counts the main process, slots 1.. the loader processes (modulo the slots there are).
SLOTS = 256


class SkipCounter:
    """A count of skipped items that loader processes add to and the main process reads.

    The counts live in shared memory (one slot per process, so no two processes write the same
    number), and travel to loader processes, forked or spawned, with the dataset that holds them.
    """

    def __init__(self) -> None:
        self.counts = torch.zeros(SLOTS, dtype=torch.int64).share_memory_()

    def add(self, n: int = 1) -> None:
        info = get_worker_info()
        slot = 0 if info is None else 1 + info.id % (SLOTS - 1)
        self.counts[slot] += n

    def total(self) -> int:
        return int(self.counts.sum())


def _chain(obj: Any) -> Iterator[Any]:
    """``obj`` and what it wraps (a loader's ``dataset``, a subset's ``dataset``, a transform's ``base``)."""
    seen: set[int] = set()
    while obj is not None and id(obj) not in seen:
        seen.add(id(obj))
        yield obj
        inner = getattr(obj, "dataset", None)
        obj = inner if inner is not None else getattr(obj, "base", None)


def unreadable(obj: Any) -> int:
    """Items skipped so far by a dataset (or loader) and everything it wraps."""
    total = 0
    for item in _chain(obj):
        counter = getattr(item, "skipped", None)
        if isinstance(counter, SkipCounter):
            total += counter.total()
    return total + incomplete(obj)


def incomplete(obj: Any) -> int:
    """Samples a dataset (or what it wraps) left out when it was opened: incomplete in their shard."""
    return sum(int(getattr(item, "incomplete", 0) or 0) for item in _chain(obj))


def open_rgb(path: str) -> Any:
    """An image file as an RGB PIL image, or ``None`` when it cannot be decoded (ImageFolder's loader)."""
    from PIL import Image

    try:
        with open(path, "rb") as f, Image.open(f) as image:
            return image.convert("RGB")
    except Exception:  # truncated, not an image, unsupported mode ...: skipped and counted by the caller
        return None


def drop_unreadable(batch: Sequence[Any]) -> Any:
    """``default_collate`` of the readable items (``None`` when a batch holds none)."""
    kept = [item for item in batch if item is not None]
    return default_collate(kept) if kept else None


class RankShare(Sampler):
    """Indices ``rank, rank + world, ...`` in order: the ranks' shares are disjoint and together hold
    every index exactly once (no padding, unlike ``DistributedSampler``; shares differ by at most one)."""

    def __init__(self, size: int, rank: int = 0, world: int = 1) -> None:
        self.size, self.rank, self.world = size, rank, world

    def __len__(self) -> int:
        return len(range(self.rank, self.size, self.world))

    def __iter__(self) -> Iterator[int]:
        return iter(range(self.rank, self.size, self.world))


class EvalLoader(DataLoader):
    """An evaluation loader: unreadable images dropped, a batch with none left is not yielded."""

    def __iter__(self) -> Iterator[Any]:  # type: ignore[override]
        return (batch for batch in super().__iter__() if batch is not None)


def eval_loader(
    dataset: Dataset,
    batch_size: int,
    num_workers: int = 0,
    rank: int = 0,
    world: int = 1,
    pin_memory: bool | None = None,
    persistent: bool = False,
) -> EvalLoader:
    """Every readable item of ``dataset`` once, in order, this rank's share of it when ``world > 1``;
    ``persistent``: its loader processes stay for the next pass (fine-tuning's validation each epoch)."""
    return EvalLoader(
        dataset,
        batch_size=batch_size,
        sampler=RankShare(len(dataset), rank, world),  # type: ignore[arg-type]
        num_workers=num_workers,
        collate_fn=drop_unreadable,
        pin_memory=torch.cuda.is_available() if pin_memory is None else pin_memory,
        persistent_workers=persistent and num_workers > 0,
    )


def eval_loaders(
    datasets: Sequence[Dataset], batch_size: int, num_workers: int = 0, pin_memory: bool | None = None
) -> Iterator[Iterator[Any]]:
    """:func:`eval_loader`'s batches of each of ``datasets`` in turn (every readable item once, in order),
    all from one loader, so that its processes start once for all of them: the 75 corruption subsets
    of ``advpt evaluate`` would otherwise start 75 pools, which costs more than small subsets take.
    A batch never mixes two datasets. Consume each dataset's batches before asking for the next."""
    from torch.utils.data import ConcatDataset

    batches: list[list[int]] = []
    owner: list[int] = []
    start = 0
    for k, dataset in enumerate(datasets):
        size = len(dataset)  # type: ignore[arg-type]
        for first in range(0, size, batch_size):
            batches.append(list(range(start + first, start + min(first + batch_size, size))))
            owner.append(k)
        start += size
    loader = DataLoader(
        ConcatDataset(datasets),
        batch_sampler=batches,
        num_workers=num_workers,
        collate_fn=drop_unreadable,
        pin_memory=torch.cuda.is_available() if pin_memory is None else pin_memory,
    )
    stream = zip(owner, loader, strict=True)  # one item per batch: None where none was readable
    pending = next(stream, None)

    def batches_of(k: int) -> Iterator[Any]:
        nonlocal pending
        while pending is not None and pending[0] == k:
            batch, pending = pending[1], next(stream, None)
            if batch is not None:
                yield batch

    for k in range(len(datasets)):
        yield batches_of(k)


def unreadable_in(datasets: Iterable[Any]) -> int:
    """:func:`unreadable` of several datasets together, each counter and source counted once (the
    corruption subsets all wrap one test split)."""
    counters: dict[int, SkipCounter] = {}
    sources: dict[int, Any] = {}
    for dataset in datasets:
        for item in _chain(dataset):
            counter = getattr(item, "skipped", None)
            if isinstance(counter, SkipCounter):
                counters[id(counter)] = counter
            if getattr(item, "incomplete", 0):
                sources[id(item)] = item
    return sum(c.total() for c in counters.values()) + sum(int(s.incomplete) for s in sources.values())
