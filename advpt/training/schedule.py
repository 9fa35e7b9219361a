"""What pre-training and fine-tuning share in optimisation: the batch an optimiser step sees, MAE's
warm-up + cosine schedule, and the cross-entropy of soft targets."""

from __future__ import annotations

from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from timm.scheduler import CosineLRScheduler
from torch import Tensor


def effective_batch(module: L.LightningModule, batch_size: int) -> int:
    """Images per optimiser step: per-device batch x gradient accumulation x devices."""
    trainer = module._trainer
    if trainer is None:
        return batch_size
    return batch_size * trainer.accumulate_grad_batches * trainer.world_size


def warmup_cosine(
    optimizer: torch.optim.Optimizer, total_steps: int, warmup_fraction: float, min_lr: float
) -> Any:
    """MAE's schedule (``util/lr_sched.py``): linear from 0 over the warm-up, then a half-cycle cosine
    from the peak to ``min_lr`` over the remaining steps; per optimiser step.

    timm's ``warmup_prefix`` starts the cosine where the warm-up ends, so the peak is reached exactly there.
    """
    warmup = int(round(warmup_fraction * total_steps))
    return CosineLRScheduler(
        optimizer,
        t_initial=max(1, total_steps - warmup),
        lr_min=min_lr,
        warmup_t=warmup,
        warmup_lr_init=0.0,
        warmup_prefix=True,
        t_in_epochs=False,
    )


def soft_cross_entropy(logits: Tensor, target: Tensor) -> Tensor:
    """Per-example cross-entropy for integer or soft (mixup / smoothed) targets."""
    if target.dim() == 1:
        return F.cross_entropy(logits.float(), target, reduction="none")
    return -(target * F.log_softmax(logits.float(), dim=-1)).sum(dim=-1)
