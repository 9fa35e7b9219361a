"""Has each fine-tuning run behind the evaluations converged? Its validation top-1 over its last epochs.

The paper compares pre-trainings through the models fine-tuned from them. A model still improving when
its fine-tuning stopped is compared before it has converged: the difference then measures the length of
the fine-tuning (which arm learns faster), not what the pre-training gave the encoder. So every run's
validation top-1 (``val/top1`` in its ``metrics.csv``, one value per epoch) is checked over its tail.

The rule: with E epochs logged (v_1 .. v_E), the tail is the last k = max(1, ceil(FRACTION * E)) epochs,
and its gain is what the tail's trend climbs over them: the Theil-Sen slope of v_(E-k) .. v_E against the
epoch (the median of the slopes between every two of those k + 1 values) times k. A run whose tail gains
more than :data:`THRESHOLD` (1 point) is flagged unconverged. With one epoch there is no tail to measure: no
gain, not flagged. Nothing here imports torch.

Why a trend and not v_E - v_(E-k): on a validation split of a few hundred images one epoch's top-1 moves by
an image or two (0.3-0.6 points on 360) while the model itself has stopped improving, so a difference of two
single epochs flags a run for one dip at the window's start, or for a step it took early in the window and
then held. The median of the pairwise slopes is moved by neither (an outlier among k + 1 values changes k
of its k(k + 1)/2 slopes), yet it reads a climb that lasts through the window at its full size.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from advpt.report.aggregate import order
from advpt.report.collect import val_curve

FRACTION = 0.2
"""The tail of a fine-tuning run that is checked: its last 20 % of epochs (at least one)."""
THRESHOLD = 0.01
"""A tail that gains more than this (a fraction of top-1: 1 point) is still learning: unconverged."""
LAST = 5
"""How many of the last epochs' values a run shows."""
LABELS = ("method", "attack", "radius", "seed", "data", "optim", "layer_decay")
"""What each run is labelled with, from its evaluation row."""


def window(epochs: int) -> int:
    """How many epochs the tail of a run of ``epochs`` epochs spans: max(1, ceil(FRACTION * epochs))."""
    return max(1, math.ceil(FRACTION * epochs))


def gain(curve: Sequence[tuple[int, float]]) -> float | None:
    """What validation top-1 gained over the last :func:`window` epochs, read from their Theil-Sen trend
    (``None`` with under two epochs). Rounded to 6 decimals: float32 logging noise does not tip a gain over
    the threshold."""
    if len(curve) < 2:
        return None
    from scipy.stats import theilslopes

    k = window(len(curve))
    tail = curve[-(k + 1) :]  # v_(E-k) .. v_E: k + 1 values, k epochs apart at the ends
    slope = theilslopes([v for _epoch, v in tail], [epoch for epoch, _v in tail]).slope
    return round(float(slope) * (tail[-1][0] - tail[0][0]), 6)


def unconverged(gained: float | None) -> bool:
    """Whether a run's tail gained more than :data:`THRESHOLD` (an unmeasured gain is not flagged)."""
    return gained is not None and gained > THRESHOLD


def convergence(rows: Iterable[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """One entry per distinct fine-tuning run behind ``rows`` (evaluation rows, transfer ones included):
    its labels, folder, epochs, last values of val top-1, the tail's gain and whether it is flagged. A run
    that logged no val/top1 is left out."""
    runs: dict[str, Mapping[str, Any]] = {}
    for row in rows:
        runs.setdefault(str(row["finetune"]), row)
    found = []
    for folder, row in runs.items():
        curve = val_curve(Path(folder))
        if not curve:
            continue
        gained = gain(curve)
        found.append(
            {
                **{k: row.get(k) for k in LABELS},
                "finetune": folder,
                "epochs": len(curve),
                "window": window(len(curve)),
                "last": [v for _epoch, v in curve[-LAST:]],
                "gain": gained,
                "flagged": unconverged(gained),
            }
        )
    found.sort(
        key=lambda r: (
            order((r["method"], r["attack"], r["radius"])),
            str(r["data"]),
            str(r["optim"]),
            r["layer_decay"] or 0.0,
            r["seed"] or 0,
        )
    )
    return found


def rule(runs: Sequence[Mapping[str, Any]]) -> str:
    """The rule, why, and how many runs it flags, in one sentence."""
    flagged = sum(r["flagged"] for r in runs)
    return (
        f"A fine-tuning run is flagged UNCONVERGED when its validation top-1 still gains more than "
        f"{100 * THRESHOLD:g} point over its last {100 * FRACTION:g} % of epochs (at least one), read from "
        f"their trend (the Theil-Sen slope times the epochs), since a "
        f"model compared before it has converged measures the fine-tuning's length, not the pre-training: "
        f"{flagged} of {len(runs)} run{'s' if len(runs) != 1 else ''} flagged."
    )


def note(run: Mapping[str, Any]) -> str:
    """The report's note on a flagged run."""
    return (
        f"fine-tuning {run['finetune']} has not converged: {100 * run['gain']:+.2f} points over its last "
        f"{run['window']} epoch{'s' if run['window'] != 1 else ''}"
    )
