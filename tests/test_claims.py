"""The claims table: each of the paper's claims judged by the interval of the difference that tests it."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
from helpers import chain_with_outcomes

from advpt.report import aggregate as agg
from advpt.report import build_report
from advpt.report.claims import CONTRADICTED, INCONCLUSIVE, REPRODUCED, UNTESTABLE, every, judge, verdict
from advpt.report.collect import collect
from advpt.report.differences import AVERAGE, compare, contrast, estimate
from advpt.report.intervals import Estimate


def test_a_verdict_is_read_from_the_interval_never_from_the_point() -> None:
    assert verdict(Estimate(0.05, -0.01, 0.11, 100, 1)) == INCONCLUSIVE  # a positive point, 0 inside
    assert verdict(Estimate(0.002, 0.001, 0.004, 100, 1)) == REPRODUCED  # tiny, but 0 outside
    assert verdict(Estimate(-0.02, -0.04, -0.001, 100, 1)) == CONTRADICTED
    assert verdict(Estimate(0.0, 0.0, 0.0, 100, 1)) == INCONCLUSIVE  # an interval touching 0 holds it


def test_a_claim_about_every_case_needs_all_to_reproduce_it_and_one_to_contradict_it() -> None:
    assert every([REPRODUCED, REPRODUCED]) == REPRODUCED
    assert every([REPRODUCED, INCONCLUSIVE]) == INCONCLUSIVE
    assert every([REPRODUCED, CONTRADICTED, INCONCLUSIVE]) == CONTRADICTED
    assert every([]) == INCONCLUSIVE


# -- a grid whose answers are known --------------------------------------------------------------------
SKILL = {  # (method, attack, eps, layer decay) -> the accuracy the model is built to have
    ("mae", "none", 0, 0.85): 0.55,
    ("mae", "l2", 0.5, 0.85): 0.80,  # MAE gains, at the smaller radius
    ("mae", "l2", 0.5, 0.65): 0.78,
    ("mae", "l2", 2.0, 0.85): 0.62,
    ("rotnet", "none", 0, 0.85): 0.55,
    ("rotnet", "l2", 0.5, 0.85): 0.35,  # RotNet loses at the smaller radius, and does best at the larger
    ("rotnet", "l2", 2.0, 0.85): 0.45,
    ("rotnet", "l2", 2.0, 0.65): 0.43,
}


def _grid(root: Path, transfer: bool = True) -> Path:
    rng = np.random.default_rng(0)
    difficulty = {"builtin": rng.random(1500), "corruptions/fog/1": rng.random(500)}
    difficulty["robust/l2/0.5"] = rng.random(1000)
    for (method, attack, eps, decay), skill in SKILL.items():
        name = f"{method}-{attack}-{eps}"
        chain_with_outcomes(root, name, method, attack, eps, skill, difficulty, rng, decay=decay)
        if transfer and decay == 0.85 and eps in (0, 0.5) and method == "mae":
            # Table 1 with SGD: MAE's best l2 radius (0.5) against its nominal model
            chain_with_outcomes(
                root, name, method, attack, eps, skill - 0.1, difficulty, rng, optim="sgd_transfer"
            )
    return root


def test_claims_on_a_grid_with_known_answers_get_the_known_verdicts(tmp_path: Path) -> None:
    rows = collect([_grid(tmp_path / "runs")])
    headline, _ = agg.headline_rows(rows)
    claims = {c.text.split(" (")[0]: c for c in judge(rows, headline)}

    gains = claims["every method gains from adversarial pre-training"]
    assert [t.verdict for t in gains.tests] == [CONTRADICTED, REPRODUCED]  # RotNet loses, MAE gains
    assert gains.verdict == CONTRADICTED  # one method that loses is enough
    assert all(t.estimate.interval == "paired" for t in gains.tests)

    radius = claims["the best radius differs by method"]
    assert [t.reading for t in radius.tests] == ["larger radius better", "smaller radius better"]
    assert radius.verdict == REPRODUCED

    (gap,) = claims["adversarial pre-training narrows the gap between methods"].tests
    # nominal: MAE and RotNet equal; adversarial: MAE 0.80 against RotNet 0.45: the gap widens by ~0.35
    assert gap.estimate.mean == pytest.approx(-0.35, abs=0.06) and gap.verdict == CONTRADICTED

    decay = claims["a smaller layer decay keeps more l2 robustness after nominal fine-tuning"]
    # both selected models are 0.02 less accurate at γ 0.65: less robust, but within the noise or below
    assert decay.tests[0].estimate.mean < 0 and decay.verdict in (CONTRADICTED, INCONCLUSIVE)

    transfer = claims["adversarial pre-training improves transfer"].tests
    (sgd,) = [t for t in transfer if "sgd_transfer" in t.label]
    assert sgd.estimate.mean == pytest.approx(0.25, abs=0.05) and sgd.verdict == REPRODUCED


def test_a_contrast_of_two_arms_is_their_paired_difference(tmp_path: Path) -> None:
    headline, _ = agg.headline_rows(collect([_grid(tmp_path / "runs", transfer=False)]))
    best = agg.best_decay(headline)
    a, b = best[("mae", "l2", "0.5")][2], best[("mae", "none", "-")][2]
    two = contrast([a, b], [1.0, -1.0], AVERAGE)
    pair = compare(a, b, AVERAGE)
    assert (two.mean, two.lo, two.hi, two.interval) == pytest.approx((pair.mean, pair.lo, pair.hi, "paired"))


def test_a_difference_of_differences_is_paired_and_narrower_than_unpaired(tmp_path: Path) -> None:
    headline, _ = agg.headline_rows(collect([_grid(tmp_path / "runs", transfer=False)]))
    best = agg.best_decay(headline)
    keys = [("mae", "l2", "0.5"), ("mae", "none", "-"), ("rotnet", "l2", "2"), ("rotnet", "none", "-")]
    arms = [best[k][2] for k in keys]
    coefficients = [1.0, -1.0, -1.0, 1.0]
    est = contrast(arms, coefficients, AVERAGE)
    means = [estimate(arm, AVERAGE) for arm in arms]
    assert est.mean == pytest.approx(
        sum(c * m.mean for c, m in zip(coefficients, means, strict=True)), abs=1e-12
    )
    unpaired_half = sum(m.half**2 for m in means) ** 0.5
    assert est.interval == "paired" and est.half < 0.7 * unpaired_half


def test_summary_opens_with_the_claims_table_and_claims_csv_has_a_row_per_difference(tmp_path: Path) -> None:
    build_report([_grid(tmp_path / "runs")], tmp_path / "report", note=lambda _m: None)
    summary = (tmp_path / "report" / "summary.md").read_text().splitlines()
    assert summary[:3] == ["# advpt report", "", "## The paper's claims"]
    assert summary[4].startswith("| claim |") and "**contradicted**" in summary[6]
    rows = list(csv.DictReader((tmp_path / "report" / "claims.csv").read_text().splitlines()))
    assert len(rows) == 2 + 2 + 1 + 1 + 2  # gains, radii, gap, robustness at l2 0.5, transfer x 2 optimisers
    assert {r["difference_interval"] for r in rows} == {"paired"}


def _judged(root: Path, skills: dict, rng: np.random.Generator) -> list:
    """The claims of one synthetic grid: each (method, attack, eps) arm scored with its skill on the same
    images (a difficulty per image of the test split, one corruption and one l2 radius)."""
    difficulty = {"builtin": rng.random(1500), "corruptions/fog/1": rng.random(500)}
    difficulty["robust/l2/0.5"] = rng.random(1000)
    for (method, attack, eps), skill in skills.items():
        chain_with_outcomes(root, f"{method}-{attack}-{eps}", method, attack, eps, skill, difficulty, rng)
    rows = collect([root])
    headline, _ = agg.headline_rows(rows)
    return judge(rows, headline)


def test_the_premise_opens_the_claims_and_a_method_it_fails_for_is_untestable(tmp_path: Path) -> None:
    skills = {  # MAE's nominal pre-training beats scratch (0.40) by far, RotNet's does not
        ("scratch", "none", 0): 0.40,
        ("mae", "none", 0): 0.60,
        ("mae", "l2", 0.5): 0.70,
        ("rotnet", "none", 0): 0.40,
        ("rotnet", "l2", 0.5): 0.20,
    }
    claims = _judged(tmp_path / "runs", skills, np.random.default_rng(1))
    first = claims[0]
    assert first.text.startswith("pre-training helps here")
    assert {t.label: t.verdict for t in first.tests} == {
        "MAE nominal − scratch": REPRODUCED,
        "RotNet nominal − scratch": INCONCLUSIVE,
    }
    gains = next(c for c in claims if c.text.startswith("every method gains"))
    # judged on MAE alone (RotNet's loss would contradict it), RotNet named as untestable
    assert [t.label.split(" ")[0] for t in gains.tests] == ["MAE"] and gains.verdict == REPRODUCED
    assert gains.untestable == ("RotNet",)

    # where the premise fails for every method, the claims about adversarial pre-training are untestable
    flat = {arm: 0.40 for arm in [("scratch", "none", 0), ("mae", "none", 0), ("mae", "l2", 0.5)]}
    claims = _judged(tmp_path / "flat", flat, np.random.default_rng(3))
    assert claims[0].verdict != REPRODUCED
    assert all(c.verdict == UNTESTABLE and not c.tests for c in claims[1:])
    assert {c.text for c in claims[1:]} >= {"every method gains from adversarial pre-training"}


def test_a_method_the_table_does_not_know_is_judged_not_dropped(tmp_path: Path) -> None:
    skills = {  # "toy" has no entry (no label, no order) in advpt.method_table; it gains, as MAE does
        ("scratch", "none", 0): 0.30,
        ("mae", "none", 0): 0.50,
        ("mae", "l2", 0.5): 0.70,
        ("toy", "none", 0): 0.50,
        ("toy", "l2", 0.5): 0.70,
    }
    claims = _judged(tmp_path / "runs", skills, np.random.default_rng(2))
    assert {t.label for t in claims[0].tests} == {"MAE nominal − scratch", "toy nominal − scratch"}
    gains = next(c for c in claims if c.text.startswith("every method gains"))
    # the table's methods first, in the paper's order, then the unknown one
    assert [t.label for t in gains.tests] == ["MAE l2 0.5 − MAE nominal", "toy l2 0.5 − toy nominal"]
    assert gains.verdict == REPRODUCED and gains.untestable == ()
