"""Paired differences: two arms scored on the same images, compared image by image.

Two models evaluated on the same images tend to miss the same hard images, so the difference of their
accuracies varies far less than their two sampling variances added, the unpaired interval of
:func:`advpt.report.intervals.difference`. Resampling the images (the same resampled images for both
arms) measures the difference's own variance:

* :func:`paired_bootstrap`: a quantity that is a weighted sum of per-stratum accuracies (one set, or the
  average over sets with a corruption group counting as the mean of its subsets), for each arm the mean
  over its seeds; its difference between two arms with a 95 % percentile interval. Images are resampled
  within each stratum (the set sizes are fixed by the evaluation, not drawn), seeds within each arm.
  Seeded, so a report is the same every time it is drawn.
* :func:`mcnemar`: McNemar's exact test for one set of one seed per arm, a two-sided binomial test on the
  images exactly one arm got right.

Only the images' outcome patterns matter: within a stratum, resampling ``n`` images with replacement
is a multinomial draw over the distinct rows of the ``n x seeds`` outcome matrix (at most ``2^seeds``),
so 2000 resamples of 10,000 images cost a few multinomial draws, not 20 million indices.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

RESAMPLES = 2000
LEVEL = 0.95


@dataclass(frozen=True)
class Paired:
    """A paired difference: the observed value, its percentile interval, McNemar's p where it applies."""

    point: float
    lo: float
    hi: float
    p: float | None = None


def _check(
    a: Sequence[Sequence[np.ndarray]], b: Sequence[Sequence[np.ndarray]], weights: Sequence[float]
) -> None:
    if not a:
        raise ValueError("the first arm has no seed")
    for arm in (*a, *b):
        if len(arm) != len(weights):
            raise ValueError(f"{len(arm)} strata for {len(weights)} weights")
        for s, outcomes in enumerate(arm):
            if outcomes.shape != a[0][s].shape:
                raise ValueError(f"stratum {s}: {outcomes.shape} images against {a[0][s].shape}: not paired")


def paired_draws(
    a: Sequence[Sequence[np.ndarray]],
    b: Sequence[Sequence[np.ndarray]],
    weights: Sequence[float],
    resamples: int = RESAMPLES,
    rng: np.random.Generator | None = None,
) -> np.ndarray:
    """``resamples`` bootstrap draws of ``quantity(a) - quantity(b)``.

    ``a[seed][stratum]`` and ``b[seed][stratum]``: per-image outcomes (bool), every seed of both arms on
    the same images of each stratum, in the same order; ``quantity`` of one seed = ``sum_s weights[s] *
    mean(outcomes[s])``, of an arm the mean over its seeds. ``b`` may be empty (the draws of ``a`` alone).
    """
    return contrast_draws([a, b] if b else [a], [1.0, -1.0] if b else [1.0], weights, resamples, rng)


def contrast_draws(
    arms: Sequence[Sequence[Sequence[np.ndarray]]],
    coefficients: Sequence[float],
    weights: Sequence[float],
    resamples: int = RESAMPLES,
    rng: np.random.Generator | None = None,
) -> np.ndarray:
    """``resamples`` bootstrap draws of ``sum_j coefficients[j] * quantity(arms[j])``, every arm's seeds
    scored on the same images (``arms[j][seed][stratum]``, as in :func:`paired_draws`): the same
    resampled images for every arm, the seeds resampled within each arm. A contrast of more than two arms
    (a difference of differences: does one gap shrink?) keeps the pairing of all of them."""
    if len(arms) != len(coefficients) or not arms:
        raise ValueError(f"{len(arms)} arms for {len(coefficients)} coefficients")
    for arm in arms:
        _check(arms[0], arm, weights)
    rng = rng if rng is not None else np.random.default_rng(0)
    seeds = [len(arm) for arm in arms]
    acc = np.zeros((resamples, sum(seeds)))  # each seed's quantity on each resample of the images
    for s, weight in enumerate(weights):
        n = len(arms[0][0][s])
        if n == 0 or weight == 0:
            continue
        columns = np.stack([seed[s] for arm in arms for seed in arm], axis=1).astype(bool)
        patterns, counts = _patterns(columns)
        drawn = rng.multinomial(n, counts / n, size=resamples)  # [resamples, patterns]
        acc += weight * (drawn @ patterns.astype(float)) / n
    edges = np.cumsum([0, *seeds])
    return sum(
        c * _seed_mean(acc[:, lo:hi], rng)
        for c, lo, hi in zip(coefficients, edges[:-1], edges[1:], strict=True)
    )


def _patterns(columns: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The distinct rows of a bool ``[images, seeds]`` matrix and how many images have each (rows coded
    as integers: 50x faster than ``np.unique(axis=0)``)."""
    k = columns.shape[1]
    if k > 62:
        return np.unique(columns, axis=0, return_counts=True)
    bits = np.left_shift(1, np.arange(k, dtype=np.int64))
    codes, counts = np.unique(columns.astype(np.int64) @ bits, return_counts=True)
    return (codes[:, None] & bits) > 0, counts


def _seed_mean(acc: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Per resample, the mean over the arm's seeds, themselves resampled when there are several."""
    k = acc.shape[1]
    if k == 1:
        return acc[:, 0]
    pick = rng.integers(0, k, size=acc.shape)
    return np.take_along_axis(acc, pick, axis=1).mean(axis=1)


def observed(a: Sequence[Sequence[np.ndarray]], weights: Sequence[float]) -> float:
    """An arm's quantity: the mean over its seeds of ``sum_s weights[s] * mean(outcomes[s])``."""
    per_seed = [
        sum(w * float(np.mean(o)) for w, o in zip(weights, seed, strict=True) if len(o)) for seed in a
    ]
    return float(np.mean(per_seed))


def paired_bootstrap(
    a: Sequence[Sequence[np.ndarray]],
    b: Sequence[Sequence[np.ndarray]],
    weights: Sequence[float],
    resamples: int = RESAMPLES,
    seed: int = 0,
) -> Paired:
    """The difference ``quantity(a) - quantity(b)`` (see :func:`paired_draws`) and its 95 % percentile
    interval over ``resamples`` stratified resamples of the images (and of the seeds, when an arm has
    several), drawn from a generator seeded with ``seed``; with one stratum and one seed per arm, also
    McNemar's exact p-value."""
    draws = paired_draws(a, b, weights, resamples, np.random.default_rng(seed))
    lo, hi = np.quantile(draws, [(1 - LEVEL) / 2, (1 + LEVEL) / 2])
    point = observed(a, weights) - (observed(b, weights) if b else 0.0)
    p = mcnemar(a[0][0], b[0][0]) if len(weights) == 1 and len(a) == 1 and len(b) == 1 else None
    return Paired(point, float(lo), float(hi), p)


def mcnemar(a: np.ndarray, b: np.ndarray) -> float:
    """McNemar's exact two-sided p-value: of the images exactly one of ``a``, ``b`` got right, are the
    two arms' shares compatible with a fair coin? ``min(1, 2 P[X <= min(b01, b10)])``, X ~ Bin(b01 + b10, 1/2)."""
    from scipy.stats import binom

    a, b = np.asarray(a, dtype=bool), np.asarray(b, dtype=bool)
    if a.shape != b.shape:
        raise ValueError(f"{a.shape} against {b.shape}: not paired")
    only_a, only_b = int(np.sum(a & ~b)), int(np.sum(~a & b))
    discordant = only_a + only_b
    if discordant == 0:
        return 1.0
    return float(min(1.0, 2.0 * binom.cdf(min(only_a, only_b), discordant, 0.5)))
