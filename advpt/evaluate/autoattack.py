"""Robust accuracy under AutoAttack (Croce & Hein, 2020), as RobustBench reports it: ``robust.attack=autoattack``.

The implementation is the optional extra ``pyautoattack``, the authors' code (fra31/auto-attack)
packaged for PyPI, with no dependency beyond torch and numpy. ``torchattacks`` also ships an
AutoAttack, but it is a re-implementation, its last release pins ``requests~=2.25`` (it would
downgrade requests and urllib3 here) and it installs a copy of ``robustbench`` as a top-level package.

The standard version: APGD-CE, APGD-T, FAB-T (9 target classes each) and Square (5000 queries), each
run on the examples still classified correctly. A classifier with fewer than 10 classes is given
``classes - 1`` targets; under 4 classes the targeted DLR loss is undefined, so APGD-T is left out.
"""

from __future__ import annotations

import importlib.util
import logging
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from importlib.metadata import PackageNotFoundError, version
from typing import Any

import torch
from torch import Tensor, nn

from advpt.attacks import Attack
from advpt.errors import UserError
from advpt.evaluate.scoring import Score, autocast, device_of, joined, score_of, split_batch
from advpt.outcomes import Outcomes

PACKAGE = "pyautoattack"
MISSING = (
    "robust.attack=autoattack needs AutoAttack, an optional extra: pip install 'advpt[autoattack]' "
    "(or use robust.attack=pgd)"
)
NORMS = {"linf": "Linf", "l2": "L2"}
TARGETS = 9  # the standard version's target classes for APGD-T and FAB-T


def require() -> None:
    """One line when the extra is not installed (checked before anything runs; imports nothing)."""
    if importlib.util.find_spec(PACKAGE) is None:
        raise UserError(MISSING)


def attacks_run(num_classes: int) -> list[str]:
    """The standard version's attacks, in order, for a ``num_classes``-way classifier."""
    if num_classes < 4:
        return ["apgd-ce", "fab-t", "square"]
    return ["apgd-ce", "apgd-t", "fab-t", "square"]


def describe(num_classes: int) -> dict[str, Any]:
    """What produced the robust numbers, for ``results.json``."""
    try:
        implementation = f"{PACKAGE} {version(PACKAGE)}"
    except PackageNotFoundError:
        implementation = PACKAGE
    return {
        "name": "autoattack",
        "implementation": implementation,
        "version": "standard",
        "attacks": attacks_run(num_classes),
        "target_classes": min(TARGETS, num_classes - 1),
    }


class _Logits(nn.Module):
    """The classifier as AutoAttack calls it: [0, 1] pixels in (the model normalises), float logits out."""

    def __init__(self, model: nn.Module, dtype: torch.dtype | None) -> None:
        super().__init__()
        self.model, self.dtype = model, dtype

    def forward(self, x: Tensor) -> Tensor:
        with autocast(device_of(self.model), self.dtype):
            return self.model(x).float()


class _Forward(logging.Handler):
    """AutoAttack's own checks (a randomised or dynamic model, zero gradients, ...) as our warnings, once each."""

    def __init__(self, warn: Callable[[str], None]) -> None:
        super().__init__(logging.WARNING)
        self.warn, self.seen = warn, set()

    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage()
        if message not in self.seen:
            self.seen.add(message)
            self.warn(f"autoattack: {message}")


@contextmanager
def _checks_to(warn: Callable[[str], None] | None) -> Iterator[None]:
    logger = logging.getLogger("auto-attack")
    handler, propagate = _Forward(warn or (lambda message: None)), logger.propagate
    logger.addHandler(handler)
    logger.propagate = False
    try:
        yield
    finally:
        logger.removeHandler(handler)
        logger.propagate = propagate


def autoattack_outcomes(
    model: nn.Module,
    batches: Iterable[Sequence[Any]],
    attacks: Sequence[Attack],
    num_classes: int,
    seed: int = 0,
    dtype: torch.dtype | None = None,
    warn: Callable[[str], None] | None = None,
) -> list[Outcomes]:
    """Per radius (``attacks`` give norm and eps) and example: whether it survives standard AutoAttack.

    As with PGD, clean mistakes count as failures. ``batches`` are ``(x, y)`` or ``(x, y, ids)``.
    """
    try:
        from pyautoattack import AutoAttack
    except ImportError:
        raise UserError(MISSING) from None
    device = device_of(model)
    logits = _Logits(model, dtype).eval()
    targets = min(TARGETS, num_classes - 1)
    correct: list[list[Any]] = [[] for _ in attacks]
    ids: list[Any] = []
    with _checks_to(warn):
        for batch in batches:
            x, y, index = split_batch(batch, sum(len(i) for i in ids))
            x, y = x.to(device), y.to(device)
            ids.append(index)
            for i, attack in enumerate(attacks):
                if attack.eps == 0:  # nothing to search: the clean prediction
                    with torch.inference_mode():
                        correct[i].append((logits(x).argmax(-1) == y).cpu().numpy())
                    continue
                adversary = AutoAttack(
                    logits,
                    norm=NORMS[attack.norm],
                    eps=attack.eps,
                    version="standard",
                    seed=seed,
                    device=device,
                )
                adversary.apgd_targeted.n_target_classes = adversary.fab.n_target_classes = targets
                adversary.attacks_to_run = attacks_run(num_classes)
                x_adv, _ = adversary.run_standard_evaluation(x, y, batch_size=len(y))
                with torch.inference_mode():
                    correct[i].append((logits(x_adv).argmax(-1) == y).cpu().numpy())
    return joined(correct, ids)


def autoattack_accuracy(
    model: nn.Module,
    batches: Iterable[Sequence[Any]],
    attacks: Sequence[Attack],
    num_classes: int,
    seed: int = 0,
    dtype: torch.dtype | None = None,
    warn: Callable[[str], None] | None = None,
) -> list[Score]:
    """Per radius: how many examples survive standard AutoAttack (each ``top1`` over all examples seen)."""
    return [score_of(o) for o in autoattack_outcomes(model, batches, attacks, num_classes, seed, dtype, warn)]
