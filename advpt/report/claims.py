"""The paper's claims, one by one: the difference between arms that tests each, and what its interval says.

Each claim is tested by one or more differences (:mod:`advpt.report.differences`: paired over the images
the arms share where their evaluations wrote outcomes), and a difference's verdict is read from its 95 %
interval alone, never from its point estimate: *reproduced* when the whole interval lies on the claim's
side of 0, *contradicted* when it lies on the other side, *inconclusive* when it holds 0. A claim about
every method (or every radius, every optimiser) is reproduced when all its differences are, contradicted
when one is; the claim that the best radius differs by method is reproduced when, for one norm, one
method significantly prefers the smaller radius and another the larger.

The arms compared are chosen by their point estimates on the same test sets (each method's best
adversarial arm, each arm's best layer decay), which leans the differences towards the claims; the
report says so beside the table.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from advpt.method_table import SCRATCH, SCRATCH_LABEL
from advpt.names import ATTACK_LABEL, METHOD_LABEL, NORMS, arm_label
from advpt.report import aggregate as agg
from advpt.report.collect import radius_value
from advpt.report.differences import AVERAGE, compare, contrast
from advpt.report.intervals import Estimate
from advpt.report.tables import md_table

Row = Mapping[str, Any]
REPRODUCED, CONTRADICTED, INCONCLUSIVE = "reproduced", "contradicted", "inconclusive"
UNTESTABLE = "untestable here"
"""A claim about adversarial pre-training where the premise (pre-training helps at all) fails for every
method it is about."""


def verdict(est: Estimate) -> str:
    """What a difference's 95 % interval says of a claim that it is positive."""
    if est.lo > 0:
        return REPRODUCED
    if est.hi < 0:
        return CONTRADICTED
    return INCONCLUSIVE


def every(verdicts: Sequence[str]) -> str:
    """A claim that holds for every case: reproduced if all are, contradicted if any is."""
    if not verdicts:
        return INCONCLUSIVE
    if CONTRADICTED in verdicts:
        return CONTRADICTED
    return REPRODUCED if all(v == REPRODUCED for v in verdicts) else INCONCLUSIVE


@dataclass
class Test:
    """One difference behind a claim: what it compares, its estimate (in the claim's direction)."""

    label: str
    estimate: Estimate
    # how the table reads each verdict of this difference (the claim's own words by default)
    readings: tuple[str, str, str] = (REPRODUCED, CONTRADICTED, INCONCLUSIVE)

    @property
    def verdict(self) -> str:
        return verdict(self.estimate)

    @property
    def reading(self) -> str:
        return dict(zip((REPRODUCED, CONTRADICTED, INCONCLUSIVE), self.readings, strict=True))[self.verdict]


@dataclass
class Claim:
    """A claim of the paper, where in the paper it is made, the differences that test it, the verdict, and
    the methods it could not be judged for (pre-training does not help them here)."""

    text: str
    source: str
    tests: list[Test]
    verdict: str
    untestable: tuple[str, ...] = ()


def _for_every(text: str, source: str, tests: list[Test]) -> Claim | None:
    """A claim that holds for every case its tests cover (``None``: no case to test)."""
    return Claim(text, source, tests, every([t.verdict for t in tests])) if tests else None


def _label(key: agg.Key) -> str:
    return arm_label(*key)


def _best(headline: Sequence[Row]) -> dict[agg.Key, tuple[float, Estimate, list]]:
    return {k: v for k, v in agg.best_decay(headline).items() if k[0] != SCRATCH}


def _best_adversarial(best: Mapping[agg.Key, tuple[float, Estimate, list]], method: str) -> agg.Key | None:
    keys = [k for k in best if k[0] == method and k[1] != "none"]
    return max(keys, key=lambda k: best[k][1].mean) if keys else None


def _methods(best: Mapping[agg.Key, Any]) -> list[str]:
    """The methods with a nominal and an adversarial arm (every method found, labelled or not)."""
    return [
        m
        for m in agg.methods_in(k[0] for k in best)
        if (m, "none", "-") in best and any(k[0] == m and k[1] != "none" for k in best)
    ]


def premise(headline: Sequence[Row]) -> Claim | None:
    """Pre-training helps here: each method's nominal arm (at its best layer decay) − the scratch baseline
    trained on the same labels. Every claim of the paper is about how much pre-training helps; where it does
    not help at all, whether adversarial pre-training helps more cannot be seen."""
    everything = agg.best_decay(headline)
    scratch = next((k for k in everything if k[0] == SCRATCH), None)
    if scratch is None:
        return None
    tests = [
        Test(f"{_label(key)} − {SCRATCH_LABEL}", compare(everything[key][2], everything[scratch][2], AVERAGE))
        for key in sorted((k for k in everything if k[1] == "none" and k[0] != SCRATCH), key=agg.order)
    ]
    if not tests:
        return None
    return Claim(
        "pre-training helps here (the premise of every claim below)",
        "Fig. 1's 0 line",
        tests,
        every([t.verdict for t in tests]),
    )


def premise_by_set(headline: Sequence[Row]) -> list[str]:
    """Beside the premise, not judged: each method's nominal arm − scratch on each test set on its own (the
    clean test split, each shift), so a reader sees where the average's difference comes from."""
    everything = agg.best_decay(headline)
    scratch = next((k for k in everything if k[0] == SCRATCH), None)
    if scratch is None:
        return []
    base = everything[scratch][2]
    shared = [n for n in base[0]["sets"] if "/" not in n and all(n in r["sets"] for r in base)]
    if len(shared) < 2:  # one set: the average is that set
        return []
    lines = []
    for key in sorted((k for k in everything if k[1] == "none" and k[0] != SCRATCH), key=agg.order):
        arm = everything[key][2]
        sets = [n for n in shared if all(n in r["sets"] for r in arm)]
        found = [f"{n} {compare(arm, base, ('set', n)).stated()}" for n in sets]
        lines.append(f"- {_label(key)} − {SCRATCH_LABEL}: " + "; ".join(found))
    return [
        "The premise on each test set alone (points, 95 % interval; the verdict above is the average's):",
        "",
        *lines,
    ]


def premise_holds(claim: Claim | None) -> set[str] | None:
    """The methods whose nominal pre-training beats scratch significantly (``None``: no scratch arm to
    judge the premise by, so no method is set aside)."""
    if claim is None:
        return None
    nominal = f" {ATTACK_LABEL['none']} − {SCRATCH_LABEL}"  # a test's label: "Sup-PT nominal − scratch"
    return {t.label.removesuffix(nominal) for t in claim.tests if t.verdict == REPRODUCED}


def gains(headline: Sequence[Row]) -> Claim | None:
    """Every method gains from adversarial pre-training: its best adversarial arm − its nominal arm."""
    best = _best(headline)
    tests = []
    for m in _methods(best):
        adv = _best_adversarial(best, m)
        assert adv is not None
        nominal = (m, "none", "-")
        est = compare(best[adv][2], best[nominal][2], AVERAGE)
        tests.append(Test(f"{_label(adv)} − {_label(nominal)}", est))
    return _for_every("every method gains from adversarial pre-training", "Fig. 1", tests)


def best_radius_differs(headline: Sequence[Row]) -> Claim | None:
    """The best radius differs by method: per norm and method, its smallest radius − its largest."""
    best = _best(headline)
    tests, verdicts = [], []
    for norm in NORMS:
        directions = []
        for m in agg.methods_in(k[0] for k in best):
            radii = sorted((k for k in best if k[0] == m and k[1] == norm), key=lambda k: radius_value(k[2]))
            if len(radii) < 2:
                continue
            small, large = radii[0], radii[-1]
            test = Test(
                f"{_label(small)} − {ATTACK_LABEL[norm]} {large[2]}",
                compare(best[small][2], best[large][2]),
                ("smaller radius better", "larger radius better", "no difference shown"),
            )
            tests.append(test)
            directions.append(test.verdict)
        if len(directions) < 2:
            continue
        if REPRODUCED in directions and CONTRADICTED in directions:
            verdicts.append(REPRODUCED)  # one method significantly prefers the smaller radius, one the larger
        elif all(d == directions[0] and d != INCONCLUSIVE for d in directions):
            verdicts.append(CONTRADICTED)  # every method significantly prefers the same radius
        else:
            verdicts.append(INCONCLUSIVE)
    if not verdicts:
        return None
    if REPRODUCED in verdicts:
        overall = REPRODUCED
    elif all(v == CONTRADICTED for v in verdicts):
        overall = CONTRADICTED
    else:
        overall = INCONCLUSIVE
    return Claim(
        "the best radius differs by method (a difference of one sign for one method, of the other for another)",
        "Fig. 1",
        tests,
        overall,
    )


def gap_narrows(headline: Sequence[Row]) -> Claim | None:
    """Adversarial pre-training narrows the gap between methods: (best − worst nominal method) − (best −
    worst method, each at its best adversarial arm), one contrast of four arms."""
    best = _best(headline)
    methods = _methods(best)
    if len(methods) < 2:
        return None
    nominal = sorted(((m, "none", "-") for m in methods), key=lambda k: best[k][1].mean)
    adversarial = sorted((_best_adversarial(best, m) for m in methods), key=lambda k: best[k][1].mean)  # type: ignore[arg-type,return-value]
    arms = [nominal[-1], nominal[0], adversarial[-1], adversarial[0]]
    est = contrast([best[k][2] for k in arms], [1.0, -1.0, -1.0, 1.0], AVERAGE)
    label = f"({_label(arms[0])} − {_label(arms[1])}) − ({_label(arms[2])} − {_label(arms[3])})"
    test = Test(label, est)
    return Claim("adversarial pre-training narrows the gap between methods", "Fig. 1", [test], test.verdict)


def decay_keeps_robustness(headline: Sequence[Row]) -> Claim | None:
    """A smaller layer decay keeps more robustness: per l2 radius, the mean over the selected models
    (each method's best adversarial arm) of robust top-1 at the smallest γ − at the largest."""
    models = agg.selected_models(headline)
    pairs = []
    for key in models:
        decays = agg.by_decay(headline, key)
        pairs.append((key, decays[0], decays[-1]))
    radii = sorted({r for _k, (_d, g), _ in pairs for r in g[0]["robust"].get("l2", {})}, key=radius_value)
    tests = []
    for radius in radii:
        usable = [
            (small, large) for _k, small, large in pairs if agg.measured([*small[1], *large[1]], "l2", radius)
        ]
        if not usable:
            continue
        arms = [group for small, large in usable for group in (small[1], large[1])]
        weights = [w / len(usable) for _ in usable for w in (1.0, -1.0)]
        est = contrast(arms, weights, ("robust", "l2", radius))
        decays = sorted({d for small, large in usable for d in (small[0], large[0])})
        tests.append(
            Test(
                f"γ {decays[0]:g} − γ {decays[-1]:g}, l2 robust top-1 at {radius}, mean of {len(usable)} models",
                est,
            )
        )
    return _for_every(
        "a smaller layer decay keeps more l2 robustness after nominal fine-tuning", "Fig. 5", tests
    )


def transfer_improves(rows: Sequence[Row]) -> Claim | None:
    """Adversarial pre-training improves transfer: per dataset and optimiser, the mean over methods and
    attacks of Table 1's adversarial cell − the same method's nominal cell (test top-1)."""
    cells = agg.table1_groups(rows, agg.best_by_arm(rows))
    tests = []
    for data, optim in sorted({(c[0], c[3]) for c in cells}):
        arms, weights = [], []
        for (d, m, a, o), (_decay, group) in cells.items():
            nominal = cells.get((d, m, "none", o))
            if (d, o) != (data, optim) or a == "none" or nominal is None:
                continue
            arms += [group, nominal[1]]
            weights += [1.0, -1.0]
        names = {agg._test_set(r) for group in arms for r in group}
        if not arms or len(names) != 1:
            continue
        pairs = len(arms) // 2
        est = contrast(arms, [w / pairs for w in weights], ("set", str(names.pop())))
        tests.append(
            Test(f"{data}, {optim}: adversarial − nominal, mean of {pairs} method × attack cells", est)
        )
    return _for_every("adversarial pre-training improves transfer", "Table 1", tests)


CLAIMS: tuple[Callable[..., Claim | None], ...] = (
    gains,
    best_radius_differs,
    gap_narrows,
    decay_keeps_robustness,
)
"""The claims tested on the headline evaluations, in the report's order (transfer comes last)."""


WORDS: dict[Callable[..., Claim | None], tuple[str, str]] = {
    gains: ("every method gains from adversarial pre-training", "Fig. 1"),
    best_radius_differs: ("the best radius differs by method", "Fig. 1"),
    gap_narrows: ("adversarial pre-training narrows the gap between methods", "Fig. 1"),
    decay_keeps_robustness: (
        "a smaller layer decay keeps more l2 robustness after nominal fine-tuning",
        "Fig. 5",
    ),
    transfer_improves: ("adversarial pre-training improves transfer", "Table 1"),
}
"""Each claim's words, for the row that says it is untestable here."""


def judge(rows: Sequence[Row], headline: Sequence[Row]) -> list[Claim]:
    """Every claim the runs can test, after the premise: where a scratch baseline was trained, each claim
    about adversarial pre-training is judged on the methods that pre-training helps here, and names the
    others as untestable here (with no such method, the claim is untestable here)."""
    first = premise(headline)
    holds = premise_holds(first)
    set_aside: tuple[str, ...] = ()
    if holds is not None:
        labels = {m: METHOD_LABEL.get(m, m) for r in headline for m in [r["method"]] if m != SCRATCH}
        set_aside = tuple(label for m, label in labels.items() if label not in holds)
        keep = {m for m, label in labels.items() if label in holds} | {SCRATCH}
        headline = [r for r in headline if r["method"] in keep]
        rows = [r for r in rows if r["method"] in keep]
    found: list[Claim] = [first] if first is not None else []
    for claim in (*CLAIMS, transfer_improves):
        judged = claim(rows if claim is transfer_improves else headline) if headline else None
        if judged is not None:
            judged.untestable = set_aside
            found.append(judged)
        elif set_aside:
            text, source = WORDS[claim]
            found.append(Claim(text, source, [], UNTESTABLE, set_aside))
    return found


def claims_table(claims: Sequence[Claim]) -> list[str]:
    """summary.md's opening: a row per claim with the differences behind it and its verdict."""
    if not claims:
        return ["No claim of the paper can be tested on these runs (they need nominal and adversarial arms)."]
    rows = [
        [
            f"{c.text} ({c.source})",
            "<br>".join(
                [f"{t.label}: {t.estimate.stated()} → {t.reading}" for t in c.tests]
                + (
                    [f"untestable here for {', '.join(c.untestable)}: pre-training does not help it here"]
                    if c.untestable
                    else []
                )
            ),
            f"**{c.verdict}**",
        ]
        for c in claims
    ]
    return [
        md_table(["claim", "tested by (difference in points, 95 % interval)", "verdict"], rows),
        "",
        "The first row is the premise: each method's nominal pre-training against the scratch baseline trained "
        "on the same labels. A claim about adversarial pre-training is judged only on the methods for which "
        "the premise holds, and is untestable here for the others. "
        "A verdict is read from the 95 % interval alone: reproduced when it excludes 0 on the claim's side, "
        "contradicted when it excludes 0 on the other, inconclusive when it holds 0. The arms compared are "
        "each method's best on these same test sets (radius and layer decay), which leans the differences "
        "towards the claims; no correction is made for the number of comparisons.",
    ]


def claim_rows(claims: Sequence[Claim]) -> list[dict[str, Any]]:
    """claims.csv: a row per difference."""
    return [
        {
            "claim": c.text,
            "source": c.source,
            "claim_verdict": c.verdict,
            "test": t.label,
            "difference": t.estimate,
            "reading": t.reading,
        }
        for c in claims
        for t in c.tests
    ]
