"""Differences between two arms: paired on the images both saw, else unpaired.

An arm is one model's evaluation rows (its seeds). A quantity is what is compared: :data:`AVERAGE` (the
mean over the headline sets, Fig. 1), one set (``("set", name)``) or one robust radius (``("robust",
norm, radius)``). The difference is paired when every evaluation of both arms has an ``outcomes.npz``
(:mod:`advpt.outcomes`) of the same split holding the same images, in the same order, under every key
the quantity needs: its interval is then the stratified paired bootstrap's (:mod:`advpt.report.paired`),
with McNemar's exact p-value for one set of one seed per arm. Otherwise it is unpaired
(:func:`advpt.report.intervals.difference`), and where some outcomes were there, ``fallback`` says why.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from advpt.outcomes import OutcomeFile, read_outcomes
from advpt.report.intervals import Estimate, accuracy, average_of, difference
from advpt.report.paired import LEVEL, contrast_draws, observed, paired_bootstrap

Row = Mapping[str, Any]
Quantity = tuple[str, ...]
AVERAGE: Quantity = ("average",)


def estimate(rows: Sequence[Row], quantity: Quantity) -> Estimate:
    """One arm's ``quantity`` with its unpaired interval, as the report shows it."""
    kind = quantity[0]
    if kind == "average":
        return average_of(rows)
    if kind == "set":
        entries = [r["sets"][quantity[1]] for r in rows]
        return accuracy([(float(e["top1"]), int(e["images"])) for e in entries])
    if kind == "robust":
        entries = [r["robust"][quantity[1]][quantity[2]] for r in rows]
        return accuracy([(float(e["accuracy"]), int(e["images"])) for e in entries])
    raise ValueError(f"unknown quantity {quantity}")


def strata(row: Row, file: OutcomeFile, quantity: Quantity) -> list[tuple[str, float]] | None:
    """The outcome keys behind ``quantity`` of one evaluation and the weight of each key's accuracy
    (a corruption group: the mean of its subsets); ``None`` when the file lacks one."""
    kind = quantity[0]
    if kind == "robust":
        key = f"robust/{quantity[1]}/{quantity[2]}"
        return [(key, 1.0)] if key in file.outcomes else None
    names = list(row["sets"]) if kind == "average" else [quantity[1]]
    out: list[tuple[str, float]] = []
    for name in names:
        if name in file.outcomes:
            out.append((name, 1 / len(names)))
            continue
        subsets = [k for k in file.outcomes if k.startswith(f"{name}/") and not k.startswith("robust/")]
        if not subsets:
            return None
        out += [(k, 1 / (len(names) * len(subsets))) for k in subsets]
    return out


@functools.lru_cache(maxsize=256)
def _read(path: str, stamp: tuple[int, int]) -> OutcomeFile | None:
    return read_outcomes(path)


def outcomes_of(row: Row) -> OutcomeFile | None:
    """The outcomes of an evaluation row (``None`` without a readable file); read once per version."""
    path = row.get("outcomes")
    if not path:
        return None
    try:
        stat = Path(path).stat()
    except OSError:
        return None
    return _read(str(path), (stat.st_mtime_ns, stat.st_size))


def _pairing(arms: Sequence[Sequence[Row]], quantity: Quantity) -> tuple[list, list] | str | None:
    """Per arm, per seed the outcome arrays of every stratum, and the strata's weights; else why not
    (``None``: no evaluation of any arm has outcomes, nothing to say)."""
    rows = [r for arm in arms for r in arm]
    read = [outcomes_of(r) for r in rows]
    files = [f for f in read if f is not None]
    if not files:
        return None
    if len(files) < len(rows):
        lacking = next(r for r, f in zip(rows, read, strict=True) if f is None)
        return f"{lacking['evaluate']} has no readable outcomes.npz"
    ref, first = files[0], strata(rows[0], files[0], quantity)
    if first is None:
        return f"{rows[0]['evaluate']}'s outcomes.npz lacks the sets of {'/'.join(quantity)}"
    arrays = []
    for row, file in zip(rows, files, strict=True):
        if strata(row, file, quantity) != first:
            return f"{row['evaluate']} scored other sets than {rows[0]['evaluate']}"
        if not all(file.same_images(ref, key) for key, _ in first):
            return f"{row['evaluate']} and {rows[0]['evaluate']} scored different images"
        arrays.append([file.outcomes[key].correct for key, _ in first])
    edges = np.cumsum([0, *(len(arm) for arm in arms)])
    return [arrays[lo:hi] for lo, hi in zip(edges[:-1], edges[1:], strict=True)], [w for _, w in first]


def compare(a: Sequence[Row], b: Sequence[Row], quantity: Quantity = AVERAGE, seed: int = 0) -> Estimate:
    """``quantity(a) - quantity(b)``, paired where the outcomes allow (``interval`` says which)."""
    ours, theirs = estimate(a, quantity), estimate(b, quantity)
    pairing = _pairing([a, b], quantity)
    if not isinstance(pairing, tuple):
        return difference(ours, theirs, fallback=pairing)
    (outcomes_a, outcomes_b), weights = pairing
    paired = paired_bootstrap(outcomes_a, outcomes_b, weights, seed=seed)
    if not np.isclose(paired.point, ours.mean - theirs.mean, rtol=0, atol=1e-9):
        why = f"{a[0]['evaluate']} or {b[0]['evaluate']}: outcomes.npz disagrees with results.json"
        return difference(ours, theirs, fallback=why)
    images, seeds = min(ours.images, theirs.images), min(ours.seeds, theirs.seeds)
    return Estimate(paired.point, paired.lo, paired.hi, images, seeds, interval="paired", p=paired.p)


def contrast(
    arms: Sequence[Sequence[Row]], coefficients: Sequence[float], quantity: Quantity = AVERAGE, seed: int = 0
) -> Estimate:
    """``sum_j coefficients[j] * quantity(arms[j])`` (a difference of differences, or a mean of
    differences over several arms), paired over the images all arms saw where the outcomes allow; else
    unpaired, the arms' variances added with the squares of their coefficients."""
    ests = [estimate(arm, quantity) for arm in arms]
    point = sum(c * e.mean for c, e in zip(coefficients, ests, strict=True))
    images, seeds = min(e.images for e in ests), min(e.seeds for e in ests)
    pairing = _pairing(arms, quantity)
    if isinstance(pairing, tuple):
        outcomes, weights = pairing
        draws = contrast_draws(outcomes, coefficients, weights, rng=np.random.default_rng(seed))
        if np.isclose(
            sum(c * observed(o, weights) for c, o in zip(coefficients, outcomes, strict=True)),
            point,
            rtol=0,
            atol=1e-9,
        ):
            lo, hi = np.quantile(draws, [(1 - LEVEL) / 2, (1 + LEVEL) / 2])
            return Estimate(point, float(lo), float(hi), images, seeds, interval="paired")
        pairing = "an outcomes.npz disagrees with its results.json"
    half = sum((c * e.half) ** 2 for c, e in zip(coefficients, ests, strict=True)) ** 0.5
    return Estimate(point, point - half, point + half, images, seeds, interval="unpaired", fallback=pairing)


def fallbacks(estimates: Sequence[Estimate | None]) -> list[str]:
    """The report's notes for differences left unpaired although some outcomes were there (each once)."""
    return list(dict.fromkeys(f"unpaired interval: {e.fallback}" for e in estimates if e and e.fallback))
