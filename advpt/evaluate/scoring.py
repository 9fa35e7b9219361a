"""Clean top-1: the count of correct examples of one set under its own scoring rule."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from advpt.data.variants import EvalSet

PRECISIONS = {"32": None, "bf16": torch.bfloat16, "bf16-mixed": torch.bfloat16}


@dataclass(frozen=True)
class Score:
    """Correct / counted examples of one set (or one attack)."""

    correct: int
    images: int

    @property
    def top1(self) -> float:
        return self.correct / self.images if self.images else float("nan")


def autocast(device: torch.device, dtype: torch.dtype | None) -> Any:
    """Autocast to ``dtype`` for the forward passes; full precision when ``dtype`` is ``None``."""
    return torch.autocast(device.type, dtype=dtype, enabled=dtype is not None)


def device_of(model: nn.Module) -> torch.device:
    """Where ``model``'s parameters live (the CPU for a model without any)."""
    p = next(model.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


def clean_score(
    model: nn.Module,
    evalset: EvalSet,
    batches: Iterable[tuple[Tensor, Any]],
    dtype: torch.dtype | None = None,
) -> Score:
    """Top-1 of ``model`` on ``batches`` as ``evalset`` scores it (subset classes, ReaL labels, ...)."""
    device = device_of(model)
    correct = counted = 0
    with torch.inference_mode(), autocast(device, dtype):
        for x, target in batches:
            logits = model(x.to(device, non_blocking=True)).float()
            c, n = evalset.tally(logits, target.to(device))
            correct, counted = correct + c, counted + n
    return Score(correct, counted)
