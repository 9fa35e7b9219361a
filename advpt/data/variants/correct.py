"""How 1000-way logits are scored on each evaluation set: ``correct(logits [B,1000], target) -> bool [B]``.

* plain top-1 (``top1_correct``) for val, V2, Sketch, IN-C;
* IN-A / IN-R (``subset_correct``): only the 200 classes of the set compete;
* ReaL (``real_correct``): target is a multi-hot bool ``[B,1000]``; correct if the argmax is in the ReaL set.
  Images with an empty ReaL set are excluded: ``correct`` is False for them and ``real_valid`` is False;
* cue-conflict (``conflict_correct``): Geirhos et al.'s 16-class decision -- mean softmax probability over
  each category's ImageNet classes, argmax over the 16.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
from torch import Tensor

from advpt.data.variants.labels import NUM_CLASSES, conflict_categories


def top1_correct(logits: Tensor, target: Tensor) -> Tensor:
    return logits.argmax(-1) == target.to(logits.device)


def subset_correct(indices: Iterable[int]) -> Callable[[Tensor, Tensor], Tensor]:
    """Top-1 with only ``indices`` competing (the others are masked to -inf before the argmax)."""
    idx = torch.tensor(sorted(indices), dtype=torch.long)
    keep = torch.zeros(NUM_CLASSES, dtype=torch.bool)
    keep[idx] = True

    def correct(logits: Tensor, target: Tensor) -> Tensor:
        masked = logits.masked_fill(~keep.to(logits.device), float("-inf"))
        return masked.argmax(-1) == target.to(logits.device)

    return correct


def real_correct(logits: Tensor, target: Tensor) -> Tensor:
    """``target`` multi-hot bool [B,1000]; an all-False row (no ReaL label) is never correct."""
    pred = logits.argmax(-1, keepdim=True)
    return target.to(logits.device).bool().gather(-1, pred).squeeze(-1)


def real_valid(target: Tensor) -> Tensor:
    return target.bool().any(-1)


def coarse16_probs(logits: Tensor) -> Tensor:
    """[B,1000] logits -> [B,16] mean softmax probability per category (sorted category order)."""
    probs = logits.float().softmax(-1)
    cols = [probs[:, list(ix)].mean(-1) for ix in conflict_categories().values()]
    return torch.stack(cols, dim=-1)


def conflict_correct(logits: Tensor, target: Tensor) -> Tensor:
    return coarse16_probs(logits).argmax(-1) == target.to(logits.device)
