"""Fine-tuning's recipes (the ``optim`` group): the optimiser, the schedule and the augmentation.

MAE's fine-tuning uses AdamW with layer-wise lr decay and RandAugment (paper §4.2, App. C); Steiner et
al.'s transfer uses SGD with momentum at one lr and resize + flip (App. E); MAE's linear probe uses LARS
and a random resized crop + flip.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn

from advpt.models import IMAGENET_MEAN, IMAGENET_STD

OPTIMIZERS = ("adamw", "momentum", "lars")
TRANSFORMS = ("randaugment", "resize_flip", "crop_flip")


def build_optimizer(
    vit: nn.Module, optim: Mapping[str, Any], lr: float, layer_decay: float
) -> torch.optim.Optimizer:
    """timm's optimiser on the timm ViT itself, so its layer ids (``group_matcher``) see timm's names.

    With layer decay each group carries an ``lr_scale`` (γ^k) that timm's scheduler multiplies in;
    biases, norms, ``pos_embed`` and ``cls_token`` get no weight decay.
    """
    from timm.optim import create_optimizer_v2

    if optim["opt"] == "lars":
        return mae_lars(vit, optim, lr)
    extra = (
        {"betas": tuple(optim["betas"])}
        if optim["opt"] == "adamw"
        else {"momentum": float(optim["momentum"])}
    )
    return create_optimizer_v2(
        vit,
        opt=optim["opt"],
        lr=lr,
        weight_decay=float(optim["weight_decay"]),
        layer_decay=float(layer_decay) if optim["opt"] == "adamw" else None,
        **extra,
    )


def mae_lars(vit: nn.Module, optim: Mapping[str, Any], lr: float) -> torch.optim.Optimizer:
    """MAE's LARS (``util/lars.py``) as timm's ``Lars``, on the parameters that train.

    MAE adapts only parameters with more than one dimension (weight decay, then the trust ratio
    ``trust_coefficient·‖w‖/‖g‖``) and gives biases and norms plain momentum SGD. timm's ``Lars`` adapts a
    whole group or none of it, so matrices and vectors get a group each. ``eps=0``: MAE's ratio has none.
    With weight decay the two differ (timm divides by ‖g‖ + wd·‖w‖, MAE by ‖g + wd·w‖): equal at 0 only.
    """
    from timm.optim import Lars

    trained = [p for p in vit.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in trained if p.ndim > 1], "always_adapt": True},
        {"params": [p for p in trained if p.ndim <= 1], "always_adapt": False, "weight_decay": 0.0},
    ]
    return Lars(
        [g for g in groups if g["params"]],
        lr=lr,
        momentum=float(optim["momentum"]),
        weight_decay=float(optim["weight_decay"]),
        trust_coeff=float(optim["trust_coefficient"]),
        eps=0.0,
    )


def build_scheduler(optimizer: torch.optim.Optimizer, optim: Mapping[str, Any], total_steps: int) -> Any:
    """Linear warm-up from 0 over ``warmup_fraction`` of the steps, then cosine to ``min_lr`` (per step).

    As in MAE and big_vision, the cosine spans the steps after the warm-up (``warmup_prefix``), so the
    peak lr is reached exactly when the warm-up ends: lr(t) = lr·t/W for t < W.
    """
    from advpt.training.schedule import warmup_cosine

    return warmup_cosine(optimizer, total_steps, float(optim["warmup_fraction"]), float(optim["min_lr"]))


class _Unnormalize(nn.Module):
    """Back to [0, 1] pixels after timm's transform: the model normalises by itself."""

    def __init__(self, mean: tuple[float, ...], std: tuple[float, ...]) -> None:
        super().__init__()
        self.mean, self.std = torch.tensor(mean).view(-1, 1, 1), torch.tensor(std).view(-1, 1, 1)

    def forward(self, x: Tensor) -> Tensor:
        return (x * self.std + self.mean).clamp_(0, 1)


def train_transform(optim: Mapping[str, Any], size: int) -> Any:
    """The recipe's training augmentation; output pixels are float in [0, 1]."""
    from torchvision.transforms import v2 as T

    if optim["transform"] == "resize_flip":
        from advpt.data.transforms import BICUBIC

        return T.Compose(
            [
                T.ToImage(),
                T.Resize((size, size), interpolation=BICUBIC, antialias=True),
                T.RandomHorizontalFlip(float(optim.get("hflip", 0.5))),
                T.ToDtype(torch.float32, scale=True),
            ]
        )
    from timm.data import create_transform

    from advpt.data.transforms import with_safe_posterize

    # timm's pipeline as MAE calls it, with ImageNet statistics so that RandAugment's fill colour and the
    # noise of random erasing are MAE's; undone at the end, erased pixels clipped into [0, 1].
    augment = optim["transform"] == "randaugment"  # crop_flip: the crop and flip alone (MAE's linear probe)
    timm_transform = create_transform(
        size,
        is_training=True,
        scale=tuple(float(v) for v in optim.get("scale", (0.08, 1.0))),
        hflip=float(optim.get("hflip", 0.5)),
        auto_augment=(optim["auto_augment"] or None) if augment else None,
        color_jitter=None,
        interpolation="bicubic",
        re_prob=float(optim["re_prob"]) if augment else 0.0,
        re_mode="pixel",
        re_count=1,
        mean=IMAGENET_MEAN,
        std=IMAGENET_STD,
    )
    with_safe_posterize(timm_transform)
    return T.Compose([T.ToPILImage(), timm_transform, _Unnormalize(IMAGENET_MEAN, IMAGENET_STD)])
