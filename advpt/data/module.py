"""The pre-training datamodule: a source, the method's views, a shuffled loader."""

from __future__ import annotations

import random
from collections.abc import Iterator, Mapping
from typing import Any

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from advpt.data.sources import build_source, num_classes
from advpt.data.transforms import pretrain_views


def seed_batch(seed: int, epoch: int, batch_idx: int, rank: int = 0) -> None:
    """Seed torch, numpy (timm's mixup / cutmix) and Python from (seed, epoch, batch, rank).

    Called before every training batch, it makes the in-step randomness (masks, rotations, attack
    starts, mixing, drop path) a function of the batch's position alone, so a run resumed anywhere,
    mid-epoch included, draws what the uninterrupted run drew; the rank keeps processes' draws apart.
    """
    value = ((seed * 100_003 + epoch) * 1_000_003 + batch_idx) * 1_009 + rank
    torch.manual_seed(value % 2**63)
    np.random.seed(value % 2**32)
    random.seed(value)


class EpochSampler(Sampler):
    """This process's share of a (seed, epoch)-shuffled epoch, as ``(epoch, index)`` pairs.

    The permutation depends on (seed, epoch) alone; rank ``r`` of ``world`` takes every ``world``-th
    index from position ``r``, so with a per-process batch B the ranks' k-th batches together are
    the k-th global batch of B x world images, as one process would see it. The epoch travels with
    each index into the workers, so augmentations are a function of (seed, epoch, index). ``skip``
    drops the first indices of the epoch: a run resumed mid-epoch continues where it stopped.
    """

    def __init__(self, size: int, seed: int, rank: int = 0, world: int = 1) -> None:
        self.size, self.seed, self.rank, self.world = size, seed, rank, world
        self.epoch, self.skip = 0, 0

    def set_epoch(self, epoch: int) -> None:
        if epoch != self.epoch:
            self.skip = 0
        self.epoch = epoch

    def __len__(self) -> int:
        # Every rank gets the same count (the remainder is dropped), so all take the same steps.
        return self.size // self.world if self.world > 1 else self.size

    def __iter__(self) -> Iterator[tuple[int, int]]:
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        order = torch.randperm(self.size, generator=generator)[self.rank :: self.world][: len(self)]
        epoch, start = self.epoch, self.skip
        self.skip = 0  # only the first pass after a resume is shortened
        return ((epoch, int(i)) for i in order[start:])


def train_loader(
    dataset: Dataset, batch_size: int, seed: int, num_workers: int, trainer: L.Trainer | None = None
) -> DataLoader:
    """The shuffled, per-rank training loader shared by pre-training and fine-tuning.

    Indexed sources: an :class:`EpochSampler` over ``dataset``. Shards (``data=shards``): a stream
    (:func:`advpt.data.shards.stream_loader`) of ``dataset.transform`` applied to the shards.
    """
    from advpt.data.shards import ShardSource, stream_loader

    rank, world = (trainer.global_rank, trainer.world_size) if trainer is not None else (0, 1)
    if isinstance(getattr(dataset, "base", None), ShardSource):
        # the epoch Lightning would hand a sampler's set_epoch
        epoch_of = (lambda: trainer.fit_loop.epoch_progress.current.processed) if trainer else None
        return stream_loader(
            dataset.base, dataset.transform, batch_size, seed, num_workers, rank, world, epoch_of
        )
    sampler = EpochSampler(len(dataset), seed, rank=rank, world=world)
    return DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=sampler,
        drop_last=len(sampler) >= batch_size,  # mixup pairs need an even batch
        num_workers=num_workers,
        pin_memory=torch.cuda.is_available(),
        persistent_workers=num_workers > 0,
        # The loader draws its workers' base seed from this, not from the global generator.
        generator=torch.Generator().manual_seed(seed),
    )


class ResumableData(L.LightningDataModule):
    """A datamodule whose position in the training epoch goes into Lightning's checkpoints.

    Lightning restores a datamodule's ``state_dict`` before it asks for the training loader (its
    loader-level state is applied only after the loader has been built and iterated for
    ``estimated_stepping_batches``), so the sampler is created already at the saved position.
    """

    _train: DataLoader | None = None
    _batch = 0
    _resume: tuple[int, int] | None = None
    _workers_said = False

    def loader_workers(self, configured: Any, batch_size: int, image_size: int, views: int = 1) -> int:
        """``data.num_workers``, or when it is null a count sized to this machine (said once, by the
        first process); one line instead of a bus error when the batches the loader processes hold
        would not fit in ``/dev/shm``."""
        from lightning.pytorch.utilities.rank_zero import rank_zero_only

        from advpt.config.machine import batch_bytes, check_shared_memory, describe_workers, loader_workers

        processes = self.trainer.num_devices if self.trainer is not None else 1
        workers = loader_workers(configured, processes)
        check_shared_memory(workers, batch_bytes(batch_size, image_size, views), chosen=configured is None)
        if configured is None and not self._workers_said and rank_zero_only.rank == 0:
            print(f"advpt: {describe_workers(workers, processes)}", flush=True)
        self._workers_said = True
        return workers

    def resumable_loader(self, dataset: Dataset, batch_size: int, seed: int, num_workers: int) -> DataLoader:
        self._train, self._batch = (
            train_loader(dataset, batch_size, seed, num_workers, self.trainer),
            batch_size,
        )
        self._seek()
        return self._train

    def _seek(self) -> None:
        """Start the training loader at the saved position, once."""
        if self._resume is None or self._train is None:
            return
        sampler, epoch, batches = position(self._train), *self._resume
        if batches >= self._epoch_batches():  # saved at the end of an epoch: the next one starts afresh
            # Set here, not left to set_epoch: Lightning builds the loader's iterator before it sets the
            # epoch, and loader processes draw their first indices from it at once.
            epoch, batches = epoch + 1, 0
        sampler.epoch, sampler.skip = epoch, batches * self._batch
        self._resume = None

    def _epoch_batches(self) -> int:
        """Batches Lightning trains of each epoch: the loader's, or fewer by ``trainer.limit_train_batches``."""
        batches = len(self._train)  # type: ignore[arg-type]
        limit = self.trainer.limit_train_batches if self.trainer is not None else None
        if isinstance(limit, int):
            return min(batches, limit)
        return int(batches * limit) if isinstance(limit, float) else batches

    def state_dict(self) -> dict[str, int]:
        if self._train is None or self.trainer is None:
            return {}
        sampler = position(self._train)
        # Batches of this epoch the Trainer has trained on (whatever the loader has prefetched).
        return {
            "epoch": sampler.epoch,
            "batches": self.trainer.fit_loop.epoch_loop.batch_progress.current.processed,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if state:
            self._resume = (int(state["epoch"]), int(state["batches"]))
            # Under FSDP Lightning restores after the optimisers are configured, and the schedule's
            # length (estimated_stepping_batches) has already built the loader: position it now.
            self._seek()


def position(loader: DataLoader) -> Any:
    """What knows a training loader's epoch and where it starts (``epoch``, ``skip`` in samples):
    its :class:`EpochSampler`, or the shard stream of a ``StreamLoader``."""
    found = getattr(loader, "position", loader.sampler)
    assert hasattr(found, "epoch") and hasattr(found, "skip"), type(found)
    return found


class Transformed(Dataset):
    """``(image, label) -> (transform(image), label)``; indexed by ``i`` or by ``(epoch, i)``.

    Given ``(epoch, i)`` and a ``seed``, the random augmentation depends on (seed, epoch, i) alone,
    whatever the number of workers or the state of the global generator.

    An image the source could not read (``None``) is counted in ``skipped``; with a ``seed`` (training)
    the next readable item takes its place, so batches keep their size; without (evaluation) the item
    is ``None``, which the evaluation loader drops (``advpt.data.skipping``).
    """

    # Unreadable items in a row before training gives up on the source.
    MAX_UNREADABLE_RUN = 64

    def __init__(self, base: Dataset, transform: Any, seed: int | None = None) -> None:
        from advpt.data.skipping import SkipCounter

        self.base, self.transform, self.seed = base, transform, seed
        self.skipped = SkipCounter()

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, key: int | tuple[int, int]) -> tuple[Any, int]:
        epoch, i = key if isinstance(key, tuple) else (None, key)
        image, label = self.base[i]
        if image is None:
            self.skipped.add()
            if self.seed is None:
                return None  # type: ignore[return-value]
            for step in range(1, self.MAX_UNREADABLE_RUN + 1):
                image, label = self.base[(i + step) % len(self)]
                if image is not None:
                    break
                self.skipped.add()
            else:
                raise RuntimeError(f"{self.MAX_UNREADABLE_RUN + 1} unreadable images in a row from item {i}")
        if self.seed is None or epoch is None:
            return self.transform(image), label
        with torch.random.fork_rng(devices=[]):
            # The CPU generator only: torch.manual_seed also queues a seed for every lazy accelerator
            # module, recording a stack trace each time (about 1 ms per image).
            torch.default_generator.manual_seed(((self.seed * 1_000_003 + epoch) * 10_000_019 + i) % 2**63)
            return self.transform(image), label


class PretrainData(ResumableData):
    def __init__(self, data: Mapping[str, Any], views: str, image_size: int, seed: int = 0) -> None:
        super().__init__()
        self.cfg, self.views, self.image_size, self.seed = dict(data), views, image_size, seed
        self.source = build_source(self.cfg, train=True, image_size=image_size)
        self.num_classes = num_classes(self.source)

    def train_dataloader(self) -> DataLoader:
        views = pretrain_views(self.views, self.image_size)
        batch_size = int(self.cfg["batch_size"])
        return self.resumable_loader(
            Transformed(self.source, views, seed=self.seed),
            batch_size=batch_size,
            seed=self.seed,
            num_workers=self.loader_workers(
                self.cfg.get("num_workers"), batch_size, self.image_size, len(views.transforms)
            ),
        )
