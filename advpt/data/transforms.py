"""Per-method augmentations. Output pixels are float in [0, 1]; normalisation is inside the model."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torchvision.transforms import InterpolationMode
from torchvision.transforms import v2 as T

from advpt.method_table import METHOD_TABLE

BICUBIC = InterpolationMode.BICUBIC


def crop_flip(size: int, scale: tuple[float, float], auto_augment: str | None = None) -> T.Compose:
    """Random resized crop + horizontal flip, then timm's RandAugment when ``auto_augment`` names one
    (e.g. ``rand-m9-mstd0.5-inc1``: 2 ops at magnitude 9 with std 0.5, He et al. 2022's from-scratch recipe)."""
    ops: list[Any] = [
        T.ToImage(),
        T.RandomResizedCrop(size, scale=scale, interpolation=BICUBIC, antialias=True),
        T.RandomHorizontalFlip(),
    ]
    if auto_augment:
        from timm.data.auto_augment import rand_augment_transform

        from advpt.models import IMAGENET_MEAN

        # On PIL images, with the ImageNet mean as fill colour, as timm's create_transform sets it up.
        fill = tuple(round(255 * m) for m in IMAGENET_MEAN)
        randaugment = rand_augment_transform(
            auto_augment, {"translate_const": int(size * 0.45), "img_mean": fill}
        )
        ops += [T.ToPILImage(), with_safe_posterize(randaugment), T.ToImage()]
    return T.Compose([*ops, T.ToDtype(torch.float32, scale=True)])


def distorted_view(
    size: int,
    scale: tuple[float, float],
    jitter: tuple[float, float, float, float],
    blur_p: float,
    solarize_p: float = 0.0,
) -> T.Compose:
    """Crop + flip, then colour jitter (p 0.8), grey (p 0.2), Gaussian blur and solarisation: the view
    family of BYOL, SimCLR, MoCo v3 and DINO, which differ only in the jitter and the two probabilities."""
    kernel = max(3, int(0.1 * size) // 2 * 2 + 1)  # ~10% of the image side, odd
    ops: list[Any] = [
        T.ToImage(),
        T.RandomResizedCrop(size, scale=scale, interpolation=BICUBIC, antialias=True),
        T.RandomHorizontalFlip(),
        T.ToDtype(torch.float32, scale=True),
        T.RandomApply([T.ColorJitter(*jitter)], p=0.8),
        T.RandomGrayscale(p=0.2),
        T.RandomApply([T.GaussianBlur(kernel, sigma=(0.1, 2.0))], p=blur_p),
        T.RandomSolarize(0.5, p=solarize_p),  # drawn at p 0 too: each view's random stream as BYOL's
    ]
    return T.Compose(ops)


def byol_view(
    size: int, blur_p: float, solarize_p: float, scale: tuple[float, float] = (0.08, 1.0)
) -> T.Compose:
    """One of BYOL's two asymmetric views (Grill et al. 2020, Table 6)."""
    return distorted_view(size, scale, (0.4, 0.4, 0.2, 0.1), blur_p, solarize_p)


def simclr_view(size: int, scale: tuple[float, float] = (0.08, 1.0)) -> T.Compose:
    """SimCLR's view, the same for both (Chen et al. 2020, App. A): colour distortion of strength 1
    (jitter 0.8, 0.8, 0.8, 0.2), Gaussian blur with p 0.5, no solarisation."""
    return distorted_view(size, scale, (0.8, 0.8, 0.8, 0.2), blur_p=0.5)


def dino_local(size: int, scale: tuple[float, float]) -> T.Compose:
    """One of DINO's local crops (Caron et al. 2021; main_dino.py's DataAugmentationDINO): 96/224 of the global
    side, rounded to a multiple of 8 (96 px at 224, 16 at 32, 8 at 16), crop scale from 0.05 up to the global
    crops' lower bound ((0.05, 0.4) against (0.4, 1)), the global crops' flip and colour jitter, blur p 0.5."""
    local_size = max(8, round(size * 96 / 224 / 8) * 8)
    return byol_view(local_size, blur_p=0.5, solarize_p=0.0, scale=(0.05, scale[0]))


class Stacked:
    """``count`` draws of one transform on the same image, stacked: [count, C, H, W] (DINO's local crops)."""

    def __init__(self, transform: Callable, count: int) -> None:
        self.transform, self.count = transform, count

    def __call__(self, image: Any) -> torch.Tensor:
        return torch.stack([self.transform(image) for _ in range(self.count)])


def with_safe_posterize(transform: Any) -> Any:
    """timm's RandAugment / AutoAugment (possibly inside a Compose) with a posterize that also works at the
    top magnitude: keeping 0 bits is black (Pillow >= 11 refuses bits=0). Returns ``transform``."""
    for t in [transform, *getattr(transform, "transforms", [])]:
        ops = getattr(t, "ops", None) or [op for pol in getattr(t, "policy", []) for op in pol]
        for op in ops:
            if op.name.startswith("Posterize"):
                op.aug_fn = _posterize
    return transform


def _posterize(img: Any, bits_to_keep: int, **_: Any) -> Any:
    from PIL import Image, ImageOps

    if bits_to_keep >= 8:
        return img
    if bits_to_keep <= 0:
        return Image.new(img.mode, img.size)
    return ImageOps.posterize(img, bits_to_keep)


class Views:
    """Apply each transform to the same image: one view for most methods, two for BYOL."""

    def __init__(self, transforms: Sequence[Callable]) -> None:
        self.transforms = list(transforms)

    def __call__(self, image: Any) -> list[torch.Tensor]:
        return [t(image) for t in self.transforms]


# Each view a method's table entry names: (size, crop scale, the config's auto_augment) -> its transform.
VIEWS: dict[str, Callable[[int, tuple[float, float], str | None], Callable]] = {
    "crop_flip": lambda size, scale, _: crop_flip(size, scale),
    "crop_flip_randaugment": crop_flip,  # RandAugment where the config names one
    "byol_blur": lambda size, scale, _: byol_view(size, 1.0, 0.0, scale),
    "byol_solarize": lambda size, scale, _: byol_view(size, 0.1, 0.2, scale),
    "dino_local": lambda size, scale, _: dino_local(size, scale),  # drawn views.counts.dino_local times
    "simclr": lambda size, scale, _: simclr_view(size, scale),
}


def pretrain_views(views: str | Mapping[str, Any], size: int) -> Views:
    """The augmentation of each method (the method config's ``views``: a kind, the method's name, or a
    mapping with ``kind`` and optionally ``crop_scale`` and ``auto_augment``): the views its table entry
    (``advpt.method_table``) names, e.g. MAE's crop + flip or BYOL's two asymmetric views."""
    spec = {"kind": views} if isinstance(views, str) else dict(views)
    kind = spec["kind"]
    method = METHOD_TABLE.get(kind)
    if method is None:
        raise ValueError(f"unknown augmentation {kind!r}")
    scale = tuple(float(v) for v in spec.get("crop_scale") or method.crop_scale)
    # views.counts: a view drawn that many times per image, stacked into one tensor (0: left out)
    counts = {str(k): int(v) for k, v in (spec.get("counts") or {}).items()}
    made = [(VIEWS[view](size, scale, spec.get("auto_augment")), counts.get(view)) for view in method.views]
    return Views([t if count is None else Stacked(t, count) for t, count in made if count != 0])


def eval_transform(size: int) -> T.Compose:
    """Resize to the model's size (aspect ratio ignored, as for the paper's small datasets)."""
    return T.Compose(
        [
            T.ToImage(),
            T.Resize((size, size), interpolation=BICUBIC, antialias=True),
            T.ToDtype(torch.float32, scale=True),
        ]
    )
