"""Per-method augmentations. Output pixels are float in [0, 1]; normalisation is inside the model."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torchvision.transforms import InterpolationMode
from torchvision.transforms import v2 as T

BICUBIC = InterpolationMode.BICUBIC


def crop_flip(size: int, scale: tuple[float, float]) -> T.Compose:
    return T.Compose(
        [
            T.ToImage(),
            T.RandomResizedCrop(size, scale=scale, interpolation=BICUBIC, antialias=True),
            T.RandomHorizontalFlip(),
            T.ToDtype(torch.float32, scale=True),
        ]
    )


def byol_view(size: int, blur_p: float, solarize_p: float) -> T.Compose:
    """One of BYOL's two asymmetric views (Grill et al. 2020, Table 6)."""
    kernel = max(3, int(0.1 * size) // 2 * 2 + 1)  # ~10% of the image side, odd
    return T.Compose(
        [
            T.ToImage(),
            T.RandomResizedCrop(size, scale=(0.08, 1.0), interpolation=BICUBIC, antialias=True),
            T.RandomHorizontalFlip(),
            T.ToDtype(torch.float32, scale=True),
            T.RandomApply([T.ColorJitter(0.4, 0.4, 0.2, 0.1)], p=0.8),
            T.RandomGrayscale(p=0.2),
            T.RandomApply([T.GaussianBlur(kernel, sigma=(0.1, 2.0))], p=blur_p),
            T.RandomSolarize(0.5, p=solarize_p),
        ]
    )


class Views:
    """Apply each transform to the same image: one view for most methods, two for BYOL."""

    def __init__(self, transforms: Sequence[Callable]) -> None:
        self.transforms = list(transforms)

    def __call__(self, image: Any) -> list[torch.Tensor]:
        return [t(image) for t in self.transforms]


def pretrain_views(kind: str, size: int) -> Views:
    """The augmentation of each method: MAE crops+flip, BYOL's two views, crops+flip otherwise."""
    if kind == "mae":
        return Views([crop_flip(size, (0.2, 1.0))])
    if kind == "byol":
        return Views(
            [byol_view(size, blur_p=1.0, solarize_p=0.0), byol_view(size, blur_p=0.1, solarize_p=0.2)]
        )
    if kind in ("rotnet", "supervised"):
        return Views([crop_flip(size, (0.08, 1.0))])
    raise ValueError(f"unknown augmentation {kind!r}")


def eval_transform(size: int) -> T.Compose:
    """Resize to the model's size (aspect ratio ignored, as for the paper's small datasets)."""
    return T.Compose(
        [
            T.ToImage(),
            T.Resize((size, size), interpolation=BICUBIC, antialias=True),
            T.ToDtype(torch.float32, scale=True),
        ]
    )
