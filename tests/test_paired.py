"""Paired differences (advpt.report.paired): narrower than unpaired on correlated arms, honest coverage,
stratified by set, seeds resampled, McNemar's exact test."""

from __future__ import annotations

import math

import numpy as np
import pytest

from advpt.report.intervals import accuracy, difference
from advpt.report.paired import mcnemar, paired_bootstrap, paired_draws


def correlated_arms(rng: np.random.Generator, n: int, probs: tuple[float, float, float, float]):
    """Outcomes of two arms on ``n`` images: per image both right, only A, only B, both wrong with
    ``probs``; the true difference of accuracies is ``probs[1] - probs[2]``."""
    kind = rng.choice(4, size=n, p=probs)
    return np.isin(kind, (0, 1)), np.isin(kind, (0, 2))


def test_paired_interval_is_narrower_than_unpaired_and_covers_the_true_difference() -> None:
    probs = (0.70, 0.08, 0.04, 0.18)  # A 78 %, B 74 %: the arms mostly agree
    truth, n, draws = probs[1] - probs[2], 500, 200
    rng = np.random.default_rng(13)
    paired_half, unpaired_half, covered, unpaired_covered = [], [], 0, 0
    for draw in range(draws):
        a, b = correlated_arms(rng, n, probs)
        paired = paired_bootstrap([[a]], [[b]], [1.0], seed=draw)
        unpaired = difference(accuracy([(a.mean(), n)]), accuracy([(b.mean(), n)]))
        assert paired.point == pytest.approx(a.mean() - b.mean(), abs=1e-12)
        assert paired.p is not None  # one set of one seed: McNemar's p comes with it
        paired_half.append((paired.hi - paired.lo) / 2)
        unpaired_half.append(unpaired.half)
        covered += paired.lo <= truth <= paired.hi
        unpaired_covered += unpaired.lo <= truth <= unpaired.hi
    paired_half, unpaired_half = np.array(paired_half), np.array(unpaired_half)
    assert np.mean(paired_half < unpaired_half) >= 0.99  # in nearly every draw
    assert paired_half.mean() < 0.7 * unpaired_half.mean()  # sqrt(0.12 / 0.36): about 0.58
    # about 95 %: 200 draws put a binomial standard error of 1.5 points on the coverage
    assert 0.90 <= covered / draws <= 0.99
    assert unpaired_covered >= covered  # the unpaired interval is the conservative one


def stratum(rng: np.random.Generator, n: int, only_a: float, only_b: float) -> tuple[np.ndarray, np.ndarray]:
    """``n`` images of one set: a fraction ``only_a`` right for A alone, ``only_b`` for B alone, the rest
    right for both or neither (half each), shuffled."""
    k_a, k_b = round(n * only_a), round(n * only_b)
    both = (n - k_a - k_b) // 2
    a = np.array([True] * k_a + [False] * k_b + [True] * both + [False] * (n - k_a - k_b - both))
    b = np.array([False] * k_a + [True] * k_b + [True] * both + [False] * (n - k_a - k_b - both))
    order = rng.permutation(n)
    return a[order], b[order]


def test_stratified_bootstrap_has_the_variance_of_the_stratified_estimator() -> None:
    # Two sets of very different sizes and opposite differences, averaged with equal weights.
    rng = np.random.default_rng(0)
    sets = [stratum(rng, 200, 0.60, 0.0), stratum(rng, 2000, 0.02, 0.12)]
    weights = [0.5, 0.5]
    d = [a.astype(float) - b.astype(float) for a, b in sets]
    # the estimator sum_s w_s mean(d_s): its variance, each set's size fixed
    stratified = sum(w * w * x.var() / len(x) for w, x in zip(weights, d, strict=True))
    # pooling the 2200 images and resampling them together would let each set's share vary too
    pooled = np.concatenate([w * sum(map(len, d)) / len(x) * x for w, x in zip(weights, d, strict=True)])
    unstratified = pooled.var() / len(pooled)
    assert unstratified > 1.5 * stratified  # the wrong variance would be far off

    draws = paired_draws(
        [[a for a, _ in sets]], [[b for _, b in sets]], weights, 20_000, np.random.default_rng(1)
    )
    assert draws.mean() == pytest.approx(sum(w * x.mean() for w, x in zip(weights, d, strict=True)), abs=1e-3)
    assert draws.std() == pytest.approx(math.sqrt(stratified), rel=0.03)
    paired = paired_bootstrap([[a for a, _ in sets]], [[b for _, b in sets]], weights)
    assert paired.p is None  # two sets: no McNemar
    assert (paired.hi - paired.lo) / 2 == pytest.approx(1.96 * math.sqrt(stratified), rel=0.06)


def test_seeds_are_resampled_and_their_spread_widens_the_interval() -> None:
    rng = np.random.default_rng(2)
    a, b = correlated_arms(rng, 1000, (0.70, 0.08, 0.04, 0.18))
    same = paired_bootstrap([[a], [a], [a]], [[b], [b], [b]], [1.0])
    one = paired_bootstrap([[a]], [[b]], [1.0])
    assert same.point == pytest.approx(one.point) and same.p is None
    assert (same.hi - same.lo) == pytest.approx(one.hi - one.lo, rel=0.1)
    # A's second seed is much worse: the mean over seeds drops and the seeds' spread widens the interval
    worse = a & (rng.random(1000) < 0.7)
    spread = paired_bootstrap([[a], [worse], [a]], [[b], [b], [b]], [1.0])
    assert spread.point == pytest.approx((2 * a.mean() + worse.mean()) / 3 - b.mean())
    assert spread.hi - spread.lo > 3 * (one.hi - one.lo)


def test_bootstrap_is_seeded_and_fast_on_ten_thousand_images_in_76_sets() -> None:
    rng = np.random.default_rng(3)
    strata = [correlated_arms(rng, n, (0.6, 0.1, 0.1, 0.2)) for n in [10_000] + [50] * 75]
    weights = [0.5] + [0.5 / 75] * 75
    a = [[x for x, _ in strata], [x for x, _ in strata]]
    b = [[y for _, y in strata]]
    first = paired_bootstrap(a, b, weights, seed=7)
    assert paired_bootstrap(a, b, weights, seed=7) == first
    assert paired_bootstrap(a, b, weights, seed=8) != first


def test_unpaired_arms_are_refused() -> None:
    a = np.ones(10, dtype=bool)
    with pytest.raises(ValueError, match="not paired"):
        paired_bootstrap([[a]], [[a[:9]]], [1.0])
    with pytest.raises(ValueError, match="not paired"):
        mcnemar(a, a[:9])


def test_mcnemar_exact_p_value_is_the_binomial_tail_of_the_discordant_pairs() -> None:
    # 8 discordant images: A alone right on 1, B alone right on 7; 20 concordant ones do not count
    a = np.array([True] * 1 + [False] * 7 + [True] * 12 + [False] * 8)
    b = np.array([False] * 1 + [True] * 7 + [True] * 12 + [False] * 8)
    assert mcnemar(a, b) == pytest.approx(2 * (1 + 8) / 2**8)  # 2 P[X <= 1], X ~ Bin(8, 1/2)
    assert mcnemar(b, a) == mcnemar(a, b)
    assert mcnemar(a, a) == 1.0  # no discordant image
    balanced = np.array([True, False] * 5)
    assert mcnemar(balanced, ~balanced) == 1.0  # 5 against 5: capped at 1
    scipy_stats = pytest.importorskip("scipy.stats")
    for k, m in ((0, 5), (3, 20), (40, 100)):
        x = np.array([True] * k + [False] * (m - k))
        assert mcnemar(x, ~x) == pytest.approx(scipy_stats.binomtest(k, m, 0.5).pvalue, rel=1e-9)
