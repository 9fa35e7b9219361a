"""Robust accuracy: the attacks the ``robust`` config asks for, and how many examples survive them.

An example counts as robust when the model classifies the attacked input correctly (clean mistakes
are attacked too and count as failures), so robust accuracy is over all attacked images. The attack
is our PGD (``robust.attack=pgd``, here) or AutoAttack (``robust.attack=autoattack``, ``autoattack.py``).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from advpt.attacks import Attack, pgd
from advpt.config import parse_number, positive_int
from advpt.errors import UserError
from advpt.evaluate.scoring import Score, autocast, device_of, joined, score_of, split_batch
from advpt.outcomes import Outcomes

ATTACKS = ("pgd", "autoattack")


def robust_outcomes(
    model: nn.Module,
    batches: Iterable[Sequence[Any]],
    attacks: Sequence[Attack],
    dtype: torch.dtype | None = None,
) -> list[Outcomes]:
    """Per attack and example: whether ``model`` still classifies it correctly after PGD on the cross-entropy.

    ``model`` maps [0,1] pixels to logits; ``batches`` are ``(x, y)`` or ``(x, y, ids)`` (see
    :func:`advpt.evaluate.scoring.split_batch`). Every example is attacked (clean mistakes stay mistakes).
    """
    device = device_of(model)
    correct: list[list[np.ndarray]] = [[] for _ in attacks]
    ids: list[np.ndarray] = []
    for batch in batches:
        x, y, index = split_batch(batch, sum(len(i) for i in ids))
        x, y = x.to(device), y.to(device)
        ids.append(index)

        def loss_fn(x_adv: Tensor, y: Tensor = y) -> Tensor:
            with autocast(device, dtype):
                logits = model(x_adv)
            return F.cross_entropy(logits.float(), y, reduction="none")

        for i, attack in enumerate(attacks):
            delta = pgd(loss_fn, x, attack, model=model)
            with torch.inference_mode(), autocast(device, dtype):
                correct[i].append((model(x + delta).argmax(-1) == y).cpu().numpy())
    return joined(correct, ids)


def robust_accuracy(
    model: nn.Module,
    batches: Iterable[Sequence[Any]],
    attacks: Sequence[Attack],
    dtype: torch.dtype | None = None,
) -> list[Score]:
    """Per attack: how many examples ``model`` still classifies correctly after PGD on the cross-entropy;
    each score's ``top1`` is the robust accuracy over all examples seen."""
    return [score_of(o) for o in robust_outcomes(model, batches, attacks, dtype)]


@dataclass(frozen=True)
class RobustSpec:
    norm: str
    radius: str  # as written in the config, e.g. "2/255"
    attack: Attack


def robust_specs(robust: Mapping[str, Any], size: int) -> list[RobustSpec]:
    """Every (norm, radius) attack the ``robust`` config asks for; raises UserError on a bad value.

    With ``robust.attack=autoattack`` only each norm and radius is used (AutoAttack fixes its own steps).
    """
    name = robust.get("attack", "pgd")
    if name not in ATTACKS:
        raise UserError(f"robust.attack={name} is unknown; choose one of {', '.join(ATTACKS)}")
    if name == "autoattack":
        from advpt.evaluate.autoattack import require

        require()
    steps, restarts = robust["steps"], robust["restarts"]
    positive_int(steps, "robust.steps", "the number of PGD steps must be")
    positive_int(restarts, "robust.restarts", "the number of restarts must be")
    if robust["step_size"] is None:
        relative = 2.5 / steps
    else:
        relative = parse_number(robust["step_size"], "robust.step_size")
        if not math.isfinite(relative) or relative <= 0:
            raise UserError(f"robust.step_size={robust['step_size']} must be > 0 (a multiple of the radius)")
    norms = robust["norms"]
    if isinstance(norms, str) or not isinstance(norms, Sequence) or not norms:
        raise UserError(f"robust.norms={norms} must be a list, e.g. robust.norms=[linf,l2]")
    l2_max = math.sqrt(3 * size * size)
    specs = []
    for norm in norms:
        if norm not in ("linf", "l2"):
            raise UserError(f"robust.norms: unknown norm {norm!r}; choose from linf, l2")
        radii = robust["radii"].get(norm)
        key = f"robust.radii.{norm}"
        if isinstance(radii, str) or not isinstance(radii, Sequence) or not radii:
            raise UserError(f"{key}={radii} must be a non-empty list of radii, e.g. {key}=[1/255,4/255]")
        for raw in radii:
            eps = parse_number(raw, key)
            if not math.isfinite(eps) or eps < 0:
                raise UserError(f"{key}: radius {raw} is out of range: a radius must be a finite number >= 0")
            if norm == "linf" and eps > 1:
                raise UserError(
                    f"{key}: radius {raw} is not an l_inf radius for images in [0,1]; write k/255"
                )
            if norm == "l2" and eps > l2_max:
                raise UserError(
                    f"{key}: radius {raw} exceeds the largest l2 distance between two {size}px images ({l2_max:.1f})"
                )
            attack = Attack(norm, eps, steps=steps, step_size=relative * eps, restarts=restarts)
            specs.append(RobustSpec(norm, str(raw), attack))
    return specs


def robust_results(
    model: nn.Module,
    batches: Iterable[Sequence[Any]],
    specs: Sequence[RobustSpec],
    attack: str = "pgd",
    num_classes: int = 0,
    seed: int = 0,
    dtype: torch.dtype | None = None,
    warn: Callable[[str], None] | None = None,
    outcomes: dict[str, Outcomes] | None = None,
) -> tuple[dict[str, dict[str, Any]], dict[str, Any]]:
    """``results.json``'s ``robust`` (norm -> radius -> accuracy, images, eps, the attack's settings)
    and ``robust_attack`` (which attack produced them), under PGD or AutoAttack. ``outcomes``, when
    given, receives each radius's per-image outcomes under ``robust/<norm>/<radius as written>``."""
    attacks = [s.attack for s in specs]
    if attack == "autoattack":
        from advpt.evaluate.autoattack import autoattack_outcomes, describe

        per_image = autoattack_outcomes(model, batches, attacks, num_classes, seed, dtype, warn)
        record = describe(num_classes)
        settings: list[dict[str, Any]] = [{} for _ in attacks]
    else:
        per_image = robust_outcomes(model, batches, attacks, dtype)
        record = {"name": "pgd", "implementation": "advpt.attacks"}
        record |= {"steps": attacks[0].steps, "restarts": attacks[0].restarts} if attacks else {}
        settings = [{"steps": a.steps, "restarts": a.restarts, "step_size": a.alpha} for a in attacks]
    table: dict[str, dict[str, Any]] = {}
    for spec, got, extra in zip(specs, per_image, settings, strict=True):
        score = score_of(got)
        table.setdefault(spec.norm, {})[spec.radius] = {
            "accuracy": score.top1 if score.images else None,
            "images": score.images,
            "eps": spec.attack.eps,
            "attack": attack,
            **extra,
        }
        if outcomes is not None:
            outcomes[f"robust/{spec.norm}/{spec.radius}"] = got
    return table, record
