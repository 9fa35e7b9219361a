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


def seed_epoch(seed: int, epoch: int) -> None:
    """Seed torch, numpy (timm's mixup / cutmix) and Python (RandAugment) from (seed, epoch).

    Called at every epoch start, it makes the in-step randomness (masks, rotations, attack starts,
    mixing) of a run resumed at an epoch boundary repeat that of the uninterrupted run.
    """
    value = seed * 100_003 + epoch
    torch.manual_seed(value)
    np.random.seed(value % 2**32)
    random.seed(value)


class EpochSampler(Sampler):
    """Shuffles with a generator seeded by (seed, epoch) and yields ``(epoch, index)`` pairs.

    Lightning calls :meth:`set_epoch` at every epoch start (also after a resume), and the epoch
    travels with each index into the workers, so shuffle order and augmentations are a function of
    (seed, epoch, index) alone: a run resumed at an epoch boundary sees the batches an uninterrupted
    one would have seen.
    """

    def __init__(self, size: int, seed: int) -> None:
        self.size, self.seed, self.epoch = size, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.size

    def __iter__(self) -> Iterator[tuple[int, int]]:
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        epoch = self.epoch
        return ((epoch, int(i)) for i in torch.randperm(self.size, generator=generator))


class Transformed(Dataset):
    """``(image, label) -> (transform(image), label)``; indexed by ``i`` or by ``(epoch, i)``.

    Given ``(epoch, i)`` and a ``seed``, the random augmentation depends on (seed, epoch, i) alone,
    whatever the number of workers or the state of the global generator.
    """

    def __init__(self, base: Dataset, transform: Any, seed: int | None = None) -> None:
        self.base, self.transform, self.seed = base, transform, seed

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, key: int | tuple[int, int]) -> tuple[Any, int]:
        epoch, i = key if isinstance(key, tuple) else (None, key)
        image, label = self.base[i]
        if self.seed is None or epoch is None:
            return self.transform(image), label
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(((self.seed * 1_000_003 + epoch) * 10_000_019 + i) % 2**63)
            return self.transform(image), label


class PretrainData(L.LightningDataModule):
    def __init__(self, data: Mapping[str, Any], views: str, image_size: int, seed: int = 0) -> None:
        super().__init__()
        self.cfg, self.views, self.image_size, self.seed = dict(data), views, image_size, seed
        self.source = build_source(self.cfg, train=True, image_size=image_size)
        self.num_classes = num_classes(self.source)

    def train_dataloader(self) -> DataLoader:
        workers = int(self.cfg.get("num_workers", 0))
        batch_size = int(self.cfg["batch_size"])
        return DataLoader(
            Transformed(self.source, pretrain_views(self.views, self.image_size), seed=self.seed),
            batch_size=batch_size,
            sampler=EpochSampler(len(self.source), self.seed),
            drop_last=len(self.source) >= batch_size,
            num_workers=workers,
            pin_memory=torch.cuda.is_available(),
            persistent_workers=workers > 0,
            # The loader draws its workers' base seed from this, not from the global generator.
            generator=torch.Generator().manual_seed(self.seed),
        )
