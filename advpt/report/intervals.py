"""Estimates and their unpaired 95 % intervals: one accuracy, a mean over seeds, an average over sets.

One accuracy on ``n`` images, from one seed, gets the Wilson interval. Anything built from several
numbers (a mean over seeds, an average over evaluation sets) gets a normal interval, 1.96 standard
errors, whose variance adds the test-set sampling (binomial, p(1-p)/n per set) and, with two seeds or
more, the spread between seeds (s^2/k). Sets are treated as independent. A difference between two arms
adds both arms' variances (:func:`difference`): the fallback for arms whose evaluations have no
per-image outcomes to pair (:mod:`advpt.report.differences`).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from statistics import mean, variance
from typing import Any

Z = 1.96


@dataclass(frozen=True)
class Estimate:
    """A mean with its 95 % interval, the images behind each seed's number and the number of seeds.

    A difference between arms also says which interval it has (``interval``: ``"paired"`` or
    ``"unpaired"``), McNemar's exact p-value where it applies (``p``: one set of one seed per arm), and why
    it is unpaired although some of its evaluations have outcomes (``fallback``).
    """

    mean: float
    lo: float
    hi: float
    images: int
    seeds: int
    interval: str | None = None
    p: float | None = None
    fallback: str | None = None

    @property
    def half(self) -> float:
        return (self.hi - self.lo) / 2

    def pct(self) -> str:
        """In percent: ``m ± h`` for a symmetric interval, ``m [lo, hi]`` for an asymmetric one (Wilson,
        a bootstrap's percentiles)."""
        below, above = self.mean - self.lo, self.hi - self.mean
        if abs(below - above) < 5e-4:
            return f"{100 * self.mean:.2f} ± {100 * self.half:.2f}"
        return f"{100 * self.mean:.2f} [{100 * self.lo:.1f}, {100 * self.hi:.1f}]"

    def stated(self) -> str:
        """A difference as the report states it: in points, which interval, McNemar's p where there is one."""
        text = self.pct() if self.interval is None else f"{self.pct()} {self.interval}"
        return text if self.p is None else f"{text}, McNemar p={self.p:.2g}"


def wilson(p: float, n: int) -> tuple[float, float]:
    """The Wilson score 95 % interval of a proportion ``p`` observed on ``n`` trials."""
    if n <= 0:
        return (0.0, 1.0)
    centre = (p + Z * Z / (2 * n)) / (1 + Z * Z / n)
    half = Z * math.sqrt(p * (1 - p) / n + Z * Z / (4 * n * n)) / (1 + Z * Z / n)
    return (max(0.0, centre - half), min(1.0, centre + half))


def binomial_var(p: float, n: int) -> float:
    return p * (1 - p) / n if n > 0 else 0.25


def combine(values: Sequence[float], sampling_vars: Sequence[float], images: int) -> Estimate:
    """Mean over seeds of per-seed ``values``, each with its test-sampling variance."""
    k = len(values)
    m = mean(values)
    var = sum(sampling_vars) / (k * k)
    if k >= 2:
        var += variance(values) / k
    half = Z * math.sqrt(max(var, 0.0))
    return Estimate(m, m - half, m + half, images, k)


def accuracy(pairs: Sequence[tuple[float, int]]) -> Estimate:
    """One accuracy per seed, as (top-1, images)."""
    if len(pairs) == 1:
        p, n = pairs[0]
        lo, hi = wilson(p, n)
        return Estimate(p, lo, hi, n, 1)
    return combine([p for p, _ in pairs], [binomial_var(p, n) for p, n in pairs], min(n for _, n in pairs))


def set_average(sets: Mapping[str, Mapping[str, Any]]) -> tuple[float, float, int]:
    """Mean top-1 over a run's headline sets, its sampling variance, and the images behind it."""
    values = [(float(e["top1"]), int(e["images"])) for e in sets.values()]
    m = len(values)
    avg = sum(p for p, _ in values) / m
    var = sum(binomial_var(p, n) for p, n in values) / (m * m)
    return avg, var, sum(n for _, n in values)


def average_of(rows: Sequence[Mapping[str, Any]]) -> Estimate:
    """The average over the headline sets of one model's evaluation rows (its seeds)."""
    stats = [set_average(r["sets"]) for r in rows]
    return combine([a for a, _, _ in stats], [v for _, v, _ in stats], min(n for _, _, n in stats))


def difference(a: Estimate, b: Estimate, fallback: str | None = None) -> Estimate:
    """``a - b`` with the unpaired interval: the two arms' variances added, as if independent."""
    d = a.mean - b.mean
    half = math.sqrt(a.half**2 + b.half**2)
    images, seeds = min(a.images, b.images), min(a.seeds, b.seeds)
    return Estimate(d, d - half, d + half, images, seeds, interval="unpaired", fallback=fallback)
