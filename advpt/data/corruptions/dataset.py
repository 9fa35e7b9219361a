"""``CorruptedDataset``: a dataset wrapper that corrupts each image on the fly, reproducibly per index."""

from __future__ import annotations

from typing import Any

import torch
from torch.utils.data import Dataset

from advpt.data.corruptions.apply import _check, corrupt


class CorruptedDataset(Dataset):
    """Wraps a dataset of (image [3,H,W] in [0,1], label) and corrupts each image on the fly.

    Item ``i`` uses a generator seeded with ``seed + i``, so every epoch/re-run sees identical images.
    """

    def __init__(self, base: Dataset, name: str, severity: int, seed: int = 0) -> None:
        _check(name, severity)
        self.base = base
        self.name = name
        self.severity = int(severity)
        self.seed = int(seed)

    def __len__(self) -> int:
        return len(self.base)  # type: ignore[arg-type]

    def __getitem__(self, index: int) -> tuple[torch.Tensor, Any]:
        if index < 0:
            index += len(self)  # negative indices must map to the same noise as their positive twin
        item = self.base[index]
        if item is None:  # an unreadable image: the evaluation loader drops it
            return None  # type: ignore[return-value]
        image, label = item
        generator = torch.Generator().manual_seed(self.seed + index)
        return corrupt(image, self.name, self.severity, generator), label
