"""``EvalSet``, one evaluation set (its images and how it is scored), and ``group_mean`` over sets.

Accuracy = ``correct.sum() / valid.sum()`` (``EvalSet.tally`` does this count); ``valid`` is all-True for
every set but ReaL. All 75 IN-C subsets share ``group == "imagenet_c"``; ``group_mean`` averages them.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor
from torch.utils.data import Dataset


def _all_valid(target: Tensor) -> Tensor:
    return torch.ones(target.shape[0], dtype=torch.bool, device=target.device)


@dataclass
class EvalSet:
    """One evaluation set: a dataset of ``(image, target)`` and how to score 1000-way logits on it."""

    name: str
    dataset: Dataset
    correct: Callable[[Tensor, Tensor], Tensor]
    group: str
    # Which rows count towards the accuracy (only ReaL excludes any); accuracy = correct.sum() / valid.sum().
    valid: Callable[[Tensor], Tensor] = _all_valid
    path: Path | None = None
    classes: list[str] | None = None

    def tally(self, logits: Tensor, target: Tensor) -> tuple[int, int]:
        """(number correct, number counted) for one batch."""
        return int(self.correct(logits, target).sum()), int(self.valid(target).sum())


def group_mean(results: dict[str, float], sets: Sequence[EvalSet]) -> dict[str, float]:
    """Average results per ``EvalSet.group`` (all IN-C subsets -> one "imagenet_c"); others pass through.

    The IN-C mean is the unweighted mean over the subsets present, as IN-C is usually reported.
    Names not among ``sets`` are kept under their own name.
    """
    group_of = {s.name: s.group for s in sets}
    grouped: dict[str, list[float]] = {}
    for name, acc in results.items():
        grouped.setdefault(group_of.get(name, name), []).append(acc)
    return {g: sum(v) / len(v) for g, v in grouped.items()}
