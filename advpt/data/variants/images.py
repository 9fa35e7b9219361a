"""Datasets over a list of image files and their targets: one class index, or a multi-hot set (ReaL)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torch import Tensor
from torch.utils.data import Dataset

from advpt.data.variants.labels import NUM_CLASSES


class LabeledImages(Dataset):
    """A list of ``(path, target)``; images are opened lazily, converted to RGB, then ``transform``-ed."""

    def __init__(self, samples: Sequence[tuple[Path, Any]], transform: Callable[[Image.Image], Any] | None):
        self.samples = list(samples)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[Any, Any]:
        path, target = self.samples[index]
        with Image.open(path) as im:
            img = im.convert("RGB")
        return (self.transform(img) if self.transform is not None else img), self._target(target)

    def _target(self, target: Any) -> Any:
        return target


class MultiLabelImages(LabeledImages):
    """Samples whose target is a list of class indices, returned as a multi-hot bool ``[num_classes]``."""

    def __init__(
        self,
        samples: Sequence[tuple[Path, list[int]]],
        transform: Callable[[Image.Image], Any] | None,
        num_classes: int = NUM_CLASSES,
    ):
        super().__init__(samples, transform)
        self.num_classes = num_classes

    def _target(self, target: list[int]) -> Tensor:
        # Built per item: a 50000 x 1000 table up front would cost 50 MB per worker.
        hot = torch.zeros(self.num_classes, dtype=torch.bool)
        hot[list(target)] = True
        return hot
