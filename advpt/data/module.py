"""The pre-training datamodule: a source, the method's views, a shuffled loader."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset

from advpt.data.sources import build_source, num_classes
from advpt.data.transforms import pretrain_views


class Transformed(Dataset):
    """``(image, label) -> (transform(image), label)``."""

    def __init__(self, base: Dataset, transform: Any) -> None:
        self.base, self.transform = base, transform

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, i: int) -> tuple[Any, int]:
        image, label = self.base[i]
        return self.transform(image), label


class PretrainData(L.LightningDataModule):
    def __init__(self, data: Mapping[str, Any], views: str, image_size: int, seed: int = 0) -> None:
        super().__init__()
        self.cfg, self.views, self.image_size, self.seed = dict(data), views, image_size, seed
        self.source = build_source(self.cfg, train=True, image_size=image_size)
        self.num_classes = num_classes(self.source)

    def train_dataloader(self) -> DataLoader:
        workers = int(self.cfg.get("num_workers", 0))
        # The shuffle order is a function of the seed and epoch, so a resumed run sees the same batches.
        generator = torch.Generator().manual_seed(
            self.seed + (self.trainer.current_epoch if self.trainer is not None else 0)
        )
        return DataLoader(
            Transformed(self.source, pretrain_views(self.views, self.image_size)),
            batch_size=int(self.cfg["batch_size"]),
            shuffle=True,
            drop_last=len(self.source) >= int(self.cfg["batch_size"]),
            num_workers=workers,
            pin_memory=torch.cuda.is_available(),
            persistent_workers=workers > 0,
            generator=generator,
        )
