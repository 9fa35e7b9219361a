"""Classification pretext losses: RotNet (paper eq. 5) and supervised pre-training (Madry et al.).

Both follow He et al. (2022)'s from-scratch ViT recipe (the paper's App. C): label smoothing, drop path,
RandAugment (in the views) and a weight EMA whose average is the encoder handed on; supervised adds mixup
and cutmix, which RotNet leaves out.
"""

from __future__ import annotations

from typing import Any

import torch
from timm.data import Mixup
from timm.data.mixup import mixup_target
from timm.utils import ModelEmaV3
from torch import Tensor, nn

from advpt.methods.base import PretrainMethod
from advpt.training.schedule import soft_cross_entropy


def rotate(images: Tensor, quarter_turns: Tensor) -> Tensor:
    """Rotate each image [B, C, H, W] by ``quarter_turns[i]`` x 90 degrees (counter-clockwise)."""
    out = images.clone()
    for k in range(1, 4):
        idx = (quarter_turns == k).nonzero(as_tuple=True)[0]
        if idx.numel():
            out[idx] = torch.rot90(images[idx], k, dims=(2, 3))
    return out


class Classifier(PretrainMethod):
    """Encoder + linear head on the mean-pooled tokens, trained on (label-smoothed) cross-entropy."""

    num_outputs: int

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.head = nn.Linear(self.encoder.dim, self.num_outputs)
        nn.init.trunc_normal_(self.head.weight, std=0.02)
        nn.init.zeros_(self.head.bias)
        self.smoothing = float(self.method_cfg.get("label_smoothing", 0.0))
        # Weight EMA of the encoder (timm's, as DeiT / MAE use it): no gradient, so no optimiser group.
        decay = float(self.method_cfg.get("ema_decay") or 0.0)
        self.ema = ModelEmaV3(self.encoder, decay=decay).requires_grad_(False) if decay > 0 else None

    def smoothed(self, labels: Tensor) -> Tensor:
        """Integer labels, or their label-smoothed one-hot targets (timm's ``mixup_target`` at lam=1)."""
        if self.smoothing <= 0:
            return labels
        return mixup_target(labels, self.num_outputs, lam=1.0, smoothing=self.smoothing)

    def optimizer_step(self, *args: Any, **kwargs: Any) -> None:
        super().optimizer_step(*args, **kwargs)
        if self.ema is not None:  # after the update only: the attack never moves the average
            # timm's train.py passes the count of updates including this one (get_decay: the first copies);
            # Lightning's global_step does not count this one yet, as it is still in progress.
            self.ema.update(self.encoder, step=self.global_step + 1)

    def exported_encoder(self) -> Any:
        return self.ema.module if self.ema is not None else self.encoder

    def logits(self, x: Tensor) -> Tensor:
        return self.head(self.encoder.features(x))

    def inputs_and_targets(self, images: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
        raise NotImplementedError

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        (images,), labels = batch
        images, targets = self.inputs_and_targets(images, labels)

        def loss_fn(x: Tensor) -> Tensor:
            return soft_cross_entropy(self.logits(x), targets)

        x = self.attacked(loss_fn, images)
        loss = self.reduce(loss_fn(x))
        self.log_loss(loss, images.shape[0])
        return loss


class RotNet(Classifier):
    """Predict which of 4 rotations was applied; one rotation drawn per image and step."""

    num_outputs = 4

    def inputs_and_targets(self, images: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
        quarter_turns = torch.randint(0, 4, (images.shape[0],), device=images.device)
        return rotate(images, quarter_turns), self.smoothed(quarter_turns)


class Supervised(Classifier):
    """Class labels, with MAE's supervised recipe: mixup / cutmix and label smoothing (timm)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.num_outputs = int(kwargs.get("num_classes") or 0)
        if self.num_outputs < 2:
            raise ValueError("supervised pre-training needs a labelled dataset with at least 2 classes")
        super().__init__(*args, **kwargs)
        m = self.method_cfg
        mixing = float(m.get("mixup", 0.0)) > 0 or float(m.get("cutmix", 0.0)) > 0
        self.mixup = (
            Mixup(
                mixup_alpha=float(m.get("mixup", 0.0)),
                cutmix_alpha=float(m.get("cutmix", 0.0)),
                label_smoothing=float(m.get("label_smoothing", 0.0)),
                num_classes=self.num_outputs,
            )
            if mixing
            else None
        )

    def inputs_and_targets(self, images: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
        if self.mixup is not None and images.shape[0] % 2 == 0:
            return self.mixup(images, labels)
        return images, self.smoothed(labels)
