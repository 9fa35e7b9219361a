"""From evaluation rows to the numbers behind each figure, with sample sizes and 95 % intervals.

Uncertainty. One accuracy on ``n`` images, from one seed, gets the Wilson interval. Anything built from
several numbers (a mean over seeds, an average over evaluation sets, a difference from the scratch
model) gets a normal interval, 1.96 standard errors, whose variance adds the test-set sampling
(binomial, p(1-p)/n per set) and, with two seeds or more, the spread between seeds (s^2/k). Sets are
treated as independent; so are the two arms of a difference. These intervals say which gaps between
arms are larger than the evaluation noise at the sample sizes used; they are not corrected for the
number of comparisons, nor for picking the best radius or layer decay on the same test sets.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from statistics import mean, variance
from typing import Any

from advpt.names import ATTACKS, METHOD_LABEL
from advpt.report.collect import radius_value

Z = 1.96
METHOD_ORDER = tuple(METHOD_LABEL)  # the paper's order: Sup-PT, RotNet, MAE, BYOL


@dataclass(frozen=True)
class Estimate:
    """A mean with its 95 % interval, the images behind each seed's number and the number of seeds."""

    mean: float
    lo: float
    hi: float
    images: int
    seeds: int

    @property
    def half(self) -> float:
        return (self.hi - self.lo) / 2

    def pct(self) -> str:
        """In percent: ``m ± h`` for a symmetric interval, ``m [lo, hi]`` for an asymmetric (Wilson) one."""
        below, above = self.mean - self.lo, self.hi - self.mean
        if abs(below - above) < 5e-4:
            return f"{100 * self.mean:.2f} ± {100 * self.half:.2f}"
        return f"{100 * self.mean:.2f} [{100 * self.lo:.1f}, {100 * self.hi:.1f}]"


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


def difference(a: Estimate, b: Estimate) -> Estimate:
    d = a.mean - b.mean
    half = math.sqrt(a.half**2 + b.half**2)
    return Estimate(d, d - half, d + half, min(a.images, b.images), min(a.seeds, b.seeds))


# -- grouping ------------------------------------------------------------------------------------
Key = tuple[str, str, str]  # (method, attack, radius label)


def arm_of(row: Mapping[str, Any]) -> Key:
    return (row["method"], row["attack"], row["radius"])


def headline_rows(rows: Iterable[Mapping[str, Any]]) -> tuple[list[Mapping[str, Any]], str | None]:
    """The rows behind Fig. 1-3 and 5: the fine-tuning dataset's full evaluations (the data that most
    full evaluations used), one per fine-tuned model (the one with the most sets)."""
    full = [r for r in rows if len(r["sets"]) >= 2 or r["robust"]]
    if not full:
        full = list(rows)
    if not full:
        return [], None
    counts: dict[str, int] = defaultdict(int)
    for r in full:
        counts[r["data"]] += 1
    data = max(counts, key=lambda d: counts[d])
    best: dict[str, Mapping[str, Any]] = {}
    for r in full:
        if r["data"] != data:
            continue
        seen = best.get(r["finetune"])
        if seen is None or len(r["sets"]) > len(seen["sets"]):
            best[r["finetune"]] = r
    return list(best.values()), data


def by_model(rows: Iterable[Mapping[str, Any]]) -> dict[tuple[Key, float], list[Mapping[str, Any]]]:
    """Rows grouped by pre-trained arm and layer decay (the seeds of one model)."""
    groups: dict[tuple[Key, float], list[Mapping[str, Any]]] = defaultdict(list)
    for r in rows:
        groups[(arm_of(r), r["layer_decay"])].append(r)
    return groups


def average_of(rows: Sequence[Mapping[str, Any]]) -> Estimate:
    stats = [set_average(r["sets"]) for r in rows]
    return combine([a for a, _, _ in stats], [v for _, v, _ in stats], min(n for _, _, n in stats))


def sets_of(rows: Sequence[Mapping[str, Any]]) -> dict[str, Estimate]:
    names = [n for n in rows[0]["sets"] if all(n in r["sets"] for r in rows)]
    return {
        n: accuracy([(float(r["sets"][n]["top1"]), int(r["sets"][n]["images"])) for r in rows]) for n in names
    }


def best_decay(rows: Iterable[Mapping[str, Any]]) -> dict[Key, tuple[float, Estimate, list]]:
    """Each pre-trained arm at its best layer decay (by the mean average over seeds)."""
    out: dict[Key, tuple[float, Estimate, list]] = {}
    for (arm, decay), group in by_model(rows).items():
        est = average_of(group)
        if arm not in out or est.mean > out[arm][1].mean:
            out[arm] = (decay, est, group)
    return out


def order(key: Key) -> tuple:
    method, attack, radius = key
    m = METHOD_ORDER.index(method) if method in METHOD_ORDER else -1
    a = ATTACKS.index(attack) if attack in ATTACKS else len(ATTACKS)
    return (a, m, radius_value(radius.replace("-", "0")))


def best_by_arm(rows: Iterable[Mapping[str, Any]]) -> dict[tuple[str, str], Any]:
    """(method, attack) -> the radius (as the pre-training run recorded it) with the best average."""
    main, _ = headline_rows(list(rows))
    best: dict[tuple[str, str], tuple[float, Any]] = {}
    for (method, attack, _radius), (_decay, est, group) in best_decay(main).items():
        if method == "scratch":
            continue
        if (method, attack) not in best or est.mean > best[(method, attack)][0]:
            best[(method, attack)] = (est.mean, group[0]["eps"])
    return {k: v for k, (_, v) in best.items()}


# -- the figures' numbers ------------------------------------------------------------------------
def fig1(rows: Sequence[Mapping[str, Any]]) -> tuple[list[dict[str, Any]], Estimate | None]:
    """Average accuracy per (method, attack, radius) at its best layer decay, minus the scratch model's."""
    best = best_decay(rows)
    scratch = next((v for k, v in best.items() if k[0] == "scratch"), None)
    base = scratch[1] if scratch else None
    table = []
    for key in sorted((k for k in best if k[0] != "scratch"), key=order):
        decay, est, group = best[key]
        gain = difference(est, base) if base is not None else None
        table.append(
            {
                "method": key[0],
                "attack": key[1],
                "radius": key[2],
                "eps_value": group[0]["eps_value"],
                "layer_decay": decay,
                "average": est,
                "minus_scratch": gain,
            }
        )
    return table, base


def fig2(rows: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Per evaluation set, the best radius of each method x attack (the scratch model is Fig. 1's baseline,
    not a column: as in the paper, the colours compare pre-training arms)."""
    best = best_decay(rows)
    chosen: dict[tuple[str, str], Key] = {}
    for key, (_d, est, _g) in best.items():
        if key[0] == "scratch":
            continue
        slot = (key[0], key[1])
        if slot not in chosen or est.mean > best[chosen[slot]][1].mean:
            chosen[slot] = key
    columns = []
    for slot in sorted(chosen, key=lambda s: order((*s, "-"))):
        key = chosen[slot]
        decay, est, group = best[key]
        columns.append(
            {
                "method": key[0],
                "attack": key[1],
                "radius": key[2],
                "layer_decay": decay,
                "sets": sets_of(group),
                "average": est,
            }
        )
    return columns


def selected_models(rows: Sequence[Mapping[str, Any]]) -> list[Key]:
    """Fig. 3 and 5's pre-trained models: each method's best adversarial arm that was fine-tuned with at
    least two layer decays."""
    decays: dict[Key, set[float]] = defaultdict(set)
    for r in rows:
        decays[arm_of(r)].add(r["layer_decay"])
    best = best_decay(rows)
    chosen: dict[str, Key] = {}
    for key, (_d, est, _g) in best.items():
        if key[0] == "scratch" or key[1] == "none" or len(decays[key]) < 2:
            continue
        if key[0] not in chosen or est.mean > best[chosen[key[0]]][1].mean:
            chosen[key[0]] = key
    return sorted(chosen.values(), key=lambda k: METHOD_ORDER.index(k[0]) if k[0] in METHOD_ORDER else 9)


def fig3(rows: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Per selected model and layer decay, accuracy per set."""
    groups = by_model(rows)
    out = []
    for key in selected_models(rows):
        for (arm, decay), group in sorted(groups.items(), key=lambda kv: kv[0][1]):
            if arm == key:
                out.append(
                    {
                        "method": key[0],
                        "attack": key[1],
                        "radius": key[2],
                        "layer_decay": decay,
                        "sets": sets_of(group),
                        "average": average_of(group),
                    }
                )
    return out


def fig5(rows: Sequence[Mapping[str, Any]], norm: str = "l2") -> list[dict[str, Any]]:
    """Per selected model and layer decay, robust accuracy against the radius of ``norm``."""
    groups = by_model(rows)
    out = []
    for key in selected_models(rows):
        for (arm, decay), group in sorted(groups.items(), key=lambda kv: kv[0][1]):
            if arm != key:
                continue
            radii = [
                r
                for r in group[0]["robust"].get(norm, {})
                if all(r in g["robust"].get(norm, {}) for g in group)
            ]
            for radius in sorted(radii, key=radius_value):
                pairs = [
                    (float(g["robust"][norm][radius]["accuracy"]), int(g["robust"][norm][radius]["images"]))
                    for g in group
                ]
                out.append(
                    {
                        "method": key[0],
                        "attack": key[1],
                        "radius": key[2],
                        "layer_decay": decay,
                        "norm": norm,
                        "eval_radius": radius,
                        "eval_eps": radius_value(radius),
                        "robust": accuracy(pairs),
                    }
                )
    return out


def _test_top1(row: Mapping[str, Any]) -> tuple[float, int] | None:
    """A row's accuracy on its dataset's own test split."""
    sets = row["sets"]
    for name in (row["data"], "imagenet_val"):
        if name in sets:
            return float(sets[name]["top1"]), int(sets[name]["images"])
    if len(sets) == 1:
        entry = next(iter(sets.values()))
        return float(entry["top1"]), int(entry["images"])
    return None


def table1(rows: Sequence[Mapping[str, Any]], best: Mapping[tuple[str, str], Any]) -> list[dict[str, Any]]:
    """Datasets x (method, attack at its best radius) x optimiser: test top-1 (the best layer decay when
    one optimiser was run with several)."""
    cells: dict[tuple[str, str, str, str], dict[float, list[tuple[float, int]]]] = defaultdict(
        lambda: defaultdict(list)
    )
    seen = set()
    for r in rows:
        if r["method"] == "scratch" or (r["method"], r["attack"]) not in best:
            continue
        if abs(radius_value(best[(r["method"], r["attack"])]) - r["eps_value"]) > 1e-9:
            continue
        score = _test_top1(r)
        if score is None or r["finetune"] in seen:
            continue
        seen.add(r["finetune"])
        cells[(r["data"], r["method"], r["attack"], r["optim"])][r["layer_decay"]].append(score)
    out = []
    for (data, method, attack, optim), by_decay in cells.items():
        decay, pairs = max(by_decay.items(), key=lambda kv: mean(p for p, _ in kv[1]))
        radius = next(
            r["radius"]
            for r in rows
            if (r["method"], r["attack"]) == (method, attack)
            and abs(radius_value(best[(method, attack)]) - r["eps_value"]) <= 1e-9
        )
        out.append(
            {
                "data": data,
                "method": method,
                "attack": attack,
                "radius": radius,
                "optim": optim,
                "layer_decay": decay,
                "top1": accuracy(pairs),
            }
        )
    return out


def knn_curves(points: Iterable[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """The monitor's kNN top-1 per pre-training arm and epoch, averaged over its runs (seeds):
    rows of (method, attack, radius, epoch, knn_top1, knn_robust_top1, runs), arms in the paper's order."""
    groups: dict[tuple[Key, int], list[Mapping[str, Any]]] = defaultdict(list)
    for p in points:
        groups[(arm_of(p), p["epoch"])].append(p)
    out = []
    for (arm, epoch), group in sorted(groups.items(), key=lambda kv: (order(kv[0][0]), kv[0][1])):
        robust = [p["knn_robust_top1"] for p in group if p.get("knn_robust_top1") is not None]
        out.append(
            {
                **dict(zip(("method", "attack", "radius"), arm, strict=True)),
                "epoch": epoch,
                "knn_top1": mean(p["knn_top1"] for p in group),
                "knn_robust_top1": mean(robust) if robust else None,
                "runs": len(group),
            }
        )
    return out
