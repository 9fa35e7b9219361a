"""Clean top-1: which examples of one set are correct under its own scoring rule, and how many."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from torch.utils.data import Dataset

from advpt.data.variants import EvalSet
from advpt.outcomes import Outcomes

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


class Numbered(Dataset):
    """``dataset``'s items with their index appended, ``(image, target, index)``, so that the outcome of each
    image can be traced to it after unreadable ones are dropped; an unreadable item stays ``None``."""

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset  # the name advpt.data.skipping follows to count unreadable items

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, i: int) -> Any:
        item = self.dataset[i]
        return None if item is None else (*item, i)


def split_batch(batch: Sequence[Any], seen: int) -> tuple[Tensor, Any, np.ndarray]:
    """``(x, target, ids)`` of a batch of :class:`Numbered` items; a plain ``(x, target)`` batch gets the
    positions ``seen, seen + 1, ...`` as its ids."""
    x, target = batch[0], batch[1]
    if len(batch) > 2:
        return x, target, torch.as_tensor(batch[2]).cpu().numpy().astype(np.int64)
    return x, target, np.arange(seen, seen + len(x), dtype=np.int64)


def clean_outcomes(
    model: nn.Module,
    evalset: EvalSet,
    batches: Iterable[Sequence[Any]],
    dtype: torch.dtype | None = None,
) -> Outcomes:
    """Per counted image of ``batches``: whether ``model`` is right as ``evalset`` scores it (subset
    classes, ReaL labels, ...); images a set does not count (ReaL's without a label) are left out."""
    device = device_of(model)
    correct: list[np.ndarray] = []
    ids: list[np.ndarray] = []
    seen = 0
    with torch.inference_mode(), autocast(device, dtype):
        for batch in batches:
            x, target, index = split_batch(batch, seen)
            seen += len(x)
            logits = model(x.to(device, non_blocking=True)).float()
            target = target.to(device)
            counted = evalset.valid(target).cpu().numpy().astype(bool)
            right = evalset.correct(logits, target).cpu().numpy().astype(bool)
            correct.append(right[counted])
            ids.append(index[counted])
    return joined([correct], ids)[0]


def joined(correct: Sequence[Sequence[np.ndarray]], ids: Sequence[np.ndarray]) -> list[Outcomes]:
    """Per attack, its batches' outcomes end to end (empty when there were no batches)."""
    order = np.concatenate(ids) if ids else np.zeros(0, dtype=np.int64)
    return [
        Outcomes(np.concatenate(c).astype(bool) if c else np.zeros(0, dtype=bool), order) for c in correct
    ]


def score_of(outcomes: Outcomes) -> Score:
    return Score(int(outcomes.correct.sum()), len(outcomes.correct))


def clean_score(
    model: nn.Module,
    evalset: EvalSet,
    batches: Iterable[Sequence[Any]],
    dtype: torch.dtype | None = None,
) -> Score:
    """Top-1 of ``model`` on ``batches`` as ``evalset`` scores it (subset classes, ReaL labels, ...)."""
    return score_of(clean_outcomes(model, evalset, batches, dtype))
